"""Flower deployment on real processes: a SuperLink and 3 SuperNodes on localhost, one killed during round 2.

The run is ``lowrank_fed.llm.flower.deploy.up`` (what ``lowrank-fed flower up`` runs) on a tiny config; a watcher
thread kills SuperNode 2 (SIGKILL, with its ClientApp) as soon as round 1 is in ``metrics.jsonl``, i.e. while
round 2's downloads are out. The round's timeout then drops client 2; the run must finish with finite adapters,
name the missing node, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower import deploy  # noqa: E402
from lowrank_fed.llm.flower.engine import FlowerSettings  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, load_final  # noqa: E402
from tests.llm.helpers import tiny_settings  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_does_not_stop_the_run(tmp_path, monkeypatch):
    # Prepare: 3 clients (ranks 2, 4, 8), 2 rounds; the watcher kills SuperNode 2 once round 1 is logged
    cfg = RunConfig.from_dict(tiny_settings(rounds=2, methods=["fedit"], checkpoint=True))
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.setup()
    out = tmp_path / "run"
    seen, killed = set(), []
    original_kill = deploy.LocalFederation.kill

    def recording_kill(self, name, sig=signal.SIGKILL):
        pids = original_kill(self, name, sig)
        seen.update(pids)
        return pids

    monkeypatch.setattr(deploy.LocalFederation, "kill", recording_kill)

    def watch(fed):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for proc in fed.procs.values():
                seen.update([proc.pid, *deploy.descendants(proc.pid)])
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(json.loads(x)["round"] == 1 for x in metrics.read_text().splitlines()):
                killed.extend(fed.kill("supernode-2", signal.SIGKILL))
                return
            time.sleep(0.1)

    # Execute
    status = deploy.up(cfg, out, 3, sim.ranks, FlowerSettings(round_timeout=45.0, start_timeout=60.0), watch=watch)
    # Assert: the run finished; round 1 had every client, round 2 lost client 2 (named), kept 0 and 1
    assert status == 0, (out / ".flower" / "flwr-run.log").read_text()[-3000:]
    assert killed, "SuperNode 2 was never killed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 0, 1]
    lost = {r["client"]: r for r in rows[-1]["clients"]}
    assert lost[2]["dropped"] and "no reply from SuperNode" in lost[2]["reason"]
    assert not lost[0]["dropped"] and not lost[1]["dropped"]
    assert "client 2: update dropped (no reply from SuperNode" in (out / ".flower" / "flwr-run.log").read_text()
    tensors = load_final(out / "adapters" / "fedit.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "fedit" / "LATEST").is_file()
    # ... and nothing it started is left running
    time.sleep(0.5)
    assert [pid for pid in seen if _alive(pid)] == []
