"""factored_svd and sin_theta: exactness against the dense SVD, signs, subspace distances."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair, aggregate, factored_svd, sin_theta
from lowrank_fed.linalg import (DENSE_FALLBACK_SHARE, aggregation_error, balanced_pair, prefix_update_energy,
                              product_fro_norm)

from .strategies import client_pairs, dense_weighted_sum, matrix_of_rank


@given(client_pairs())
def test_factored_svd_reconstructs_the_weighted_sum(case):
    pairs, weights = case
    U, S, Vh = factored_svd(pairs, weights)
    D = dense_weighted_sum(pairs, weights)
    m = min(sum(p.rank for p in pairs), *D.shape)
    assert S.shape == (m,) and U.shape == (D.shape[0], m) and Vh.shape == (m, D.shape[1])
    scale = max(1.0, np.abs(D).max())
    assert_allclose((U * S) @ Vh, D, atol=1e-10 * scale)
    assert_allclose(S, np.linalg.svd(D, compute_uv=False)[:m], atol=1e-10 * scale)
    assert np.all(np.diff(S) <= 1e-12 * scale)


@given(client_pairs(max_dim=12))
def test_factored_svd_bases_are_orthonormal_and_signs_fixed(case):
    pairs, weights = case
    U, S, Vh = factored_svd(pairs, weights)
    keep = S > 1e-8 * max(S.max(initial=0), 1)
    U, Vh = U[:, keep], Vh[keep]
    assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-10)
    assert_allclose(Vh @ Vh.T, np.eye(Vh.shape[0]), atol=1e-10)
    if U.size:
        top = U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])]
        assert np.all(top > 0)


def test_sign_convention_is_deterministic_under_factor_reparametrisation():
    rng = np.random.default_rng(3)
    pair = FactorPair(rng.normal(size=(30, 4)), rng.normal(size=(4, 20)))
    G = rng.normal(size=(4, 4))
    other = FactorPair(pair.B @ G, np.linalg.solve(G, pair.A))  # same product B A
    U1, S1, V1 = factored_svd([pair])
    U2, S2, V2 = factored_svd([other])
    assert_allclose(S1, S2, rtol=1e-10)
    assert_allclose(U1, U2, atol=1e-8)
    assert_allclose(V1, V2, atol=1e-8)


@pytest.mark.parametrize("r_total", [4, 40])  # below and above the dense fallback threshold
def test_both_paths_agree(r_total):
    rng = np.random.default_rng(r_total)
    d = 50
    assert (r_total > DENSE_FALLBACK_SHARE * d) == (r_total == 40)
    pairs = [FactorPair(rng.normal(size=(d, r_total // 2)), rng.normal(size=(r_total // 2, d))) for _ in range(2)]
    U, S, Vh = factored_svd(pairs)
    assert_allclose((U * S) @ Vh, dense_weighted_sum(pairs, [1, 1]), atol=1e-9)


def test_rank_deficient_sum_is_exact():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(20, 3))
    A = rng.normal(size=(3, 15))
    pairs = [FactorPair(B, A), FactorPair(B, A), FactorPair(-B, A)]  # sum = B A / 3, rank 3 of R = 9
    U, S, Vh = factored_svd(pairs)
    assert_allclose((U * S) @ Vh, B @ A / 3, atol=1e-10)
    assert np.all(S[3:] < 1e-10)


def test_backends_agree_with_numpy(xp):
    rng = np.random.default_rng(1)
    raw = [(rng.normal(size=(12, r)), rng.normal(size=(r, 9))) for r in (1, 3, 2)]
    ref = factored_svd([FactorPair(B, A) for B, A in raw], [1, 2, 3])
    pairs = [FactorPair(xp.asarray(B, "float32"), xp.asarray(A, "float32")) for B, A in raw]
    U, S, Vh = factored_svd(pairs, [1, 2, 3])
    assert type(U) is type(pairs[0].B) and U.dtype == pairs[0].B.dtype
    assert_allclose(xp.numpy(S), ref[1], rtol=1e-4, atol=1e-5)
    assert_allclose(xp.numpy(U) * xp.numpy(S) @ xp.numpy(Vh), (ref[0] * ref[1]) @ ref[2], atol=1e-4)
    assert_allclose(xp.numpy(U), ref[0], atol=1e-3)  # the same sign convention on every backend


@given(st.integers(1, 6), st.integers(0, 2**31))
def test_product_fro_norm(r, seed):
    rng = np.random.default_rng(seed)
    pair = FactorPair(rng.normal(size=(7, r)), rng.normal(size=(r, 5)))
    assert product_fro_norm(pair) == pytest.approx(np.linalg.norm(pair.B @ pair.A), rel=1e-10)


def test_sin_theta_of_known_angle():
    theta = 0.3
    U = np.array([[1.0], [0.0], [0.0]])
    U_hat = np.array([[np.cos(theta)], [np.sin(theta)], [0.0]])
    assert sin_theta(U_hat, U) == pytest.approx(np.sin(theta), rel=1e-12)


def test_sin_theta_is_basis_invariant_and_symmetric():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(10, 3)))[0]
    V = np.linalg.qr(rng.normal(size=(10, 3)))[0]
    G = rng.normal(size=(3, 3))
    assert sin_theta(U @ G, U) < 1e-12
    assert sin_theta(U, V) == pytest.approx(sin_theta(V, U), rel=1e-12)
    assert sin_theta(U @ G, V) == pytest.approx(sin_theta(U, V), rel=1e-10)


def test_sin_theta_is_one_when_dimensions_differ():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(10, 3)))[0]
    assert sin_theta(U[:, :2], U) == pytest.approx(1.0)


def test_sin_theta_shape_error():
    with pytest.raises(ValueError, match=r"same number of rows. Got shapes \(4, 2\) and \(5, 2\)"):
        sin_theta(np.zeros((4, 2)), np.zeros((5, 2)))


def test_matrix_of_rank_strategy_has_the_singular_values():
    rng = np.random.default_rng(0)
    M = matrix_of_rank(rng, 8, 6, [3.0, 2.0, 0.5])
    assert_allclose(np.linalg.svd(M, compute_uv=False)[:4], [3.0, 2.0, 0.5, 0.0], atol=1e-12)


@pytest.mark.parametrize("case", ["well-conditioned", "zero B (round 1)", "ill-conditioned"])
def test_float32_routes_are_accurate_and_orthonormal(case, xp):
    """float32 work takes the Gram (Cholesky-QR) route when well conditioned, Householder otherwise."""
    rng = np.random.default_rng(5)
    raw = [(rng.normal(size=(80, r)), rng.normal(size=(r, 60))) for r in (2, 4, 6)]
    if case == "zero B (round 1)":
        raw[1] = (np.zeros((80, 4)), raw[1][1])
    if case == "ill-conditioned":
        raw[2] = (raw[2][0] * np.array([1, 1, 1, 1, 1, 1e-5]), raw[2][1])
    pairs = [FactorPair(xp.asarray(B, "float32"), xp.asarray(A, "float32")) for B, A in raw]
    U, S, Vh = (xp.numpy(x) for x in factored_svd(pairs, [1, 2, 3]))
    D = dense_weighted_sum([FactorPair(B, A) for B, A in raw], [1, 2, 3])
    assert_allclose((U * S) @ Vh, D, atol=2e-5 * np.abs(D).max())
    assert_allclose(S, np.linalg.svd(D, compute_uv=False)[:12], atol=2e-5 * S[0])
    live = S > 1e-3 * S[0]
    assert_allclose(U[:, live].T @ U[:, live], np.eye(live.sum()), atol=1e-4)
    assert_allclose(Vh[live] @ Vh[live].T, np.eye(live.sum()), atol=1e-4)


# ----------------------------------------------------------------------------- aggregation_error
FACTOR_RULES = ["zero_pad", "replication", "segment", "stack", "svd"]


@given(client_pairs(), st.sampled_from(FACTOR_RULES))
def test_aggregation_error_equals_the_dense_computation(case, rule):
    pairs, weights = case
    result = aggregate(rule, pairs, weights)
    D = dense_weighted_sum(pairs, weights)
    num, den = aggregation_error(pairs, weights, result)
    scale = max(1.0, np.linalg.norm(D))
    assert abs(num - np.linalg.norm(D - result.B @ result.A)) <= 1e-10 * scale
    assert abs(den - np.linalg.norm(D)) <= 1e-10 * scale
    if rule in ("stack", "svd"):  # the exact rules
        assert num <= 1e-10 * scale


@given(client_pairs(min_clients=2))
def test_aggregation_error_of_a_truncation_is_the_eckart_young_tail(case):
    pairs, weights = case
    U, S, Vh = factored_svd(pairs, weights)
    t = max(1, len(S) // 2)
    num, den = aggregation_error(pairs, weights, aggregate("svd", pairs, weights, rank=t))
    assert_allclose(num, np.linalg.norm(S[t:]), atol=1e-10 * max(1.0, S[0]))
    # client order does not change it
    order = list(range(len(pairs)))[::-1]
    again = aggregation_error([pairs[k] for k in order], [weights[k] for k in order],
                              aggregate("svd", pairs, weights, rank=t))
    assert_allclose(again, (num, den), atol=1e-10 * max(1.0, S[0]))


def test_aggregation_error_backends_agree(xp):
    rng = np.random.default_rng(2)
    raw = [(rng.normal(size=(12, r)), rng.normal(size=(r, 9))) for r in (1, 3, 2)]
    pairs = [FactorPair(B, A) for B, A in raw]
    ref = aggregation_error(pairs, [1, 2, 3], aggregate("zero_pad", pairs, [1, 2, 3]))
    cast = [FactorPair(xp.asarray(B, "float32"), xp.asarray(A, "float32")) for B, A in raw]
    got = aggregation_error(cast, [1, 2, 3], aggregate("zero_pad", cast, [1, 2, 3]))
    assert_allclose(got, ref, rtol=1e-5)


@given(client_pairs(max_dim=10))
def test_prefix_update_energy_is_the_dense_norm_of_every_prefix_update(case):
    # Prepare: two adapters of the same shapes (the first two clients' pairs, or one pair against a shifted copy)
    pairs, _ = case
    before = pairs[0]
    after = FactorPair(before.B + 0.5 * np.roll(before.B, 1, axis=0) + 0.1, before.A - 0.3 * np.roll(before.A, 1, axis=1))
    # Execute
    e = prefix_update_energy(before, after)
    # Assert: e_t = ||B'_{:t} A'_{:t} - B_{:t} A_{:t}||_F^2 for every t; e_r is the whole update's
    dense = [np.linalg.norm(after.B[:, :t] @ after.A[:t] - before.B[:, :t] @ before.A[:t]) ** 2
             for t in range(1, before.rank + 1)]
    scale = max(1.0, max(dense))
    assert e.shape == (before.rank,) and e.dtype == np.float64
    assert_allclose(e, dense, atol=1e-9 * scale, rtol=1e-9)


def test_prefix_update_energy_of_an_update_in_the_tail_is_zero_on_the_prefix():
    # Prepare: only slots 2.. move
    rng = np.random.default_rng(0)
    before = FactorPair(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)))
    B, A = before.B.copy(), before.A.copy()
    B[:, 2:] += 1.0
    A[3] -= 2.0
    # Execute
    e = prefix_update_energy(before, FactorPair(B, A))
    # Assert
    assert e[0] == 0.0 and e[1] == 0.0 and e[3] > 0
    with pytest.raises(ValueError, match=r"before has B \(6, 4\), A \(4, 5\) and after has B \(6, 3\), A \(3, 5\); "
                                         r"expected the same shapes"):
        prefix_update_energy(before, FactorPair(B[:, :3], A[:3]))


# ----------------------------------------------------------------------------- the float32 Gram and its check
def _columns(d, R, cond, seed):
    """A float32 ``d x R`` matrix with singular values from 1 down to ``1 / cond`` and equal column norms."""
    rng = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(rng.normal(size=(d, R)))
    Q2, _ = np.linalg.qr(rng.normal(size=(R, R)))
    return ((Q1 * np.geomspace(1, 1 / cond, R)) @ Q2).astype(np.float32)


def _defect(X, L):
    """``||Q^T Q - I||_F`` of ``Q = X L^{-T}``, in float64."""
    Q = X.astype(np.float64) @ np.linalg.inv(L).T
    return np.linalg.norm(Q.T @ Q - np.eye(X.shape[1]))


@pytest.mark.parametrize("cond", [2, 30, 300])
def test_the_float32_gram_serves_only_while_its_bases_are_orthonormal(cond):
    from lowrank_fed.cholesky_qr import GRAM32_MAX_DEFECT, _cholesky, _gram_defect, gram_cholesky

    X = _columns(2000, 60, cond, seed=cond)
    L32 = _cholesky(np, (X.T @ X).astype(np.float64), np.inf)
    X64 = X.astype(np.float64)
    L64 = _cholesky(np, X64.T @ X64, np.inf)
    true32, estimate = _defect(X, L32), _gram_defect(np, X, L32)
    assert 0.3 * true32 <= estimate <= 3 * true32  # the probes measure what they claim
    L = gram_cholesky(np, X)
    if estimate <= GRAM32_MAX_DEFECT:
        assert cond == 2 and np.array_equal(L, L32)  # well conditioned: the float32 Gram, to float32 rounding
    else:
        assert cond > 2 and np.array_equal(L, L64)  # kappa^2 eps_32 too large: the float64 Gram
    assert _defect(X, L) <= max(GRAM32_MAX_DEFECT, 1e-6)


@pytest.mark.parametrize("cond", [2, 300])
def test_flexlora_in_float32_is_accurate_on_either_gram(cond):
    rng = np.random.default_rng(cond)
    Bs = np.split(_columns(1500, 40, cond, seed=1), [8, 24], axis=1)  # ranks 8, 16, 16
    pairs = [FactorPair(B, rng.normal(size=(B.shape[1], 900)).astype(np.float32)) for B in Bs]
    weights = [1.0, 2.0, 3.0]
    D = dense_weighted_sum([FactorPair(p.B.astype(np.float64), p.A.astype(np.float64)) for p in pairs], weights)
    S_true = np.linalg.svd(D, compute_uv=False)[:40]
    U, S, Vh = factored_svd(pairs, weights)
    assert_allclose(S, S_true, atol=1e-5 * S_true[0])
    assert_allclose(U.T @ U, np.eye(40), atol=1e-5)
    assert_allclose(Vh @ Vh.T, np.eye(40), atol=1e-5)
    for rank in (None, 10, 50):  # exact, truncated, padded
        out = aggregate("svd", pairs, weights, rank=rank)
        t = min(rank or 40, 40)
        ref = balanced_pair(np, U, S, Vh, rank or 40)  # the same pair through U and Vh
        assert out.rank == (rank or 40)
        assert_allclose(out.B @ out.A, ref.B @ ref.A, atol=1e-5 * S_true[0])
        assert_allclose(np.linalg.norm(out.B[:, :t], axis=0) ** 2, S_true[:t], rtol=2e-5, atol=1e-6 * S_true[0])
        signs = np.sign(out.B[np.argmax(np.abs(out.B[:, :t]), axis=0), np.arange(t)])
        assert np.all(signs > 0)  # svd_flip's convention, read off B


def test_flip_signs_are_svd_flips_and_a_tie_goes_to_the_first_row():
    from lowrank_fed.linalg import _flip_signs

    rng = np.random.default_rng(0)
    U = rng.normal(size=(50, 7))
    U[:, 3] = 0.0
    U[[4, 9], 5] = [-9.0, 9.0]  # the largest magnitude twice: the first by row (negative) decides
    U[[2, 6], 6] = [9.0, -9.0]
    old = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(7)])
    old[old == 0] = 1
    assert_allclose(_flip_signs(np, U), old)
    assert list(_flip_signs(np, U)[[3, 5, 6]]) == [1, -1, 1]


def test_the_triangular_solve_matches_the_general_solve_and_leaves_the_blas_threads_as_they_were():
    from threadpoolctl import threadpool_info

    from lowrank_fed.cholesky_qr import _blas_pools, one_blas_thread, solve_upper

    _blas_pools()  # SciPy's BLAS loaded first, so `before` lists every pool (solve_upper loads it)
    rng = np.random.default_rng(0)
    Ru = np.triu(rng.normal(size=(30, 30))) + 10 * np.eye(30)
    Y = rng.normal(size=(30, 4))
    before = [pool["num_threads"] for pool in threadpool_info()]
    outside = solve_upper(np, Ru, Y)
    with one_blas_thread():
        inside = solve_upper(np, Ru, Y)
    assert [pool["num_threads"] for pool in threadpool_info()] == before
    assert_allclose(outside, np.linalg.solve(Ru, Y), rtol=1e-12)
    assert np.array_equal(inside, outside)
    assert_allclose(Ru @ outside, Y, atol=1e-12)


def test_overlapping_blocks_keep_one_thread_until_the_last_closes():
    from threadpoolctl import threadpool_info, threadpool_limits

    from lowrank_fed.cholesky_qr import _blas_pools, one_blas_thread

    _blas_pools()  # every BLAS pool loaded before the counts are read

    def counts():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        first, second = one_blas_thread(), one_blas_thread()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the first to open closes first (two threads' blocks can)
        between = counts()
        second.__exit__(None, None, None)
        after = counts()
    assert 2 in before and set(between) == {1}  # still one thread: the second block is open
    assert after == before  # the last to close restored the counts from before the first opened


def test_a_block_opened_in_the_main_thread_holds_every_thread_and_one_opened_elsewhere_may_not():
    # Prepare: the pools at 2 threads, set from the main thread
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from lowrank_fed.cholesky_qr import _blas_pools, one_blas_thread

    _blas_pools()

    def counts():  # OpenBLAS's own pools (pthreads): NumPy's and SciPy's here; another BLAS loaded beside is not read
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"
                and (pool["internal_api"], pool.get("threading_layer")) == ("openblas", "pthreads")]

    if not counts():
        pytest.skip("a property of OpenBLAS's own thread pool (pthreads); this process has no such BLAS")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: OpenBLAS holds one thread whatever is asked")

    def in_a_thread(body):
        seen = {}
        thread = threading.Thread(target=lambda: seen.update(counts=body()))
        thread.start()
        thread.join()
        return seen["counts"]

    def opened_here():
        with one_blas_thread():
            return counts()

    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        # Execute: a block opened in the main thread, read in another; a block opened in another thread
        with one_blas_thread():
            main_block = in_a_thread(counts)
        thread_block = in_a_thread(opened_here)
        after = counts()
    # Assert: the main thread's block holds every thread at one; OpenBLAS ignores a count set from another thread
    # once the main thread has set one (why the Flower engine opens the block in its main thread)
    assert 2 in before and set(main_block) == {1} and after == before
    assert thread_block == before


def test_the_signs_of_a_tied_column_on_every_backend(xp):
    from array_api_compat import array_namespace

    from lowrank_fed.linalg import _flip_signs

    U = xp.asarray([[-3.0, 1.0], [0.0, -2.0], [3.0, 0.0], [0.0, 0.5]])  # column 0: -3 and 3, the first decides
    assert list(xp.numpy(_flip_signs(array_namespace(U), U))) == [-1.0, -1.0]


def test_columns_past_the_float64_grams_bound_skip_both_grams():
    from lowrank_fed.cholesky_qr import GRAM_SKIP_COND, gram_cholesky

    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.normal(size=(2000, 60)))
    X = (Q * np.geomspace(1, 1e-5, 60)).astype(np.float32)  # diagonals spread 1e5, beyond GRAM_SKIP_COND
    L = np.linalg.cholesky((X.T @ X).astype(np.float64))
    assert np.abs(np.diag(L)).max() > GRAM_SKIP_COND * np.abs(np.diag(L)).min()
    assert gram_cholesky(np, X) is None  # the caller takes Householder QR
