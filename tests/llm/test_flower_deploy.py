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
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower import deploy, local  # noqa: E402
from lowrank_fed.llm.flower.engine import FlowerSettings, flower_environment  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, load_final  # noqa: E402
from tests.llm.helpers import tiny_settings  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead; so is a process that ends while ``/proc`` is read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> bytes:
    """The command line of ``pid`` (empty once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str] | None:
    """The environment of ``pid``; None for a process that ended before or while ``/proc`` is read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:  # ProcessLookupError / FileNotFoundError: a short-lived helper already gone
        return None
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


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
                    env = _environ(pid)
                    if env is not None:  # ended already: nothing left to check but that it is gone
                        environs[pid] = env
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
    monkeypatch.setattr(local, "_bin", lambda name: str(_fake_flwr(tmp_path, exit_at_once=False)))
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
    monkeypatch.setattr(local, "free_port", lambda: next(ports, None) or real())
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


# ----------------------------------------------------------------------------- no process left, however it ends


def _watchdogs(folder) -> list[int]:
    from lowrank_fed.llm.flower.processes import WATCHDOG

    return deploy.marked_processes(folder, mark=WATCHDOG)


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _command_with_helper(tmp_path, body: str) -> tuple:
    """A Python process that starts a marked helper (``sleep``, in a session of its own, as Flower's are) under
    ``body`` (a ``with`` line using ``folder``), then waits; returns ``(process, helper pid, folder)``."""
    folder = tmp_path / "run" / ".flower"
    folder.mkdir(parents=True)
    script = tmp_path / "command.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "from lowrank_fed.llm.flower.processes import MARK, Terminated, signals_raise, watchdog\n"
        "from lowrank_fed.llm.flower.deploy import LocalFederation\n"
        f"folder = {str(folder)!r}\n"
        "def main():\n"
        f"    {body}\n"
        "        helper = fed._spawn('helper', ['sleep', '300'])\n"
        f"        open({str(tmp_path / 'helper.pid')!r}, 'w').write(str(helper.pid))\n"
        "        time.sleep(300)\n"
        "try:\n"
        "    main()\n"
        "except Terminated as err:\n"
        "    sys.exit(err.status)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[2])
    return proc, _helper(tmp_path), folder



def test_sigterm_runs_the_clean_up_of_every_process(tmp_path):
    # Prepare: a command holding a local federation with a helper, SIGTERM turned into the clean-up path
    proc, helper, folder = _command_with_helper(
        tmp_path, "with signals_raise(), LocalFederation(folder, {}) as fed:")
    assert deploy.marked_processes(folder) == [helper]
    # Execute
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=30)
    # Assert: the command ended through its clean-up (Terminated, not the default kill), the helper is gone
    assert status == 143
    assert _wait_gone([helper], 5) == []
    assert deploy.marked_processes(folder) == []


def test_the_watchdog_stops_every_process_when_its_command_is_killed(tmp_path):
    # Prepare: a command with a watchdog and a helper; SIGKILL leaves the command no chance to clean up
    proc, helper, folder = _command_with_helper(
        tmp_path, "with watchdog(folder), LocalFederation(folder, {}) as fed:")
    watchdogs = _watchdogs(folder)
    assert len(watchdogs) == 1
    # Execute
    t0 = time.monotonic()
    proc.kill()
    proc.wait(timeout=30)
    # Assert: the watchdog noticed (its pipe closed), stopped the helper and exited, well within a node timeout
    assert _wait_gone([helper, *watchdogs], 20) == []
    assert time.monotonic() - t0 < 20
    assert deploy.marked_processes(folder) == [] and _watchdogs(folder) == []


def test_a_watchdog_whose_command_ends_normally_stops_nothing_and_exits(tmp_path):
    # Prepare
    from lowrank_fed.llm.flower.processes import MARK, watchdog

    folder = tmp_path / ".flower"
    folder.mkdir()
    helper = subprocess.Popen(["sleep", "300"], env={**os.environ, MARK: str(folder.resolve())})
    try:
        # Execute
        with watchdog(folder) as dog:
            pass
        # Assert: told "done", it exited at once and left the marked process alone
        assert dog.poll() == 0
        assert _alive(helper.pid)
    finally:
        helper.kill()
        helper.wait()


