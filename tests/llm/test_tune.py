"""``lowrank-fed tune``: choices on validation data only, edge extensions, ties, the tuned.toml round trip, errors."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.cli import main as cli_main  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig, load_config  # noqa: E402
from lowrank_fed.llm.reproduce.tune_report import tuned_ties  # noqa: E402
from lowrank_fed.llm.tune import extend_value, separation, tune  # noqa: E402

TINY = """\
name = "tiny-tune"
model = "tiny-bert"
dataset = "synthetic"
methods = ["fedit", "flexlora"]
clients = 3
ranks = [2, 4, 4]
rounds = 2
local_steps = 4
batch_size = 8
lr = 1e-2
max_length = 32
val_size = 30
eval_size = 30
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "setting" / "tiny.toml"
    path.parent.mkdir()
    path.write_text(TINY)
    return path


def peaked(peak: float, *, option: str = "lr", flat: bool = False):
    """A trial scorer (the seam): validation accuracy peaked at ``peak`` in log scale, a small offset per seed."""
    calls = []

    def trial(cfg: RunConfig, folder):
        (method,) = cfg.methods
        value = cfg.method_options[method][option]
        calls.append((method, value, cfg.seed))
        acc = 0.5 if flat else 0.9 - 0.1 * math.log10(value / peak) ** 2 + 0.01 * (cfg.seed - 100)
        return {"val_accuracy": acc, "val_loss": 1 - acc, "val_size": 10**6, "round": cfg.rounds}

    trial.calls = calls
    return trial


def rows(report, method):
    (row,) = [r for r in report["methods"] if r["method"] == method]
    return row


# ----------------------------------------------------------------------------- the rules, through the seam


def test_a_best_value_at_an_edge_is_extended_until_it_is_interior(config, tmp_path):
    # Prepare: the best lr (0.05) lies above the grid 1e-3, 3e-3, 1e-2
    trial = peaked(0.05)
    # Execute
    report = tune(config, grid=[1e-3, 3e-3, 1e-2], seeds=[100, 101, 102], methods=["fedit"], out=tmp_path / "out",
                  trial=trial, log=lambda m: None)
    # Assert: 1e-2 * (1e-2 / 3e-3) = 0.0333333 added, then 0.111111; 0.0333333 is interior and chosen
    row = rows(report, "fedit")
    assert [e["value"] for e in row["extensions"]] == [0.0333333, 0.111111]
    assert [e["edge"] for e in row["extensions"]] == ["high", "high"]
    assert row["choice"] == 0.0333333 and not row["at_edge"] and row["stopped"] is None
    assert [v["value"] for v in row["values"]] == [1e-3, 3e-3, 1e-2, 0.0333333, 0.111111]
    assert {(v, s) for _, v, s in trial.calls} == {(v, s) for v in [1e-3, 3e-3, 1e-2, 0.0333333, 0.111111]
                                                  for s in (100, 101, 102)}
    assert len(trial.calls) == 15  # each trial once
    # the neighbours 0.01 and 0.111 are worse by more than a standard error: no tie
    assert not row["tie"] and {v["label"] for v in row["values"] if "vs_choice" in v} == {"0.01", "0.111111"}
    text = (tmp_path / "out" / "tune.md").read_text()
    assert "| 0.0333333 | " in text and "**chosen**" in text and "added 0.111111: the best mean was 0.0333333, at the high edge" in text
    assert tomllib.loads((tmp_path / "out" / "tuned.toml").read_text()) == {"fedit": {"lr": 0.0333333}}


def test_the_low_edge_extends_with_the_same_ratio_and_the_limit_is_reported(config, tmp_path):
    # Execute: the best lr (1e-6) is far below; at most 2 extensions
    report = tune(config, grid=[1e-3, 1e-2], seeds=[100], methods=["fedit"], max_extensions=2,
                  out=tmp_path / "out", trial=peaked(1e-6), log=lambda m: None)
    # Assert: 1e-4 and 1e-5 added, the best still at the low edge, and the report says so
    row = rows(report, "fedit")
    assert [e["value"] for e in row["extensions"]] == [1e-4, 1e-5] and row["choice"] == 1e-5
    assert row["at_edge"] and "limit of 2 extensions" in row["stopped"]
    assert "STILL AT AN EDGE" in (tmp_path / "out" / "tune.md").read_text()
    assert "STILL AT AN EDGE" in (tmp_path / "out" / "tuned.toml").read_text()


def test_the_lr_bounds_stop_an_extension(config, tmp_path):
    report = tune(config, grid=[0.1, 0.5], seeds=[100], methods=["fedit"], out=tmp_path / "out",
                  trial=peaked(50.0), log=lambda m: None)
    row = rows(report, "fedit")
    assert row["choice"] == 0.5 and row["extensions"] == [] and "would leave the lr bounds" in row["stopped"]


