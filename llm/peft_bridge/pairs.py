r"""Folded factor pairs in and out of PEFT: a live adapter's layers, state dicts, the merged base, fresh factors.

On the way in ``FactorPair(s B_peft, A_peft)``, on the way out ``lora_B = B / s`` (the package docstring).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper

from lowrank_fed import FactorPair

from .scaling import _declared_rank, lora_scale

__all__ = ["lora_layers", "get_factor_pairs", "set_factor_pairs", "state_dict_to_pairs", "pairs_to_state_dict",
           "merge_into_base", "init_pairs"]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAVED_KEY = re.compile(r"\.modules_to_save\.(?P<adapter>[^.]+)\.")


def _base_name(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a PEFT model, by module name relative to the base model."""
    return {_base_name(name): mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def _saved_modules(model: torch.nn.Module) -> dict[str, ModulesToSaveWrapper]:
    return {_base_name(name): mod for name, mod in model.named_modules() if isinstance(mod, ModulesToSaveWrapper)}


def _adapter(model, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = model.active_adapter if hasattr(model, "active_adapter") else "default"
    return active if isinstance(active, str) else active[0]


def get_factor_pairs(model: torch.nn.Module, adapter_name: str | None = None, *, live: bool = False):
    r"""Read the adapter of a live PEFT model as folded factor pairs and extras.

    Parameters
    ----------
    model : PeftModel (or a model with LoRA layers injected)
    adapter_name : str, optional
        Default: the active adapter.
    live : bool
        If True, ``B = s * lora_B.weight`` and ``A = lora_A.weight`` stay in the autograd graph
        (for regularisers on live tensors); otherwise detached copies.

    Returns
    -------
    pairs : dict module name -> FactorPair(s B_peft, A_peft)
    extras : dict name -> tensor
        The adapter's ``modules_to_save`` weights (e.g. ``classifier.weight``); empty when ``live``.
    """
    adapter = _adapter(model, adapter_name)
    return _read(lora_layers(model), _saved_modules(model), adapter, live)


def _read(layers, saved, adapter: str, live: bool):
    pairs: dict[str, FactorPair] = {}
    for name, layer in layers.items():
        if adapter not in layer.lora_A:
            continue
        s = float(layer.scaling[adapter])
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        if live:
            pairs[name] = FactorPair(B * s, A)
        else:
            with torch.no_grad():
                pairs[name] = FactorPair(B.detach() * s, A.detach().clone())
    extras: dict[str, torch.Tensor] = {}
    if not live:
        for name, wrapper in saved.items():
            if adapter in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[adapter].named_parameters():
                    extras[f"{name}.{pname}"] = p.detach().clone()
    return pairs, extras


def set_factor_pairs(
    model: torch.nn.Module,
    pairs: Mapping[str, FactorPair],
    extras: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> None:
    r"""Write folded pairs (and extras) into a live adapter: ``lora_B = B / s``, ``lora_A = A``.

    Every LoRA module of the adapter must be given, with the adapter's shapes.

    Raises
    ------
    ValueError
        A module is missing or unknown, or a shape differs from the adapter's (the message names both).
    """
    adapter = _adapter(model, adapter_name)
    _write(lora_layers(model), _saved_modules(model), adapter, pairs, extras)


def _write(layers, saved, adapter: str, pairs, extras) -> None:
    layers = {name: layer for name, layer in layers.items() if adapter in layer.lora_A}
    missing, unknown = sorted(set(layers) - set(pairs)), sorted(set(pairs) - set(layers))
    if missing or unknown:
        raise ValueError(
            f"Adapter {adapter!r}: pairs must cover exactly its LoRA modules. Missing {missing[:3]}, unknown {unknown[:3]}."
        )
    with torch.no_grad():
        for name, layer in layers.items():
            pair, s = pairs[name], float(layer.scaling[adapter])
            wB, wA = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            if tuple(pair.B.shape) != tuple(wB.shape) or tuple(pair.A.shape) != tuple(wA.shape):
                raise ValueError(
                    f"Module {name!r}: got B {tuple(pair.B.shape)}, A {tuple(pair.A.shape)}; the adapter has "
                    f"B {tuple(wB.shape)}, A {tuple(wA.shape)}."
                )
            wB.copy_(pair.B / s)
            wA.copy_(pair.A)
        if extras:
            params = {}
            for name, wrapper in saved.items():
                if adapter in wrapper.modules_to_save:
                    for pname, p in wrapper.modules_to_save[adapter].named_parameters():
                        params[f"{name}.{pname}"] = p
            for name, value in extras.items():
                if name not in params:
                    raise ValueError(f"Unknown extra weight {name!r}; the adapter has {sorted(params)}.")
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"Extra weight {name!r}: got shape {tuple(value.shape)}; expected {tuple(params[name].shape)}."
                    )
                params[name].copy_(value)


def state_dict_to_pairs(state_dict: Mapping[str, torch.Tensor], config: LoraConfig, adapter_name: str | None = None):
    r"""A PEFT state dict (``get_peft_model_state_dict`` or ``model.state_dict()``) -> folded pairs, extras.

    ``s`` per module comes from ``config`` (:func:`lora_scale`). Keys of other adapters (when the
    dict holds several and ``adapter_name`` is given) are skipped.

    Examples
    --------
    >>> sd = {"base_model.model.q.lora_A.weight": torch.ones(2, 3), "base_model.model.q.lora_B.weight": torch.ones(4, 2)}
    >>> pairs, extras = state_dict_to_pairs(sd, LoraConfig(r=2, lora_alpha=8))
    >>> pairs["q"].B[0, 0].item()  # s = 8 / 2
    4.0
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    # A whole model's state dict also holds the frozen weights: then only modules_to_save are extras.
    whole = any(".base_layer." in k or ".original_module." in k for k in state_dict)
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m:
            if adapter_name is not None and m["adapter"] not in (None, adapter_name):
                continue
            factors.setdefault(m["module"], {})[m["factor"]] = value
            continue
        saved = _SAVED_KEY.search(key)
        if "lora_" in key or "original_module" in key or (whole and not saved):
            continue
        if saved and adapter_name is not None and saved["adapter"] != adapter_name:
            continue
        extras[_base_name(_SAVED_KEY.sub(".", key))] = value
    pairs = {}
    for module, f in factors.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"Module {module!r}: the state dict has lora_{''.join(sorted(f))} only; expected both.")
        declared, actual = _declared_rank(config, module), f["A"].shape[0]
        if declared != actual or f["B"].shape[-1] != actual:
            raise ValueError(f"Module {module!r}: the config declares rank {declared} (r / rank_pattern), but "
                             f"lora_A has {actual} rows and lora_B {f['B'].shape[-1]} columns; expected all three "
                             "equal (the scale alpha / r would be wrong).")
        pairs[module] = FactorPair(f["B"] * lora_scale(config, module), f["A"])
    return pairs, extras


def pairs_to_state_dict(
    pairs: Mapping[str, FactorPair], config: LoraConfig, extras: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    r"""Folded pairs -> a PEFT adapter state dict (``set_peft_model_state_dict`` / ``adapter_model.safetensors``).

    ``lora_B.weight = B / s`` with ``s`` from ``config``; the inverse of :func:`state_dict_to_pairs`.
    """
    out: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        out[f"{_PREFIX}{module}.lora_A.weight"] = pair.A
        out[f"{_PREFIX}{module}.lora_B.weight"] = pair.B / lora_scale(config, module)
    for name, value in (extras or {}).items():
        out[f"{_PREFIX}{name}"] = value
    return out


def merge_into_base(model: torch.nn.Module, pairs: Mapping[str, FactorPair]) -> None:
    r"""``W0 <- W0 + B @ A`` for each module (FLoRA's merge; the pairs are folded, so no scale).

    This forms ``d_out x d_in`` products on purpose: it edits the model's weights, it is not an
    aggregation rule.
    """
    layers = lora_layers(model)
    with torch.no_grad():
        for name, pair in pairs.items():
            if name not in layers:
                raise ValueError(f"Unknown LoRA module {name!r}.")
            weight = layers[name].get_base_layer().weight
            delta = (pair.B @ pair.A).to(weight.dtype)
            weight.add_(delta.T if getattr(layers[name], "fan_in_fan_out", False) else delta)


def init_pairs(shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator, dtype=torch.float32,
               device=None):
    r"""Fresh LoRA factors as PEFT initialises them: ``B = 0``, ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``.

    (PEFT's ``kaiming_uniform_(a=sqrt(5))`` has exactly that bound.) Drawn from ``generator`` in
    the order of ``shapes``, so a seed fixes them (drawn on the CPU, then moved to ``device``).
    """
    out = {}
    for name, (d_out, d_in) in shapes.items():
        bound = 1.0 / math.sqrt(d_in)
        A = (torch.rand((rank, d_in), generator=generator, dtype=torch.float64) * 2 - 1) * bound
        out[name] = FactorPair(torch.zeros((d_out, rank), dtype=dtype, device=device), A.to(dtype=dtype, device=device))
    return out
