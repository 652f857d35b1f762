"""The server's scoring of models: one score per distinct function, and the same bits from any number of workers.

``model_key`` names what a model computes: two models with one key score the same, so a round scores each distinct
``(model, split, rows)`` once (round 0's downloads of every rank are one zero adapter, for example).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.methods import Model  # noqa: E402
from lowrank_fed.llm.runner.evaluation import model_key  # noqa: E402
from tests.llm.helpers import head, make_sim, pairs, tiny_settings  # noqa: E402


def _zero_b(adapter):
    return {m: FactorPair(torch.zeros_like(p.B), p.A) for m, p in adapter.items()}


def test_an_adapter_with_b_zero_is_no_adapter_whatever_its_rank_and_a():
    h = head(0)
    none = model_key(Model(None, h))
    assert model_key(Model(_zero_b(pairs(1, 0)), h)) == none
    assert model_key(Model(_zero_b(pairs(16, 1)), h)) == none
    one_zero = pairs(4, 2)
    one_zero["m0"] = FactorPair(torch.zeros_like(one_zero["m0"].B), one_zero["m0"].A)
    assert model_key(Model(one_zero, h)) == model_key(Model({"m1": one_zero["m1"]}, h))  # per module


def test_a_scalar_head_tensor_is_hashed_and_a_non_finite_a_is_not_no_adapter():
    h = {**head(0), "temperature": torch.tensor(2.0)}  # a 0-dim tensor
    assert model_key(Model(None, h)) != model_key(Model(None, head(0)))
    bad = _zero_b(pairs(2, 0))
    bad["m0"] = FactorPair(bad["m0"].B, torch.full_like(bad["m0"].A, float("nan")))  # 0 * NaN is NaN, not 0
    assert model_key(Model(bad, head(0))) != model_key(Model(None, head(0)))


def test_any_difference_in_what_a_model_computes_changes_its_key():
    adapter, h = pairs(4, 0), head(0)
    key = model_key(Model(adapter, h))
    assert model_key(Model(pairs(4, 0), head(0))) == key  # equal tensors, new objects
    assert model_key(Model(pairs(4, 1), h)) != key
    assert model_key(Model(adapter, head(1))) != key
    assert model_key(Model(adapter, h, {"m0": torch.zeros(6, 5)})) != key  # a base delta, even zero: kept apart
    scaled = {m: FactorPair(2 * p.B, p.A / 2) for m, p in adapter.items()}  # same product, other factors
    assert model_key(Model(scaled, h)) != key  # not merged: their rounding may differ


def test_a_round_scores_each_distinct_model_once_and_hands_every_job_its_scores(tmp_path, monkeypatch):
    sim = make_sim(tmp_path, tiny_settings(workers=1))
    calls = []
    score = sim._score
    monkeypatch.setattr(sim, "_score", lambda split, rows=None: calls.append(split) or score(split, rows))
    h = sim.init_extras
    zero_small, zero_big = Model(_zero_b(sim.init), h), Model(None, h)
    trained = Model({m: FactorPair(torch.full_like(p.B, 0.01), p.A) for m, p in sim.init.items()}, h)
    jobs = [(zero_small, "test", None), (zero_big, "test", None), (trained, "test", None), (zero_big, "val", None),
            (trained, "test", None), (zero_small, "test", np.array([0, 1, 2]))]
    out = sim._score_models(jobs)
    assert calls == ["test", "test", "val", "test"]  # 4 distinct (function, split, rows)
    assert len(out) == len(jobs)
    for a, b in ((0, 1), (2, 4)):
        assert all(np.array_equal(out[a][k], out[b][k]) for k in out[a]) and out[a] is not out[b]
    assert not np.array_equal(out[0]["loss"], out[2]["loss"])
    np.testing.assert_allclose(out[5]["loss"], out[0]["loss"][:3], rtol=1e-5)  # rows 0-2 of the whole pass
