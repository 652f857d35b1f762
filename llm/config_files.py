r"""Config files and ``--set`` overrides: TOML read into a dict (with ``tuned`` files merged), overrides applied.

The dict is then validated by :meth:`~lowrank_fed.llm.config.RunConfig.from_dict`. Errors are
:class:`~lowrank_fed.llm.config_errors.ConfigError` naming the file, the line or the key. Imports no torch.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config_entries import method_tables
from .config_errors import ConfigError, _show
from .config_model import RunConfig
from .methods.registry import REGISTRY

__all__ = ["parse_value", "TUNED_KEY", "tuned_paths", "load_config", "apply_overrides"]


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _read_toml(path: Path) -> dict:
    """One TOML file as a dict; ConfigError naming the file (missing, unreadable) or the line (not TOML)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file '{path}' not found.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Config file '{path}' cannot be read: {err}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # "... (at line L, column C)" or "... (at end of document)"
        found = re.search(r"at line (\d+)", str(err))
        line = int(found.group(1)) if found else max(1, len(text.splitlines()))
        raise ConfigError(f"Config file '{path}', line {line}: not valid TOML: {err}.") from None


#: The config key naming files of chosen hyper-parameters (``lowrank-fed tune``'s ``tuned.toml``) to merge in.
TUNED_KEY = "tuned"


def _tuned_entries(path: Path, data: dict) -> list[Path]:
    """The files ``data``'s ``tuned`` key names, resolved against the config file's folder."""
    raw = data[TUNED_KEY]
    files = [raw] if isinstance(raw, str) else raw
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
        raise ConfigError(f"Config key '{TUNED_KEY}' in '{path}': expected a path to a tuned.toml (relative to the "
                          f"config's folder) or a list of such paths; got {_show(raw)}.")
    return [Path(f) if Path(f).is_absolute() else path.parent / f for f in files]


def tuned_paths(path: str | Path | None) -> list[Path]:
    """The tuned files a config file's ``tuned`` key names (``[]`` for none); what :func:`load_config` merges."""
    if path is None:
        return []
    data = _read_toml(Path(path))
    return _tuned_entries(Path(path), data) if TUNED_KEY in data else []


def load_config(path: str | Path | None = None) -> dict:
    r"""The TOML file as a dict (``{}`` for no file), with the files its ``tuned`` key names merged in.

    ``tuned = "path/to/tuned.toml"`` (or a list of such paths), relative to the config file's folder, names
    files of chosen values (``lowrank-fed tune`` writes them): their ``[method]`` tables (and any top-level key)
    are merged into the config, and the ``tuned`` key itself is dropped, so a run stores the values it used. A
    value given in two places (the config and a tuned file, or two tuned files) is an error naming both.

    Raises
    ------
    ConfigError
        The file is missing or unreadable (naming the path), or not valid TOML (naming the file and
        the line); a ``tuned`` entry that is not a path, a tuned file that is missing, not TOML, names
        ``tuned`` itself or a key that is no config key or method table, or a value given twice.
    """
    if path is None:
        return {}
    path = Path(path)
    data = _read_toml(path)
    if TUNED_KEY not in data:
        return data
    files = _tuned_entries(path, data)
    for tuned in files:  # every named file exists before any is read: a config is never half-tuned
        if not tuned.is_file():
            raise ConfigError(f"Tuned file '{tuned}' not found (named by '{TUNED_KEY}' in '{path}'): write it first "
                              "with lowrank-fed tune (for configs/reproduce/: configs/reproduce/tune_all.sh, then "
                              "tune_all.sh --link), or remove the key.")
    del data[TUNED_KEY]
    where: dict[tuple[str, ...], Path] = {}  # each key set, and the file that set it

    def note(keys: tuple[str, ...], source: Path) -> None:
        if keys in where:
            shown = ".".join(keys)
            raise ConfigError(f"Config key '{shown}' is given both in '{where[keys]}' and in '{source}' (merged "
                              f"through '{TUNED_KEY}' of '{path}'); keep one of them.")
        where[keys] = source

    for key, value in data.items():
        if isinstance(value, Mapping) and key in REGISTRY:
            for option in value:
                note((key, option), path)
        else:
            note((key,), path)
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for tuned in files:
        chosen = _read_toml(tuned)
        for key, value in chosen.items():
            if key == TUNED_KEY:
                raise ConfigError(f"Tuned file '{tuned}' (named by '{TUNED_KEY}' in '{path}') names '{TUNED_KEY}' "
                                  "itself; a tuned file holds chosen values only.")
            if key in REGISTRY and isinstance(value, Mapping):
                for option, v in value.items():
                    note((key, option), tuned)
                    merged.setdefault(key, {})[option] = v
            elif key in RunConfig.model_fields and key != "method_options":
                note((key,), tuned)
                merged[key] = value
            else:
                raise ConfigError(f"Tuned file '{tuned}' (named by '{TUNED_KEY}' in '{path}'): key '{key}' is "
                                  f"neither a config key nor a method table ({method_tables()}).")
    return merged


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key=value`` strings (dotted keys for method tables) to a config dict.

    Raises
    ------
    ConfigError
        An item without ``=``, or a dotted key whose table is a plain value.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value. Got {item!r}.")
        value = parse_value(text.strip())
        if "." in key:
            table, sub = key.split(".", 1)
            if not isinstance(data.setdefault(table, {}), dict):
                raise ConfigError(f"Config key {key!r}: expected {table!r} to be a method table; "
                                  f"got {_show(data[table])}.")
            data[table][sub] = value
        else:
            data[key] = value
    return data

