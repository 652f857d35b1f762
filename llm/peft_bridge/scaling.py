r"""Scale conventions: which PEFT scale ``s`` a rank-``r`` adapter gets, and PEFT's own ``s`` of a module.

.. math:: s(r) = \frac{\alpha}{r}\ (\texttt{alpha\_over\_r}),\qquad \frac{\alpha}{\sqrt r}\ (\texttt{rslora}),\qquad
          \frac{\alpha}{r_{ref}}\ (\texttt{constant})
"""

from __future__ import annotations

import math
import numbers

from peft import LoraConfig
from peft.utils.other import get_pattern_key

from ..catalog import LORA_SCALINGS

__all__ = ["LORA_SCALINGS", "resolve_scaling", "convention_scale", "lora_scale"]


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


# LORA_SCALINGS, the scale conventions, is a name table written once in ..catalog (torch-free), re-exported here.


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