def test_an_edge_tied_with_the_best_mean_is_extended_though_the_tie_break_chose_the_other_value(config, tmp_path):
    # Prepare: validation 0.1 at 1e-3, and 0.2 at both 1e-2 and 1e-1 (seeds alike); past the grid, 1.0 scores 0.3
    scores = {1e-3: 0.1, 1e-2: 0.2, 1e-1: 0.2, 1.0: 0.3}

    def trial(cfg, folder):
        acc = scores[cfg.method_options["fedit"]["lr"]]
        return {"val_accuracy": acc, "val_loss": 1 - acc, "val_size": 10**6, "round": cfg.rounds}

    # Execute
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], methods=["fedit"], out=tmp_path / "out",
                  trial=trial, log=lambda m: None)
    # Assert: the tie-break takes 1e-2, yet 1e-1 (at the edge, with the same mean) is extended, and 1.0 wins
    row = rows(report, "fedit")
    assert [e["value"] for e in row["extensions"]] == [1.0] and row["extensions"][0]["edge"] == "high"
    assert row["choice"] == 1.0 and row["stopped"] is not None  # 1.0 is the lr bound: it stays at the edge
    # where the added value scores lower, the tie-break's choice stands and nothing more is added
    scores[1.0] = 0.15
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], methods=["fedit"], out=tmp_path / "out2",
                  trial=trial, log=lambda m: None)
    row = rows(report, "fedit")
    assert [e["value"] for e in row["extensions"]] == [1.0] and row["choice"] == 1e-2 and row["stopped"] is None
    assert row["tie"] and row["tied_with"] == ["0.1"]


def test_equal_scores_are_a_marked_tie_and_the_smaller_value_is_chosen(config, tmp_path):
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], methods=["fedit"], max_extensions=0,
                  out=tmp_path / "out", trial=peaked(1.0, flat=True), log=lambda m: None)
    row = rows(report, "fedit")
    # the smallest value is chosen; it is at the low edge, and no extension was allowed
    assert row["choice"] == 1e-3 and row["tie"] and row["tied_with"] == ["0.01"]
    assert "limit of 0 extensions" in row["stopped"]
    assert "**tie**" in (tmp_path / "out" / "tune.md").read_text()
    assert "TIE" in (tmp_path / "out" / "tuned.toml").read_text()
    assert tuned_ties(tmp_path / "out" / "tuned.toml") == {"fedit": "lr = 0.001, tied with 0.01"}


def test_equal_counts_summed_in_another_order_are_equal_means():
    from lowrank_fed.llm.tune import choose, same_mean

    # Prepare: lora-a2 dir001_r1's FFA-LoRA, 45 of 600 validation examples at both rates, summed in another order
    means = {"a": sum([0.095, 0.065, 0.065]) / 3, "b": sum([0.07, 0.08, 0.075]) / 3}
    # Execute / Assert: the float means differ in the last bit; the tie-break (the first in order) decides, not it
    assert means["a"] != means["b"] and same_mean(means["a"], means["b"])
    assert choose(means, ["a", "b"], True) == "a" and choose(means, ["b", "a"], True) == "b"
    assert choose({"a": 0.5, "b": 0.5 + 1e-6}, ["a", "b"], True) == "b"  # a real difference still counts


def test_a_tune_on_the_downloads_says_where_the_global_model_would_choose_otherwise(config, tmp_path):
    # Prepare: the downloads peak at 1e-2, the global model at 1e-3
    def trial(cfg: RunConfig, folder):
        lr = cfg.method_options[cfg.methods[0]]["lr"]
        return {"val_local_accuracy": 0.9 - 0.1 * math.log10(lr / 1e-2) ** 2, "val_local_n": 10**6,
                "val_accuracy": 0.9 - 0.1 * math.log10(lr / 1e-3) ** 2, "val_size": 10**6, "round": cfg.rounds}

    out = tmp_path / "out"
    # Execute
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], methods=["fedit"], max_extensions=0, out=out,
                  trial=trial, log=lambda m: None, score_on="downloads")
    # Assert: chosen on the downloads; the check names the global model's value and how far behind the choice is
    row = rows(report, "fedit")
    check = row["global_check"]
    assert row["choice_label"] == "0.01" and check["choice_label"] == "0.001" and not check["same"]
    assert check["vs_choice"]["difference"] == pytest.approx(0.1) and check["vs_choice"]["separated"]
    assert ("it would choose 0.001 (0.9000); the choice above scores 0.8000 there, +0.1000 behind"
            in (out / "tune.md").read_text())


def test_a_tie_is_read_back_from_a_table_appended_from_another_tuned_file(config, tmp_path):
    # Prepare: a tuned file with a tie (fedit, flat scores), and one without (flexlora, peaked), to which fedit's
    # table is appended from the first as tune_all.sh appends CLAIR's gamma = 0 rate
    folder = tmp_path / "tuned"
    folder.mkdir()
    for stem, trial, method in (("g0", peaked(1.0, flat=True), "fedit"), ("g1", peaked(0.01), "flexlora")):
        tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], methods=[method], max_extensions=0,
             out=tmp_path / stem, trial=trial, log=lambda m: None)
        (folder / f"{stem}.toml").write_text((tmp_path / stem / "tuned.toml").read_text())
    with open(folder / "g1.toml", "a") as f:
        f.write("\n# [fedit] from g0.toml: its rate where it was chosen\n[fedit]\nlr = 0.001\n")
    # Execute / Assert: the appended table's tie comes from its source; the separated choice has none
    assert tuned_ties(folder / "g1.toml") == {"fedit": "lr = 0.001, tied with 0.01 (from g0)"}
    assert load_config(folder / "g1.toml")["fedit"] == {"lr": 0.001}


