r"""HAFL's adaptive rank-1 aggregation: each slot averaged over the clients that updated it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .._validation import check_previous, like, to_numpy
from ..factors import FactorPair
from ._common import keep_previous, prepare, weighted_sum

__all__ = ["aggregate_slotwise", "slot_embedding"]


def slot_embedding(slots: np.ndarray, rank: int) -> np.ndarray:
    r"""One-hot ``E`` of shape ``(len(slots), rank)`` with ``E[j, slots[j]] = 1``.

    ``B_k E`` puts column ``j`` of a compact upload ``B_k`` at global slot ``slots[j]``;
    ``E^T A_k`` does the same for rows of ``A_k``.
    """
    E = np.zeros((len(slots), rank))
    E[np.arange(len(slots)), slots] = 1.0
    return E


def check_slots(slots, ranks: Sequence[int], rank: int | None) -> tuple[list[np.ndarray], int]:
    """Validate per-client slot indices; return them as int arrays and the global rank."""
    if slots is None:
        slots = [np.arange(r) for r in ranks]
    if not isinstance(slots, Sequence) or len(slots) != len(ranks):
        n = len(slots) if isinstance(slots, Sequence) else type(slots).__name__
        raise ValueError(
            f"The 'slots' parameter must list one index array per client: expected {len(ranks)}, got {n}."
        )
    out = []
    for k, (idx, r_k) in enumerate(zip(slots, ranks, strict=True)):
        idx = np.asarray(to_numpy(idx) if not isinstance(idx, (list, tuple, range)) else idx).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"Client {k}: slot indices must be integers. Got dtype {idx.dtype}.")
        idx = idx.astype(np.int64)
        if idx.size != r_k:
            raise ValueError(
                f"Client {k}: {idx.size} slot indices for an upload of rank {r_k}; expected one index "
                "per uploaded column of B (row of A)."
            )
        if np.unique(idx).size != idx.size:
            raise ValueError(f"Client {k}: slot indices must be distinct. Got {idx.tolist()}.")
        if idx.size and idx.min() < 0:
            raise ValueError(f"Client {k}: slot indices must be >= 0. Got {idx.tolist()}.")
        out.append(idx)
    needed = max((int(idx.max()) + 1 for idx in out if idx.size), default=0)
    if rank is None:
        rank = needed
    elif needed > rank:
        k = next(k for k, idx in enumerate(out) if idx.size and idx.max() >= rank)
        raise ValueError(
            f"Client {k}: slot index {int(out[k].max())} is out of range for the global rank {rank}; "
            f"expected indices in [0, {rank - 1}]."
        )
    return out, rank


def aggregate_slotwise(
    pairs,
    weights=None,
    *,
    slots=None,
    previous: FactorPair | None = None,
    absent: Literal["skip", "zero", "previous"] = "skip",
) -> FactorPair:
    r"""Rank-1-level adaptive aggregation.

    .. math::

        b_i = \frac{\sum_{k \in U_i} p_k\, b_{k,i}}{\sum_{k \in U_i} p_k},\qquad
        a_i = \frac{\sum_{k \in U_i} p_k\, a_{k,i}}{\sum_{k \in U_i} p_k},\qquad
        U_i = \{k : i \in \text{slots}_k\}

    where ``b_{k,i}`` is client ``k``'s column for global slot ``i``, and ``b_i, a_i`` keep their
    ``previous`` value when ``U_i`` is empty (nobody updated slot ``i``).

    ``absent`` says what a client that did not update slot ``i`` counts as there. ``"skip"`` (the rule
    above): nothing. ``"zero"``: a zero, so each denominator is the total weight ``sum_k p_k = 1`` and slot
    ``i`` is the adaptive one times its owners' share ``c_i = sum_{k in U_i} p_k`` in both factors:
    zero-padding at the given slots, the rule the adaptive average is claimed to beat; with prefix slots
    and no ``previous`` it is ``zero_pad``'s (data weighting). ``"previous"``: the previous global value,

    .. math:: b_i = \sum_{k \in U_i} p_k\, b_{k,i} + (1 - c_i)\, b^{prev}_i
                  = b^{prev}_i + \sum_{k \in U_i} p_k\, (b_{k,i} - b^{prev}_i),\qquad a_i \text{ likewise},

    the factor-wise FedAvg of every client's whole held adapter when the clients that did not update a
    slot hold it at ``previous`` (HAFL's freezing): each update diluted, the values not. Under every
    choice a slot nobody updated keeps ``previous``.

    Parameters
    ----------
    pairs : list of FactorPair
        Compact uploads: client ``k`` sends ``B_k`` shape ``(d_out, |slots_k|)`` and ``A_k`` shape
        ``(|slots_k|, d_in)``, column ``j`` being global slot ``slots[k][j]``.
    weights : array-like, shape (K,), optional
    slots : list of int arrays, optional
        Global slot indices per client (any order, distinct). Default: the prefix
        ``range(r_k)``, which makes this rule ``segment``.
    previous : FactorPair, optional
        Last global pair; fixes the global rank ``R = previous.rank`` and supplies the slots
        nobody updated. Without it ``R = 1 + max slot index`` and such slots are zero.
    absent : "skip" | "zero" | "previous"
        What a client that did not update a slot counts as there (above). ``"previous"`` needs ``previous``.

    Returns
    -------
    FactorPair of rank R.

    Notes
    -----
    Reconstruction of HAFL's adaptive rank-1 aggregation (paper abstract; details ours,
    docs/methods.md#hafl). Unlike ``zero_pad`` it never dilutes a slot by clients that did not
    train it.

    Examples
    --------
    >>> import numpy as np
    >>> prev = FactorPair(np.zeros((1, 3)), np.zeros((3, 1)))
    >>> ups = [FactorPair(np.array([[2.0]]), np.ones((1, 1))), FactorPair(np.array([[4.0, 6.0]]), np.ones((2, 1)))]
    >>> aggregate_slotwise(ups, slots=[[2], [2, 0]], previous=prev).B.tolist()
    [[6.0, 0.0, 3.0]]
    """
    if absent not in ("skip", "zero", "previous"):
        raise ValueError(f"absent must be 'skip', 'zero' or 'previous'. Got {absent!r}.")
    if absent == "previous" and previous is None:
        raise ValueError("absent='previous' counts a client that did not update a slot as the previous global "
                         "value, so it needs previous=; got previous=None.")
    xp, pairs, p = prepare(pairs, weights)
    if previous is not None:
        check_previous(xp, previous, pairs[0].shape)
    slots, rank = check_slots(slots, [pair.rank for pair in pairs], previous.rank if previous is not None else None)
    embeddings = [slot_embedding(idx, rank) for idx in slots]
    cover = sum(pk * E.sum(axis=0) for pk, E in zip(p, embeddings, strict=True))  # c_i = sum_{k in U_i} p_k
    owned = cover > 0
    # "zero" and "previous" divide by sum_k p_k = 1 (prepare normalises the weights), "skip" by c_i
    den = np.where(owned, cover, 1.0) if absent == "skip" else np.ones(rank)
    inv = like(xp, np.where(owned, 1.0 / den, 0.0), pairs[0].B)
    Es = [like(xp, E, pairs[0].B) for E in embeddings]
    B = weighted_sum([pair.B @ E for pair, E in zip(pairs, Es, strict=True)], p) * inv[None, :]
    A = weighted_sum([xp.permute_dims(E, (1, 0)) @ pair.A for pair, E in zip(pairs, Es, strict=True)], p)
    A = A * inv[:, None]
    if absent == "previous":  # + (1 - c_i) times the previous value on the owned slots
        rest = like(xp, np.where(owned, 1.0 - cover, 0.0), pairs[0].B)
        B, A = B + previous.B * rest[None, :], A + previous.A * rest[:, None]
    return keep_previous(xp, FactorPair(B, A), previous, owned)
