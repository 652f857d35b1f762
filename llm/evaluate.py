r"""Evaluation: accuracy, perplexity, and ROUGE-L of greedy generations.

- Accuracy: ``mean(argmax logits == label)``; also the mean cross-entropy.
- Perplexity: ``exp(sum NLL / number of target tokens)`` over the labelled tokens (labels != -100).
- ROUGE-L: mean F-measure of ``rouge-score``'s ``rougeL`` (with stemming) between greedy
  generations and the references.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import make_batch

__all__ = ["evaluate_classification", "evaluate_lm", "greedy_generate", "rouge_l"]


@torch.no_grad()
def evaluate_classification(model, encoded: dict[str, torch.Tensor], *, batch_size: int = 64) -> dict[str, float]:
    """``{"accuracy", "loss"}`` of a sequence classifier on encoded examples."""
    model.eval()
    device = next(model.parameters()).device
    n = int(encoded["labels"].shape[0])
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        batch = make_batch(encoded, np.arange(start, min(start + batch_size, n)), device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return {"accuracy": correct / n, "loss": loss_sum / n}


@torch.no_grad()
def evaluate_lm(model, encoded: dict[str, torch.Tensor], *, batch_size: int = 16) -> dict[str, float]:
    """``{"perplexity", "loss"}``: token-weighted NLL over the labelled (target) tokens."""
    model.eval()
    device = next(model.parameters()).device
    n = int(encoded["labels"].shape[0])
    nll, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        batch = make_batch(encoded, np.arange(start, min(start + batch_size, n)), device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"))
        tokens += int((shift_labels != -100).sum())
    loss = nll / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int = 24,
                    batch_size: int = 8) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded up to the first end-of-sequence token."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    for start in range(0, prompt_ids.shape[0], batch_size):
        ids, mask = prompt_ids[start : start + batch_size], prompt_mask[start : start + batch_size]
        keep = int(mask.sum(dim=1).max())  # drop all-padding columns on the left
        ids, mask = ids[:, -keep:].to(device), mask[:, -keep:].to(device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, ids.shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    r"""Mean ROUGE-L F-measure (``rouge_score``, ``rougeL``, stemming on)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(f"Need equally many predictions and references. Got {len(predictions)} and {len(references)}.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]))
