"""Shared fixtures: the array namespaces every core test runs on, and hypothesis profiles."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# `workers = 0` (the default) reads LOWRANK_FED_WORKERS first: the tests run their clients in this process, where
# they can watch and patch them (run_client, the workspace); tests/llm/test_workers.py sets `workers` itself.
os.environ.setdefault("LOWRANK_FED_WORKERS", "1")

settings.register_profile("dev", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=50, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


class Backend:
    """An array library under test: converts NumPy input into it and back, with its tolerances."""

    def __init__(self, name: str, module, to_numpy, *, device=None):
        self.name = name
        self.module = module
        self._to_numpy = to_numpy
        self.device = device

    def asarray(self, x, dtype: str = "float64"):
        x = np.asarray(x, dtype=dtype)
        if self.name.startswith("torch"):
            import torch

            return torch.as_tensor(x, device=self.device)
        return self.module.asarray(x)

    def numpy(self, x) -> np.ndarray:
        return np.asarray(self._to_numpy(x), dtype=np.float64)

    def __repr__(self) -> str:
        return self.name


def _backends() -> list:
    import array_api_strict

    out = [
        pytest.param(Backend("numpy", np, np.asarray), id="numpy"),
        pytest.param(Backend("array_api_strict", array_api_strict, lambda x: np.from_dlpack(x)), id="strict"),
    ]
    try:
        import torch
    except ImportError:  # the core must work without torch
        return out
    out.append(pytest.param(Backend("torch", torch, lambda x: x.detach().cpu().numpy()), id="torch"))
    if torch.cuda.is_available():
        out.append(
            pytest.param(
                Backend("torch-cuda", torch, lambda x: x.detach().cpu().numpy(), device="cuda"), id="torch-cuda"
            )
        )
    return out


@pytest.fixture(params=_backends())
def xp(request) -> Backend:
    """Each array library the core must serve: NumPy, array_api_strict, torch (CPU, and CUDA if present)."""
    return request.param
