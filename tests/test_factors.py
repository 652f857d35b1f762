"""FactorPair, truncate, pad: construction, round trips, errors, every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from lowrank_fed import FactorPair, pad, truncate


def test_rank_and_shape():
    pair = FactorPair(np.zeros((5, 3)), np.zeros((3, 7)))
    assert pair.rank == 3
    assert pair.shape == (5, 7)


@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 5), st.integers(0, 2**31))
def test_pad_then_truncate_round_trips(d, r, extra, seed):
    rng = np.random.default_rng(seed)
    pair = FactorPair(rng.normal(size=(d, r)), rng.normal(size=(r, d + 1)))
    padded = pad(pair, r + extra)
    assert padded.rank == r + extra
    assert_allclose(padded.B @ padded.A, pair.B @ pair.A, atol=1e-12)
    back = truncate(padded, r)
    assert_array_equal(back.B, pair.B)
    assert_array_equal(back.A, pair.A)


def test_truncate_keeps_leading_slots():
    B = np.arange(6.0).reshape(2, 3)
    A = np.arange(9.0).reshape(3, 3)
    t = truncate(FactorPair(B, A), 2)
    assert_array_equal(t.B, B[:, :2])
    assert_array_equal(t.A, A[:2])


def test_backends_keep_namespace_dtype(xp):
    pair = FactorPair(xp.asarray(np.ones((3, 2)), "float32"), xp.asarray(np.ones((2, 4)), "float32"))
    padded = pad(pair, 5)
    assert type(padded.B) is type(pair.B)
    assert padded.B.dtype == pair.B.dtype
    assert_allclose(xp.numpy(padded.B @ padded.A), np.full((3, 4), 2.0))
    assert truncate(padded, 1).rank == 1


def test_rank_mismatch_message():
    with pytest.raises(ValueError, match="B has 3 columns but A has 2 rows"):
        FactorPair(np.zeros((4, 3)), np.zeros((2, 5)))


def test_not_2d_message():
    with pytest.raises(ValueError, match=r"B.ndim = 1, A.ndim = 2"):
        FactorPair(np.zeros(4), np.zeros((2, 5)))


def test_mixed_types_message():
    with pytest.raises(TypeError, match="Mixed array types.*numpy.ndarray.*torch.Tensor"):
        FactorPair(np.zeros((4, 2)), torch.zeros(2, 5))


def test_not_an_array_message():
    with pytest.raises(TypeError, match="Expected an array.*Got list"):
        FactorPair([[1.0]], np.zeros((1, 1)))


def test_truncate_rank_out_of_range():
    pair = FactorPair(np.zeros((4, 2)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"'rank' parameter must be in \[0, 2\]. Got 3"):
        truncate(pair, 3)


def test_pad_rank_below_current():
    pair = FactorPair(np.zeros((4, 2)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"'rank' parameter must be >= 2. Got 1"):
        pad(pair, 1)


def test_rank_must_be_int():
    pair = FactorPair(np.zeros((4, 2)), np.zeros((2, 5)))
    with pytest.raises(TypeError, match="'rank' parameter must be an int. Got 1.5"):
        truncate(pair, 1.5)


def test_torch_parameter_and_tensor_are_one_library():
    B = torch.nn.Parameter(torch.ones(3, 2))
    pair = FactorPair(B * 2.0, torch.nn.Parameter(torch.ones(2, 4)))
    assert pair.rank == 2


@given(st.integers(1, 6), st.integers(0, 4), st.integers(0, 4), st.integers(0, 2**31))
def test_difference_is_the_change_of_the_products(d, r1, r0, seed):
    from lowrank_fed.factors import difference

    rng = np.random.default_rng(seed)
    after = FactorPair(rng.normal(size=(d, r1)), rng.normal(size=(r1, d + 2)))
    before = FactorPair(rng.normal(size=(d, r0)), rng.normal(size=(r0, d + 2)))
    change = difference(after, before)
    assert change.rank == r1 + r0
    assert_allclose(change.B @ change.A, after.B @ after.A - before.B @ before.A, atol=1e-12)
    assert_allclose(difference(after, after).B @ difference(after, after).A, 0.0, atol=1e-12)


def test_difference_keeps_the_namespace_and_names_a_shape_mismatch(xp):
    from lowrank_fed.factors import difference

    one = FactorPair(xp.asarray(np.ones((3, 2)), "float32"), xp.asarray(np.ones((2, 4)), "float32"))
    change = difference(one, pad(one, 3))
    assert type(change.B) is type(one.B) and change.B.dtype == one.B.dtype
    assert_allclose(xp.numpy(change.B @ change.A), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"after has shape \(3, 4\) and before \(3, 5\)"):
        difference(one, FactorPair(xp.asarray(np.ones((3, 1)), "float32"), xp.asarray(np.ones((1, 5)), "float32")))
