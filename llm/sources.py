r"""Where a run's model, data and starting adapter come from, checked before anything heavy is imported.

A run config names its model, its data and optionally a starting adapter either by a packaged name
(:data:`~lowrank_fed.llm.catalog.MODELS`, :data:`~lowrank_fed.llm.catalog.DATASETS`) or by the user's own files:

- a **model** folder holding a Hugging Face model (``config.json`` and its weights: ``*.safetensors``,
  ``pytorch_model*.bin``, or a sharded index), or a hub name found in the local Hugging Face cache
  (:func:`resolve_model`; nothing is ever downloaded);
- a **data** file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) or a ``datasets`` ``save_to_disk`` folder
  (:func:`data_problem`);
- a PEFT **adapter** folder (``adapter_config.json`` and ``adapter_model.safetensors`` or ``.bin``)
  (:func:`adapter_problem`).

Each ``*_problem`` function returns what was expected when the value does not name such a thing (the config turns
it into ``Config key 'KEY': expected ...; got ...``), or None. Only the file system and the cache's index are read:
no torch, transformers or ``datasets`` import, so a wrong path is reported within the config check's time.
Relative paths are relative to the working directory; a validated config holds them absolute (:func:`absolute`), so
``config.json``, ``--resume`` and Flower's processes (which run in other folders) name the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .catalog import DATASETS, MODELS

__all__ = ["DATA_SUFFIXES", "WEIGHT_FILES", "is_packaged_model", "is_packaged_dataset", "resolve_model",
           "model_problem", "data_problem", "adapter_problem", "model_task", "absolute"]

#: The data files a ``dataset`` or ``[[clients]]`` ``data`` may name, by suffix (the ``datasets`` builder that reads
#: them).
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

#: A model folder's weights: any one of these names (globs) is enough.
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def absolute(path_text: str) -> str:
    """``path_text`` as an absolute path (``~`` expanded, relative to the working directory); the file need not exist."""
    return str(Path(path_text).expanduser().resolve())


def is_packaged_model(name: str) -> bool:
    """Whether ``name`` is a packaged model's name (not a folder or a hub name)."""
    return name in MODELS


def is_packaged_dataset(name: str) -> bool:
    """Whether ``name`` is a packaged dataset's name (not a file or a folder)."""
    return name in DATASETS


def _hub_cache() -> Path:
    from huggingface_hub import constants  # light: no torch; only for names that are not packaged or a folder

    return Path(constants.HF_HUB_CACHE)


def resolve_model(name: str) -> Path:
    r"""The folder of a user's model: ``name`` itself when it is a folder, else the hub name's snapshot in the
    local Hugging Face cache (``huggingface_hub.snapshot_download(..., local_files_only=True)``: never downloads).

    Raises
    ------
    ValueError
        ``name`` is neither a folder holding ``config.json`` and weights nor a hub name in the local cache; the
        message names the folder or the cache that was searched.
    """
    problem = model_problem(name)
    if problem is not None:
        raise ValueError(f"Model {name!r}: expected {problem}.")
    return _model_folder(name)


def _model_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True))


def _folder_problem(path: Path) -> str | None:
    if not (path / "config.json").is_file():
        return f"a model folder holding config.json (none in {path})"
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        return (f"a model folder holding its weights ({', '.join(WEIGHT_FILES)}); {path} has config.json but no "
                f"weights")
    return None


def model_problem(name: str) -> str | None:
    """What ``model = name`` should have been, or None when it names a packaged model, a model folder or a hub name
    in the local cache."""
    if is_packaged_model(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_problem(path)
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1
    if looks_like_path:
        return (f"a packaged model ({', '.join(MODELS)}), a model folder or a hub name in the local cache; no "
                f"folder {path.resolve()} exists")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return (f"a packaged model ({', '.join(MODELS)}), a model folder, or a hub name in the local Hugging Face "
                f"cache {_hub_cache()} (offline: nothing is downloaded; {name!r} is not there)")
    return _folder_problem(folder)


def data_problem(path_text: str) -> str | None:
    """What a data path should have been, or None when it is a file with a known suffix or a folder."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                or (path / "state.json").is_file()):
            return f"a data file or a `datasets` save_to_disk folder; {path} is a folder without dataset_info.json"
        return None
    if not path.is_file():
        return f"an existing data file or folder; {path.resolve()} does not exist"
    if path.suffix.lower() not in DATA_SUFFIXES:
        return f"a data file ending in {', '.join(DATA_SUFFIXES)} or a save_to_disk folder; got suffix {path.suffix!r}"
    if path.stat().st_size == 0:
        return f"a data file with rows; {path} is empty"
    return None


def adapter_problem(path_text: str) -> str | None:
    """What ``init_adapter`` should have been, or None when it is a PEFT adapter folder."""
    path = Path(path_text).expanduser()
    if not path.is_dir():
        return f"a PEFT adapter folder; {path.resolve()} is not a folder"
    if not (path / "adapter_config.json").is_file():
        return f"a PEFT adapter folder holding adapter_config.json (none in {path})"
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return f"a PEFT adapter folder holding adapter_model.safetensors or adapter_model.bin (none in {path})"
    return None


def model_task(name: str, task: str | None = None) -> str:
    r"""The task a run of model ``name`` trains: ``task`` when given, the packaged model's, else inferred from the
    folder's ``config.json``: an ``architectures`` entry ending in ``ForCausalLM`` or ``LMHeadModel`` is
    ``generation``; one ending in ``ForSequenceClassification``, ``ForMaskedLM`` or ``Model`` (an encoder, which gets
    a new classification head) is ``classification``.

    Raises
    ------
    ValueError
        The model is not found (:func:`resolve_model`), or its architecture names neither task (set ``task``).
    """
    if task is not None:
        return task
    if is_packaged_model(name):
        return MODELS[name].task
    config = json.loads((resolve_model(name) / "config.json").read_text(encoding="utf-8"))
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "generation"
    if any(a.endswith(("ForSequenceClassification", "ForMaskedLM", "Model")) for a in archs):
        return "classification"
    raise ValueError(f"Model {name!r}: cannot tell its task from its architectures {archs} (config.json); set "
                     f"task = \"classification\" or \"generation\".")