def test_an_integer_option_and_a_categorical_option(config, tmp_path):
    # Prepare: an integer option of one method, through METHOD.OPTION
    def by_rank(cfg, folder):
        g = cfg.method_options["lora_a2"]["global_rank"]
        return {"val_accuracy": 0.5 + 0.01 * g, "val_loss": 1.0, "val_size": 40, "round": 2}

    def by_variant(cfg, folder):
        return {"val_accuracy": {"freezing": 0.6, "truncation": 0.4}[cfg.method_options["hafl"]["variant"]],
                "val_loss": 1.0, "val_size": 40, "round": 2}

    # Execute
    ranks = tune(config, param="lora_a2.global_rank", grid=[2, 4], seeds=[100], max_extensions=1,
                 out=tmp_path / "a", trial=by_rank, log=lambda m: None)
    variant = tune(config, param="hafl.variant", grid=["truncation", "freezing"], seeds=[100],
                   out=tmp_path / "b", trial=by_variant, log=lambda m: None)
    # Assert: 8 = 4 * (4 / 2) added (an integer), the limit reported; a categorical grid is never extended
    row = rows(ranks, "lora_a2")
    assert [e["value"] for e in row["extensions"]] == [8] and row["choice"] == 8 and "limit of 1" in row["stopped"]
    assert tomllib.loads((tmp_path / "a" / "tuned.toml").read_text()) == {"lora_a2": {"global_rank": 8}}
    row = rows(variant, "hafl")
    assert row["choice"] == "freezing" and row["extensions"] == [] and row["stopped"] is None
    assert tomllib.loads((tmp_path / "b" / "tuned.toml").read_text()) == {"hafl": {"variant": "freezing"}}


def test_extend_value_and_separation():
    assert extend_value(0.01, 0.003, geometric=True, integer=False) == 0.0333333
    assert extend_value(1, 2, geometric=False, integer=True) == 0
    assert extend_value(3, 3.2, geometric=True, integer=True) == 2  # at least one step away
    # paired over seeds: a consistent difference is separated, a noisy one is not
    assert separation([0.8, 0.81, 0.82], [0.7, 0.7, 0.71], higher_is_better=True, accuracy=False,
                      n_val=None)["separated"]
    s = separation([0.6, 0.4], [0.5, 0.5], higher_is_better=True, accuracy=False, n_val=None)
    assert s["difference"] == 0 and not s["separated"]
    # lower is better (loss): the sign turns; one seed and not accuracy: no standard error, a tie
    s = separation([1.0], [2.0], higher_is_better=False, accuracy=False, n_val=None)
    assert s["difference"] == 1.0 and s["se"] is None and not s["separated"]
    # accuracy: the larger of the paired and the binomial standard error (seeds x examples)
    s = separation([0.5, 0.5], [0.4, 0.4], higher_is_better=True, accuracy=True, n_val=50)
    assert s["se_seeds"] == 0 and s["se"] == pytest.approx(math.sqrt(0.25 / 100 + 0.24 / 100))
    assert s["se_from"] == "seeds x validation examples" and s["separated"] is (0.1 > s["se"])


# ----------------------------------------------------------------------------- tuned.toml into a run


def test_tuned_toml_round_trips_into_a_run_config(config, tmp_path):
    # Prepare: a tune through the seam, then a config that names its tuned.toml (relative to the config)
    tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100], out=tmp_path / "setting" / "lr", trial=peaked(0.01),
         log=lambda m: None)
    run_config = config.with_name("run.toml")
    run_config.write_text(TINY + 'tuned = "lr/tuned.toml"\n\n[flexlora]\nfreeze_head = true\n')
    # Execute
    cfg = RunConfig.from_dict(load_config(run_config))
    # Assert: the chosen lrs are the methods' options, beside the config's own; the tuned key itself is gone
    assert cfg.method_options == {"fedit": {"lr": 0.01}, "flexlora": {"freeze_head": True, "lr": 0.01}}
    assert "tuned" not in load_config(run_config)


def test_a_value_in_the_config_and_in_a_tuned_file_is_an_error_naming_both(tmp_path):
    (tmp_path / "a.toml").write_text("[fedit]\nlr = 0.01\n")
    (tmp_path / "b.toml").write_text("[fedit]\nlr = 0.02\n")
    path = tmp_path / "run.toml"
    path.write_text('tuned = "a.toml"\n[fedit]\nlr = 0.03\n')
    with pytest.raises(ConfigError, match=r"'fedit.lr' is given both in '.*run.toml' and in '.*a.toml'"):
        load_config(path)
    path.write_text('tuned = ["a.toml", "b.toml"]\n')
    with pytest.raises(ConfigError, match=r"'fedit.lr' is given both in '.*a.toml' and in '.*b.toml'"):
        load_config(path)
    path.write_text('tuned = "missing.toml"\n')
    with pytest.raises(ConfigError, match=r"missing.toml' not found"):
        load_config(path)
    path.write_text("tuned = 3\n")
    with pytest.raises(ConfigError, match=r"Config key 'tuned' in '.*run.toml': expected a path"):
        load_config(path)
    (tmp_path / "c.toml").write_text("nonsense = 1\n")
    path.write_text('tuned = "c.toml"\n')
    with pytest.raises(ConfigError, match=r"c.toml'.*key 'nonsense' is neither a config key nor a method table"):
        load_config(path)
    # a run-wide key from a tuned file; the run's lr and a method's lr are different keys
    (tmp_path / "d.toml").write_text("local_steps = 7\n[fedit]\nlr = 0.5\n")
    path.write_text('tuned = "d.toml"\nlr = 0.1\n')
    assert load_config(path) == {"lr": 0.1, "local_steps": 7, "fedit": {"lr": 0.5}}


