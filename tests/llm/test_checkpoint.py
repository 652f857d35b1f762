"""Round checkpoints: round trip, retention, atomicity, corruption fallback, deterministic bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from lowrank_fed.llm.runner import checkpoint  # noqa: E402
from lowrank_fed.llm.runner.checkpoint import (  # noqa: E402
    CheckpointCorruptWarning,
    CheckpointError,
    Loaded,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    save_tensors,
)


def _tensors(round_):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + round_
    return {
        "layer.0.A": base,
        "layer.0.B": base.T,  # non-contiguous view sharing storage with A
        "layer.1.A": base[1],  # another view of the same storage
        "bf16": torch.full((2, 2), 0.5 + round_, dtype=torch.bfloat16),
        "ranks": torch.tensor([2, 4, 8], dtype=torch.int64),
    }


def _state(round_):
    return {"round": round_, "method": "hetlora", "rng": [1, 2, 3], "metrics": {"loss": 0.25, "acc": 0.5}}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_round(loaded, round_):
    assert isinstance(loaded, Loaded)
    assert loaded.round == round_
    assert loaded.state == _state(round_)
    want = _tensors(round_)
    assert sorted(loaded.tensors) == sorted(want)
    for name, t in want.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_round_trip(tmp_path):
    # Prepare
    tensors, state = _tensors(5), _state(5)

    # Execute
    path = save_checkpoint(tmp_path, 5, tensors, state)
    loaded = load_checkpoint(tmp_path)

    # Assert
    assert path == tmp_path / "round-5"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "tensors.safetensors"]
    assert (path / "state.json").read_text() == json.dumps(state, indent=1, sort_keys=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["round"] == 5
    for name in ("state.json", "tensors.safetensors"):
        assert manifest["files"][name] == {"bytes": (path / name).stat().st_size, "sha256": _sha(path / name)}
    _assert_round(loaded, 5)
    assert loaded.path == path


def test_device_argument_moves_tensors(tmp_path):
    # Prepare
    save_checkpoint(tmp_path, 1, _tensors(1), _state(1))

    # Execute
    loaded = load_checkpoint(tmp_path, device="meta")

    # Assert
    assert {t.device.type for t in loaded.tensors.values()} == {"meta"}


def test_no_checkpoint_gives_none(tmp_path):
    # Prepare
    (tmp_path / "empty").mkdir()

    # Execute / Assert
    assert load_checkpoint(tmp_path / "empty") is None
    assert load_checkpoint(tmp_path / "absent") is None


def test_keeps_only_latest_and_previous_round(tmp_path):
    # Prepare: a stray temporary folder from an earlier crash
    (tmp_path / ".tmp-round-9").mkdir()
    (tmp_path / ".tmp-round-9" / "junk").write_text("x")

    # Execute
    for round_ in (1, 2, 3, 4):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "round-3", "round-4"]
    assert (tmp_path / "LATEST").read_text() == "round-4\n"
    _assert_round(load_checkpoint(tmp_path), 4)


def test_resaving_a_round_replaces_it(tmp_path):
    # Prepare
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))

    # Execute: a resumed run writes round 2 again
    save_checkpoint(tmp_path, 2, _tensors(2), {**_state(2), "resumed": True})

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "round-1", "round-2"]
    assert load_checkpoint(tmp_path).state["resumed"] is True


def _failing_replace(monkeypatch, predicate):
    real = os.replace

    def replace(src, dst):
        if predicate(os.fspath(src), os.fspath(dst)):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)


@pytest.mark.parametrize("crash", ["folder rename", "LATEST rename"])
def test_crash_keeps_previous_checkpoint(tmp_path, monkeypatch, crash):
    # Prepare
    save_checkpoint(tmp_path, 1, _tensors(1), _state(1))
    if crash == "folder rename":
        _failing_replace(monkeypatch, lambda src, dst: os.path.basename(src) == ".tmp-round-2")
    else:
        _failing_replace(monkeypatch, lambda src, dst: os.path.basename(dst) == "LATEST")

    # Execute
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, _tensors(2), _state(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(tmp_path)

    # Assert
    assert (tmp_path / "LATEST").read_text() == "round-1\n"
    _assert_round(loaded, 1)
    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, _tensors(2), _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "round-1", "round-2"]
    _assert_round(load_checkpoint(tmp_path), 2)


def test_crash_in_atomic_write_text_keeps_old_file(tmp_path, monkeypatch):
    # Prepare
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "old")
    _failing_replace(monkeypatch, lambda src, dst: True)

    # Execute
    with pytest.raises(OSError):
        atomic_write_text(target, "new")

    # Assert
    assert target.read_text() == "old"


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("name", ["tensors.safetensors", "state.json"])
@pytest.mark.parametrize(("damage", "fault"), [(_flip, "sha256 mismatch"), (_truncate, "size"),
                                               (os.remove, "missing")])
def test_corrupt_latest_falls_back_to_previous(tmp_path, name, damage, fault):
    # Prepare
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    bad = tmp_path / "round-2" / name
    size = bad.stat().st_size
    damage(bad)

    # Execute
    with pytest.warns(CheckpointCorruptWarning) as record:
        loaded = load_checkpoint(tmp_path)

    # Assert
    message = str(record[0].message)
    assert str(bad) in message
    assert fault in message
    if fault == "size":
        assert f"size {size - 7} expected {size}" in message
    assert str(tmp_path / "round-1") in message
    _assert_round(loaded, 1)


@pytest.mark.parametrize("content", [b"{not json", b'{"round": 2}', b"\xff\xfe"])
def test_bad_manifest_falls_back(tmp_path, content):
    # Prepare
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    (tmp_path / "round-2" / "manifest.json").write_bytes(content)

    # Execute
    with pytest.warns(CheckpointCorruptWarning, match=re.escape(str(tmp_path / "round-2" / "manifest.json"))):
        loaded = load_checkpoint(tmp_path)

    # Assert
    _assert_round(loaded, 1)


@pytest.mark.parametrize("latest", [None, "round-7\n", "../elsewhere\n"])
def test_bad_latest_pointer_falls_back_to_newest_round(tmp_path, latest):
    # Prepare
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    if latest is None:
        (tmp_path / "LATEST").unlink()
    else:
        (tmp_path / "LATEST").write_text(latest)

    # Execute
    with pytest.warns(CheckpointCorruptWarning) as record:
        loaded = load_checkpoint(tmp_path)

    # Assert
    named = tmp_path / ("LATEST" if latest != "round-7\n" else "round-7")
    assert str(named) in str(record[0].message)
    _assert_round(loaded, 2)


@pytest.mark.parametrize("latest", [None, "garbage\n", "round-7\n"])
def test_repair_rewrites_a_bad_latest_so_the_next_load_does_not_warn(tmp_path, latest):
    # Prepare: rounds 1 and 2 (round 2 corrupt when LATEST names it); LATEST missing, garbage or naming round 7
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    if latest is None:
        (tmp_path / "LATEST").unlink()
    else:
        (tmp_path / "LATEST").write_text(latest)
    if latest == "round-7\n":
        (tmp_path / "round-7").mkdir()

    # Execute: a plain load writes nothing; a repairing one rewrites LATEST; the next load is silent
    with pytest.warns(CheckpointCorruptWarning):
        load_checkpoint(tmp_path)
    unrepaired = (tmp_path / "LATEST").read_text() if latest is not None else None
    with pytest.warns(CheckpointCorruptWarning, match="now names round-2"):
        load_checkpoint(tmp_path, repair=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(tmp_path)

    # Assert
    assert unrepaired == latest
    assert (tmp_path / "LATEST").read_text() == "round-2\n"
    assert not (tmp_path / "LATEST.tmp").exists()
    _assert_round(loaded, 2)


def test_all_rounds_corrupt_raises(tmp_path):
    # Prepare
    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    _flip(tmp_path / "round-2" / "tensors.safetensors")
    _truncate(tmp_path / "round-1" / "state.json")

    # Execute
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)

    # Assert
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(tmp_path / "round-2" / "tensors.safetensors") in message
    assert str(tmp_path / "round-1" / "state.json") in message


def test_same_inputs_give_identical_bytes(tmp_path):
    # Prepare / Execute
    a = save_checkpoint(tmp_path / "a", 3, _tensors(3), _state(3))
    b = save_checkpoint(tmp_path / "b", 3, _tensors(3), _state(3))

    # Assert
    for name in ("tensors.safetensors", "state.json", "manifest.json"):
        assert _sha(a / name) == _sha(b / name), name


def test_save_tensors_stores_one_metadata_key(tmp_path):
    # Prepare
    meta = {"z": 1, "a": [1, 2], "method": "flora"}

    # Execute
    save_tensors(tmp_path / "with.safetensors", _tensors(0), meta)
    save_tensors(tmp_path / "without.safetensors", _tensors(0))

    # Assert
    with safe_open(tmp_path / "with.safetensors", "pt") as f:
        assert f.metadata() == {"lowrank_fed": json.dumps(meta, sort_keys=True)}
    with safe_open(tmp_path / "without.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with.safetensors", "without.safetensors"]


_SCRIPT = """
import sys, torch
from pathlib import Path
from lowrank_fed.llm.runner.checkpoint import save_checkpoint, save_tensors
out = Path(sys.argv[1])
tensors = {f"t{i}": torch.arange(6, dtype=torch.float32) * i for i in range(8)}
state = {f"key{i}": {"v": i, f"sub{i}": [i, str(i)]} for i in range(8)}
save_tensors(out / "plain.safetensors", tensors, {f"meta{i}": i for i in range(8)})
save_checkpoint(out / "ckpt", 4, tensors, state)
"""


def test_bytes_identical_across_processes_and_hash_seeds(tmp_path):
    # Prepare
    outs = [tmp_path / "seed0", tmp_path / "seed1"]

    # Execute: the Rust hash map in safetensors is reseeded in every process as well
    for seed, out in zip(("0", "12345"), outs):
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], env=env, check=True, timeout=300)

    # Assert
    for rel in ("plain.safetensors", "ckpt/round-4/tensors.safetensors", "ckpt/round-4/state.json",
                "ckpt/round-4/manifest.json", "ckpt/LATEST"):
        assert _sha(outs[0] / rel) == _sha(outs[1] / rel), rel


def test_a_round_with_non_finite_tensors_is_never_loaded(tmp_path):
    # Prepare: round 2 edited to hold NaN, its manifest updated to match (so the checksums verify)
    import hashlib

    for round_ in (1, 2):
        save_checkpoint(tmp_path, round_, _tensors(round_), _state(round_))
    path = tmp_path / "round-2"
    bad = {name: torch.full_like(t, float("nan")) if t.is_floating_point() else t
           for name, t in load_checkpoint(tmp_path).tensors.items()}
    save_tensors(path / "tensors.safetensors", bad)
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "tensors.safetensors").read_bytes()
    manifest["files"]["tensors.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    # Execute
    with pytest.warns(CheckpointCorruptWarning, match="non-finite entries"):
        loaded = load_checkpoint(tmp_path)
    # Assert: round 1, the newest finite one
    assert loaded.round == 1
