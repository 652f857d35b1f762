r"""Merging whole adapters: one core rule over every module (:func:`aggregate_adapters`), a client's share back.

Module ``m`` of the merge is ``aggregate(rule, [pairs_k[m] for k holding m], [w_k for k holding m])``; what a
module some clients lack becomes is the ``missing`` option's choice (their average alone, or a zero update
from each client without it). :func:`redistribute_adapter` gives a client the global at its own ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from lowrank_fed import AGGREGATORS, FactorPair, redistribute
from lowrank_fed.aggregation import ModuleError, aggregate_modules, weighted_average

from .folders import Adapter, _as_adapter

__all__ = ["MergeError", "ModuleMerge", "aggregate_adapters", "average_extras", "redistribute_adapter"]


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

    def __reduce__(self):  # pickled with what it was made of (a worker process may send it)
        return type(self), (self.kind, self.where, self.holders, self.reason)


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
    rule's result before ``c_m``, ``c_m``, the seconds of its rule, timed in the thread that ran it). The
    modules go through :func:`~lowrank_fed.aggregation.aggregate_modules`: ``workers`` threads (default: the
    CPU cores this process may use, at most 8; 1 runs them one by one in name order), each module's result
    the same bits whatever ``workers`` is.

    Raises
    ------
    ValueError
        Unknown rule, fewer than one adapter, weights of the wrong length, or shapes that disagree
        for a module (naming the module and the client); :class:`MergeError` (a ValueError) for a module
        or head that cannot be merged. Either is the first refusal in name order (modules before heads),
        whichever thread finished first: what ``workers = 1`` raises.
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
    modules, module_weights, holders_of, shares, module_options = {}, {}, {}, {}, {}
    refusal: ValueError | None = None  # the first module in name order that cannot reach the rule
    for m in sorted({m for a in items for m in a.pairs}):
        holders = [k for k, a in enumerate(items) if m in a.pairs]
        try:
            held, held_w = _module_inputs(m, items, holders, w, weights is not None, coefficients)
        except ValueError as err:  # raised after the modules before it, whose refusal would come first
            refusal = err
            break
        modules[m], holders_of[m] = held, holders
        module_weights[m] = None if weights is None and not coefficients else held_w
        shares[m] = float(len(held)) if coefficients else sum(held_w) / sum(w) if missing == "zero" else 1.0
        if rank:  # a sum of lower rank than `rank` is kept exactly
            module_options[m] = {"rank": min(rank, sum(p.rank for p in held), *held[0].shape)}
    seconds: dict[str, float] = {}
    try:
        done = aggregate_modules(rule, modules, module_weights, workers=workers,
                                 module_options=module_options, seconds=seconds, **options)
    except ModuleError as err:
        raise MergeError("rule", err.module, holders_of[err.module], str(err.error)) from None
    if refusal is not None:
        raise refusal
    pairs = {}
    for m, pair in done.items():
        pairs[m] = pair if shares[m] == 1.0 and not coefficients else FactorPair(pair.B * shares[m], pair.A)
        if details is not None:
            details[m] = ModuleMerge(holders_of[m], modules[m], module_weights[m], pair, shares[m],
                                     seconds[m])
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


def _module_inputs(m: str, items: Sequence[Adapter], holders: list[int], w: list[float], weighted: bool,
                   coefficients: bool) -> tuple[list[FactorPair], list[float]]:
    """Module ``m``'s pairs and weights as the rule gets them (``B`` times the coefficient with
    ``coefficients``); a ValueError (:class:`MergeError` for a weight or an overflow) names what cannot be
    merged."""
    shapes = {items[k].pairs[m].shape for k in holders}
    if len(shapes) > 1:
        raise ValueError(f"Module {m!r}: the clients' updates have different shapes {sorted(shapes)}; "
                         "expected one (d_out, d_in) per module.")
    held, held_w = [items[k].pairs[m] for k in holders], [w[k] for k in holders]
    if coefficients:  # sum_k w_k B_k A_k = K * (1/K) sum_k (w_k B_k) A_k, exactly
        held, held_w = [FactorPair(p.B * wk, p.A) for p, wk in zip(held, held_w, strict=True)], None
        if not all(bool(p.B.isfinite().all()) for p in held):
            raise MergeError("overflow", m, holders, f"module {m!r}: the weights times the clients' B "
                             "overflow to Inf; expected coefficients of a sensible size.")
    elif weighted and sum(held_w) <= 0:
        raise MergeError("weight", m, holders, f"module {m!r}: every adapter holding it ({holders}) has "
                         "weight 0; expected a positive weight on at least one holder.")
    return held, held_w


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