def test_a_run_reads_the_choices(config, tmp_path, capsys):
    # Prepare
    (config.parent / "tuned.toml").write_text("[fedit]\nlr = 0.02\n")
    run_config = config.with_name("run.toml")
    run_config.write_text(TINY.replace('["fedit", "flexlora"]', '["fedit"]').replace("rounds = 2", "rounds = 1")
                          + 'tuned = "tuned.toml"\n')
    # Execute
    status = cli_main(["run", str(run_config), "--out", str(tmp_path / "run"), "--no-progress"])
    # Assert: the run used the chosen lr, and its config.json says so
    assert status == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method_options"] == {"fedit": {"lr": 0.02}}


# ----------------------------------------------------------------------------- errors: exit 2, nothing written


@pytest.mark.parametrize(("args", "message"), [
    (["--param", "nonsense"], "--param 'nonsense': unknown; expected a method option"),
    (["--param", "fedit.nonsense"], "--param 'fedit.nonsense': [fedit] has no option 'nonsense'"),
    (["--param", "nomethod.lr"], "--param 'nomethod.lr': unknown method 'nomethod'"),
    (["--param", "local_steps", "--grid", "2", "4"], "--param 'local_steps' is a run-wide key: tune it for one method"),
    (["--param", "seed", "--grid", "1", "2"], "--param 'seed': cannot be tuned"),
    (["--param", "global_rank", "--grid", "2", "4", "--methods", "fedit", "lora_a2"],
     "--param 'global_rank' is an option of [lora_a2] but not of [fedit]"),
    (["--grid", "-1", "0.01"], "--grid value -1 for --param lr ([fedit] lr)"),
    (["--grid", "abc", "0.01"], "--grid value \"abc\" for --param lr"),
    (["--grid", "0.01"], "--grid: expected at least two distinct values"),
    (["--param", "hafl.beta1"], "give --grid"),
    (["--seeds", "0", "1"], "--seeds: expected distinct seeds >= 100"),
    (["--set", "val_size=0"], "has val_size = 0: no validation split to choose on"),
    (["--methods", "nomethod"], "'methods[0]'"),
    (["--calibrate-threshold", "0.05"], "fedit, flexlora has no `threshold` option"),
    (["--calibrate-threshold", "1.5", "--methods", "clair"], "expected a false-flag rate between 0 and 1"),
    (["--calibrate-threshold", "0.05", "--methods", "clair", "--param", "clair.threshold", "--grid", "1", "2"],
     "calibrates the threshold at each value of a method option"),
    (["--calibrate-threshold", "0.05", "--methods", "clair", "--param", "local_steps", "--grid", "1", "2"],
     "calibrates the threshold at each value of a method option"),
    (["--calibrate-threshold", "0.05", "--methods", "clair", "--set", "clair.z_threshold=3"],
     "sets [clair] z_threshold, the former fixed cut"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(config, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    status = cli_main(["tune", str(config), "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert not out.exists()


def test_the_output_guard_refuses_other_folders_and_other_tunes(config, tmp_path, capsys):
    # a folder of other files, and the config's own folder: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli_main(["tune", str(config), "--out", str(other), "--grid", "0.01", "0.1"]) == 2
    assert "already holds files" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert cli_main(["tune", str(config), "--out", str(config.parent), "--grid", "0.01", "0.1"]) == 2
    assert "an input of this command" in capsys.readouterr().err
    # an earlier tune of another request: refused without --overwrite, replaced with it
    out = tmp_path / "out"
    tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100], out=out, trial=peaked(0.01), log=lambda m: None)
    before = (out / "tune.json").read_bytes()
    with pytest.raises(ConfigError, match="holds a tune of another request .*grid"):
        tune(config, grid=[1e-2, 1e-1, 1.0], seeds=[100], out=out, trial=peaked(0.01), log=lambda m: None)
    assert (out / "tune.json").read_bytes() == before
    # the config's execution keys (how its runs are computed) may change, any other key may not
    config.write_text(TINY + "checkpoint = false\nworkers = 1\n")
    tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100], out=out, trial=peaked(0.01), log=lambda m: None)
    config.write_text(TINY.replace("rounds = 2", "rounds = 3"))
    with pytest.raises(ConfigError, match="holds a tune of another request .*config_data"):
        tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100], out=out, trial=peaked(0.01), log=lambda m: None)
    report = tune(config, grid=[1e-2, 1e-1, 1.0], seeds=[100], out=out, overwrite=True, trial=peaked(0.1),
                  log=lambda m: None)
    assert rows(report, "fedit")["choice"] == 0.1


def test_an_interrupted_tune_is_continued_by_the_same_request_only(config, tmp_path):
    # Prepare: a tune stopped in its third trial
    out = tmp_path / "out"
    seen = []

    def stopping(cfg, folder):
        seen.append(cfg.seed)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return peaked(0.01)(cfg, folder)

    with pytest.raises(KeyboardInterrupt):
        tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], out=out, trial=stopping, log=lambda m: None)
    stopped = json.loads((out / "tune.json").read_text())
    # Execute / Assert: another request is refused, the same one finishes
    with pytest.raises(ConfigError, match="another request .*seeds"):
        tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100], out=out, trial=peaked(0.01), log=lambda m: None)
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], out=out, trial=peaked(0.01), log=lambda m: None)
    assert stopped["finished"] is False and report["finished"] and rows(report, "fedit")["choice"] == 0.01


# ----------------------------------------------------------------------------- end to end on the tiny model


def _corrupt_test_split(monkeypatch):
    """Every test example's label shifted and its text replaced: only the test split changes."""
    from lowrank_fed.llm import data_source

    real = data_source.load_dataset

    def corrupted(name, **kw):
        train, test = real(name, **kw)
        test.labels = (test.labels + 1) % len(test.label_names)
        test.texts = ["corrupted " + t[::-1] for t in test.texts]
        return train, test

    monkeypatch.setattr(data_source, "load_dataset", corrupted)


