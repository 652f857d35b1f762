"""LoRA-A2: alternating_update is exact for the product; select_slots picks model-wide top slots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair, aggregate, alternating_update, select_slots


@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from(["B", "A"]), st.integers(0, 2**31))
def test_alternating_update_is_exact_for_the_product(n_clients, rank, factor, seed):
    """With one factor frozen, the update's product is the weighted mean of the clients' products."""
    rng = np.random.default_rng(seed)
    g = FactorPair(rng.normal(size=(7, rank)), rng.normal(size=(rank, 5)))
    shape = g.B.shape if factor == "B" else g.A.shape
    deltas = [rng.normal(size=shape) for _ in range(n_clients)]
    w = rng.uniform(0.1, 2, size=n_clients)
    p = w / w.sum()
    out = alternating_update(g, deltas, w, factor=factor)
    local = [FactorPair(g.B + d, g.A) if factor == "B" else FactorPair(g.B, g.A + d) for d in deltas]
    assert_allclose(out.B @ out.A, sum(pk * q.B @ q.A for pk, q in zip(p, local)), atol=1e-10)
    frozen = out.A if factor == "B" else out.B
    assert_allclose(frozen, g.A if factor == "B" else g.B, atol=0)


def test_factorwise_fedavg_is_not_exact_where_alternating_is():
    rng = np.random.default_rng(0)
    g = FactorPair(rng.normal(size=(6, 3)), rng.normal(size=(3, 4)))
    local = [FactorPair(g.B + rng.normal(size=(6, 3)), g.A + rng.normal(size=(3, 4))) for _ in range(4)]
    target = sum(q.B @ q.A for q in local) / 4
    avg = aggregate("fedavg", local)
    assert np.linalg.norm(avg.B @ avg.A - target) > 0.1


def test_masked_uploads_with_slots():
    g = FactorPair(np.zeros((2, 3)), np.ones((3, 2)))
    deltas = [np.array([[1.0], [1.0]]), np.array([[2.0, 4.0], [2.0, 4.0]])]
    out = alternating_update(g, deltas, [1, 1], factor="B", slots=[[2], [0, 2]])
    assert_allclose(out.B, [[1.0, 0.0, 2.5], [1.0, 0.0, 2.5]])  # no per-slot renormalisation
    outA = alternating_update(g, [np.ones((1, 2))], factor="A", slots=[[1]])
    assert_allclose(outA.A, [[1, 1], [2, 2], [1, 1]])


def test_alternating_errors():
    g = FactorPair(np.zeros((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"Client 1: dB has shape \(2, 2\); expected \(2, 3\)"):
        alternating_update(g, [np.zeros((2, 3)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="'factor' parameter must be 'B' or 'A'. Got 'C'"):
        alternating_update(g, [np.zeros((2, 3))], factor="C")
    bad = np.zeros((3, 2))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Client 0: dA has 1 non-finite"):
        alternating_update(g, [bad], factor="A")
    with pytest.raises(ValueError, match="at least one client delta"):
        alternating_update(g, [])


def test_alternating_on_every_backend(xp):
    g = FactorPair(xp.asarray(np.zeros((2, 3)), "float32"), xp.asarray(np.ones((3, 2)), "float32"))
    out = alternating_update(g, [xp.asarray(np.ones((2, 3)), "float32")] * 2, factor="B", slots=None)
    assert type(out.B) is type(g.B) and out.B.dtype == g.B.dtype
    assert_allclose(xp.numpy(out.B), np.ones((2, 3)))
    out = alternating_update(g, [xp.asarray(np.ones((2, 1)), "float32")], factor="B", slots=[[1]])
    assert_allclose(xp.numpy(out.B), [[0, 1, 0], [0, 1, 0]])


@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.integers(0, 2**31), st.data())
def test_select_slots_is_the_model_wide_top(sizes, seed, data):
    rng = np.random.default_rng(seed)
    scores = {f"m{i}": rng.uniform(size=n) for i, n in enumerate(sizes)}
    total = sum(sizes)
    budget = data.draw(st.integers(0, total))
    sel = select_slots(scores, budget)
    assert list(sel) == list(scores)
    assert sum(v.size for v in sel.values()) == budget
    chosen = np.concatenate([scores[m][v] for m, v in sel.items()]) if budget else np.array([])
    rest = np.concatenate([np.delete(scores[m], v) for m, v in sel.items()])
    if budget and rest.size:
        assert chosen.min() >= rest.max()
    for v in sel.values():
        assert np.all(np.diff(v) > 0)


def test_select_slots_ties_and_errors():
    sel = select_slots({"a": np.array([1.0, 1.0]), "b": np.array([1.0])}, 2)
    assert sel["a"].tolist() == [0, 1] and sel["b"].tolist() == []
    with pytest.raises(ValueError, match=r"'budget' parameter must be in \[0, 3\]. Got 4"):
        select_slots({"a": np.ones(2), "b": np.ones(1)}, 4)
    with pytest.raises(ValueError, match="Module 'a': scores have non-finite"):
        select_slots({"a": np.array([np.inf])}, 1)
    with pytest.raises(ValueError, match=r"Module 'a': scores must have shape \(R,\). Got shape \(1, 1\)"):
        select_slots({"a": np.ones((1, 1))}, 1)
    with pytest.raises(ValueError, match="non-empty mapping"):
        select_slots({}, 0)


def test_select_slots_accepts_torch():
    import torch

    sel = select_slots({"q": torch.tensor([0.5, 2.0]), "v": torch.tensor([1.0])}, 2)
    assert sel["q"].tolist() == [1] and sel["v"].tolist() == [0]
