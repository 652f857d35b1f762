r"""CVXPY reference for the CLAIR program (oracle for the fast solvers; slow by design).

The same programs as :mod:`lowrank_fed.robust.problem`, written in CVXPY:

.. math::

    \min_{L, S, C}\ \|L\|_* + \lambda \sum_k \|S_k\|_F \quad\text{s.t.}\quad M = L + S + C 1^\top,\
    \textstyle\sum_k L_k = 0 \qquad (\text{base unknown; } C = 0 \text{ and no centring if known}),

    \min_{L, S, C}\ \tfrac12 \|M - L - S - C 1^\top\|_F^2 + \alpha \|L\|_* + (\alpha\lambda) \sum_k \|S_k\|_F
    \qquad (\text{noisy}),

where ``lam`` (noiseless) and ``alpha``, ``alpha lam`` (noisy) are ``cp.Parameter`` objects, so a
sweep over ``lam`` (the lam path) compiles the problem once per data matrix. ``M`` enters as a
constant: as a ``cp.Parameter`` its DPP canonicalisation alone took 2.8 s and 1 GB at 50 x 50 (and
was killed for memory at 100 x 100), against 0.05 s as a constant. ``C 1^T`` is ``C @ E`` with
``E = 1_K^T kron I_q``.

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours). SCS is the default (first order,
scales to a few hundred rows); Clarabel (interior point) is accurate but slow past about 50 x 100.
The objective and duality gap are evaluated by :mod:`lowrank_fed.robust.problem` on the solver's
point (noiseless: at the feasible ``S = M - L - C 1^T``), with the constraint's multiplier as the
dual candidate, so they are comparable with the ADMM's.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict

import numpy as np

from .problem import ClairProblem, SolverResult, noiseless_gap, noisy_gap

__all__ = ["solve_cvxpy", "CVXPY_SOLVERS"]

CVXPY_SOLVERS = ("SCS", "CLARABEL")
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


def _cvxpy():
    """The ``cvxpy`` module; an ImportError naming the extra to install when it is absent (it is optional)."""
    try:
        import cvxpy
    except ModuleNotFoundError as err:
        raise ImportError("solver='cvxpy' needs CVXPY, an optional extra: pip install 'lowrank-fed[cvxpy]' "
                          f"(missing module {err.name!r}); solver='admm' needs nothing more.") from None
    return cvxpy


def _build(problem: ClairProblem, noisy: bool):
    """The CVXPY problem of ``problem.M``, parametrised by lam / alpha (cached per data matrix)."""
    cp = _cvxpy()

    key = (id(problem.M), problem.blocks.widths, problem.base_known, noisy)
    if key in _CACHE and _CACHE[key][0] is problem.M:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]
    shape, widths, base_known = tuple(problem.M.shape), problem.blocks.widths, problem.base_known
    m, n = shape
    M = problem.M
    L = cp.Variable(shape, name="L")
    S = cp.Variable(shape, name="S")
    starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    norms = [cp.norm(S[:, starts[k] : starts[k + 1]], "fro") for k in range(len(widths))]
    block_pen = cp.sum(cp.hstack(norms))
    constraints = []
    base = 0
    C = None
    if not base_known:
        q = widths[0]
        E = np.kron(np.ones((1, len(widths))), np.eye(q))  # C 1^T = C @ E
        C = cp.Variable((m, q), name="C")
        base = C @ E
        constraints.append(L @ E.T == 0)  # sum_k L_k = 0
    if noisy:
        alpha = cp.Parameter(nonneg=True, name="alpha")
        alpha_lam = cp.Parameter(nonneg=True, name="alpha_lam")
        objective = 0.5 * cp.sum_squares(M - L - S - base) + alpha * cp.normNuc(L) + alpha_lam * block_pen
        params = {"alpha": alpha, "alpha_lam": alpha_lam}
        equality = None
    else:
        lam = cp.Parameter(nonneg=True, name="lam")
        objective = cp.normNuc(L) + lam * block_pen
        equality = M == L + S + base
        constraints.append(equality)
        params = {"lam": lam}
    prob = cp.Problem(cp.Minimize(objective), constraints)
    entry = (prob, params, L, S, C, equality)
    _CACHE[key] = (problem.M, entry)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


def _options(solver: str, tol: float, max_iter: int | None) -> dict:
    if solver == "SCS":
        opts = {"eps_abs": tol, "eps_rel": tol}
        if max_iter is not None:
            opts["max_iters"] = int(max_iter)
        return opts
    opts = {"tol_gap_abs": tol, "tol_gap_rel": tol, "tol_feas": tol}
    if max_iter is not None:
        opts["max_iter"] = int(max_iter)
    return opts


def solve_cvxpy(
    problem: ClairProblem,
    lam: float,
    alpha: float | None = None,
    *,
    solver: str = "SCS",
    tol: float = 1e-8,
    max_iter: int | None = None,
    warm: dict | None = None,
) -> SolverResult:
    r"""Solve the CLAIR program (noiseless if ``alpha`` is None, else noisy) with CVXPY.

    Parameters
    ----------
    problem : ClairProblem
    lam : float, > 0
    alpha : float, optional
        Noise level of the penalised program; None solves the equality-constrained one.
    solver : {"SCS", "CLARABEL"}
    tol : float
        The solver's accuracy (SCS ``eps_abs = eps_rel``; Clarabel gap and feasibility tolerances).
    max_iter : int, optional
        The solver's iteration cap (its default if None).
    warm : dict, optional
        Present (any value) to ask CVXPY for a warm start from the previous solution.

    Returns
    -------
    SolverResult
        ``converged`` is True only for status ``"optimal"``.

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed.robust.compress import stack_dense
    >>> from lowrank_fed.robust.admm import solve_admm
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.normal(size=(6, 1)))[0]
    >>> blocks = [U @ rng.normal(size=(1, 2)) for _ in range(4)] + [rng.normal(size=(6, 2))]
    >>> prob = stack_dense(blocks, base_known=True)
    >>> ref, fast = solve_cvxpy(prob, 0.7, solver="CLARABEL"), solve_admm(prob, 0.7)
    >>> bool(abs(ref.objective - fast.objective) <= 1e-5 * fast.objective)
    True
    """
    cp = _cvxpy()

    solver = solver.upper()
    if solver not in CVXPY_SOLVERS:
        raise ValueError(f"Unknown CVXPY solver {solver!r}; expected one of {list(CVXPY_SOLVERS)}.")
    t0 = time.perf_counter()
    noisy = alpha is not None
    prob, params, L, S, C, equality = _build(problem, noisy)
    if noisy:
        params["alpha"].value = float(alpha)
        params["alpha_lam"].value = float(alpha) * float(lam)
    else:
        params["lam"].value = float(lam)
    try:
        with warnings.catch_warnings():
            # CVXPY's "Solution may be inaccurate" becomes converged=False (and clair's warning).
            warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
            prob.solve(solver=solver, warm_start=warm is not None, **_options(solver, tol, max_iter))
    except cp.error.SolverError as exc:
        raise RuntimeError(f"CVXPY solver {solver} failed on the CLAIR program: {exc}") from exc
    status = prob.status
    if L.value is None:
        raise RuntimeError(f"CVXPY solver {solver} returned no solution (status {status!r}).")
    Lv, Sv = np.asarray(L.value), np.asarray(S.value)
    if problem.base_known:
        Cv, C_tiled = np.zeros((Lv.shape[0], 0)), np.zeros_like(Lv)
    else:
        Cv = np.asarray(C.value)
        C_tiled = problem.blocks.tile(Cv)
    if noisy:
        R = problem.M - Lv - Sv - C_tiled
        objective, gap = noisy_gap(problem, Lv, Sv, C_tiled, R, lam, alpha)
    else:
        Y = np.asarray(equality.dual_value) if equality.dual_value is not None else np.zeros_like(Lv)
        objective, gap_plus = noiseless_gap(problem, Lv, C_tiled, Y, lam)
        gap = min(gap_plus, noiseless_gap(problem, Lv, C_tiled, -Y, lam)[1])
    stats = prob.solver_stats
    n_iter = int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
    return SolverResult(
        Lv, Sv, Cv, float(lam), None if alpha is None else float(alpha), objective, max(gap, 0.0), n_iter,
        status == cp.OPTIMAL, f"cvxpy-{solver.lower()}", time.perf_counter() - t0, {"status": status},
    )
