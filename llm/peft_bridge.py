r"""PEFT LoRA weights <-> the core's :class:`~lowrank_fed.FactorPair`, with the scale folded in.

PEFT's adapted layer computes

.. math:: W = W_0 + s\, B_{peft} A_{peft},\qquad s = \frac{\alpha}{r}\ \Big(\frac{\alpha}{\sqrt r}\ \text{with rsLoRA}\Big)

where

- ``B_peft = lora_B.weight``, shape ``(d_out, r)``; ``A_peft = lora_A.weight``, shape ``(r, d_in)``;
- ``alpha`` and ``r`` are the module's ``lora_alpha`` and rank (``alpha_pattern`` / ``rank_pattern``
  may set them per module).

Which ``s`` an adapter of rank ``r`` gets is the run's *scale convention* (:data:`LORA_SCALINGS`,
:func:`convention_scale`): ``alpha_over_r`` (PEFT's default, ``s = alpha / r``), ``rslora``
(``s = alpha / sqrt(r)``) or ``constant`` (``s = alpha / r_ref`` for every rank, ``r_ref`` a reference rank
the caller fixes). All three are written as plain PEFT options (:func:`client_lora_config`), so PEFT itself
applies them and an exported adapter reloads with the same ``s``.

The core never sees ``s`` (docs/methods.md, "Notation and the scale folding"): on the way in, ``FactorPair(s B_peft, A_peft)``,
so ``pair.B @ pair.A`` is the update ``Delta W`` itself and a rank slot means the same thing for
every client whatever its rank; on the way out ``lora_B = B / s``. The round trip is exact when
``s`` is a power of two (``lora_alpha = 16`` with power-of-two ranks) and within one rounding of
``B`` otherwise.

Names: a module is named relative to the base model (``bert.encoder.layer.0.attention.self.query``),
the name PEFT's ``rank_pattern`` matches against. Non-LoRA trainable weights (classifier heads in
``modules_to_save``) travel as "extras" named ``classifier.weight`` etc.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key

from lowrank_fed import FactorPair

from .catalog import LORA_SCALINGS

__all__ = [
    "LORA_SCALINGS",
    "convention_scale",
    "resolve_scaling",
    "lora_scale",
    "client_lora_config",
    "adapter_config",
    "lora_layers",
    "get_factor_pairs",
    "set_factor_pairs",
    "state_dict_to_pairs",
    "pairs_to_state_dict",
    "merge_into_base",
    "init_pairs",
    "AdapterWorkspace",
]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAVED_KEY = re.compile(r"\.modules_to_save\.(?P<adapter>[^.]+)\.")


def _declared_rank(config: LoraConfig, module: str) -> int:
    """The rank ``config`` declares for ``module``: its ``rank_pattern`` entry (PEFT's matching rule), else ``r``."""
    return int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r))


def lora_scale(config: LoraConfig, module: str) -> float:
    r"""PEFT's scale ``s`` of ``module`` under ``config``: ``alpha / r`` (or ``alpha / sqrt(r)``).

    ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the
    module name (PEFT's own matching rule), else from ``config.r`` / ``config.lora_alpha``.

    Examples
    --------
    >>> cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"layer.1.query": 4})
    >>> lora_scale(cfg, "enc.layer.0.query"), lora_scale(cfg, "enc.layer.1.query")
    (2.0, 4.0)
    """
    r = _declared_rank(config, module)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    if r <= 0:
        raise ValueError(f"Module {module!r}: the LoRA rank must be positive. Got {r}.")
    return float(alpha / math.sqrt(r)) if config.use_rslora else float(alpha / r)


