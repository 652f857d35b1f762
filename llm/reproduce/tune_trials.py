r"""One trial of ``lowrank-fed tune``: an ordinary run of one method on one seed, run or reused, and its validation
scores (:func:`run_trial`); the untrained start scored once per seed (:func:`trials_sharing_round0`); a decision
cut calibrated per grid value on runs that flag nobody (:func:`benign_scores`, :data:`FLAGS_NOBODY`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..config import RunConfig
from ..outputs import clear_folder
from .runs import finished_run, load_run
from .tune_choice import Target, _is_number

__all__ = ["run_trial", "trials_sharing_round0", "benign_scores", "FLAGS_NOBODY"]

#: A ``threshold`` no mean z-score reaches: a calibration run flags nobody, so its scores are not shaped by a cut.
FLAGS_NOBODY = 1e9


def run_trial(cfg: RunConfig, folder: Path, *, progress: bool = False, log: Callable[[str], None] = print,
              round0: dict | None = None) -> dict:
    r"""Run ``cfg`` (one method, one seed) into ``folder``, or reuse the finished run there; its validation scores.

    Returns the last round's ``val_*`` metrics (the global model's ``val_accuracy``, ``val_loss``; generation:
    ``val_perplexity``, ...; a personalised method's ``val_local_*``, ``val_benign_local_*`` and their effective
    sizes ``*_n``), with ``val_size`` and ``round``, read back from the run's ``metrics.jsonl`` and
    ``setup.json`` (:func:`~lowrank_fed.llm.reproduce.runs.load_run`). No test score is used. ``round0``: an
    earlier trial's round-0 row of the same config and seed, reused instead of scoring the untrained start again
    (:meth:`~lowrank_fed.llm.runner.simulation.Simulation.run`).
    """
    from ..runner.simulation import run_experiment

    if _finished_trial(folder, cfg):
        log(f"reusing the finished trial in {folder}")
    else:
        log(f"running {folder}")
        if folder.exists():
            clear_folder(folder)  # an unfinished trial
        run_experiment(cfg, folder, progress=progress, round0=round0)
    run = load_run(folder)
    last = run.history[cfg.methods[0]][-1]
    scores = {k: v for k, v in last.items() if k.startswith("val_") and _is_number(v)}
    return {**scores, "val_size": run.setup["val_size"], "round": last["round"]}


def _start_row(folder: Path, method: str) -> dict | None:
    """A finished trial's round-0 row, for the next trials of its seed; None for a personalised method's (each
    client's own start) or when it cannot be read."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except (OSError, json.JSONDecodeError):
        return None
    if [row.get("personalised") for row in summary if row.get("method") == method] != [False]:
        return None
    rows = [r for r in map(json.loads, lines) if r.get("method") == method and r.get("round") == 0]
    return rows[0] if rows else None


def _finished_trial(folder: Path, cfg: RunConfig) -> bool:
    """Whether ``folder`` holds a finished run of ``cfg`` up to its scoring schedule (``eval_every``).

    Every schedule scores the last round and none changes a trained bit (tested), so a trial scored on another
    schedule (every round, as trials were before :func:`_trial_config` set ``eval_every = rounds``) holds the
    score asked for.
    """
    try:
        stored = json.loads((folder / "config.json").read_text())["eval_every"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    return finished_run(folder, cfg.model_copy(update={"eval_every": stored}))


def trials_sharing_round0(target: Target, progress: bool, log: Callable[[str], None]) -> Callable:
    """:func:`run_trial` that scores the untrained start once per seed when the tuned key is ``lr``.

    Round 0 is scored before any step, from ``B = 0`` (the base model and the seed's head), so its row is the same
    for every value of ``lr`` and every method that is not personalised, as within a run, where the first
    method's row serves the others. The first such trial of a seed scores it; the others reuse its row (10-20 s of
    a 100-300 s MiniLM trial). Another key (a rank, an initialisation) may change the start: every trial scores it.
    """
    starts: dict[int, dict] = {}

    def run(cfg: RunConfig, folder: Path) -> dict:
        scores = run_trial(cfg, folder, progress=progress, log=log, round0=starts.get(cfg.seed))
        if target.option == "lr" and cfg.seed not in starts:
            row = _start_row(folder, cfg.methods[0])
            if row is not None:
                starts[cfg.seed] = row
        return scores

    return run


def benign_scores(folder: Path, method: str) -> list[float]:
    """Every benign client's detection score in every round of ``method`` in a finished run (``metrics.jsonl``'s
    ``detection.scores``, less ``detection.contaminated``): what :func:`~lowrank_fed.robust.calibrate_threshold`
    takes, read by :func:`~lowrank_fed.llm.reproduce.runs.load_run`. Raises ValueError when the run has none."""
    scores = []
    for row in load_run(folder).history.get(method, []):
        det = row.get("detection")
        if det and det.get("scores"):
            bad = {str(k) for k in det.get("contaminated", [])}
            scores += [float(v) for k, v in det["scores"].items() if k not in bad]
    if not scores:
        raise ValueError(f"{folder}: no detection scores of {method!r} to calibrate a threshold on")
    return scores
