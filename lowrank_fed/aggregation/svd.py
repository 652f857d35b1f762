r"""FlexLoRA's SVD aggregation, computed from the factors, and redistribution to client ranks."""

from __future__ import annotations

import numpy as np
from array_api_compat import device

from .._validation import check_rank, compute_dtype
from ..factors import FactorPair, pad, truncate
from ..linalg import _factored_pair, _factored_svd
from ._common import prepare

__all__ = ["aggregate_svd", "redistribute", "REDISTRIBUTE_METHODS"]

REDISTRIBUTE_METHODS = ("prefix", "svd")
# Seed of the Gaussian matrix whose QR completes A's rows when a client's rank exceeds the global's.
COMPLEMENT_SEED = 0


def aggregate_svd(pairs, weights=None, *, rank: int | None = None) -> FactorPair:
    r"""SVD of the weighted sum of products, optionally truncated.

    .. math::

        \sum_k p_k B_k A_k = U \operatorname{diag}(S) V^h,\qquad
        B = U_{:, :t} \operatorname{diag}(\sqrt{S_{:t}}),\quad A = \operatorname{diag}(\sqrt{S_{:t}}) V^h_{:t, :}

    where ``t = rank`` (or ``m = min(R, d_out, d_in)`` when ``rank`` is None, which makes
    ``B A`` exact). With a rank, ``B A`` is the Eckart-Young best rank-``t`` approximation:
    ``||sum_k p_k B_k A_k - B A||_F^2 = sum_{i >= t} S_i^2``.

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k
    weights : array-like, shape (K,), optional
    rank : int, optional
        ``1 <= rank <= min(d_out, d_in)``; slots past ``m`` are zero.

    Returns
    -------
    FactorPair of rank ``rank`` (or ``m``).

    Notes
    -----
    FlexLoRA (Bai et al., NeurIPS 2024). [paper] Computed as :func:`lowrank_fed.factored_svd`
    does (QR of the stacked factors, SVD of the small core), never forming ``d_out x d_in``; on its
    Gram route ``B`` and ``A`` come out of the final products directly, only ``t`` columns of them.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(5, 2)), rng.normal(size=(2, 4))) for _ in range(3)]
    >>> aggregate_svd(pairs, rank=2).rank
    2
    """
    xp, pairs, p = prepare(pairs, weights)
    d_out, d_in = pairs[0].shape
    if rank is not None:
        rank = check_rank(rank, low=1, high=min(d_out, d_in))
    return _factored_pair(xp, pairs, p, rank)  # balanced_pair(U, S, Vh, rank), without forming U and Vh


