r"""Atomic text writes (no torch): a reader sees the old file or the whole new one, never part of a write."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text"]


def _fsync(path: Path) -> None:
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):  # Windows cannot fsync a directory
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if path.is_dir() else os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    r"""Write ``text`` (UTF-8) to ``path`` via ``path.tmp``, fsync and :func:`os.replace`; return ``path``.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
    return path
