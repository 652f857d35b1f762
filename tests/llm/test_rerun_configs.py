"""The reproduction configs before a rerun: an explicit ``lora_scaling`` in each, the constant twins, the committed runs
still reused, the tunes that choose their rates (``configs/reproduce/tune_all.sh``), and the PreLort benchmark that
reads validation data of an unreported seed only."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import ConfigError, RunConfig, load_config, parse_value  # noqa: E402
from lowrank_fed.llm.methods import METHODS  # noqa: E402
from lowrank_fed.llm.peft_bridge import convention_scale  # noqa: E402
from lowrank_fed.llm.reproduce import CONFIG_ROOT, EXPERIMENTS  # noqa: E402
from lowrank_fed.llm.reproduce.run import MAX_SEEDS, _finished  # noqa: E402
from lowrank_fed.llm.tune import add_arguments, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "reproduce"
TUNE_ALL = CONFIG_ROOT / "tune_all.sh"
TWINS = {("hafl", "freezing"), ("hafl", "truncation"), ("prelort", "minilm_bbc"), ("prelort", "smollm2_headlines")}
ALL_CONFIGS = sorted((p.parent.name, p.stem) for p in CONFIG_ROOT.glob("*/*.toml"))


def test_every_config_file_is_run_by_its_experiment_and_validates():
    listed = sorted((name, stem) for name, e in EXPERIMENTS.items() for stem in e.configs)
    assert listed == ALL_CONFIGS  # the twins are in the experiments' configs tuples, nothing else is left out
    for name, stem in ALL_CONFIGS:
        RunConfig.from_dict(load_config(CONFIG_ROOT / name / f"{stem}.toml"))


@pytest.mark.parametrize(("name", "stem"), ALL_CONFIGS)
def test_every_config_sets_lora_scaling_itself_and_says_why(name, stem):
    path = CONFIG_ROOT / name / f"{stem}.toml"
    raw = tomllib.loads(path.read_text())
    assert raw["lora_scaling"] in {"alpha_over_r", "constant"}  # written in the file, not the default
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f'lora_scaling = "{raw["lora_scaling"]}"' in header.replace("\n# ", " ")


@pytest.mark.parametrize(("name", "stem"), sorted(TWINS))
def test_a_twin_differs_from_its_original_in_lora_scaling_and_name_only(name, stem):
    # the files as written (each may name its own tuned file: the rates are chosen per convention)
    original = tomllib.loads((CONFIG_ROOT / name / f"{stem}.toml").read_text())
    twin = tomllib.loads((CONFIG_ROOT / name / f"{stem}_constant.toml").read_text())
    assert (original["lora_scaling"], twin["lora_scaling"]) == ("alpha_over_r", "constant")
    assert twin["name"] == original["name"] + "-constant"
    assert original.get("tuned", f"tuned/{stem}.toml") == f"tuned/{stem}.toml"
    assert twin.get("tuned", f"tuned/{stem}_constant.toml") == f"tuned/{stem}_constant.toml"
    own = ("lora_scaling", "name", "tuned")
    rest = {k: v for k, v in original.items() if k not in own}
    assert {k: v for k, v in twin.items() if k not in own} == rest
    assert RunConfig.from_dict({k: v for k, v in twin.items() if k != "tuned"}).to_dict() == {
        **RunConfig.from_dict({k: v for k, v in original.items() if k != "tuned"}).to_dict(),
        "lora_scaling": "constant", "name": twin["name"]}


def test_the_homogeneous_hafl_config_needs_no_twin_its_scale_is_the_same_under_both():
    cfg = RunConfig.from_dict(load_config(CONFIG_ROOT / "hafl" / "homogeneous.toml"))
    (rank,) = {cfg.ranks} if isinstance(cfg.ranks, int) else set(cfg.ranks)
    assert convention_scale("constant", cfg.lora_alpha, rank, reference_rank=rank) == convention_scale(
        "alpha_over_r", cfg.lora_alpha, rank) == 0.5


# ----------------------------------------------------------------------------- committed runs stay reusable


def _names_tuned(name: str, stem: str) -> bool:
    return "tuned" in tomllib.loads((CONFIG_ROOT / name / f"{stem}.toml").read_text())


def _committed_runs():
    """The committed runs of configs that do not name a tuned file yet (tune_all.sh --link changes their rates,
    after which the committed runs are runs of other configs)."""
    for name, stem in ALL_CONFIGS:
        if _names_tuned(name, stem):
            continue
        for folder in sorted((RESULTS / name / stem).glob("seed*")):
            yield name, stem, folder


def test_committed_runs_made_before_lora_scaling_existed_are_still_finished():
    # lora-a2's config.json predate the key and ran the configs as they are now (up to the key); PreLort's ran 5
    # and 3 local steps, not 50, before its configs changed: runs of other configs, to be rerun (Byun & Lee's and
    # HAFL's were, at their tuned rates; the earlier ones are in byun-lee-lr5e-3/ and hafl-lr5e-3/, outside this
    # check). CLAIR's copy task was rerun under today's configs (the key is in their config.json); the earlier
    # ones are in clair-zcut3/ and (the copy task at lr 5e-3, before its tune) clair-lr5e-3/, outside this check.
    # CLAIR's MiniLM was rerun at CLAIR's rate tuned on its downloads with the cut calibrated there (the runs at
    # 0.015 and at 5e-3 are in clair-minilm-lr0.015/ and clair-minilm-lr5e-3/, outside this check).
    def rerun(name: str, stem: str) -> bool:
        return name == "prelort"

    counted = 0
    for name, stem, folder in _committed_runs():
        stored = json.loads((folder / "config.json").read_text())
        assert ("lora_scaling" in stored) is (name == "clair")
        cfg = RunConfig.from_dict({**load_config(CONFIG_ROOT / name / f"{stem}.toml"), "seed": stored["seed"]})
        assert _finished(folder, cfg) is not rerun(name, stem), folder
        counted += not rerun(name, stem)
    with_runs = [(n, c) for n, c in ALL_CONFIGS if not rerun(n, c) and (RESULTS / n / c).is_dir()]
    assert len(with_runs) == 6 + 1 + 4 + 4 + 7  # lora-a2, byun-lee, clair copy, clair MiniLM, hafl (zeropad, heldmean)
    assert counted == sum(len(list((RESULTS / n / c).glob("seed*"))) for n, c in with_runs if not _names_tuned(n, c))
    # lora-a2's dir001_r1, dir001_r8, dir05_r1, dir05_r2 and dir05_r8 were rerun at their tuned rates (earlier runs:
    # lora-a2-untuned/); dir001_r2, which no claim reads, was not
    assert counted == 3 * 1
    # configs that read a tuned file (CLAIR's two tasks, Byun & Lee and HAFL, rerun at their tuned rates, 5 seeds;
    # 6 for the four HAFL configs whose speed claims are sign counts; 3 for LoRA-A2's Dir 0.5, where FFA-LoRA learnt
    # in 0 of 3 seeds at budgets 1 and 2, and for Dir 0.01, budget 1, where no baseline learnt in any of 3 seeds, so 2
    # more could not reach the 3 learnt seeds its claims need): their runs are theirs
    tuned = [(n, c) for n, c in ALL_CONFIGS if _names_tuned(n, c) and (RESULTS / n / c).is_dir() and not rerun(n, c)]
    assert sorted(c for _, c in tuned) == ["copy_g0", "copy_g01", "copy_g02", "copy_g03", "dir001_r1", "dir001_r8",
                                           "dir05_r1", "dir05_r2", "dir05_r8", "freezing", "freezing_constant", "freezing_heldmean", "freezing_zeropad",
                                           "homogeneous", "minilm_g0",
                                           "minilm_g01", "minilm_g02", "minilm_g03", "top10_bbc", "truncation",
                                           "truncation_constant"]
    for name, stem in tuned:
        folders = sorted((RESULTS / name / stem).glob("seed*"))
        six = ("freezing", "freezing_constant", "freezing_zeropad", "freezing_heldmean")
        three = ("dir001_r1", "dir05_r1", "dir05_r2", "dir05_r8")
        assert len(folders) == (6 if stem in six else 3 if stem in three else 5)
        for folder in folders:
            seed = json.loads((folder / "config.json").read_text())["seed"]
            cfg = RunConfig.from_dict({**load_config(CONFIG_ROOT / name / f"{stem}.toml"), "seed": seed})
            assert _finished(folder, cfg), folder


def test_a_stored_config_without_a_newer_key_is_that_keys_default_and_nothing_else(tmp_path):
    # Prepare: a finished run whose config.json lacks lora_scaling (as every committed run's does)
    cfg = RunConfig.from_dict({**load_config(CONFIG_ROOT / "byun-lee" / "top10_bbc.toml"), "seed": 0})
    stored = cfg.to_dict()
    del stored["lora_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    (tmp_path / "summary.json").write_text("[]")
    # Assert: the same run under the explicit default; not under another convention, value, or an unknown key
    assert _finished(tmp_path, cfg)
    assert not _finished(tmp_path, cfg.model_copy(update={"lora_scaling": "constant"}))
    assert not _finished(tmp_path, cfg.model_copy(update={"lr": 1e-3}))
    (tmp_path / "config.json").write_text(json.dumps({**stored, "no_such_key": 1}))
    assert not _finished(tmp_path, cfg)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    (tmp_path / "summary.json").unlink()
    assert not _finished(tmp_path, cfg)


def test_a_config_naming_a_tuned_file_that_does_not_exist_fails_clearly(tmp_path):
    path = tmp_path / "hafl.toml"
    text = "".join(line for line in (CONFIG_ROOT / "hafl" / "freezing.toml").read_text().splitlines(keepends=True)
                   if not line.startswith("tuned ="))
    path.write_text(text.replace('name = "hafl-freezing"\n', 'name = "hafl-freezing"\ntuned = "tuned/freezing.toml"\n'))
    with pytest.raises(ConfigError, match=r"Tuned file '.*tuned/freezing.toml' not found \(named by 'tuned' in "
                                          r"'.*hafl.toml'\): write it first .*tune_all.sh"):
        load_config(path)
    for name, stem in ALL_CONFIGS:  # a config names a tuned file only once it exists (none does before the tunes)
        raw = tomllib.loads((CONFIG_ROOT / name / f"{stem}.toml").read_text())
        assert "tuned" not in raw or (CONFIG_ROOT / name / raw["tuned"]).is_file()


# ----------------------------------------------------------------------------- tune_all.sh


def _commands() -> list[list[str]]:
    out = subprocess.run(["bash", str(TUNE_ALL), "--print"], capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]


def _request(cmd: list[str]) -> argparse.Namespace:
    assert cmd[1] == "tune"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(cmd[2:])


def test_tune_all_tunes_every_config_once_on_unreported_seeds_with_200_validation_examples():
    commands = [_request(cmd) for cmd in _commands()]
    assert sorted((Path(a.config).parent.name, Path(a.config).stem) for a in commands) == ALL_CONFIGS
    for args in commands:
        path = ROOT / args.config
        original = RunConfig.from_dict(load_config(path))
        cfg = RunConfig.from_dict({**load_config(path), **{k: parse_value(v) for k, v in
                                                           (o.split("=", 1) for o in args.overrides)}})
        assert args.param == "lr" and args.seeds == [100, 101, 102] and min(args.seeds) >= MAX_SEEDS
        assert cfg.val_size >= 200, args.config
        if original.train_size:  # as many training examples as the reproduction's clients get
            assert cfg.train_size - cfg.val_size == original.train_size - original.val_size, args.config
        else:
            assert not any(o.startswith("train_size") for o in args.overrides)
        assert Path(args.out).parts[-2:] == (path.parent.name, path.stem)
        # a claim about what the clients receive (HAFL's truncation: no drop at distribution) is tuned on it
        # (PreLort's MiniLM configs: two of their three claims read what the clients receive)
        assert (args.score_on == "downloads") == (path.stem in ("truncation", "truncation_constant")
                                                  or path.stem.startswith("minilm_bbc")), args.config


def test_every_tune_command_is_accepted_and_writes_a_tuned_file_the_config_can_read(tmp_path):
    from lowrank_fed.llm.models import PackageMissingError

    seen = []

    def trial(cfg: RunConfig, folder):  # the seam: no training; checks what each trial would run
        seen.append(cfg)
        assert cfg.seed >= MAX_SEEDS and cfg.val_size >= 200 and len(cfg.methods) == 1
        score = 1.0 / (1.0 + abs(cfg.method_options[cfg.methods[0]]["lr"] - 0.004))
        key = "val_perplexity" if cfg.model == "smollm2" else "val_accuracy"
        if METHODS[cfg.methods[0]].personalised or cfg.val_downloads:  # local, CLAIR, HAFL's truncation: on what
            # its (benign) clients use: their own models, or their downloads
            key = key.replace("val_", "val_benign_local_" if cfg.attacks else "val_local_")
        return {key: 1 / score if key.endswith("perplexity") else score, key.rsplit("_", 1)[0] + "_n": cfg.val_size,
                "val_size": cfg.val_size, "round": cfg.rounds}

    for cmd in _commands():
        args = _request(cmd)
        out = tmp_path / Path(args.out).relative_to("runs")
        try:
            report = tune(ROOT / args.config, param=args.param, grid=args.grid and [parse_value(v) for v in args.grid],
                          seeds=args.seeds, methods=args.methods, overrides=args.overrides, out=out, trial=trial,
                          progress=False, log=lambda m: None, score_on=args.score_on)
        except PackageMissingError as err:
            pytest.skip(f"packaged model missing: {err}")
        chosen = tomllib.loads((out / "tuned.toml").read_text())
        config = tomllib.loads((ROOT / args.config).read_text())
        expected = set(args.methods or config["methods"])
        assert set(chosen) == {row["method"] for row in report["methods"]} == expected  # local too
        # only CLAIR is left out, at gamma > 0: its rate is the gamma = 0 tune's, where its cut is calibrated
        assert set(config["methods"]) - expected <= {"clair"}
    assert len(seen) >= 9 * len(ALL_CONFIGS)


def test_link_points_each_config_at_its_tuned_file_only_once_every_one_exists(tmp_path):
    # Prepare: a copy of the LoRA-A2 configs (their [method] lr lines are what a tuned file replaces), one tuned file
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT / "lora-a2", configs / "lora-a2", ignore=shutil.ignore_patterns("tuned"))  # the repo's
    tuned = configs / "lora-a2" / "tuned"  # own tuned files (some tunes done) are not this test's
    tuned.mkdir()
    for path in (configs / "lora-a2").glob("*.toml"):  # nor are its links: every config unlinked here
        path.write_text(re.sub(r"(?m)^tuned = .*\n", "", path.read_text()))
    (tuned / "dir001_r1.toml").write_text(
        "# chosen\n[fedit]\nlr = 0.006\n\n[ffa]\nlr = 0.002\n\n[flexlora]\nlr = 0.000666667\n\n[lora_a2]\nlr = 0.06\n")
    before = {p.name: p.read_text() for p in (configs / "lora-a2").glob("*.toml")}
    env = {**os.environ, "REPRODUCE_CONFIGS": str(configs), "PYTHON": sys.executable}
    # Execute: five tuned files missing, then the one that exists linked alone (EXPERIMENT/CONFIG), then all there
    refused = subprocess.run(["bash", str(TUNE_ALL), "--link", "lora-a2"], capture_output=True, text=True, env=env)
    unchanged = {p.name: p.read_text() for p in (configs / "lora-a2").glob("*.toml")}
    alone = subprocess.run(["bash", str(TUNE_ALL), "--link", "lora-a2/dir001_r1"], capture_output=True, text=True,
                           env=env)
    assert alone.returncode == 0, alone.stderr
    assert [p.name for p in sorted((configs / "lora-a2").glob("*.toml")) if "tuned = " in p.read_text()] == [
        "dir001_r1.toml"]
    no_config = subprocess.run(["bash", str(TUNE_ALL), "--print", "lora-a2/nope"], capture_output=True, text=True,
                               env=env)
    assert no_config.returncode == 2 and "'lora-a2/nope' names no config" in no_config.stderr
    nested = subprocess.run(["bash", str(TUNE_ALL), "--print", "lora-a2/tuned/dir001_r1"], capture_output=True,
                            text=True, env=env)
    assert nested.returncode == 2 and "names no config" in nested.stderr
    for stem in ("dir001_r2", "dir001_r8", "dir05_r1", "dir05_r2", "dir05_r8"):
        shutil.copy(tuned / "dir001_r1.toml", tuned / f"{stem}.toml")
    done = subprocess.run(["bash", str(TUNE_ALL), "--link", "lora-a2"], capture_output=True, text=True, env=env)
    # Assert: refused with nothing changed; then every config reads its choices, the run-wide lr kept
    assert refused.returncode == 2 and "5 tuned files do not exist yet" in refused.stderr
    assert "dir05_r8.toml" in refused.stderr and unchanged == before
    assert done.returncode == 0, done.stderr
    for stem in ("dir001_r1", "dir001_r2", "dir001_r8", "dir05_r1", "dir05_r2", "dir05_r8"):
        cfg = RunConfig.from_dict(load_config(configs / "lora-a2" / f"{stem}.toml"))
        assert {m: cfg.method_options[m]["lr"] for m in ("fedit", "ffa", "flexlora", "lora_a2")} == {
            "fedit": 0.006, "ffa": 0.002, "flexlora": 0.000666667, "lora_a2": 0.06}
        assert cfg.lr == 2e-2 and cfg.method_options["lora_a2"]["global_rank"] == 16
        assert cfg.method_options["fedit"]["freeze_head"] is True
        text = (configs / "lora-a2" / f"{stem}.toml").read_text()
        assert f'tuned = "tuned/{stem}.toml"' in text and text.count("lr = ") == 1  # the run-wide lr only


# a stand-in for `lowrank-fed tune CONFIG ... --out DIR [--methods M ...]`: a [method] lr table per method asked for
# (every config method without --methods); CLAIR's rate differs per config
FAKE_TUNE = """
import sys, tomllib
from pathlib import Path
args = sys.argv[2:]
config, out = Path(args[0]), Path(args[args.index("--out") + 1])
if "--methods" in args:
    rest = args[args.index("--methods") + 1:]
    methods = rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]
