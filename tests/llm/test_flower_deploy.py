"""Flower deployment on real processes: a SuperLink and 3 SuperNodes on localhost, one killed during round 2.

The run is ``lowrank_fed.llm.flower.deploy.up`` (what ``lowrank-fed flower up`` runs) on a tiny config; a watcher
thread kills SuperNode 2 (SIGKILL, with its ClientApp) as soon as round 1 is in ``metrics.jsonl``, i.e. while
round 2's downloads are out. Round 2 then drops client 2, whether its timeout ran out or the SuperLink reported
the node lost first (both give the reason ``"no reply from SuperNode ..."``); the run must finish with finite
adapters, name the missing node, and leave no process behind (found by the marker every process of the run
carries in its environment, ``deploy.marked_processes``).

The other tests check the process handling without a whole run: the overall timeout, helpers whose parent
exited, and a port taken between choosing it and binding it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower import deploy  # noqa: E402
from lowrank_fed.llm.flower.engine import FlowerSettings, flower_environment  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, load_final  # noqa: E402
from tests.llm.helpers import tiny_settings  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_does_not_stop_the_run(tmp_path):
    # Prepare: 3 clients (ranks 2, 4, 8), 2 rounds; the watcher kills SuperNode 2 once round 1 is logged
    cfg = RunConfig.from_dict(tiny_settings(rounds=2, methods=["fedit"], checkpoint=True))
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.setup()
    out = tmp_path / "run"
    folder = out / ".flower"
    seen, killed, environs = set(), [], {}

    def watch(fed):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for pid in deploy.marked_processes(folder):
                if pid not in seen:
                    seen.add(pid)
                    environs[pid] = _environ(pid)
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(json.loads(x)["round"] == 1 for x in metrics.read_text().splitlines()):
                killed.extend(fed.kill("supernode-2", signal.SIGKILL))
                return
            time.sleep(0.1)

    # Execute: round 1 (cold ClientApps on busy cores) may take round_timeout + start_timeout = 150 s
    status = deploy.up(cfg, out, 3, sim.ranks, FlowerSettings(round_timeout=45.0, start_timeout=105.0),
                       watch=watch, timeout=480.0)
    # Assert: the run finished; round 1 had every client, round 2 lost client 2 (named), kept 0 and 1
    log = (folder / "flwr-run.log").read_text()
    assert status == 0, log[-3000:]
    assert killed, "SuperNode 2 was never killed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 0, 1]
    lost = {r["client"]: r for r in rows[-1]["clients"]}
    assert lost[2]["dropped"] and lost[2]["reason"].startswith("no reply from SuperNode"), lost[2]["reason"]
    assert not lost[0]["dropped"] and not lost[1]["dropped"]
    assert "client 2: update dropped (no reply from SuperNode" in log
    tensors = load_final(out / "adapters" / "fedit.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "fedit" / "LATEST").is_file()
    # ... the marker found Flower's helpers too (more processes than the 5 started here), all with the run's
    # environment (Flower's home and caches in the run folder) ...
    assert len(seen) > 5, sorted(seen)
    base = str(folder.resolve())
    for env in environs.values():
        assert env["FLWR_HOME"] == f"{base}/home" and env["XDG_CACHE_HOME"] == f"{base}/cache"
        assert env["MPLCONFIGDIR"] == f"{base}/matplotlib" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    # ... and nothing it started is left running
    assert deploy.marked_processes(folder) == []
    assert [pid for pid in seen if _alive(pid)] == []


def _fake_flwr(tmp_path, *, exit_at_once: bool) -> Path:
    """A stand-in for ``flwr``: starts a helper in a session of its own (its id in ``helper.pid``), then sleeps
    (a stuck run) or exits at once (the helper outlives it)."""
    script = tmp_path / "fake-flwr"
    script.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        "helper = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(tmp_path / 'helper.pid')!r}, 'w').write(str(helper.pid))\n"
        f"{'sys.exit(0)' if exit_at_once else 'time.sleep(300)'}\n")
    script.chmod(0o755)
    return script


def _helper(tmp_path) -> int:
    deadline = time.monotonic() + 30
    while not (tmp_path / "helper.pid").is_file() or not (tmp_path / "helper.pid").read_text():
        assert time.monotonic() < deadline, "the fake flwr never started its helper"
        time.sleep(0.05)
    return int((tmp_path / "helper.pid").read_text())


def test_a_run_past_its_timeout_is_stopped_with_every_helper(tmp_path, monkeypatch):
    # Prepare: a `flwr run` that never ends and leaves a helper in its own session
    monkeypatch.setattr(deploy, "_bin", lambda name: str(_fake_flwr(tmp_path, exit_at_once=False)))
    with flower_environment(tmp_path / "run") as env:
        fed = deploy.LocalFederation(tmp_path / "run" / ".flower", env)
        # Execute
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"did not finish within --timeout = 2 s; it was stopped"), fed:
            fed.run(tmp_path, timeout=2.0)
        # Assert: stopped in time; the helper (found by the marker, not as a child) is gone too
        assert time.monotonic() - t0 < 30
    helper = _helper(tmp_path)
    assert deploy.marked_processes(fed.folder) == []
    assert not _alive(helper)


def test_kill_finds_the_helpers_of_a_process_that_already_exited(tmp_path, monkeypatch):
    # Prepare: a process that starts a helper in its own session and exits (its id is reaped, the helper is not)
    script = _fake_flwr(tmp_path, exit_at_once=True)
    with flower_environment(tmp_path / "run") as env, deploy.LocalFederation(tmp_path / "run" / ".flower", env) as fed:
        proc = fed._spawn("flwr-run", [str(script)])
        proc.wait(timeout=30)
        helper = _helper(tmp_path)
        assert deploy.marked_processes(fed.folder, "flwr-run") == [helper]
        # Execute
        signalled = fed.kill("flwr-run")
        # Assert
        assert signalled == [helper]
        deadline = time.monotonic() + 10
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(helper)
        assert deploy.marked_processes(fed.folder, "superlink") == []


def test_a_port_taken_before_flower_binds_it_is_retried(tmp_path, monkeypatch):
    # Prepare: the first port chosen is already listened on by another socket
    import socket

    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    taken = thief.getsockname()[1]
    ports = iter([taken])
    real = deploy.free_port
    monkeypatch.setattr(deploy, "free_port", lambda: next(ports, None) or real())
    try:
        with flower_environment(tmp_path / "run") as env:
            env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
            with deploy.LocalFederation(tmp_path / "run" / ".flower", env) as fed:
                # Execute
                fed.start_superlink()
                # Assert: the SuperLink gave up the taken port ("already in use") and listens on another
                assert fed.ports["superlink"] != taken
                assert "already in use" in (fed.folder / "superlink.log").read_text().lower()
                assert fed.procs["superlink"].poll() is None
            assert deploy.marked_processes(fed.folder) == []
    finally:
        thief.close()
