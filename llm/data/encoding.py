r"""Tokenised tensors: classification and causal-LM examples, and batches of their rows."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["encode_classification", "encode_generation", "pack_prompts", "make_batch", "PROMPT"]


def encode_classification(tokenizer, texts, labels, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids, attention masks (right-padded to ``max_length``) and labels as tensors."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].to(torch.int64),
        "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64),
    }


PROMPT = "Article: {text}\nHeadline:"


def encode_generation(tokenizer, texts, targets, max_length: int, *, max_target: int = 32) -> dict[str, torch.Tensor]:
    r"""Causal-LM examples ``prompt + " " + target + eos``, loss on the target only.

    The prompt is ``"Article: {text}\nHeadline:"`` with the article truncated so the whole example
    fits ``max_length``. Returns ``input_ids``, ``attention_mask`` (right-padded), ``labels`` (-100
    on prompt and padding), and ``prompt_ids`` / ``prompt_mask`` (left-padded, for generation).
    """
    eos = tokenizer.eos_token_id
    head = tokenizer("Article:", add_special_tokens=False)["input_ids"]
    tail = tokenizer("\nHeadline:", add_special_tokens=False)["input_ids"]
    rows = []
    for text, target in zip(texts, targets, strict=True):
        t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"][: max_target - 1] + [eos]
        room = max(max_length - len(head) - len(tail) - len(t_ids), 1)
        a_ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:room]
        prompt = head + a_ids + tail
        rows.append((prompt, t_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return pack_prompts(rows, pad)


def pack_prompts(rows, pad: int) -> dict[str, torch.Tensor]:
    r"""Token-id pairs ``(p_i, t_i)`` (prompt, target) as causal-LM tensors: ``input_ids`` ``p_i + t_i`` and
    ``attention_mask``, right-padded with ``pad`` to ``L = max_i |p_i| + |t_i|``; ``labels`` ``-100`` except on
    ``t_i`` (the loss on the target only); ``prompt_ids`` / ``prompt_mask``, ``p_i`` left-padded to ``max_i |p_i|``
    (for greedy generation). The one packing of the packaged headlines and of a user's instructions."""
    n = len(rows)
    L = max((len(p) + len(t) for p, t in rows), default=1)
    P = max((len(p) for p, _ in rows), default=1)
    ids = torch.full((n, L), pad, dtype=torch.int64)
    mask = torch.zeros((n, L), dtype=torch.int64)
    labels = torch.full((n, L), -100, dtype=torch.int64)
    p_ids = torch.full((n, P), pad, dtype=torch.int64)
    p_mask = torch.zeros((n, P), dtype=torch.int64)
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
        p_ids[i, P - len(p) :] = torch.tensor(p)
        p_mask[i, P - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_ids": p_ids, "prompt_mask": p_mask}


def make_batch(encoded: dict[str, torch.Tensor], idx, device=None) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the model inputs, trimmed to the longest sequence among them (moved to ``device``)."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
    mask = encoded["attention_mask"][idx]
    length = max(int(mask.sum(dim=1).max()), 1)
    batch = {"input_ids": encoded["input_ids"][idx, :length], "attention_mask": mask[:, :length]}
    labels = encoded["labels"][idx]
    batch["labels"] = labels[:, :length] if labels.ndim == 2 else labels
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
