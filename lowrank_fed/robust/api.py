r"""CLAIR: contamination-aware collaborative low-rank recovery (the public entry point).

.. math::

    \min_{L, S, C}\ \|L\|_* + \lambda \sum_k \|S_k\|_F
    \quad\text{s.t.}\quad [\Theta_1 .. \Theta_K] = L + S\ (+\, C 1^\top,\ \textstyle\sum_k L_k = 0),

(or its penalised form ``1/2 ||M - L - S - C 1^T||_F^2 + alpha ||L||_* + alpha lam sum ||S_k||_F``), then

.. math::

    \hat U = \text{top-}r \text{ left singular vectors of } L,\quad
    \hat G = \{k \text{ not flagged}\},\quad
    \tilde\Theta_k = \hat P \Theta_k + (I - \hat P) \textstyle\sum_{j \in \hat G} \pi_j \Theta_j,

where

- ``Theta_k`` shape ``(p, q_k)`` is client ``k``'s update (a dense local estimate, or ``B_k A_k`` for
  a LoRA factor pair, which is never formed),
- ``C`` is the unknown base ``W0`` (``base_known=False``), unpenalised; ``L`` is then block-centred,
- flagged = the support of ``S`` among updates that leave the subspace (noiseless) or a robust z-score
  of off-subspace residuals (noisy),
- ``pi_j`` are the client weights restricted to ``G``.

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours, docs/methods.md#clair). Pieces:
:mod:`~lowrank_fed.robust.problem` (the program), :mod:`~lowrank_fed.robust.compress` (lossless
compression), :mod:`~lowrank_fed.robust.admm` (fast solvers), :mod:`~lowrank_fed.robust.cvx`
(CVXPY reference), :mod:`~lowrank_fed.robust.lam`, :mod:`~lowrank_fed.robust.detection`,
:mod:`~lowrank_fed.robust.refinement`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from array_api_compat import is_array_api_obj

from .._validation import as_weights, check_finite, check_pairs, namespace, to_numpy
from ..factors import FactorPair
from .admm import solve_admm, solve_fista
from .compress import compress_dense, compress_pairs
from .cvx import CVXPY_SOLVERS, solve_cvxpy
from .detection import Z_THRESHOLD, offsubspace_residuals, robust_zscores, support_flags
from .lam import LamPath, default_lam, lam_path, numerical_rank
from .problem import ClairProblem, SolverResult, spectral_norm
from .refinement import collaborative_weights, refine_dense, refine_pairs

__all__ = [
    "clair",
    "ClairResult",
    "ClairConvergenceWarning",
    "ClairWarning",
    "SOLVERS",
    "solve_program",
    "build_problem",
]

SOLVERS = ("admm", "cvxpy")
LAM_RULES = ("auto", "default", "path")


class ClairConvergenceWarning(RuntimeWarning):
    """A CLAIR solver stopped at ``max_iter`` before its duality-gap test passed."""


class ClairWarning(UserWarning):
    """A CLAIR result that is valid but degenerate (for example, every client flagged)."""


@dataclass(frozen=True)
class ClairResult:
    r"""The outcome of :func:`clair`.

    Attributes
    ----------
    subspace : ndarray, shape (p, rank)
        Orthonormal basis of the recovered shared subspace ``Uhat``.
    collaborative : ndarray of bool, shape (K,)
        The benign (not flagged) clients ``G``.
    block_norms : ndarray, shape (K,)
        ``||S_k||_F``, the contamination assigned to each client.
    refined : list
        Like the input: arrays ``P Theta_k + (I - P) mean_G Theta_j``, or for factor pairs a read-only
        list of exact FactorPair of rank ``r_k + sum_{j in G} r_j`` (built on access), in the input's
        namespace and dtype. :func:`lowrank_fed.robust.refactor` brings them to client ranks.
    lam : float
        The ``lam`` solved for (chosen by the path when ``lam_path`` is set).
    objective, gap : float
        Primal value at a feasible point and its duality gap (``gap >= 0``; small relative to
        ``objective`` means solved).
    n_iter : int
        Solver iterations (summed over the path when there is one).
    converged : bool
        False if a solver hit ``max_iter`` (a :class:`ClairConvergenceWarning` was issued too).
    rank : int
        Number of columns of ``subspace``.
    singular_values : ndarray
        Singular values of ``L`` (descending, numerically non-zero).
    residuals, scores : ndarray, shape (K,)
        Off-subspace residual norms and their robust z-scores.
    alpha : float or None
        Noise weight of the penalised program; None for the noiseless one.
    base_known : bool
    solver : str
    seconds : float
        Wall time of the whole call.
    lam_path : LamPath or None
    """

    subspace: np.ndarray
    collaborative: np.ndarray
    block_norms: np.ndarray
    refined: Sequence
    lam: float
    objective: float
    gap: float
    n_iter: int
    converged: bool
    rank: int
    singular_values: np.ndarray
    residuals: np.ndarray
    scores: np.ndarray
    alpha: float | None
    base_known: bool
    solver: str
    seconds: float
    lam_path: LamPath | None = None

    @property
    def flagged(self) -> np.ndarray:
        """Indices of the flagged (contaminated) clients."""
        return np.flatnonzero(~self.collaborative)

    @property
    def noisy(self) -> bool:
        """Whether the penalised (noisy) program was solved."""
        return self.alpha is not None


def _check_updates(updates, base_known: bool):
    """Validate the client list; return ``(kind, xp, numpy blocks)`` with kind "pairs" or "dense"."""
    if isinstance(updates, FactorPair) or is_array_api_obj(updates) or not isinstance(updates, Sequence):
        raise TypeError(
            "Expected a list of client updates (FactorPair or 2-D arrays), one per client. "
            f"Got {type(updates).__name__}."
        )
    K = len(updates)
    if K < 2:
        raise ValueError(f"CLAIR needs at least 2 clients (K >= 2). Got K = {K}.")
    is_pair = [isinstance(u, FactorPair) for u in updates]
    if any(is_pair) and not all(is_pair):
        k = is_pair.index(not is_pair[0])
        first = "a FactorPair" if is_pair[0] else "an array"
        raise TypeError(
            f"Mixed input kinds: client 0 is {first} but client {k} is {type(updates[k]).__name__}; "
            "pass all FactorPair or all 2-D arrays."
        )
    if all(is_pair):
        xp, pairs = check_pairs(updates)
        Bs = [np.asarray(to_numpy(p.B), dtype=np.float64) for p in pairs]
        As = [np.asarray(to_numpy(p.A), dtype=np.float64) for p in pairs]
        return "pairs", xp, (Bs, As)
    for k, u in enumerate(updates):
        if not is_array_api_obj(u):
            raise TypeError(f"Client {k}: expected a FactorPair or a 2-D array. Got {type(u).__name__}.")
    xp = namespace(*updates)
    for k, u in enumerate(updates):
        if u.ndim != 2:
            raise ValueError(f"Client {k}: expected a 2-D array (p, q). Got ndim = {u.ndim}.")
    p, q = updates[0].shape
    for k, u in enumerate(updates):
        if u.shape[0] != p:
            raise ValueError(
                f"Client {k}: update has p = {u.shape[0]} rows; expected {p} (the rows of client 0)."
            )
        if not base_known and u.shape[1] != q:
            raise ValueError(
                f"Client {k}: update has q = {u.shape[1]} columns; expected {q} (the columns of client 0); "
                "an unknown base needs equal widths."
            )
        check_finite(xp, u, f"Client {k}: update")
    return "dense", xp, [np.asarray(to_numpy(u), dtype=np.float64) for u in updates]


def build_problem(kind: str, data, *, base_known: bool) -> ClairProblem:
    """The compressed program for validated numpy input (``kind`` "pairs" or "dense")."""
    if kind == "pairs":
        return compress_pairs(*data, base_known=base_known)
    return compress_dense(data, base_known=base_known)


def solve_program(
    problem: ClairProblem,
    lam: float,
    alpha: float | None = None,
    *,
    solver: str = "admm",
    tol: float = 1e-7,
    max_iter: int | None = None,
    warm=None,
    cvxpy_solver: str = "SCS",
) -> SolverResult:
    r"""Solve one program: ADMM (noiseless) or FISTA (noisy) for ``solver="admm"``, else CVXPY."""
    if solver == "cvxpy":
        return solve_cvxpy(problem, lam, alpha, solver=cvxpy_solver, tol=tol, max_iter=max_iter, warm=warm)
    if alpha is None:
        return solve_admm(problem, lam, tol=tol, max_iter=max_iter or 5000, warm=warm)
    return solve_fista(problem, lam, alpha, tol=tol, max_iter=max_iter or 10000, warm=warm)


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"The {name!r} parameter must be a number. Got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"The {name!r} parameter must be positive and finite. Got {value}.")
    return value


def _subspace(L: np.ndarray):
    """Left singular vectors and singular values of ``L`` (descending); the Gram route when very wide."""
    m, n = L.shape
    if L.size == 0:
        return np.zeros((m, 0)), np.zeros(0)
    if n > 4 * m:
        # L L^T = U diag(s^2) U^T: O(m^2 n) instead of an SVD of the wide matrix.
        evals, U = np.linalg.eigh(L @ L.T)
        return U[:, ::-1], np.sqrt(np.maximum(evals[::-1], 0.0))
    U, s, _ = np.linalg.svd(L, full_matrices=False)
    return U, s


def clair(
    updates,
    *,
    rank: int | None = None,
    lam: float | str | None = None,
    base_known: bool = True,
    solver: str = "admm",
    weights=None,
    tol: float = 1e-7,
    max_iter: int | None = None,
    noise: float | None = None,
    alpha: float | None = None,
    gamma_bar: float = 0.2,
    n_lams: int = 16,
    rank_tol: float = 1e-6,
    support_tol: float = 1e-4,
    z_threshold: float = Z_THRESHOLD,
    cvxpy_solver: str = "SCS",
) -> ClairResult:
    r"""Recover the shared subspace, flag contaminated clients and refine the benign updates.

    See the module docstring for the program. Parameters are keyword-only after ``updates``.

    Parameters
    ----------
    updates : list of FactorPair or list of 2-D arrays, length K >= 2
        LoRA deltas ``B_k A_k`` (never densified) or dense local estimates ``Theta_k``, shape
        ``(p, q_k)`` (equal ``q`` when ``base_known=False``). NumPy or any array-API library.
    rank : int, optional
        Rank of the shared subspace. None: the numerical rank of ``L`` (singular values above
        ``rank_tol * max(s_1(L), ||M||_2)``).
    lam : float, "auto", "path", "default" or None
        Block penalty. None means "auto", the default:

        .. math::

            \lambda = \begin{cases} \lambda^\star\ (\text{"path"}) & \text{noiseless program, or } r
            \text{ not given,} \\ \lambda_0 = 2\sqrt{r / ((1 - \bar\gamma) K)}\ (\text{"default"}) &
            \text{penalised program (noise or alpha given) with } r \text{ given.} \end{cases}

        "path": chosen from the data by a warm-started path down a geometric grid
        ``lam_i = lam_hi (lam_lo / lam_hi)^(i / (n_lams - 1))``, taking the middle
        ``lam* = lam_{floor((s + e - 1) / 2)}`` of the longest run ``[s, e)`` of grid points with one
        admissible state ``(rank L, flagged set F)``: ``rank L >= 1``, ``2 |F| < K`` and, when ``rank`` is
        given, every client that leaves the top-``rank`` subspace of ``L`` flagged
        (:func:`~lowrank_fed.robust.lam.select_plateau`); a :class:`ClairWarning` says when there is no
        such plateau of two or more points. "default": the formula ``lam_0`` (needs ``rank``; one solve
        instead of ``n_lams``). The formula lies above the window of coordinated attackers from
        ``gamma = 0.2`` in the noiseless program, where detection is the support of ``S``; in the penalised
        program detection is a z-score of residuals off the top-``rank`` subspace of ``L``, and the formula
        and the path flagged the same clients in every measured case (docs/methods.md#choosing-lam), so
        "auto" solves once there.
    base_known : bool
        True: the updates are deltas from a known base (LoRA). False: they share an unknown base
        ``W0`` (regression estimates); the centred program is solved.
    solver : {"admm", "cvxpy"}
        "admm": inexact ALM (noiseless) / FISTA (noisy); "cvxpy": the CVXPY reference.
    weights : array-like, shape (K,), optional
        Client weights for the refinement's benign average (uniform if None).
    tol : float
        Relative duality-gap (and feasibility) tolerance; the solver accuracy for CVXPY.
    max_iter : int, optional
        Iteration cap per solve (ADMM 5000, FISTA 10000, CVXPY the solver's default).
    noise : float, optional
        Per-entry noise level of the updates; solves the penalised program with
        ``alpha = noise (sqrt(p) + sqrt(sum_k q_k))`` (the expected spectral norm of that noise).
        None or 0: the noiseless program.
    alpha : float, optional
        The penalised program's weight directly (instead of ``noise``).
    gamma_bar : float, in [0, 1)
        Upper bound on the contaminated fraction, used by ``lam="default"``.
    n_lams : int
        Grid size of the ``lam`` path.
    rank_tol, support_tol : float
        Relative thresholds for the numerical rank of ``L`` and the support of ``S``.
    z_threshold : float
        Robust z-score above which a client is flagged (noisy program).
    cvxpy_solver : {"SCS", "CLARABEL"}

    Returns
    -------
    ClairResult

    Raises
    ------
    TypeError
        Not a list, mixed FactorPair/arrays, arrays of different libraries, non-numeric options.
    ValueError
        K < 2, wrong or inconsistent shapes (naming the client), non-finite entries, ``rank`` out of
        range, unknown ``solver``/``lam`` rule, invalid weights or tolerances.

    Warns
    -----
    ClairConvergenceWarning
        When a solve stopped at ``max_iter``; the result then has ``converged=False``.

    Notes
    -----
    Reconstruction of CLAIR (paper abstract; formulation ours). Cost for LoRA input: one thin QR of
    the ``p x sum r_k`` stack, then iterations on a ``sum r_k``-sized problem.

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed.synthetic import make_lora_clients
    >>> fed = make_lora_clients(12, 30, 20, 2, contamination=0.25, attack="random", seed=0)
    >>> res = clair(fed.pairs, rank=2)
    >>> bool(np.array_equal(~res.collaborative, fed.contaminated)), res.rank, res.converged
    (True, 2, True)
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; expected one of {list(SOLVERS)}.")
    if not isinstance(base_known, (bool, np.bool_)):
        raise TypeError(f"The 'base_known' parameter must be a bool. Got {base_known!r}.")
    kind, xp, data = _check_updates(updates, bool(base_known))
    K = len(updates)
    p_weights = as_weights(weights, K)
    tol = _positive(tol, "tol")
    gamma_bar = float(gamma_bar)
    if not 0.0 <= gamma_bar < 1.0:
        raise ValueError(f"The 'gamma_bar' parameter must be in [0, 1). Got {gamma_bar}.")
    bad_int = isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer))
    if max_iter is not None and (bad_int or max_iter < 1):
        raise ValueError(f"The 'max_iter' parameter must be a positive int. Got {max_iter!r}.")
    if solver == "cvxpy" and str(cvxpy_solver).upper() not in CVXPY_SOLVERS:
        raise ValueError(f"Unknown CVXPY solver {cvxpy_solver!r}; expected one of {list(CVXPY_SOLVERS)}.")
    if isinstance(lam, str):
        if lam not in LAM_RULES:
            raise ValueError(
                f"Unknown lam rule {lam!r}; expected a positive float or one of {list(LAM_RULES)}."
            )
    elif lam is not None:
        lam = _positive(lam, "lam")
    if noise is not None and alpha is not None:
        raise ValueError("Give at most one of 'noise' and 'alpha'.")
    if kind == "pairs":
        n_rows, n_cols = data[0][0].shape[0], sum(A.shape[1] for A in data[1])
        max_rank = min(n_rows, sum(B.shape[1] for B in data[0]))
    else:
        n_rows, n_cols = data[0].shape[0], sum(u.shape[1] for u in data)
        max_rank = min(n_rows, n_cols)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise TypeError(f"The 'rank' parameter must be an int. Got {rank!r} ({type(rank).__name__}).")
        if not 1 <= rank <= max_rank:
            raise ValueError(
                f"The 'rank' parameter must be in [1, {max_rank}] (at most min(p, total width) of the "
                f"stacked updates). Got {rank}."
            )
        rank = int(rank)
    if lam == "default" and rank is None:
        raise ValueError(
            "lam='default' needs the 'rank' parameter (the formula uses it); give rank or use 'path'."
        )
    if alpha is not None:
        alpha = _positive(alpha, "alpha")
    elif noise is not None:
        noise = float(noise)
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"The 'noise' parameter must be non-negative and finite. Got {noise}.")
        alpha = noise * (math.sqrt(n_rows) + math.sqrt(n_cols)) if noise > 0 else None

    problem = build_problem(kind, data, base_known=bool(base_known))
    if rank is not None and rank > problem.M.shape[0]:
        raise ValueError(
            f"The 'rank' parameter ({rank}) exceeds the numerical rank of the stacked updates "
            f"({problem.M.shape[0]}); expected at most {problem.M.shape[0]}."
        )
    block_norms_M = problem.blocks.norms(problem.M)
    data_scale = spectral_norm(problem.centred(problem.M))

    def solve(lam_value: float, warm=None) -> SolverResult:
        return solve_program(
            problem, lam_value, alpha, solver=solver, tol=tol, max_iter=max_iter, warm=warm,
            cvxpy_solver=str(cvxpy_solver).upper(),
        )

    def analyse(res: SolverResult):
        Uc_all, s = _subspace(res.L)
        r_hat = numerical_rank(s, rank_tol, data_scale)
        r_use = rank if rank is not None else r_hat
        Uc = Uc_all[:, :r_use]
        norms = problem.blocks.norms(res.S)
        residuals = offsubspace_residuals(problem, Uc, norms)
        scores = robust_zscores(residuals, floor=1e-6 * float(block_norms_M.max()))
        if alpha is None:
            flagged = support_flags(norms, block_norms_M, tol=support_tol, residuals=residuals)
        else:
            flagged = scores > z_threshold
        return Uc, s[:r_hat], r_hat, norms, residuals, scores, flagged

    if lam is None or lam == "auto":
        lam = "path" if alpha is None or rank is None else "default"
    path = None
    if lam == "path":
        outlier_floor = support_tol * float(block_norms_M.max())

        def state(result: SolverResult):
            _, _, r_hat, _, residuals, scores, flagged = analyse(result)
            if rank is None:
                return r_hat, np.flatnonzero(flagged)
            # Consistent: every client that leaves the rank-r subspace is flagged (not absorbed into L).
            leaves = (residuals > outlier_floor) & (scores > z_threshold)
            return r_hat, np.flatnonzero(flagged), not np.any(leaves & ~flagged)

        path, res = lam_path(problem, solve, state, n_lams=n_lams, rank=rank)
        n_iter, converged = path.n_iter, bool(path.converged.all())
        admissible = (path.ranks >= 1) & (2 * np.array([len(f) for f in path.flagged]) < K)
        no_consistent = path.consistent is not None and not np.any(admissible & path.consistent)
        if not path.stable or no_consistent:
            why = ("no grid point with a benign majority where every client leaving the rank-r subspace of L "
                   "is flagged" if no_consistent else
                   "no admissible (rank L, flagged set) state on two or more grid points")
            hint = ("The updates may be noisy: pass noise= (or alpha=) for the penalised program, or give "
                    "lam." if alpha is None else "Give lam, or check rank.")
            message = f"The lam path found no stable plateau ({why}); using lam = {res.lam:.4g}. {hint}"
            warnings.warn(ClairWarning(message), stacklevel=2)
    else:
        lam_value = default_lam(rank, K, gamma_bar) if lam == "default" else lam
        res = solve(lam_value)
        n_iter, converged = res.n_iter, res.converged
    if not converged:
        warnings.warn(
            ClairConvergenceWarning(
                f"CLAIR's {res.solver} solver stopped at max_iter before the duality gap test passed "
                f"(relative gap at the chosen lam {res.gap / max(res.objective, 1e-300):.2e}, "
                f"tol = {tol:.1e}); the result has converged=False."
            ),
            stacklevel=2,
        )
    Uc, s, _, norms, residuals, scores, flagged = analyse(res)
    collaborative = ~flagged
    U = problem.lift(Uc)
    if not collaborative.any():
        warnings.warn(
            ClairWarning(
                f"CLAIR flagged all {K} clients at lam = {res.lam:.4g}; the refinement averages over all "
                "of them. lam is probably below the identifiable window (try lam='path')."
            ),
            stacklevel=2,
        )
        pi = p_weights
    else:
        pi = collaborative_weights(p_weights, collaborative)
    if kind == "pairs":
        refined = refine_pairs(list(updates), U, pi)
    else:
        refined = refine_dense(list(updates), U, pi)
    return ClairResult(
        subspace=U,
        collaborative=collaborative,
        block_norms=norms,
        refined=refined,
        lam=float(res.lam),
        objective=float(res.objective),
        gap=float(res.gap),
        n_iter=int(n_iter),
        converged=bool(converged),
        rank=int(U.shape[1]),
        singular_values=s,
        residuals=residuals,
        scores=scores,
        alpha=alpha,
        base_known=bool(base_known),
        solver=res.solver,
        seconds=time.perf_counter() - t0,
        lam_path=path,
    )
