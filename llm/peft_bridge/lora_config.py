r"""PEFT ``LoraConfig`` building: one client's config, and an adapter's with per-module ranks, under a scale
convention (:mod:`.scaling`) written as plain PEFT options, so an exported adapter reloads with the same ``s``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from peft import LoraConfig

from .scaling import convention_scale, lora_scale, resolve_scaling  # noqa: F401 (lora_scale: the doctests)

__all__ = ["client_lora_config", "adapter_config"]


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
