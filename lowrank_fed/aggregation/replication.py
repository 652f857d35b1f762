r"""Replication padding (Byun & Lee 2024): fill a client's missing slots with the owners' average."""

from __future__ import annotations

from ..factors import FactorPair
from ._common import owner_means, prepare, weighted_sum

__all__ = ["aggregate_replication"]


def aggregate_replication(pairs, weights=None) -> FactorPair:
    r"""Replication padding, then FedAvg.

    .. math::

        \tilde B_k = [B_k,\ \bar B_{:, r_k:r_{max}}],\quad
        \tilde A_k = [A_k;\ \bar A_{r_k:r_{max}, :}],\qquad
        B = \sum_k p_k \tilde B_k,\quad A = \sum_k p_k \tilde A_k

    where ``bar b_i = sum_{j: r_j > i} p_j b_{j,i} / sum_{j: r_j > i} p_j`` is the weighted mean of
    slot ``i`` over the clients that have it.

    Since the replicated slot is the owners' mean, ``b_i = (sum_{owners} p_k) bar b_i +
    (sum_{others} p_k) bar b_i = bar b_i``: algebraically the ``segment`` rule (tested).

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k
    weights : array-like, shape (K,), optional

    Returns
    -------
    FactorPair of rank ``r_max``.

    Notes
    -----
    Byun & Lee, "Towards Federated Low-Rank Adaptation of Language Models with Rank
    Heterogeneity" (2024). [paper abstract] Which mean fills the gap is our reading: the data-weighted
    mean of the owners.

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((1, 1)), np.ones((1, 1))), FactorPair(np.full((1, 2), 3.0), np.ones((2, 1)))]
    >>> aggregate_replication(pairs).B.tolist()
    [[2.0, 3.0]]
    """
    xp, pairs, p = prepare(pairs, weights)
    r_max = max(pair.rank for pair in pairs)
    B_bar, A_bar, _ = owner_means(xp, pairs, p, r_max)
    filled = [
        FactorPair(
            xp.concat([pair.B, B_bar[:, pair.rank :]], axis=1),
            xp.concat([pair.A, A_bar[pair.rank :, :]], axis=0),
        )
        for pair in pairs
    ]
    return FactorPair(weighted_sum([q.B for q in filled], p), weighted_sum([q.A for q in filled], p))
