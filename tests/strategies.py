"""Hypothesis strategies: random factor pairs of given ranks and matrices of given rank."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowrank_fed import FactorPair


@st.composite
def client_pairs(draw, *, min_clients=1, max_clients=5, max_rank=6, max_dim=9, equal_ranks=False, min_rank=1):
    """``(pairs, weights)``: K random float64 FactorPairs of a common (d_out, d_in) and weights > 0."""
    k = draw(st.integers(min_clients, max_clients))
    d_out = draw(st.integers(1, max_dim))
    d_in = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if equal_ranks:
        ranks = [draw(st.integers(min_rank, max_rank))] * k
    else:
        ranks = draw(st.lists(st.integers(min_rank, max_rank), min_size=k, max_size=k))
    pairs = [FactorPair(rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))) for r in ranks]
    weights = rng.uniform(0.1, 2.0, size=k)
    return pairs, weights


def matrix_of_rank(rng: np.random.Generator, d_out: int, d_in: int, singular_values) -> np.ndarray:
    """``Q1 diag(s) Q2^T`` with Haar-like orthonormal ``Q1``, ``Q2``: known singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    Q1, _ = np.linalg.qr(rng.normal(size=(d_out, s.size)))
    Q2, _ = np.linalg.qr(rng.normal(size=(d_in, s.size)))
    return (Q1 * s) @ Q2.T


def dense_weighted_sum(pairs, weights) -> np.ndarray:
    """The dense reference ``sum_k p_k B_k A_k`` with ``p_k = w_k / sum_j w_j`` (small sizes only)."""
    p = np.asarray(weights, dtype=float) / np.sum(weights)
    return sum(pk * (pair.B @ pair.A) for pk, pair in zip(p, pairs, strict=True))
