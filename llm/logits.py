r"""The logits a causal LM's loss reads: from the position before the first labelled token on.

With labels ``y`` (shape ``(b, L)``, -100 where unlabelled) the loss reads the logits at positions
``t = f - 1, .., L - 2``, where ``f`` is the first position labelled in any row of the batch (the logits at ``t``
predict ``y_{t+1}``). transformers' causal LMs take ``logits_to_keep = k`` and apply their LM head to the last
``k`` positions only; with ``k = L - f + 1`` and the labels cut to their last ``k`` columns, the model's own
loss (it pads the labels by one and shifts them) pairs the same logits with the same labels. For an instruction
or headline task whose prompt is most of the sequence, that skips most of the LM head (a ``d x vocab`` product per
position, SmolLM2's largest single layer) and the softmax over the prompt's positions.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch

__all__ = ["keep_from", "takes_logits_to_keep", "tail_batch"]


@cache
def _class_takes(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under ``model`` (a PEFT model or a transformers one) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _class_takes(type(base))


def _head_trains(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head is None or any(p.requires_grad for p in head.parameters())


def keep_from(labels: torch.Tensor) -> int:
    """``k = L - f + 1``: the positions from the one before the batch's first labelled token ``f`` on, at most
    ``L`` (``f = 0``: position 0 has no logit before it, every position is kept) and at least 1 (nothing labelled)."""
    length = labels.shape[1]
    labelled = (labels != -100).any(dim=0)
    first = int(labelled.float().argmax()) if bool(labelled.any()) else length - 1
    return min(max(length - first + 1, 1), length)


def tail_batch(model, batch: dict) -> dict:
    """``batch`` for a causal LM's forward with its loss on the kept logits only: ``logits_to_keep = k`` and the
    labels' last ``k`` columns.

    Unchanged for a classifier (1-D labels), a model without ``logits_to_keep``, or one whose LM head trains
    (``copy-llama``'s pretraining): that weight's gradient sums over the positions, and summing fewer (the cut ones
    add zeros) changes its rounding. With the head frozen (LoRA) the gradients are those of every position, and on
    this CPU the adapters came out bit for bit (tested; a GEMM of another shape may round otherwise on other
    hardware); the loss's mean over the labelled tokens may differ in its last bits (its summation order).
    """
    labels = batch.get("labels")
    if labels is None or labels.ndim != 2 or not takes_logits_to_keep(model) or _head_trains(model):
        return batch
    keep = keep_from(labels)
    return {**batch, "labels": labels[:, labels.shape[1] - keep :], "logits_to_keep": keep}
