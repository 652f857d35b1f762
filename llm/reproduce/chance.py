r"""Whether a method has learnt anything measurable: the condition a claim on trained models needs.

A score at or below always answering the test set's majority class is no sign of learning. A claim about trained
models (LoRA-A2's accuracies, Byun & Lee's drop at aggregation) compared with a model that has not left it says which
one leaves chance first, not what the claim says; each such claim states which of its models must have learnt
(:func:`learnt_seeds`). Not a general rule: where a method's collapse is the effect measured (FedAvg of contaminated
clients under CLAIR's claims) a model at chance is a result, and only ``_near_chance`` (nothing learnt at all) applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .runs import Run

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
