"""The CLAIR program stated once: block operators, objectives, duality gaps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed.robust import (
    Blocks,
    noiseless_gap,
    noiseless_objective,
    noisy_gap,
    noisy_objective,
    stack_dense,
)
from lowrank_fed.robust.problem import spectral_norm


def block_prox_bruteforce(x, tau):
    """argmin_z 1/2 ||z - x||^2 + tau ||z||: shrink towards 0 along x."""
    n = np.linalg.norm(x)
    return np.zeros_like(x) if n <= tau else (1 - tau / n) * x


@given(
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    tau=st.floats(0.0, 3.0),
)
def test_block_soft_is_the_prox_of_the_block_penalty(widths, seed, tau):
    # Prepare
    rng = np.random.default_rng(seed)
    blocks = Blocks(tuple(widths))
    X = rng.normal(size=(3, sum(widths)))
    # Execute
    out = blocks.soft(X, tau)
    # Assert: block by block equal to the closed form of the prox of tau ||.||_F
    for sl in blocks.slices():
        assert_allclose(out[:, sl], block_prox_bruteforce(X[:, sl], tau), atol=1e-12)
    assert_allclose(blocks.norms(X), [np.linalg.norm(X[:, sl]) for sl in blocks.slices()], rtol=1e-12)


def test_center_and_mean_split_a_matrix_into_orthogonal_parts():
    rng = np.random.default_rng(0)
    blocks = Blocks((3, 3, 3, 3))
    X = rng.normal(size=(5, 12))
    centred, base = blocks.center(X), blocks.tile(blocks.mean(X))
    assert_allclose(centred + base, X, atol=1e-14)
    assert_allclose(sum(centred[:, sl] for sl in blocks.slices()), 0, atol=1e-13)  # sum_k center(X)_k = 0
    assert abs(np.vdot(centred, base)) < 1e-12
    assert_allclose(blocks.mean(X), sum(X[:, sl] for sl in blocks.slices()) / 4, atol=1e-14)


def test_objectives_match_their_formulas():
    rng = np.random.default_rng(1)
    blocks = Blocks((2, 1))
    M, L, S = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    nuc = np.linalg.svd(L, compute_uv=False).sum()
    pen = np.linalg.norm(S[:, :2]) + np.linalg.norm(S[:, 2:])
    assert noiseless_objective(L, S, 0.7, blocks) == pytest.approx(nuc + 0.7 * pen, rel=1e-12)
    expected = 0.5 * np.linalg.norm(M - L - S) ** 2 + 0.3 * nuc + 0.3 * 0.7 * pen
    assert noisy_objective(M, L, S, 0.0, 0.7, 0.3, blocks) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("base_known", [True, False])
@given(seed=st.integers(0, 2**32 - 1), lam=st.floats(0.2, 2.0))
def test_duality_gap_is_nonnegative_for_any_primal_point_and_dual_candidate(base_known, seed, lam):
    # Weak duality: for every feasible point and every scaled candidate, primal >= dual.
    rng = np.random.default_rng(seed)
    problem = stack_dense([rng.normal(size=(5, 3)) for _ in range(4)], base_known=base_known)
    L = problem.centred(rng.normal(size=problem.M.shape))
    C = 0.0 if base_known else problem.blocks.tile(rng.normal(size=(5, 3)))
    Y = rng.normal(size=problem.M.shape)
    primal, gap = noiseless_gap(problem, L, np.zeros_like(L) + C, Y, lam)
    assert gap >= -1e-10 * max(primal, 1)
    S = rng.normal(size=problem.M.shape)
    primal, gap = noisy_gap(problem, L, S, C, Y, lam, 0.5)
    assert gap >= -1e-10 * max(primal, 1)


def test_gap_is_zero_at_a_known_optimum():
    # One nonzero block, lam large: L = M, S = 0 and Y = U V^T is a certificate with zero gap.
    M = np.zeros((3, 4))
    M[0, 0] = 2.0
    problem = stack_dense([M[:, :2], M[:, 2:]], base_known=True)
    Y = np.zeros((3, 4))
    Y[0, 0] = 1.0
    primal, gap = noiseless_gap(problem, problem.M, np.zeros((3, 4)), Y, lam=5.0)
    assert primal == pytest.approx(2.0)
    assert gap == pytest.approx(0.0, abs=1e-14)


def test_spectral_norm_matches_numpy():
    rng = np.random.default_rng(3)
    for shape in [(4, 9), (9, 4), (1, 1)]:
        X = rng.normal(size=shape)
        assert spectral_norm(X) == pytest.approx(np.linalg.norm(X, 2), rel=1e-12)
    assert spectral_norm(np.zeros((0, 3))) == 0.0


def test_empty_blocks_have_zero_norm():
    # A client with rank 0 contributes an empty block.
    blocks = Blocks((2, 0, 1, 0))
    X = np.arange(6.0).reshape(2, 3)
    assert_allclose(blocks.norms(X), [np.linalg.norm(X[:, :2]), 0.0, np.linalg.norm(X[:, 2:]), 0.0])
    assert blocks.soft(X, 100.0).shape == (2, 3)