@pytest.mark.slow
def test_a_real_tune_reuses_its_trials_and_never_reads_the_test_split(config, tmp_path, monkeypatch, capsys):
    # Prepare
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["fedit"]'))
    args = ["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "101", "--max-extensions", "1",
            "--no-progress"]
    # Execute: a tune; the same tune again (every trial reused); a tune with the test split corrupted
    assert cli_main([*args, "--out", str(tmp_path / "clean")]) == 0
    first = (tmp_path / "clean" / "tune.json").read_bytes()
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "clean")]) == 0
    logs = capsys.readouterr().err
    _corrupt_test_split(monkeypatch)
    assert cli_main([*args, "--out", str(tmp_path / "corrupt")]) == 0
    # Assert: the rerun ran nothing and wrote the same bytes
    assert "running" not in logs and logs.count("reusing the finished trial") >= 4
    assert (tmp_path / "clean" / "tune.json").read_bytes() == first
    # a trial that never finished (its summary missing) is run again, alone, to the same scores
    (tmp_path / "clean" / "trials" / "fedit" / "lr=0.01" / "seed101" / "summary.json").unlink()
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "clean")]) == 0
    logs = capsys.readouterr().err
    assert logs.count("running") == 1 and "lr=0.01/seed101" in logs.split("running")[1].splitlines()[0]
    assert (tmp_path / "clean" / "tune.json").read_bytes() == first
    clean = json.loads(first)
    corrupt = json.loads((tmp_path / "corrupt" / "tune.json").read_bytes())
    # every trial is an ordinary run folder
    trial = tmp_path / "clean" / "trials" / "fedit" / "lr=0.001" / "seed100"
    stored = RunConfig.from_dict(json.loads((trial / "config.json").read_text()))
    assert stored.method_options == {"fedit": {"lr": 0.001}}
    assert stored.eval_every == stored.rounds == 2  # scored at round 0 and the last round only
    # the corrupted test split moved the test scores, and not one validation score or choice
    test_scores = [json.loads((tmp_path / d / "trials/fedit/lr=0.001/seed100/summary.json").read_text())[0]["final"]
                   for d in ("clean", "corrupt")]
    assert test_scores[0] != test_scores[1]
    assert clean["methods"][0]["values"] == corrupt["methods"][0]["values"] and clean == corrupt
    for name in ("tune.json", "tune.md", "tuned.toml"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "corrupt" / name).read_bytes()
    chosen = tomllib.loads((tmp_path / "clean" / "tuned.toml").read_text())
    assert chosen == {"fedit": {"lr": clean["methods"][0]["choice"]}}


def test_methods_without_a_global_model_are_tuned_on_their_clients_own_models(config, tmp_path, monkeypatch):
    # Prepare: local training and FedSA-LoRA (each client keeps its own model) beside FedIT
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["fedit", "local", "fedsa"]'))
    args = ["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "--max-extensions", "0",
            "--no-progress"]
    # Execute: the tune, and the same tune with the test split corrupted
    assert cli_main([*args, "--out", str(tmp_path / "clean")]) == 0
    _corrupt_test_split(monkeypatch)
    assert cli_main([*args, "--out", str(tmp_path / "corrupt")]) == 0
    # Assert: FedIT is scored on its global model, the others on the mean over clients of each one's own model on
    # its share of the validation split, read from the trials' last round
    report = json.loads((tmp_path / "clean" / "tune.json").read_text())
    assert report["score"] == "val_accuracy"
    assert {r["method"]: r["score"] for r in report["methods"]} == {
        "fedit": "val_accuracy", "local": "val_local_accuracy", "fedsa": "val_local_accuracy"}
    for method in ("local", "fedsa"):
        row = rows(report, method)
        for value in row["values"]:
            for seed, score in zip((100,), value["per_seed"], strict=True):
                trial = tmp_path / "clean" / "trials" / method / f"lr={value['label']}" / f"seed{seed}"
                last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()][-1]
                assert last["round"] == 2 and last["val_local_accuracy"] == score
    chosen = tomllib.loads((tmp_path / "clean" / "tuned.toml").read_text())
    assert set(chosen) == {"fedit", "local", "fedsa"}
    assert "Local only, personalised: val_local_accuracy" in (tmp_path / "clean" / "tune.md").read_text()
    # no test score moved a choice
    for name in ("tune.json", "tune.md", "tuned.toml"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "corrupt" / name).read_bytes()


def test_with_contaminated_clients_local_is_tuned_on_the_benign_clients_own_models(config, tmp_path):
    # Prepare: local training where client 0 of 3 trains on flipped labels
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["local"]')
                      + '[[attacks]]\nkind = "label_flip"\nclients = [0]\n')
    # Execute
    assert cli_main(["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "--max-extensions", "0",
                     "--no-progress", "--out", str(tmp_path / "out")]) == 0
    # Assert: the score is the benign clients' mean, with the binomial error of its own effective sample size
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    (row,) = report["methods"]
    assert row["score"] == "val_benign_local_accuracy"
    trial = tmp_path / "out" / "trials" / "local" / "lr=0.01" / "seed100"
    last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()][-1]
    setup = json.loads((trial / "setup.json").read_text())
    assert [v["per_seed"] for v in row["values"] if v["label"] == "0.01"] == [[last["val_benign_local_accuracy"]]]
    # K^2 / sum 1/n_k is at most the examples the K shares hold (harmonic <= arithmetic mean), and fewer clients
    # (the benign two of three) hold fewer
    assert 0 < last["val_benign_local_n"] < last["val_local_n"] <= setup["val_size"]
    vs = next(v["vs_choice"] for v in row["values"] if "vs_choice" in v)
    p, q = (v["mean"] for v in row["values"])
    n = last["val_benign_local_n"]
    assert vs["se"] == pytest.approx(math.sqrt(p * (1 - p) / n + q * (1 - q) / n))  # one seed: the binomial error


