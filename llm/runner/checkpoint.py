r"""Atomic, verified, byte-deterministic round checkpoints for the embedded runner.

Layout of a checkpoint folder::

    folder/
      LATEST                  one line naming the newest round folder, e.g. "round-7"
      round-6/                the previous round, kept as the fallback
      round-7/
        tensors.safetensors   every tensor (CPU, contiguous, cloned); metadata {"format": "pt"}
        state.json            json.dumps(state, indent=1, sort_keys=True)
        manifest.json         {"files": {name: {"bytes": n, "sha256": hex}}, "round": 7}

Guarantees
----------
* Atomic: a round is written into ``.tmp-round-<N>``, fsynced and renamed with :func:`os.replace`;
  ``LATEST`` is then replaced the same way. A crash at any point leaves the previous checkpoint
  loadable. Only after the new round is in place are older rounds and stray ``.tmp-*`` folders
  deleted; exactly the new round and the one before it are kept.
* Deterministic: the same tensors and state give byte-identical files in every process. Safetensors
  stores metadata in a hash map whose order changes between processes, so at most one metadata key
  is ever written (:func:`save_tensors`).
* Verified: :func:`load_checkpoint` checks the size and sha256 of every file against the manifest.
  A bad round gives a :class:`CheckpointCorruptWarning` naming the file and the fault, and the
  previous round is loaded instead; if no round verifies, :class:`CheckpointError` is raised. With
  ``repair=True`` a ``LATEST`` that is missing, garbage or names a bad round is rewritten (atomically) to
  the round loaded, so later loads do not warn again.
* Readable without the tensors: :func:`peek_state` returns the newest verified ``state.json`` (the
  runner compares the run config stored there with the one it is asked to resume).

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     _ = save_checkpoint(Path(d), 3, {"w": torch.ones(2)}, {"step": 3})
...     got = load_checkpoint(Path(d))
>>> got.round, got.state, got.tensors["w"].tolist()
(3, {'step': 3}, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_bytes
from safetensors.torch import save_file

from ..outputs.atomic import _fsync, atomic_write_text

__all__ = ["CheckpointCorruptWarning", "CheckpointError", "Loaded", "atomic_write_text", "load_checkpoint",
           "peek_state", "save_checkpoint", "save_tensors"]

TENSORS, STATE, MANIFEST, LATEST = "tensors.safetensors", "state.json", "manifest.json", "LATEST"
_ROUND = re.compile(r"round-(0|[1-9][0-9]*)")


class CheckpointError(ValueError):
    r"""No checkpoint round verifies; the message names every file that failed and why."""


class CheckpointCorruptWarning(UserWarning):
    r"""A checkpoint round failed verification; an older round is loaded instead."""


@dataclass(frozen=True)
class Loaded:
    r"""A verified checkpoint round.

    Attributes
    ----------
    round : int
        The round number.
    tensors : dict of str to torch.Tensor
        The saved tensors, on the requested device.
    state : dict
        The saved JSON state.
    path : Path
        The round folder they were read from.
    """

    round: int
    tensors: dict[str, torch.Tensor]
    state: dict
    path: Path


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    r"""Save ``tensors`` to a safetensors file atomically and with deterministic bytes.

    Parameters
    ----------
    path : Path
        Target file; written via ``path.tmp`` and :func:`os.replace`.
    tensors : dict of str to torch.Tensor
        Copied to CPU, contiguous and cloned (safetensors refuses tensors sharing storage).
    metadata : dict, optional
        JSON-serialisable; stored as the single key ``"lowrank_fed"`` holding
        ``json.dumps(metadata, sort_keys=True)``. Without it the single key is ``{"format": "pt"}``.
        Never more than one key: their order in the file is not stable across processes.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {"format": "pt"} if metadata is None else {"lowrank_fed": json.dumps(metadata, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(plain, str(tmp), metadata=meta)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


def _rounds(folder: Path) -> dict[int, Path]:
    found = (_ROUND.fullmatch(p.name) for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def save_checkpoint(folder: Path, round_: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    r"""Write round ``round_`` atomically to ``folder/round-<N>/``, point ``LATEST`` at it, prune.

    Parameters
    ----------
    folder : Path
        Checkpoint folder (created if missing).
    round_ : int
        Round number, ``>= 0``.
    tensors : dict of str to torch.Tensor
        Saved with :func:`save_tensors`.
    state : dict
        JSON-serialisable, saved as ``state.json``.

    Returns
    -------
    Path
        The new round folder; afterwards only it and the highest lower-numbered round remain.
    """
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"checkpoint round: expected an int >= 0, got {round_!r}")
    state_text = json.dumps(state, indent=1, sort_keys=True)  # fails before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_}"
    final, tmp = folder / name, folder / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tmp / TENSORS, tensors)
    atomic_write_text(tmp / STATE, state_text)
    files = {}
    for file in (TENSORS, STATE):
        data = (tmp / file).read_bytes()
        files[file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_text(tmp / MANIFEST, json.dumps({"files": files, "round": round_}, indent=1, sort_keys=True))
    _fsync(tmp)
    if final.exists():  # re-saving a round (after a resume): move the old copy aside, deleted below
        os.replace(final, folder / f".tmp-old-{name}")
    os.replace(tmp, final)
    _fsync(folder)
    atomic_write_text(folder / LATEST, name + "\n")
    rounds = _rounds(folder)
    keep = {round_, max((r for r in rounds if r < round_), default=round_)}
    for r, path in rounds.items():
        if r not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    return final


def _verify(path: Path, round_: int, names: tuple[str, ...] = (TENSORS, STATE)) -> tuple[list[str], dict[str, bytes]]:
    manifest_path, blobs = path / MANIFEST, {}
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = {name: (int(manifest["files"][name]["bytes"]), str(manifest["files"][name]["sha256"]))
                 for name in names}
    except FileNotFoundError:
        return [f"{manifest_path}: missing"], blobs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable JSON or entries ({type(exc).__name__}: {exc})"], blobs
    problems = [] if manifest.get("round") == round_ else [
        f"{manifest_path}: round {manifest.get('round')!r} expected {round_}"]
    for name, (size, sha) in files.items():
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            problems.append(f"{path / name}: missing")
            continue
        except OSError as exc:
            problems.append(f"{path / name}: unreadable ({exc})")
            continue
        got = hashlib.sha256(data).hexdigest()
        if len(data) != size:
            problems.append(f"{path / name}: size {len(data)} expected {size}")
        elif got != sha:
            problems.append(f"{path / name}: sha256 mismatch, got {got} expected {sha}")
        else:
            blobs[name] = data
    return problems, blobs


def _order(folder: Path) -> tuple[list[int], list[str], int | None]:
    """Rounds to try, newest first (the one ``LATEST`` names before the others); ``LATEST``'s faults; its round."""
    rounds, latest = _rounds(folder), folder / LATEST
    failures, first = [], None
    try:
        text = latest.read_text(encoding="utf-8").strip()
        match = _ROUND.fullmatch(text)
        if match is None:
            failures.append(f"{latest}: names {text!r}, expected 'round-<N>'")
        else:
            first = int(match.group(1))
    except FileNotFoundError:
        failures.append(f"{latest}: missing")
    except (OSError, UnicodeDecodeError) as exc:
        failures.append(f"{latest}: unreadable ({exc})")
    order = ([first] if first is not None else []) + sorted((r for r in rounds if r != first), reverse=True)
    return order, failures, first


def peek_state(folder: Path) -> tuple[Path, dict] | None:
    r"""The JSON state of the newest round whose ``state.json`` verifies, without reading the tensors.

    Writes nothing and warns nothing. Returns ``(round folder, state)``, or None when no round's
    ``state.json`` matches its manifest and parses (or there is no checkpoint at all).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for round_ in _order(folder)[0]:
        path = folder / f"round-{round_}"
        problems, blobs = _verify(path, round_, (STATE,)) if path.is_dir() else (["missing"], {})
        if not problems:
            try:
                return path, json.loads(blobs[STATE])
            except ValueError:
                continue
    return None


def load_checkpoint(folder: Path, device: torch.device | str | None = None, *,
                    repair: bool = False) -> Loaded | None:
    r"""Load the round ``LATEST`` names, verified; fall back to the newest older round that verifies.

    Parameters
    ----------
    folder : Path
        Checkpoint folder written by :func:`save_checkpoint`.
    device : torch.device or str, optional
        Where to put the tensors (default: CPU).
    repair : bool
        When ``LATEST`` is missing, garbage or names a round that does not verify, rewrite it
        (atomically) to name the round loaded, so that the next load finds it first and does not warn
        again. Without it (the default) nothing is written.

    Returns
    -------
    Loaded or None
        None when there is no checkpoint at all (no ``LATEST`` and no ``round-*`` folder).

    Raises
    ------
    CheckpointError
        When no round verifies; the message names every file that failed and how.

    Warns
    -----
    CheckpointCorruptWarning
        When ``LATEST`` or the round it names is bad and an older round is loaded instead.
    """
    folder = Path(folder)
    if not _rounds(folder) and not (folder / LATEST).exists():
        return None
    order, failures, first = _order(folder)
    for round_ in order:
        path = folder / f"round-{round_}"
        problems, blobs = _verify(path, round_) if path.is_dir() else ([f"{path}: missing"], {})
        if not problems:  # bytes match the manifest; still refuse content that does not parse
            try:
                state = json.loads(blobs[STATE])
            except ValueError as exc:
                problems.append(f"{path / STATE}: unreadable JSON ({exc})")
            try:
                tensors = _load_bytes(blobs[TENSORS])
            except (SafetensorError, ValueError) as exc:
                problems.append(f"{path / TENSORS}: unreadable safetensors ({exc})")
            else:  # a run never saves a non-finite state, so one here was edited or damaged: never resumed from
                bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
                if bad:
                    problems.append(f"{path / TENSORS}: non-finite entries (NaN or Inf) in {len(bad)} tensors "
                                    f"({bad[0]!r}{', ...' if len(bad) > 1 else ''})")
        if problems:
            failures += problems
            continue
        if failures:
            repaired = ""
            if repair and first != round_:
                atomic_write_text(folder / LATEST, path.name + "\n")
                repaired = f"; {folder / LATEST} now names {path.name}"
            warnings.warn(CheckpointCorruptWarning(
                f"corrupt checkpoint: {'; '.join(failures)}; loading {path} instead{repaired}"), stacklevel=2)
        if device is not None:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        return Loaded(round=round_, tensors=tensors, state=state, path=path)
    raise CheckpointError(f"no checkpoint round in {folder} verifies: {'; '.join(failures)}")
