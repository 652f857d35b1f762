r"""Whole PEFT LoRA adapters in and out: read, aggregate over clients, redistribute, write.

An :class:`Adapter` is one client's (or the global) LoRA adapter with the scale folded in,

.. math:: \Delta W_m = s_m B^{peft}_m A^{peft}_m = B_m A_m \quad\text{for every adapted module } m,

(``s_m = alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with rsLoRA, from ``rank_pattern`` /
``alpha_pattern``, whichever scale convention wrote them; :mod:`~lowrank_fed.llm.peft_bridge`), so adapters
trained with different ranks, alphas or rsLoRA are combined by the core's rules on ``Delta W`` itself:

- :func:`load_peft_adapter` reads a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
  or a ``(state_dict, LoraConfig)``; tensors that are not LoRA factors (a classifier head in
  ``modules_to_save``) are kept as ``extras``. Anything whose mathematics the folding does not cover
  (DoRA's magnitude vector, ``lora_bias``, embedding or convolution LoRA, trainable tokens, aLoRA,
  ``target_parameters``) is refused with an error naming it: no tensor is dropped silently.
- :func:`aggregate_adapters` applies one core rule module by module. A module some clients lack is
  aggregated over the clients that have it, with their weights renormalised over them (a missing module
  is no information, not a zero update); extras likewise, by :func:`~lowrank_fed.aggregation.weighted_average`.
- :func:`redistribute_adapter` gives a client its share at its own per-module ranks.
- :func:`save_peft_adapter` writes a folder ``PeftModel.from_pretrained`` loads: ``r`` = the most common
  rank, ``rank_pattern`` for the others, ``lora_B = B / s``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from lowrank_fed import AGGREGATORS, FactorPair, aggregate, redistribute
from lowrank_fed.aggregation import weighted_average

from .peft_bridge import adapter_config, pairs_to_state_dict, resolve_scaling, state_dict_to_pairs

__all__ = ["Adapter", "load_peft_adapter", "save_peft_adapter", "aggregate_adapters", "redistribute_adapter",
           "average_extras", "MergeError", "ModuleMerge"]

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


class MergeError(ValueError):
    """A module or head that :func:`aggregate_adapters` cannot merge; ``kind`` says why, ``where`` names it.

    ``kind``: ``"weight"`` (every holder has weight 0), ``"overflow"`` (coefficients times ``B`` overflow),
    ``"rule"`` (the core rule refused the module; ``reason`` is its message), ``"extras_coefficients"`` (heads
    with coefficients) or ``"extras_weight"`` (every holder of a head has weight 0). ``holders``: the indices
    of the adapters that hold ``where``.
    """

    def __init__(self, kind: str, where: str, holders: Sequence[int], reason: str):
        super().__init__(reason)
        self.kind, self.where, self.holders, self.reason = kind, where, list(holders), reason


@dataclass(frozen=True)
class ModuleMerge:
    """One module of :func:`aggregate_adapters`: its holders, the pairs and weights the rule was given (``B``
    already times the coefficient with ``coefficients=True``), the rule's result, the share that scales it into
    the global (``global = share * pair`` on ``B``), and the seconds the rule took."""

    holders: list[int]
    inputs: list[FactorPair]
    weights: list[float] | None
    pair: FactorPair
    share: float
    seconds: float


def aggregate_adapters(rule: str, adapters: Sequence, weights=None, *, workers: int | None = None,
                       missing: str = "holders", coefficients: bool = False,
                       details: dict | None = None, **options) -> Adapter:
    r"""One core rule (``aggregate(rule, ...)``) over every module of the clients' adapters.

    Module ``m``, held by the clients ``H_m`` (weights ``w_k``):

    .. math:: \Delta W_m = c_m\, \mathrm{aggregate}(\mathrm{rule}, [B_k A_k]_{k \in H_m}, [w_k]_{k \in H_m}),
              \qquad c_m = \begin{cases} 1 & \texttt{missing="holders"} \\
              \sum_{k \in H_m} w_k / \sum_k w_k & \texttt{missing="zero"} \end{cases}

    The rules normalise the weights, so ``missing="holders"`` (the default) averages a module over its
    holders with their weights renormalised (a missing module is no information), and ``missing="zero"``
    counts a client without the module as a zero update with its weight (the weighted average of the
    clients' models). ``coefficients=True`` (task arithmetic, ``svd`` or ``stack``): the weights are
    coefficients of any sign, not normalised, ``Delta W_m = sum_k w_k B_k A_k`` exactly (computed as
    ``|H_m|`` times the uniform average of ``(w_k B_k) A_k``). ``rank`` (``svd``): each module's result has
    rank ``min(rank, sum_{k in H_m} r_k, d_out, d_in)``, so a sum of lower rank is kept exactly. Extras:
    the holders' weighted average. The result has no config (give the writer's options to
    :func:`save_peft_adapter`). ``details``, when a dict, receives ``{module: ModuleMerge}`` (holders, the
    rule's result before ``c_m``, ``c_m``, the seconds); ``workers = 1`` runs the modules one by one in
    name order, otherwise in threads (:func:`~lowrank_fed.aggregation.aggregate_modules`, the same
    results).

    Raises
    ------
    ValueError
        Unknown rule, fewer than one adapter, weights of the wrong length, or shapes that disagree
        for a module (naming the module and the client); :class:`MergeError` (a ValueError) for a module
        or head that cannot be merged, the first in name order (modules before heads).
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"Unknown rule {rule!r}; expected one of {sorted(AGGREGATORS)}.")
    if missing not in ("holders", "zero"):
        raise ValueError(f"The 'missing' parameter must be 'holders' or 'zero'. Got {missing!r}.")
    items = [_as_adapter(a, i) for i, a in enumerate(adapters)]
    if not items:
        raise ValueError("The 'adapters' parameter must hold at least one adapter. Got none.")
    w = [1.0] * len(items) if weights is None else [float(x) for x in weights]
    if len(w) != len(items):
        raise ValueError(f"The 'weights' parameter must have one weight per adapter: expected {len(items)}, got {len(w)}.")
    rank = options.pop("rank", None)
    modules, module_weights, holders_of, shares, ranks, done = {}, {}, {}, {}, {}, {}

    def one(m):
        extra = {"rank": ranks[m]} if m in ranks else {}
        t0 = time.perf_counter()
        try:
            pair = aggregate(rule, modules[m], module_weights[m], **extra, **options)
        except ValueError as err:
            raise MergeError("rule", m, holders_of[m], str(err)) from None
        return pair, time.perf_counter() - t0

    for m in sorted({m for a in items for m in a.pairs}):
        holders = [k for k, a in enumerate(items) if m in a.pairs]
        shapes = {items[k].pairs[m].shape for k in holders}
        if len(shapes) > 1:
            raise ValueError(f"Module {m!r}: the clients' updates have different shapes {sorted(shapes)}; "
                             "expected one (d_out, d_in) per module.")
        held, held_w = [items[k].pairs[m] for k in holders], [w[k] for k in holders]
        if coefficients:  # sum_k w_k B_k A_k = K * (1/K) sum_k (w_k B_k) A_k, exactly
            held, held_w = [FactorPair(p.B * wk, p.A) for p, wk in zip(held, held_w, strict=True)], None
            if not all(bool(p.B.isfinite().all()) for p in held):
                raise MergeError("overflow", m, holders, f"module {m!r}: the weights times the clients' B overflow "
                                 "to Inf; expected coefficients of a sensible size.")
        elif weights is not None and sum(held_w) <= 0:
            raise MergeError("weight", m, holders, f"module {m!r}: every adapter holding it ({holders}) has weight "
                             "0; expected a positive weight on at least one holder.")
        modules[m], holders_of[m] = held, holders
        module_weights[m] = None if weights is None and not coefficients else held_w
        shares[m] = float(len(held)) if coefficients else sum(held_w) / sum(w) if missing == "zero" else 1.0
        if rank:  # a sum of lower rank than `rank` is kept exactly
            ranks[m] = min(rank, sum(p.rank for p in held), *held[0].shape)
        if workers == 1:  # one by one: a module's refusal comes before the next module's checks
            done[m] = one(m)
    if workers != 1:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        n = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        if n < 1:
            raise ValueError(f"The 'workers' parameter must be a positive int. Got {workers}.")
        with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=max(1, min(n, len(modules)))) as pool:
            done = dict(zip(modules, pool.map(one, modules)))
    pairs = {}
    for m, (pair, seconds) in done.items():
        pairs[m] = pair if shares[m] == 1.0 and not coefficients else FactorPair(pair.B * shares[m], pair.A)
        if details is not None:
            details[m] = ModuleMerge(holders_of[m], modules[m], module_weights[m], pair, shares[m], seconds)
    heads = sorted({e for a in items for e in a.extras})
    if heads and coefficients:
        raise MergeError("extras_coefficients", heads[0], [], f"coefficients combine LoRA updates; these adapters "
                         f"also hold other trained weights ({heads[0]!r}{', ...' if len(heads) > 1 else ''}, e.g. a "
                         "head), which are weights, not updates.")
    for name in heads:
        holders = [k for k, a in enumerate(items) if name in a.extras]
        if sum(w[k] for k in holders) <= 0:
            raise MergeError("extras_weight", name, holders, f"tensor {name!r} (not LoRA, e.g. a head): every "
                             f"adapter holding it ({holders}) has weight 0; expected a positive weight on one.")
    return Adapter(pairs, average_extras(items, w), None)