else:
    methods = tomllib.loads(config.read_text())["methods"]
rate = {"copy_g0": 0.015, "minilm_g0": 0.005}.get(config.stem, 0.9)
out.mkdir(parents=True, exist_ok=True)
(out / "tuned.toml").write_text("".join(f"[{m}]\\nlr = {rate if m == 'clair' else 0.001}\\n\\n" for m in methods))
"""


def test_clairs_rate_at_every_gamma_is_the_gamma_0_tunes(tmp_path):
    # Prepare: CLAIR's configs unlinked, and the stand-in for lowrank-fed tune
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT / "clair", configs / "clair", ignore=shutil.ignore_patterns("tuned"))
    for path in (configs / "clair").glob("*.toml"):
        path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                if not line.startswith("tuned = ")))
    fake = tmp_path / "fake-lowrank-fed"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_TUNE)
    fake.chmod(0o755)
    env = {**os.environ, "REPRODUCE_CONFIGS": str(configs), "LOWRANK_FED": str(fake), "TUNE_ROOT": str(tmp_path / "t")}
    # Execute
    done = subprocess.run(["bash", str(TUNE_ALL), "clair"], capture_output=True, text=True, env=env)
    # Assert: every config's tuned file has one table per config method; CLAIR's is its gamma = 0 tune's
    assert done.returncode == 0, done.stderr
    for path in sorted((configs / "clair").glob("*.toml")):
        chosen = tomllib.loads((configs / "clair" / "tuned" / path.name).read_text())
        assert set(chosen) == set(tomllib.loads(path.read_text())["methods"]), path.name
        assert chosen["clair"] == {"lr": 0.015 if path.stem.startswith("copy") else 0.005}, path.name


# ----------------------------------------------------------------------------- bench_prelort --real


def test_the_prelort_benchmark_refuses_a_reported_seed_before_loading_anything(monkeypatch):
    from benchmarks import bench_prelort

    monkeypatch.setattr("lowrank_fed.llm.runner.simulation.Simulation.setup",
                        lambda self: pytest.fail("set up a run for a reported seed"))
    for seed in (0, 2, MAX_SEEDS - 1):
        with pytest.raises(ValueError, match=f"--seed {seed}: a reproduction reports seeds 0..99"):
            bench_prelort.run_real(CONFIG_ROOT / "prelort" / "minilm_bbc.toml", seed=seed)
    with pytest.raises(SystemExit):
        bench_prelort.main(["--real", str(CONFIG_ROOT / "prelort" / "minilm_bbc.toml"), "--seed", "0"])


def test_the_prelort_benchmark_scores_validation_only(monkeypatch):
    from benchmarks import bench_prelort
    from lowrank_fed.llm.runner.simulation import Simulation

    splits = []
    score = Simulation._score

    def only_validation(self, split, rows=None):
        splits.append(split)
        if split != "val":
            raise AssertionError(f"the benchmark scored the {split} split")
        return score(self, split, rows)

    monkeypatch.setattr(Simulation, "_score", only_validation)
    real = bench_prelort.run_real(ROOT / "configs" / "tiny_smoke.toml", modes=("off", "sample"), checkpoints=(1, 2),
                                  client=3, val_size=20)
    assert real["seed"] == 100 and real["split"] == "validation" and real["val_size"] == 20
    assert set(splits) == {"val"} and len(splits) == 2 * 2 * 3  # modes x checkpoints x levels 2, 4, 8
    for mode in ("off", "sample"):
        assert sorted(real["modes"][mode]["steps"]) == [1, 2]
        assert set(real["modes"][mode]["steps"][2]["accuracy"]) == {"2", "4", "8"}
