r"""The user's own model: a Hugging Face folder, or a hub name in the local cache, loaded through the Auto classes.

``model = "PATH"`` names a folder holding ``config.json``, its weights and its tokenizer; any other name that is not
packaged is a hub name, resolved from the local Hugging Face cache only
(:func:`~lowrank_fed.llm.sources.resolve_model`; nothing is downloaded). :func:`user_spec` reads the folder's
``config.json`` and gives the run what a packaged model's :class:`~lowrank_fed.llm.catalog.ModelSpec` gives:

- the **task**: ``cfg.task``, else inferred from ``architectures`` (:func:`~lowrank_fed.llm.sources.model_task`);
  it must fit the ``model_type``: ``generation`` needs a causal-LM class of transformers
  (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and a decoder (an ``architectures`` entry ending in ``ForCausalLM`` or
  ``LMHeadModel``, or ``is_decoder = true``), so a BERT encoder is refused; ``classification`` needs a
  sequence-classification class (``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``);
- the **LoRA targets**: ``cfg.target_modules``, else PEFT's own per-architecture default
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]``), the modules ``get_peft_model`` would adapt.

:func:`load_user_model` builds it: ``AutoModelForSequenceClassification`` with ``num_labels`` (a head of that shape
saved in the folder is kept; otherwise a new one is drawn with torch's generator seeded from
``MODEL_INIT.seed(seed)``, as MiniLM's, so one seed gives one head) or ``AutoModelForCausalLM``, and
``AutoTokenizer`` from the same folder (``local_files_only``; one of :data:`TOKENIZER_FILES` must be there); a
tokenizer without a pad token pads with its
end-of-sequence token. Every problem is a :class:`~lowrank_fed.llm.config_errors.ConfigError` naming the key
(``model``, ``task`` or ``target_modules``) and the ``config.json`` read, raised at set-up, before anything is
written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..catalog import MODELS, ModelSpec
from ..config_errors import ConfigError
from ..sources import model_task, resolve_model
from ..streams import MODEL_INIT

__all__ = ["model_spec", "user_spec", "load_user_model", "base_model_name", "enable_gradient_checkpointing"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")

#: A model folder's tokenizer: any one of these files (what ``save_pretrained`` of a tokenizer writes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _fail(key: str, expected: str, value) -> ConfigError:
    return ConfigError.from_errors([(key, expected, value)])


def _config(name: str) -> tuple[Path, dict]:
    try:
        folder = resolve_model(name)
    except ValueError as err:
        raise _fail("model", str(err).removeprefix(f"Model {name!r}: expected ").rstrip("."), name) from None
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail("model", f"a model folder whose config.json is JSON ({path}: {err})", name) from None
    if not isinstance(config, dict):
        raise _fail("model", f"a model folder whose config.json is a JSON object ({path})", name)
    return path, config


def user_spec(name: str, task: str | None = None, target_modules=None) -> ModelSpec:
    r"""The :class:`ModelSpec` of the user's model ``name`` (a folder or a cached hub name): its task and LoRA targets.

    Parameters
    ----------
    name : str
        A model folder or a hub name in the local cache.
    task : {"classification", "generation"}, optional
        The config's ``task``; None: inferred from ``architectures``.
    target_modules : list of str, optional
        The config's ``target_modules``; empty: PEFT's default for the ``model_type``.

    Raises
    ------
    ConfigError
        ``model``: not found, ``config.json`` unreadable, or a ``model_type`` transformers does not know;
        ``task``: no task given and none inferable, or a task the model type has no class for;
        ``target_modules``: none given and PEFT has no default for the ``model_type``.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    path, config = _config(name)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise _fail("model", f"a model whose config.json names a model_type transformers knows ({path} has "
                             f"model_type {model_type!r})", name)
    try:
        chosen = model_task(name, task)
    except ValueError as err:
        raise _fail("task", f"a task for model {name!r} ({err})", task) from None
    key, value = ("task", task) if task is not None else ("model", name)
    archs = [str(a) for a in config.get("architectures") or []]
    if chosen == "generation":
        decoder = config.get("is_decoder") is True or any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not decoder):
            raise _fail(key, f"a task that fits model {name!r}: 'generation' needs a causal language model, and "
                             f"{path} is model_type {model_type!r} with architectures {archs} (not a decoder); "
                             f"use task = \"classification\" or another model", value)
    elif model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise _fail(key, f"a task that fits model {name!r}: 'classification' needs a sequence-classification "
                         f"class, and transformers has none for model_type {model_type!r} ({path})", value)
    targets = tuple(target_modules or ())
    if not targets:
        default = PEFT_TARGETS.get(model_type)
        if not default:
            raise _fail("target_modules", f"the modules to adapt: PEFT has no default for model_type "
                                          f"{model_type!r} ({path}); set target_modules = [...] (e.g. the "
                                          f"attention projections' names)", list(targets))
        targets = tuple(default)
    return ModelSpec(name, chosen, targets, None, f"{model_type} from {path.parent}")


