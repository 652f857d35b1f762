r"""The CLAIR program, stated once: block operators, objectives, duality gaps.

Base known (block Outlier Pursuit on the stacked updates ``M = [Theta_1 .. Theta_K]``):

.. math::

    \text{noiseless:}\quad \min_{L, S}\ \|L\|_* + \lambda \sum_k \|S_k\|_F
    \quad \text{s.t.}\quad M = L + S,

    \text{noisy:}\quad \min_{L, S}\ \tfrac12 \|M - L - S\|_F^2 + \alpha \|L\|_*
    + \alpha \lambda \sum_k \|S_k\|_F.

Base unknown (the centred, pairwise-difference form): the same with ``M = L + S + C 1^T`` where
``C`` (shape ``(p, q)``, the unknown base ``W0``) is unpenalised and ``L`` is block-centred,
``sum_k L_k = 0``.

where

- ``M_k``, ``L_k``, ``S_k`` are the column blocks of client ``k`` (shape ``(p, q_k)``),
- ``C 1^T = [C .. C]`` repeats one ``(p, q)`` block ``K`` times (equal widths ``q_k = q``),
- ``center(X)_k = X_k - mean_j X_j`` and ``blockmean(X) = mean_k X_k``,
- ``lam > 0`` weighs the block penalty, ``alpha > 0`` the noise level of the penalised program.

Duals (used for the stopping rule of every solver and reported as ``gap``):

.. math::

    \text{noiseless:}\ \max_Y \langle Y, M\rangle, \quad
    \text{noisy:}\ \max_Y \langle Y, M\rangle - \tfrac12 \|Y\|_F^2,

subject to ``||Y||_2 <= 1`` (``<= alpha`` noisy), ``||Y_k||_F <= lam`` (``<= alpha lam``) and,
base unknown, ``sum_k Y_k = 0``. A feasible ``Y`` is obtained by scaling a centred candidate,
``Ytil = center(Y) / max(||center(Y)||_2, max_k ||center(Y)_k||_F / lam)``
(docs/methods.md#the-program), and ``gap = primal - dual >= 0`` bounds the suboptimality of the
primal point.

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours): the abstract names the ingredients
(shared subspace, contaminated clients, cross-client refinement); the block Outlier Pursuit form,
the centred base-unknown form and the duals are our derivation (docs/methods.md#the-program).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg as sla

__all__ = [
    "Blocks",
    "ClairProblem",
    "SolverResult",
    "noiseless_objective",
    "noisy_objective",
    "noiseless_gap",
    "noisy_gap",
    "spectral_norm",
]


@dataclass(frozen=True)
class Blocks:
    r"""The column-block structure of ``M = [M_1 .. M_K]``: widths ``q_k``, in that order.

    Examples
    --------
    >>> import numpy as np
    >>> b = Blocks((1, 2))
    >>> X = np.array([[3.0, 0.0, 4.0]])
    >>> b.norms(X).tolist(), b.soft(X, 1.0).tolist()
    ([3.0, 4.0], [[2.0, 0.0, 3.0]])
    """

    widths: tuple[int, ...]
    starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        widths = tuple(int(w) for w in self.widths)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "starts", np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.intp))

    @property
    def n_blocks(self) -> int:
        return len(self.widths)

    @property
    def n_cols(self) -> int:
        return int(sum(self.widths))

    @property
    def equal(self) -> bool:
        return len(set(self.widths)) == 1

    def slices(self) -> list[slice]:
        return [slice(int(s), int(s) + w) for s, w in zip(self.starts, self.widths, strict=True)]

    def norms(self, X: np.ndarray) -> np.ndarray:
        """``(||X_1||_F, .., ||X_K||_F)`` (0 for an empty block)."""
        col_sq = np.einsum("ij,ij->j", X, X)
        out = np.zeros(self.n_blocks)
        nonempty = np.asarray(self.widths) > 0
        if col_sq.size:  # reduceat over the strictly increasing starts of the non-empty blocks
            out[nonempty] = np.sqrt(np.add.reduceat(col_sq, self.starts[nonempty]))
        return out

    def scale(self, X: np.ndarray, factors: np.ndarray) -> np.ndarray:
        """Multiply block ``k`` of ``X`` by ``factors[k]``."""
        return X * np.repeat(factors, self.widths)[None, :]

    def soft(self, X: np.ndarray, tau: float) -> np.ndarray:
        r"""Block soft-thresholding, the prox of ``tau sum_k ||.||_F``: ``X_k max(0, 1 - tau/||X_k||_F)``."""
        norms = self.norms(X)
        with np.errstate(divide="ignore", invalid="ignore"):
            factors = np.where(norms > tau, 1.0 - tau / np.where(norms > 0, norms, 1.0), 0.0)
        return self.scale(X, factors)

    def mean(self, X: np.ndarray) -> np.ndarray:
        """``blockmean(X) = mean_k X_k``, shape ``(m, q)`` (equal widths only)."""
        m = X.shape[0]
        return X.reshape(m, self.n_blocks, self.widths[0]).mean(axis=1)

    def tile(self, C: np.ndarray) -> np.ndarray:
        """``C 1^T = [C .. C]``, shape ``(m, K q)``."""
        return np.tile(C, (1, self.n_blocks))

    def center(self, X: np.ndarray) -> np.ndarray:
        """``center(X)_k = X_k - mean_j X_j`` (equal widths only)."""
        m = X.shape[0]
        X3 = X.reshape(m, self.n_blocks, self.widths[0])
        return (X3 - X3.mean(axis=1, keepdims=True)).reshape(m, -1)


@dataclass(frozen=True)
class ClairProblem:
    r"""Data of one CLAIR program, possibly compressed: ``M`` and its block structure.

    Attributes
    ----------
    M : ndarray, shape (m, N)
        The (compressed) stacked updates. Compression multiplies ``M`` on the left by a matrix
        with orthonormal rows and each block on the right by one with orthonormal columns, which
        changes neither the nuclear norm nor any block norm (:mod:`lowrank_fed.robust.compress`).
    blocks : Blocks
        Block widths in the coordinates of ``M``.
    base_known : bool
        True: ``M = L + S``. False: ``M = L + S + C 1^T`` with ``L`` centred.
    n_rows : int
        ``p``, the number of rows of the uncompressed updates.
    lift : object
        Maps compressed left coordinates back to ``R^p``: ``U = lift(Uc)``.
    sigma : ndarray
        Singular values of ``M`` when the compression computed them (else empty).
    compressed : bool
        Whether ``M`` is a compression of the input (False: the stacked input itself).
    """

    M: np.ndarray
    blocks: Blocks
    base_known: bool
    n_rows: int
    lift: Any
    sigma: np.ndarray
    compressed: bool

    @property
    def n_clients(self) -> int:
        return self.blocks.n_blocks

    def centred(self, X: np.ndarray) -> np.ndarray:
        """``X`` if the base is known, else ``center(X)``."""
        return X if self.base_known else self.blocks.center(X)

    def base_of(self, X: np.ndarray) -> np.ndarray:
        """``blockmean(X) 1^T`` if the base is unknown, else 0 (same shape as ``X``)."""
        if self.base_known:
            return np.zeros_like(X)
        return self.blocks.tile(self.blocks.mean(X))


@dataclass(frozen=True)
class SolverResult:
    r"""What every solver of the program returns (in the coordinates of ``ClairProblem.M``).

    ``L``, ``S`` shape ``(m, N)``; ``C`` shape ``(m, q)`` (shape ``(m, 0)`` when the base is known);
    ``objective`` is the primal value at a feasible point, ``gap`` the duality gap there;
    ``state`` is solver-specific warm-start data.
    """

    L: np.ndarray
    S: np.ndarray
    C: np.ndarray
    lam: float
    alpha: float | None
    objective: float
    gap: float
    n_iter: int
    converged: bool
    solver: str
    seconds: float
    state: Any = None


def spectral_norm(X: np.ndarray) -> float:
    """``||X||_2``, through the Gram matrix of the shorter side."""
    if X.size == 0:
        return 0.0
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
    d = G.shape[0]
    try:
        top = sla.eigh(G, eigvals_only=True, subset_by_index=(d - 1, d - 1), driver="evr", check_finite=False)
    except np.linalg.LinAlgError:  # LAPACK's evr can fail on a repeated top eigenvalue: all of them, then
        top = np.linalg.eigvalsh(G)
    return float(np.sqrt(max(float(top[-1]), 0.0)))


def noiseless_objective(L: np.ndarray, S: np.ndarray, lam: float, blocks: Blocks, *, nuclear=None) -> float:
    r"""``||L||_* + lam sum_k ||S_k||_F`` (``nuclear`` may pass ``||L||_*`` when already known)."""
    if nuclear is None:
        nuclear = float(np.linalg.svd(L, compute_uv=False).sum()) if L.size else 0.0
    return float(nuclear + lam * blocks.norms(S).sum())


def noisy_objective(
    M: np.ndarray, L: np.ndarray, S: np.ndarray, base: np.ndarray, lam: float, alpha: float, blocks: Blocks,
    *, nuclear=None,
) -> float:
    r"""``1/2 ||M - L - S - C 1^T||_F^2 + alpha ||L||_* + alpha lam sum_k ||S_k||_F`` (``base = C 1^T``)."""
    if nuclear is None:
        nuclear = float(np.linalg.svd(L, compute_uv=False).sum()) if L.size else 0.0
    R = M - L - S - base
    return float(0.5 * np.vdot(R, R) + alpha * nuclear + alpha * lam * blocks.norms(S).sum())


def noiseless_gap(problem: ClairProblem, L, C_tiled, Y, lam: float, *, nuclear=None, spectral=None):
    r"""Primal value at the feasible point ``(L, S = M - L - C 1^T)`` and its duality gap.

    The dual candidate is ``Ytil = c Y`` with ``c = 1 / max(||Y||_2, max_k ||Y_k||_F / lam)``
    after centring ``Y`` (base unknown); ``<Ytil, M>`` is a lower bound on the optimum.

    Parameters
    ----------
    L, C_tiled : ndarray, shape (m, N)
        Primal iterate (``L`` centred when the base is unknown; ``C_tiled = C 1^T``).
    Y : ndarray, shape (m, N)
        Dual candidate (a multiplier of ``M = L + S + C 1^T``).
    nuclear, spectral : float, optional
        ``||L||_*`` and ``||center(Y)||_2`` when the caller knows them.

    Returns
    -------
    primal, gap : float
    """
    blocks = problem.blocks
    S = problem.M - L - C_tiled
    primal = noiseless_objective(L, S, lam, blocks, nuclear=nuclear)
    Yc = problem.centred(Y)
    if spectral is None:
        spectral = spectral_norm(Yc)
    denom = max(spectral, float(blocks.norms(Yc).max()) / lam)
    dual = float(np.vdot(Yc, problem.M)) / denom if denom > 0 else 0.0
    return primal, primal - dual


def noisy_gap(
    problem: ClairProblem, L, S, C_tiled, Y, lam: float, alpha: float, *, nuclear=None, spectral=None
):
    r"""Primal value of the penalised program at ``(L, S, C)`` and its duality gap.

    The dual ``D(Y) = <Y, M> - 1/2 ||Y||_F^2`` is evaluated at ``t Yc`` (``Yc`` the centred
    candidate), ``t`` the maximiser of the concave quadratic over the feasible scalings
    ``0 <= t <= min(alpha / ||Yc||_2, alpha lam / max_k ||Yc_k||_F)``.

    Returns
    -------
    primal, gap : float
    """
    blocks = problem.blocks
    # C_tiled may be the scalar 0.0 (base known)
    primal = noisy_objective(problem.M, L, S, C_tiled, lam, alpha, blocks, nuclear=nuclear)
    Yc = problem.centred(Y)
    if spectral is None:
        spectral = spectral_norm(Yc)
    yy = float(np.vdot(Yc, Yc))
    if yy == 0.0:
        return primal, primal
    t_max = min(
        alpha / spectral if spectral > 0 else np.inf,
        alpha * lam / max(float(blocks.norms(Yc).max()), 1e-300),
    )
    ym = float(np.vdot(Yc, problem.M))
    t = min(max(ym / yy, 0.0), t_max)
    dual = t * ym - 0.5 * t * t * yy
    return primal, primal - dual