def average_extras(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Each extra tensor (a head) averaged over the adapters that have it, weights renormalised over them."""
    extras = {}
    for name in sorted({e for a in adapters for e in a.extras}):
        holders = [k for k, a in enumerate(adapters) if name in a.extras]
        extras[name] = weighted_average([adapters[k].extras[name] for k in holders], [weights[k] for k in holders])
    return extras


def _client_ranks(client_config, modules) -> dict[str, int]:
    if isinstance(client_config, int) and not isinstance(client_config, bool):
        return {m: client_config for m in modules}
    if isinstance(client_config, LoraConfig):
        return {m: int(client_config.rank_pattern.get(get_pattern_key(client_config.rank_pattern.keys(), m),
                                                      client_config.r)) for m in modules}
    if isinstance(client_config, Mapping):
        missing = sorted(set(modules) - set(client_config))
        if missing:
            raise ValueError(f"The client ranks lack modules {missing[:3]}; expected a rank for every module.")
        return {m: int(client_config[m]) for m in modules}
    raise TypeError("The 'client_config' parameter must be a LoraConfig, an int rank or a {module: rank} "
                    f"mapping. Got {type(client_config).__name__}.")


def redistribute_adapter(adapter: Adapter, client_config, method: str = "svd") -> Adapter:
    r"""A client's share of ``adapter`` at its per-module ranks: ``redistribute(pair_m, r_m, method)``.

    ``client_config``: the client's ``LoraConfig`` (its ``r``, ``rank_pattern``; the result keeps it,
    so :func:`save_peft_adapter` writes it with the client's alpha and rsLoRA), an int rank, or
    ``{module: rank}``. ``method``: ``"svd"`` (the best rank-``r_m`` approximation, FlexLoRA) or
    ``"prefix"`` (the first ``r_m`` slots, HetLoRA). Extras are copied.
    """
    ranks = _client_ranks(client_config, adapter.pairs)
    pairs = {m: redistribute(p, ranks[m], method=method) for m, p in adapter.pairs.items()}
    config = client_config if isinstance(client_config, LoraConfig) else adapter.config
    return Adapter(pairs, dict(adapter.extras), config)