def model_spec(name: str, task: str | None = None, target_modules=None) -> ModelSpec:
    """A packaged model's :data:`MODELS` entry, else :func:`user_spec` (the packaged spec never reads ``task`` or
    ``target_modules``: the config check makes them agree)."""
    return MODELS[name] if name in MODELS else user_spec(name, task, target_modules)


def base_model_name(name: str) -> str:
    """A PEFT adapter's ``base_model_name_or_path`` for model ``name``: a packaged model's hub name (or
    ``lowrank-fed:NAME``), a folder's absolute path, or the hub name as given."""
    if name in MODELS:
        return MODELS[name].hub or f"lowrank-fed:{name}"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_user_model(name: str, *, task: str, num_labels: int | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    r"""The user's model and tokenizer through transformers' Auto classes, from local files only.

    ``classification``: ``AutoModelForSequenceClassification`` with ``num_labels`` outputs; a head of that shape saved
    in the folder is loaded, any other (missing, or another number of labels) is drawn anew with torch's generator
    seeded ``MODEL_INIT.seed(seed)`` (the global generator is left as it was). ``generation``:
    ``AutoModelForCausalLM``. The tokenizer pads with its end-of-sequence token when it has no pad token, and the
    model's ``pad_token_id`` is set to it when missing (a decoder's classifier reads the last non-pad token).

    Returns
    -------
    model, tokenizer

    Raises
    ------
    ConfigError
        ``model``: the folder has no tokenizer file (:data:`TOKENIZER_FILES`), a tokenizer with neither pad nor end-of-sequence token, or weights
        transformers cannot load (the message names the folder).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = resolve_model(name)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer (special tokens only) from config.json alone
        raise _fail("model", f"a model folder holding its tokenizer (one of {', '.join(TOKENIZER_FILES)}; none in "
                             f"{folder}: save it with tokenizer.save_pretrained)", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise _fail("model", f"a model folder holding its tokenizer ({folder}: {str(err).splitlines()[0]})",
                    name) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise _fail("model", f"a tokenizer with a pad or end-of-sequence token (the one in {folder} has "
                                 f"neither)", name)
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MODEL_INIT.seed(seed))
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=num_labels, local_files_only=True, dtype=dtype, ignore_mismatched_sizes=True)
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _fail("model", f"a {task} model transformers can load from {folder} "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})", name) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    r"""Recompute each layer's activations in the backward pass instead of keeping them (``gradient_checkpointing =
    true``): the same loss and gradients, less memory, about one more forward pass of time.

    transformers' non-reentrant checkpointing (``use_reentrant=False``: dropout masks are replayed from the saved RNG
    state, so the recomputed forward equals the first), and ``enable_input_require_grads`` so the checkpointed
    layers see an input that requires grad while every base weight is frozen (what PEFT's
    ``prepare_model_for_kbit_training`` does).

    Raises
    ------
    ConfigError
        ``gradient_checkpointing``: the model's class does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise _fail("gradient_checkpointing", f"false for {type(model).__name__} (transformers does not support "
                                              f"gradient checkpointing for it)", True)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
