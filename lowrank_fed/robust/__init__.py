r"""CLAIR: contamination-aware collaborative low-rank recovery (docs/methods.md#clair).

:func:`clair` recovers the shared subspace of the clients' updates, flags contaminated clients and
refines the benign updates; it returns a :class:`ClairResult`. The pieces are public too:

- :mod:`.problem`: the program stated once (block operators, objectives, duality gaps),
- :mod:`.compress`: lossless compression of LoRA (and dense) input, and lifting back,
- :mod:`.admm`: the fast solvers (inexact ALM for the noiseless program, FISTA for the noisy one),
- :mod:`.cvx`: the CVXPY reference (``solver="cvxpy"``),
- :mod:`.lam`: the default ``lam`` and the ``lam`` path,
- :mod:`.detection` and :mod:`.refinement`,
- :mod:`.federated`: a federated round's server step over modules (one decision per client, the benign subspace).

Reconstruction of CLAIR (paper abstract; formulation ours).
"""

from .admm import SVT, solve_admm, solve_fista, svt
from .api import (
    SOLVERS,
    ClairConvergenceWarning,
    ClairResult,
    ClairWarning,
    build_problem,
    clair,
    solve_program,
)
from .compress import compress_dense, compress_pairs, stack_dense
from .cvx import CVXPY_SOLVERS, solve_cvxpy
from .federated import ClientFlags, flag_clients, stack_subspace
from .detection import (
    GAP_LEVEL,
    calibrate_threshold,
    gap_critical,
    gap_flags,
    offsubspace_residuals,
    residual_flags,
    robust_zscores,
    support_flags,
    threshold_flags,
)
from .lam import LamPath, default_lam, lam_path, lam_window, select_plateau
from .problem import (
    Blocks,
    ClairProblem,
    SolverResult,
    noiseless_gap,
    noiseless_objective,
    noisy_gap,
    noisy_objective,
)
from .screening import ScreeningScores, screening_scores
from .refinement import RefinedPairs, collaborative_weights, refactor, refine_dense, refine_pairs

__all__ = [
    "clair",
    "ClairResult",
    "ClairConvergenceWarning",
    "ClairWarning",
    "SOLVERS",
    "CVXPY_SOLVERS",
    "Blocks",
    "ClairProblem",
    "SolverResult",
    "build_problem",
    "solve_program",
    "compress_pairs",
    "compress_dense",
    "stack_dense",
    "solve_admm",
    "solve_fista",
    "solve_cvxpy",
    "svt",
    "SVT",
    "noiseless_objective",
    "noisy_objective",
    "noiseless_gap",
    "noisy_gap",
    "default_lam",
    "lam_window",
    "lam_path",
    "select_plateau",
    "LamPath",
    "support_flags",
    "offsubspace_residuals",
    "robust_zscores",
    "residual_flags",
    "threshold_flags",
    "calibrate_threshold",
    "gap_flags",
    "gap_critical",
    "GAP_LEVEL",
    "screening_scores",
    "ScreeningScores",
    "collaborative_weights",
    "refine_dense",
    "refine_pairs",
    "refactor",
    "RefinedPairs",
    "ClientFlags",
    "flag_clients",
    "stack_subspace",
]
