"""The aggregation rules: hand-computed cases, the properties their equations imply, every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import AGGREGATORS, FactorPair, aggregate, pad, redistribute, truncate
from lowrank_fed.aggregation import (
    aggregate_fedavg,
    aggregate_replication,
    aggregate_segment,
    aggregate_slotwise,
    aggregate_stack,
    aggregate_svd,
    aggregate_zero_pad,
)

from ..strategies import client_pairs, dense_weighted_sum


def product(pair):
    return pair.B @ pair.A


def normalised(weights):
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


# ---------------------------------------------------------------- exact rules: stack, svd


@given(client_pairs())
def test_stack_reproduces_the_weighted_sum(case):
    pairs, weights = case
    out = aggregate_stack(pairs, weights)
    assert out.rank == sum(p.rank for p in pairs)
    assert_allclose(product(out), dense_weighted_sum(pairs, weights), atol=1e-10)


@given(client_pairs())
def test_svd_without_rank_reproduces_the_weighted_sum(case):
    pairs, weights = case
    out = aggregate_svd(pairs, weights)
    assert_allclose(product(out), dense_weighted_sum(pairs, weights), atol=1e-9)


@given(client_pairs(max_dim=10), st.integers(1, 10))
def test_svd_with_rank_is_the_eckart_young_optimum(case, rank):
    pairs, weights = case
    D = dense_weighted_sum(pairs, weights)
    rank = min(rank, *D.shape)
    out = aggregate_svd(pairs, weights, rank=rank)
    assert out.rank == rank
    s = np.linalg.svd(D, compute_uv=False)
    err = np.linalg.norm(D - product(out))
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), abs=1e-9 * max(1.0, s[0]))
    # no rank-`rank` matrix does better: compare with the truncated dense SVD itself
    U, S, Vh = np.linalg.svd(D)
    assert_allclose(product(out), (U[:, :rank] * S[:rank]) @ Vh[:rank], atol=1e-8 * max(1.0, s[0]))


# ---------------------------------------------------------------- fedavg


def test_fedavg_hand_computed():
    p1 = FactorPair(np.array([[1.0], [2.0]]), np.array([[1.0, 0.0]]))
    p2 = FactorPair(np.array([[3.0], [0.0]]), np.array([[0.0, 1.0]]))
    out = aggregate_fedavg([p1, p2], [1, 3])
    assert_allclose(out.B, [[2.5], [0.5]])
    assert_allclose(out.A, [[0.25, 0.75]])


def test_fedavg_is_not_exact_for_the_product():
    """Factor-wise averaging adds cross terms: avg(B) avg(A) != avg(B A) (the discordance)."""
    rng = np.random.default_rng(0)
    pairs = [FactorPair(rng.normal(size=(6, 2)), rng.normal(size=(2, 5))) for _ in range(3)]
    out = aggregate_fedavg(pairs)
    assert np.linalg.norm(product(out) - dense_weighted_sum(pairs, [1, 1, 1])) > 0.1


def test_fedavg_needs_equal_ranks():
    pairs = [FactorPair(np.ones((3, 2)), np.ones((2, 3))), FactorPair(np.ones((3, 4)), np.ones((4, 3)))]
    with pytest.raises(ValueError, match="Client 1: rank 4; this rule needs equal ranks, expected 2"):
        aggregate_fedavg(pairs)


# ---------------------------------------------------------------- zero_pad


@given(client_pairs())
def test_zero_pad_slot_is_the_diluted_sum(case):
    """Slot i of zero_pad is sum_{k: r_k > i} p_k b_{k,i} (and likewise for a_i)."""
    pairs, weights = case
    p = normalised(weights)
    out = aggregate_zero_pad(pairs, weights)
    for i in range(out.rank):
        owners = [k for k, pair in enumerate(pairs) if pair.rank > i]
        assert_allclose(out.B[:, i], sum(p[k] * pairs[k].B[:, i] for k in owners), atol=1e-12)
        assert_allclose(out.A[i], sum(p[k] * pairs[k].A[i] for k in owners), atol=1e-12)


@given(client_pairs())
def test_zero_pad_dilution_factor_relative_to_segment(case):
    """zero_pad = segment * sum_{k: r_k > i} p_k, slot by slot."""
    pairs, weights = case
    p = normalised(weights)
    zp = aggregate_zero_pad(pairs, weights)
    seg = aggregate_segment(pairs, weights)
    ranks = np.array([pair.rank for pair in pairs])
    factor = np.array([p[ranks > i].sum() for i in range(zp.rank)])
    assert_allclose(zp.B, seg.B * factor[None, :], atol=1e-12)
    assert_allclose(zp.A, seg.A * factor[:, None], atol=1e-12)


def test_zero_pad_frobenius_weights():
    rng = np.random.default_rng(0)
    pairs = [FactorPair(rng.normal(size=(5, r)), rng.normal(size=(r, 4))) for r in (1, 3)]
    norms = np.array([np.linalg.norm(product(pair)) for pair in pairs])
    q = norms / norms.sum()
    out = aggregate_zero_pad(pairs, weighting="frobenius")
    assert_allclose(out.B, q[0] * pad(pairs[0], 3).B + q[1] * pairs[1].B, atol=1e-12)
    with pytest.raises(ValueError, match=r"Unknown weighting 'size'; expected one of \['data', 'frobenius'\]"):
        aggregate_zero_pad(pairs, weighting="size")


def test_zero_pad_frobenius_with_all_zero_updates_falls_back_to_data_weights():
    pairs = [FactorPair(np.zeros((2, 1)), np.zeros((1, 2))), FactorPair(np.zeros((2, 2)), np.ones((2, 2)))]
    out = aggregate_zero_pad(pairs, [1, 3], weighting="frobenius")
    assert_allclose(out.A, [[0.75, 0.75], [0.75, 0.75]])  # data weights 1:3 (uniform would give 0.5)


# ---------------------------------------------------------------- segment and replication


@given(client_pairs(equal_ranks=True))
def test_segment_equals_fedavg_for_equal_ranks(case):
    pairs, weights = case
    seg, avg = aggregate_segment(pairs, weights), aggregate_fedavg(pairs, weights)
    assert_allclose(seg.B, avg.B, atol=1e-12)
    assert_allclose(seg.A, avg.A, atol=1e-12)


@given(client_pairs())
def test_replication_equals_segment(case):
    pairs, weights = case
    rep, seg = aggregate_replication(pairs, weights), aggregate_segment(pairs, weights)
    assert_allclose(rep.B, seg.B, atol=1e-12)
    assert_allclose(rep.A, seg.A, atol=1e-12)


@given(client_pairs(min_clients=2))
def test_segment_never_dilutes_a_slot_owned_by_one_client(case):
    pairs, weights = case
    ranks = np.array([pair.rank for pair in pairs])
    out = aggregate_segment(pairs, weights)
    for i in range(out.rank):
        owners = np.flatnonzero(ranks > i)
        if owners.size == 1:
            k = owners[0]
            assert_allclose(out.B[:, i], pairs[k].B[:, i], atol=1e-12)
            assert_allclose(out.A[i], pairs[k].A[i], atol=1e-12)


def test_segment_hand_computed_segments():
    # ranks 1, 2, 4 with weights 1, 1, 2: slot 0 over all, slot 1 over clients 1-2, slots 2-3 client 2 only
    pairs = [
        FactorPair(np.full((1, 1), 1.0), np.ones((1, 1))),
        FactorPair(np.full((1, 2), 2.0), np.ones((2, 1))),
        FactorPair(np.full((1, 4), 5.0), np.ones((4, 1))),
    ]
    out = aggregate_segment(pairs, [1, 1, 2])
    assert_allclose(out.B, [[(1 + 2 + 10) / 4, (2 + 10) / 3, 5.0, 5.0]])


def test_segment_keeps_previous_slots_beyond_the_participants():
    prev = FactorPair(np.arange(4.0)[None, :], np.ones((4, 2)))
    pairs = [FactorPair(np.full((1, 2), 9.0), np.zeros((2, 2)))]
    out = aggregate_segment(pairs, previous=prev)
    assert_allclose(out.B, [[9.0, 9.0, 2.0, 3.0]])
    assert_allclose(out.A, [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_segment_slot_owned_only_by_zero_weight_client_keeps_previous():
    prev = FactorPair(np.full((1, 2), 7.0), np.ones((2, 1)))
    pairs = [FactorPair(np.ones((1, 1)), np.ones((1, 1))), FactorPair(np.full((1, 2), 3.0), np.ones((2, 1)))]
    out = aggregate_segment(pairs, [1, 0], previous=prev)
    assert_allclose(out.B, [[1.0, 7.0]])


# ---------------------------------------------------------------- slotwise


def _previous_and_slots(pairs, R, seed):
    """A random rank-``R`` previous global and, per client, ``r_k`` distinct random slots of ``R``."""
    rng = np.random.default_rng(seed)
    d_out, d_in = pairs[0].shape
    prev = FactorPair(rng.normal(size=(d_out, R)), rng.normal(size=(R, d_in)))
    return prev, [rng.choice(R, size=pair.rank, replace=False) for pair in pairs]


@given(client_pairs(max_rank=5), st.integers(0, 2**31))
def test_slotwise_averages_only_updaters_and_keeps_previous(case, seed):
    pairs, weights = case
    R = 6
    prev, slots = _previous_and_slots(pairs, R, seed)
    p = normalised(weights)
    out = aggregate_slotwise(pairs, weights, slots=slots, previous=prev)
    assert out.rank == R
    for i in range(R):
        upd = [(k, int(np.flatnonzero(s == i)[0])) for k, s in enumerate(slots) if i in s]
        if not upd:
            assert_allclose(out.B[:, i], prev.B[:, i], atol=0)
            assert_allclose(out.A[i], prev.A[i], atol=0)
            continue
        den = sum(p[k] for k, _ in upd)
        assert_allclose(out.B[:, i], sum(p[k] * pairs[k].B[:, j] for k, j in upd) / den, atol=1e-12)
        assert_allclose(out.A[i], sum(p[k] * pairs[k].A[j] for k, j in upd) / den, atol=1e-12)


@given(client_pairs())
def test_slotwise_with_prefix_slots_equals_segment(case):
    pairs, weights = case
    sw, seg = aggregate_slotwise(pairs, weights), aggregate_segment(pairs, weights)
    assert_allclose(sw.B, seg.B, atol=1e-12)
    assert_allclose(sw.A, seg.A, atol=1e-12)


@given(client_pairs())
def test_diluted_slotwise_with_prefix_slots_equals_zero_padding(case):
    pairs, weights = case
    out = aggregate_slotwise(pairs, weights, absent="zero")
    assert_allclose(product(out), product(aggregate_zero_pad(pairs, weights)), atol=1e-10)


@given(client_pairs(max_rank=5), st.integers(0, 2**31))
def test_diluted_slotwise_scales_each_owned_slot_by_its_owners_weight(case, seed):
    """Zero-padding at the slots: slot i of the adaptive average times c_i = sum_{k in U_i} p_k (both factors, so
    c_i^2 on the slot's product); slots nobody updated keep ``previous`` under both rules."""
    pairs, weights = case
    R = 6
    prev, slots = _previous_and_slots(pairs, R, seed)
    p = normalised(weights)
    cover = np.array([sum(p[k] for k, s in enumerate(slots) if i in s) for i in range(R)])
    adaptive = aggregate_slotwise(pairs, weights, slots=slots, previous=prev)
    diluted = aggregate_slotwise(pairs, weights, slots=slots, previous=prev, absent="zero")
    c = np.where(cover > 0, cover, 1.0)
    assert_allclose(diluted.B, adaptive.B * c[None, :], atol=1e-12)
    assert_allclose(diluted.A, adaptive.A * c[:, None], atol=1e-12)
    # a slot every client updated is not diluted
    full = [np.flatnonzero(cover > 1 - 1e-12)]
    assert_allclose(diluted.B[:, full[0]], adaptive.B[:, full[0]], atol=1e-12)


def _held(prev, pair, idx):
    """What a client that trained slots ``idx`` of ``prev`` (the rest frozen) holds: ``prev`` with them replaced."""
    B, A = prev.B.copy(), prev.A.copy()
    B[:, idx], A[idx] = pair.B, pair.A
    return FactorPair(B, A)


@given(client_pairs(max_rank=5), st.integers(0, 2**31))
def test_held_mean_slotwise_is_the_fedavg_of_the_held_adapters(case, seed):
    """``absent="previous"``: a client that did not update slot i counts as the previous value there, so the rule
    is the factor-wise FedAvg of what each client holds under freezing (its slots trained, the rest at ``prev``);
    per slot, the previous value plus the owners' weighted updates, i.e. the adaptive slot mixed with ``prev``
    by the owners' share c_i."""
    pairs, weights = case
    R = 6
    prev, slots = _previous_and_slots(pairs, R, seed)
    p = normalised(weights)
    out = aggregate_slotwise(pairs, weights, slots=slots, previous=prev, absent="previous")
    held = [_held(prev, pair, idx) for pair, idx in zip(pairs, slots, strict=True)]
    fedavg = aggregate_fedavg(held, weights)
    assert_allclose(out.B, fedavg.B, atol=1e-12)
    assert_allclose(out.A, fedavg.A, atol=1e-12)
    cover = np.array([sum(p[k] for k, s in enumerate(slots) if i in s) for i in range(R)])
    adaptive = aggregate_slotwise(pairs, weights, slots=slots, previous=prev)
    assert_allclose(out.B, adaptive.B * cover + prev.B * (1 - cover), atol=1e-12)
    assert_allclose(out.A, adaptive.A * cover[:, None] + prev.A * (1 - cover)[:, None], atol=1e-12)


@given(client_pairs(max_rank=5, equal_ranks=True), st.integers(0, 2**31))
def test_the_three_slotwise_rules_agree_where_every_client_updated_every_slot(case, seed):
    pairs, weights = case
    R = pairs[0].rank
    rng = np.random.default_rng(seed)
    prev, _ = _previous_and_slots(pairs, R, seed)
    slots = [rng.permutation(R) for _ in pairs]  # every slot, in any order
    outs = [aggregate_slotwise(pairs, weights, slots=slots, previous=prev, absent=a)
            for a in ("skip", "zero", "previous")]
    for out in outs[1:]:
        assert_allclose(out.B, outs[0].B, atol=1e-12)
        assert_allclose(out.A, outs[0].A, atol=1e-12)


def test_slotwise_errors():
    pairs = [FactorPair(np.ones((2, 2)), np.ones((2, 3)))]
    prev = FactorPair(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="Client 0: 1 slot indices for an upload of rank 2"):
        aggregate_slotwise(pairs, slots=[[0]], previous=prev)
    with pytest.raises(ValueError, match=r"Client 0: slot indices must be distinct. Got \[1, 1\]"):
        aggregate_slotwise(pairs, slots=[[1, 1]], previous=prev)
    with pytest.raises(ValueError, match=r"Client 0: slot index 5 is out of range for the global rank 3"):
        aggregate_slotwise(pairs, slots=[[0, 5]], previous=prev)
    with pytest.raises(ValueError, match="expected 1, got 2"):
        aggregate_slotwise(pairs, slots=[[0, 1], [0, 1]], previous=prev)
    with pytest.raises(ValueError, match=r"'previous' parameter has shape \(d_out, d_in\) = \(2, 4\); expected \(2, 3\)"):
        aggregate_slotwise(pairs, previous=FactorPair(np.ones((2, 3)), np.ones((3, 4))))
    with pytest.raises(ValueError, match="absent='previous' .* needs previous=; got previous=None"):
        aggregate_slotwise(pairs, absent="previous")
    with pytest.raises(ValueError, match="absent must be 'skip', 'zero' or 'previous'. Got 'mean'"):
        aggregate_slotwise(pairs, slots=[[0, 1]], previous=prev, absent="mean")


# ---------------------------------------------------------------- every rule


RULE_OPTIONS = {name: {} for name in AGGREGATORS}


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
@given(case=client_pairs(min_clients=2, equal_ranks=False), seed=st.integers(0, 2**31))
def test_every_rule_is_invariant_to_client_order(method, case, seed):
    pairs, weights = case
    if method == "fedavg":
        pairs = [truncate(pad(pair, 6), 3) for pair in pairs]
    perm = np.random.default_rng(seed).permutation(len(pairs))
    out = aggregate(method, pairs, weights)
    shuffled = aggregate(method, [pairs[k] for k in perm], weights[perm])
    # stack permutes slots, svd may rotate within equal singular values: compare products
    assert_allclose(product(shuffled), product(out), atol=1e-9)
    if method not in ("stack", "svd"):
        assert_allclose(shuffled.B, out.B, atol=1e-12)


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_every_rule_on_every_backend(method, xp):
    rng = np.random.default_rng(7)
    ranks = (2, 2, 2) if method == "fedavg" else (1, 3, 2)
    raw = [(rng.normal(size=(9, r)), rng.normal(size=(r, 7))) for r in ranks]
    weights = [3.0, 1.0, 2.0]
    ref = aggregate(method, [FactorPair(B, A) for B, A in raw], weights)
    pairs = [FactorPair(xp.asarray(B, "float32"), xp.asarray(A, "float32")) for B, A in raw]
    out = aggregate(method, pairs, weights)
    assert type(out.B) is type(pairs[0].B) and out.B.dtype == pairs[0].B.dtype
    assert_allclose(xp.numpy(out.B) @ xp.numpy(out.A), product(ref), atol=2e-5)


def test_float64_stays_float64(xp):
    pairs = [FactorPair(xp.asarray(np.ones((3, 1))), xp.asarray(np.ones((1, 2))))] * 2
    for method in ("zero_pad", "segment", "stack", "svd"):
        assert aggregate(method, pairs).B.dtype == pairs[0].B.dtype


def test_torch_bfloat16_is_computed_in_float32_and_returned_in_bfloat16():
    import torch

    pairs = [FactorPair(torch.randn(8, r, dtype=torch.bfloat16), torch.randn(r, 6, dtype=torch.bfloat16)) for r in (2, 4)]
    out = aggregate("svd", pairs)
    assert out.B.dtype == torch.bfloat16
    dense = sum(0.5 * (p.B.float() @ p.A.float()) for p in pairs)
    assert torch.allclose((out.B.float() @ out.A.float()), dense, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------- redistribute


@given(client_pairs(min_clients=1, max_clients=1, max_rank=6), st.integers(1, 8))
def test_redistribute(case, rank):
    (pair,), _ = case
    prefix = redistribute(pair, rank)
    assert prefix.rank == rank
    assert_allclose(prefix.B[:, : min(rank, pair.rank)], pair.B[:, :rank])
    svd = redistribute(pair, rank, method="svd")
    D = product(pair)
    s = np.linalg.svd(D, compute_uv=False)
    err = np.linalg.norm(D - product(svd))
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), abs=1e-9 * max(1.0, s[0]))


