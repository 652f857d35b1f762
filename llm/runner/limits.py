r"""Upper bounds that only the data, the model and the machine can set; :meth:`Simulation.setup` checks them.

:class:`~lowrank_fed.llm.config.RunConfig` bounds what it can alone (``rounds``, ``local_steps``, ``local_epochs``,
``threads``). The rest needs the partition and the built model, so :func:`check_limits` runs inside
:meth:`~lowrank_fed.llm.runner.simulation.Simulation.setup`, after the model is built and before the data are
encoded, the adapters allocated or anything written. It raises one
:class:`~lowrank_fed.llm.config.ConfigError` listing every violated bound, one line each, naming the key:

- **ranks**: every client's rank (and LoRA-A2's ``global_rank``, the rank every client holds) is at most
  ``min(d_out, d_in)`` of the smallest adapted module. ``B A`` has rank at most ``min(d_out, d_in)``, so a
  larger rank only adds parameters (and upload) without adding anything the adapter can express;
- **max_length** is at most the model's ``max_position_embeddings`` (longer inputs have no position to
  go to); for a generation model scored with ROUGE-L (``rouge_size > 0``), so is ``max_length +
  max_new_tokens`` (the prompt plus the tokens generated after it);
- **batch_size** is at most the training examples of all the clients together. A client with fewer examples
  than ``batch_size`` still trains, on batches filled from successive permutations of its data, so its batches
  repeat examples: this is documented, not an error (CLAIR's copy-task reproduction trains batches of 8 on
  clients of 6 examples); a batch larger than the whole training set is;
- **memory**: :func:`memory_estimate` of one client's local round (its batches, all built before it
  trains, plus the activations of one step) is at most half of the memory of the device it runs on
  (:func:`memory_bytes`: the RAM for ``cpu``, the GPU's memory for ``cuda``); the other half is left to the
  model, the optimiser, the encoded data and everything else;
- **memory of the workers**: ``workers`` worker processes each hold a copy of the model and train one client at
  a time, so ``workers x (local round + model weights)`` must fit in the same half. A ``workers`` set in the
  config (or ``LOWRANK_FED_WORKERS``) that does not fit is an error naming the number that does; the default
  (as many as the cores allow) is lowered to that number, since workers change how fast a run is, never what
  it computes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..data import RANK_DISTRIBUTIONS

__all__ = ["check_limits", "memory_estimate", "memory_bytes", "MEMORY_SHARE"]

#: The share of the device's memory that one local round may take (:func:`memory_estimate`).
MEMORY_SHARE = 0.5

#: Typical values (the defaults; one epoch): the memory error names the key furthest above its own.
_TYPICAL = {"local_steps": 5, "local_epochs": 1, "batch_size": 8, "max_length": 64}


def memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes: the GPU's for CUDA, the machine's RAM otherwise (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_estimate(*, steps: int, batch_size: int, max_length: int, task: str, layers: int, hidden: int,
                    heads: int, dtype_bytes: int) -> dict[str, int]:
    r"""Bytes of one client's local round: ``{"batches": ..., "activations": ..., "total": ...}``.

    - batches: every step's batch is built before the round trains: ``steps * batch_size * max_length`` tokens
      of 8-byte ``input_ids`` and ``attention_mask`` (and ``labels`` for generation);
    - activations of one step, Korthikanti et al. (2022)'s count for a transformer layer, ``s b h (34 + 5 a s
      / h)`` bytes at 2 bytes an element, scaled to the model's dtype: ``s = max_length``, ``b = batch_size``,
      ``h`` hidden size, ``a`` heads, times the layers.

    Sequences are taken at ``max_length`` (batches are trimmed to their longest row, so this bounds them).
    """
    tokens = steps * batch_size * max_length
    batches = tokens * 8 * (3 if task == "generation" else 2) + steps * batch_size * 8
    per_layer = max_length * batch_size * hidden * (34 + 5 * heads * max_length / hidden)
    activations = int(layers * per_layer * dtype_bytes / 2)
    return {"batches": int(batches), "activations": activations, "total": int(batches) + activations}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _rank_errors(cfg: RunConfig, ranks: Sequence[int], shapes: Mapping[str, tuple[int, int]],
                 global_ranks: Mapping[str, int]) -> list[tuple[str, str, Any]]:
    """``(key, expected, value)`` for each rank above ``min(d_out, d_in)`` of the smallest adapted module."""
    module, (d_out, d_in) = min(shapes.items(), key=lambda item: min(item[1]))
    cap = min(d_out, d_in)
    expected = (f"a rank <= {cap} = min(d_out, d_in) of module '{module}' ({d_out} x {d_in}), the smallest "
                f"adapted module of model '{cfg.model}'")
    errors: list[tuple[str, str, Any]] = []
    spec = cfg.ranks
    if isinstance(spec, list):
        errors += [(f"ranks[{i}]", expected, r) for i, r in enumerate(spec) if r > cap]
    elif isinstance(spec, int):
        if spec > cap:
            errors.append(("ranks", expected, spec))
    elif spec in RANK_DISTRIBUTIONS:
        used = set(ranks)
        errors += [(f"rank_set[{j}]", f"{expected} (ranks = {spec!r} assigns it)", r)
                   for j, r in enumerate(cfg.rank_set) if r > cap and r in used]
    elif max(ranks) > cap:
        errors.append(("ranks", f"{expected}; ranks = {spec!r} assigns {sorted(set(r for r in ranks if r > cap))}",
                       spec))
    errors += [(key, expected, r) for key, r in global_ranks.items() if r > cap]
    return errors


def check_limits(cfg: RunConfig, *, ranks: Sequence[int], shapes: Mapping[str, tuple[int, int]], model_config,
                 task: str, n_k: Sequence[int], device: torch.device, global_ranks: Mapping[str, int] | None = None,
                 memory: int | None = None, workers: int = 1, chosen: bool = True, model_bytes: int = 0) -> int:
    r"""Raise :class:`ConfigError` (every violated bound, one line each) if the run exceeds the model or the machine.

    Returns the number of workers that fit: ``workers``, or fewer where ``workers`` was not ``chosen`` by the user
    (the default) and ``workers x (local round + model_bytes)`` exceeds half the memory.

    Parameters
    ----------
    cfg : RunConfig
    ranks : the clients' assigned ranks
    shapes : ``{module: (d_out, d_in)}`` of the adapted modules
    model_config : the model's ``transformers`` config (``max_position_embeddings``, ``hidden_size``,
        ``num_hidden_layers``, ``num_attention_heads``; a missing one skips its check)
    task : ``"classification"`` or ``"generation"``
    n_k : the clients' training examples
    device : where the clients train
    global_ranks : ``{key: rank}`` of method options that set a rank every client holds (``lora_a2.global_rank``)
    memory : bytes of the device; default :func:`memory_bytes` (None: the memory check is skipped)
    workers : worker processes that train at once, each with its own copy of the model
    chosen : whether ``workers`` was set by the user (config or environment) rather than by default
    model_bytes : bytes of one copy of the model's weights
    """
    errors = _rank_errors(cfg, ranks, shapes, global_ranks or {})
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None:
        if cfg.max_length > positions:
            errors.append(("max_length", f"at most max_position_embeddings = {positions} of model '{cfg.model}'",
                           cfg.max_length))
        elif task == "generation" and cfg.rouge_size and cfg.max_length + cfg.max_new_tokens > positions:
            errors.append(("max_new_tokens", f"at most max_position_embeddings - max_length = {positions} - "
                                             f"{cfg.max_length} = {positions - cfg.max_length} for model "
                                             f"'{cfg.model}' (the prompt takes up to max_length tokens)",
                           cfg.max_new_tokens))
    if n_k and cfg.batch_size > sum(n_k):  # n_k empty: unknown here (the sites of a Flower run)
        errors.append(("batch_size", f"at most the training examples of all the clients, {sum(n_k)} (a client "
                                     f"with fewer than batch_size repeats examples within a batch)", cfg.batch_size))
    if errors:
        raise ConfigError.from_errors(errors)

    memory = memory_bytes(device) if memory is None else memory
    sizes = [getattr(model_config, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")]
    if memory is None or None in sizes:
        return workers
    epochs = cfg.local_epochs if n_k else 0  # n_k empty: unknown here, local_steps as the estimate
    steps = (epochs * math.ceil(max(n_k) / cfg.batch_size)) if epochs else cfg.local_steps
    dtype_bytes = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    layers, hidden, heads = sizes
    need = memory_estimate(steps=steps, batch_size=cfg.batch_size, max_length=cfg.max_length, task=task,
                           layers=layers, hidden=hidden, heads=heads, dtype_bytes=dtype_bytes)
    allowed = int(MEMORY_SHARE * memory)
    if need["total"] > allowed:
        step_key = "local_epochs" if cfg.local_epochs else "local_steps"
        growth = {k: getattr(cfg, k) / _TYPICAL[k] for k in (step_key, "batch_size", "max_length")}
        key = max(growth, key=growth.get)
        where = "GPU" if device.type == "cuda" else "RAM"
        steps_text = f"{cfg.local_epochs} epochs = {steps} steps" if cfg.local_epochs else f"{steps} steps"
        errors.append((key, (
            f"a local round that fits in half of this machine's {where} ({_size(memory)}): {steps_text} x batch_size "
            f"{cfg.batch_size} x max_length {cfg.max_length} need about {_size(need['total'])} "
            f"({_size(need['batches'])} of batches, {_size(need['activations'])} of activations; docs/config.md)"),
            getattr(cfg, key)))
        raise ConfigError.from_errors(errors)
    each = need["total"] + model_bytes  # one worker: its local round and its copy of the model
    fit = max(1, min(workers, allowed // max(each, 1)))
    if fit < workers and chosen:
        where = "GPU" if device.type == "cuda" else "RAM"
        raise ConfigError.from_errors([("workers", (
            f"at most {fit} worker{'s' if fit > 1 else ''} in half of this machine's {where} ({_size(memory)}): each "
            f"holds a copy of the model ({_size(model_bytes)}) and a local round (about {_size(need['total'])})"),
            workers)])
    return fit