def resolve_scaling(scaling: str | None, use_rslora: bool = False) -> str:
    r"""The scale convention named by ``scaling`` and PEFT's older flag ``use_rslora``.

    ``use_rslora = True`` is the older spelling of ``scaling = "rslora"``; ``scaling = None`` means "from
    ``use_rslora``" (``"rslora"`` or ``"alpha_over_r"``).

    Raises
    ------
    ValueError
        An unknown convention, or ``use_rslora = True`` with another convention (the message names both).

    Examples
    --------
    >>> resolve_scaling(None, True), resolve_scaling("constant")
    ('rslora', 'constant')
    """
    if scaling is None:
        return "rslora" if use_rslora else "alpha_over_r"
    if scaling not in LORA_SCALINGS:
        raise ValueError(f"The 'scaling' parameter must be one of {list(LORA_SCALINGS)}. Got {scaling!r}.")
    if use_rslora and scaling != "rslora":
        raise ValueError(f"The 'use_rslora' and 'scaling' parameters disagree: use_rslora = True means scaling = "
                         f"'rslora'. Got scaling = {scaling!r}.")
    return scaling


def convention_scale(scaling: str, lora_alpha: float, rank: int, reference_rank: int | None = None) -> float:
    r"""The scale ``s(r)`` of a rank-``rank`` adapter under a convention:

    .. math:: s(r) = \frac{\alpha}{r}\ (\texttt{alpha\_over\_r}),\qquad \frac{\alpha}{\sqrt r}\ (\texttt{rslora}),
              \qquad \frac{\alpha}{r_{ref}}\ (\texttt{constant}, \text{ the same for every } r),

    where ``alpha = lora_alpha`` and ``r_ref = reference_rank`` (required by ``constant`` only).

    Examples
    --------
    >>> [convention_scale("constant", 16, r, reference_rank=16) for r in (2, 4, 8)]
    [1.0, 1.0, 1.0]
    >>> convention_scale("alpha_over_r", 16, 4), convention_scale("rslora", 16, 4)
    (4.0, 8.0)
    """
    scaling = resolve_scaling(scaling)
    _check_rank("rank", rank)
    if scaling == "constant":
        _check_rank("reference_rank", reference_rank, " (scaling = 'constant' needs it)")
    if scaling == "rslora":
        return float(lora_alpha / math.sqrt(rank))
    return float(lora_alpha / (reference_rank if scaling == "constant" else rank))


def _check_rank(name: str, value, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"The '{name}' parameter must be a positive int{why}. Got {value!r}.")


