r"""The adapter model wrapper: one base model, one PEFT adapter per rank layout, loaded from / read into pairs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lowrank_fed import FactorPair

from .lora_config import adapter_config
from .pairs import _read, _saved_modules, _write, lora_layers
from .scaling import convention_scale, resolve_scaling

__all__ = ["AdapterWorkspace"]


class AdapterWorkspace:
    r"""One base model, one PEFT adapter per distinct rank layout, loaded from / read into factor pairs.

    In-process clients train one after another on the same model: :meth:`load` activates an adapter
    whose ranks match the pairs (creating it on first use from :func:`~.lora_config.client_lora_config`, with
    ``rank_pattern`` when ranks differ by module), folds the pairs in, and :meth:`extract` reads
    them back. :meth:`set_base` sets the frozen weights to ``W0 + delta`` (FLoRA's merged base).

    Parameters
    ----------
    model : transformers model (not yet wrapped by PEFT)
    target_modules : list of str
    lora_alpha, use_rslora, modules_to_save, task_type : see :func:`~.lora_config.client_lora_config`
    scaling, reference_rank : the scale convention of every adapter it makes (:func:`~.lora_config.client_lora_config`;
        ``scaling = None``: from ``use_rslora``); ``constant`` needs ``reference_rank``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        target_modules: Iterable[str],
        lora_alpha: float = 16.0,
        use_rslora: bool = False,
        modules_to_save: Iterable[str] | None = None,
        task_type: str | None = None,
        scaling: str | None = None,
        reference_rank: int | None = None,
    ):
        self.target_modules = list(target_modules)
        self.lora_alpha = float(lora_alpha)
        self.scaling = resolve_scaling(scaling, bool(use_rslora))
        self.use_rslora = self.scaling == "rslora"
        self.reference_rank = reference_rank
        convention_scale(self.scaling, self.lora_alpha, 1, reference_rank)  # a bad reference_rank fails here
        self.modules_to_save = list(modules_to_save) if modules_to_save else None
        self.task_type = task_type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notice, raised inside PEFT
            self.peft: PeftModel = get_peft_model(model, self.config_for({"": 1}), adapter_name="r1")
        self._adapters: dict[tuple, str] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self._W0: dict[str, torch.Tensor] = {}
        self._layers = lora_layers(self.peft)
        self._saved = _saved_modules(self.peft)
        for name, layer in self._layers.items():
            self.shapes[name] = (int(layer.out_features), int(layer.in_features))
        self._adapters[tuple((name, 1) for name in self.shapes)] = "r1"
        self._base_modified = False
        self.active: str = "r1"

    def config_for(self, ranks: Mapping[str, int]) -> LoraConfig:
        """The PEFT config of an adapter with these per-module ranks (:func:`~.lora_config.adapter_config`)."""
        return adapter_config(ranks, target_modules=self.target_modules, lora_alpha=self.lora_alpha,
                              modules_to_save=self.modules_to_save, task_type=self.task_type,
                              scaling=self.scaling, reference_rank=self.reference_rank)

    def activate(self, ranks: Mapping[str, int]) -> str:
        """Activate (creating if needed) the adapter with these per-module ranks; return its name."""
        key = tuple((name, int(ranks[name])) for name in self.shapes)
        if key not in self._adapters:
            name = f"a{len(self._adapters)}"
            self.peft.add_adapter(name, self.config_for(dict(key)))
            self._adapters[key] = name
        name = self._adapters[key]
        if self.active != name:
            self.peft.set_adapter(name)
            self.active = name
        return name

    def load(self, pairs: Mapping[str, FactorPair] | None, extras: Mapping[str, torch.Tensor] | None = None) -> str:
        """Activate an adapter shaped like ``pairs`` and fold them in (``None``: a zero adapter)."""
        if pairs is None:
            name = self.activate({m: 1 for m in self.shapes})
            dev = next(self.peft.parameters()).device
            zero = {m: FactorPair(torch.zeros(d_out, 1, device=dev), torch.zeros(1, d_in, device=dev))
                    for m, (d_out, d_in) in self.shapes.items()}
            _write(self._layers, self._saved, name, zero, extras)
            return name
        name = self.activate({m: pair.rank for m, pair in pairs.items()})
        _write(self._layers, self._saved, name, pairs, extras)
        return name

    def extract(self, *, live: bool = False):
        """The active adapter as ``(pairs, extras)`` (see :func:`~.pairs.get_factor_pairs`)."""
        return _read(self._layers, self._saved, self.active, live)

    def lora_parameters(self) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """The active adapter's raw PEFT parameters per module: ``(lora_B.weight, lora_A.weight)``, unfolded."""
        return {name: (layer.lora_B[self.active].weight, layer.lora_A[self.active].weight)
                for name, layer in self._layers.items() if self.active in layer.lora_A}

    def live_pairs(self) -> dict[str, FactorPair]:
        """The active adapter as ``FactorPair(s * lora_B, lora_A)`` inside the autograd graph (a new graph per call)."""
        out = {}
        for name, layer in self._layers.items():
            B, A = layer.lora_B[self.active].weight, layer.lora_A[self.active].weight
            out[name] = FactorPair(B * float(layer.scaling[self.active]), A)
        return out

    def param_groups(self, lrs: Mapping[str, float]) -> list[dict]:
        r"""torch parameter groups of the active adapter, one per name in ``lrs``; every other weight frozen.

        ``lrs`` maps ``"A"`` (all ``lora_A``), ``"B"`` (all ``lora_B``) and ``"extras"`` (the head) to a
        learning rate; a group not named is frozen (``requires_grad=False``). Returns torch's
        ``[{"params": [...], "lr": lr, "name": group}]`` in the order A, B, extras (empty groups left out).
        """
        unknown = sorted(set(lrs) - {"A", "B", "extras"})
        if unknown:
            raise ValueError(f"Unknown parameter group(s) {unknown}; expected 'A', 'B' or 'extras'.")
        for p in self.peft.parameters():
            p.requires_grad_(False)
        found: dict[str, list] = {"A": [], "B": [], "extras": []}
        for layer in self._layers.values():
            if self.active in layer.lora_A:
                found["A"].append(layer.lora_A[self.active].weight)
                found["B"].append(layer.lora_B[self.active].weight)
        for wrapper in self._saved.values():
            if self.active in wrapper.modules_to_save:
                found["extras"].extend(wrapper.modules_to_save[self.active].parameters())
        groups = []
        for name in ("A", "B", "extras"):
            if name in lrs and found[name]:
                for p in found[name]:
                    p.requires_grad_(True)
                groups.append({"params": found[name], "lr": float(lrs[name]), "name": name})
        return groups

    def parameters(self, *, A: bool = True, B: bool = True, extras: bool = True) -> list[torch.nn.Parameter]:
        """The active adapter's parameters to train (one flat list); sets ``requires_grad`` on exactly those."""
        chosen = {name for name, on in (("A", A), ("B", B), ("extras", extras)) if on}
        return [p for g in self.param_groups({name: 0.0 for name in chosen}) for p in g["params"]]

    def extras_template(self) -> dict[str, torch.Tensor]:
        """The extras of the active adapter (the untrained head right after creation)."""
        return self.extract()[1]

    def set_base(self, delta: Mapping[str, torch.Tensor] | None) -> None:
        """Frozen weights ``W0 + delta[m]`` (dense, shape ``(d_out, d_in)``); ``None`` restores ``W0``."""
        layers = self._layers
        if not self._W0:
            self._W0 = {m: layers[m].get_base_layer().weight.detach().clone() for m in self.shapes}
        if not delta and not self._base_modified:
            return
        with torch.no_grad():
            for m, layer in layers.items():
                weight = layer.get_base_layer().weight
                weight.copy_(self._W0[m])
                if delta and m in delta:
                    d = delta[m].to(weight.dtype)
                    weight.add_(d.T if getattr(layer, "fan_in_fan_out", False) else d)
        self._base_modified = bool(delta)
