"""aggregate_modules: the whole model in parallel gives each module exactly what a serial call gives.

Also its per-module options (over the shared ones), each module's seconds, and the refusal it raises: the
first module in name order that fails, whichever thread finished first (what the serial path raises).
"""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lowrank_fed import AGGREGATORS, FactorPair, aggregate
from lowrank_fed.aggregation import ModuleError, aggregate_modules


def _model(seed=0, n_modules=6, ranks=(2, 4, 8)):
    rng = np.random.default_rng(seed)
    return {f"m{i}": [FactorPair(rng.normal(size=(30, r)), rng.normal(size=(r, 20))) for r in ranks]
            for i in range(n_modules)}


@pytest.mark.parametrize("rule", ["svd", "stack", "zero_pad", "segment"])
def test_parallel_equals_serial_bit_for_bit(rule):
    model, w = _model(), [1.0, 2.0, 3.0]
    out = aggregate_modules(rule, model, w, workers=3)
    assert list(out) == list(model)
    for m, pairs in model.items():
        ref = aggregate(rule, pairs, w)
        assert np.array_equal(out[m].B, ref.B) and np.array_equal(out[m].A, ref.A), m


def test_weights_per_module_and_options_reach_each_module():
    model = _model()
    weights = {m: [1.0, 0.0, 0.0] if m == "m0" else [1.0, 1.0, 1.0] for m in model}
    out = aggregate_modules("svd", model, weights, workers=2, rank=2)
    assert all(p.rank == 2 for p in out.values())
    only_first = model["m0"][0]
    U, S, Vh = np.linalg.svd(only_first.B @ only_first.A)
    np.testing.assert_allclose(out["m0"].B @ out["m0"].A, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-10)


def test_bad_workers_is_an_error():
    with pytest.raises(ValueError, match="'workers' parameter must be a positive int. Got 0"):
        aggregate_modules("svd", _model(), workers=0)


# ------------------------------------------------------------------------- module options, seconds, refusals
@pytest.mark.parametrize("workers", [1, 3])
def test_module_options_over_options_each_module_equal_to_its_serial_call(workers):
    # Prepare: rank 3 for every module, rank 1 and 5 for two of them
    model, w = _model(seed=1), [3.0, 1.0, 2.0]
    per_module = {"m1": {"rank": 1}, "m4": {"rank": 5}}
    # Execute
    out = aggregate_modules("svd", model, w, workers=workers, module_options=per_module, rank=3)
    # Assert: bit for bit what one aggregate call on one BLAS thread gives, with the module's own options
    assert list(out) == list(model)
    with threadpool_limits(limits=1):
        for m, pairs in model.items():
            ref = aggregate("svd", pairs, w, **{"rank": 3, **per_module.get(m, {})})
            assert out[m].rank == per_module.get(m, {"rank": 3})["rank"], m
            assert np.array_equal(out[m].B, ref.B) and np.array_equal(out[m].A, ref.A), m


@pytest.mark.parametrize("workers", [1, 2])
def test_seconds_receive_each_modules_own_time(monkeypatch, workers):
    # Prepare: a rule that takes 0.05 s on m1 and none on the others (the module told through module_options)
    def slow(pairs, weights=None, *, pause):
        time.sleep(pause)
        return pairs[0]

    monkeypatch.setitem(AGGREGATORS, "slow", slow)
    model = _model(n_modules=4)
    seconds = {"earlier": 1.0}
    # Execute
    aggregate_modules("slow", model, workers=workers, seconds=seconds, pause=0.0,
                      module_options={"m1": {"pause": 0.05}})
    # Assert: one entry a module, added to what the dict held; m1's includes its own pause
    assert list(seconds) == ["earlier", *model]
    assert seconds["m1"] >= 0.05 and all(s >= 0 for s in seconds.values())


def test_the_first_refusal_in_name_order_is_raised_though_a_later_module_fails_first():
    # Prepare: m1 fails only after m2 has failed, on another thread; m0 and m3 are aggregated
    m2_failed = threading.Event()

    def rule(pairs, weights=None, *, who):
        if who == "m2":
            m2_failed.set()
            raise ValueError("m2 refused")
        if who == "m1":
            assert m2_failed.wait(10), "m2 never ran"
            raise ValueError("m1 refused")
        return aggregate("stack", pairs, weights)

    model = _model(n_modules=4)
    model = {m: model[m] for m in ("m3", "m2", "m1", "m0")}  # name order is not the mapping's order
    # Execute
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(AGGREGATORS, "picky", rule)
        with pytest.raises(ModuleError) as caught:
            aggregate_modules("picky", model, workers=4, module_options={m: {"who": m} for m in model})
    # Assert: the module, the rule's own error, and both in the message
    assert caught.value.module == "m1" and str(caught.value.error) == "m1 refused"
    assert str(caught.value) == "module 'm1': m1 refused" and isinstance(caught.value, ValueError)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (again.module, str(again.error), str(again)) == ("m1", "m1 refused", "module 'm1': m1 refused")


@pytest.mark.parametrize("workers", [1, 3])
def test_serial_and_threads_raise_the_same_module_and_other_errors_unchanged(workers):
    model = _model(n_modules=4)
    bad_rank = {"m2": {"rank": 0}, "m3": {"rank": -1}}  # svd refuses a rank below 1
    with pytest.raises(ModuleError) as caught:
        aggregate_modules("svd", model, workers=workers, module_options=bad_rank)
    assert caught.value.module == "m2" and str(caught.value).startswith("module 'm2': ")
    assert caught.value.__cause__ is caught.value.error
    with pytest.raises(TypeError, match="unexpected keyword"):  # not a refusal: raised as it is
        aggregate_modules("svd", model, workers=workers, module_options={"m1": {"no_such_option": 1}})