def test_clair_is_tuned_on_what_its_benign_clients_download_not_on_its_global_model(config, tmp_path):
    # Prepare: CLAIR and FedIT where client 0 of 3 trains on flipped labels
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["fedit", "clair"]')
                      + '[[attacks]]\nkind = "label_flip"\nclients = [0]\n')
    # Execute
    assert cli_main(["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "--max-extensions", "0",
                     "--no-progress", "--out", str(tmp_path / "out")]) == 0
    # Assert: FedIT on its global model, CLAIR on the mean over its benign clients of each one's refined download
    # on its own validation share, read from the trials' last round; the run-wide score stays the global model's
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert report["score"] == "val_accuracy"
    assert {r["method"]: r["score"] for r in report["methods"]} == {
        "fedit": "val_accuracy", "clair": "val_benign_local_accuracy"}
    for value in rows(report, "clair")["values"]:
        trial = tmp_path / "out" / "trials" / "clair" / f"lr={value['label']}" / "seed100"
        last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()][-1]
        assert value["per_seed"] == [last["val_benign_local_accuracy"]]
        assert 0 < last["val_benign_local_n"] < last["val_local_n"]
    assert "CLAIR, personalised: val_benign_local_accuracy, the mean over the benign clients" in (
        tmp_path / "out" / "tune.md").read_text()


def test_a_calibrated_tune_runs_each_value_at_the_cut_calibrated_at_it(config, tmp_path):
    # Prepare: CLAIR alone; a fake trial whose benign scores at rate v are 100 v + 0..9 (calibration runs, which flag
    # nobody) and whose validation accuracy is best at 1e-2; it writes the detection rows calibration reads
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["clair"]'))
    ran = []

    def trial(cfg: RunConfig, folder):
        opts = cfg.method_options["clair"]
        ran.append((opts["lr"], opts.get("threshold"), folder.parent.name))
        folder.mkdir(parents=True, exist_ok=True)
        det = {"scores": {str(k): 100 * opts["lr"] + k for k in range(10)}, "contaminated": []}
        (folder / "metrics.jsonl").write_text(json.dumps({"method": "clair", "round": 1, "detection": det}) + "\n")
        (folder / "summary.json").write_text("[]")
        (folder / "setup.json").write_text("{}")
        acc = 0.9 - 0.1 * math.log10(opts["lr"] / 1e-2) ** 2
        return {"val_local_accuracy": acc, "val_local_loss": 1 - acc, "val_local_accuracy_n": 10**6,
                "val_local_n": 10**6, "val_size": 10**6, "round": cfg.rounds}

    # Execute
    report = tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], out=tmp_path / "out", trial=trial,
                  calibrate=0.1, log=lambda m: None)
    # Assert: per value, two calibration runs that flag nobody, then its trials at the 0.9 quantile of their 20
    # benign scores (each seed's 0..9, shifted by 100 v): 100 v + 8.1
    for v in (1e-3, 1e-2, 1e-1):
        assert [(t, f) for lr, t, f in ran if lr == v and f == "calibration"] == [(1e9, "calibration")] * 2
        cut = float(f"{100 * v + 8.1:.4g}")
        assert [t for lr, t, f in ran if lr == v and f != "calibration"] == [cut, cut]
    row = rows(report, "clair")
    assert row["choice"] == 1e-2 and row["threshold"] == 9.1
    assert [v["threshold"] for v in row["values"]] == [8.2, 9.1, 18.1] and row["values"][0]["n_scores"] == 20
    assert tomllib.loads((tmp_path / "out" / "tuned.toml").read_text()) == {"clair": {"lr": 1e-2, "threshold": 9.1}}
    assert "threshold = 9.1, calibrated at that value" in (tmp_path / "out" / "tune.md").read_text()
    # the same folder without calibration is another request (its trials would not be these); a tune.json
    # written before the option existed (no "calibrate" in its request) is the uncalibrated request
    with pytest.raises(ConfigError, match="differs in: calibrate"):
        tune(config, grid=[1e-3, 1e-2, 1e-1], seeds=[100, 101], out=tmp_path / "out", trial=trial, log=lambda m: None)
    plain = tmp_path / "plain"
    tune(config, grid=[1e-3, 1e-2], seeds=[100], out=plain, trial=trial, max_extensions=0, log=lambda m: None)
    stored = json.loads((plain / "tune.json").read_text())
    del stored["request"]["calibrate"]
    (plain / "tune.json").write_text(json.dumps(stored))
    tune(config, grid=[1e-3, 1e-2], seeds=[100], out=plain, trial=trial, max_extensions=0, log=lambda m: None)