def test_redistribute_errors():
    pair = FactorPair(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"Unknown redistribution method 'top'; expected one of \['prefix', 'svd'\]"):
        redistribute(pair, 1, method="top")
    with pytest.raises(ValueError, match=r"'rank' parameter must be >= 1. Got 0"):
        redistribute(pair, 0)


# ---------------------------------------------------------------- validation of aggregate()


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown aggregation method 'mean'; expected one of \['fedavg', "):
        aggregate("mean", [FactorPair(np.ones((1, 1)), np.ones((1, 1)))])


def test_empty_client_list():
    with pytest.raises(ValueError, match="at least one client update. Got an empty list"):
        aggregate("stack", [])


def test_mismatched_d_out_and_d_in_name_the_client():
    ok = FactorPair(np.ones((3, 1)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"Client 2: B has d_out = 5; expected 3 \(the d_out of client 0\)"):
        aggregate("segment", [ok, ok, FactorPair(np.ones((5, 1)), np.ones((1, 4)))])
    with pytest.raises(ValueError, match=r"Client 1: A has d_in = 2; expected 4"):
        aggregate("segment", [ok, FactorPair(np.ones((3, 1)), np.ones((1, 2)))])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_entries_name_the_client(bad):
    ok = FactorPair(np.ones((3, 1)), np.ones((1, 4)))
    A = np.ones((1, 4))
    A[0, 2] = bad
    with pytest.raises(ValueError, match=r"Client 1: A has 1 non-finite entries"):
        aggregate("svd", [ok, FactorPair(np.ones((3, 1)), A)])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -0.1], r"non-negative with a positive sum. Got \[ 1. , -0.1\]"),
        ([0.0, 0.0], r"non-negative with a positive sum. Got \[0., 0.\]"),
        ([1.0, np.nan], "finite and non-negative"),
        ([1.0], "one entry per client: expected 2, got 1"),
    ],
)
def test_bad_weights(weights, message):
    ok = FactorPair(np.ones((3, 1)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=message):
        aggregate("zero_pad", [ok, ok], weights)


def test_not_a_list_of_pairs():
    with pytest.raises(TypeError, match="Client 0: expected a FactorPair"):
        aggregate("stack", [(np.ones((1, 1)), np.ones((1, 1)))])
    with pytest.raises(TypeError, match="Expected a list of FactorPair, one per client. Got FactorPair"):
        aggregate("stack", FactorPair(np.ones((1, 1)), np.ones((1, 1))))


def test_mixed_backends_across_clients_is_a_type_error():
    import torch

    pairs = [FactorPair(np.ones((2, 1)), np.ones((1, 2))), FactorPair(torch.ones(2, 1), torch.ones(1, 2))]
    with pytest.raises(TypeError, match="Mixed array types"):
        aggregate("stack", pairs)


def test_svd_rank_out_of_range():
    ok = FactorPair(np.ones((3, 1)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"'rank' parameter must be in \[1, 3\]. Got 4"):
        aggregate("svd", [ok], rank=4)


def test_integer_factors_are_a_type_error():
    pairs = [FactorPair(np.ones((2, 1), dtype=int), np.ones((1, 2), dtype=int))]
    with pytest.raises(TypeError, match="Client 0: B has dtype int64; expected a real floating dtype"):
        aggregate("stack", pairs)
