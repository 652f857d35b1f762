r"""Fast solvers of the CLAIR program: inexact ALM (noiseless) and FISTA (noisy).

Noiseless, 2-block ADMM / inexact augmented Lagrangian (docs/methods.md#solvers):

.. math::

    L &= \mathrm{SVT}_{1/\mu}(\mathrm{center}(M - S + Y/\mu)),\qquad
    C = \mathrm{blockmean}(M - S + Y/\mu),\\
    S &= \mathrm{blocksoft}_{\lambda/\mu}(M - L - C 1^\top + Y/\mu),\qquad
    Y \mathrel{+}= \mu (M - L - S - C 1^\top),\qquad \mu \mathrel{*}= \rho^{\pm 1},

Noisy: FISTA on ``S`` after eliminating ``(L, C)`` in closed form (the Moreau envelope of
``alpha ||.||_*`` has a 1-Lipschitz gradient), i.e. accelerated exact block coordinate descent:

.. math::

    C = \mathrm{blockmean}(M - \hat S),\quad L = \mathrm{SVT}_\alpha(\mathrm{center}(M - \hat S)),\quad
    S^+ = \mathrm{blocksoft}_{\alpha\lambda}(M - L - C 1^\top),\quad
    \hat S = S^+ + \tfrac{t - 1}{t^+}(S^+ - S),

where

- ``SVT_tau(X) = U max(s - tau, 0) V^T`` for ``X = U diag(s) V^T``; ``center``/``blockmean`` act on
  column blocks (identity / zero when the base is known),
- ``rho <= 1.2`` (a faster growth stopped feasible but 3.5% suboptimal on a hard instance); ``mu``
  is multiplied by ``rho`` while the primal residual ``||M - L - S - C 1^T||_F`` exceeds twice
  the dual residual ``mu ||S - S_prev||_F`` and divided by ``rho`` in the opposite case (residual
  balancing). Pure growth, as in inexact ALM, stalled at a feasible point 1e-3 above the optimum
  near the edge of the lam window (K = 50, d = 4096), which the duality gap exposes; a balance
  factor of 2 took 40% fewer iterations than the customary 10 over 38 test instances (the worst,
  a benign block at the edge of the support, 860 instead of 1943),
- both stop on the duality gap of :mod:`lowrank_fed.robust.problem` (relative to the primal value)
  and, noiseless, on the relative residual ``||M - L - S - C 1^T||_F / ||M||_F``.

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation and solvers ours). The ALM is Lin, Chen and
Ma's inexact ALM for RPCA with block soft-thresholding; the dual certificate is
``Yhat = mu (center(X) - L)``, whose spectral norm is ``min(mu s_1, 1)`` exactly, so the gap
costs nothing beyond the SVT. The SVT uses the Gram matrix of the shorter side and computes only
the leading eigenpairs (predicted rank), widening until every value above the threshold is found.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg as sla

from .problem import ClairProblem, SolverResult, noiseless_gap, noisy_gap, spectral_norm

__all__ = ["svt", "SVT", "solve_admm", "solve_fista", "RHO_MAX"]

RHO_MAX = 1.2
# Residual balancing factor (Boyd et al. 2011, section 3.4.1).
BALANCE = 2.0
# Continuation factor of the noisy solver's cold start.
CONTINUATION = 0.6


class SVT:
    r"""Singular value thresholding ``SVT_tau(X)`` on the Gram matrix of the shorter side.

    Calls return ``(L, s_kept, s_1)``: the thresholded matrix, its singular values
    ``s_i - tau > 0`` and the largest singular value of ``X``. Two ways to get the leading
    eigenpairs of ``G = X X^T`` (or ``X^T X``):

    - exact: LAPACK ``syevr`` for the leading ``k`` pairs only (``k`` the previous rank plus a
      margin), widening ``k`` until the smallest computed value is below ``tau^2``, so no value
      above ``tau`` is missed;
    - warm (``exact=False``, after a first exact call): a few steps of subspace iteration from the
      previous leading eigenvectors, with Rayleigh-Ritz, accepted when every kept Ritz pair has a
      residual ``||G v - theta v|| <= 1e-10 theta_1`` and at least two margin vectors stay below
      ``tau^2``; otherwise the exact way. The solvers certify the final iterate with an exact
      spectral norm (``inexact`` records whether the last call took the warm way).
    """

    def __init__(self, margin: int = 6, exact: bool = False, seed: int = 0):
        self.margin = margin
        self.exact = exact
        self.k = None  # predicted number of leading pairs: previous rank + margin
        self.V = None  # previous leading eigenvectors (warm start)
        self.inexact = False
        self._rng = np.random.default_rng(seed)

    def _exact(self, G: np.ndarray, tau: float):
        d = G.shape[0]
        k = d if self.k is None else min(d, self.k)
        while True:
            if k >= d // 2 or d <= 48:
                evals, V = np.linalg.eigh(G)
                k = d
            else:
                evals, V = sla.eigh(G, subset_by_index=(d - k, d - 1), driver="evr", check_finite=False)
            if k == d or evals[0] <= tau * tau:
                return evals[::-1], V[:, ::-1]
            k = min(d, 2 * k)

    def _warm(self, gram, d: int, tau: float):
        k = self.k
        V = self.V[:, :k]
        if V.shape[1] < k:  # widen the subspace with random directions
            V = np.hstack([V, self._rng.standard_normal((d, k - V.shape[1]))])
        GV = gram(V)
        for _ in range(4):
            Q, _ = np.linalg.qr(GV)
            GQ = gram(Q)
            theta, W = np.linalg.eigh(Q.T @ GQ)
            theta, W = theta[::-1], W[:, ::-1]
            V, GV = Q @ W, GQ @ W
            r = int(np.count_nonzero(theta > tau * tau))
            if r > k - 2:
                return None
            res = GV[:, :r] - V[:, :r] * theta[:r]
            if r == 0 or float(np.sqrt(np.max(np.einsum("ij,ij->j", res, res)))) <= 1e-10 * theta[0]:
                return theta, V
        return None

    def __call__(self, X: np.ndarray, tau: float):
        m, n = X.shape
        wide = m <= n
        d = min(m, n)
        if d == 0:
            return np.zeros_like(X), np.zeros(0), 0.0
        out = None
        warm_ok = self.V is not None and self.V.shape[0] == d and self.k is not None and 2 * self.k < d
        if not self.exact and warm_ok and d > 48:
            # G V = X (X^T V) without forming G: two thin products per step.
            out = self._warm((lambda V: X @ (X.T @ V)) if wide else (lambda V: X.T @ (X @ V)), d, tau)
        self.inexact = out is not None
        if out is None:
            out = self._exact(X @ X.T if wide else X.T @ X, tau)
        evals, V = out
        s = np.sqrt(np.maximum(evals, 0.0))
        s1 = float(s[0])
        r = int(np.count_nonzero(s > tau))
        self.k = min(d, r + self.margin)
        self.V = V[:, : self.k]
        if r == 0:
            return np.zeros_like(X), np.zeros(0), s1
        Vr, sr = V[:, :r], s[:r]
        shrink = 1.0 - tau / sr
        # X = U diag(s) V^T: with U from X X^T, SVT(X) = U diag(1 - tau/s) U^T X; else X V diag(.) V^T.
        L = (Vr * shrink) @ (Vr.T @ X) if wide else ((X @ Vr) * shrink) @ Vr.T
        return L, sr - tau, s1


def svt(X: np.ndarray, tau: float) -> np.ndarray:
    r"""``SVT_tau(X) = U diag(max(s - tau, 0)) V^T``, the prox of ``tau ||.||_*``.

    Examples
    --------
    >>> import numpy as np
    >>> svt(np.diag([3.0, 1.0]), 2.0)
    array([[1., 0.],
           [0., 0.]])
    """
    return SVT()(np.asarray(X, dtype=np.float64), float(tau))[0]


def _zeros_base(problem: ClairProblem):
    """The base ``C`` of a base-known program: an empty ``(m, 0)`` array."""
    return np.zeros((problem.M.shape[0], 0))


def solve_admm(
    problem: ClairProblem,
    lam: float,
    *,
    tol: float = 1e-7,
    max_iter: int = 5000,
    rho: float = RHO_MAX,
    warm: dict | None = None,
) -> SolverResult:
    r"""Solve the noiseless program ``min ||L||_* + lam sum ||S_k||_F s.t. M = L + S (+ C 1^T)``.

    Parameters
    ----------
    problem : ClairProblem
    lam : float, > 0
    tol : float
        Stop when ``gap <= tol * primal`` and ``||M - L - S - C 1^T||_F <= tol ||M||_F``.
    max_iter : int
    rho : float, ``1 < rho <= 1.2``
        Growth factor of the penalty ``mu``.
    warm : dict, optional
        ``SolverResult.state`` of a previous solve (``L``, ``S``, ``Y``, ``mu``): a warm start.

    Returns
    -------
    SolverResult
        ``converged=False`` if ``max_iter`` ran out first (the caller warns).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed.robust.compress import stack_dense
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.normal(size=(8, 1)))[0]
    >>> blocks = [U @ rng.normal(size=(1, 3)) for _ in range(5)] + [rng.normal(size=(8, 3))]
    >>> res = solve_admm(stack_dense(blocks, base_known=True), lam=0.9)
    >>> res.converged, np.round(np.linalg.norm(res.S, axis=0).reshape(6, 3).sum(1), 3) > 0
    (True, array([False, False, False, False, False,  True]))
    """
    if not 1.0 < rho <= RHO_MAX:
        raise ValueError(f"The 'rho' parameter must be in (1, {RHO_MAX}]. Got {rho}.")
    t0 = time.perf_counter()
    M, blocks = problem.M, problem.blocks
    normM = float(np.linalg.norm(M))
    cM = problem.centred(M)
    known_norm = problem.base_known and problem.sigma.size > 0
    spec_cM = float(problem.sigma[0]) if known_norm else spectral_norm(cM)
    if normM == 0.0 or spec_cM == 0.0:
        # M = 0 (or, base unknown, all blocks equal): L = 0, S = 0 is optimal with zero gap.
        Z = np.zeros_like(M)
        C = _zeros_base(problem) if problem.base_known else blocks.mean(M)
        return SolverResult(Z, Z.copy(), C, lam, None, 0.0, 0.0, 0, True, "admm", time.perf_counter() - t0)
    mu0 = 1.25 / spec_cM
    if warm is not None:
        L, S, Y = warm["L"].copy(), warm["S"].copy(), warm["Y"].copy()
        mu = float(warm.get("mu", mu0))
    else:
        L, S = np.zeros_like(M), np.zeros_like(M)
        # Dual start of inexact ALM: the centred data scaled into the dual ball.
        Y = cM / max(spec_cM, float(blocks.norms(cM).max()) / lam)
        mu = mu0
    mu_max, mu_min = mu0 * 1e8, mu0 * 1e-4
    svt_op = SVT()
    C_tiled = np.zeros_like(M)
    objective, gap, converged, it = np.inf, np.inf, False, 0
    for it in range(1, max_iter + 1):
        X = M - S + Y / mu
        if not problem.base_known:
            C_tiled = problem.base_of(X)
        cX = problem.centred(X)
        L, s_kept, s1 = svt_op(cX, 1.0 / mu)
        Yhat = mu * (cX - L)  # centred, ||Yhat||_2 = min(mu s1, 1): the dual certificate
        S_prev = S
        S = blocks.soft(M - L - C_tiled + Y / mu, lam / mu)
        Z = M - L - S - C_tiled
        Y = Y + mu * Z
        nuclear = float(s_kept.sum())
        objective, gap = noiseless_gap(
            problem, L, C_tiled, Yhat, lam, nuclear=nuclear, spectral=min(mu * s1, 1.0)
        )
        resid = float(np.linalg.norm(Z)) / normM
        if resid <= tol and gap > tol * objective and it % 10 == 0:
            # The updated multiplier has block norms <= lam exactly; its spectral norm costs one eigenvalue.
            gap = min(gap, noiseless_gap(problem, L, C_tiled, Y, lam, nuclear=nuclear)[1])
        if gap <= tol * max(objective, 1e-300) and resid <= tol and svt_op.inexact:
            # Certify a warm SVT: ||L||_* and the dual candidates' spectral norms recomputed exactly.
            objective, gap = noiseless_gap(problem, L, C_tiled, Yhat, lam)
            gap = min(gap, noiseless_gap(problem, L, C_tiled, Y, lam)[1])
            svt_op.exact = gap > tol * objective
        if gap <= tol * max(objective, 1e-300) and resid <= tol:
            converged = True
            break
        # Residual balancing: grow mu while the primal residual dominates, shrink it while the dual
        # residual mu ||S - S_prev||_F does (pure growth stalls feasible but suboptimal).
        dual_resid = mu * float(np.linalg.norm(S - S_prev)) / normM
        if resid > BALANCE * dual_resid:
            mu = min(mu * rho, mu_max)
        elif dual_resid > BALANCE * resid:
            mu = max(mu / rho, mu_min)
    C = blocks.mean(C_tiled) if not problem.base_known else _zeros_base(problem)
    state = {"L": L, "S": S, "Y": Y, "mu": mu}
    return SolverResult(
        L, S, C, lam, None, objective, max(gap, 0.0), it, converged, "admm", time.perf_counter() - t0, state
    )


def solve_fista(
    problem: ClairProblem,
    lam: float,
    alpha: float,
    *,
    tol: float = 1e-7,
    max_iter: int = 10000,
    warm: dict | None = None,
    eta: float = CONTINUATION,
) -> SolverResult:
    r"""Solve the noisy program ``min 1/2||M - L - S - C 1^T||^2 + alpha ||L||_* + alpha lam sum ||S_k||_F``.

    FISTA with function-value restart on ``S``; each step is one exact block coordinate descent
    sweep ``(C, L) -> S`` from the extrapolated point. A cold start uses continuation: the weight
    runs ``a = max(alpha, eta^j ||center(M)||_2)`` down to ``alpha`` (both thresholds, ``a`` and
    ``a lam``, scale with it), which skips the costly high-rank first iterations; the gap is
    tested on the target program only.

    Parameters
    ----------
    problem : ClairProblem
    lam, alpha : float, > 0
    tol : float
        Stop when ``gap <= tol * primal``.
    max_iter : int
    warm : dict, optional
        ``SolverResult.state`` of a previous solve (``S``); no continuation then.
    eta : float, in (0, 1]
        Continuation factor (1 turns it off).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank_fed.robust.compress import stack_dense
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.normal(size=(8, 1)))[0]
    >>> blocks = [U @ rng.normal(size=(1, 3)) + 1e-3 * rng.normal(size=(8, 3)) for _ in range(6)]
    >>> res = solve_fista(stack_dense(blocks, base_known=True), lam=0.6, alpha=0.02)
    >>> res.converged, int(np.linalg.matrix_rank(res.L, tol=1e-8))
    (True, 1)
    """
    t0 = time.perf_counter()
    M, blocks, known = problem.M, problem.blocks, problem.base_known
    if warm is not None:
        S, a = warm["S"].copy(), alpha
    else:
        S = np.zeros_like(M)
        a = max(alpha, eta * spectral_norm(problem.centred(M))) if eta < 1.0 else alpha
    S_hat, t = S, 1.0
    svt_op = SVT()
    objective, gap, converged, it = np.inf, np.inf, False, 0
    previous = np.inf
    L = np.zeros_like(M)
    C_tiled = 0.0
    for it in range(1, max_iter + 1):
        X = M - S_hat
        if known:
            cX = X
        else:
            C_tiled = problem.base_of(X)
            cX = X - C_tiled
        L, s_kept, s1 = svt_op(cX, a)
        R_hat = cX - L  # residual at S_hat: centred, ||R_hat||_2 = min(s1, a); the dual candidate
        S_new = blocks.soft(R_hat + S_hat, a * lam)  # blocksoft(M - L - C 1^T)
        C_new = 0.0 if known else problem.base_of(M - S_new)  # the best base for (L, S_new)
        if a == alpha:
            objective, gap = noisy_gap(
                problem, L, S_new, C_new, R_hat, lam, alpha,
                nuclear=float(s_kept.sum()), spectral=min(s1, alpha),
            )
            if gap <= tol * max(objective, 1e-300) and svt_op.inexact:
                # Certify a warm SVT: ||L||_* and the residual's spectral norm recomputed exactly.
                objective, gap = noisy_gap(problem, L, S_new, C_new, R_hat, lam, alpha)
                svt_op.exact = gap > tol * objective
            if gap <= tol * max(objective, 1e-300):
                S, C_tiled, converged = S_new, C_new, True
                break
            restart = objective > previous  # function-value restart (O'Donoghue & Candes)
            previous = objective
        else:
            a = max(alpha, a * eta)
            restart = a == alpha  # the target program starts without momentum
        if restart:
            t, S_hat = 1.0, S_new
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            S_hat = S_new + ((t - 1.0) / t_next) * (S_new - S)
            t = t_next
        S, C_tiled = S_new, C_new
    C = _zeros_base(problem) if known else blocks.mean(C_tiled)
    return SolverResult(
        L, S, C, lam, alpha, objective, max(gap, 0.0), it, converged, "fista", time.perf_counter() - t0,
        {"S": S},
    )
