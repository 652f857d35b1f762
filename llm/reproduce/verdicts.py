r"""Verdicts from paired comparisons over seeds.

Methods run on the same seed share the split, the partition, the client ranks and the batches, so a claim is read
from the per-seed **paired** difference ``d_s`` (the claimed winner's score minus one baseline's, a drop, a saving)
and its Student-t interval over the ``n`` seeds:

.. math:: \bar d \pm t_{0.975,\, n-1}\, \frac{s_d}{\sqrt n},\qquad
          s_d^2 = \frac{1}{n-1} \sum_s (d_s - \bar d)^2,

where ``t_{0.975, n-1}`` is the 97.5% quantile of Student's t with ``n - 1`` degrees of freedom (a 95% interval
that treats the seeds as independent draws and their differences as roughly normal); ``s_d`` is floored at the
test sets' own noise where the runs recorded it (:func:`paired`). Against a threshold ``tol``
(0 for "better than"; a stated tolerance for "at least as good" or for counts):

- **holds**: the interval lies above ``tol``;
- **does not hold**: it lies below ``tol``;
- **tie**: it covers ``tol`` (the seeds cannot tell; with fewer than :data:`ADVISE_BELOW` seeds the report
  says :data:`ADD_SEEDS`);
- **too few seeds**: fewer than :data:`MIN_SEEDS` seeds, no verdict;
- **not testable here** (at the ceiling, :data:`CEILING`): a tie on at least :data:`ADVISE_BELOW` seeds (the
  protocol's most; a tie on fewer asks for seeds instead) that even a perfect winner would not have won: the same
  comparison with the winner at the best score there is on every test example (an accuracy of 1: ``d_s = 1 - b_s``,
  its per-example error that of the baseline's correctness alone) does not hold either;
- **depends on the scale convention** (:data:`DEPENDS`): set by the twins' agreement rule (:mod:`.twins`) where a
  claim measured under both ``lora_scaling`` conventions (a config and its constant twin) gets two different
  verdicts; neither is published.

A claim against several baselines is decided pairwise, against each (:func:`combine`), never against the best of
them per seed: with 200 test examples (a standard error of about 0.025) the best of five equal methods beats any
one of them by about 0.03, so "above the best" reads a true tie as a loss. Under an exact tie each pairwise
interval falls below zero with probability 0.025, so a claim against five baselines reads "does not hold" with
probability at most ``1 - 0.975^5``, about 0.12 (the test of this module simulates it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["VERDICTS", "DEPENDS", "CEILING", "MIN_SEEDS", "ADVISE_BELOW", "ADD_SEEDS", "LEVEL", "mean_sd", "paired",
           "verdict", "combine", "advice", "example_se", "proportion", "exact", "sign_count", "not_run"]

#: The verdict of a claim whose two scale conventions (a config and its constant twin) disagree (:mod:`.twins`).
DEPENDS = "depends on the scale convention"
#: Every verdict a claim can carry. "not testable here" is set by a claim's analysis, which states why;
#: "not run yet" by a claim whose runs do not exist (or predate what it needs); :data:`DEPENDS` by the twins' rule.
VERDICTS = ("holds", "tie", "does not hold", "too few seeds", "not testable here", "not run yet", DEPENDS)
#: Why a tie is "not testable here" when even a perfect winner would not have won (:func:`paired`'s ``perfect``).
CEILING = "at the ceiling"
#: Fewer seeds than this: no verdict.
MIN_SEEDS = 3
#: A tie with fewer seeds than this asks for more seeds.
ADVISE_BELOW = 5
ADD_SEEDS = "add seeds (interval straddles zero)"
#: The interval's coverage.
LEVEL = 0.95


def mean_sd(values: Sequence[float]) -> dict:
    """``{"mean", "sd", "n"}``: the mean and the sample standard deviation (None for one value)."""
    x = np.asarray([float(v) for v in values], dtype=float)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else None, "n": int(len(x))}


def paired(differences: Sequence[float], tol: float = 0.0, *, against: str = "",
           se: Sequence[float] | None = None,
           perfect: tuple[Sequence[float], Sequence[float] | None] | None = None) -> dict:
    r"""The paired comparison of one claim against one baseline: its interval over seeds and its verdict.

    With ``se`` (per seed, the paired standard error of ``d_s`` over that seed's test examples, :func:`example_se`)
    the interval's spread is floored at the test sets' noise,

    .. math:: s = \max\Bigl(s_d,\ \sqrt{\tfrac1n \textstyle\sum_s \mathrm{se}_s^2}\Bigr),

    since each ``d_s`` carries its own test set's sampling error, ``Var(d_s) >= E[se_s^2]``, while a few seeds'
    ``s_d`` can fall below it by chance: accuracies lie on a grid of ``1/N``, so three seeds may differ by the
    same one example each, ``s_d = 0``, which without the floor is an interval of width 0 and "holds". The floor
    only widens an interval (its coverage stays at least ``LEVEL``).

    Parameters
    ----------
    differences : sequence of float, one per seed
        ``d_s``, signed so that a positive value favours the claim (winner minus baseline, a drop, a saving).
    tol : float
        The threshold the interval is compared with (0: "better than"; negative: "at least as good within
        ``-tol``").
    against : str
        What the claim is compared with (a method's name, a rank), for the report.
    perfect : (differences, se), optional
        The same comparison for a winner at the best score there is on every example (an accuracy: ``1 - b_s`` per
        seed, and ``se`` the baseline's per-example error, :func:`example_se` against all ones, or None). A tie on
        at least :data:`ADVISE_BELOW` seeds whose perfect counterpart does not hold either could not have held
        whatever the winner scored: its verdict is "not testable here" (:data:`CEILING`). On fewer seeds the tie
        stands (:func:`advice` asks for seeds: the interval narrows as ``1/sqrt n``).

    Returns
    -------
    dict
        ``against``, ``differences``, ``mean``, ``sd`` (None for one seed), ``n``, ``low``, ``high`` (the
        interval; None below 2 seeds), ``level``, ``tol``, ``verdict``; with ``se``, ``example_se`` (the values)
        and ``sd_floor`` (their root mean square above; the interval used it where it exceeds ``sd``); with
        ``perfect``, ``perfect`` (that comparison's ``mean``, ``low``, ``high``, ``verdict``, where it was made) and
        ``ceiling`` (whether the rule above made the verdict).

    Raises
    ------
    ValueError
        No differences, a difference that is not finite, or ``se`` not one finite value >= 0 per seed.
    """
    d = np.asarray([float(v) for v in differences], dtype=float)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"The 'differences' against {against or 'the baseline'} must be finite and at least one; "
                         f"got {d.tolist()}.")
    n, mean = int(d.size), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else None
    floor = 0.0
    if se is not None:
        e = np.asarray([float(v) for v in se], dtype=float)
        if e.shape != d.shape or not np.all(np.isfinite(e)) or np.any(e < 0):
            raise ValueError(f"The per-seed 'se' against {against or 'the baseline'} must be one finite value >= 0 "
                             f"per difference ({n}); got {e.tolist()}.")
        floor = float(np.sqrt(np.mean(e ** 2)))
    low = high = None
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.5 + LEVEL / 2, n - 1)) * max(sd, floor) / math.sqrt(n)
        low, high = mean - half, mean + half
    if n < MIN_SEEDS:
        word = "too few seeds"
    elif low > tol:
        word = "holds"
    elif high < tol:
        word = "does not hold"
    else:
        word = "tie"
    best = None
    if word == "tie" and perfect is not None and n >= ADVISE_BELOW:
        best = {k: v for k, v in paired(perfect[0], tol, se=perfect[1]).items()
                if k in ("mean", "low", "high", "verdict")}
    ceiling = best is not None and best["verdict"] != "holds"
    if ceiling:
        word = "not testable here"
    out = {"against": against, "differences": d.tolist(), "mean": mean, "sd": sd, "n": n, "low": low, "high": high,
           "level": LEVEL, "tol": float(tol), "verdict": word}
    if se is not None:
        out.update(example_se=e.tolist(), sd_floor=floor)
    if perfect is not None:
        out.update(perfect=best, ceiling=ceiling)
    return out


def verdict(differences: Sequence[float], tol: float = 0.0) -> str:
    """The verdict of :func:`paired`: holds, tie, does not hold or too few seeds."""
    return paired(differences, tol)["verdict"]


def combine(verdicts: Iterable[str]) -> str:
    r"""A claim's verdict from its pairwise ones: it holds only if it holds against each.

    In order: "not run yet" or "not testable here" if any comparison is; "too few seeds" if any is;
    :data:`DEPENDS` if any is; "does not hold" if the claim is below any baseline; "holds" if it holds against every
    one; otherwise "tie".
    """
    words = list(verdicts)
    unknown = sorted(set(words) - set(VERDICTS))
    if not words or unknown:
        raise ValueError(f"The 'verdicts' must be a non-empty list of {list(VERDICTS)}; got {words}.")
    for word in ("not run yet", "not testable here", "too few seeds", DEPENDS, "does not hold"):
        if word in words:
            return word
    return "holds" if all(w == "holds" for w in words) else "tie"


def advice(comparisons: Iterable[dict]) -> str:
    """:data:`ADD_SEEDS` when the claim is a tie and one of its tied comparisons has fewer than 5 seeds; else ``""``."""
    comparisons = list(comparisons)
    tied = [c for c in comparisons if c["verdict"] == "tie"]
    if combine(c["verdict"] for c in comparisons) == "tie" and any(c["n"] < ADVISE_BELOW for c in tied):
        return ADD_SEEDS
    return ""


def example_se(correct_a, correct_b) -> float:
    r"""The paired standard error over test examples of one seed's accuracy difference.

    .. math:: \mathrm{se} = \frac{\operatorname{std}(c_a - c_b)}{\sqrt N}

    where ``c_a, c_b`` (shape ``(N,)``, 0 or 1) are the two models' per-example correctness on the same ``N``
    test examples (or, for what a group of clients receives, each example's mean over their downloads). It measures the noise of one seed's test set only, not of training; the verdict's interval
    is over seeds, which holds both.
    """
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"The per-example correctness must be two vectors of one length >= 2; got shapes "
                         f"{a.shape} and {b.shape}.")
    return float((a - b).std(ddof=1) / math.sqrt(a.size))


def proportion(successes: Sequence[bool], threshold: float, *, seeds: int, against: str = "") -> dict:
    r"""A 0/1 outcome (one per seed and round): the count ``k`` of ``n`` and its Clopper-Pearson 95% interval.

    .. math:: [p_-, p_+]:\quad P(\mathrm{Bin}(n, p_-) \ge k) = 0.025,\quad P(\mathrm{Bin}(n, p_+) \le k) = 0.025

    (``scipy.stats.binomtest(k, n).proportion_ci(0.95, "exact")``; exact for any ``n``, never outside [0, 1]).
    **holds** if the interval lies above ``threshold``, **does not hold** if below, **tie** if it covers it;
    **too few seeds** when the outcomes come from fewer than :data:`MIN_SEEDS` seeds (``seeds``). The trials are
    counted as independent (rounds of one run are not quite: the count is a description, the interval a guide).

    Returns
    -------
    dict
        As :func:`paired` (``differences`` are the 0/1 outcomes, ``mean`` the share ``k / n``) with ``kind``
        ``"proportion"``, ``k`` and ``n``.
    """
    x = [bool(v) for v in successes]
    if not x:
        raise ValueError(f"The outcomes counted against {against or 'the threshold'} must be at least one; got none.")
    from scipy.stats import binomtest

    k, n = sum(x), len(x)
    ci = binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="exact")
    low, high = float(ci.low), float(ci.high)
    word = ("too few seeds" if seeds < MIN_SEEDS else "holds" if low > threshold
            else "does not hold" if high < threshold else "tie")
    return {"against": against, "kind": "proportion", "differences": [float(v) for v in x], "k": k, "n": n,
            "mean": k / n, "sd": None, "low": low, "high": high, "level": LEVEL, "tol": float(threshold),
            "verdict": word}


def exact(values: Sequence[float], tol: float = 0.0, *, against: str = "") -> dict:
    r"""A deterministic quantity (bytes, upload fractions) per seed: no interval, the numbers themselves.

    **holds** if every seed's value is above ``tol``, **does not hold** if any is below, **tie** (equal) otherwise.
    A zero-width t interval over seeds would suggest a precision that is really an identity.
    """
    d = np.asarray([float(v) for v in values], dtype=float)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"The exact values against {against or 'the threshold'} must be finite and at least one; "
                         f"got {d.tolist()}.")
    word = "does not hold" if np.any(d < tol) else "holds" if np.all(d > tol) else "tie"
    return {"against": against, "kind": "exact", "differences": d.tolist(), "mean": float(d.mean()), "sd": None,
            "n": int(d.size), "low": None, "high": None, "level": None, "tol": float(tol), "verdict": word}


def sign_count(differences: Sequence[float], *, against: str = "") -> dict:
    r"""Integer outcomes per seed (rounds to a target, capped at ``rounds + 1``): a sign count, no t interval.

    The seeds with ``d_s > 0`` (``k_+``) and ``d_s < 0`` (``k_-``) are counted, ties dropped; under "no
    difference" ``k_+ ~ Bin(k_+ + k_-, 1/2)``. **holds** if the two-sided sign test's p-value is below 0.05 with
    ``k_+ > k_-``, **does not hold** if below with ``k_+ < k_-``, **tie** otherwise (fewer than 6 untied seeds can
    never decide: ``2 / 2^5 > 0.05``). A capped integer with a few values is neither normal nor continuous, which a
    t interval assumes.
    """
    d = [float(v) for v in differences]
    if not d or not all(math.isfinite(v) for v in d):
        raise ValueError(f"The differences against {against or 'the baseline'} must be finite and at least one; "
                         f"got {d}.")
    from scipy.stats import binomtest

    up, down = sum(v > 0 for v in d), sum(v < 0 for v in d)
    p = float(binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0
    word = ("too few seeds" if len(d) < MIN_SEEDS else "holds" if p < 1 - LEVEL and up > down
            else "does not hold" if p < 1 - LEVEL else "tie")
    return {"against": against, "kind": "sign", "differences": d, "mean": float(np.mean(d)), "sd": None,
            "n": len(d), "low": None, "high": None, "level": LEVEL, "tol": 0.0, "k_plus": up, "k_minus": down,
            "p_value": p, "verdict": word}


def not_run(against: str, missing: str) -> dict:
    """A comparison whose baseline has no runs: no numbers, verdict "not run yet"."""
    return {"against": against, "kind": "not run", "differences": [], "mean": None, "sd": None, "n": 0,
            "low": None, "high": None, "level": None, "tol": 0.0, "verdict": "not run yet", "missing": missing}
