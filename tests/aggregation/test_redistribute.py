"""FlexLoRA's download, ``redistribute(g, r, method="svd")``: ``B = U_r diag(S_r)``, ``A = Vh_r`` orthonormal.

Every slot of the download must be trainable: ``A`` has orthonormal rows (completed by an orthonormal
complement when the global pair has fewer singular directions than the client has slots), so the
gradient ``G A^T`` of each column of ``B`` is non-zero. The balanced convention (``sqrt(S)`` on both
factors) left such slots zero in both factors, with zero gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair, factored_svd, redistribute, truncate
from lowrank_fed.linalg import balanced_pair

from ..strategies import client_pairs

# The xp fixture returns a stateless Backend, so sharing it across hypothesis examples is safe.
backend_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def on(xp, pair, dtype="float64"):
    return FactorPair(xp.asarray(pair.B, dtype), xp.asarray(pair.A, dtype))


def product(xp, pair):
    return xp.numpy(pair.B) @ xp.numpy(pair.A)


def eps(dtype):
    return float(np.finfo(dtype).eps)


def best_rank(D, rank):
    """The Eckart-Young best rank-``rank`` approximation of ``D`` (dense reference) and its error."""
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], float(np.sqrt(np.sum(S[rank:] ** 2))), S


def assert_orthonormal_rows(A, n_rows, atol):
    """The first ``n_rows`` rows of ``A`` are orthonormal; any further rows are zero."""
    assert_allclose(A[:n_rows] @ A[:n_rows].T, np.eye(n_rows), atol=atol)
    assert_allclose(A[n_rows:], 0.0, atol=0)


# ---------------------------------------------------------------- the product: Eckart-Young


@backend_settings
@given(case=client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=9), rank=st.integers(1, 12))
def test_svd_download_is_the_best_rank_r_approximation(xp, case, rank):
    # Prepare
    (pair,), _ = case
    D = pair.B @ pair.A
    best, err, S = best_rank(D, rank)
    # Execute
    out = redistribute(on(xp, pair), rank, method="svd")
    # Assert
    assert out.rank == rank
    got = product(xp, out)
    scale = max(1.0, S[0])
    assert np.linalg.norm(D - got) == pytest.approx(err, abs=1e-9 * scale)
    assert_allclose(got, best, atol=1e-8 * scale)


# ---------------------------------------------------------------- A has orthonormal rows


@backend_settings
@given(
    case=client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=9),
    rank=st.integers(1, 12),
    n_zero=st.integers(0, 6),
)
def test_svd_download_has_orthonormal_rows_even_with_zero_singular_values(xp, case, rank, n_zero):
    # Prepare: zero columns of B leave fewer non-zero singular values than slots
    (pair,), _ = case
    B = pair.B.copy()
    B[:, : min(n_zero, pair.rank)] = 0.0
    pair = FactorPair(B, pair.A)
    d_in = pair.shape[1]
    # Execute
    out = redistribute(on(xp, pair), rank, method="svd")
    # Assert: orthonormal up to min(rank, d_in) rows (no more fit in d_in dimensions), product exact-or-best
    A = xp.numpy(out.A)
    assert_orthonormal_rows(A, min(rank, d_in), atol=1e-12)
    best, _, S = best_rank(pair.B @ pair.A, rank)
    assert_allclose(product(xp, out), best, atol=1e-8 * max(1.0, S[0]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rank_2_pair_redistributed_to_rank_5_gets_an_orthonormal_complement(xp, dtype):
    # Prepare: the global has 2 singular directions, the client 5 slots
    rng = np.random.default_rng(0)
    g = FactorPair(rng.normal(size=(8, 2)), rng.normal(size=(2, 7)))
    # Execute
    out = redistribute(on(xp, g, dtype), 5, method="svd")
    # Assert: same library and dtype; 5 orthonormal rows; B's complement columns zero; product exact
    assert type(out.A) is type(xp.asarray(g.A, dtype)) and out.A.dtype == xp.asarray(g.A, dtype).dtype
    tol = 50 * eps(dtype)
    A, B = xp.numpy(out.A), xp.numpy(out.B)
    assert_orthonormal_rows(A, 5, atol=tol)
    assert_allclose(B[:, 2:], 0.0, atol=0)
    assert_allclose(B @ A, g.B @ g.A, atol=tol * np.linalg.norm(g.B @ g.A, 2))


@pytest.mark.parametrize("rank", [3, 5])
def test_all_zero_B_downloads_orthonormal_rows(xp, rank):
    # Prepare: B = 0, as at initialisation (zero product, every singular value zero)
    rng = np.random.default_rng(1)
    g = FactorPair(np.zeros((8, 3)), rng.normal(size=(3, 7)))
    # Execute
    out = redistribute(on(xp, g), rank, method="svd")
    # Assert
    assert_orthonormal_rows(xp.numpy(out.A), rank, atol=1e-12)
    assert_allclose(xp.numpy(out.B), 0.0, atol=0)


def test_factored_svd_rows_of_zero_singular_values_are_orthonormal(xp):
    """The download takes ``Vh``'s rows as they are when ``rank <= m``: they must be orthonormal."""
    rng = np.random.default_rng(2)
    for d_out, d_in, r in [(20, 30, 4), (6, 5, 4), (50, 40, 3)]:  # Householder and dense routes
        B = rng.normal(size=(d_out, r))
        B[:, 1:] = 0.0
        A = rng.normal(size=(r, d_in))
        for g in (FactorPair(B, A), FactorPair(np.zeros((d_out, r)), A)):  # zero columns of B; B = 0
            for dtype in ("float64", "float32"):
                _, S, Vh = factored_svd([on(xp, g, dtype)])
                Vh = xp.numpy(Vh)
                assert_allclose(Vh @ Vh.T, np.eye(Vh.shape[0]), atol=50 * eps(dtype))


