r"""Cholesky-QR of stacked LoRA factors: the Gram route of :func:`~lowrank_fed.linalg.factored_svd`.

For a float32 ``X`` (``d x R``, the stacked ``B_k`` or ``A_k^T``), ``X^T X = L L^T`` gives ``Q = X L^{-T}`` with
orthonormal columns, at the cost of one ``d x R x R`` Gram instead of a Householder QR; how orthonormal ``Q``
comes out depends on the Gram's rounding, which :func:`gram_cholesky` checks (a float32 Gram measured with
probes, else a float64 one). Also here: the triangular solve and the one-BLAS-thread context the route uses.
"""

from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager

import numpy as np
from array_api_compat import device, is_numpy_namespace, is_torch_namespace

__all__ = ["gram_parts", "gram_cholesky", "one_blas_thread", "solve_upper"]

# The Gram (Cholesky-QR) route is used for float32 work while the stacked factors are this well
# conditioned (estimated from the Cholesky diagonal); beyond it, Householder QR.
GRAM_MAX_COND = 1e3
# The float32 Gram serves while the bases it gives are this close to orthonormal (||Q^T Q - I||_F, estimated
# with GRAM_PROBES fixed Gaussian probes); else the float64 Gram. About the float32 rounding of the products.
GRAM32_MAX_DEFECT = 1e-5
EPS_32 = 2.0**-24  # unit roundoff of float32
# A float32 Gram whose Cholesky diagonals spread more than this is past GRAM_MAX_COND for the float64 one too
# (their ratio is a lower bound of kappa, known to a few per cent): Householder QR at once.
GRAM_SKIP_COND = 10 * GRAM_MAX_COND
GRAM_PROBES = 8
GRAM_PROBE_SEED = 0


def _t(xp, X):
    return xp.permute_dims(X, (1, 0))


def _on(xp, values: np.ndarray, like, dtype=None):
    """NumPy ``values`` as an array of ``like``'s namespace and device (in ``dtype``, else ``like``'s)."""
    return xp.asarray(values, dtype=like.dtype if dtype is None else dtype, device=device(like))


def gram_parts(xp, Bc, Ac, cols):
    r"""Cholesky-QR of both stacked factors and the SVD of the ``R x R`` core; None if ill-conditioned.

    ``Bc^T Bc = Lb Lb^T`` and ``Ac Ac^T = La La^T`` (:func:`gram_cholesky`), so ``Bc = Qb Lb^T`` with
    ``Qb = Bc Lb^{-T}`` orthonormal, and ``Ac^T = Qa La^T`` likewise. Then
    ``Bc P Ac = Qb (Lb^T P La) Qa^T``; with ``Lb^T P La = Uc S Vc^T`` (float64):
    ``U = Bc Tb``, ``Tb = Lb^{-T} Uc``, and ``Vh = Ta^T Ac``, ``Ta = La^{-T} Vc``: returns ``(Tb, S, Ta)``.
    ``U S Vh = Bc P Ac`` holds for any invertible ``Lb``, ``La``; how orthonormal ``U`` and ``Vh`` come out
    depends on how well ``Lb Lb^T`` matches ``Bc^T Bc``, which :func:`gram_cholesky` checks.
    """
    factors = []
    for X in (Bc, _t(xp, Ac)):  # X = Q L^T
        L = gram_cholesky(xp, X)
        if L is None:
            return None
        factors.append(L)
    Lb, La = factors
    Uc, S, Vch = xp.linalg.svd(_t(xp, Lb) @ (cols[:, None] * La), full_matrices=False)  # Lb^T P La = Uc S Vc^T
    Tb = solve_upper(xp, _t(xp, Lb), Uc)  # Lb^{-T} Uc, so U = Qb Uc = Bc Tb
    Ta = solve_upper(xp, _t(xp, La), _t(xp, Vch))  # La^{-T} Vc, so Vh = Vc^T Qa^T = Ta^T Ac
    return Tb, S, Ta


def gram_cholesky(xp, X):
    r"""``L`` (float64, lower) with ``L L^T = X^T X`` for a float32 ``X`` (d x R), from the float32 Gram when that
    is accurate enough, else from the float64 Gram; None when ``X`` is too ill-conditioned for either.

    ``Q = X L^{-T}`` has ``Q^T Q = I - L^{-1} E L^{-T}`` where ``E`` is the Gram's rounding error. The float32
    Gram's entries err by about ``eps_32 ||x_i|| ||x_j||`` (a blocked BLAS), so ``Q`` is orthonormal to about
    ``eps_32 kappa_e^2``, ``kappa_e`` the condition number of ``X`` with unit columns. Two checks, in order:

    - ``kappa_e >= max_i ||x_i|| / L_ii`` (``L_ii / ||x_i||`` is column ``i``'s distance to the span of the
      columns before it, once normalised); when ``eps_32`` times its square exceeds ``GRAM32_MAX_DEFECT`` the
      float32 Gram cannot serve and is not probed; and when ``max diag(L) / min diag(L)`` exceeds
      ``GRAM_SKIP_COND`` the float64 Gram would fail the ``GRAM_MAX_COND`` bound too, so neither is tried
      (the caller takes Householder QR, as it does for trained clients' factors that nearly repeat);
    - the defect ``||Q^T Q - I||`` measured with ``GRAM_PROBES`` fixed Gaussian probes ``Z``: ``Y = X (L^{-T} Z)``,
      whose float32 rounding (about ``eps_32 sqrt(R)``) is well below the threshold, and
      ``||Y^T Y - Z^T Z||_F / GRAM_PROBES``, an estimate of ``||Q^T Q - I||_F >= ||Q^T Q - I||_2``; the float32
      Gram is kept when that is at most ``GRAM32_MAX_DEFECT`` (the singular values then err by at most about half
      of it, relative to the largest). The probes cost a ``d x R x GRAM_PROBES`` product, about a 30th of the
      float64 Gram they save.

    The float64 Gram makes the defect about ``eps_64 kappa^2 + eps_32 kappa`` and is kept while
    ``max diag(L) / min diag(L) <= GRAM_MAX_COND`` (a lower bound of ``kappa``).
    """
    f64 = xp.float64
    G = xp.astype(_t(xp, X) @ X, f64)
    L = _cholesky(xp, G, math.inf)
    if L is not None:
        diag = xp.abs(xp.linalg.diagonal(L))
        if float(xp.max(diag)) > GRAM_SKIP_COND * float(xp.min(diag)):
            return None  # hopeless for the float64 Gram as well
        kappa_e = float(xp.max(xp.sqrt(xp.linalg.diagonal(G)) / diag))
        if EPS_32 * kappa_e**2 <= GRAM32_MAX_DEFECT and _gram_defect(xp, X, L) <= GRAM32_MAX_DEFECT:
            return L
    X64 = xp.astype(X, f64)
    return _cholesky(xp, _t(xp, X64) @ X64, GRAM_MAX_COND)


