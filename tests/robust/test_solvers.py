"""The fast solvers against the CVXPY reference, the SVT, and their convergence reporting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed.robust import SVT, compress_dense, solve_admm, solve_cvxpy, solve_fista, stack_dense, svt
from lowrank_fed.robust import cvx as cvx_module

from ..strategies import matrix_of_rank


def random_instance(seed: int, *, K=6, p=8, q=3, r=2, n_bad=1, base_known=True):
    """Benign blocks in a shared rank-r subspace (plus a base if unknown), n_bad random blocks."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.normal(size=(p, r)))[0]
    W0 = 0.0 if base_known else rng.normal(size=(p, q))
    blocks = [W0 + U @ rng.normal(size=(r, q)) for _ in range(K - n_bad)]
    blocks += [W0 + rng.normal(size=(p, q)) for _ in range(n_bad)]
    order = rng.permutation(K)
    return [blocks[i] for i in order], np.array([i >= K - n_bad for i in order])


def flags(problem, result, tol=1e-4):
    return problem.blocks.norms(result.S) > tol * problem.blocks.norms(problem.M).max()


# ---------------------------------------------------------------- SVT


@given(seed=st.integers(0, 2**32 - 1), tau=st.floats(0.0, 4.0), tall=st.booleans())
def test_svt_matches_the_full_svd(seed, tau, tall):
    rng = np.random.default_rng(seed)
    X = matrix_of_rank(rng, 7, 12, rng.uniform(0.1, 5.0, size=7))
    X = X.T if tall else X
    U, s, Vh = np.linalg.svd(X, full_matrices=False)
    expected = (U * np.maximum(s - tau, 0.0)) @ Vh
    assert_allclose(svt(X, tau), expected, atol=1e-10)


def test_warm_svt_over_a_sequence_of_nearby_matrices_is_exact():
    # The warm (subspace-iteration) path must give the exact SVT on every call of a slow drift.
    rng = np.random.default_rng(0)
    base = matrix_of_rank(rng, 80, 120, np.r_[np.linspace(10, 5, 5), 0.01 * rng.uniform(size=75)])
    op = SVT()
    warm_calls = 0
    for step in range(12):
        X = base + 1e-3 * step * rng.normal(size=base.shape)
        L, s_kept, s1 = op(X, 1.0)
        warm_calls += op.inexact
        U, s, Vh = np.linalg.svd(X, full_matrices=False)
        assert_allclose(L, (U * np.maximum(s - 1.0, 0)) @ Vh, atol=1e-8)
        assert s1 == pytest.approx(s[0], rel=1e-10)
        assert_allclose(s_kept, s[s > 1.0] - 1.0, atol=1e-8)
    assert warm_calls >= 8  # the warm path was taken after the first exact call


# ---------------------------------------------------------------- fast solvers vs CVXPY


@pytest.mark.parametrize("base_known", [True, False])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lam=st.sampled_from([0.6, 0.8, 1.0]))
def test_admm_matches_cvxpy_on_random_small_instances(base_known, seed, lam):
    # Prepare
    blocks, _ = random_instance(seed, base_known=base_known)
    problem = stack_dense(blocks, base_known=base_known)
    # Execute
    fast = solve_admm(problem, lam, tol=1e-8)
    ref = solve_cvxpy(problem, lam, solver="SCS", tol=1e-9)
    # Assert: objective within 1e-4 relative, same flagged set, both certified by their gaps
    assert fast.converged and ref.converged
    assert fast.objective == pytest.approx(ref.objective, rel=1e-4)
    assert fast.gap <= 1e-8 * fast.objective * 1.0001
    assert np.array_equal(flags(problem, fast), flags(problem, ref))


@pytest.mark.parametrize("base_known", [True, False])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([0.05, 0.2, 0.5]))
def test_fista_matches_cvxpy_on_the_noisy_program(base_known, seed, alpha):
    rng = np.random.default_rng(seed)
    blocks, _ = random_instance(seed, base_known=base_known)
    blocks = [b + 0.05 * rng.normal(size=b.shape) for b in blocks]
    problem = stack_dense(blocks, base_known=base_known)
    fast = solve_fista(problem, 0.8, alpha, tol=1e-9)
    ref = solve_cvxpy(problem, 0.8, alpha, solver="SCS", tol=1e-9)
    assert fast.converged
    assert fast.objective == pytest.approx(ref.objective, rel=1e-4)
    assert fast.objective <= ref.objective * (1 + 1e-6)  # certified optimal to 1e-9: no worse than SCS


