r"""Shared arithmetic of the aggregation rules: weighted sums and slot ownership.

Each rule module validates its inputs once through :func:`prepare` and builds on these pure
functions; nothing here is a rule by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._validation import as_weights, check_pairs, like
from ..factors import FactorPair, pad

__all__ = ["prepare", "weighted_sum", "owner_means", "ranks_of"]


def prepare(pairs: Sequence[FactorPair], weights, *, equal_ranks: bool = False):
    """Validate client pairs and weights; return ``(xp, pairs, p)`` with ``p`` normalised (NumPy)."""
    xp, pairs = check_pairs(pairs, equal_ranks=equal_ranks)
    return xp, pairs, as_weights(weights, len(pairs))


def ranks_of(pairs: Sequence[FactorPair]) -> np.ndarray:
    return np.array([pair.rank for pair in pairs], dtype=np.int64)


def weighted_sum(arrays, p):
    r"""``sum_k p_k X_k`` for arrays of one shape."""
    total = arrays[0] * float(p[0])
    for x, pk in zip(arrays[1:], p[1:], strict=True):
        total = total + x * float(pk)
    return total


def owner_means(xp, pairs, p, rank: int):
    r"""Per-slot weighted means over the clients that own the slot.

    .. math::

        \bar b_i = \frac{\sum_{k: r_k > i} p_k b_{k,i}}{\sum_{k: r_k > i} p_k},
        \qquad \bar a_i \text{ likewise},\qquad i < \text{rank}

    Returns
    -------
    B : array, shape (d_out, rank); A : array, shape (rank, d_in)
        Slots nobody owns (or only zero-weight clients own) are zero.
    owned : NumPy bool array, shape (rank,)
        Whether slot ``i`` has a positive owner weight.
    """
    ranks = ranks_of(pairs)
    slot = np.arange(rank)
    den = ((ranks[:, None] > slot[None, :]) * p[:, None]).sum(axis=0)  # sum_{k: r_k > i} p_k
    owned = den > 0
    inv = np.where(owned, 1.0 / np.where(owned, den, 1.0), 0.0)
    padded = [pad(pair, rank) for pair in pairs]
    scale = like(xp, inv, pairs[0].B)
    B = weighted_sum([q.B for q in padded], p) * scale[None, :]
    A = weighted_sum([q.A for q in padded], p) * scale[:, None]
    return B, A, owned


def keep_previous(xp, new: FactorPair, previous: FactorPair | None, owned: np.ndarray) -> FactorPair:
    r"""Slot ``i`` from ``new`` where ``owned[i]``, else from ``previous`` (zero if there is none)."""
    if previous is None:
        return new
    rank = new.rank
    prev = pad(previous, rank) if previous.rank < rank else previous
    keep = like(xp, owned.astype(np.float64), new.B)
    B = new.B * keep[None, :] + prev.B * (1.0 - keep)[None, :]
    A = new.A * keep[:, None] + prev.A * (1.0 - keep)[:, None]
    return FactorPair(B, A)