@pytest.mark.filterwarnings("ignore::lowrank_fed.robust.ClairConvergenceWarning")  # 3 clients: plumbing only
def test_a_real_calibrated_tune_reads_the_benign_scores_of_runs_that_flag_nobody(config, tmp_path):
    # Prepare: CLAIR alone on the tiny model, no contamination
    config.write_text(TINY.replace('["fedit", "flexlora"]', '["clair"]'))
    out = tmp_path / "out"
    # Execute
    report = tune(config, grid=[1e-3, 1e-2], seeds=[100], out=out, max_extensions=0, calibrate=0.05,
                  log=lambda m: None, progress=False)
    # Assert: each value's cut is the 0.95 quantile of its calibration run's benign scores, and its trial ran at it
    for value in rows(report, "clair")["values"]:
        folder = out / "trials" / "clair" / f"lr={value['label']}"
        scores = [s for line in (folder / "calibration" / "seed100" / "metrics.jsonl").read_text().splitlines()
                  for s in json.loads(line).get("detection", {}).get("scores", {}).values()]
        assert len(scores) == value["n_scores"] == 3 * 2  # 3 clients, 2 rounds, nobody flagged
        assert value["threshold"] == float(f"{np.quantile(scores, 0.95):.4g}")
        assert json.loads((folder / "seed100" / "config.json").read_text())["method_options"]["clair"]["threshold"] \
            == value["threshold"]