def client_lora_config(
    rank: int,
    *,
    target_modules: Iterable[str],
    lora_alpha: float = 16.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    modules_to_save: Iterable[str] | None = None,
    task_type: str | None = None,
    lora_dropout: float = 0.0,
    scaling: str | None = None,
    reference_rank: int | None = None,
) -> LoraConfig:
    r"""The PEFT config of one client: rank ``rank`` (per-module ranks through ``rank_pattern``).

    ``scaling`` (:data:`LORA_SCALINGS`; ``None``: from ``use_rslora``) fixes the scale of each module,
    :func:`convention_scale` at its rank, written as PEFT options:

    - ``alpha_over_r``: ``lora_alpha``, ``alpha_pattern`` as given (``s = alpha / r``);
    - ``rslora``: the same with ``use_rslora = True`` (``s = alpha / sqrt(r)``);
    - ``constant``: ``s = lora_alpha / reference_rank`` for every module, written as PEFT's ``alpha / r`` with
      the config's ``lora_alpha = s * rank`` and ``alpha_pattern[key] = s * rank_pattern[key]`` (the same keys,
      so PEFT matches both patterns alike); PEFT's ``alpha / r`` gives ``s`` back exactly when ``r`` is a power
      of two (and in most other cases), else within one rounding (no ``alpha`` does better then).

    With ``alpha_over_r`` and one ``lora_alpha`` shared by all clients, ``s_k = lora_alpha / r_k`` differs
    by client; the bridge folds each client's own ``s_k`` (module docstring).

    Raises
    ------
    ValueError
        A rank that is not a positive int; an unknown ``scaling`` or one that disagrees with ``use_rslora``;
        ``constant`` without a positive ``reference_rank``, or with an ``alpha_pattern`` (the convention sets it).

    Examples
    --------
    >>> client_lora_config(4, target_modules=["query"]).r
    4
    >>> cfg = client_lora_config(4, target_modules=["q"], rank_pattern={"l1.q": 8}, scaling="constant",
    ...                          reference_rank=16)
    >>> cfg.lora_alpha, cfg.alpha_pattern, lora_scale(cfg, "l0.q"), lora_scale(cfg, "l1.q")
    (4.0, {'l1.q': 8.0}, 1.0, 1.0)
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"The 'rank' parameter must be a positive int. Got {rank!r}.")
    scaling = resolve_scaling(scaling, bool(use_rslora))
    if scaling == "constant":
        if alpha_pattern:
            raise ValueError("The 'alpha_pattern' parameter must be empty with scaling = 'constant' (the convention "
                             f"sets every module's alpha). Got {dict(alpha_pattern)!r}.")
        s = convention_scale(scaling, lora_alpha, rank, reference_rank)
        lora_alpha = s * rank  # PEFT computes s back as alpha / r: exactly when the division rounds back
        alpha_pattern = {key: s * int(r) for key, r in (rank_pattern or {}).items()}
    return LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=scaling == "rslora",
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        lora_dropout=lora_dropout,
    )


def adapter_config(ranks: Mapping[str, int], *, target_modules: Iterable[str], lora_alpha: float = 16.0,
                   use_rslora: bool = False, modules_to_save: Iterable[str] | None = None,
                   task_type: str | None = None, base_model_name_or_path: str | None = None,
                   alphas: Mapping[str, float] | None = None, scaling: str | None = None,
                   reference_rank: int | None = None) -> LoraConfig:
    r"""The PEFT config of an adapter with per-module ranks: ``r`` = the most common rank (the larger on a
    tie), ``rank_pattern`` = the other modules by exact (escaped) name; ``alphas`` (per module) that differ
    from ``lora_alpha`` go to ``alpha_pattern`` the same way. ``scaling``, ``reference_rank``: the scale
    convention (:func:`client_lora_config`; ``constant`` sets the alphas itself, so it takes no ``alphas``).

    Examples
    --------
    >>> cfg = adapter_config({"l.0.q": 4, "l.1.q": 4, "l.2.q": 8}, target_modules=["q"])
    >>> cfg.r, cfg.rank_pattern
    (4, {'l\\.2\\.q': 8})
    """
    values = list(ranks.values())
    default = max(set(values), key=lambda r: (values.count(r), r))
    config = client_lora_config(
        default, target_modules=target_modules, lora_alpha=lora_alpha,
        rank_pattern={re.escape(name): r for name, r in ranks.items() if r != default},
        use_rslora=use_rslora, modules_to_save=modules_to_save, task_type=task_type,
        alpha_pattern={re.escape(name): a for name, a in (alphas or {}).items() if a != lora_alpha} or None,
        scaling=scaling, reference_rank=reference_rank)
    config.base_model_name_or_path = base_model_name_or_path
    return config


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


class AdapterWorkspace:
    r"""One base model, one PEFT adapter per distinct rank layout, loaded from / read into factor pairs.

    In-process clients train one after another on the same model: :meth:`load` activates an adapter
    whose ranks match the pairs (creating it on first use from :func:`client_lora_config`, with
    ``rank_pattern`` when ranks differ by module), folds the pairs in, and :meth:`extract` reads
    them back. :meth:`set_base` sets the frozen weights to ``W0 + delta`` (FLoRA's merged base).

    Parameters
    ----------
    model : transformers model (not yet wrapped by PEFT)
    target_modules : list of str
    lora_alpha, use_rslora, modules_to_save, task_type : see :func:`client_lora_config`
    scaling, reference_rank : the scale convention of every adapter it makes (:func:`client_lora_config`;
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
        """The PEFT config of an adapter with these per-module ranks (:func:`adapter_config`)."""
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
        """The active adapter as ``(pairs, extras)`` (see :func:`get_factor_pairs`)."""
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
