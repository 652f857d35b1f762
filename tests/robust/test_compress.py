"""Lossless compression: the compressed program is the dense one (norms, solutions, subspace)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import sin_theta
from lowrank_fed.robust import (
    clair,
    compress_dense,
    compress_pairs,
    solve_admm,
    solve_cvxpy,
    solve_fista,
    stack_dense,
)
from lowrank_fed.synthetic import make_lora_clients, random_factor_pairs


def dense_blocks(pairs):
    return [pair.B @ pair.A for pair in pairs]


def nuclear(X):
    return np.linalg.svd(X, compute_uv=False).sum()


@pytest.mark.parametrize("base_known", [True, False])
@given(
    ranks=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    d_out=st.integers(2, 14),
    d_in=st.integers(1, 14),
    seed=st.integers(0, 2**32 - 1),
)
def test_compression_keeps_the_nuclear_norm_and_every_block_norm(base_known, ranks, d_out, d_in, seed):
    # Prepare
    pairs = random_factor_pairs(ranks, d_out, d_in, seed=seed)
    dense = stack_dense(dense_blocks(pairs), base_known=base_known)
    # Execute
    comp = compress_pairs([p.B for p in pairs], [p.A for p in pairs], base_known=base_known)
    # Assert: the (centred) nuclear norm and the (centred) block norms are those of the dense stack
    scale = max(np.linalg.norm(dense.M), 1e-300)
    assert nuclear(comp.centred(comp.M)) == pytest.approx(nuclear(dense.centred(dense.M)), abs=1e-10 * scale)
    assert_allclose(comp.blocks.norms(comp.centred(comp.M)), dense.blocks.norms(dense.centred(dense.M)),
                    atol=1e-10 * scale)
    assert comp.M.shape[0] <= min(d_out, sum(ranks))


def test_centring_commutes_with_the_common_right_basis():
    # Base unknown: center(compressed) must be the compression of center(dense), block by block.
    pairs = random_factor_pairs([2, 3, 1], 9, 7, seed=0)
    comp = compress_pairs([p.B for p in pairs], [p.A for p in pairs], base_known=False)
    dense = stack_dense(dense_blocks(pairs), base_known=False)
    # Gram matrices of the centred stacks agree on the left (same singular values, same block norms).
    sv_c = np.linalg.svd(comp.centred(comp.M), compute_uv=False)
    sv_d = np.linalg.svd(dense.centred(dense.M), compute_uv=False)[: sv_c.size]
    assert_allclose(sv_c, sv_d, atol=1e-12)
    # A per-block right basis (the base-known compression) would not commute: widths differ.
    assert len(set(comp.blocks.widths)) == 1


def test_lift_maps_compressed_coordinates_back_to_an_orthonormal_basis_of_the_data():
    rng = np.random.default_rng(2)
    pairs = random_factor_pairs([3, 3, 3, 3], 40, 20, seed=1)
    comp = compress_pairs([p.B for p in pairs], [p.A for p in pairs], base_known=True)
    Uc = np.linalg.qr(rng.normal(size=(comp.M.shape[0], 4)))[0]
    U = comp.lift(Uc)
    assert U.shape == (40, 4)
    assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    # The left singular vectors of M, lifted, are those of the dense stack.
    Uc_M = np.linalg.svd(comp.M, full_matrices=False)[0][:, :5]
    U_dense = np.linalg.svd(np.hstack(dense_blocks(pairs)), full_matrices=False)[0][:, :5]
    assert sin_theta(comp.lift(Uc_M), U_dense) < 1e-10


@pytest.mark.parametrize("base_known", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_compressed_program_equals_dense_program(base_known, seed):
    # Same objective, flagged set and subspace: ADMM on the compressed pairs, ADMM and CVXPY on dense.
    fed = make_lora_clients(8, 12, 6, 2, client_rank=[1, 2, 3, 2, 2, 3, 1, 2], contamination=0.25, seed=seed)
    dense_list = dense_blocks(fed.pairs)
    comp = compress_pairs([p.B for p in fed.pairs], [p.A for p in fed.pairs], base_known=base_known)
    dense = stack_dense(dense_list, base_known=base_known)
    lam = 0.9
    fast_c, fast_d = solve_admm(comp, lam), solve_admm(dense, lam)
    ref = solve_cvxpy(dense, lam, solver="SCS", tol=1e-9)
    assert fast_c.converged and fast_d.converged
    assert fast_c.objective == pytest.approx(fast_d.objective, rel=1e-7)
    assert fast_c.objective == pytest.approx(ref.objective, rel=1e-5)
    flags_c = comp.blocks.norms(fast_c.S) > 1e-4 * comp.blocks.norms(comp.M).max()
    flags_d = dense.blocks.norms(ref.S) > 1e-4 * dense.blocks.norms(dense.M).max()
    assert np.array_equal(flags_c, flags_d)
    # clair() on pairs and on the dense products: same subspace, flags, objective and refinement.
    res_pairs = clair(fed.pairs, rank=2, lam=lam, base_known=base_known)
    res_dense = clair(dense_list, rank=2, lam=lam, base_known=base_known)
    assert sin_theta(res_pairs.subspace, res_dense.subspace) < 1e-8
    assert np.array_equal(res_pairs.collaborative, res_dense.collaborative)
    assert res_pairs.objective == pytest.approx(res_dense.objective, rel=1e-7)
    for pair, theta in zip(res_pairs.refined, res_dense.refined, strict=True):
        assert_allclose(pair.B @ pair.A, theta, atol=1e-10)


def test_compressed_noisy_program_equals_dense_noisy_program():
    fed = make_lora_clients(6, 10, 9, 2, contamination=0.2, seed=3, noise=0.1)
    comp = compress_pairs([p.B for p in fed.pairs], [p.A for p in fed.pairs], base_known=True)
    dense = stack_dense(dense_blocks(fed.pairs), base_known=True)
    a, b = solve_fista(comp, 0.8, 0.05), solve_fista(dense, 0.8, 0.05)
    assert a.objective == pytest.approx(b.objective, rel=1e-6)
    assert_allclose(comp.blocks.norms(a.S), dense.blocks.norms(b.S), atol=1e-5)


def test_dense_compression_of_wide_blocks_and_tall_stacks():
    rng = np.random.default_rng(4)
    wide = [rng.normal(size=(4, 2)) @ rng.normal(size=(2, 30)) for _ in range(3)]  # q_k > p
    comp = compress_dense(wide, base_known=True)
    assert comp.blocks.widths == (4, 4, 4)
    assert nuclear(comp.M) == pytest.approx(nuclear(np.hstack(wide)), rel=1e-12)
    tall = [rng.normal(size=(50, 2)) for _ in range(3)]
    comp = compress_dense(tall, base_known=False)
    assert comp.M.shape == (6, 6)
    assert nuclear(comp.centred(comp.M)) == pytest.approx(nuclear(stack_dense(tall, base_known=False).centred(
        np.hstack(tall))), rel=1e-12)


def test_rank_deficient_stack_drops_only_rounding_level_rows():
    # Benign updates share a rank-2 subspace, so the stack of 6 rank-2 updates has rank 2.
    fed = make_lora_clients(6, 30, 20, 2, seed=0)
    comp = compress_pairs([p.B for p in fed.pairs], [p.A for p in fed.pairs], base_known=True)
    assert comp.M.shape[0] == 2
    assert nuclear(comp.M) == pytest.approx(nuclear(np.hstack(dense_blocks(fed.pairs))), rel=1e-12)