def _cholesky(xp, G, max_cond: float):
    """Lower Cholesky factor of ``G``, or None if it fails or ``max diag(L) / min diag(L) > max_cond``."""
    try:
        L = xp.linalg.cholesky(G)
    except Exception:  # LinAlgError in NumPy, torch, array_api_strict: not positive definite
        return None
    diag = xp.abs(xp.linalg.diagonal(L))
    if not bool(xp.all(xp.isfinite(L))) or not float(xp.min(diag)) * max_cond >= float(xp.max(diag)):
        return None
    return L


def _gram_defect(xp, X, L) -> float:
    r"""Estimate of ``||Q^T Q - I||_F`` for ``Q = X L^{-T}``: ``||Z^T (Q^T Q - I) Z||_F / p`` with ``p`` fixed probes."""
    f64 = xp.float64
    Z = _on(xp, np.random.default_rng(GRAM_PROBE_SEED).standard_normal((L.shape[0], GRAM_PROBES)), L, f64)
    Y = xp.astype(X @ xp.astype(solve_upper(xp, _t(xp, L), Z), X.dtype), f64)  # Q Z, its rounding ~ eps_32 sqrt(R)
    return float(xp.linalg.matrix_norm(_t(xp, Y) @ Y - _t(xp, Z) @ Z)) / GRAM_PROBES


def solve_upper(xp, Ru, Y):
    """``Ru^{-1} Y`` for upper-triangular ``Ru``: torch's triangular solve, or SciPy's on one BLAS thread.

    SciPy's ``solve_triangular`` (about 0.7 ms against 2 ms for LAPACK's general ``solve`` at ``R = 248``) runs
    on SciPy's own OpenBLAS, whose thread pool fights NumPy's when both have several threads (the 64-layer
    model took 5.7 s instead of 2.7 s with two BLAS threads). So every BLAS pool is held at one thread for the
    call (about 10 microseconds; already so inside :func:`one_blas_thread`), and the result is the same bits
    whatever the caller's BLAS threads.
    """
    if is_torch_namespace(xp):  # the caller's tensors imply torch is loaded; the core does not import it
        return sys.modules["torch"].linalg.solve_triangular(Ru, Y, upper=True)
    if not is_numpy_namespace(xp):
        return xp.linalg.solve(Ru, Y)
    from scipy.linalg import solve_triangular

    if _one_thread_depth:
        return solve_triangular(Ru, Y, check_finite=False)
    with _limits_lock, _blas_pools().limit(limits=1):  # one at a time: each restores what the one before set
        return solve_triangular(Ru, Y, check_finite=False)


_pools = None


def _blas_pools():
    """threadpoolctl's controller of the BLAS libraries loaded (NumPy's and SciPy's), made once."""
    global _pools
    if _pools is None:
        import scipy.linalg  # noqa: F401  (its BLAS must be loaded to be controlled)
        from threadpoolctl import ThreadpoolController

        _pools = ThreadpoolController().select(user_api="blas")
    return _pools


_one_thread_depth = 0  # > 0 while one_blas_thread() holds every BLAS pool at one thread
_one_thread_limiter = None  # what the first of the blocks open now set, restored by the last to close
_limits_lock = threading.Lock()  # the pools' thread counts are process-wide: set and restored one caller at a time


@contextmanager
def one_blas_thread():
    """Every BLAS pool of the process at one thread (threadpoolctl) for the block; the whole-model path
    (``aggregate_modules``) runs its threads inside it, and :func:`solve_upper` then need not set it per call.

    The limit is process-wide, so blocks open at once (nested, or in several threads) share one: the first to
    open sets it, the last to close restores the counts from before the first, whatever order they close in.
    Open it in the main thread (or around the code that starts the thread that needs it: the Flower engine holds
    it while its ServerApp thread runs). The OpenBLAS pools that NumPy and SciPy load here hold one count for the
    whole process, and a block opened in the main thread holds every thread at one; a count set from another
    thread is ignored once the main thread has set one (OpenBLAS 0.3.31, tested). OpenMP's count is per
    thread: ``aggregate_modules`` sets it in each of its workers.
    """
    from threadpoolctl import threadpool_limits

    global _one_thread_depth, _one_thread_limiter
    with _limits_lock:
        if _one_thread_depth == 0:
            _one_thread_limiter = threadpool_limits(limits=1)
        _one_thread_depth += 1
    try:
        yield
    finally:
        with _limits_lock:
            _one_thread_depth -= 1
            if _one_thread_depth == 0:
                _one_thread_limiter.restore_original_limits()
                _one_thread_limiter = None
