r"""``init_adapter`` in a run: the adapter read against the run's model at set-up, each method's round-0 error,
and what ``setup.json`` says about it.

The mathematics is :mod:`lowrank_fed.llm.adapters.start`'s; each method's round 0 is
:meth:`~lowrank_fed.llm.methods.base.Method.start_from` of its usual :meth:`~.Method.init_server`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..adapters.start import Start, read_start
from ..catalog import MODELS
from ..federation import config_key
from ..methods import make_method

__all__ = ["BaseModelWarning", "start_adapter", "describe_start"]


class BaseModelWarning(UserWarning):
    """The adapter's ``base_model_name_or_path`` names another model than the run's (shapes matched: a warning)."""


def _run_names(model: str) -> set[str]:
    spec = MODELS.get(model)
    names = {model, f"lowrank-fed:{model}", Path(model).name}
    if spec is not None and spec.hub:
        names |= {spec.hub, spec.hub.rsplit("/", 1)[-1]}
    return names


def start_adapter(sim, path: str) -> tuple[Start, dict[str, dict[str, float]]]:
    r"""The adapter ``path`` read for the set-up :class:`~.simulation.Simulation` ``sim`` (its workspace's modules
    and head), and each method's relative error per module (:func:`~lowrank_fed.llm.adapters.start.start_pair`).

    Writes nothing. A different ``base_model_name_or_path`` (when every module's shape matches) gives a
    :class:`BaseModelWarning`: a local copy of a hub model has another name, so the name alone refuses nothing.

    Raises
    ------
    ConfigError
        Naming ``init_adapter``: a folder that is not a PEFT LoRA adapter, a module the run does not adapt, a module
        or head weight of another shape (:func:`~lowrank_fed.llm.adapters.start.read_start`).
    """
    cfg = sim.cfg
    with config_key("init_adapter", path):
        start = read_start(path, sim.ws.shapes, sim.init_extras, device=sim.device)
    base = start.base_model
    if base and base not in _run_names(cfg.model) and Path(base).name not in _run_names(cfg.model):
        warnings.warn(BaseModelWarning(
            f"init_adapter '{path}': its base model is {base!r}, the run's model is {cfg.model!r}; every module's "
            "shape matches, so the run goes on from it."), stacklevel=2)
    errors = {}
    ranks = dict(enumerate(sim.ranks))
    for name in cfg.methods:
        method = make_method(name, **cfg.method_options.get(name, {}))
        with config_key("init_adapter", path):
            server = method.init_server(sim.init, sim.init_extras, ranks, init_seed=sim.init_seed)
            errors[name] = dict(method.start_from(server, start).cache.get("start_errors", {}))
    return start, errors


def describe_start(start: Start, errors: dict[str, dict[str, float]]) -> dict:
    r"""``setup.json``'s ``init_adapter``: the folder, its base model, modules, ranks, whether it carries a head, and
    per method the largest relative error ``||Delta W_0 - B_0 A_0||_F / ||Delta W_0||_F`` over modules (0 where the
    global rank holds the adapter's) and the modules approximated."""
    return {"path": start.path, "base_model": start.base_model, "modules": len(start.pairs),
            "ranks": sorted(set(start.ranks.values())), "head": sorted(start.extras),
            "relative_error": {name: max(e.values(), default=0.0) for name, e in errors.items()},
            "approximated": {name: sorted(m for m, v in e.items() if v > 0) for name, e in errors.items()}}
