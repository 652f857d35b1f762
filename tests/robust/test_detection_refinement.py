"""Detection rules and the refinement formula, in isolation."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair
from lowrank_fed.robust import (
    collaborative_weights,
    compress_pairs,
    offsubspace_residuals,
    refine_dense,
    refine_pairs,
    residual_flags,
    robust_zscores,
    stack_dense,
    support_flags,
)
from lowrank_fed.synthetic import make_lora_clients


def test_robust_zscores_ignore_a_minority_of_outliers():
    rng = np.random.default_rng(0)
    x = np.r_[1.0 + 0.01 * rng.normal(size=16), 5.0, 6.0, 7.0]
    z = robust_zscores(x)
    assert np.all(np.abs(z[:16]) < 3.5) and np.all(z[16:] > 100)
    assert residual_flags(x).tolist() == [False] * 16 + [True] * 3


def test_zscores_of_an_exactly_clean_federation_flag_nobody():
    x = np.r_[np.full(9, 1e-15), 2e-15]  # rounding-level residuals: a floor at the data's scale
    assert not residual_flags(x, floor=1e-6 * 1.0).any()
    assert residual_flags(x).any()  # relative to themselves they would look like an outlier


def test_support_ignores_rounding_level_blocks():
    assert support_flags(np.array([1e-12, 0.3]), np.array([1.0, 2.0]), tol=1e-4).tolist() == [False, True]


def test_offsubspace_residuals_are_those_of_the_dense_updates():
    fed = make_lora_clients(6, 12, 9, 2, contamination=0.2, seed=1)
    dense = [p.B @ p.A for p in fed.pairs]
    comp = compress_pairs([p.B for p in fed.pairs], [p.A for p in fed.pairs], base_known=True)
    # The true subspace in compressed coordinates: Q^T U, with Q the lift's basis.
    Uc = np.linalg.svd(comp.M, full_matrices=False)[0]
    U = comp.lift(Uc)
    Uc_true = Uc @ (U.T @ fed.U)  # coordinates of fed.U in the lift's basis
    res = offsubspace_residuals(comp, np.linalg.qr(Uc_true)[0], np.zeros(6))
    P = np.eye(12) - fed.U @ fed.U.T
    assert_allclose(res, [np.linalg.norm(P @ d) for d in dense], atol=1e-10)
    assert np.array_equal(res > 1e-8, fed.contaminated)


def test_base_unknown_residuals_subtract_the_reference_mean():
    rng = np.random.default_rng(2)
    W0 = rng.normal(size=(5, 2))
    U = np.linalg.qr(rng.normal(size=(5, 1)))[0]
    blocks = [W0 + U @ rng.normal(size=(1, 2)) for _ in range(5)]
    problem = stack_dense(blocks, base_known=False)
    res = offsubspace_residuals(problem, U, np.zeros(5))
    assert_allclose(res, 0, atol=1e-12)  # W0 cancels; what is left lies in span(U)


def test_collaborative_weights():
    assert_allclose(collaborative_weights(np.array([1.0, 2.0, 3.0]), np.array([True, True, False])),
                    [1 / 3, 2 / 3, 0])
    zero_sum = collaborative_weights(np.array([0.0, 0.0, 1.0]), np.array([True, True, False]))
    assert_allclose(zero_sum, [0.5, 0.5, 0])


def test_refinement_keeps_in_subspace_variation_and_averages_the_rest():
    rng = np.random.default_rng(3)
    U = np.linalg.qr(rng.normal(size=(6, 2)))[0]
    P = U @ U.T
    thetas = [rng.normal(size=(6, 3)) for _ in range(4)]
    pi = np.array([0.25, 0.25, 0.5, 0.0])
    out = refine_dense(thetas, U, pi)
    mean = sum(w * t for w, t in zip(pi, thetas, strict=True))
    for t, o in zip(thetas, out, strict=True):
        assert_allclose(P @ o, P @ t, atol=1e-12)  # in-subspace part: the client's own
        assert_allclose(o - P @ o, mean - P @ mean, atol=1e-12)  # off-subspace part: the benign mean


def test_refined_pairs_equal_refined_products():
    rng = np.random.default_rng(4)
    pairs = [FactorPair(rng.normal(size=(7, r)), rng.normal(size=(r, 5))) for r in (1, 2, 3)]
    U = np.linalg.qr(rng.normal(size=(7, 2)))[0]
    pi = np.array([0.5, 0.0, 0.5])
    out_pairs = refine_pairs(pairs, U, pi)
    out_dense = refine_dense([p.B @ p.A for p in pairs], U, pi)
    assert [p.rank for p in out_pairs] == [1 + 4, 2 + 4, 3 + 4]
    for p, d in zip(out_pairs, out_dense, strict=True):
        assert_allclose(p.B @ p.A, d, atol=1e-12)
    assert "RefinedPairs(n_clients=3" in repr(out_pairs)
    with pytest.raises(IndexError):
        out_pairs[3]