def _tiny_config(tmp_path, **overrides) -> Path:
    import tomli_w

    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_settings(**{"rounds": 1000, "checkpoint": True, **overrides})))
    return config


def _sigterm_mid_run(argv: list[str], out: Path, *, start: float = 240.0) -> tuple[int, list[int], str]:
    """Start ``python -m lowrank_fed.cli ARGV``, SIGTERM it once round 1 is in ``out/metrics.jsonl``; returns
    its status, the marked processes seen while it ran, and its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_fed.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=out.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, seen = out / "metrics.jsonl", set()
    try:
        deadline = time.monotonic() + start
        while not (metrics.exists() and any(json.loads(x)["round"] >= 1 for x in metrics.read_text().splitlines())):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "round 1 never finished"
            seen.update(deploy.marked_processes(out / ".flower"))
            time.sleep(0.2)
        seen.update(deploy.marked_processes(out / ".flower"))
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, sorted(seen), proc.stderr.read().decode()


@pytest.mark.slow
def test_sigterm_to_flower_up_mid_run_leaves_no_process(tmp_path):
    # Prepare: a run far longer than the test
    config, out = _tiny_config(tmp_path), tmp_path / "run"
    # Execute: `lowrank-fed flower up` killed with SIGTERM after round 1
    status, seen, err = _sigterm_mid_run(["flower", "up", str(config), "--out", str(out), "--timeout", "600",
                                          "--start-timeout", "105", "--round-timeout", "45"], out)
    # Assert: it said so and exited 128 + 15; the SuperLink, the SuperNodes, the ServerApp, the ClientApps and
    # the watchdog are all gone, and nothing writes into the run folder any more
    assert status == 143, err[-3000:]
    assert "stopped by SIGTERM; every process of the run was stopped" in err and "Traceback" not in err
    assert len(seen) >= 5, seen  # SuperLink, 3 SuperNodes, flwr run (and Flower's helpers)
    assert _wait_gone(seen, 5) == []
    assert deploy.marked_processes(out / ".flower") == [] and _watchdogs(out / ".flower") == []
    size = (out / "metrics.jsonl").stat().st_size
    time.sleep(2)
    assert (out / "metrics.jsonl").stat().st_size == size


@pytest.mark.slow
def test_sigterm_to_run_engine_flower_mid_run_leaves_no_process(tmp_path):
    # Prepare: a run far longer than the test
    config, out = _tiny_config(tmp_path), tmp_path / "run"
    # Execute: `lowrank-fed run --engine flower` (Flower's simulation: Ray) killed with SIGTERM after round 1
    status, seen, err = _sigterm_mid_run(["run", str(config), "--engine", "flower", "--out", str(out),
                                          "--no-progress"], out)
    # Assert: it exited 128 + 15 at once (the ServerApp thread did not wait out its round), Ray's processes
    # (GCS, raylet, workers: marked) and the watchdog are gone, and nothing writes into the run folder any more
    assert status == 143, err[-3000:]
    assert f"continue with: lowrank-fed run --resume {out}" in err and "Traceback" not in err
    assert len(seen) >= 3, seen
    assert _wait_gone(seen, 5) == []
    assert deploy.marked_processes(out / ".flower") == [] and _watchdogs(out / ".flower") == []
    size = (out / "metrics.jsonl").stat().st_size
    time.sleep(2)
    assert (out / "metrics.jsonl").stat().st_size == size


@pytest.mark.slow
def test_flwr_run_launcher_sigterm_then_its_local_superlink_stopped_leaves_no_process(tmp_path):
    """`flwr run .` hands the run to a local SuperLink that Flower starts detached and keeps after `flwr run`
    ends (Flower's design: a submitted run belongs to the SuperLink). Killing the launcher leaves the run going;
    stopping that SuperLink (SIGTERM, as docs/flower.md says) must then stop everything, the ServerApp included
    (it runs as a thread of `flwr-simulation`, which outlived the SuperLink before it watched its parent)."""
    import tomli_w

    from lowrank_fed.llm.flower.processes import MARK, stop_marked

    # Prepare: Flower's home, caches and ports of this test only; every process carries the run's marker
    out = tmp_path / "run"
    folder = (out / ".flower").resolve()
    override = tmp_path / "override.toml"
    override.write_text(tomli_w.dumps({**RunConfig.from_dict(tiny_settings(rounds=1000)).to_flat(),
                                       "flower-out": str(out), "flower-start-timeout": 105.0}))
    with flower_environment(out) as env:
        home = Path(env["FLWR_HOME"])
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
            "options.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 1\n")
        env = {**os.environ, **env, MARK: str(folder), "OMP_NUM_THREADS": "1",
               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(deploy.free_port()),
               "FLWR_LOCAL_CONTROL_API_PORT": str(deploy.free_port()),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        launcher = subprocess.Popen([deploy._bin("flwr"), "run", ".", "--stream", "--run-config", str(override)],
                                    cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT)
        try:
            metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                assert launcher.poll() is None and time.monotonic() < deadline, "round 1 never finished"
                time.sleep(0.2)
            # Execute: SIGTERM the launcher; then stop the local SuperLink it left
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=30)
            superlinks = [p for p in deploy.marked_processes(folder)
                          if b"flower-superlink" in _cmdline(p)]
            assert len(superlinks) == 1, "Flower's local SuperLink outlives `flwr run` (by design)"
            left = deploy.marked_processes(folder)
            os.kill(superlinks[0], signal.SIGTERM)
            # Assert: the SuperExec, flwr-simulation (with the ServerApp) and Ray's processes all end; nothing
            # writes into the run folder any more
            assert _wait_gone(left, 60) == [], [_cmdline(p)[:80] for p in left
                                                if _alive(p)]
            size = metrics.stat().st_size
            time.sleep(2)
            assert metrics.stat().st_size == size
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
            stop_marked(folder, grace=2)


def test_flowers_report_of_a_clientapp_whose_owner_died_is_dropped_and_other_errors_kept():
    # Prepare: a logger with the filter `run --engine flower` puts on Flower's, and a handler that keeps records
    from lowrank_fed.llm.flower.engine import _OwnerExitFilter

    logger, kept = logging.Logger("flwr-under-test"), []
    logger.addFilter(_OwnerExitFilter())
    logger.addHandler(type("Keep", (logging.Handler,), {"emit": lambda self, r: kept.append(r.getMessage())})())
    died = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ClientAppActor\nThe actor is "
            "dead because its owner has died. Owner worker exit type: INTENDED_USER_EXIT")
    # Execute: what Flower's simulation worker logs when its ClientApp actor dies with this process (the
    # exception, then its traceback), and a ClientApp's own error
    logger.error(RuntimeError(died))
    logger.error("Traceback (most recent call last):\n  ...\nray.exceptions.ActorDiedError: " + died)
    logger.error("ClientApp raised: boom")
    # Assert: only the ClientApp's own error is reported
    assert kept == ["ClientApp raised: boom"]


def test_a_failing_clean_up_still_restores_flowers_log_and_the_process_marker(tmp_path, monkeypatch):
    # Prepare: the simulation fails, and so does Ray's shutdown in the clean-up after it
    import flwr.simulation

    from lowrank_fed.llm.flower import engine
    from lowrank_fed.llm.flower.engine import FlowerSimulation
    from lowrank_fed.llm.flower.processes import MARK

    def fail(**kwargs):
        raise RuntimeError("the simulation failed")

    def ray_fails():
        raise RuntimeError("ray.shutdown failed")

    monkeypatch.setattr(flwr.simulation, "run_simulation", fail)
    monkeypatch.setattr(engine, "_ray_shutdown", ray_fails)
    monkeypatch.delenv(MARK, raising=False)
    flwr_log = logging.getLogger("flwr")
    filters = list(flwr_log.filters)
    sim = FlowerSimulation(RunConfig.from_dict(tiny_settings()), tmp_path / "fl", progress=False)
    # Execute
    with pytest.raises(RuntimeError, match="ray.shutdown failed"):
        sim.run()
    # Assert: Flower's log is on again, its filter removed, and this process no longer carries the marker
    assert not flwr_log.disabled
    assert flwr_log.filters == filters
    assert MARK not in os.environ