@pytest.mark.slow
def test_the_scoring_schedule_changes_no_trained_bit(tmp_path):
    """Why a trial may score only round 0 and its last round: for every method (attacks on, so CLAIR detects), a
    run scored every round and one scored at the end train the same adapters and score the last round the same."""
    # Prepare
    from lowrank_fed.llm.methods import METHODS
    from lowrank_fed.llm.runner.simulation import run_experiment
    from tests.llm.helpers import sha_tree, tiny_settings

    settings = tiny_settings(methods=sorted(METHODS), clients=4, ranks=[2, 4, 4, 8], rounds=3, val_size=20,
                             attacks=[{"kind": "sign_flip", "clients": [1]}])
    # Execute
    for every in (1, 3):
        run_experiment(RunConfig.from_dict({**settings, "eval_every": every}), tmp_path / f"e{every}", progress=False)
    # Assert: the same adapters; every round's rows agree on what both hold (all of round 0 and 3), but seconds;
    # the schedules did differ (rounds 1 and 2 scored in one run only)

    def rows(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return {(r["method"], r["round"]): {k: v for k, v in r.items() if "seconds" not in k}
                for r in map(json.loads, lines)}

    adapters = [sha_tree(tmp_path / f"e{every}" / "adapters") for every in (1, 3)]
    assert adapters[0] == adapters[1] and len(adapters[0]) >= len(METHODS) - 1  # local keeps no global adapter
    one, three = rows(tmp_path / "e1"), rows(tmp_path / "e3")
    assert one.keys() == three.keys() and {m for m, _ in one} == set(METHODS)
    for key, row in three.items():
        if key[1] in (0, 3):
            assert row == one[key], key
        else:
            assert "val_accuracy" not in row and "val_accuracy" in one[key]
            assert row == {k: v for k, v in one[key].items() if k in row}, key


def test_the_untrained_start_scores_the_same_for_every_method_and_rate(tmp_path):
    """Why a tune scores round 0 once per seed: every method that is not personalised, alone and at two rates
    (attacks on, as in CLAIR's configs), writes the same round-0 row but for seconds."""
    # Prepare
    from lowrank_fed.llm.methods import METHODS, make_method
    from lowrank_fed.llm.runner.simulation import run_experiment
    from tests.llm.helpers import tiny_settings

    settings = tiny_settings(clients=4, ranks=[2, 4, 4, 8], rounds=1, val_size=20,
                             attacks=[{"kind": "sign_flip", "clients": [1]}])
    shared = sorted(m for m in METHODS if not make_method(m).personalised)
    # Execute
    starts = {}
    for m in shared:
        for lr in (1e-3, 3e-2):
            folder = tmp_path / f"{m}-{lr}"
            run_experiment(RunConfig.from_dict({**settings, "methods": [m], "lr": lr}), folder, progress=False)
            row = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
            assert row["round"] == 0
            starts[m, lr] = {k: v for k, v in row.items() if k != "method" and "seconds" not in k}
    # Assert: one row for all of them, and a real one (scored on the validation and test splits)
    first = starts[shared[0], 1e-3]
    assert len(shared) >= 9 and "val_accuracy" in first and "accuracy" in first
    assert all(row == first for row in starts.values()), [k for k, row in starts.items() if row != first]


def test_a_tune_scores_the_start_once_per_seed_and_changes_no_score(config, tmp_path, capsys):
    """The second and later lr trials of a seed reuse the first one's round-0 row: the same metrics as trials run
    alone, round 0 not scored again (0 seconds), and the same tune.json."""
    # Prepare
    from lowrank_fed.llm.runner.simulation import run_experiment

    args = ["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "--max-extensions", "0",
            "--no-progress", "--out", str(tmp_path / "tune")]
    # Execute
    assert cli_main(args) == 0
    alone = {}
    for method, lr in (("fedit", 0.01), ("flexlora", 0.001), ("flexlora", 0.01)):
        trial = tmp_path / "tune" / "trials" / method / f"lr={lr:g}" / "seed100"
        cfg = RunConfig.from_dict(json.loads((trial / "config.json").read_text()))
        run_experiment(cfg, tmp_path / "alone" / f"{method}-{lr}", progress=False)
        alone[trial] = tmp_path / "alone" / f"{method}-{lr}"
    # Assert

    def rows(folder):
        return [{k: v for k, v in json.loads(r).items() if "seconds" not in k}
                for r in (folder / "metrics.jsonl").read_text().splitlines()]

    def round0_seconds(folder):
        return json.loads((folder / "timings.jsonl").read_text().splitlines()[0])["eval_seconds"]

    first = tmp_path / "tune" / "trials" / "fedit" / "lr=0.001" / "seed100"
    assert round0_seconds(first) > 0
    for trial, folder in alone.items():
        assert rows(trial) == rows(folder), trial
        assert round0_seconds(trial) == 0.0 and round0_seconds(folder) > 0


# ----------------------------------------------------------------------------- scored on what clients receive


@pytest.mark.parametrize("method_name", ["hetlora", "hafl"])
def test_val_downloads_scores_each_clients_download_on_its_validation_share(tmp_path, monkeypatch, method_name):
    # Prepare: heterogeneous ranks, so the rank-2 and rank-4 clients download truncations of the rank-8 global model
    from lowrank_fed.llm.evaluate import summarise
    from lowrank_fed.llm.methods import make_method
    from tests.llm.helpers import make_sim, run_rounds, tiny_settings

    options = {"variant": "truncation"} if method_name == "hafl" else {}
    sim = make_sim(tmp_path, tiny_settings(methods=[method_name], val_size=24, val_downloads=True))
    method = make_method(method_name, **options)
    log = run_rounds(sim, method, 1, monkeypatch)
    server, clients = log[-1].after, log[-1].clients
    # Execute
    out = sim.evaluate(method, server, clients)
    # Assert: the mean over clients of each one's download scored on its own validation rows, computed here by
    # scoring each download on those rows directly (the runner scores each distinct download once, then subsets)
    shares = sim.val_holdout
    assert any(not method.download_is_global(server, r) for r in set(server.ranks.values()))
    own = {k: summarise(sim._score_models([(method.downloaded_model(server, server.ranks[k]), "val", shares[k])])[0])
           for k in range(sim.cfg.clients) if len(shares[k])}
    assert len(own) >= 2
    assert out["val_local_accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in own.values()]), abs=1e-12)
    assert out["val_local_loss"] == pytest.approx(np.mean([s["loss"] for s in own.values()]), rel=1e-6)
    assert out["val_local_n"] == pytest.approx(len(own) ** 2 / sum(1 / len(shares[k]) for k in own))
    # without the key, the same scores but none of these
    sim.cfg = RunConfig.from_dict({**sim.cfg.model_dump(), "val_downloads": False})
    plain = sim.evaluate(method, server, clients)
    assert not [k for k in plain if k.startswith("val_local")]
    assert plain == {k: v for k, v in out.items() if not k.startswith("val_local")}


def test_score_on_downloads_tunes_every_method_on_what_its_clients_receive(config, tmp_path):
    # Prepare: the tiny setting (ranks 2, 4, 4: the rank-2 client receives a truncation)
    out = tmp_path / "out"
    # Execute
    assert cli_main(["tune", str(config), "--grid", "1e-3", "1e-2", "--seeds", "100", "--max-extensions", "0",
                     "--score-on", "downloads", "--no-progress", "--out", str(out)]) == 0
    # Assert: every method is scored on val_local_accuracy, read from its trials' last round, which ran with
    # val_downloads; the report and tuned.toml's header say so; a tune of the global model into the same folder is
    # another request
    report = json.loads((out / "tune.json").read_text())
    assert report["request"]["config_data"]["val_downloads"] is True and report["score"] == "val_local_accuracy"
    for row in report["methods"]:
        assert row["score"] == "val_local_accuracy"
        for value in row["values"]:
            trial = out / "trials" / row["method"] / f"lr={value['label']}" / "seed100"
            assert json.loads((trial / "config.json").read_text())["val_downloads"] is True
            last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()][-1]
            assert value["per_seed"] == [last["val_local_accuracy"]] and last["val_local_n"] > 0
            # the check: the global model's score of the same trial, and the value it would choose
            assert row["global_check"]["means"][value["label"]] == last["val_accuracy"]
        means = row["global_check"]["means"]
        best = max(means, key=lambda lab: (means[lab], -float(lab)))  # equal means: the smaller value
        assert row["global_check"]["choice_label"] == best and row["global_check"]["same"] == (
            best == row["choice_label"])
        assert ("vs_choice" in row["global_check"]) != row["global_check"]["same"]
    assert "Check on the global model (`val_accuracy` of the same trials)" in (out / "tune.md").read_text()
    assert "each client's download" in (out / "tune.md").read_text()
    assert "each client's download" in (out / "tuned.toml").read_text()
    with pytest.raises(ConfigError, match="differs in: config_data\\)"):
        tune(config, grid=[1e-3, 1e-2], seeds=[100], max_extensions=0, progress=False, out=out, log=lambda m: None)
    # `--set val_downloads=true` is the same request (PreLort's tunes): it runs none of the trials again; each
    # trial also holds the global model's validation score, from which the choice on it is read as a check
    import shutil

    shutil.copytree(out / "trials", tmp_path / "same" / "trials")
    logs: list[str] = []
    again = tune(config, grid=[1e-3, 1e-2], seeds=[100], max_extensions=0, overrides=["val_downloads=true"],
                 progress=False, out=tmp_path / "same", log=logs.append)
    assert again["score"] == "val_local_accuracy" and not [m for m in logs if m.startswith("running")]
    assert len([m for m in logs if m.startswith("reusing")]) == 2 * len(report["methods"])
    for trial in (out / "trials").glob("*/*/seed100"):
        last = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()][-1]
        assert {"val_accuracy", "val_local_accuracy"} <= set(last)
