r"""Shared arithmetic of the aggregation rules: weighted sums and slot ownership.

Each rule module validates its inputs once through :func:`prepare` and builds on these pure
functions; nothing here is a rule by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._validation import as_weights, check_pairs, check_previous, like, namespace
from ..factors import FactorPair, pad

__all__ = ["prepare", "weighted_sum", "weighted_average", "owner_means", "ranks_of", "keep_previous", "keep_slots"]


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


def weighted_average(arrays, weights=None):
    r"""``sum_k p_k X_k`` with ``p_k = w_k / sum_j w_j`` (uniform when ``weights`` is None).

    For any per-client arrays of one shape (a classifier head, a bias): the FedAvg of non-LoRA weights.

    Examples
    --------
    >>> import numpy as np
    >>> weighted_average([np.zeros(2), np.ones(2)], [1, 3]).tolist()
    [0.75, 0.75]
    """
    if not arrays:
        raise ValueError("The 'arrays' parameter must hold at least one array. Got 0.")
    return weighted_sum(list(arrays), as_weights(weights, len(arrays)))


def keep_slots(new: FactorPair, previous: FactorPair, held: int) -> FactorPair:
    r"""Slots ``i < held`` from ``new`` (zero past ``new.rank``), slots ``i >= held`` from ``previous``.

    .. math:: b_i = \begin{cases} b^{new}_i & i < h \\ b^{prev}_i & i \ge h \end{cases},\qquad a_i \text{ likewise}

    where ``h = held`` is the largest rank any participant of the round held: a slot some participant
    held takes the rule's value (zero when every holder pruned it, as a HetLoRA client may), a slot no
    participant held keeps its previous global value. The result has rank ``max(new.rank, previous.rank, held)``.

    Examples
    --------
    >>> import numpy as np
    >>> new, prev = FactorPair(np.ones((1, 1)), np.ones((1, 1))), FactorPair(np.full((1, 3), 2.0), np.full((3, 1), 2.0))
    >>> keep_slots(new, prev, 2).B.tolist()  # slot 1 held but pruned by all: zero; slot 2 nobody held: kept
    [[1.0, 0.0, 2.0]]
    """
    xp = namespace(new.B, new.A, previous.B, previous.A)
    check_previous(xp, previous, new.shape)
    rank = max(new.rank, previous.rank, int(held))
    owned = np.arange(rank) < int(held)
    return keep_previous(xp, pad(new, rank), pad(previous, rank), owned)
