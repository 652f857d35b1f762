"""aggregate_modules: the whole model in parallel gives each module exactly what a serial call gives."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_fed import FactorPair, aggregate
from lowrank_fed.aggregation import aggregate_modules


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
