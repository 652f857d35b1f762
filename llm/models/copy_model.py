r"""``copy-llama``: a one-layer Llama pretrained to copy ``copy_sub`` texts (CLAIR's base ``W0``), cached.

Its tokenizer has a fixed vocabulary (:func:`copy_tokenizer`); its copy pretraining (:func:`pretrain_copy`) is
the one local training loop (:func:`~lowrank_fed.llm.training.train_local`) on all weights, with hooks for the
learning-rate schedule, the clipping and the loss record; it runs once and is cached under
``$LOWRANK_FED_CACHE`` in a folder named by a hash of every hyper-parameter, the seed and the vocabulary
(:func:`copy_llama`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..data.copy_task import COPY_SUB_WORDS
from ..evaluate import score_lm, summarise
from ..packages import cache_dir
from ..streams import COPY_PRETRAIN_BATCHES, COPY_PRETRAIN_EVAL, COPY_PRETRAIN_INIT
from ..training import Hook, train_local
from .packaged import _quiet_transformers
from .tiny import word_tokenizer

__all__ = ["COPY_LLAMA", "copy_tokenizer", "copy_examples", "pretrain_copy", "copy_llama"]


#: ``copy-llama``: the model's shape and its copy pretraining (every entry keys the cache).
COPY_LLAMA = {
    "hidden": 64, "layers": 1, "heads": 4, "intermediate": 128, "length": 12,
    "steps": 500, "batch_size": 64, "lr": 3e-3, "warmup": 50, "weight_decay": 0.01,
}
_COPY_FORMAT = 1  # bump when the pretraining code changes what it produces


def copy_tokenizer():
    r"""The word-level causal tokenizer of ``copy-llama``: a fixed vocabulary, not one built from texts.

    ``[PAD] [UNK] [CLS] [SEP] [EOS] article : headline t0 .. t63`` (ids 0 .. 71), the words of the
    ``encode_generation`` prompt followed by :data:`~lowrank_fed.llm.data.COPY_SUB_WORDS`.
    """
    return word_tokenizer([" ".join(["article", ":", "headline", *COPY_SUB_WORDS])], causal=True)


def copy_examples(tokenizer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Identity-copy examples in ``encode_generation``'s format, built from word indices directly.

    Row ``x`` (indices into ``COPY_SUB_WORDS``, shape ``(n, length)``) becomes
    ``article : x headline : x [EOS]`` with labels ``-100`` on the prompt and ``x [EOS]`` on the
    target: exactly ``encode_generation(tok, texts, texts, 2 * length + 5)`` (no padding), without
    tokenising strings (pretraining draws a fresh batch every step).
    """
    vocab = tokenizer.get_vocab()
    offset = vocab[COPY_SUB_WORDS[0]]
    n, length = ids.shape
    head = torch.tensor([vocab["article"], vocab[":"]]).expand(n, 2)
    tail = torch.tensor([vocab["headline"], vocab[":"]]).expand(n, 2)
    eos = torch.full((n, 1), tokenizer.eos_token_id)
    x = ids.to(torch.int64) + offset
    input_ids = torch.cat([head, x, tail, x, eos], dim=1)
    labels = input_ids.clone()
    labels[:, : length + 4] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _copy_config(vocab_size: int, hp: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hp["hidden"], intermediate_size=hp["intermediate"],
        num_hidden_layers=hp["layers"], num_attention_heads=hp["heads"], num_key_value_heads=hp["heads"],
        max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=4, tie_word_embeddings=True,
    )


class _CopySchedule(Hook):
    r"""``pretrain_copy``'s per-step extras on the one training loop: the learning-rate schedule, the clipping, the loss.

    Before the first step it wraps the loop's optimiser in ``LambdaLR(schedule)`` (steps after each optimiser
    step); after each backward pass it clips the gradient norm of ``model.parameters()`` (in the model's order) to
    ``max_norm``; its forward pass is ``model(**batch)``, keeping the last loss (``train_local`` reports the mean).
    """

    def __init__(self, model: torch.nn.Module, schedule, max_norm: float):
        self.model, self.schedule, self.max_norm = model, schedule, max_norm
        self.sched, self.loss = None, float("nan")

    def forward(self, step, model, batch):
        out = model(**batch)
        self.loss = out.loss
        return out

    def after_backward(self, step: int) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.sched is None:
            self.sched = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)

    def after_step(self, step: int) -> None:
        self.sched.step()
        self.loss = float(self.loss.detach())


