"""Clients in parallel (``workers = N``): the bytes of one worker, a dead worker is a dropped update, the key's bounds.

The property: the outputs of a run are a function of its config's definition (every key but ``workers``), so
``workers = 2`` writes the same ``metrics.jsonl``, summaries (but their time columns), adapters, plots and
checkpoints as ``workers = 1``, for every method, with attacks, faults and client sampling.
"""

from __future__ import annotations

import collections
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import ConfigError, RunConfig, available_cores  # noqa: E402
from lowrank_fed.llm.federation import sample_clients  # noqa: E402
from lowrank_fed.llm.methods import METHODS  # noqa: E402
from lowrank_fed.llm.runner.pool import WORKER_EXIT_ENV, ClientPool  # noqa: E402
from lowrank_fed.llm.runner.simulation import UpdateDroppedWarning, run_experiment  # noqa: E402
from tests.llm.helpers import kill_after_round, sha_tree, tiny_settings  # noqa: E402

TIMED = ("timings.jsonl", "summary.json", "summary.md")  # wall times; compared without their time columns below
TIME_KEYS = ("seconds", "wall", "time")

needs_two_cores = pytest.mark.skipif(available_cores() < 2, reason="workers = 2 needs two CPU cores")


def _count_pool_tasks(monkeypatch):
    """Count the tasks handed to worker pools, by kind (``train``, ``score``)."""
    kinds = collections.Counter()
    run = ClientPool.run

    def counting(self, tasks, on_result=None):
        kinds.update(kind for kind, _ in tasks)
        return run(self, tasks, on_result)

    monkeypatch.setattr(ClientPool, "run", counting)
    return kinds


def _untimed_summary(folder):
    """summary.json without the columns that hold seconds."""
    rows = json.loads((folder / "summary.json").read_text())
    return [{k: v for k, v in r.items() if not any(t in k for t in TIME_KEYS)} for r in rows]


def _outputs(folder):
    """Every output's hash but config.json (it states `workers`) and the timed files, plus the untimed summary."""
    return sha_tree(folder, exclude=(*TIMED, "config.json")), _untimed_summary(folder)


@pytest.mark.slow
@needs_two_cores
def test_every_method_on_two_workers_writes_the_bytes_of_one(tmp_path, monkeypatch):
    # Prepare: every method of the registry, an update attack and a data attack, a fault, 3 of 4 clients a round
    settings = tiny_settings(methods=sorted(METHODS), clients=4, ranks=[2, 4, 4, 8], rounds=2, checkpoint=True,
                             clients_per_round=3, score_uploads=True,
                             attacks=[{"kind": "sign_flip", "clients": [1]}, {"kind": "label_flip", "clients": [2]}])
    settings["faults"] = [{"round": 2, "client": sample_clients(RunConfig.from_dict(settings), 2)[-1], "kind": "nan"}]
    kinds = _count_pool_tasks(monkeypatch)
    # Execute
    for workers in (1, 2):
        with pytest.warns(UpdateDroppedWarning):
            run_experiment(RunConfig.from_dict({**settings, "workers": workers}), tmp_path / f"w{workers}",
                           progress=False)
    # Assert: the workers trained every client and scored models; metrics, adapters, checkpoints, plots identical;
    # the runs did drop and did checkpoint
    assert kinds["train"] == len(METHODS) * 2 * 3 and kinds["score"] > 0
    one, two = _outputs(tmp_path / "w1"), _outputs(tmp_path / "w2")
    assert one == two
    assert any(p.startswith("checkpoints/lora_a2/") for p in one[0]) and "adapters/clair.safetensors" in one[0]
    rows = [json.loads(x) for x in (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["dropped"] for r in rows) >= len(METHODS) - 1  # the nan fault (local uploads nothing to corrupt)
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["workers"] == 2


@needs_two_cores
def test_two_workers_write_the_bytes_of_one_and_resume_across_worker_counts(tmp_path, monkeypatch):
    # Prepare: two methods whose distinct ranks download distinct models (scored on the workers)
    settings = tiny_settings(methods=["flexlora", "hetlora"], clients=4, ranks=[2, 4, 4, 8], rounds=2,
                             checkpoint=True)
    one, two = RunConfig.from_dict({**settings, "workers": 1}), RunConfig.from_dict({**settings, "workers": 2})
    kinds = _count_pool_tasks(monkeypatch)
    # Execute: one worker; two workers killed after round 1 and resumed with one (checkpoints hold no `workers`)
    run_experiment(one, tmp_path / "one", progress=False)
    kill_after_round(two, tmp_path / "mixed", 1)
    assert kinds["train"] == 4 and kinds["score"] > 0  # round 1 of flexlora on the workers
    run_experiment(one, tmp_path / "mixed", resume=True, progress=False)
    # Assert
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "mixed")
    state = json.loads(next((tmp_path / "one" / "checkpoints" / "flexlora").glob("round-*/state.json")).read_text())
    assert "workers" not in state["config"] and state["config"]["threads"] == 1


