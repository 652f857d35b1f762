r"""Linear algebra on factored updates, never forming a ``d_out x d_in`` matrix.

The central routine is :func:`factored_svd`, the thin SVD of a weighted sum of LoRA products
(FlexLoRA's server step, docs/methods.md#flexlora) at cost ``O((d_out + d_in) R^2 + R^3)``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from array_api_compat import device, is_torch_namespace

from ._validation import as_weights, check_pairs, compute_dtype, namespace
from .factors import FactorPair, pad
from .measures import (aggregation_error, pooled_error, prefix_update_energy, product_fro_norm, slot_scores,
                       stacked_factors, tail_norm_product)

__all__ = [
    "factored_svd",
    "sin_theta",
    "product_fro_norm",
    "slot_scores",
    "tail_norm_product",
    "prefix_update_energy",
    "aggregation_error",
    "pooled_error",
    "svd_flip",
    "stacked_factors",
    "balanced_pair",
]

# Above this share of min(d_out, d_in), the stacked rank R makes the QR route no cheaper than one
# product and a dense SVD, so factored_svd forms the (at most R-wide) product instead.
DENSE_FALLBACK_SHARE = 0.6
# The Gram (Cholesky-QR) route is used for float32 work while the stacked factors are this well
# conditioned (estimated from the Cholesky diagonal); beyond it, Householder QR.
GRAM_MAX_COND = 1e3


def svd_flip(xp, U, Vh):
    r"""Deterministic SVD signs: the largest-magnitude entry of each column of ``U`` is positive.

    ``U diag(S) Vh`` is unchanged: column ``j`` of ``U`` and row ``j`` of ``Vh`` flip together.
    Ties between entries of equal magnitude go to the first (lowest row index).
    """
    n_rows, n_cols = U.shape
    if n_cols == 0 or n_rows == 0:
        return U, Vh
    idx = xp.argmax(xp.abs(U), axis=0)  # row of the largest |U[:, j]|, shape (n_cols,)
    flat = xp.reshape(U, (-1,))  # row-major: U[i, j] is flat[i * n_cols + j]
    cols = xp.arange(n_cols, device=device(U), dtype=idx.dtype)
    signs = xp.sign(xp.take(flat, idx * n_cols + cols))
    signs = xp.where(signs == 0, xp.ones_like(signs), signs)
    return U * signs[None, :], Vh * signs[:, None]


def factored_svd(pairs: Sequence[FactorPair], weights=None):
    r"""Thin SVD of a weighted sum of LoRA products, without forming it.

    .. math::

        \sum_k p_k B_k A_k = U \operatorname{diag}(S) V^h

    computed as: ``Bc = [p_1 B_1 .. p_K B_K] = Qb Rb`` and ``Ac^T = [A_1; ..; A_K]^T = Qa Ra``
    (thin QR), the small core ``Rb Ra^T = Uc diag(S) Vc^T`` (SVD), then ``U = Qb Uc``,
    ``Vh = Vc^T Qa^T``, because ``Bc Ac = Qb (Rb Ra^T) Qa^T``.

    where

    - ``p_k = w_k / sum_j w_j`` are the normalised client weights (uniform if ``weights`` is None),
    - ``R = sum_k r_k`` is the stacked rank.

    Parameters
    ----------
    pairs : list of FactorPair
        Client updates ``B_k`` shape ``(d_out, r_k)``, ``A_k`` shape ``(r_k, d_in)``.
    weights : array-like, shape (K,), optional
        Non-negative client weights with a positive sum.

    Returns
    -------
    U : array, shape (d_out, m)
        Orthonormal columns, ``m = min(R, d_out, d_in)``.
    S : array, shape (m,)
        Singular values, descending.
    Vh : array, shape (m, d_in)
        Orthonormal rows.
        Signs are fixed by :func:`svd_flip`. Arrays come back in the inputs' namespace, dtype and
        device (half-precision inputs are computed in float32).

    Notes
    -----
    For float32 (and half-precision) input with well-conditioned stacked factors, the QR factors
    come from float64 Gram matrices (Cholesky-QR, see ``_gram_route``); float64 input, or
    ill-conditioned or rank-deficient factors, use Householder QR. Both never form the sum.
    Cost ``O((d_out + d_in) R^2 + R^3)`` instead of ``O(d_out d_in min(d_out, d_in))`` for the dense
    way (FlexLoRA, NeurIPS 2024, forms every ``B_k A_k``). When ``R > 0.6 min(d_out, d_in)`` the
    product ``Bc @ Ac`` is no larger than the QR factors, so it is formed and decomposed directly.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(6, r)), rng.normal(size=(r, 5))) for r in (1, 2)]
    >>> U, S, Vh = factored_svd(pairs, weights=[1, 3])
    >>> dense = 0.25 * pairs[0].B @ pairs[0].A + 0.75 * pairs[1].B @ pairs[1].A
    >>> bool(np.allclose(U * S @ Vh, dense))
    True
    """
    xp, pairs = check_pairs(pairs)
    p = as_weights(weights, len(pairs))
    return _factored_svd(xp, pairs, p)


def _factored_svd(xp, pairs, p):
    """:func:`factored_svd` after validation; ``p`` normalised NumPy weights."""
    out_dtype = pairs[0].B.dtype
    work = compute_dtype(xp, out_dtype)
    Bc, Ac = stacked_factors(xp, pairs, p)
    Bc, Ac = xp.astype(Bc, work, copy=False), xp.astype(Ac, work, copy=False)
    d_out, R = Bc.shape
    d_in = Ac.shape[1]
    m = min(R, d_out, d_in)
    result = None
    if R > DENSE_FALLBACK_SHARE * min(d_out, d_in):
        U, S, Vh = xp.linalg.svd(Bc @ Ac, full_matrices=False)
        result = U[:, :m], S[:m], Vh[:m, :]
    elif work != xp.float64:
        result = _gram_route(xp, Bc, Ac)
    if result is None:
        result = _householder_route(xp, Bc, Ac)
    U, S, Vh = result
    U, Vh = svd_flip(xp, U, Vh)
    return tuple(xp.astype(X, out_dtype, copy=False) for X in (U, S, Vh))


def _householder_route(xp, Bc, Ac):
    """Thin Householder QR of both stacked factors, SVD of the ``R x R`` core (accurate to rounding)."""
    t = lambda X: xp.permute_dims(X, (1, 0))  # noqa: E731
    Qb, Rb = xp.linalg.qr(Bc)  # Bc = Qb Rb, Qb (d_out, R), Rb (R, R)
    Qa, Ra = xp.linalg.qr(t(Ac))  # Ac^T = Qa Ra, Qa (d_in, R)
    # Bc Ac = Qb (Rb Ra^T) Qa^T and Rb Ra^T = Uc S Vc^T, so U = Qb Uc and Vh = Vc^T Qa^T.
    Uc, S, Vch = xp.linalg.svd(Rb @ t(Ra), full_matrices=False)
    return Qb @ Uc, S, Vch @ t(Qa)


def _gram_route(xp, Bc, Ac):
    r"""Cholesky-QR of both stacked factors with float64 Gram matrices; None if ill-conditioned.

    ``Bc^T Bc = Lb Lb^T`` and ``Ac Ac^T = La La^T`` (float64), so ``Bc = Qb Lb^T`` with
    ``Qb = Bc Lb^{-T}`` orthonormal, and ``Ac^T = Qa La^T`` likewise. Then
    ``Bc Ac = Qb (Lb^T La) Qa^T``; with ``Lb^T La = Uc S Vc^T``:
    ``U = Bc (Lb^{-T} Uc)`` and ``Vh = (La^{-T} Vc)^T Ac``: two ``d x R x R`` products in the
    input precision and ``R x R`` work in float64: 48 ms instead of about 70 ms for Householder QR
    at ``d = 4096``, ``R = 248`` on one core.

    Orthogonality of ``U`` degrades like ``eps_64 kappa(Bc)^2 + eps_32 kappa(Bc)``, so this route is
    taken only for float32 work and only when the Cholesky factors succeed with
    ``max diag(L) / min diag(L) <= GRAM_MAX_COND`` (a lower bound of ``kappa``); otherwise the
    caller falls back to Householder QR (rank-deficient factors, e.g. ``B = 0`` at initialisation).
    """
    t = lambda X: xp.permute_dims(X, (1, 0))  # noqa: E731
    f64 = xp.float64
    factors = []
    for X in (Bc, t(Ac)):  # X = Q L^T
        X64 = xp.astype(X, f64)
        try:
            L = xp.linalg.cholesky(t(X64) @ X64)
        except Exception:  # LinAlgError in NumPy, torch, array_api_strict: not positive definite
            return None
        diag = xp.abs(xp.linalg.diagonal(L))
        if not bool(xp.all(xp.isfinite(L))) or not float(xp.min(diag)) * GRAM_MAX_COND >= float(xp.max(diag)):
            return None
        factors.append(L)
    Lb, La = factors
    Uc, S, Vch = xp.linalg.svd(t(Lb) @ La, full_matrices=False)  # Rb Ra^T = Lb^T La = Uc S Vc^T
    Tb = solve_upper(xp, t(Lb), Uc)  # Lb^{-T} Uc, so U = Qb Uc = Bc Tb
    Ta = solve_upper(xp, t(La), t(Vch))  # La^{-T} Vc, so Vh = Vc^T Qa^T = Ta^T Ac
    U = Bc @ xp.astype(Tb, Bc.dtype)
    Vh = xp.astype(t(Ta), Ac.dtype) @ Ac
    return U, xp.astype(S, Bc.dtype), Vh


def solve_upper(xp, Ru, Y):
    """``Ru^{-1} Y`` for upper-triangular ``Ru``: torch's triangular solve, else the standard's ``solve``.

    SciPy's ``solve_triangular`` would be faster for NumPy on one thread, but it runs on SciPy's own
    OpenBLAS, whose thread pool then fights NumPy's: with two BLAS threads the 64-layer benchmark
    took 5.7 s instead of 2.7 s.
    """
    if is_torch_namespace(xp):  # the caller's tensors imply torch is loaded; the core does not import it
        return sys.modules["torch"].linalg.solve_triangular(Ru, Y, upper=True)
    return xp.linalg.solve(Ru, Y)


def sin_theta(U_hat, U) -> float:
    r"""Distance between two subspaces: the largest sine of their principal angles.

    .. math::

        \|\sin\Theta(\hat U, U)\|_2 = \|\hat P - P\|_2,
        \quad P = U U^\top,\ \hat P = \hat U \hat U^\top

    computed as ``max(||(I - P) Uhat||_2, ||(I - Phat) U||_2)`` without forming a ``p x p``
    projector. 0 means the same subspace; 1 if the dimensions differ or the subspaces are orthogonal.

    Parameters
    ----------
    U_hat, U : array, shape (p, r_hat) and (p, r)
        Bases of the two subspaces (columns are orthonormalised by a thin QR first, so any full
        column-rank basis works).

    Examples
    --------
    >>> import numpy as np
    >>> e = np.eye(3)
    >>> sin_theta(e[:, :2], e[:, :2]), round(sin_theta(e[:, :1], e[:, 1:2]), 6)
    (0.0, 1.0)
    """
    xp = namespace(U_hat, U)
    if U_hat.ndim != 2 or U.ndim != 2 or U_hat.shape[0] != U.shape[0]:
        raise ValueError(
            f"sin_theta needs two bases with the same number of rows. Got shapes "
            f"{tuple(U_hat.shape)} and {tuple(U.shape)}."
        )
    work = compute_dtype(xp, U.dtype)
    if U_hat.shape[1] == 0 and U.shape[1] == 0:
        return 0.0
    if U_hat.shape[1] == 0 or U.shape[1] == 0:
        return 1.0
    Qh, _ = xp.linalg.qr(xp.astype(U_hat, work))
    Q, _ = xp.linalg.qr(xp.astype(U, work))

    def _off(X, Y):  # ||(I - Y Y^T) X||_2
        R = X - Y @ (xp.permute_dims(Y, (1, 0)) @ X)
        return float(xp.max(xp.linalg.svdvals(R)))

    value = max(_off(Qh, Q), _off(Q, Qh))
    return float(min(value, 1.0)) if value > 1e-300 else 0.0


def balanced_pair(xp, U, S, Vh, rank: int) -> FactorPair:
    r"""Factor pair of the rank-``rank`` truncation, with ``sqrt(S)`` on both sides.

    ``B = U[:, :rank] diag(sqrt(S))``, ``A = diag(sqrt(S)) Vh[:rank]``, so ``B A = U_r S_r Vh_r``.
    If ``rank > len(S)`` the pair is padded with zero slots.
    """
    m = min(rank, S.shape[0])
    root = xp.sqrt(S[:m])
    B = U[:, :m] * root[None, :]
    A = Vh[:m, :] * root[:, None]
    pair = FactorPair(B, A)
    return pad(pair, rank) if rank > m else pair