def test_rows_beyond_d_in_are_zero(xp):
    # Prepare: d_in = 3, so at most 3 orthonormal rows exist
    rng = np.random.default_rng(3)
    g = FactorPair(rng.normal(size=(6, 2)), rng.normal(size=(2, 3)))
    # Execute
    out = redistribute(on(xp, g), 5, method="svd")
    # Assert
    A, B = xp.numpy(out.A), xp.numpy(out.B)
    assert_orthonormal_rows(A, 3, atol=1e-12)
    assert_allclose(B[:, 2:], 0.0, atol=0)
    assert_allclose(B @ A, g.B @ g.A, atol=1e-12)


def test_bfloat16_is_computed_in_float32_and_returned_in_bfloat16():
    import torch

    g = FactorPair(torch.randn(8, 2, dtype=torch.bfloat16), torch.randn(2, 6, dtype=torch.bfloat16))
    out = redistribute(g, 4, method="svd")
    assert out.B.dtype == out.A.dtype == torch.bfloat16
    A = out.A.double().numpy()
    assert_allclose(A @ A.T, np.eye(4), atol=0.02)


# ---------------------------------------------------------------- the prefix property


@backend_settings
@given(
    case=client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=9),
    ranks=st.tuples(st.integers(1, 12), st.integers(1, 12)).map(sorted),
)
def test_smaller_download_is_the_prefix_of_a_larger_one(xp, case, ranks):
    """The torch layer caches one download per module and slices it; so the factors themselves must agree."""
    (pair,), _ = case
    r, r2 = ranks
    g = on(xp, pair)
    small, large = redistribute(g, r, method="svd"), truncate(redistribute(g, r2, method="svd"), r)
    m = min(pair.rank, *pair.shape)
    if r2 <= m:  # same SVD, same slices: bit for bit
        assert np.array_equal(xp.numpy(small.B), xp.numpy(large.B))
        assert np.array_equal(xp.numpy(small.A), xp.numpy(large.A))
    else:  # the complement rows come from QRs of different widths: equal to rounding
        assert_allclose(xp.numpy(small.B), xp.numpy(large.B), atol=0)
        assert_allclose(xp.numpy(small.A), xp.numpy(large.A), atol=1e-12)


# ---------------------------------------------------------------- the defect: every slot can learn


def slot_gradients(G, pair):
    """For ``L`` with ``dL/dW = G`` and ``W = W0 + B A``: ``dL/dB = G A^T``, ``dL/dA = B^T G``."""
    return G @ pair.A.T, pair.B.T @ G


def test_old_balanced_download_left_slots_without_gradient():
    """The old convention: sqrt(S) on both factors, so slots past the global's rank are 0 in both."""
    rng = np.random.default_rng(4)
    g = FactorPair(rng.normal(size=(8, 2)), rng.normal(size=(2, 7)))
    U, S, Vh = factored_svd([g])
    old = balanced_pair(np, U, S, Vh, 5)
    G = rng.normal(size=(8, 7))
    grad_B, grad_A = slot_gradients(G, old)
    assert np.all(grad_B[:, 2:] == 0) and np.all(grad_A[2:] == 0)  # slots 2..4 never learn


@pytest.mark.parametrize("zero_columns", [0, 1, 3])
def test_every_downloaded_slot_has_a_non_zero_gradient(xp, zero_columns):
    # Prepare: a global of rank 3 with some zero singular values, a client of rank 5, a random dL/dW
    rng = np.random.default_rng(5)
    B = rng.normal(size=(8, 3))
    B[:, :zero_columns] = 0.0
    g = FactorPair(B, rng.normal(size=(3, 7)))
    G = rng.normal(size=(8, 7))
    # Execute
    out = redistribute(on(xp, g), 5, method="svd")
    grad_B, _ = slot_gradients(G, FactorPair(xp.numpy(out.B), xp.numpy(out.A)))
    # Assert: ||G a_i|| >= sigma_min(G) > 0 for a unit a_i (G has full column rank, d_out >= d_in)
    sigma_min = np.linalg.svd(G, compute_uv=False)[-1]
    assert np.all(np.linalg.norm(grad_B, axis=0) >= (1 - 1e-9) * sigma_min)


def test_torch_autograd_agrees_every_slot_learns():
    import torch

    # Prepare: the download as trainable tensors, L = <G, B A> so dL/dW = G
    rng = np.random.default_rng(6)
    g = FactorPair(torch.as_tensor(rng.normal(size=(8, 2))), torch.as_tensor(rng.normal(size=(2, 7))))
    out = redistribute(g, 5, method="svd")
    B, A = out.B.clone().requires_grad_(True), out.A.clone().requires_grad_(True)
    G = torch.as_tensor(rng.normal(size=(8, 7)))
    # Execute
    torch.sum(G * (B @ A)).backward()
    # Assert: every column of B has a gradient, and it is G A^T
    assert bool(torch.all(torch.linalg.vector_norm(B.grad, dim=0) > 1e-3))
    torch.testing.assert_close(B.grad, G @ A.detach().T)
