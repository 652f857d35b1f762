r"""Evaluation: per-example scores, their summaries (accuracy, macro-F1, perplexity), and ROUGE-L of greedy
generations.

One forward pass over an evaluation set gives per-example scores; every summary (the global score
and the score of any subset, e.g. a client's held-out rows ``R``) is computed from them:

- Classification, per example ``i``: ``pred_i = argmax_j logits_ij``, ``correct_i = [pred_i == y_i]`` and
  ``loss_i = -log softmax(logits_i)[y_i]``. Over rows ``R``: ``accuracy = (1/|R|) sum_{i in R} correct_i``,
  ``loss = (1/|R|) sum_{i in R} loss_i``, and ``macro_f1 = (1/|C|) sum_{c in C} 2 TP_c / (2 TP_c + FP_c + FN_c)``
  over the classes ``C`` that occur among the rows' labels or predictions (see :func:`macro_f1`).
- Causal LM, per example ``i``: ``nll_i = sum_t -log p(x_{i,t} | x_{i,<t})`` over the labelled (target)
  tokens (labels != -100, shifted by one) and ``tokens_i`` = their number. Over rows ``R`` the loss is
  token-weighted, ``loss = sum_{i in R} nll_i / max(sum_{i in R} tokens_i, 1)``, and
  ``perplexity = exp(min(loss, 50))``; with ``hits_i`` = the labelled tokens the argmax predicts
  (teacher forcing), ``token_accuracy = sum_R hits_i / sum_R tokens_i`` and
  ``exact_match = (1/|R|) sum_R [hits_i == tokens_i]``.
- ROUGE-L: mean F-measure of ``rouge-score``'s ``rougeL`` (with stemming) between greedy
  generations and the references.

A pass runs longest examples first (:func:`batch_plan`), so a batch pads little; its batches are also the unit
of :func:`eval_chunks`, which lets workers score one model's pass in pieces with the same numbers, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import make_batch
from .logits import keep_from, takes_logits_to_keep

__all__ = [
    "rouge_scores",
    "score_encoded",
    "SCORE_BATCH",
    "batch_plan",
    "eval_chunks",
    "score_classification",
    "score_lm",
    "summarise",
    "macro_f1",
    "evaluate_classification",
    "evaluate_lm",
    "greedy_generate",
    "rouge_l",
]

_CLASSIFICATION_KEYS = frozenset({"correct", "loss"})
_CLASSIFICATION_CLASSES = frozenset({"pred", "label"})  # optional, both or neither: macro-F1
_LM_KEYS = frozenset({"nll", "tokens"})
_LM_HITS = "hits"  # optional: tokens the argmax gets right (token accuracy, exact match)


def _n_examples(encoded: dict[str, torch.Tensor]) -> int:
    return int(encoded["labels"].shape[0])


#: Rows per forward pass of :func:`score_encoded`, by task. The chunks of :func:`eval_chunks` are unions of these
#: batches, so a model scored in chunks (on several workers) and in one pass gets the same numbers, bit for bit.
SCORE_BATCH = {"classification": 64, "generation": 16}


def batch_plan(encoded: dict[str, torch.Tensor], rows=None, batch_size: int = 64) -> list[np.ndarray]:
    r"""The batches of one scoring pass: positions into ``rows`` (all examples if None), longest first.

    The positions ``0 .. n-1`` are ordered by decreasing length (the attention mask's sum), ties by position, and
    cut into consecutive groups of ``batch_size``. Sorting keeps the padding of a batch (trimmed to its longest
    row by :func:`~.data.make_batch`) small; a plan depends on the lengths and ``batch_size`` only, and a subset
    made of whole batches of a plan, in plan order, has those same batches as its own plan.

    >>> import torch
    >>> enc = {"attention_mask": torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])}
    >>> [b.tolist() for b in batch_plan(enc, batch_size=2)]
    [[1, 3], [2, 0]]
    """
    lengths = encoded["attention_mask"].sum(dim=1).cpu().numpy()
    if rows is not None:
        lengths = lengths[np.asarray(rows, dtype=np.int64)]
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # last key first: by -length, then by position
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eval_chunks(encoded: dict[str, torch.Tensor], rows, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    r"""One scoring pass over ``rows`` (all examples if None) cut into its batches: ``(positions, row indices)``.

    Each chunk is one batch of :func:`batch_plan` at ``SCORE_BATCH[task]``, in plan order: ``positions`` index the
    pass's arrays (``rows``' order), ``row indices`` index ``encoded``. ``score_encoded(model, encoded, rows_chunk,
    task)`` computes exactly the numbers the whole pass computes for those rows, so chunks can be scored on
    different workers and scattered back by their positions without changing a bit.
    """
    index = np.arange(_n_examples(encoded)) if rows is None else np.asarray(rows, dtype=np.int64)
    return [(batch, index[batch]) for batch in batch_plan(encoded, rows, SCORE_BATCH[task])]


@torch.inference_mode()
def score_classification(model, encoded: dict[str, torch.Tensor], *,
                         batch_size: int = SCORE_BATCH["classification"]) -> dict[str, np.ndarray]:
    r"""Per-example ``pred_i = argmax_j logits_ij``, ``correct_i = [pred_i == y_i]`` and
    ``loss_i = -log softmax(logits_i)[y_i]``.

    Parameters
    ----------
    model : sequence classifier (``model(input_ids=..., attention_mask=...).logits``, shape (b, classes))
    encoded : dict of tensors
        ``input_ids``, ``attention_mask``, ``labels`` (shape (n,)), as from ``encode_classification``.
    batch_size : int
        Rows per forward pass, in the order of :func:`batch_plan` (longest first).

    Returns
    -------
    dict
        ``"correct"``: bool array, shape (n,); ``"loss"``: float64 array, shape (n,); ``"pred"`` (the
        argmax class) and ``"label"`` (``y``): int64 arrays, shape (n,). Summarise with :func:`summarise`,
        over all rows or any subset.
    """
    model.eval()
    device = next(model.parameters()).device
    n = _n_examples(encoded)
    correct, loss = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.float64)
    pred, label = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for rows in batch_plan(encoded, None, batch_size):
        batch = make_batch(encoded, rows, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        loss[rows] = ce.double().cpu().numpy()
        argmax = logits.argmax(dim=-1)
        correct[rows] = (argmax == labels).cpu().numpy()
        pred[rows], label[rows] = argmax.cpu().numpy(), labels.cpu().numpy()
    return {"correct": correct, "loss": loss, "pred": pred, "label": label}


@torch.inference_mode()
def score_lm(model, encoded: dict[str, torch.Tensor], *,
             batch_size: int = SCORE_BATCH["generation"]) -> dict[str, np.ndarray]:
    r"""Per-example ``nll_i = sum_t -log p(x_t | x_{<t})`` over the labelled tokens ``t``, and their number.

    The logits at position ``t`` predict the label at ``t + 1``; labels equal to -100 (prompt,
    padding) are not counted. A model that takes ``logits_to_keep`` (transformers' causal LMs) computes its LM
    head only from the position before a batch's first labelled token on (SmolLM2 on BBC headlines: 13.1 s
    instead of 18.5 s for 32 examples, the same NLLs bit for bit on this CPU), since the prompt's logits are
    never read.

    Parameters
    ----------
    model : causal LM (``model(input_ids=..., attention_mask=...).logits``, shape (b, L, vocab))
    encoded : dict of tensors
        ``input_ids``, ``attention_mask``, ``labels`` (shape (n, L), -100 where unlabelled), as from
        ``encode_generation``.
    batch_size : int
        Rows per forward pass, in the order of :func:`batch_plan` (longest first).

    Returns
    -------
    dict
        ``"nll"``: float64 array, shape (n,), the summed token NLL of each example; ``"tokens"``: int64
        array, shape (n,); ``"hits"``: int64 array, shape (n,), the labelled tokens whose argmax
        prediction is right. Summarise with :func:`summarise` (token-weighted).
    """
    model.eval()
    device = next(model.parameters()).device
    n = _n_examples(encoded)
    nll, tokens, hits = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    tail = takes_logits_to_keep(model)
    for rows in batch_plan(encoded, None, batch_size):
        batch = make_batch(encoded, rows, device)
        labels = batch.pop("labels")
        length = labels.shape[1]
        if tail:  # the LM head from the position before the first labelled token on (lowrank_fed.llm.logits)
            batch["logits_to_keep"] = keep_from(labels)
        logits = model(**batch).logits.float()  # (b, kept, vocab): positions length - kept .. length - 1
        shift_logits, shift_labels = logits[:, :-1, :], labels[:, length - logits.shape[1] + 1 :]
        ce = torch.nn.functional.cross_entropy(  # (b, L - 1), 0 where ignored
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        nll[rows] = ce.double().sum(dim=1).cpu().numpy()
        labelled = shift_labels != -100
        tokens[rows] = labelled.sum(dim=1).cpu().numpy()
        hits[rows] = ((shift_logits.argmax(dim=-1) == shift_labels) & labelled).sum(dim=1).cpu().numpy()
    return {"nll": nll, "tokens": tokens, "hits": hits}


def macro_f1(pred, label) -> float:
    r"""Macro-F1 of predicted classes ``pred`` against true classes ``label`` (int arrays of one length >= 1).

    ``macro_f1 = (1/|C|) sum_{c in C} F1_c`` with ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, where
    ``TP_c = #{i: pred_i = c = label_i}``, ``FP_c = #{i: pred_i = c != label_i}``,
    ``FN_c = #{i: pred_i != c = label_i}``, and ``C`` is the set of classes that occur among the labels or
    the predictions: a class with neither (``TP_c + FP_c + FN_c = 0``, F1 undefined) is skipped, so the
    value does not depend on how many classes the model has. Equals scikit-learn's
    ``f1_score(label, pred, average="macro")`` (which takes the same set of classes).

    Examples
    --------
    >>> import numpy as np
    >>> round(macro_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])), 6)  # (2/3 + 2/4 + 0) / 3; 2: one FP
    0.388889
    >>> macro_f1(np.array([3, 3]), np.array([3, 3]))  # classes 0-2 occur nowhere: skipped
    1.0
    """
    pred, label = np.asarray(pred).reshape(-1), np.asarray(label).reshape(-1)
    if pred.shape != label.shape or pred.size == 0:
        raise ValueError(f"The 'pred' and 'label' arrays must be 1-D of one length >= 1. Got shapes {pred.shape} "
                         f"and {label.shape}.")
    for name, a in (("pred", pred), ("label", label)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"The '{name}' array must hold integer class indices. Got dtype {a.dtype}.")
    classes = np.union1d(pred, label)
    hit = pred == label
    tp = np.array([np.sum(hit & (label == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum(~hit & (pred == c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum(~hit & (label == c)) for c in classes], dtype=np.float64)
    return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def summarise(scores: dict[str, np.ndarray], rows=None) -> dict[str, float]:
    r"""Summary of per-example scores over ``rows``: accuracy, loss and macro-F1, or token-weighted perplexity.

    Classification scores (``"correct"``, ``"loss"``, and ``"pred"``, ``"label"``):
    ``accuracy = mean_{i in R} correct_i``, ``loss = mean_{i in R} loss_i``, and
    ``macro_f1 = (1/|C|) sum_{c in C} 2 TP_c / (2 TP_c + FP_c + FN_c)`` counted over the rows ``R``, with ``C``
    the classes that occur among the rows' labels or predictions (a class with neither is skipped;
    :func:`macro_f1`); without ``"pred"`` and ``"label"`` no ``macro_f1``. LM scores (``"nll"``, ``"tokens"``):
    ``loss = sum_{i in R} nll_i / max(sum_{i in R} tokens_i, 1)``, ``perplexity = exp(min(loss, 50))``.

    Parameters
    ----------
    scores : dict of arrays
        From :func:`score_classification` or :func:`score_lm`.
    rows : int array or None
        Indices ``R`` into the scored examples (e.g. one client's held-out set); ``None`` means all.

    Returns
    -------
    dict
        ``{"accuracy", "loss", "macro_f1"}`` or ``{"perplexity", "loss"}`` (and ``"token_accuracy"``,
        ``"exact_match"`` when the LM scores have ``"hits"``), as floats.

    Raises
    ------
    ValueError
        If the score keys are neither set (``"pred"`` and ``"label"`` come both or neither), the score arrays
        differ in length, ``correct`` is not ``pred == label``, or ``rows`` is empty, not integer, or out of
        range.

    Examples
    --------
    >>> import numpy as np
    >>> s = {"correct": np.array([True, False, True, True]), "loss": np.array([0.1, 2.0, 0.3, 0.2]),
    ...      "pred": np.array([0, 0, 1, 1]), "label": np.array([0, 1, 1, 1])}
    >>> summarise(s)  # F1_0 = 2/(2+1+0), F1_1 = 4/(4+0+1)
    {'accuracy': 0.75, 'loss': 0.65, 'macro_f1': 0.7333333333333334}
    >>> summarise(s, np.array([1, 2]))  # F1_0 = 0/(0+1+0), F1_1 = 2/(2+0+1)
    {'accuracy': 0.5, 'loss': 1.15, 'macro_f1': 0.3333333333333333}
    >>> lm = {"nll": np.array([3.0, 1.0]), "tokens": np.array([3, 1])}
    >>> summarise(lm)["loss"]  # (3 + 1) / (3 + 1), weighted by tokens
    1.0
    """
    keys = frozenset(scores) - {_LM_HITS} if _LM_HITS in scores and "nll" in scores else frozenset(scores)
    if keys == _CLASSIFICATION_KEYS | _CLASSIFICATION_CLASSES:
        keys = _CLASSIFICATION_KEYS
    if keys not in (_CLASSIFICATION_KEYS, _LM_KEYS):
        raise ValueError(
            f"The 'scores' parameter must have the keys {sorted(_CLASSIFICATION_KEYS)} (classification, with "
            f"{sorted(_CLASSIFICATION_CLASSES)} both or neither) or "
            f"{sorted(_LM_KEYS)} (LM). Got {sorted(keys)}."
        )
    arrays = {k: np.asarray(v) for k, v in scores.items()}
    lengths = {k: v.shape for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or any(len(s) != 1 for s in lengths.values()):
        raise ValueError(f"The 'scores' arrays must be 1-D of one length. Got shapes {lengths}.")
    n = next(iter(lengths.values()))[0]
    if rows is None:
        rows = np.arange(n)
    rows = np.asarray(rows).reshape(-1)
    if rows.size == 0:
        raise ValueError("The 'rows' parameter must select at least one example. Got an empty index array.")
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"The 'rows' parameter must be an integer index array. Got dtype {rows.dtype}.")
    if rows.min() < 0 or rows.max() >= n:
        raise ValueError(
            f"The 'rows' parameter must index the {n} scored examples, in [0, {n - 1}]. "
            f"Got values in [{rows.min()}, {rows.max()}]."
        )
    if keys == _CLASSIFICATION_KEYS:
        out = {
            "accuracy": float(np.mean(arrays["correct"][rows], dtype=np.float64)),
            "loss": float(np.mean(arrays["loss"][rows], dtype=np.float64)),
        }
        if "pred" in arrays:
            differ = int(np.sum(arrays["correct"] != (arrays["pred"] == arrays["label"])))
            if differ:
                raise ValueError("The 'scores' arrays must agree: 'correct' must equal 'pred' == 'label'. "
                                 f"Got {differ} examples where they differ.")
            out["macro_f1"] = macro_f1(arrays["pred"][rows], arrays["label"][rows])
        return out
    nll = float(np.sum(arrays["nll"][rows], dtype=np.float64))
    tokens = int(np.sum(arrays["tokens"][rows]))
    loss = nll / max(tokens, 1)
    out = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}
    if _LM_HITS in arrays:
        hits = arrays[_LM_HITS][rows]
        out["token_accuracy"] = float(np.sum(hits)) / max(tokens, 1)
        out["exact_match"] = float(np.mean(hits == arrays["tokens"][rows], dtype=np.float64))
    return out


def evaluate_classification(model, encoded: dict[str, torch.Tensor], *,
                            batch_size: int = SCORE_BATCH["classification"]) -> dict[str, float]:
    r"""``{"accuracy", "loss", "macro_f1"}`` of a classifier: ``summarise(score_classification(...))``."""
    return summarise(score_classification(model, encoded, batch_size=batch_size))


def evaluate_lm(model, encoded: dict[str, torch.Tensor], *, batch_size: int = SCORE_BATCH["generation"]) -> dict[str, float]:
    r"""``{"perplexity", "loss"}``, token-weighted over the labelled tokens: ``summarise(score_lm(...))``."""
    return summarise(score_lm(model, encoded, batch_size=batch_size))


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


def rouge_scores(predictions: list[str], references: list[str]) -> np.ndarray:
    r"""Per-example ROUGE-L F-measure (``rouge_score``, ``rougeL``, stemming on), float64."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(f"Need equally many predictions and references. Got {len(predictions)} and {len(references)}.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references, strict=True)], dtype=np.float64)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    r"""Mean ROUGE-L F-measure: the mean of :func:`rouge_scores`."""
    return float(np.mean(rouge_scores(predictions, references)))


def score_encoded(model, enc: dict[str, torch.Tensor], rows, task: str) -> dict[str, np.ndarray]:
    """Per-example scores of ``model`` on the encoded examples ``enc`` (only ``rows`` of them, if given, in that
    order), in batches of ``SCORE_BATCH[task]``."""
    if rows is not None:
        enc = {k: v[torch.as_tensor(rows, dtype=torch.long)] for k, v in enc.items()}
    score = score_classification if task == "classification" else score_lm
    return score(model, enc)
