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
- :func:`aggregate_adapters` applies one core rule to every module, the modules in threads
  (:func:`~lowrank_fed.aggregation.aggregate_modules`). A module some clients lack is
  aggregated over the clients that have it, with their weights renormalised over them (a missing module
  is no information, not a zero update); extras likewise, by :func:`~lowrank_fed.aggregation.weighted_average`.
- :func:`redistribute_adapter` gives a client its share at its own per-module ranks.
- :func:`save_peft_adapter` writes a folder ``PeftModel.from_pretrained`` loads: ``r`` = the most common
  rank, ``rank_pattern`` for the others, ``lora_B = B / s``.
"""

from __future__ import annotations

from .folders import CONFIG_FILE, WEIGHTS_BIN, WEIGHTS_FILE, Adapter, load_peft_adapter, save_peft_adapter
from .merging import MergeError, ModuleMerge, aggregate_adapters, average_extras, redistribute_adapter

__all__ = ["Adapter", "load_peft_adapter", "save_peft_adapter", "aggregate_adapters", "redistribute_adapter",
           "average_extras", "MergeError", "ModuleMerge", "CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_BIN"]
