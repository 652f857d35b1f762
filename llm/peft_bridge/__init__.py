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

One module per concern, every name importable from here: :mod:`.scaling` (the scale conventions, PEFT's ``s``),
:mod:`.lora_config` (PEFT configs), :mod:`.pairs` (folded pairs in and out of live adapters and state dicts),
:mod:`.workspace` (:class:`AdapterWorkspace`, the adapter model wrapper the clients train in).
"""

from __future__ import annotations

from .lora_config import adapter_config, client_lora_config
from .pairs import (get_factor_pairs, init_pairs, lora_layers, merge_into_base, pairs_to_state_dict,
                    set_factor_pairs, state_dict_to_pairs)
from .scaling import LORA_SCALINGS, convention_scale, lora_scale, resolve_scaling
from .workspace import AdapterWorkspace

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
