"""Torch layer of lowrank-fed (imported as ``lowrank_fed.llm``): PEFT bridge, models, data, training, runner.

Submodules: :mod:`~lowrank_fed.llm.protocol` (messages), :mod:`~lowrank_fed.llm.client` (``run_client``, the whole
client step), :mod:`~lowrank_fed.llm.training` (``train_local`` and its hooks),
:mod:`~lowrank_fed.llm.methods` (one file per method: client policy + core server rule),
:mod:`~lowrank_fed.llm.peft_bridge` (PEFT <-> FactorPair with the scale folded in),
:mod:`~lowrank_fed.llm.adapters` (whole PEFT adapters: read, aggregate, redistribute, write),
:mod:`~lowrank_fed.llm.federation` (the server's view of a run, and each client built from its own data),
:mod:`~lowrank_fed.llm.streams` (every random stream of a run, one table),
:mod:`~lowrank_fed.llm.models`, :mod:`~lowrank_fed.llm.data`, :mod:`~lowrank_fed.llm.evaluate`,
:mod:`~lowrank_fed.llm.runner` (the in-process runner: simulation, checkpoints, reports),
:mod:`~lowrank_fed.llm.config` and :mod:`~lowrank_fed.llm.run` (the ``lowrank-fed run`` command).
Names below are imported lazily, so ``import lowrank_fed.llm`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterWorkspace": "peft_bridge",
    "get_factor_pairs": "peft_bridge",
    "set_factor_pairs": "peft_bridge",
    "state_dict_to_pairs": "peft_bridge",
    "pairs_to_state_dict": "peft_bridge",
    "lora_scale": "peft_bridge",
    "client_lora_config": "peft_bridge",
    "merge_into_base": "peft_bridge",
    "Adapter": "adapters",
    "load_peft_adapter": "adapters",
    "save_peft_adapter": "adapters",
    "aggregate_adapters": "adapters",
    "redistribute_adapter": "adapters",
    "load_model": "models",
    "load_dataset": "data",
    "partition": "data",
    "assign_ranks": "data",
    "METHODS": "methods",
    "make_method": "methods",
    "RunConfig": "config",
    "Message": "protocol",
    "run_client": "client",
    "ClientContext": "client",
    "train_local": "training",
    "build_federation": "federation",
    "build_client": "federation",
    "Simulation": "runner.simulation",
    "run_experiment": "runner.simulation",
    "UpdateDroppedWarning": "runner.simulation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
