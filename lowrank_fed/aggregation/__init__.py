r"""Server aggregation rules for heterogeneous-rank LoRA, one module per rule.

Every rule is a pure function ``aggregate_<rule>(pairs, weights=None, *, ...) -> FactorPair``
registered in :data:`AGGREGATORS`; :func:`aggregate` dispatches by name.

========== ============================================== ===================================
name       rule                                           exact ``sum_k p_k B_k A_k``?
========== ============================================== ===================================
fedavg     ``B = sum p_k B_k``, ``A = sum p_k A_k``        no
zero_pad   pad to ``r_max``, then fedavg                   no (slot i diluted)
replication pad with the owners' mean, then fedavg         no (== segment)
segment    slot i averaged over clients with ``r_k > i``   no
slotwise   slot i averaged over the clients that updated   no
stack      ``[B_1..B_K]``, ``[p_1 A_1; ..; p_K A_K]``      yes
svd        SVD of the sum (optionally truncated)          yes without ``rank``
========== ============================================== ===================================
"""

from __future__ import annotations

from collections.abc import Callable

from ..factors import FactorPair
from ._common import keep_slots, weighted_average
from .alternating import alternating_update, select_slots
from .fedavg import aggregate_fedavg
from .replication import aggregate_replication
from .segment import aggregate_segment
from .slotwise import aggregate_slotwise
from .stack import aggregate_stack
from .svd import aggregate_svd, redistribute
from .zero_pad import aggregate_zero_pad

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "aggregate_fedavg",
    "aggregate_zero_pad",
    "aggregate_replication",
    "aggregate_segment",
    "aggregate_slotwise",
    "aggregate_stack",
    "aggregate_svd",
    "alternating_update",
    "select_slots",
    "redistribute",
    "keep_slots",
    "weighted_average",
]

AGGREGATORS: dict[str, Callable[..., FactorPair]] = {
    "fedavg": aggregate_fedavg,
    "zero_pad": aggregate_zero_pad,
    "replication": aggregate_replication,
    "segment": aggregate_segment,
    "slotwise": aggregate_slotwise,
    "stack": aggregate_stack,
    "svd": aggregate_svd,
}


def aggregate(method: str, pairs, weights=None, **options) -> FactorPair:
    r"""Aggregate client updates with the rule named ``method``.

    Parameters
    ----------
    method : str
        A key of :data:`AGGREGATORS`.
    pairs : list of FactorPair
        One update per client, ``B_k`` shape ``(d_out, r_k)``, ``A_k`` shape ``(r_k, d_in)``.
    weights : array-like, shape (K,), optional
        Non-negative with a positive sum; normalised internally; uniform if None.
    **options
        Keyword options of the rule (``weighting``, ``previous``, ``slots``, ``rank``).

    Raises
    ------
    ValueError
        For an unknown ``method`` (the message lists the valid names) or invalid input.

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((3, 1)), np.ones((1, 2))), FactorPair(np.ones((3, 2)), np.ones((2, 2)))]
    >>> aggregate("stack", pairs).rank, aggregate("segment", pairs).rank
    (3, 2)
    """
    try:
        rule = AGGREGATORS[method]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown aggregation method {method!r}; expected one of {sorted(AGGREGATORS)}.") from None
    return rule(pairs, weights, **options)
