"""The Makefile's ``demo`` and ``clean`` targets, run by ``make`` on a copy with a stand-in ``lowrank-fed``.

The copy lives in a temporary folder with a fake, up-to-date virtual environment whose ``bin/lowrank-fed``
only records its arguments, so the targets' own logic runs in milliseconds and nothing of the checkout is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def checkout(tmp_path):
    """A copy of the Makefile whose ``setup`` is already done and whose ``lowrank-fed`` records its arguments."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "lowrank-fed"
    fake.write_text('#!/bin/sh\necho "$@" >> calls.txt\n')
    fake.chmod(0o755)
    later = time.time() + 60  # newer than the Makefile and pyproject.toml: `setup` has nothing to do
    (tmp_path / ".venv" / ".installed").touch()
    os.utime(tmp_path / ".venv" / ".installed", (later, later))
    return tmp_path


def _make(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=folder, capture_output=True, text=True,
                          timeout=60)


def test_a_second_make_demo_writes_a_fresh_folder(checkout):
    # Prepare: two earlier demos
    (checkout / "runs" / "default").mkdir(parents=True)
    (checkout / "runs" / "default-2").mkdir()

    # Execute
    result = _make(checkout, "demo")

    # Assert: the next free name, never --overwrite
    assert result.returncode == 0, result.stderr
    assert (checkout / "calls.txt").read_text().splitlines() == ["run --out runs/default-3"]


def test_the_first_make_demo_writes_runs_default(checkout):
    # Execute
    result = _make(checkout, "demo")

    # Assert
    assert result.returncode == 0, result.stderr
    assert (checkout / "calls.txt").read_text().splitlines() == ["run --out runs/default"]


def test_make_demo_overwrite_replaces_runs_default(checkout):
    # Prepare
    (checkout / "runs" / "default").mkdir(parents=True)

    # Execute
    dry = _make(checkout, "-n", "demo", "OVERWRITE=1")
    result = _make(checkout, "demo", "OVERWRITE=1")

    # Assert
    assert dry.returncode == 0 and ".venv/bin/lowrank-fed run --out runs/default --overwrite" in dry.stdout
    assert result.returncode == 0, result.stderr
    assert (checkout / "calls.txt").read_text().splitlines() == ["run --out runs/default --overwrite"]


def test_make_clean_keeps_runs_and_cache_and_says_so(checkout):
    # Prepare
    (checkout / "runs" / "default").mkdir(parents=True)
    (checkout / "runs" / "default" / "summary.md").write_text("a run")
    (checkout / ".cache").mkdir()

    # Execute
    result = _make(checkout, "clean")

    # Assert
    assert result.returncode == 0, result.stderr
    assert not (checkout / ".venv").exists()
    assert (checkout / "runs" / "default" / "summary.md").read_text() == "a run" and (checkout / ".cache").is_dir()
    assert "kept runs/" in result.stdout and ".cache/" in result.stdout and "rm -rf runs .cache" in result.stdout