def redistribute(pair: FactorPair, rank: int, method: str = "prefix") -> FactorPair:
    r"""What a client of rank ``rank`` downloads from the global pair.

    .. math::

        B_g A_g = U \operatorname{diag}(S) V^h,\qquad
        B = \big[\,U_{:, :t} \operatorname{diag}(S_{:t}) \ \big|\ 0\,\big],\quad
        A = \begin{bmatrix} V^h_{:t, :} \\ C \end{bmatrix}\qquad (\texttt{method="svd"})

    where

    - ``(B_g, A_g)`` is the global pair ``pair``, of rank ``R``,
    - ``U`` shape (d_out, m), ``S`` shape (m,), ``Vh`` shape (m, d_in) is the thin SVD of its
      product, ``m = min(R, d_out, d_in)``, computed from the factors,
    - ``t = min(rank, m)`` is the number of singular directions the client receives,
    - ``C`` shape (rank - t, d_in) is an orthonormal complement of the rows of ``Vh`` (present only
      when ``rank > m``); its rows beyond ``d_in - m`` are zero, since ``d_in`` is the most
      orthonormal rows a ``d_in``-wide ``A`` can have,
    - ``0`` are the matching ``rank - t`` zero columns of ``B``.

    ``B A = U_t diag(S_t) Vh_t`` is the Eckart-Young best rank-``rank`` approximation of the global
    product (exact when ``rank >= m``), and ``A`` has orthonormal rows: ``A A^T = I`` (for
    ``rank <= d_in``).

    With ``method="prefix"`` the client gets the first ``rank`` slots, ``truncate(pair, rank)``
    (zero-padded if the global pair has fewer slots). Used by HetLoRA, PreLort, segment/replication.

    Parameters
    ----------
    pair : FactorPair, rank R, ``B`` shape (d_out, R), ``A`` shape (R, d_in)
        The global pair.
    rank : int, >= 1
        The client's rank.
    method : {"prefix", "svd"}

    Returns
    -------
    FactorPair of rank ``rank``
        In the namespace, dtype and device of ``pair``.

    Raises
    ------
    ValueError
        If ``method`` is unknown or ``rank < 1``.
    TypeError
        If ``pair`` is not a FactorPair or ``rank`` not an int.

    Notes
    -----
    ``"svd"`` is FlexLoRA's download (Bai et al., NeurIPS 2024) in the convention of its reference
    code [code: FederatedScope ``distribute_weight_fast``]; docs/methods.md#flexlora. The singular
    values go to ``B`` and ``A`` keeps orthonormal rows. Why not ``sqrt(S)`` on both sides
    (``balanced_pair``, still used by :func:`aggregate_svd` for the server's state): with
    ``dL/dW = G`` (shape (d_out, d_in)) the gradients of slot ``i`` are ``dL/db_i = G a_i^T`` and
    ``dL/da_i = b_i^T G``. A slot with a zero singular value (or a padding slot when ``rank > m``)
    would be zero in both factors, so both gradients vanish and the slot never learns. Here ``a_i``
    is a unit vector, so ``G a_i^T`` is non-zero for a generic ``G``; after one step ``b_i != 0``
    and ``a_i`` learns too.

    The complement ``C`` is deterministic: the columns past ``m`` of the Householder QR of
    ``[Vh^T | G_c]``, with ``G_c`` a fixed-seed Gaussian ``d_in x (rank - m)`` matrix (Householder's
    ``Q`` is orthonormal even if ``G_c`` is nearly in the span of ``Vh^T``). Column ``j`` of ``G_c``
    does not depend on ``rank``, so the prefix property holds: ``redistribute(g, r, "svd")`` is the
    first ``r`` slots of ``redistribute(g, r2, "svd")`` for ``r <= r2`` (bit for bit while
    ``r2 <= m``; the complement rows to rounding). One SVD per module serves every client rank.
    The rows of ``Vh`` that belong to zero singular values (zero columns of ``B``, or ``B = 0``)
    come out of :func:`lowrank_fed.factored_svd` orthonormal already (tested).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> g = FactorPair(rng.normal(size=(6, 2)), rng.normal(size=(2, 5)))
    >>> down = redistribute(g, 4, method="svd")  # the global has only 2 singular directions
    >>> bool(np.allclose(down.A @ down.A.T, np.eye(4))), bool(np.allclose(down.B @ down.A, g.B @ g.A))
    (True, True)
    >>> np.abs(down.B[:, 2:]).max()  # the complement slots carry no product, only a gradient path
    np.float64(0.0)
    """
    if method not in REDISTRIBUTE_METHODS:
        raise ValueError(f"Unknown redistribution method {method!r}; expected one of {list(REDISTRIBUTE_METHODS)}.")
    if not isinstance(pair, FactorPair):
        raise TypeError(f"Expected a FactorPair. Got {type(pair).__name__}.")
    rank = check_rank(rank, low=1, high=None)
    if method == "prefix":
        return truncate(pair, rank) if rank <= pair.rank else pad(pair, rank)
    xp, [pair], p = prepare([pair], None)
    U, S, Vh = _factored_svd(xp, [pair], p)
    return _download_pair(xp, U, S, Vh, rank)


def _download_pair(xp, U, S, Vh, rank: int) -> FactorPair:
    r"""``B = [U_t diag(S_t) | 0]``, ``A = [Vh_t; C]``: FlexLoRA's download (see :func:`redistribute`)."""
    m, d_in = Vh.shape
    t = min(rank, m)
    down = FactorPair(U[:, :t] * S[None, :t], Vh[:t, :])
    n_fill = min(rank, d_in) - t  # complement rows that fit in d_in dimensions (0 when rank <= m)
    if n_fill > 0:  # then t = m: every singular direction is used
        zeros = xp.zeros((U.shape[0], n_fill), dtype=U.dtype, device=device(U))
        # zero columns of B opposite the complement rows of A, so B A is unchanged
        C = _orthonormal_complement(xp, Vh, n_fill)
        down = FactorPair(xp.concat([down.B, zeros], axis=1), xp.concat([down.A, C], axis=0))
    # rows past d_in cannot be orthonormal to the others: zero in both factors
    return pad(down, rank) if rank > down.rank else down


def _orthonormal_complement(xp, Vh, n: int):
    r"""``n`` orthonormal rows, orthogonal to the (orthonormal) rows of ``Vh``, deterministically.

    .. math:: [V^{h\top} \mid G_c] = Q R,\qquad C = Q_{:, m:m+n}^\top

    where ``Vh`` has shape (m, d_in) with ``m + n <= d_in``, ``G_c`` shape (d_in, n) is Gaussian from a
    fixed seed (column ``j`` the same for every ``n``), and ``Q R`` is the thin Householder QR, whose
    ``Q`` is orthonormal even when ``[Vh^T | G_c]`` is rank-deficient. Returns shape (n, d_in),
    in ``Vh``'s namespace, dtype and device.
    """
    m, d_in = Vh.shape
    work = compute_dtype(xp, Vh.dtype)
    # rows drawn in order, so row j of (n, d_in) draws is the same for every n: the prefix property
    G = np.random.default_rng(COMPLEMENT_SEED).standard_normal((n, d_in))
    Gc = xp.asarray(np.ascontiguousarray(G.T), dtype=work, device=device(Vh))
    stacked = xp.concat([xp.permute_dims(xp.astype(Vh, work), (1, 0)), Gc], axis=1)  # (d_in, m + n)
    Q, _ = xp.linalg.qr(stacked)  # Q[:, :m] spans the rows of Vh, Q[:, m:] is orthogonal to them
    return xp.astype(xp.permute_dims(Q[:, m:], (1, 0)), Vh.dtype)
