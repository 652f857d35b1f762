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
    FlowerSimulation(cfg, out, progress=False, settings=settings, stop=_parent_watch()).serve(grid, resume=resume)


def _parent_watch(poll: float = 0.2) -> threading.Event:
    r"""An event set once this process is re-parented: the Flower process that started the ServerApp (the
    SuperExec) is gone, so the run was stopped (``flwr run .``'s local SuperLink stopped, ``flower up`` killed).

    In Flower's simulation the ServerApp is a thread of ``flwr-simulation``, and a thread that does not return
    keeps that process, its Ray workers and its writes into the run folder alive after the SuperLink is gone;
    with the event the ServerApp stops at its next exchange with the nodes (:class:`~.engine.RunStopped`).
    """
    stop, parent = threading.Event(), os.getppid()

    def watch():
        while not stop.wait(poll):
            if os.getppid() != parent:
                log.warning("lowrank-fed: the process that started this ServerApp (pid %d) is gone; stopping "
                            "the run (the same run config resumes it from its checkpoints)", parent)
                stop.set()

    threading.Thread(target=watch, daemon=True, name="lowrank-fed-parent-watch").start()
    return stop