@needs_two_cores
def test_a_worker_killed_mid_round_is_a_dropped_update_and_the_run_goes_on(tmp_path, monkeypatch):
    # Prepare: client 2's worker exits (os._exit) as it starts training in round 1 of fedit
    settings = tiny_settings(methods=["fedit"], clients=4, ranks=[2, 4, 4, 8], rounds=2, workers=2)
    monkeypatch.setenv(WORKER_EXIT_ENV, "fedit:1:2")
    # Execute
    with pytest.warns(UpdateDroppedWarning, match=r"round 1, client 2: update dropped \(client failed: worker "
                                                   r"process died \(exit status 70\)\)"):
        summary = run_experiment(RunConfig.from_dict(settings), tmp_path, progress=False)
    # Assert: that update alone is dropped; round 2 has all four clients again (the worker was replaced)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 1, 0]
    assert [c["client"] for c in rows[1]["clients"] if c["dropped"]] == [2]
    assert [c["dropped"] for c in rows[2]["clients"]] == [False] * 4
    assert summary[0]["dropped"] == 1


@needs_two_cores
def test_a_corrupt_reply_from_a_worker_is_dropped_as_in_process(tmp_path):
    # Prepare: a fault that corrupts client 0's update, one worker and two
    settings = tiny_settings(methods=["fedsa"], clients=3, faults=[{"round": 1, "client": 0, "kind": "shape"}])
    # Execute
    for workers in (1, 2):
        with pytest.warns(UpdateDroppedWarning, match="client 0: update dropped"):
            run_experiment(RunConfig.from_dict({**settings, "workers": workers}), tmp_path / str(workers),
                           progress=False)
    # Assert: the same reason, the same bytes
    assert _outputs(tmp_path / "1") == _outputs(tmp_path / "2")


def test_workers_times_threads_above_the_cores_is_a_config_error():
    cores = available_cores()
    with pytest.raises(ConfigError, match=rf"Config key 'workers': expected an integer in \[0, {cores}\]: "
                                          rf"workers x threads = {cores + 1} x 1 at most the {cores} CPU cores"):
        RunConfig.from_dict({"workers": cores + 1})
    with pytest.raises(ConfigError, match="Config key 'workers'"):
        RunConfig.from_dict({"workers": -1})
    if cores >= 2:
        with pytest.raises(ConfigError, match=rf"workers x threads = 2 x {cores}"):
            RunConfig.from_dict({"workers": 2, "threads": cores})


def test_workers_zero_takes_the_environment_else_the_cores(monkeypatch):
    cfg = RunConfig.from_dict({})
    assert cfg.workers == 0
    monkeypatch.delenv("LOWRANK_FED_WORKERS", raising=False)
    assert cfg.worker_count("cpu") == available_cores() and cfg.worker_count("cuda") == 1
    assert RunConfig.from_dict({"workers": 1}).worker_count("cpu") == 1
    monkeypatch.setenv("LOWRANK_FED_WORKERS", "1")
    assert cfg.worker_count("cpu") == 1
    for bad in ("0", "x", str(available_cores() + 1)):
        monkeypatch.setenv("LOWRANK_FED_WORKERS", bad)
        with pytest.raises(ConfigError, match=f"LOWRANK_FED_WORKERS.*got '{bad}'"):
            cfg.worker_count("cpu")


def test_workers_is_not_part_of_the_runs_definition():
    cfg = RunConfig.from_dict({"workers": 1})
    assert "workers" in cfg.to_dict() and "workers" not in cfg.definition()
    assert cfg.definition() == RunConfig.from_dict({}).definition()


def test_a_worker_that_cannot_build_its_model_fails_the_run_and_says_why():
    # Prepare: tiny-bert builds its tokenizer from Shared.vocabulary, which this pool is not given
    from lowrank_fed.llm.federation import Shared

    pool = ClientPool(RunConfig.from_dict(tiny_settings()), Shared(), 1, reference_rank=8)
    # Execute / Assert
    try:
        with pytest.raises(RuntimeError, match="A worker process could not start: ValueError: Model 'tiny-bert' "
                                               "builds its tokenizer from the vocabulary"):
            pool.run([("score", (None, "test", None))])
    finally:
        pool.close()
