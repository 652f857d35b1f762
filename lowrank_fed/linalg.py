r"""Linear algebra on factored updates, never forming a ``d_out x d_in`` matrix.

The central routine is :func:`factored_svd`, the thin SVD of a weighted sum of LoRA products
(FlexLoRA's server step, docs/methods.md#flexlora) at cost ``O((d_out + d_in) R^2 + R^3)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from array_api_compat import device

from ._validation import as_weights, check_pairs, compute_dtype, namespace
from .cholesky_qr import _on, _t, gram_parts
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


def svd_flip(xp, U, Vh):
    r"""Deterministic SVD signs: the largest-magnitude entry of each column of ``U`` is positive.

    ``U diag(S) Vh`` is unchanged: column ``j`` of ``U`` and row ``j`` of ``Vh`` flip together.
    Ties between entries of equal magnitude go to the first (lowest row index).
    """
    signs = _flip_signs(xp, U)
    return U * signs[None, :], Vh * signs[:, None]


def factored_svd(pairs: Sequence[FactorPair], weights=None):
    r"""Thin SVD of a weighted sum of LoRA products, without forming it.

    .. math::

        \sum_k p_k B_k A_k = U \operatorname{diag}(S) V^h

    computed as: ``Bc = [B_1 .. B_K] = Qb Rb`` and ``Ac^T = [A_1; ..; A_K]^T = Qa Ra``
    (thin QR), the small core ``Rb P Ra^T = Uc diag(S) Vc^T`` (SVD) with ``P = diag(p_k`` repeated
    ``r_k`` times), then ``U = Qb Uc``, ``Vh = Vc^T Qa^T``, because ``Bc P Ac = Qb (Rb P Ra^T) Qa^T``.

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
    come from Gram matrices (Cholesky-QR, see ``cholesky_qr.gram_parts``): float32 Grams while the bases they
    give are orthonormal to ``GRAM32_MAX_DEFECT`` (measured with fixed probes), else float64 Grams
    (``cholesky_qr.gram_cholesky``); float64 input, or ill-conditioned or rank-deficient factors, use Householder
    QR. None forms the sum.
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
    return _usv(xp, _svd_parts(xp, pairs, p), pairs[0].B.dtype)


def _usv(xp, parts, out_dtype):
    """``(U, S, Vh)`` of :func:`_svd_parts`' result, signs fixed (:func:`svd_flip`), in ``out_dtype``."""
    if parts[0] == "gram":  # U = Bc Tb and Vh = Ta^T Ac
        _, Bc, Ac, Tb, S, Ta = parts
        U, S, Vh = Bc @ xp.astype(Tb, Bc.dtype), xp.astype(S, Bc.dtype), xp.astype(_t(xp, Ta), Ac.dtype) @ Ac
    else:
        _, U, S, Vh = parts
    U, Vh = svd_flip(xp, U, Vh)
    return tuple(xp.astype(X, out_dtype, copy=False) for X in (U, S, Vh))


def _factored_pair(xp, pairs, p, rank: int | None) -> FactorPair:
    r"""``balanced_pair`` of :func:`factored_svd`'s result at ``rank`` (``m`` if None), the same pair to rounding.

    On the Gram route the pair comes straight out of the two ``d x R x t`` products, ``t = min(rank, m)``:
    ``B = Bc (Tb_{:, :t} diag(sqrt(S_t)))`` and ``A = (diag(sqrt(S_t)) Ta_{:, :t}^T) Ac``, then the signs of
    :func:`svd_flip` (read off ``B``, whose columns are ``U``'s times ``sqrt(S_j) >= 0``) applied in place; so
    neither ``U`` nor ``Vh`` is formed, and a truncation (FlexLoRA's global rank) computes only its ``t`` columns.
    """
    parts = _svd_parts(xp, pairs, p)
    out_dtype = pairs[0].B.dtype
    if parts[0] != "gram":
        U, S, Vh = _usv(xp, parts, out_dtype)
        return balanced_pair(xp, U, S, Vh, S.shape[0] if rank is None else rank)
    _, Bc, Ac, Tb, S, Ta = parts
    m = S.shape[0]
    rank = m if rank is None else rank
    t = min(rank, m)
    root = xp.sqrt(S[:t])
    B = Bc @ xp.astype(Tb[:, :t] * root[None, :], Bc.dtype)
    A = xp.astype(_t(xp, Ta[:, :t]) * root[:, None], Ac.dtype) @ Ac
    signs = _flip_signs(xp, B)
    B *= signs[None, :]
    A *= signs[:, None]
    pair = FactorPair(xp.astype(B, out_dtype, copy=False), xp.astype(A, out_dtype, copy=False))
    return pad(pair, rank) if rank > t else pair


