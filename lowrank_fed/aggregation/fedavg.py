r"""FedIT ("FL + LoRA"): factor-wise FedAvg of equal-rank adapters."""

from __future__ import annotations

from ..factors import FactorPair
from ._common import prepare, weighted_sum

__all__ = ["aggregate_fedavg"]


def aggregate_fedavg(pairs, weights=None) -> FactorPair:
    r"""Average each factor separately.

    .. math:: B = \sum_k p_k B_k, \qquad A = \sum_k p_k A_k

    where ``p_k = w_k / sum_j w_j``. Not exact: ``B A != sum_k p_k B_k A_k`` in general (the
    cross terms ``p_j p_k B_j A_k`` appear).

    Parameters
    ----------
    pairs : list of FactorPair, all of rank r
        ``B_k`` shape ``(d_out, r)``, ``A_k`` shape ``(r, d_in)``.
    weights : array-like, shape (K,), optional
        Non-negative client weights (``n_k`` in FedAvg); uniform if None.

    Returns
    -------
    FactorPair of rank r.

    Raises
    ------
    ValueError
        If the ranks differ (the message names the client), or any input is invalid.

    Notes
    -----
    FedIT (Zhang et al., ICASSP 2024); the baseline of every paper here. [paper]

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((2, 1)), np.ones((1, 2))), FactorPair(np.zeros((2, 1)), np.ones((1, 2)))]
    >>> aggregate_fedavg(pairs).B.ravel().tolist()
    [0.5, 0.5]
    """
    _, pairs, p = prepare(pairs, weights, equal_ranks=True)
    return FactorPair(weighted_sum([q.B for q in pairs], p), weighted_sum([q.A for q in pairs], p))
