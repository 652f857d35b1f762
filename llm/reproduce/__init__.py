r"""``lowrank-fed reproduce``: the seed papers' claims as experiments over several seeds.

Usage::

    lowrank-fed reproduce --list
    lowrank-fed reproduce NAME [--seeds N] [--quick] [--out DIR] [--no-progress]
    lowrank-fed reproduce NAME --analyse-only [--out DIR]

An experiment (:data:`EXPERIMENTS`) is a set of run configs in ``configs/reproduce/<name>/`` plus the
comparison it reports (:mod:`.claims`). Every config is run once per seed (``seed = 0 .. N-1``, through the
same :class:`~lowrank_fed.llm.runner.simulation.Simulation` as ``lowrank-fed run``) into
``<out>/<config>/seed<s>/``; a run whose folder already holds a finished run of the same config is reused,
so an interrupted reproduction continues where it stopped (an unfinished one is run again). ``--out`` must be new
or hold an earlier reproduction of the same experiment: a run's folder or any other non-empty folder is refused, as
is a seed folder holding a finished run of another config (a finished result is never deleted), before anything is
written (:func:`~lowrank_fed.llm.outputs.plan_output`). Then ``report.md`` (the claims table: the paper's
number, ours as mean +- sample standard deviation over seeds, the verdict; then every paired comparison with its
95% interval over seeds, :mod:`.verdicts`), ``report.json`` (every per-seed number) and ``claims.png`` are written
to ``<out>`` (default ``runs/reproduce/<name>/``).

``--analyse-only`` (:func:`~.run.analyse`) runs nothing: it rewrites the report from the finished runs in ``--out``
(configs without runs give "not run yet"), describing the setting the runs' own ``config.json`` used.

``--quick`` is a plumbing check: tiny random models (``tiny-bert``, ``tiny-llama``) and a few steps, 2 seeds
by default, written to ``runs/reproduce/<name>-quick/``; its report says so and its numbers mean nothing.
"""

from __future__ import annotations

from .claims import EXPERIMENTS, Experiment
from .run import CONFIG_ROOT, add_arguments, analyse, main, reproduce

__all__ = ["EXPERIMENTS", "Experiment", "CONFIG_ROOT", "add_arguments", "analyse", "main", "reproduce"]
