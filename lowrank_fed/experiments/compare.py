r"""Side-by-side comparison of the aggregation rules on synthetic heterogeneous clients.

For each rule: the rank of the global update, its exactness error against the true weighted
sum ``sum_k p_k B_k A_k``, the bytes of the result, and the server time. Used by
``lowrank-fed compare`` (and ``make demo`` until the torch main job is the default) and by the
notebooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..aggregation import AGGREGATORS, aggregate
from ..factors import FactorPair
from ..linalg import factored_svd, product_fro_norm

__all__ = ["heterogeneous_clients", "compare_rules", "RuleRow", "FLORA_RANKS"]

FLORA_RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)


@dataclass(frozen=True)
class RuleRow:
    rule: str
    rank: int
    rel_error: float  # ||B A - sum_k p_k B_k A_k||_F / ||sum_k p_k B_k A_k||_F
    mean_dilution: float  # mean over slots of ||b_i|| / ||segment b_i||: 1 = not diluted
    bytes: int
    seconds: float
    note: str = ""


def heterogeneous_clients(
    ranks=FLORA_RANKS, d_out: int = 1024, d_in: int = 1024, *, spread: float = 0.3, seed: int = 0
):
    r"""Client updates with a shared prefix-ordered structure and client-specific deviations.

    ``B_k = (B* + spread E_k)[:, :r_k] diag(decay)``, ``A_k = (A* + spread F_k)[:r_k]``, where
    ``B*``, ``A*`` are shared and ``decay_i = 1 / sqrt(1 + i)`` makes early slots carry more of the
    update (as prefix-nested training intends). Returns ``(pairs, weights)`` with data sizes as weights.
    """
    rng = np.random.default_rng(seed)
    r_max = max(ranks)
    decay = 1.0 / np.sqrt(1.0 + np.arange(r_max))
    B_star = rng.normal(size=(d_out, r_max)) / np.sqrt(d_out)
    A_star = rng.normal(size=(r_max, d_in)) / np.sqrt(d_in)
    pairs = []
    for r in ranks:
        B = (B_star + spread * rng.normal(size=B_star.shape) / np.sqrt(d_out))[:, :r] * decay[:r]
        A = (A_star + spread * rng.normal(size=A_star.shape) / np.sqrt(d_in))[:r]
        pairs.append(FactorPair(B, A))
    weights = rng.integers(100, 1000, size=len(ranks)).astype(float)
    return pairs, weights


def _rel_error(out: FactorPair, target: FactorPair) -> float:
    """Relative Frobenius error ``||BA - T||/||T||`` of the stacked difference ``[B, -Tb] [A; Ta]``.

    The norm is that of the singular values from :func:`factored_svd` (QR-based, accurate to
    rounding), not the Gram-trace formula, whose cancellation would floor it near ``sqrt(eps)``.
    """
    diff = FactorPair(np.concatenate([out.B, -target.B], axis=1), np.concatenate([out.A, target.A], axis=0))
    return float(np.linalg.norm(factored_svd([diff])[1])) / product_fro_norm(target)


def compare_rules(pairs, weights, *, repeats: int = 3) -> list[RuleRow]:
    """Run every rule of :data:`AGGREGATORS` on the same clients and measure it."""
    target = aggregate("stack", pairs, weights)  # exact sum, as a factor pair
    segment = aggregate("segment", pairs, weights)
    equal = len({pair.rank for pair in pairs}) == 1
    rows = []
    for name in sorted(AGGREGATORS):
        options = {"weighting": "frobenius"} if name == "zero_pad" else {}
        if name == "fedavg" and not equal:
            rows.append(RuleRow(name, 0, float("nan"), float("nan"), 0, float("nan"), "needs equal ranks"))
            continue
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = aggregate(name, pairs, weights, **options)
            times.append(time.perf_counter() - start)
        r = min(out.rank, segment.rank)
        ratios = np.linalg.norm(out.B[:, :r], axis=0) / np.maximum(np.linalg.norm(segment.B[:, :r], axis=0), 1e-300)
        dilution = float(np.mean(ratios)) if name not in ("stack", "svd") else float("nan")
        note = "weighting=frobenius (HetLoRA)" if name == "zero_pad" else ""
        rows.append(
            RuleRow(name, out.rank, _rel_error(out, target), dilution, out.B.nbytes + out.A.nbytes, min(times), note)
        )
    return rows
