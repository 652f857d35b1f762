r"""Choosing ``lam``: the theory default and a warm-started path that picks a stable plateau.

Default (the theory window ``sqrt(r / ((1 - gamma) K)) < lam < sqrt(q) / sqrt(gamma K)``):

.. math::

    \lambda_0 = 2 \sqrt{\frac{r}{(1 - \bar\gamma) K}},

where

- ``r`` is the rank of the shared subspace, ``K`` the number of clients,
- ``gamma_bar`` an upper bound on the contaminated fraction.

Path (``lam="path"``; :func:`~lowrank_fed.robust.clair`'s default ``"auto"`` uses it except for the
penalised program with ``rank`` given, where it uses ``lambda_0``):

.. math::

    \lambda_i = \lambda_{hi} (\lambda_{lo} / \lambda_{hi})^{i / (n - 1)},\quad i = 0..n-1,\qquad
    \lambda^\star = \lambda_{\lfloor (s + e - 1) / 2 \rfloor},

where

- ``lam_hi = max_k ||V_k||_F`` for ``M = U diag(s) V^T`` (above it ``S = 0`` is optimal) and
  ``lam_lo = 1 / ||[M_k / ||M_k||_F]_k||_2`` (below it ``L = 0`` is optimal); each solve is
  warm-started from the previous one,
- ``[s, e)`` is the longest run of consecutive grid points with one admissible state
  ``(rank L, flagged set F)`` (ties: lower rank, then larger ``lam``); with ``rank`` given, the state is
  ``F`` alone,
- a state is admissible when ``rank L >= 1`` and ``2 |F| < K`` (a benign majority). With ``rank = r``
  given it must also be *consistent*: every client that leaves the top-``r`` subspace of ``L`` is
  flagged, ``res_k > tau max_j ||M_j||_F and z_k > z_thr  =>  k in F`` (``res``, ``z``, ``tau``,
  ``z_thr`` as in :mod:`~lowrank_fed.robust.detection`); among consistent states, those with numerical
  ``rank L == r`` are preferred when there are any.

Consistency replaces "numerical rank of ``L`` equals ``r``" as the test that the attackers are not
absorbed into ``L``: the numerical rank counts noise directions once the updates carry any noise above
``rank_tol``, and the path then fell back to the ``S = 0`` end (nobody flagged).

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours). Outlier Pursuit's ``3 / (7 sqrt(gamma n))``
does not carry over (it returns ``L = 0``); the window and the plateau rule are ours
(docs/methods.md#choosing-lam). The bounds ``lam_hi``/``lam_lo`` are exact for a known base (``lam_hi``
uses the dual certificate ``U V^T``, an upper bound) and computed on the centred data otherwise.
Measured (``proofs_check`` claim ``clair_lam_data_driven``, K = 40, p = 60, q = 12, r = 2): the path
recovers random, base-shift and coordinated attackers exactly up to ``gamma = 0.3``; the formula
``lambda_0`` fails coordinated attackers from ``gamma = 0.2``.
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


def select_plateau(
    ranks, flagged, n_clients: int, rank: int | None = None, consistent=None
) -> tuple[int, int, int]:
    r"""``(start, stop, chosen)``: the longest run of one admissible ``(rank, flagged)`` state.

    ``ranks[i]`` and ``flagged[i]`` (a tuple of client indices) describe grid point ``i``, grid in
    descending ``lam``; ``consistent[i]`` (optional) says whether every client leaving the top-``rank``
    subspace of ``L`` is flagged there. Admissible: ``ranks[i] >= 1`` and fewer than half the clients
    flagged; then, if ``rank`` is given, restricted to the consistent points (when ``consistent`` is given
    and some admissible point is consistent) and further to ``ranks[i] == rank`` (when some remaining point
    has it), and a run is one flagged set (without ``rank``: one ``(rank, flagged)`` pair). Returns
    ``(0, 0, i)`` with ``i`` the first point of rank >= 1 (or 0) when no point is admissible.

    Examples
    --------
    >>> select_plateau([5, 2, 2, 2, 1, 0], [(), (3,), (3,), (3,), (0, 3), (0, 1, 2, 3)], 8)
    (1, 4, 2)
    >>> # noisy updates: the numerical rank is never 2; consistency rules out the S = 0 end
    >>> select_plateau([9] * 6, [(), (), (), (3,), (3,), (3,)], 8, 2, [False] * 3 + [True] * 3)
    (3, 6, 4)
    """
    n = len(ranks)
    admissible = [ranks[i] >= 1 and 2 * len(flagged[i]) < n_clients for i in range(n)]
    if rank is not None and consistent is not None and any(a and c for a, c in zip(admissible, consistent)):
        admissible = [bool(a and c) for a, c in zip(admissible, consistent)]
    if rank is not None and any(admissible[i] and ranks[i] == rank for i in range(n)):
        admissible = [admissible[i] and ranks[i] == rank for i in range(n)]
    # With a rank given, the state is the flagged set: the numerical rank left after the filters above
    # is either ``rank`` everywhere or (noisy updates) counts noise directions, which must not split a run.
    same_rank = (lambda i, j: True) if rank is not None else (lambda i, j: ranks[i] == ranks[j])
    best = None  # (length, -rank, -start) compared lexicographically; larger is better
    i = 0
    while i < n:
        if not admissible[i]:
            i += 1
            continue
        j = i + 1
        while j < n and admissible[j] and same_rank(i, j) and flagged[j] == flagged[i]:
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
    consistent : ndarray of bool, shape (n,), or None
        Whether every client leaving the top-``rank`` subspace of ``L`` is flagged at each ``lam``
        (None when the state function does not report it, e.g. ``rank`` not given).
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
    consistent: np.ndarray | None = None

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
    state : callable ``SolverResult -> (rank, flagged indices)`` or ``(rank, flagged, consistent)``
    n_lams : int
        Grid size (>= 2).
    rank : int, optional
        Prefer plateaus of this rank (and, when ``state`` reports it, consistent ones; see
        :func:`select_plateau`).

    Returns
    -------
    path : LamPath
    result : SolverResult at the chosen ``lam``
    """
    lo, hi = lam_window(problem)
    if not hi > lo * 1.01:  # a degenerate window: look around it
        lo, hi = min(lo, hi) / 2.0, max(lo, hi) * 2.0
    lams = np.geomspace(hi, lo, n_lams)
    results, ranks, flagged, consistent = [], [], [], []
    warm = None
    for lam in lams:
        res = solve(float(lam), warm)
        warm = res.state
        r, f, *c = state(res)
        results.append(res)
        ranks.append(int(r))
        flagged.append(tuple(int(k) for k in f))
        consistent.append(bool(c[0]) if c else None)
    consistent = None if any(c is None for c in consistent) else np.asarray(consistent, dtype=bool)
    start, stop, chosen = select_plateau(ranks, flagged, problem.n_clients, rank, consistent)
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
        consistent=consistent,
    )
    return path, results[chosen]
