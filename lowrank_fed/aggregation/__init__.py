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
import time
from collections.abc import Callable, Mapping, Sequence

from ..factors import FactorPair
from ..cholesky_qr import one_blas_thread
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
    "ModuleError",
    "available_cores",
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


class ModuleError(ValueError):
    """A module :func:`aggregate_modules` could not aggregate: ``module`` names it, ``error`` is the
    ValueError its rule raised; the message is ``module '<name>': <the rule's message>``."""

    def __init__(self, module: str, error: ValueError):
        super().__init__(f"module {module!r}: {error}")
        self.module, self.error = module, error

    def __reduce__(self):  # pickled with what it was made of (a worker process may send it)
        return type(self), (self.module, self.error)


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask where the OS has one, else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def aggregate_modules(method: str, modules: Mapping[str, Sequence[FactorPair]], weights=None, *,
                      workers: int | None = None, module_options: Mapping[str, Mapping] | None = None,
                      seconds: dict | None = None, **options) -> dict[str, FactorPair]:
    r"""``{m: aggregate(method, modules[m], w_m, **options_m)}`` for every module of a model, in parallel.

    ``w_m`` is ``weights[m]`` when ``weights`` is a mapping, else ``weights``; ``options_m`` is ``options``
    updated with ``module_options.get(m, {})``.

    The modules are independent, so they are spread over ``workers`` threads (default: the CPU cores this
    process may use, at most 8); each thread's BLAS and OpenMP run on one thread
    (:func:`~lowrank_fed.cholesky_qr.one_blas_thread`), so the pools do not fight. LAPACK and the array libraries
    release the GIL, and each module's result is, bit for bit, what a serial ``aggregate`` call on one BLAS
    thread gives (the same operations on the same inputs).
    The result keeps the order of ``modules``.

    Parameters
    ----------
    method : str
        A key of :data:`AGGREGATORS`.
    modules : mapping module -> list of FactorPair
        Each module's client updates.
    weights : array-like of shape (K,), mapping module -> weights, or None
        One weight list for every module, or one per module (when the modules have different holders).
    workers : int, optional
        Threads; 1 runs the modules one after another in name order.
    module_options : mapping module -> mapping, optional
        Options of one module, over ``options`` (e.g. ``{m: {"rank": r_m}}``); a module not in it gets
        ``options`` alone.
    seconds : dict, optional
        Receives ``{m: seconds of m's aggregate call}``, timed in the thread that ran it (so with several
        workers they add up to more than the wall time).

    Raises
    ------
    ModuleError
        (a ValueError) when a rule refuses a module: the first such module in name order
        (``sorted(modules)``), whichever thread finished first, with the rule's error as ``error``. Other
        exceptions propagate as they are, again the first module's in name order.
    ValueError
        ``workers`` below 1.

    Examples
    --------
    >>> import numpy as np
    >>> mods = {m: [FactorPair(np.ones((3, 1)), np.ones((1, 2)))] * 2 for m in ("q", "v")}
    >>> {m: p.rank for m, p in aggregate_modules("stack", mods, workers=2).items()}
    {'q': 2, 'v': 2}
    >>> {m: p.rank for m, p in aggregate_modules("svd", mods, module_options={"v": {"rank": 1}}).items()}
    {'q': 2, 'v': 1}
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    names = sorted(modules)
    per_module = isinstance(weights, Mapping)
    module_options = module_options or {}

    def one(m):  # (pair, seconds) or the exception, so that the first failure in name order is the one raised
        t0 = time.perf_counter()
        try:
            pair = aggregate(method, modules[m], weights[m] if per_module else weights,
                             **{**options, **module_options.get(m, {})})
        except Exception as err:  # re-raised below, the first in name order
            return err
        return pair, time.perf_counter() - t0

    workers = min(8, available_cores()) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"The 'workers' parameter must be a positive int. Got {workers}.")
    done = {}
    if workers == 1 or len(names) < 2:
        with one_blas_thread():  # as the threads run: the same bits whatever ``workers``
            for m in names:  # one after another: stop at the first failure
                done[m] = one(m)
                if isinstance(done[m], Exception):
                    break
    else:
        # One BLAS thread: set here for the process-wide pools (OpenBLAS) and in each worker for the
        # per-thread ones (OpenMP, which torch's CPU kernels use), restored on leaving.
        one_thread = {"initializer": threadpool_limits, "initargs": (1,)}
        with one_blas_thread(), ThreadPoolExecutor(min(workers, len(names)), **one_thread) as pool:
            done = dict(zip(names, pool.map(one, names)))
    results = {m: r for m, r in done.items() if not isinstance(r, Exception)}
    if seconds is not None:
        seconds.update({m: results[m][1] for m in modules if m in results})
    failed = next((m for m in names if m in done and m not in results), None)
    if failed is None:
        return {m: results[m][0] for m in modules}
    if isinstance(done[failed], ValueError):
        raise ModuleError(failed, done[failed]) from done[failed]
    raise done[failed]
