r"""Choosing ``lam``: the theory default and a warm-started path that picks a stable plateau.

Default (the theory window ``sqrt(r / ((1 - gamma) K)) < lam < sqrt(q) / sqrt(gamma K)``):

.. math::

    \lambda_0 = 2 \sqrt{\frac{r}{(1 - \bar\gamma) K}},

where

- ``r`` is the rank of the shared subspace, ``K`` the number of clients,
- ``gamma_bar`` an upper bound on the contaminated fraction.

Path: ``lam`` runs down a geometric grid from ``lam_hi`` (above which ``S = 0`` is optimal:
``lam_hi = max_k ||V_k||_F`` for ``M = U diag(s) V^T``) to ``lam_lo`` (below which ``L = 0`` is
optimal: ``lam_lo = 1 / ||[M_k / ||M_k||_F]_k||_2``), each solve warm-started from the previous one.
At each ``lam`` the state is ``(rank L, flagged set)``. A state is admissible when ``rank L >= 1`` and
fewer than half the clients are flagged (a benign majority; if ``rank`` is given, also
``rank L == rank`` when any state has it). The chosen ``lam`` is the middle of the longest run of
consecutive grid points with one admissible state (ties: lower rank, then larger ``lam``).

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours). Outlier Pursuit's ``3 / (7 sqrt(gamma n))``
does not carry over (it returns ``L = 0``); the window and the plateau rule are ours
(docs/methods.md#choosing-lam). The bounds ``lam_hi``/``lam_lo`` are exact for a known base (``lam_hi``
uses the dual certificate ``U V^T``, an upper bound) and computed on the centred data otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .problem import ClairProblem, SolverResult, spectral_norm

__all__ = ["default_lam", "lam_window", "numerical_rank", "select_plateau", "LamPath", "lam_path"]


def default_lam(rank: int, n_clients: int, gamma_bar: float = 0.2) -> float:
    r"""``2 sqrt(rank / ((1 - gamma_bar) K))``.

    Examples
    --------
    >>> round(default_lam(2, 20, 0.2), 4)
    0.7071
    """
    return float(2.0 * np.sqrt(rank / ((1.0 - gamma_bar) * n_clients)))


def numerical_rank(s: np.ndarray, rank_tol: float, scale: float = 0.0) -> int:
    """Number of singular values above ``rank_tol * max(s[0], scale)`` (``s`` descending).

    ``scale`` (the data's spectral norm) keeps an ``L`` at the solver's accuracy level from counting.

    Examples
    --------
    >>> numerical_rank([3.0, 1.0, 1e-9], 1e-6), numerical_rank([1e-9, 1e-9], 1e-6, scale=1.0)
    (2, 0)
    """
    s = np.asarray(s)
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > rank_tol * max(float(s[0]), scale)))


def lam_window(problem: ClairProblem) -> tuple[float, float]:
    r"""``(lam_lo, lam_hi)``: below ``lam_lo`` the optimum has ``L = 0``; above ``lam_hi``, ``S = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed.robust.compress import stack_dense
    >>> lo, hi = lam_window(stack_dense([np.eye(2)[:, :1], np.eye(2)[:, 1:]], base_known=True))
    >>> float(lo), float(hi)
    (1.0, 1.0)
    """
    M, blocks = problem.M, problem.blocks
    cM = problem.centred(M)
    norms = blocks.norms(cM)
    nonzero = norms > 0
    if not nonzero.any():
        return 1.0, 1.0
    unit = blocks.scale(cM, np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0))
    lam_lo = 1.0 / spectral_norm(unit)
    # S = 0 is optimal once lam >= max_k ||U V_k^T||_F = max_k ||V_k||_F (V: right singular vectors of cM).
    G = cM @ cM.T
    evals, W = np.linalg.eigh(G)
    keep = evals > 64 * np.finfo(np.float64).eps * max(evals[-1], 1e-300) * max(G.shape[0], 1)
    Vt = (W[:, keep].T @ cM) / np.sqrt(evals[keep])[:, None]
    lam_hi = float(blocks.norms(Vt).max()) if Vt.size else lam_lo
    return float(lam_lo), float(lam_hi)


def select_plateau(ranks, flagged, n_clients: int, rank: int | None = None) -> tuple[int, int, int]:
    r"""``(start, stop, chosen)``: the longest run of one admissible ``(rank, flagged)`` state.

    ``ranks[i]`` and ``flagged[i]`` (a tuple of client indices) describe grid point ``i``, grid in
    descending ``lam``. Returns ``(0, 0, i)`` with ``i`` the first point of rank >= 1 (or 0) when no
    point is admissible.

    Examples
    --------
    >>> select_plateau([5, 2, 2, 2, 1, 0], [(), (3,), (3,), (3,), (0, 3), (0, 1, 2, 3)], 8)
    (1, 4, 2)
    """
    n = len(ranks)
    admissible = [ranks[i] >= 1 and 2 * len(flagged[i]) < n_clients for i in range(n)]
    if rank is not None and any(admissible[i] and ranks[i] == rank for i in range(n)):
        admissible = [admissible[i] and ranks[i] == rank for i in range(n)]
    best = None  # (length, -rank, -start) compared lexicographically; larger is better
    i = 0
    while i < n:
        if not admissible[i]:
            i += 1
            continue
        j = i + 1
        while j < n and admissible[j] and ranks[j] == ranks[i] and flagged[j] == flagged[i]:
            j += 1
        key = (j - i, -ranks[i], -i)
        if best is None or key > best[0]:
            best = (key, i, j)
        i = j
    if best is None:
        first = next((i for i in range(n) if ranks[i] >= 1), 0)
        return 0, 0, first
    _, start, stop = best
    return start, stop, (start + stop - 1) // 2


@dataclass(frozen=True)
class LamPath:
    r"""A ``lam`` path: the grid (descending), the state at each point and the chosen plateau.

    Attributes
    ----------
    lams : ndarray, shape (n,)
    ranks : ndarray of int, shape (n,)
        Numerical rank of ``L`` at each ``lam``.
    flagged : tuple of tuple of int
        The flagged clients at each ``lam``.
    objectives, gaps : ndarray, shape (n,)
    converged : ndarray of bool, shape (n,)
    start, stop : int
        The plateau is ``lams[start:stop]`` (empty if no state was admissible).
    chosen : int
        Index of the chosen ``lam``.
    n_iter : int
        Iterations summed over the path.
    """

    lams: np.ndarray
    ranks: np.ndarray
    flagged: tuple
    objectives: np.ndarray
    gaps: np.ndarray
    converged: np.ndarray
    start: int
    stop: int
    chosen: int
    n_iter: int

    @property
    def stable(self) -> bool:
        """Whether an admissible plateau of at least two grid points was found."""
        return self.stop - self.start >= 2


def lam_path(
    problem: ClairProblem,
    solve: Callable[[float, object], SolverResult],
    state: Callable[[SolverResult], tuple[int, tuple]],
    *,
    n_lams: int = 16,
    rank: int | None = None,
) -> tuple[LamPath, SolverResult]:
    r"""Solve along a geometric ``lam`` grid (descending, warm-started) and choose the plateau.

    Parameters
    ----------
    problem : ClairProblem
    solve : callable ``(lam, warm) -> SolverResult``
        ``warm`` is the previous result's ``state`` (None at the first point).
    state : callable ``SolverResult -> (rank, flagged indices)``
    n_lams : int
        Grid size (>= 2).
    rank : int, optional
        Prefer plateaus of this rank.

    Returns
    -------
    path : LamPath
    result : SolverResult at the chosen ``lam``
    """
    lo, hi = lam_window(problem)
    if not hi > lo * 1.01:  # a degenerate window: look around it
        lo, hi = min(lo, hi) / 2.0, max(lo, hi) * 2.0
    lams = np.geomspace(hi, lo, n_lams)
    results, ranks, flagged = [], [], []
    warm = None
    for lam in lams:
        res = solve(float(lam), warm)
        warm = res.state
        r, f = state(res)
        results.append(res)
        ranks.append(int(r))
        flagged.append(tuple(int(k) for k in f))
    start, stop, chosen = select_plateau(ranks, flagged, problem.n_clients, rank)
    path = LamPath(
        lams=lams,
        ranks=np.asarray(ranks),
        flagged=tuple(flagged),
        objectives=np.array([r.objective for r in results]),
        gaps=np.array([r.gap for r in results]),
        converged=np.array([r.converged for r in results]),
        start=start,
        stop=stop,
        chosen=chosen,
        n_iter=int(sum(r.n_iter for r in results)),
    )
    return path, results[chosen]
