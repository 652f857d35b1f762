r"""Whether a claim can be tested here: its methods have learnt something (the floor), and a winner could have won
(the ceiling).

A score at or below always answering the test set's majority class is no sign of learning. A claim about trained
models (LoRA-A2's accuracies, Byun & Lee's drop at aggregation) compared with a model that has not left it says which
one leaves chance first, not what the claim says; each such claim states which of its models must have learnt
(:func:`learnt_seeds`). Not a general rule: where a method's collapse is the effect measured (FedAvg of contaminated
clients under CLAIR's claims) a model at chance is a result, and only ``_near_chance`` (nothing learnt at all) applies.

At the other end a baseline right on nearly every test example leaves a claimed winner nothing to show:
:func:`_perfect` is the comparison a winner right on every example would give, and a tie that even it would not
have won is "not testable here" (:func:`~.verdicts.paired`'s ``perfect``, :func:`_at_ceiling` its note).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .runs import Run
from .verdicts import example_se

__all__ = ["MIN_LEARNT_SEEDS", "learnt_seeds"]

#: Seeds in which every compared model has learnt, at least, for a claim that needs trained models (the fewest
#: seeds any verdict takes).
MIN_LEARNT_SEEDS = 3


def _above_majority(accuracy: float, setup: dict) -> bool | None:
    r"""``acc - p > 2 sqrt(p (1 - p) / N)``: ``accuracy`` is above always answering the test set's majority class by
    more than 2 standard errors (``p``, ``N``: ``majority_accuracy`` and ``eval_size`` of ``setup.json``); None when
    the run's set-up does not record them."""
    p, n = setup.get("majority_accuracy"), int(setup.get("eval_size") or 0)
    if p is None or n < 1:
        return None
    return accuracy - p > 2 * math.sqrt(p * (1 - p) / n)


def _near_chance(by_seed: dict[int, Run], methods: Sequence[str]) -> str:
    r"""Why a claim on these methods' global accuracy is not testable here, or ``""``.

    A method has learnt something measurable only if it is **above** always answering the test set's majority
    class by more than 2 standard errors, ``acc - p > 2 sqrt(p (1 - p) / N)`` (one-sided: an accuracy at or below
    ``p`` is no sign of learning), with ``p`` that class's share of the ``N`` test examples (``majority_accuracy``
    and ``eval_size`` in ``setup.json``; not ``1 / C``, which the majority class always beats). The claim is not
    testable when no method has, in any seed.
    """
    for run in by_seed.values():
        above = [_above_majority(run.summary[m]["final"], run.setup) for m in methods]
        if None in above or any(above):
            return ""
    return ("no method's accuracy more than 2 standard errors above the majority class's share of the test set, in "
            "any seed: none has learnt anything measurable")


def learnt_seeds(by_seed: dict[int, Run], accuracies: dict[str, list[float]]) -> list[int] | None:
    r"""The seeds (in order) in which every one of ``accuracies`` (name -> one test accuracy per seed, in seed
    order) is above the test set's majority share by more than 2 standard errors (:func:`_above_majority`);
    None when a run's set-up does not record that share."""
    out = []
    for i, s in enumerate(sorted(by_seed)):
        above = [_above_majority(acc[i], by_seed[s].setup) for acc in accuracies.values()]
        if None in above:
            return None
        if all(above):
            out.append(s)
    return out


def _perfect(baseline: Sequence[float], by_seed: dict[int, Run] | None = None,
             correct: Callable[[Run], object] | None = None, best: float = 1.0) -> tuple[list[float], list | None]:
    r"""A perfect winner against a baseline: per seed ``best - b_s``, and the paired per-example error of a winner
    right on every example, ``std(c_b) / sqrt N`` (:func:`~.verdicts.example_se` against all ones), from the
    baseline's correctness ``correct(run)`` (None where a run lacks it, or without ``by_seed``)."""
    d = [float(best - v) for v in baseline]
    each = [correct(by_seed[s]) for s in sorted(by_seed)] if by_seed is not None and correct is not None else [None]
    if any(c is None for c in each):
        return d, None
    return d, [example_se(np.ones(len(c)), c) for c in each]


def _at_ceiling(comparisons: list[dict]) -> str:
    """What the note says of the comparisons at the ceiling: each perfect winner's interval."""
    return "at the ceiling, even a winner right on every test example would not have won against " + "; ".join(
        f"{c['against']} (it would gain {c['perfect']['mean']:+.3f} [{c['perfect']['low']:+.3f}, "
        f"{c['perfect']['high']:+.3f}] on {c['n']} seeds)" for c in comparisons)
