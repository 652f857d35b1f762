r"""PreLort's segment-wise aggregation: each slot averaged over the clients that have it."""

from __future__ import annotations

from .._validation import check_previous
from ..factors import FactorPair
from ._common import keep_previous, owner_means, prepare

__all__ = ["aggregate_segment"]


def aggregate_segment(pairs, weights=None, *, previous: FactorPair | None = None) -> FactorPair:
    r"""Segment-wise (prefix-nested) aggregation.

    .. math::

        b_i = \frac{\sum_{k: r_k > i} p_k\, b_{k,i}}{\sum_{k: r_k > i} p_k},\qquad
        a_i = \frac{\sum_{k: r_k > i} p_k\, a_{k,i}}{\sum_{k: r_k > i} p_k}

    where ``i`` is a 0-based slot. With distinct ranks ``rho_1 < .. < rho_L``, segment ``l`` (slots
    ``(rho_{l-1}, rho_l]``) is averaged over its contributors ``C_l = {k : r_k >= rho_l}``.
    A slot no client has (``i >= r_max`` when ``previous`` has a larger rank, or owned only by
    zero-weight clients) keeps its ``previous`` value (zero if ``previous`` is None).

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k, common ``(d_out, d_in)``
    weights : array-like, shape (K,), optional
    previous : FactorPair, optional
        The global pair of the last round; the result has rank ``max(r_max, previous.rank)``.

    Returns
    -------
    FactorPair of rank ``r_max`` (or ``previous.rank`` if larger).

    Notes
    -----
    Reconstruction of PreLort's segment-wise rule (paper abstract; rule details ours,
    docs/methods.md#prelort). Equal ranks reduce it to ``fedavg``; a slot owned by one client is
    that client's slot, undiluted; it equals ``replication`` (Byun & Lee 2024) algebraically.

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((1, 1)), np.ones((1, 1))), FactorPair(np.ones((1, 2)), np.ones((2, 1)))]
    >>> aggregate_segment(pairs).B.tolist()  # slot 1 is client 1's own, not diluted
    [[1.0, 1.0]]
    """
    xp, pairs, p = prepare(pairs, weights)
    rank = max(pair.rank for pair in pairs)
    if previous is not None:
        check_previous(xp, previous, pairs[0].shape)
        rank = max(rank, previous.rank)
    B, A, owned = owner_means(xp, pairs, p, rank)
    return keep_previous(xp, FactorPair(B, A), previous, owned)
