"""Issue "never lose a user's files": every command that writes refuses a folder it could destroy, and bad input
is one line on stderr with exit status 2, before anything is written (checked with checksums of every file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.cli import main as cli  # noqa: E402
from lowrank_fed.llm import Adapter, load_peft_adapter, save_peft_adapter  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.outputs import OutputFolderError, atomic_folder, plan_output  # noqa: E402

# A folder no process can create, root included (so the test means the same on CI as on a laptop).
UNWRITABLE = "/proc/lowrank-fed-cannot-write-here"
TINY_RUN = ["--set", 'model="tiny-bert"', "--set", "dataset=synthetic", "--set", "clients=3", "--set",
            "ranks=[2,4,4]", "--set", "rounds=1", "--set", "local_steps=1", "--set", "eval_size=20",
            "--set", 'methods=["fedit"]', "--no-progress"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> sha256 of the bytes ('dir' for folders)."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def adapter(folder: Path, seed: int, rank: int = 2) -> Path:
    """A small PEFT adapter folder (two modules of a 6 x 5 and a 4 x 7 layer)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {m: FactorPair(torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen))
             for m, (d_out, d_in) in {"enc.q": (6, 5), "enc.v": (4, 7)}.items()}
    return save_peft_adapter(folder, Adapter(pairs), lora_alpha=4)