def pretrain_copy(model, tokenizer, *, length: int, steps: int, batch_size: int, lr: float, warmup: int,
                  weight_decay: float, seed: int, n_eval: int = 512) -> dict:
    r"""Train ``model`` (all weights) to copy: target = the text, in ``encode_generation``'s format.

    Every step draws ``batch_size`` fresh texts of ``length`` words uniform over ``COPY_SUB_WORDS``
    (NumPy, stream ``COPY_PRETRAIN_BATCHES``: ``default_rng([seed, 1])``), the loss is the target tokens'
    cross-entropy; AdamW (``betas = (0.9, 0.98)``, weight decay on the matrices only) with ``lr`` warmed up
    linearly over ``warmup`` steps, then a cosine decay to ``lr / 10``,

    .. math:: \eta_t = \eta \cdot \begin{cases} (t + 1) / w & t < w \\
              0.1 + 0.45\,(1 + \cos(\pi (t - w) / \max(T - w, 1))) & t \ge w \end{cases}

    and the gradient norm clipped to 1. The steps are :func:`~lowrank_fed.llm.training.train_local`'s, the
    schedule, the clipping and the last loss a hook (:class:`_CopySchedule`); the result is bit for bit that of
    the earlier hand-written loop (the cache key holds no code version: see ``_COPY_FORMAT``). No dropout and
    no torch randomness (the data come from NumPy), one CPU thread (restored afterwards): the result depends
    on the initial weights, ``seed`` and the hyper-parameters only. Returns the held-out identity-copy
    ``accuracy`` and ``exact`` match over ``n_eval`` texts from ``COPY_PRETRAIN_EVAL``
    (``default_rng([seed, 2])``), the final ``loss`` and the ``seconds`` taken.
    """
    n_words = len(COPY_SUB_WORDS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        rng = COPY_PRETRAIN_BATCHES.rng(seed)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        other = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "betas": (0.9, 0.98)},
                  {"params": other, "weight_decay": 0.0, "lr": lr, "betas": (0.9, 0.98)}]

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(steps - warmup, 1)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

        batches = (copy_examples(tokenizer, torch.from_numpy(rng.integers(0, n_words, size=(batch_size, length))))
                   for _ in range(steps))
        hook = _CopySchedule(model, schedule, 1.0)
        train_local(model, batches, groups, hooks=[hook])
        held = copy_examples(tokenizer, torch.from_numpy(
            COPY_PRETRAIN_EVAL.rng(seed).integers(0, n_words, size=(n_eval, length))))
        scores = summarise(score_lm(model, held, batch_size=256))
        acc, exact = scores["token_accuracy"], scores["exact_match"]
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return {"accuracy": acc, "exact": exact, "loss": hook.loss, "seconds": time.perf_counter() - start}


def copy_llama(*, seed: int = 0, cache: Path | None = None, dtype: torch.dtype = torch.float32, **overrides):
    r"""``copy-llama``: a small ``LlamaForCausalLM`` pretrained to copy ``copy_sub`` texts (the base ``W0``).

    The shape and pretraining are :data:`COPY_LLAMA` updated with ``overrides`` (``hidden``,
    ``layers``, ``heads``, ``intermediate``; ``length``, ``steps``, ``batch_size``, ``lr``,
    ``warmup``, ``weight_decay``: see :func:`pretrain_copy`). Initialisation (``torch.manual_seed(seed)``
    inside a forked RNG) and pretraining depend on ``seed`` only. The result is saved with
    ``save_pretrained`` to ``cache / "copy-llama-<hash>"``, the hash (SHA-256) of the format version,
    the hyper-parameters, the seed and the tokenizer's vocabulary, written to a temporary folder
    and renamed into place; later calls load it (< 1 s). ``pretrain.json`` there holds the
    hyper-parameters and :func:`pretrain_copy`'s statistics.

    Returns
    -------
    model, tokenizer, info : dict
        ``info``: the contents of ``pretrain.json`` plus ``path``.

    Notes
    -----
    Design, measured (seed 0, 6 benign clients on ``sigma`` and 3 on ``tau``, one group each, 48
    examples, LoRA rank 4, 40 AdamW steps of 8 at lr 5e-3, about 0.1 s a client): one layer and LoRA
    on ``o_proj`` only. With two layers the first layer's updates were noise (benign pairs'
    ``sin_theta`` of top-``r`` left subspaces 0.8-1.0) and ``v_proj`` / ``o_proj`` split the work
    differently from client to client; with one layer and ``o_proj``, benign pairs have
    ``sin_theta`` about 0.3-0.45 (r = 1, 2) and benign-contaminated pairs 0.99-1.00. Pretraining
    reaches 1.00 held-out token accuracy in about 7 s on one thread (100 steps already do).
    """
    from transformers import LlamaForCausalLM

    unknown = sorted(set(overrides) - set(COPY_LLAMA))
    if unknown:
        raise ValueError(f"Unknown copy-llama hyper-parameter(s) {unknown}; expected some of {sorted(COPY_LLAMA)}.")
    hp = {**COPY_LLAMA, **overrides}
    _quiet_transformers()
    tokenizer = copy_tokenizer()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    key = json.dumps({"format": _COPY_FORMAT, "seed": int(seed), "hp": hp, "vocab": vocab}, sort_keys=True)
    target = (cache or cache_dir()) / f"copy-llama-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (target / "pretrain.json").exists():
        with torch.random.fork_rng():
            torch.manual_seed(COPY_PRETRAIN_INIT.seed(seed))
            model = LlamaForCausalLM(_copy_config(len(tokenizer), hp))
            stats = pretrain_copy(model, tokenizer, seed=seed, **{k: hp[k] for k in (
                "length", "steps", "batch_size", "lr", "warmup", "weight_decay")})
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-llama-"))
        try:
            model.save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps({"seed": int(seed), **hp, **stats}, indent=1))
            if not (target / "pretrain.json").exists():
                if target.exists():
                    shutil.rmtree(target)
                try:
                    os.replace(tmp, target)
                except OSError:  # another process renamed its copy into place first
                    if not (target / "pretrain.json").exists():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlamaForCausalLM.from_pretrained(target, local_files_only=True, dtype=dtype)
    info = {**json.loads((target / "pretrain.json").read_text()), "path": str(target)}
    return model, tokenizer, info
