"""The benchmark scripts run: `bench_merge` (both merges right to float32 rounding), `bench_gpu` on the CPU, and
`bench_workers`' projection of evaluation's share of a demo run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_merge_quick_runs_both_sides_and_both_match_the_float64_reference():
    # Execute
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_merge", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    # Assert: exit 0; PEFT's and our products within float32 rounding of the dense float64 best approximation
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in done.stdout.splitlines()
            if line.count("│") == 3}
    for key in ("error vs float64 best rank-64 approximation, first / last layer: PEFT",
                "same, ours (as written by merge)"):
        errors = [float(x) for x in re.findall(r"[0-9.]+e[-+][0-9]+", rows[key])]
        assert len(errors) == 2 and max(errors) < 1e-5, (key, rows[key])
    assert rows["speed-up, PEFT / aggregate_adapters"].endswith("x")


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu_and_writes_its_numbers(tmp_path):
    # Execute: the GPU script's smoke run, as a device loan would run it but on the CPU
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LOWRANK_FED_WORKERS": "1"})
    # Assert: both parts ran; the factored SVD agrees with the dense one; every demo method has a round
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert found["device"] == "cpu" and found["aggregation"]["relative_difference"] < 1e-4
    assert sorted(found["round"]["methods"]) == sorted(["fedit", "flora", "flexlora", "prelort", "hafl", "lora_a2"])
    assert 0 < found["round"]["eval_share"] < 1


def test_the_demo_eval_share_counts_round_0_once_and_each_scored_round():
    from benchmarks.bench_workers import demo_eval_share

    runs = [{"round0_eval_s": 6.0, "rounds_s": 12.0, "rounds_eval_s": 2.0},  # 10 s training, 2 s scoring a round
            {"round0_eval_s": 0.5, "rounds_s": 15.0, "rounds_eval_s": 3.0}]
    # 4 rounds trained: 4 * (10 + 12) = 88 s; scored rounds 0 (first method's, 6 s), 2 and 4: 6 + 2 * (2 + 3) = 16 s
    assert demo_eval_share(runs, rounds=4, scored=3) == pytest.approx(16 / (16 + 88))


def test_clair_decision_reads_a_tune_trial_as_its_config_setting(tmp_path):
    # Prepare: a run folder of a reproduction and a tune trial of minilm_g0, each with one CLAIR row
    from benchmarks.clair_decision import recorded

    row = {"method": "clair", "round": 1, "detection": {"scores": {"0": 0.5, "1": 2.5}, "contaminated": []}}
    folders = [tmp_path / "clair" / "minilm_g01" / "seed0",
               tmp_path / "tune" / "minilm_g0" / "trials" / "clair" / "lr=0.005" / "seed100"]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    # Execute
    got = recorded([str(f) for f in folders])
    # Assert: both are MiniLM rounds, at the gamma their config names (the trial: 0, a calibration source)
    assert set(got) == {("minilm", 0.1), ("minilm", 0.0)}
    trial = "clair/lr=0.005/seed100"  # seeds of a tune told apart by method and value
    assert list(got[("minilm", 0.0)]) == [trial] and len(got[("minilm", 0.0)][trial]) == 1
    # a folder named like a config higher up is not taken for one
    other = tmp_path / "abc_g1" / "calibration" / "seed100"
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert set(recorded([str(other)])) == {("calibration", 0.0)}


def _clair_run(folder: Path, rounds: list[dict], attackers: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "setup.json").write_text(json.dumps({"attackers": attackers}))
    (folder / "summary.json").write_text("[]")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"method": "clair", "round": t, "detection": d}) + "\n"
                                                  for t, d in enumerate(rounds, start=1)))
    return folder


def test_clair_residuals_groups_clients_by_history_and_counts_kept_flags(tmp_path):
    from benchmarks.clair_residuals import kept_flag_counts, residual_groups

    # Prepare: 3 clients, 2 modules; client 2 is contaminated: caught in round 1 (1.5x the median), then typical
    r1 = {"flagged": [2], "contaminated": [2], "scores": {"0": 0, "1": -1, "2": 2},
          "module_residuals": {"0": [1.0, 2.0], "1": [0.5, 1.0], "2": [1.5, 3.0]}}
    r2 = {"flagged": [], "contaminated": [2], "scores": {"0": 0, "1": -1, "2": 0.1},
          "module_residuals": {"0": [2.0, 4.0], "1": [1.0, 2.0], "2": [2.0, 4.0]}}
    run = _clair_run(tmp_path / "minilm_g02" / "seed100", [r1, r2], {"2": "other_task"})
    # Execute
    groups = residual_groups([run])
    counts = kept_flag_counts([run])
    # Assert: rho_k = mean_m res_km / med_j res_jm; the history groups; per round the flags miss round 2
    assert groups["contaminated, round 1"]["rho"] == [1.5]
    assert groups["contaminated, later, flagged the round before"]["rho"] == [1.0]
    assert groups["benign, round 1"]["rho"] == [1.0, 0.5] and groups["round 1"]["median"] == [1.5]
    assert groups["later rounds"]["spread"] == [0.0]  # MAD / median per module: |2-2|, |1-2|, |2-2| -> 0
    assert counts["per round"] == {"exact": 1, "rounds": 2, "recall": 0.5, "false_flag_rate": 0.0}
    assert counts["kept"] == {"exact": 2, "rounds": 2, "recall": 1.0, "false_flag_rate": 0.0}
    # a caught client absent for a round is still kept when it returns
    away = {"flagged": [], "contaminated": [], "scores": {"0": 0, "1": -1}, "module_residuals": {"0": [1.0, 1.0], "1": [1.0, 1.0]}}
    back = _clair_run(tmp_path / "minilm_g02" / "seed101", [r1, away, r2], {"2": "other_task"})
    assert kept_flag_counts([back])["kept"] == {"exact": 3, "rounds": 3, "recall": 1.0, "false_flag_rate": 0.0}
    # an attack from round 2 (from_round): client 2 is benign in round 1, then in its first contaminated round
    honest = {**r1, "flagged": [], "contaminated": []}
    late = residual_groups([_clair_run(tmp_path / "minilm_g02" / "seed102", [honest, r2], {"2": "other_task"})])
    assert late["benign, round 1"]["rho"] == [1.0, 0.5, 1.5] and "contaminated, round 1" not in late
    assert late["contaminated, first contaminated round, after round 1"]["rho"] == [1.0]
