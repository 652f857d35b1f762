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

import os
from collections.abc import Callable, Mapping, Sequence

from ..factors import FactorPair
from ..linalg import one_blas_thread
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
    "aggregate_modules",
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


def aggregate_modules(method: str, modules: Mapping[str, Sequence[FactorPair]], weights=None, *,
                      workers: int | None = None, **options) -> dict[str, FactorPair]:
    r"""``{m: aggregate(method, modules[m], weights_m, **options)}`` for every module of a model, in parallel.

    The modules are independent, so they are spread over ``workers`` threads (default: the CPU count,
    at most 8); each thread's BLAS runs on one thread (:func:`~lowrank_fed.linalg.one_blas_thread`), so the
    pools do not fight.
    LAPACK and the array libraries release the GIL, and each module's result is what a serial call
    gives (the same operations on the same inputs).

    Parameters
    ----------
    method : str
        A key of :data:`AGGREGATORS`.
    modules : mapping module -> list of FactorPair
        Each module's client updates.
    weights : array-like of shape (K,), mapping module -> weights, or None
        One weight list for every module, or one per module (when the modules have different holders).
    workers : int, optional
        Threads; 1 runs serially.

    Examples
    --------
    >>> import numpy as np
    >>> mods = {m: [FactorPair(np.ones((3, 1)), np.ones((1, 2)))] * 2 for m in ("q", "v")}
    >>> {m: p.rank for m, p in aggregate_modules("stack", mods, workers=2).items()}
    {'q': 2, 'v': 2}
    """
    from concurrent.futures import ThreadPoolExecutor

    names = list(modules)
    per_module = isinstance(weights, Mapping)

    def one(m):
        return aggregate(method, modules[m], weights[m] if per_module else weights, **options)

    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"The 'workers' parameter must be a positive int. Got {workers}.")
    if workers == 1 or len(names) < 2:
        return {m: one(m) for m in names}
    with one_blas_thread(), ThreadPoolExecutor(max_workers=min(workers, len(names))) as pool:
        return dict(zip(names, pool.map(one, names)))
