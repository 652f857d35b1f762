r"""Finished run folders, as the reproductions and ``lowrank-fed tune`` read them back.

A run folder (``lowrank-fed run``'s output) is **finished** when it holds ``summary.json`` and its stored
``config.json`` defines the same run as the config at hand (:func:`finished_run`); both commands reuse such a folder
instead of running it again. :func:`load_run` reads one back as a :class:`Run`; :func:`find_runs` reads every
finished run of an experiment's configs in ``<out>/<config>/seed<s>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, RunConfig, same_run_keys

if TYPE_CHECKING:
    from .analysis import Experiment

__all__ = ["Run", "Results", "MAX_SEEDS", "load_run", "find_runs", "finished_run", "unfinished_run"]

#: The most seeds a reproduction takes (each is a full run of every config: hours each on this machine); seeds from
#: here up are never reported, so ``lowrank-fed tune`` tunes on them.
MAX_SEEDS = 100


@dataclass(frozen=True)
class Run:
    """One finished run: ``summary`` (method -> summary row), ``history`` (method -> per-round rows), ``setup``,
    ``config`` (its ``config.json``; empty when not loaded)."""

    summary: dict[str, dict]
    history: dict[str, list[dict]]
    setup: dict
    config: dict = field(default_factory=dict)


Results = dict[str, dict[int, Run]]  # config stem -> seed -> run


def load_run(folder: Path) -> Run:
    """A finished run's summary rows, per-round history and set-up, by method, and its config."""
    summary = {row["method"]: row for row in json.loads((folder / "summary.json").read_text())}
    history: dict[str, list[dict]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            history.setdefault(row["method"], []).append(row)
    config = folder / "config.json"
    return Run(summary, history, json.loads((folder / "setup.json").read_text()),
               json.loads(config.read_text()) if config.is_file() else {})


def finished_run(folder: Path, cfg: RunConfig) -> bool:
    r"""Whether ``folder`` holds a finished run of exactly ``cfg``.

    The stored ``config.json`` is read back through :meth:`RunConfig.from_dict` before it is compared, so a key
    added to the config after the run was made (absent from its ``config.json``) takes its default, which by the
    project's rule leaves an existing config's behaviour unchanged (``lora_scaling``'s ``alpha_over_r`` is the
    scale every earlier run used): a config that now spells that default out still finds the run. Any value that
    differs, or a stored config that no longer validates, is not the same run; ``workers`` and ``checkpoint`` are
    not compared (:data:`~lowrank_fed.llm.config.EXECUTION_KEYS`), nor the option tables of methods the run does
    not train (a method reads only its own table): a tune's one-method trial is still found after the config's
    other tables change, e.g. once the config is linked to its tuned rates.
    """
    try:
        stored = json.loads((folder / "config.json").read_text())
        # `workers`, `checkpoint` (how the run was computed) are not compared, nor validated against this machine
        stored = RunConfig.from_dict(same_run_keys(stored) if isinstance(stored, dict) else stored)
    except (OSError, json.JSONDecodeError, ConfigError):
        return False
    return (folder / "summary.json").is_file() and cfg.same_run(stored.definition())


def unfinished_run(folder: Path, cfg: RunConfig) -> bool:
    r"""Whether ``folder`` holds an interrupted run of exactly ``cfg`` (its ``config.json``, no ``summary.json``).

    Such a run is resumed, not cleared: each method continues from its last verified checkpoint (a method that
    finished is not trained again), to the bytes an uninterrupted run reaches. A config with ``checkpoint =
    false`` has no checkpoints, so its methods start again from round 0, as a cleared run would.
    """
    if (folder / "summary.json").is_file():
        return False
    try:
        stored = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(stored, dict) and cfg.same_run(stored)


def find_runs(experiment: Experiment, out: Path) -> Results:
    """Every finished run (a ``summary.json``) in ``out/<config>/seed<s>/``, whatever config it ran."""
    results: Results = {}
    for stem in experiment.configs:
        folder = out / stem
        if not folder.is_dir():
            continue
        for seed_dir in sorted(folder.iterdir()):
            name = seed_dir.name
            if name.startswith("seed") and name[4:].isdigit() and (seed_dir / "summary.json").is_file():
                results.setdefault(stem, {})[int(name[4:])] = load_run(seed_dir)
    return {stem: dict(sorted(by_seed.items())) for stem, by_seed in results.items()}