def test_clarabel_reference_agrees_with_scs_and_admm():
    blocks, _ = random_instance(3, K=5, p=6, q=2)
    problem = stack_dense(blocks, base_known=True)
    a = solve_cvxpy(problem, 0.8, solver="CLARABEL")
    b = solve_cvxpy(problem, 0.8, solver="SCS", tol=1e-9)
    c = solve_admm(problem, 0.8)
    assert a.objective == pytest.approx(b.objective, rel=1e-5)
    assert a.objective == pytest.approx(c.objective, rel=1e-5)
    assert a.solver == "cvxpy-clarabel" and b.solver == "cvxpy-scs" and c.solver == "admm"


def test_admm_recovers_exactly_the_support_and_subspace():
    blocks, bad = random_instance(7, K=10, p=10, q=3, r=2, n_bad=2)
    problem = compress_dense(blocks, base_known=True)
    res = solve_admm(problem, 0.8)
    assert res.converged
    assert np.array_equal(flags(problem, res), bad)
    assert np.linalg.matrix_rank(res.L, tol=1e-8 * np.linalg.norm(res.L, 2)) == 2


def test_admm_warm_start_resumes_from_a_previous_solution():
    blocks, _ = random_instance(11, K=8, p=10, q=3)
    problem = stack_dense(blocks, base_known=True)
    cold = solve_admm(problem, 0.8)
    warm = solve_admm(problem, 0.8, warm=cold.state)
    assert warm.converged and warm.n_iter <= 3
    assert warm.objective == pytest.approx(cold.objective, rel=1e-7)


def test_fista_continuation_does_not_change_the_answer():
    blocks, _ = random_instance(12, K=8, p=10, q=3)
    problem = stack_dense(blocks, base_known=False)
    with_cont = solve_fista(problem, 0.8, 0.1, tol=1e-10)
    without = solve_fista(problem, 0.8, 0.1, tol=1e-10, eta=1.0)
    assert with_cont.objective == pytest.approx(without.objective, rel=1e-9)


def test_zero_data_is_solved_at_once():
    problem = stack_dense([np.zeros((3, 2)), np.zeros((3, 2))], base_known=True)
    res = solve_admm(problem, 1.0)
    assert res.converged and res.objective == 0.0 and res.n_iter == 0


# ---------------------------------------------------------------- convergence reporting and options


def test_non_convergence_is_reported_not_silent():
    blocks, _ = random_instance(5)
    problem = stack_dense(blocks, base_known=True)
    res = solve_admm(problem, 0.8, max_iter=2)
    assert not res.converged and res.n_iter == 2 and res.gap > 0
    res = solve_fista(problem, 0.8, 0.1, max_iter=2)
    assert not res.converged and res.n_iter == 2


@pytest.mark.parametrize("rho", [1.0, 1.5, 0.9])
def test_rho_above_1_2_is_refused(rho):
    problem = stack_dense([np.eye(3), np.eye(3)], base_known=True)
    with pytest.raises(ValueError, match=r"The 'rho' parameter must be in \(1, 1.2\]. Got"):
        solve_admm(problem, 1.0, rho=rho)


def test_unknown_cvxpy_solver_is_refused():
    problem = stack_dense([np.eye(3), np.eye(3)], base_known=True)
    expected = r"Unknown CVXPY solver 'MOSEK'; expected one of \['SCS', 'CLARABEL'\]"
    with pytest.raises(ValueError, match=expected):
        solve_cvxpy(problem, 1.0, solver="mosek")


def test_cvxpy_problem_is_compiled_once_per_data_and_reused_across_lam():
    blocks, _ = random_instance(9, K=5, p=6, q=2)
    problem = stack_dense(blocks, base_known=True)
    cvx_module._CACHE.clear()
    first = solve_cvxpy(problem, 0.7)
    entry = cvx_module._build(problem, False)
    second = solve_cvxpy(problem, 0.9, warm=first.state)
    assert cvx_module._build(problem, False) is entry  # same compiled problem, new lam parameter
    assert len(cvx_module._CACHE) == 1
    assert entry[1]["lam"].value == pytest.approx(0.9)
    assert second.objective > first.objective  # larger lam, larger optimum (monotone in lam)
