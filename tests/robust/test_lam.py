"""Choosing lam: the default formula, the window bounds, the plateau rule."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_fed.robust import default_lam, lam_window, select_plateau, solve_admm, stack_dense
from lowrank_fed.synthetic import make_regression_clients


def test_default_lam_formula():
    assert default_lam(4, 50, 0.2) == pytest.approx(2 * np.sqrt(4 / 40))
    assert default_lam(1, 4, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("base_known", [True, False])
def test_window_bounds_are_where_the_solution_degenerates(base_known):
    # Above lam_hi, S = 0 (everything in L); below lam_lo, L = 0 (everything in S).
    fed = make_regression_clients(8, 6, 3, 2, noise=0.0, n_samples=10, contamination=0.25, seed=0,
                                  base_known=base_known)
    problem = stack_dense(fed.Theta, base_known=base_known)
    lo, hi = lam_window(problem)
    assert 0 < lo < hi
    above = solve_admm(problem, hi * 1.05, tol=1e-9)
    assert np.max(problem.blocks.norms(above.S)) < 1e-6 * np.linalg.norm(problem.M)
    if base_known:  # the L = 0 bound is exact when there is no free base
        below = solve_admm(problem, lo * 0.95, tol=1e-9)
        assert np.linalg.norm(below.L) < 1e-6 * np.linalg.norm(problem.M)


@pytest.mark.parametrize(
    "ranks,flagged,rank,expected",
    [
        # a clear plateau in the middle
        ([5, 2, 2, 2, 1, 0], [(), (3,), (3,), (3,), (0, 3), (0, 1, 2, 3)], None, (1, 4, 2)),
        # a majority flagged is never admissible, rank 0 neither
        ([2, 2, 2, 0], [(0, 1, 2, 3, 4), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4), ()], None, (0, 0, 0)),
        # ties in length: the lower rank wins
        ([3, 3, 2, 2], [(), (), (1,), (1,)], None, (2, 4, 2)),
        # a requested rank is preferred when some state has it
        ([3, 3, 3, 2, 2], [(), (), (), (1,), (1,)], 2, (3, 5, 3)),
    ],
)
def test_plateau_rule(ranks, flagged, rank, expected):
    assert select_plateau(ranks, flagged, 8, rank) == expected