def _flip_signs(xp, U):
    """The signs :func:`svd_flip` gives the columns of ``U``: that of each column's largest-magnitude entry (+1 for 0).

    Read off the column maxima and minima (two fast reductions); only a column whose largest and smallest
    entries tie in magnitude needs the first of them by row, from ``argmax`` of its magnitudes.
    """
    n_rows, n_cols = U.shape
    if n_cols == 0 or n_rows == 0:
        return xp.ones((n_cols,), dtype=U.dtype, device=device(U))
    top, bottom = xp.max(U, axis=0), xp.min(U, axis=0)
    signs = xp.where(top >= -bottom, xp.ones_like(top), -xp.ones_like(top))
    tied = (top == -bottom) & (top > 0)
    if bool(xp.any(tied)):  # +a and -a both in a column: the sign of the first one, from argmax (rare, slower)
        idx = xp.argmax(xp.abs(U), axis=0)
        cols = xp.arange(n_cols, device=device(U), dtype=idx.dtype)
        signs = xp.where(tied, xp.sign(xp.take(xp.reshape(U, (-1,)), idx * n_cols + cols)), signs)
    return signs


def _svd_parts(xp, pairs, p):
    r"""The SVD of ``sum_k p_k B_k A_k`` by the cheapest accurate route, before signs and output dtype.

    ``Bc = [B_1 .. B_K]`` and ``Ac = [A_1; ..; A_K]`` are stacked unscaled and the weights are the diagonal
    ``P = diag(p_k repeated r_k times)`` in between: ``sum_k p_k B_k A_k = Bc P Ac``. Returns
    ``("gram", Bc, Ac, Tb, S, Ta)`` with ``U = Bc Tb`` and ``Vh = Ta^T Ac`` (:func:`~.cholesky_qr.gram_parts`), or
    ``("dense" | "householder", U, S, Vh)``.
    """
    work = compute_dtype(xp, pairs[0].B.dtype)
    Bc = xp.concat([xp.astype(pair.B, work, copy=False) for pair in pairs], axis=1)
    Ac = xp.concat([xp.astype(pair.A, work, copy=False) for pair in pairs], axis=0)
    cols = np.repeat(np.asarray(p, dtype=np.float64), [pair.rank for pair in pairs])
    d_out, R = Bc.shape
    d_in = Ac.shape[1]
    m = min(R, d_out, d_in)
    if R > DENSE_FALLBACK_SHARE * min(d_out, d_in):
        U, S, Vh = xp.linalg.svd((Bc * _on(xp, cols, Bc)[None, :]) @ Ac, full_matrices=False)
        return "dense", U[:, :m], S[:m], Vh[:m, :]
    if work != xp.float64:
        parts = gram_parts(xp, Bc, Ac, _on(xp, cols, Bc, xp.float64))
        if parts is not None:
            return ("gram", Bc, Ac, *parts)
    return ("householder", *_householder_route(xp, Bc * _on(xp, cols, Bc)[None, :], Ac))


def _householder_route(xp, Bc, Ac):
    """Thin Householder QR of both stacked factors, SVD of the ``R x R`` core (accurate to rounding)."""
    Qb, Rb = xp.linalg.qr(Bc)  # Bc = Qb Rb, Qb (d_out, R), Rb (R, R)
    Qa, Ra = xp.linalg.qr(_t(xp, Ac))  # Ac^T = Qa Ra, Qa (d_in, R)
    # Bc Ac = Qb (Rb Ra^T) Qa^T and Rb Ra^T = Uc S Vc^T, so U = Qb Uc and Vh = Vc^T Qa^T.
    Uc, S, Vch = xp.linalg.svd(Rb @ _t(xp, Ra), full_matrices=False)
    return Qb @ Uc, S, Vch @ _t(xp, Qa)


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
