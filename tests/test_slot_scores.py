r"""Slot scores in the core (:func:`lowrank_fed.linalg.slot_scores`, :func:`~lowrank_fed.linalg.tail_norm_product`).

``s_i = ||b_i|| ||a_i|| = ||b_i a_i^T||_F``; ``sum_i s_i >= ||B A||_F``; ``s`` follows a permutation of the slots
and ignores a rebalancing ``b_i c``, ``a_i / c``; the tail bound chain
``||B_t||_F ||A_t||_F >= sum_{i >= t} s_i >= ||B_t A_t||_F``; and on float32 torch tensors the result is bit for
bit the torch expression the methods wrote before (HAFL's server scorer, LoRA-A2's probe scores, HetLoRA's
tail term), gradient included.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from numpy.testing import assert_allclose

from lowrank_fed.linalg import slot_scores, tail_norm_product

from .strategies import client_pairs


@settings(max_examples=80, deadline=None)
@given(client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=8))
def test_slot_scores_are_the_norms_of_the_rank_one_terms(case):
    # Prepare
    (pair,), _ = case
    B, A = pair
    # Execute
    s = slot_scores(B, A)
    # Assert
    terms = [np.linalg.norm(np.outer(B[:, i], A[i, :])) for i in range(pair.rank)]
    assert s.shape == (pair.rank,) and np.all(s >= 0)
    assert_allclose(s, terms, rtol=1e-12, atol=1e-300)
    assert s.sum() >= np.linalg.norm(B @ A) * (1 - 1e-12)


@settings(max_examples=60, deadline=None)
@given(client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=8))
def test_slot_scores_follow_a_permutation_and_ignore_a_rebalancing(case):
    # Prepare
    (pair,), _ = case
    B, A = pair
    rng = np.random.default_rng(pair.rank)
    perm = rng.permutation(pair.rank)
    c = rng.choice([-1.0, 1.0], size=pair.rank) * 2.0 ** rng.integers(-4, 5, size=pair.rank)  # exact scalings
    # Execute
    moved = slot_scores((B * c)[:, perm], (A / c[:, None])[perm])
    # Assert
    assert_allclose(moved, slot_scores(B, A)[perm], rtol=1e-13)


@settings(max_examples=60, deadline=None)
@given(client_pairs(min_clients=1, max_clients=1, max_rank=6, max_dim=8))
def test_tail_norm_product_bounds_the_tail_slots(case):
    (pair,), _ = case
    B, A = pair
    for t in range(pair.rank + 1):
        tail = tail_norm_product(B, A, t)
        assert tail >= slot_scores(B, A)[t:].sum() * (1 - 1e-12)
        assert slot_scores(B, A)[t:].sum() >= np.linalg.norm(B[:, t:] @ A[t:, :]) * (1 - 1e-12)
    assert tail_norm_product(B, A, pair.rank) == 0.0


def test_slot_scores_refuse_factors_of_disagreeing_ranks():
    with pytest.raises(ValueError, match=r"B of shape \(d_out, r\) and A of shape \(r, d_in\); got \(3, 2\) and \(3, 4\)"):
        slot_scores(np.ones((3, 2)), np.ones((3, 4)))


def test_on_float32_torch_they_equal_the_methods_former_expressions_bit_for_bit():
    torch = pytest.importorskip("torch")
    # Prepare: a random case, the probe's change as LoRA-A2 forms it, live (differentiable) tensors as HetLoRA's
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(48, 8, generator=gen), torch.randn(8, 40, generator=gen)
    dB = torch.randn(48, 8, generator=gen) - B
    Bl, Al = B.clone().requires_grad_(), A.clone().requires_grad_()
    # Execute
    hafl = slot_scores(B, A)
    probe = slot_scores(dB, A)
    tail = tail_norm_product(Bl, Al, 3)
    # Assert: equal, not close
    assert hafl.dtype == torch.float32
    assert torch.equal(hafl, torch.linalg.vector_norm(B, dim=0) * torch.linalg.vector_norm(A, dim=1))
    assert torch.equal(probe, torch.linalg.vector_norm(dB, dim=0) * torch.linalg.vector_norm(A, dim=1))
    Bo, Ao = B.clone().requires_grad_(), A.clone().requires_grad_()
    former = torch.linalg.vector_norm(Bo[:, 3:]) * torch.linalg.vector_norm(Ao[3:, :])
    assert torch.equal(tail, former)
    new_grads, old_grads = torch.autograd.grad(tail, [Bl, Al]), torch.autograd.grad(former, [Bo, Ao])
    assert all(torch.equal(x, y) for x, y in zip(new_grads, old_grads, strict=True))


def test_the_methods_call_the_core():
    pytest.importorskip("torch")
    import inspect

    from lowrank_fed.llm.methods import hafl, lora_a2
    from lowrank_fed.llm.training import hooks

    for module in (hafl, lora_a2, hooks):
        assert "vector_norm" not in inspect.getsource(module), module.__name__
