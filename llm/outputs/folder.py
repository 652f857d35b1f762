r"""The one guard every command that writes goes through: where it may write, and replacing a folder safely.

A command (``run``, ``merge``, ``reproduce``, ``flower up`` and the Flower ServerApp) decides what to do with its
output folder with :func:`plan_output` before it writes anything, and replaces an earlier output with
:func:`clear_folder` or :func:`replace_folder`. The rules, in the order they are checked:

1. the path is not empty and no component of it is a file;
2. never the current folder, one of its parents, the home folder or ``/`` (a process that runs inside the
   output's own scratch folder :data:`SCRATCH`, as Flower's ServerApp does, is not the user's folder);
3. never a folder that holds an input of the command (the config being run, an adapter being merged, the model
   cache, the packaged configs of a reproduction), an input itself, or a folder inside an input folder;
4. never a folder another command is writing into (its :data:`LOCK` held: :func:`lock_holder`);
   the folder (or the nearest folder above it that exists) must be writable: a probe file is created and removed;
5. absent, or empty but for :data:`SCRATCH`: ``"new"``;
6. ``overwrite``: only a folder that holds an earlier output of the same command is replaced (``"clear"``): one of
   its ``signature`` names at the top level (``config.json`` for a run, ``adapter_config.json`` for an adapter,
   ``report.json`` or a config's folder for a reproduction) and nothing but the names of its ``layout`` beside it,
   so a model folder or a project that happens to hold a ``config.json`` is refused, naming what it holds;
7. without ``overwrite``: a folder holding an earlier output of the same command is ``"existing"`` (the caller
   decides: ``run`` resumes only when told, ``reproduce`` reuses finished runs, ``merge`` refuses); anything
   else is refused.

A refusal raises :class:`OutputFolderError` (a ``ValueError``) and touches nothing.

Replacing is atomic at the folder level: :func:`replace_folder` writes the new contents into a temporary sibling
``.<name>.tmp-<id>`` and renames it into place after moving the old folder to ``.<name>.old-<id>``, which is then
deleted; a crash leaves the old folder or the new one under ``<name>`` (and at worst a stray sibling, never a
mixture). :func:`clear_folder` (a run that writes round by round into its folder) moves the old folder aside the same
way and starts an empty one.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

__all__ = ["OutputFolderError", "SCRATCH", "LOCK", "plan_output", "clear_folder", "replace_folder", "atomic_folder",
           "hold_lock", "lock_holder", "output_path"]

#: What an output folder may hold besides the output: Flower's home, logs and caches of a run (``lowrank-fed
#: flower up`` writes them before the ServerApp decides what to do with the folder).
SCRATCH = ".flower"

#: The lock file of an output a process is writing (:func:`hold_lock`); a second command refuses the folder.
LOCK = ".lowrank-fed.lock"

Plan = Literal["new", "clear", "existing"]


class OutputFolderError(ValueError):
    """An output folder a command must not write to; the message says why and what to do instead."""


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def _protected_reason(folder: Path) -> str | None:
    """Why ``folder`` (resolved) is never an output folder: the current folder, a parent of it, home or root."""
    cwd = Path.cwd().resolve()
    if _inside(cwd, folder / SCRATCH):  # a process of this very output (Flower's ServerApp runs in its scratch)
        return None
    if folder == cwd:
        return "it is the current folder"
    if folder in cwd.parents:
        return "it is a parent of the current folder"
    if folder == Path.home().resolve():
        return "it is the home folder"
    if folder == Path(folder.anchor):
        return "it is the root of the file system"
    return None


def _writable_probe(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` or the nearest existing folder above it; OSError if refused."""
    target = folder
    while not target.exists():
        target = target.parent
    fd, name = tempfile.mkstemp(prefix=".lowrank-fed-probe-", dir=target)
    os.close(fd)
    os.unlink(name)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")


def output_path(value: str | None, default: Path, flag: str = "--out") -> Path:
    r"""The output folder a user named (``value``), or ``default`` when none was given; an empty path is an error.

    Raises
    ------
    OutputFolderError
        ``value`` is empty or blank (``Path("")`` would silently be the current folder).
    """
    if value is None:
        return Path(default)
    if not str(value).strip():
        raise OutputFolderError(f"{flag} is empty; expected a folder path (or leave {flag} out: {default}).")
    return Path(value)


def _unknown(names: Iterable[str], layout: Iterable[str]) -> list[str]:
    """The names that match none of the ``layout`` patterns (``fnmatch``)."""
    patterns = list(layout)
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns))


