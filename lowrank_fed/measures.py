r"""Norms, scores and errors of factored updates, each without forming a ``d_out x d_in`` matrix.

``||B A||_F`` (:func:`product_fro_norm`), the slot scores ``||b_i|| ||a_i||`` (:func:`slot_scores`) and their tail
(:func:`tail_norm_product`), where an update's energy sits among the slots (:func:`prefix_update_energy`), and how
far an aggregate is from the exact weighted sum (:func:`aggregation_error`, :func:`pooled_error`). All are
re-exported by :mod:`lowrank_fed.linalg`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._validation import as_weights, check_pairs, compute_dtype, namespace, to_numpy
from .factors import FactorPair

__all__ = ["stacked_factors", "product_fro_norm", "slot_scores", "tail_norm_product", "prefix_update_energy",
           "aggregation_error", "pooled_error"]


def stacked_factors(xp, pairs, p):
    r"""``Bc = [p_1 B_1 .. p_K B_K]`` (d_out x R) and ``Ac = [A_1; ..; A_K]`` (R x d_in).

    ``Bc @ Ac = sum_k p_k B_k A_k``: the block product of a row of blocks and a column of blocks.
    """
    Bc = xp.concat([pair.B * float(pk) for pair, pk in zip(pairs, p, strict=True)], axis=1)
    Ac = xp.concat([pair.A for pair in pairs], axis=0)
    return Bc, Ac


def product_fro_norm(pair: FactorPair) -> float:
    r"""``||B A||_F`` without forming ``B A``: ``||B A||_F^2 = trace((B^T B)(A A^T))``.

    where ``B^T B`` and ``A A^T`` are ``r x r`` Gram matrices; the trace of their product is the
    sum of their elementwise product (both are symmetric).
    """
    xp = namespace(pair.B, pair.A)
    work = compute_dtype(xp, pair.B.dtype)
    B, A = xp.astype(pair.B, work), xp.astype(pair.A, work)
    gram_b = xp.permute_dims(B, (1, 0)) @ B
    gram_a = A @ xp.permute_dims(A, (1, 0))
    return float(np.sqrt(max(float(xp.sum(gram_b * gram_a)), 0.0)))


def slot_scores(B, A):
    r"""Each slot's size in a factored update: the norm of its rank-one term, per slot ``i``.

    .. math:: s_i = \lVert b_i \rVert_2\, \lVert a_i \rVert_2 = \lVert b_i a_i^\top \rVert_F,\qquad
              b_i = B[:, i],\quad a_i^\top = A[i, :]

    (HAFL's server scorer on the global factors; LoRA-A2's probe scores with ``B`` or ``A`` replaced by the
    probe's change of it). Properties: ``s_i >= 0``; ``sum_i s_i >= ||B A||_F`` (triangle inequality);
    ``s`` is unchanged when slot ``i`` is rebalanced (``b_i c``, ``a_i / c``, ``c != 0``) and permuted with
    the slots. Computed in the arrays' own library and dtype (torch keeps its gradient).

    Parameters
    ----------
    B : array, shape ``(d_out, r)``
    A : array, shape ``(r, d_in)``

    Returns
    -------
    array of the inputs' library, shape ``(r,)``.

    Examples
    --------
    >>> import numpy as np
    >>> slot_scores(np.array([[3.0, 1.0], [4.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 2.0]])).tolist()
    [5.0, 2.0]
    """
    xp = namespace(B, A)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"slot_scores needs B of shape (d_out, r) and A of shape (r, d_in); got "
                         f"{tuple(B.shape)} and {tuple(A.shape)}.")
    return xp.linalg.vector_norm(B, axis=0) * xp.linalg.vector_norm(A, axis=1)


def tail_norm_product(B, A, start: int):
    r"""The size of the slots from ``start`` on, as one block: HetLoRA's tail term of one module.

    .. math:: \lVert B[:, t:] \rVert_F\, \lVert A[t:, :] \rVert_F \;\ge\; \sum_{i \ge t} s_i
              \;\ge\; \lVert B[:, t:] A[t:, :] \rVert_F

    with ``s_i`` the :func:`slot_scores` (Cauchy-Schwarz, then the triangle inequality); zero when
    ``t >= r``. Computed in the arrays' own library and dtype (torch keeps its gradient, so it can be a
    loss term).

    Examples
    --------
    >>> import numpy as np
    >>> float(tail_norm_product(np.ones((2, 3)), np.ones((3, 2)), 1))
    4.0
    """
    xp = namespace(B, A)
    return xp.linalg.vector_norm(B[:, start:]) * xp.linalg.vector_norm(A[start:, :])


def prefix_update_energy(before: FactorPair, after: FactorPair) -> np.ndarray:
    r"""How much of an update ``after - before`` each prefix of slots carries, for every prefix length.

    .. math:: e_t = \lVert \Delta W_{:t} \rVert_F^2,\qquad
              \Delta W_{:t} = B'_{:, :t} A'_{:t, :} - B_{:, :t} A_{:t, :},\qquad t = 1, .., r

    where ``(B, A) = before`` and ``(B', A') = after`` (same shapes, rank ``r``), so ``e_r`` is
    ``||B'A' - BA||_F^2`` and ``e_t / e_r`` is the share of the update carried by the first ``t`` slots
    (``docs/methods.md#prelort``). The share is not bounded by 1: when the prefix's and the tail's
    updates partly cancel, ``||Delta W_{:t}||`` may exceed ``||Delta W||``.

    Computed without any ``d_out x d_in`` matrix and without cancellation between the two products:
    ``Delta W_{:t} = X_{:t} Y_{:t}`` with ``X = [B' - B, B]`` (columns ``i`` and ``r + i`` belong to
    slot ``i``) and ``Y = [A'; A' - A]``, and ``||X Y||_F^2 = sum((X^T X) * (Y Y^T))`` over the slots
    ``< t``: one pair of ``2r x 2r`` Gram matrices, in float64, for every ``t`` at once
    (``O((d_out + d_in) r^2)``). Values below zero from rounding are clipped to zero.

    Parameters
    ----------
    before, after : FactorPair
        The adapter at the start and the end of the update, folded (``B @ A = Delta W``).

    Returns
    -------
    numpy.ndarray, shape (r,), float64
        ``e_1, .., e_r``.

    Raises
    ------
    ValueError
        Shapes that differ between ``before`` and ``after``.

    Examples
    --------
    >>> before = FactorPair(np.zeros((2, 2)), np.eye(2))
    >>> after = FactorPair(np.array([[1.0, 0.0], [0.0, 2.0]]), np.eye(2))
    >>> prefix_update_energy(before, after).tolist()
    [1.0, 5.0]
    """
    xp = namespace(before.B, before.A, after.B, after.A)
    if tuple(before.B.shape) != tuple(after.B.shape) or tuple(before.A.shape) != tuple(after.A.shape):
        raise ValueError(f"prefix_update_energy: before has B {tuple(before.B.shape)}, A {tuple(before.A.shape)} and "
                         f"after has B {tuple(after.B.shape)}, A {tuple(after.A.shape)}; expected the same shapes.")
    r = int(before.B.shape[1])
    B0, A0 = xp.astype(before.B, xp.float64), xp.astype(before.A, xp.float64)
    B1, A1 = xp.astype(after.B, xp.float64), xp.astype(after.A, xp.float64)
    X = xp.concat([B1 - B0, B0], axis=1)
    Y = xp.concat([A1, A1 - A0], axis=0)
    G = np.asarray(to_numpy((xp.permute_dims(X, (1, 0)) @ X) * (Y @ xp.permute_dims(Y, (1, 0)))), dtype=np.float64)
    S = G[:r, :r] + G[:r, r:] + G[r:, :r] + G[r:, r:]  # slot i's two columns / rows folded together
    return np.maximum(np.diagonal(np.cumsum(np.cumsum(S, axis=0), axis=1)).copy(), 0.0)


def _stacked_fro_norm(xp, Bc, Ac) -> float:
    """``||Bc Ac||_F`` as ``||Rb Ra^T||_F`` from thin QR of ``Bc`` and ``Ac^T`` (no squaring, no cancellation)."""
    t = lambda X: xp.permute_dims(X, (1, 0))  # noqa: E731
    if Bc.shape[1] == 0:
        return 0.0
    Rb = xp.linalg.qr(Bc, mode="reduced")[1]  # Bc = Qb Rb
    Ra = xp.linalg.qr(t(Ac), mode="reduced")[1]  # Ac^T = Qa Ra
    # Bc Ac = Qb (Rb Ra^T) Qa^T and Qb, Qa have orthonormal columns, so the norms are equal.
    return float(xp.linalg.vector_norm(Rb @ t(Ra)))


def aggregation_error(pairs: Sequence[FactorPair], weights, result: FactorPair) -> tuple[float, float]:
    r"""How far an aggregate is from the exact weighted sum, without forming any ``d_out x d_in`` matrix.

    .. math::

        e = \frac{\lVert \sum_k p_k B_k A_k - \hat B \hat A \rVert_F}{\lVert \sum_k p_k B_k A_k \rVert_F}

    where ``p_k = w_k / sum_j w_j`` and ``(B_hat, A_hat)`` is ``result``. The difference is the product of the
    stacked factors ``[p_1 B_1 .. p_K B_K, -B_hat]`` and ``[A_1; ..; A_K; A_hat]``; its norm is that of the
    small core ``Rb Ra^T`` of their thin QR factorisations (float64), so rounding stays at ``eps ||.||`` instead
    of the ``sqrt(eps)`` a difference of Gram traces would give.

    Parameters
    ----------
    pairs : list of FactorPair
        The clients' updates, shapes ``(d_out, r_k)``, ``(r_k, d_in)``.
    weights : array-like, shape (K,), or None
        Non-negative client weights with a positive sum (uniform if None).
    result : FactorPair
        The aggregate, shapes ``(d_out, r)``, ``(r, d_in)``.

    Returns
    -------
    (numerator, denominator) : tuple of float
        ``||sum_k p_k B_k A_k - B_hat A_hat||_F`` and ``||sum_k p_k B_k A_k||_F``; ``e`` is their ratio (kept
        apart so errors of several modules can be pooled: ``sqrt(sum num^2) / sqrt(sum den^2)``).

    Notes
    -----
    Zero (to rounding) for the exact rules (``svd`` without ``rank``, ``stack``, FLoRA); ``svd`` with ``rank=t``
    gives the Eckart-Young tail ``||S[t:]|| / ||S||``; ``zero_pad`` gives its dilution of the slots few clients
    hold; ``fedavg`` the discordance of averaging factors (the cross terms ``p_j p_k B_j A_k``).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed import aggregate
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(6, r)), rng.normal(size=(r, 5))) for r in (1, 2)]
    >>> num, den = aggregation_error(pairs, [1, 3], aggregate("stack", pairs, [1, 3]))
    >>> bool(num / den < 1e-12)
    True
    """
    xp, checked = check_pairs([*pairs, result])
    *pairs, result = checked
    p = as_weights(weights, len(pairs))
    f64 = xp.float64
    Bc, Ac = stacked_factors(xp, pairs, p)
    Bc, Ac = xp.astype(Bc, f64), xp.astype(Ac, f64)
    Bd = xp.concat([Bc, -xp.astype(result.B, f64)], axis=1)
    Ad = xp.concat([Ac, xp.astype(result.A, f64)], axis=0)
    return _stacked_fro_norm(xp, Bd, Ad), _stacked_fro_norm(xp, Bc, Ac)


def pooled_error(parts) -> float | None:
    r"""The relative error of several modules together, from their ``(numerator, denominator)`` pairs.

    .. math::

        e = \frac{\sqrt{\sum_m \mathrm{num}_m^2}}{\sqrt{\sum_m \mathrm{den}_m^2}}

    the error of the whole adapter as one block-diagonal matrix (:func:`aggregation_error` per module).
    None for no module; 0 when every target is zero.

    Examples
    --------
    >>> pooled_error([(3.0, 6.0), (4.0, 8.0)])
    0.5
    """
    parts = [(float(n), float(d)) for n, d in parts]
    if not parts:
        return None
    num, den = sum(n * n for n, _ in parts), sum(d * d for _, d in parts)
    return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else 0.0
