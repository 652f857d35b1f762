r"""The Flower ``ServerApp`` of ``flwr run .`` and ``lowrank-fed flower up``.

Its run config is the flat :class:`~lowrank_fed.llm.config.RunConfig` (``[tool.flwr.app.config]`` of
``pyproject.toml``, overridable with ``flwr run . --run-config 'rounds=3 methods="[\"fedit\"]"'``) plus the
``flower-*`` engine settings (:class:`~.engine.FlowerSettings`). It runs every method of the config with
:class:`~.engine.FlowerSimulation` (checkpoints after every round, reports as ``lowrank-fed run``) into
``flower-out`` (default ``runs/<name>``).

Resume: when the output folder already holds a run of the same config (its ``config.json``), the ServerApp
continues it from its last checkpoints, as ``lowrank-fed run --resume`` does; a folder holding a run of another
config, or other files, is refused (nothing is written). The rule is :func:`lowrank_fed.llm.run.check_output_folder`,
the one ``lowrank-fed run`` and ``lowrank-fed flower up`` use (``flower up --overwrite`` empties the folder before
the ServerApp starts, so the run starts afresh).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["app", "output_folder"]

log = logging.getLogger("lowrank_fed.llm.flower")

app = ServerApp()


def output_folder(cfg, settings) -> tuple[Path, bool]:
    r"""``(folder, resume)``: where the run goes and whether it continues an earlier run of the same config.

    Raises
    ------
    ConfigError
        The folder holds files but no run, or a run of another config
        (:func:`~lowrank_fed.llm.run.check_output_folder`).
    """
    from ..run import check_output_folder

    out = Path(settings.out or Path("runs") / cfg.name)
    plan = check_output_folder(out, cfg, hint="Set flower-out to another folder (or empty it: lowrank-fed flower "
                                              "up --overwrite).")
    return out, plan == "resume"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the config of ``context.run_config`` on ``grid``; resume it when its folder holds it already."""
    from .engine import FlowerSimulation, split_run_config

    flwr_logger, ours = logging.getLogger("flwr"), logging.getLogger("lowrank_fed")
    for handler in flwr_logger.handlers:  # the runner's and the strategy's warnings in Flower's log stream
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    settings, cfg = split_run_config(context.run_config)
    out, resume = output_folder(cfg, settings)
    log.info("lowrank-fed on Flower: %s, methods %s, %d clients, %d rounds -> %s%s", cfg.name, cfg.methods,
             cfg.clients, cfg.rounds, out, " (resumed)" if resume else "")
    stop, finished = _parent_watch()
    try:
        FlowerSimulation(cfg, out, progress=False, settings=settings, stop=stop).serve(grid, resume=resume)
    finally:
        finished.set()


def _parent_watch(poll: float = 0.2, grace: float = 10.0) -> tuple[threading.Event, threading.Event]:
    r"""``(stop, finished)``: ``stop`` is set once this process is re-parented, i.e. the Flower process that started
    the ServerApp (the SuperExec) is gone and the run with it (``flwr run .``'s local SuperLink stopped,
    ``flower up`` killed); the ServerApp sets ``finished`` when it returns.

    In Flower's simulation the ServerApp is a thread of ``flwr-simulation`` (Ray's driver), and a thread that does
    not return keeps that process, Ray's processes and the writes into the run folder alive after the SuperLink
    is gone. With ``stop`` set the ServerApp stops at its next exchange with the nodes
    (:class:`~.engine.RunStopped`, nothing more written); once it has (or after ``grace`` s), every descendant of
    this process (Ray's GCS, raylet, agents and workers) gets SIGTERM, then SIGKILL, and this process ends
    (status 1): nothing can receive its results any more.
    """
    stop, finished, parent = threading.Event(), threading.Event(), os.getppid()

    def watch():
        while not stop.wait(poll):
            if os.getppid() != parent:
                log.warning("lowrank-fed: the process that started this ServerApp (pid %d) is gone; stopping "
                            "the run (the same run config resumes it from its checkpoints)", parent)
                stop.set()
        finished.wait(grace)
        _end_descendants()
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lowrank-fed-parent-watch").start()
    return stop, finished


def _descendants() -> list[int]:
    """Ids of the living descendants of this process (from ``/proc/<pid>/stat``; empty without ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _end_descendants(grace: float = 5.0) -> None:
    """SIGTERM every descendant of this process, SIGKILL after ``grace`` s those still alive (the list is taken
    first: a descendant whose parent died is re-parented, and no longer found as a descendant)."""
    import contextlib
    import signal
    import time

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    pids = _descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in {*pids, *_descendants()} if alive(p)]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
