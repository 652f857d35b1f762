r"""PEFT adapter folders in and out: :class:`Adapter` (scale folded in), :func:`load_peft_adapter`,
:func:`save_peft_adapter`; anything the folding does not cover is refused by name."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key


from lowrank_fed import FactorPair

from ..peft_bridge import adapter_config, pairs_to_state_dict, resolve_scaling, state_dict_to_pairs

__all__ = ["Adapter", "load_peft_adapter", "save_peft_adapter", "CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_BIN"]

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


@dataclass(frozen=True)
class Adapter:
    r"""A LoRA adapter with the scale folded in (``pairs[m].B @ pairs[m].A = Delta W_m``).

    Attributes
    ----------
    pairs : dict module -> FactorPair
        Module names relative to the base model (``bert.encoder.layer.0.attention.self.query``).
    extras : dict name -> tensor
        Non-LoRA trained weights (``classifier.weight``, ...).
    config : LoraConfig or None
        The configuration it was read with (target modules, alphas, task type, base model), if any.
    """

    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    config: LoraConfig | None = None

    @property
    def ranks(self) -> dict[str, int]:
        return {m: p.rank for m, p in self.pairs.items()}


# ----------------------------------------------------------------------------- reading
_REFUSED_CONFIG = {
    "use_dora": "DoRA (a magnitude vector rescales W0 + Delta W column by column: no factor pair holds it)",
    "lora_bias": "lora_bias (a bias on lora_B, outside B A)",
}


def _refuse(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what} is not supported; expected a plain LoRA adapter (lora_A, lora_B"
                     " and modules_to_save only). Nothing was read.")


def _check_config(config: LoraConfig, where: str) -> None:
    for key, what in _REFUSED_CONFIG.items():
        if getattr(config, key, False):
            _refuse(where, f"{key} = True: {what}")
    for key in ("trainable_token_indices", "target_parameters", "alora_invocation_tokens"):
        if getattr(config, key, None):
            _refuse(where, f"{key} = {getattr(config, key)!r}")


def _check_tensors(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    for key, value in state_dict.items():
        if "lora_magnitude_vector" in key:
            _refuse(where, f"tensor {key!r} (DoRA's magnitude vector)")
        if "lora_embedding_" in key:
            _refuse(where, f"tensor {key!r} (embedding LoRA)")
        if ".lora_B" in key and key.endswith(".bias"):
            _refuse(where, f"tensor {key!r} (lora_bias)")
        if (".lora_A" in key or ".lora_B" in key) and value.ndim != 2:
            _refuse(where, f"tensor {key!r} of shape {tuple(value.shape)} (convolution LoRA)")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder``'s weights file; a missing, truncated or corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else folder / WEIGHTS_BIN
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_BIN}.")
    try:
        if path.name == WEIGHTS_FILE:
            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: cannot be read as a weights file ({reason}); expected a complete "
                         f"{path.suffix[1:]} file as PEFT writes it.") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors; got {type(state_dict).__name__}.")
    return state_dict


def load_peft_adapter(source, adapter_name: str | None = None) -> Adapter:
    r"""Read a PEFT LoRA adapter: a folder, or ``(state_dict, LoraConfig)``.

    Raises
    ------
    FileNotFoundError
        A missing folder, a file, or a folder without ``adapter_config.json`` or weights (naming it).
    ValueError
        An ``adapter_config.json`` that is not a JSON object (malformed JSON, undecodable text, a list),
        naming the file and the parse error.
        A feature the folding does not cover (DoRA, ``lora_bias``, embedding / convolution LoRA,
        trainable tokens, aLoRA, ``target_parameters``), a module with only one factor, a rank the config
        declares that its tensors do not have, a non-finite tensor, or a truncated or corrupt weights file;
        the message names the folder (or file) and the tensor or config key.
    """
    if isinstance(source, tuple):
        state_dict, config = source
        where = "adapter"
    else:
        folder = Path(source)
        where = str(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: {'is not a folder' if folder.exists() else 'no such folder'}; "
                                    f"expected a PEFT adapter folder.")
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; expected a PEFT adapter folder.")
        try:
            config = LoraConfig.from_pretrained(str(folder))
        except (ValueError, TypeError) as err:  # malformed JSON (JSONDecodeError, UnicodeDecodeError), not an object
            raise ValueError(f"{folder / CONFIG_FILE}: cannot be read as a PEFT config: "
                             f"{type(err).__name__}: {err}") from None
        state_dict = _read_weights(folder)
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: tensor {key!r} has {int((~torch.isfinite(value)).sum())} non-finite "
                             "entries (NaN or Inf); expected finite weights. Nothing was read.")
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in (None, "LORA"):
        _refuse(where, f"peft_type {peft_type!r}")
    _check_config(config, where)
    _check_tensors(state_dict, where)
    try:
        pairs, extras = state_dict_to_pairs(state_dict, config, adapter_name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not pairs:
        raise ValueError(f"{where}: no lora_A / lora_B tensors; expected a LoRA adapter.")
    pairs = {m: FactorPair(p.B.float(), p.A.float()) if p.B.dtype in (torch.float16, torch.bfloat16) else p
             for m, p in sorted(pairs.items())}
    return Adapter(pairs, dict(sorted(extras.items())), config)


# ----------------------------------------------------------------------------- writing
def save_peft_adapter(folder, adapter: Adapter | Mapping[str, FactorPair], *, lora_alpha: float | None = None,
                      use_rslora: bool | None = None, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, scaling: str | None = None,
                      reference_rank: int | None = None) -> Path:
    r"""Write ``adapter`` as a PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``).

    ``r`` is the most common rank, ``rank_pattern`` gives the others (exact module names);
    ``lora_B = B / s_m`` with ``s_m`` the scale convention's at the module's rank ``r_m``
    (:func:`~lowrank_fed.llm.peft_bridge.convention_scale`): ``scaling = "alpha_over_r"`` (``lora_alpha / r_m``),
    ``"rslora"`` (``lora_alpha / sqrt(r_m)``, the same as ``use_rslora = True``) or ``"constant"``
    (``lora_alpha / reference_rank`` for every module, written as per-module alphas). PEFT loads the folder
    with the same ``s_m``, so ``s_m lora_B lora_A = B A = Delta W`` whatever the convention. Unset options
    come from the adapter's own config (its ``alpha_pattern`` too, per module, unless ``lora_alpha`` or
    ``scaling`` is given), else ``lora_alpha = 16``, ``alpha_over_r``. Extras are saved under their names and
    their modules listed in ``modules_to_save``. Returns the folder.

    Raises
    ------
    ValueError
        No modules, an alpha that is not finite and positive, an unknown ``scaling`` or one that disagrees with
        ``use_rslora``, ``constant`` without a positive ``reference_rank``, or a non-finite tensor: nothing is
        written.
    """
    from safetensors.torch import save_file

    adapter = adapter if isinstance(adapter, Adapter) else Adapter(dict(adapter))
    if not adapter.pairs:
        raise ValueError("The adapter has no modules; expected at least one factor pair.")
    own = adapter.config
    alpha = lora_alpha if lora_alpha is not None else (own.lora_alpha if own is not None else 16.0)
    if scaling is None:  # the older options: use_rslora given, else the adapter's own config
        rslora = use_rslora if use_rslora is not None else bool(own is not None and own.use_rslora)
    else:
        rslora = bool(use_rslora)
    scaling = resolve_scaling(scaling, rslora)
    base = base_model_name_or_path if base_model_name_or_path is not None else \
        (own.base_model_name_or_path if own is not None else None)
    task = task_type if task_type is not None else (own.task_type if own is not None else None)
    saved = sorted({name.rsplit(".", 1)[0] for name in adapter.extras})
    # Per-module alphas of the adapter's own config (alpha_pattern) are kept, unless one alpha is imposed.
    keep_own = lora_alpha is None and scaling != "constant" and own is not None and own.alpha_pattern
    alphas = {m: float(own.alpha_pattern.get(get_pattern_key(own.alpha_pattern.keys(), m), own.lora_alpha))
              for m in adapter.pairs} if keep_own else None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"The 'lora_alpha' parameter must be finite and positive (lora_B = B / s with s = alpha / "
                         f"r). Got {alpha}.")
    config = adapter_config(adapter.ranks, target_modules=sorted(adapter.pairs), lora_alpha=float(alpha),
                            modules_to_save=saved or None, task_type=task, base_model_name_or_path=base,
                            alphas=alphas, scaling=scaling, reference_rank=reference_rank)
    state = {k: v.detach().to("cpu").contiguous() for k, v in
             pairs_to_state_dict(adapter.pairs, config, adapter.extras).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"The adapter has non-finite entries (NaN or Inf) in {len(bad)} tensors ({bad[0]!r}"
                         f"{', ...' if len(bad) > 1 else ''}); nothing was written.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])
    (folder / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
    return folder


# ----------------------------------------------------------------------------- aggregation
def _as_adapter(item, index: int) -> Adapter:
    if isinstance(item, Adapter):
        return item
    if isinstance(item, Mapping) and all(isinstance(p, FactorPair) for p in item.values()):
        return Adapter(dict(item))
    raise TypeError(f"adapters[{index}] must be an Adapter or a {{module: FactorPair}} mapping. "
                    f"Got {type(item).__name__}.")
