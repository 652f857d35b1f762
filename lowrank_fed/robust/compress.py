r"""Lossless compression of the CLAIR program, and lifting its subspace back.

For a LoRA update ``Theta_k = B_k A_k`` with ``A_k^T = Qa_k Ra_k`` (thin QR),

.. math::

    \Theta_k = (B_k Ra_k^\top)\, Qa_k^\top = G_k\, Qa_k^\top,

and right-multiplying a block by orthonormal rows changes neither ``||.||_*`` of the stack nor
``||.||_F`` of the block. Any feasible ``(L, S)`` can be projected onto those row spaces without
raising the objective, so the program on ``[G_1 .. G_K]`` (``p x sum r_k``) has the same optimal
value, the same column space of ``L`` and the same block norms of ``S``. On the left,
``[G_1 .. G_K] = Q Rg`` (thin QR) and the program on ``Rg`` (``R x R``, ``R = sum r_k``) is again
equivalent (left-multiplying by ``Q^T`` keeps every norm). A last orthogonal rotation
``Rg -> W^T Rg`` (``W`` the eigenvectors of ``Rg Rg^T``) drops rows of norm at rounding level.

where

- ``B_k`` shape ``(p, r_k)``, ``A_k`` shape ``(r_k, d_in)``, ``Qa_k`` shape ``(d_in, r_k)``,
- ``Q`` shape ``(p, R)`` with orthonormal columns; the subspace lifts back as ``U = Q W Uc``.

Base unknown: the centring ``center(X) = X (P_K kron I)`` must commute with the right
compression, which holds when every block uses *one* basis: ``[A_1; ..; A_K]^T = Qa Ra`` and
``Theta_k = B_k Ra_k^T Qa^T`` with ``Ra_k = Ra[:, cols_k]``, because
``(I_K kron Qa^T)(P_K kron I) = (P_K kron I)(I_K kron Qa^T)``. The left basis is that of
``[B_1 .. B_K]``. Dense input is treated the same way (a block wider than ``p`` is compressed to
``p`` columns, a stack taller than it is wide is QR-reduced).

Notes
-----
Our derivation (docs/methods.md#compression). No ``d_out x d_in`` matrix is formed for LoRA input.
The cost is one thin QR of a ``p x R`` matrix plus ``O(R^2 N)`` on the compressed side.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

from .problem import Blocks, ClairProblem

__all__ = ["Lift", "compress_pairs", "compress_dense", "stack_dense"]

_EPS = np.finfo(np.float64).eps


class Lift:
    r"""``U = Q (W Uc)``: from compressed left coordinates back to ``R^p``.

    ``Q`` is held as Householder reflectors (LAPACK ``geqrf`` output, applied with ``ormqr``), so
    the ``p x R`` orthonormal matrix is never formed; ``W`` (``m0 x m``) is the rank-revealing
    rotation. Either may be absent (identity).
    """

    def __init__(self, n_rows: int, qr=None, W=None):
        self.n_rows = n_rows
        self.qr = qr
        self.W = W

    def __call__(self, Uc: np.ndarray) -> np.ndarray:
        Z = self.W @ Uc if self.W is not None else Uc
        if self.qr is None:
            return np.ascontiguousarray(Z)
        a, tau = self.qr
        C = np.zeros((self.n_rows, Z.shape[1]), order="F")
        C[: Z.shape[0]] = Z
        if Z.shape[1] == 0:
            return np.ascontiguousarray(C)
        out, _, info = sla.lapack.dormqr("L", "N", a, tau, C, lwork=max(1, 64 * Z.shape[1]), overwrite_c=True)
        if info != 0:  # pragma: no cover - LAPACK argument error
            raise RuntimeError(f"LAPACK dormqr failed with info = {info}.")
        return np.ascontiguousarray(out)


def _left_reduce(G: np.ndarray):
    """``G = Q Rg`` when ``G`` is taller than wide (returns ``Rg`` and Q's reflectors), else ``(G, None)``."""
    p, n = G.shape
    if p <= n:
        return G, None
    (a, tau), Rg = sla.qr(G, mode="raw", check_finite=False)
    return np.triu(Rg[:n, :]), (a, tau)


def _finish(Mc: np.ndarray, blocks: Blocks, base_known: bool, n_rows: int, qr) -> ClairProblem:
    r"""Rotate ``Mc`` to ``W^T Mc`` (orthogonal rows, descending norms) and drop rows at rounding level."""
    m0 = Mc.shape[0]
    if m0 == 0 or Mc.shape[1] == 0:
        return ClairProblem(Mc, blocks, base_known, n_rows, Lift(n_rows, qr, None), np.zeros(0), True)
    evals, W = np.linalg.eigh(Mc @ Mc.T)
    W = W[:, ::-1]
    rotated = W.T @ Mc
    norms = np.sqrt(np.einsum("ij,ij->i", rotated, rotated))
    # Rows are orthogonal with norms = singular values; those at rounding level carry no data.
    keep = norms > 64 * _EPS * max(float(np.sqrt(np.sum(norms**2))), 1e-300)
    keep[0] = True
    order = np.argsort(-norms[keep], kind="stable")
    W = W[:, keep][:, order]
    rotated = rotated[keep][order]
    lift = Lift(n_rows, qr, W)
    rotated = np.ascontiguousarray(rotated)
    return ClairProblem(rotated, blocks, base_known, n_rows, lift, norms[keep][order], True)


def compress_pairs(Bs: list[np.ndarray], As: list[np.ndarray], *, base_known: bool) -> ClairProblem:
    r"""The CLAIR program of LoRA updates ``B_k A_k``, compressed losslessly (never densified).

    Parameters
    ----------
    Bs, As : list of ndarray
        ``B_k`` shape ``(p, r_k)``, ``A_k`` shape ``(r_k, d_in)``, float64.
    base_known : bool

    Returns
    -------
    ClairProblem
        Base known: blocks of width ``min(r_k, d_in)``; base unknown: ``K`` blocks of one width
        ``min(R, d_in)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Bs = [rng.normal(size=(40, 2)) for _ in range(3)]
    >>> As = [rng.normal(size=(2, 30)) for _ in range(3)]
    >>> prob = compress_pairs(Bs, As, base_known=True)
    >>> prob.M.shape, prob.blocks.widths
    ((6, 6), (2, 2, 2))
    >>> dense = np.hstack([B @ A for B, A in zip(Bs, As)])
    >>> bool(np.isclose(np.linalg.norm(prob.M, "nuc"), np.linalg.norm(dense, "nuc")))
    True
    """
    p = Bs[0].shape[0]
    ranks = [B.shape[1] for B in Bs]
    if base_known:
        if len(set(ranks)) == 1 and ranks[0] > 0:
            # Batched: A_k^T = Qa_k Ra_k, G_k = B_k Ra_k^T.
            Ra = np.linalg.qr(np.stack([A.T for A in As]), mode="r")  # (K, min(d_in, r), r)
            Gs = np.matmul(np.stack(Bs), np.swapaxes(Ra, 1, 2))  # (K, p, min(d_in, r))
            G = np.ascontiguousarray(np.swapaxes(Gs, 0, 1).reshape(p, -1))
            widths = [Gs.shape[2]] * len(Bs)
        else:
            Gs = [B @ np.linalg.qr(A.T, mode="r").T for B, A in zip(Bs, As, strict=True)]
            G = np.hstack(Gs)
            widths = [g.shape[1] for g in Gs]
        Mc, qr = _left_reduce(G)
        return _finish(Mc, Blocks(tuple(widths)), True, p, qr)
    # Base unknown: one right basis for all blocks so that centring commutes with compression.
    A_all = np.vstack(As)  # (R, d_in)
    Ra = np.linalg.qr(A_all.T, mode="r")  # A_all^T = Qa Ra, Ra shape (min(d_in, R), R)
    starts = np.concatenate([[0], np.cumsum(ranks)])
    B_all = np.hstack(Bs)  # (p, R); every G_k = B_k Ra_k^T has columns in its span
    Rb, qr = _left_reduce(B_all)
    blocks_c = [Rb[:, starts[k] : starts[k + 1]] @ Ra[:, starts[k] : starts[k + 1]].T for k in range(len(Bs))]
    Mc = np.hstack(blocks_c)
    return _finish(Mc, Blocks(tuple(b.shape[1] for b in blocks_c)), False, p, qr)


def compress_dense(Ms: list[np.ndarray], *, base_known: bool) -> ClairProblem:
    r"""The CLAIR program of dense updates ``Theta_k`` (``p x q_k``), compressed losslessly.

    A block wider than ``p`` is replaced by ``Rk^T`` from ``Theta_k^T = Qk Rk`` (base known
    only); a stack taller than it is wide is QR-reduced on the left; rows at rounding level are
    dropped after an orthogonal rotation.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> Ms = [rng.normal(size=(20, 3)) for _ in range(2)]
    >>> prob = compress_dense(Ms, base_known=False)
    >>> prob.M.shape, prob.blocks.widths
    ((6, 6), (3, 3))
    """
    p = Ms[0].shape[0]
    if base_known:
        Gs = [M if M.shape[1] <= p else np.linalg.qr(M.T, mode="r").T for M in Ms]
    else:
        Gs = list(Ms)
    G = np.hstack(Gs)
    Mc, qr = _left_reduce(G)
    return _finish(Mc, Blocks(tuple(g.shape[1] for g in Gs)), base_known, p, qr)


def stack_dense(Ms: list[np.ndarray], *, base_known: bool) -> ClairProblem:
    r"""The uncompressed program on ``M = [Theta_1 .. Theta_K]`` (reference and tests only).

    Examples
    --------
    >>> import numpy as np
    >>> stack_dense([np.ones((2, 3)), np.ones((2, 1))], base_known=True).M.shape
    (2, 4)
    """
    M = np.ascontiguousarray(np.hstack(Ms))
    return ClairProblem(
        M, Blocks(tuple(m.shape[1] for m in Ms)), base_known, M.shape[0], Lift(M.shape[0]), np.zeros(0), False
    )