def plan_output(folder, *, signature: Iterable[str], layout: Iterable[str] = (), overwrite: bool = False,
                inputs: Iterable = (), flag: str = "--out", hint: str = "") -> Plan:
    r"""What a command must do with its output ``folder`` before it writes: ``"new"``, ``"clear"`` or ``"existing"``.

    Parameters
    ----------
    folder : str or Path
        The output folder as the user gave it.
    signature : iterable of str
        Top-level names that mark an earlier output of this command (at least one must be there).
    layout : iterable of str
        Patterns (``fnmatch``) of every top-level name such an output may hold besides ``signature``: a folder with
        anything else (a model's ``model.safetensors``, a project's ``src/``) is not an earlier output, whatever
        else it holds.
    overwrite : bool
        The user asked to replace an earlier output (``--overwrite``).
    inputs : iterable of str or Path
        What the command reads (files or folders); the output folder may neither hold nor be one of them.
    flag : str
        How the user named the folder (``--out``, ``--per-client``, ``flower-out``), for messages.
    hint : str
        How the user goes on when the folder is refused (ends the message).

    Returns
    -------
    {"new", "clear", "existing"}
        See the module docstring, rules 5-7.

    Raises
    ------
    OutputFolderError
        Rules 1-4 and 6-7 of the module docstring; nothing is touched.
    """
    if str(folder).strip() == "":
        raise OutputFolderError(f"{flag} is empty; expected a folder path.")
    folder = Path(folder)
    tail = f" {hint}" if hint else ""
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise OutputFolderError(f"{flag} '{folder}': '{path}' exists and is not a folder; nothing was written."
                                    f" Choose a folder path.")
    resolved = _resolved(folder)
    if (reason := _protected_reason(resolved)) is not None:
        raise OutputFolderError(f"{flag} '{folder}': refusing to empty or write into it: {reason}. Choose a dedicated folder, "
                                f"e.g. {flag} runs/NAME.")
    for item in inputs:
        source = _resolved(Path(item))
        if _inside(source, resolved):
            what = "is" if source == resolved else f"holds '{item}', which is"
            raise OutputFolderError(f"{flag} '{folder}' {what} an input of this command; writing there could "
                                    f"destroy it. Choose another folder.")
        if source.is_dir() and _inside(resolved, source):
            raise OutputFolderError(f"{flag} '{folder}' lies inside '{item}', an input folder of this command; "
                                    "writing there could destroy it. Choose another folder.")
    if (holder := lock_holder(resolved)) is not None:
        raise OutputFolderError(f"{flag} '{folder}' is in use: process {holder} is writing into it; nothing was "
                                "changed. Wait for it to end, or choose another folder.")
    try:
        _writable_probe(resolved)
    except OSError as err:
        raise OutputFolderError(f"{flag} '{folder}' cannot be written: {err.strerror or err} "
                                f"({err.filename or resolved}).") from None
    if not folder.is_dir():
        return "new"
    names = [p.name for p in folder.iterdir() if p.name not in (SCRATCH, LOCK)]  # a lock nobody holds is no output
    if not names:
        return "new"
    signature = list(signature)
    foreign = _unknown(names, [*signature, *layout, LOCK, "*.tmp", "*.tmp.*"])
    ours = bool(set(signature) & set(names)) and not foreign
    if overwrite:
        if not ours:
            raise OutputFolderError(f"--overwrite: refusing to empty {flag} '{folder}': it holds files this command "
                                    f"did not write ({_listing(foreign or names)}); expected an earlier output (with "
                                    f"{' or '.join(sorted(signature))} and nothing else of its own). Nothing was "
                                    "changed. Choose another folder.")
        return "clear"
    if ours:
        return "existing"
    raise OutputFolderError(f"{flag} '{folder}' already holds files ({_listing(names)}); nothing was changed.{tail}")


def _sibling(folder: Path, tag: str) -> Path:
    return folder.with_name(f".{folder.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clear_folder(folder) -> None:
    r"""Replace ``folder`` by an empty one: the old folder is renamed to a hidden sibling, then deleted.

    A crash leaves either the old folder under its name or an empty one (and at worst the sibling). A folder that is
    a symbolic link is emptied in place instead (renaming would move the link, not its contents). Flower's scratch
    folder (:data:`SCRATCH`) is kept: the processes of a ``flower up`` run are already using it.
    """
    folder = Path(folder)
    if folder.is_symlink():
        for entry in folder.iterdir():
            if entry.name != SCRATCH:
                _remove(entry)
        return
    old = _sibling(folder, "old")
    folder.rename(old)
    folder.mkdir()
    if (old / SCRATCH).exists():
        (old / SCRATCH).rename(folder / SCRATCH)
    _remove(old)


def replace_folder(folder, new) -> None:
    r"""Put the folder ``new`` (a sibling written completely) in place of ``folder``; delete the old one after.

    ``folder`` -> ``.<name>.old-<id>``, ``new`` -> ``folder``, then the old one is removed: at every instant
    ``folder`` holds the complete old or the complete new contents (or, between the two renames, is absent while
    both exist as siblings).
    """
    folder, new = Path(folder), Path(new)
    if folder.is_symlink():  # the link stays; what it points to is replaced
        folder = folder.resolve()
    if not folder.exists():
        new.rename(folder)
        return
    old = _sibling(folder, "old")
    folder.rename(old)
    new.rename(folder)
    _remove(old)


@contextlib.contextmanager
def atomic_folder(folder) -> Iterator[Path]:
    r"""``with atomic_folder(out) as tmp:`` write everything into ``tmp``; on success it replaces ``out``.

    ``tmp`` is a fresh sibling ``.<name>.tmp-<id>`` (same file system, so the final rename is atomic). On an
    exception ``tmp`` is deleted and ``out`` is untouched.
    """
    folder = Path(folder)
    if folder.is_symlink():  # the link stays; what it points to is replaced
        folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(folder, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace_folder(folder, tmp)


def lock_holder(folder) -> int | None:
    r"""The process id holding ``folder``'s :data:`LOCK` (an ``flock`` on it), or None if nobody holds it.

    A process that runs inside the output's own scratch folder (Flower's ServerApp under ``flower up``, whose parent
    holds the lock) is not refused: it writes the very output its parent guards.
    """
    path = Path(folder) / LOCK
    if not path.is_file() or _inside(Path.cwd().resolve(), Path(folder).resolve() / SCRATCH):
        return None
    try:
        with open(path, "r+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def hold_lock(folder) -> Iterator[None]:
    r"""Hold ``folder``'s :data:`LOCK` while a command writes into it: the file holds the process id and is removed
    at the end; the kernel releases an ``flock`` when its process dies, so a killed command leaves no lock held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
            fcntl.flock(f, fcntl.LOCK_UN)