@pytest.fixture
def refused(capsys):
    """``refused(argv, fragment)``: exit status 2, one line on stderr holding ``fragment``, no traceback."""

    def check(argv, fragment):
        status = cli([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert fragment in lines[0], lines[0]
        return lines[0]

    return check


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder holding two adapters, a config and an unrelated file; the current folder."""
    monkeypatch.chdir(tmp_path)
    adapter(tmp_path / "a", 0)
    adapter(tmp_path / "b", 1, rank=3)
    (tmp_path / "notes.txt").write_text("the user's own notes")
    (tmp_path / "ok.toml").write_text('model = "tiny-bert"\ndataset = "synthetic"\nclients = 3\nranks = [2, 4, 4]\n'
                                      'rounds = 1\nlocal_steps = 1\neval_size = 20\nmethods = ["fedit"]\n')
    return tmp_path


# ----------------------------------------------------------------------------- 1-3: data loss
@pytest.mark.parametrize("out", [".", "a", "b", "..", "~"])
def test_merge_never_empties_the_working_folder_or_an_input(workspace, refused, out):
    before = snapshot(workspace)
    refused(["merge", "a", "b", "--rule", "svd", "--out", out, "--overwrite", "--no-progress"], "--out")
    assert snapshot(workspace) == before


def test_merge_per_client_never_replaces_an_input(workspace, refused):
    before = snapshot(workspace)
    refused(["merge", "a", "b", "--rule", "svd", "--out", "g", "--per-client", "a", "--overwrite"], "input")
    refused(["merge", "a", "b", "--rule", "svd", "--out", "g", "--per-client", "g/shares"], "overlap")
    assert snapshot(workspace) == before


def test_merge_overwrite_refuses_a_folder_it_did_not_write(workspace, refused):
    (workspace / "mine").mkdir()
    (workspace / "mine" / "thesis.tex").write_text("chapter 1")
    before = snapshot(workspace)
    refused(["merge", "a", "b", "--rule", "svd", "--out", "mine", "--overwrite"], "did not write (thesis.tex)")
    assert snapshot(workspace) == before


def test_run_never_empties_the_folder_of_its_config(workspace, refused):
    # Prepare: the config in a folder with other files, as a user keeps them
    d = workspace / "d"
    d.mkdir()
    (workspace / "ok.toml").rename(d / "ok.toml")
    (d / "results.csv").write_text("a,b\n1,2\n")
    before = snapshot(workspace)
    # Execute / Assert
    refused(["run", "d/ok.toml", "--out", "d", "--overwrite", "--no-progress"], "input of this command")
    refused(["run", "d/ok.toml", "--out", ".", "--overwrite", "--no-progress"], "current folder")
    refused(["run", *TINY_RUN, "--out", "a", "--overwrite"], "did not write")  # an adapter folder is no run
    assert snapshot(workspace) == before


def test_reproduce_never_writes_into_a_run_or_a_file(workspace, refused):
    run = workspace / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    (run / "metrics.jsonl").write_text("{}\n")
    before = snapshot(workspace)
    refused(["reproduce", "byun-lee", "--quick", "--out", "run", "--no-progress"], "already holds files")
    refused(["reproduce", "byun-lee", "--quick", "--out", "notes.txt", "--no-progress"], "is not a folder")
    refused(["reproduce", "byun-lee", "--quick", "--out", "", "--no-progress"], "--out is empty")
    assert snapshot(workspace) == before


# ----------------------------------------------------------------------------- 6-7: named errors, exit 2
def test_an_unwritable_out_is_named(workspace, refused):
    refused(["merge", "a", "b", "--rule", "svd", "--out", UNWRITABLE], "cannot be written")
    refused(["run", *TINY_RUN, "--out", UNWRITABLE], "cannot be written")
    refused(["reproduce", "byun-lee", "--quick", "--out", UNWRITABLE, "--no-progress"], "cannot be written")


def test_an_empty_out_is_an_error_not_the_default(workspace, refused):
    refused(["merge", "a", "b", "--rule", "svd", "--out", ""], "--out is empty")
    refused(["run", *TINY_RUN, "--out", ""], "--out is empty")
    assert not (workspace / "runs").exists()


def test_a_file_as_out_is_refused_even_with_overwrite(workspace, refused):
    before = snapshot(workspace)
    refused(["merge", "a", "b", "--rule", "svd", "--out", "notes.txt", "--overwrite"], "is not a folder")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("damage,fragment", [
    ("truncate", "cannot be read as a weights file"),
    ("garbage", "cannot be read as a weights file"),
    ("nan", "non-finite entries"),
    ("declared rank", "declares rank 3"),
])
def test_a_damaged_adapter_is_named(workspace, refused, damage, fragment):
    # Prepare: damage client b
    weights, config = workspace / "b" / "adapter_model.safetensors", workspace / "b" / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x07" * 64)
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        next(iter(state.values()))[0, 0] = float("nan")
        save_file(state, str(weights))
    else:  # tensors of rank 3 under a config saying r = 3 -> make it say 8
        config.write_text(config.read_text().replace('"r": 3', '"r": 8'))
        fragment = "declares rank 8"
    # Execute / Assert
    line = refused(["merge", "a", "b", "--rule", "svd", "--out", "g"], fragment)
    assert "b" in line
    assert not (workspace / "g").exists()


@pytest.mark.parametrize("options,fragment", [
    (["--weights", "nan", "1"], "--weights: expected 2 finite"),
    (["--weights", "inf", "1"], "--weights: expected 2 finite"),
    (["--rank", "100000"], "--rank 100000: expected at most min(d_out, d_in) = 4 of module 'enc.v'"),
    (["--lora-alpha", "0"], "--lora-alpha: expected a finite positive number"),
    (["--lora-alpha", "nan"], "--lora-alpha: expected a finite positive number"),
    (["--rule", "fedavg"], "needs equal ranks"),
    (["--weights", "0", "1", "--rank", "2"], None),  # fine: a zero weight on one client
])
def test_merge_options_out_of_range_are_named(workspace, refused, capsys, options, fragment):
    argv = ["merge", "a", "b", "--out", "g", "--no-progress", *(["--rule", "svd"] if "--rule" not in options
                                                               else []), *options]
    if fragment is None:
        assert cli(argv) == 0
        assert set(load_peft_adapter(workspace / "g").ranks.values()) == {2}
        return
    refused(argv, fragment)
    assert not (workspace / "g").exists()


def test_merge_truncation_error_is_the_tail_of_the_spectrum(workspace, capsys):
    # The exact sum of a (rank 2) and b (rank 3) has rank 4 at most here (d = 4 for enc.v): keep 1 direction
    from lowrank_fed import factored_svd

    assert cli(["merge", "a", "b", "--rule", "svd", "--rank", "1", "--out", "g", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    for m in ("enc.q", "enc.v"):
        S = factored_svd([load_peft_adapter(workspace / c).pairs[m] for c in "ab"])[1].double()
        assert f"{float(S[1:].norm() / S.norm()):.3e}" in shown


# ----------------------------------------------------------------------------- atomic replacement
def test_a_failed_merge_leaves_the_earlier_output_whole(workspace, monkeypatch, capsys):
    # Prepare: an earlier merge output, then a writer that dies half-way
    assert cli(["merge", "a", "b", "--rule", "svd", "--out", "g", "--no-progress"]) == 0
    before = snapshot(workspace / "g")
    from lowrank_fed.llm import adapters

    real = adapters.save_peft_adapter

    def dies(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters, "save_peft_adapter", dies)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        cli(["merge", "a", "b", "--rule", "stack", "--out", "g", "--overwrite", "--no-progress"])
    # Assert: the old output, complete; no temporary sibling left
    assert snapshot(workspace / "g") == before
    assert not [p for p in workspace.iterdir() if p.name.startswith(".g.")]
    monkeypatch.setattr(adapters, "save_peft_adapter", real)
    assert cli(["merge", "a", "b", "--rule", "stack", "--out", "g", "--overwrite", "--no-progress"]) == 0
    assert load_peft_adapter(workspace / "g").ranks == {"enc.q": 5, "enc.v": 5}


def test_plan_output_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert plan_output(tmp_path / "new", signature=("x",)) == "new"
    (tmp_path / "scratch" / ".flower").mkdir(parents=True)
    assert plan_output(tmp_path / "scratch", signature=("x",)) == "new"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("")
    assert plan_output(tmp_path / "old", signature=("x",)) == "existing"
    assert plan_output(tmp_path / "old", signature=("x",), overwrite=True) == "clear"
    with pytest.raises(OutputFolderError, match="input of this command"):
        plan_output(tmp_path / "old", signature=("x",), inputs=[tmp_path / "old" / "x"])
    with pytest.raises(OutputFolderError, match="it is the home folder"):
        plan_output(Path.home(), signature=("x",), overwrite=True)
    # A process running inside the output's own scratch folder (Flower's ServerApp) may write its output
    monkeypatch.chdir(tmp_path / "scratch" / ".flower")
    assert plan_output(tmp_path / "scratch", signature=("x",)) == "new"


def test_atomic_folder_keeps_the_old_contents_on_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
        raise RuntimeError
    assert (tmp_path / "out" / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert (tmp_path / "out" / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- the command line itself
@pytest.mark.parametrize("argv,fragment", [
    ([], "the following arguments are required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["merge", "a", "--rule", "svd"], "the following arguments are required: --out"),
    (["merge", "a", "--rule", "svd", "--out", "g", "--weights", "abc"], "invalid float value: 'abc'"),
])
def test_usage_errors_are_one_line(workspace, refused, argv, fragment):
    refused(argv, fragment)


def test_an_os_error_is_one_line_not_a_traceback(workspace, refused, monkeypatch):
    from lowrank_fed.llm import merge

    def full(args):
        raise OSError(28, "No space left on device", "g/adapter_model.safetensors")

    monkeypatch.setattr(merge, "main", full)
    refused(["merge", "a", "b", "--rule", "svd", "--out", "g"], "No space left on device (g/adapter_model")
    monkeypatch.setenv("LOWRANK_FED_THREADS", "100000")
    refused(["merge", "a", "b", "--rule", "svd", "--out", "g"], "LOWRANK_FED_THREADS must be a whole number")
    # the bound is the cores this process may use (its affinity mask), not the machine's
    import lowrank_fed.cli

    monkeypatch.setattr(lowrank_fed.cli, "available_cores", lambda: 1)
    monkeypatch.setenv("LOWRANK_FED_THREADS", "2")
    refused(["merge", "a", "b", "--rule", "svd", "--out", "g"], "from 1 to the 1 cores this process may use")


# ----------------------------------------------------------------------------- what merge reports and decides
def test_merge_missing_module_zero_or_holders(workspace, capsys):
    # Prepare: client c adapts one more module than a, with a long name (never cut in the table)
    long = "model.encoder.layers.11.self_attention.query_key_value_projection_with_a_very_long_name"
    gen = torch.Generator().manual_seed(7)
    extra = FactorPair(torch.randn(5, 2, generator=gen), torch.randn(2, 3, generator=gen))
    pairs = dict(load_peft_adapter(workspace / "a").pairs)
    save_peft_adapter(workspace / "c", Adapter({**pairs, long: extra}), lora_alpha=4)
    # Execute: weights 1 (a) and 3 (c)
    assert cli(["merge", "a", "c", "--rule", "svd", "--weights", "1", "3", "--out", "z", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert cli(["merge", "a", "c", "--rule", "svd", "--weights", "1", "3", "--out", "h", "--missing", "holders",
                "--no-progress"]) == 0
    # Assert: zero -> 3/4 of c's update (the weighted average of the two models); holders -> c's update whole
    want = extra.B @ extra.A
    for folder, share in (("z", 0.75), ("h", 1.0)):
        got = load_peft_adapter(workspace / folder).pairs[long]
        torch.testing.assert_close(got.B @ got.A, share * want, rtol=1e-5, atol=1e-6)
    assert long in shown and "1 of 2: c" in shown and "all modules" in shown


def test_merge_reports_the_aggregation_error_of_each_module(workspace, capsys):
    from lowrank_fed import aggregate
    from lowrank_fed.linalg import aggregation_error

    assert cli(["merge", "a", "b", "--rule", "zero_pad", "--out", "g", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    held = [load_peft_adapter(workspace / c).pairs for c in "ab"]
    for m in ("enc.q", "enc.v"):
        num, den = aggregation_error([h[m] for h in held], None, aggregate("zero_pad", [h[m] for h in held]))
        assert f"{num / den:.3e}" in shown and num / den > 0.01  # zero-padding dilutes the slot b alone holds
    assert cli(["merge", "a", "b", "--rule", "stack", "--out", "s", "--no-progress"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "enc." in line]
    assert rows and all(float(line.split("│")[4]) < 1e-6 for line in rows)


def test_merge_refuses_adapters_of_different_bases_unless_allowed(workspace, refused):
    pairs = load_peft_adapter(workspace / "a").pairs
    save_peft_adapter(workspace / "x", Adapter(pairs), lora_alpha=4, base_model_name_or_path="org/model-7b")
    save_peft_adapter(workspace / "y", Adapter(pairs), lora_alpha=4, base_model_name_or_path="org/model-13b")
    line = refused(["merge", "x", "y", "--rule", "svd", "--out", "g"], "different base models")
    assert "org/model-7b" in line and "org/model-13b" in line and "--allow-mixed-base" in line
    assert not (workspace / "g").exists()
    assert cli(["merge", "x", "y", "--rule", "svd", "--out", "g", "--allow-mixed-base", "--no-progress"]) == 0
    assert not json.loads((workspace / "g" / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.parametrize("rule", ["svd", "stack"])
def test_merge_task_arithmetic_subtracts_exactly(workspace, refused, rule):
    # Execute: a - 0.5 b
    assert cli(["merge", "a", "b", "--rule", rule, "--weights", "1", "-0.5", "--allow-negative", "--out", "g",
                "--no-progress"]) == 0
    # Assert
    a, b, g = (load_peft_adapter(workspace / c).pairs for c in ("a", "b", "g"))
    for m in a:
        want = (a[m].B @ a[m].A - 0.5 * b[m].B @ b[m].A).double()
        torch.testing.assert_close((g[m].B @ g[m].A).double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    refused(["merge", "a", "b", "--rule", "zero_pad", "--weights", "1", "-1", "--allow-negative", "--out", "h"],
            "--allow-negative (task arithmetic")
    refused(["merge", "a", "b", "--rule", rule, "--weights", "1", "-1", "--out", "h"], "non-negative")


def test_flower_up_never_empties_the_folder_of_its_config(workspace, refused):
    pytest.importorskip("flwr")
    d = workspace / "d"
    d.mkdir()
    (workspace / "ok.toml").rename(d / "ok.toml")
    before = snapshot(workspace)
    refused(["flower", "up", "d/ok.toml", "--out", "d", "--overwrite"], "input of this command")
    refused(["flower", "up", "d/ok.toml", "--out", "."], "current folder")
    refused(["flower", "up", "d/ok.toml", "--out", ""], "--out is empty")
    assert snapshot(workspace) == before


# ----------------------------------------------------------------------------- found by a review from outside
@pytest.mark.parametrize("extra", [["src/main.py"], ["model.safetensors", "README.md"]], ids=["project", "hf-model"])
def test_overwrite_refuses_a_folder_that_only_happens_to_hold_a_config_json(workspace, refused, extra):
    # A Hugging Face model folder or a project also has a top-level config.json: it is no earlier run
    folder = workspace / "theirs"
    (folder / "src").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name in extra:
        (folder / name).write_text("precious")
    before = snapshot(workspace)
    refused(["run", *TINY_RUN, "--out", "theirs", "--overwrite"], "did not write")
    (folder / "adapter_config.json").write_text("{}")
    refused(["merge", "a", "b", "--rule", "svd", "--out", "theirs", "--overwrite"], "did not write")
    after = snapshot(workspace)
    assert after == {**before, "theirs/adapter_config.json": after["theirs/adapter_config.json"]}


def test_the_model_cache_is_an_input(workspace, refused, monkeypatch):
    cache = workspace / "cache"
    (cache / "some-model").mkdir(parents=True)
    (cache / "some-model" / "config.json").write_text("{}")
    monkeypatch.setenv("LOWRANK_FED_CACHE", str(cache))
    before = snapshot(workspace)
    refused(["run", *TINY_RUN, "--out", "cache/some-model", "--overwrite"], "input folder of this command")
    refused(["run", *TINY_RUN, "--out", "cache", "--overwrite"], "input of this command")
    assert snapshot(workspace) == before


def test_a_folder_a_running_command_holds_is_refused(workspace, refused):
    from lowrank_fed.llm.outputs import hold_lock

    (workspace / "live").mkdir()
    (workspace / "live" / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    with hold_lock(workspace / "live"):
        refused(["run", *TINY_RUN, "--out", "live", "--overwrite"], "is in use: process")
        refused(["run", "--resume", "live", "--no-progress"], "is in use: process")
    assert not (workspace / "live" / ".lowrank-fed.lock").exists()


def test_merge_overwrite_through_a_link_replaces_what_it_points_to(workspace):
    assert cli(["merge", "a", "b", "--rule", "svd", "--out", "m1", "--no-progress"]) == 0
    (workspace / "link").symlink_to(workspace / "m1")
    assert cli(["merge", "a", "b", "--rule", "stack", "--out", "link", "--overwrite", "--no-progress"]) == 0
    assert (workspace / "link").is_symlink()
    assert load_peft_adapter(workspace / "m1").ranks == {"enc.q": 5, "enc.v": 5}


def test_merge_refuses_a_client_given_twice(workspace, refused):
    refused(["merge", "a", "a", "--rule", "svd", "--out", "g"], "'a' is given twice")
    (workspace / "a-again").symlink_to(workspace / "a")
    refused(["merge", "a", "a-again", "--rule", "svd", "--out", "g"], "given twice (or through a link)")


def test_merge_coefficients_that_overflow_are_named(workspace, refused):
    refused(["merge", "a", "b", "--rule", "svd", "--weights", "1e308", "1e308", "--allow-negative", "--out", "g",
             "--no-progress"], "overflow")


def test_an_invalid_stored_config_is_one_line_on_resume(workspace, refused):
    (workspace / "r").mkdir()
    (workspace / "r" / "config.json").write_text(json.dumps({**RunConfig().to_dict(), "lr": float("nan"),
                                                             "bogus": 1}))
    refused(["run", "--resume", "r", "--no-progress"], "is invalid here")


def test_reproduce_seeds_are_bounded(workspace, refused):
    refused(["reproduce", "clair", "--quick", "--seeds", "1000000", "--out", "rp"], "--seeds must be from 1 to 100")
