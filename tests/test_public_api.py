"""The public names of the documented API exist with the documented call shapes (acceptance tests elsewhere rely on them)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np


def test_core_names():
    from lowrank_fed import (  # noqa: F401
        AGGREGATORS,
        FactorPair,
        aggregate,
        alternating_update,
        factored_svd,
        pad,
        redistribute,
        select_slots,
        sin_theta,
        truncate,
    )

    assert set(AGGREGATORS) == {"fedavg", "zero_pad", "replication", "segment", "slotwise", "stack", "svd"}
    assert FactorPair._fields == ("B", "A")
    assert list(inspect.signature(alternating_update).parameters)[:3] == ["global_pair", "deltas", "weights"]
    assert inspect.signature(alternating_update).parameters["factor"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(redistribute).parameters["method"].default == "prefix"


def test_robust_and_synthetic_names():
    from lowrank_fed.robust import ClairResult, clair
    from lowrank_fed.synthetic import local_estimates, make_regression_clients

    fields = {f.name for f in dataclasses.fields(ClairResult)}
    assert fields >= {"subspace", "collaborative", "block_norms", "refined", "lam", "objective", "gap", "n_iter",
                      "converged"}
    assert dataclasses.fields(ClairResult) and ClairResult.__dataclass_params__.frozen
    params = inspect.signature(clair).parameters
    for name in ("rank", "lam", "base_known", "solver", "weights", "tol", "max_iter"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    fed = make_regression_clients(6, 5, 2, 1, n_samples=20, noise=0.1, contamination=0.0, attack="random", seed=0)
    for attr in ("X", "Y", "Theta", "U", "W0", "contaminated"):
        assert hasattr(fed, attr)
    assert len(local_estimates(fed)) == 6 and local_estimates(fed)[0].shape == (5, 2)
    assert isinstance(fed.contaminated, np.ndarray) and fed.contaminated.dtype == bool
