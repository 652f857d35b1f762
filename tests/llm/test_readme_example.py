"""The README's "Your model and your data" example, run exactly as written (its shell block), and its numbers.

The block is read from README.md (the lines after the ``your-data example`` marker), so a change to the README's
commands is what this test runs. It runs in a fresh folder that holds the repository's ``examples/`` and a ``.venv``
link to the interpreter's environment, so the commands' relative paths resolve as they do at the repository root
and nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- your-data example:"


def readme_block() -> list[str]:
    """The commands of the shell block that follows the marker in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(MARKER):]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    if block is None:
        raise ValueError("README.md: no ```sh block after the your-data example marker")
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_accuracies() -> dict[str, dict[str, float]]:
    """The global accuracies the README states for the example, by torch's CPU capability
    (``AVX512: FedIT 0.750, FlexLoRA 0.717, HAFL 0.692; AVX2: ...``): the vector kernels change the rounding."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(MARKER):]
    line = re.search(r"global accuracies(.*?) on \d+ test", after, re.S).group(1)
    return {capability: {name: float(value) for name, value in re.findall(r"([A-Za-z-]+) (\d\.\d+)", values)}
            for capability, values in re.findall(r"(AVX\w*): ((?:[A-Za-z-]+ \d\.\d+,?\s*)+)", line)}


@pytest.mark.e2e
def test_the_readme_example_runs_as_written_and_gives_its_numbers(tmp_path):
    # Prepare: a folder with the repository's examples and the environment where the README expects them
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {**os.environ, "LOWRANK_FED_WORKERS": "1", "OMP_NUM_THREADS": "1"}
    commands = readme_block()
    # Execute: each command of the block, in order
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    # Assert: the two sites trained at their ranks on their own files, and the README's accuracies are the run's
    out = tmp_path / "runs" / "your-data"
    setup = json.loads((out / "setup.json").read_text())
    assert setup["ranks"] == [4, 16]
    summary = json.loads((out / "summary.json").read_text())
    titles = {"fedit": "FedIT", "flexlora": "FlexLoRA", "hafl": "HAFL"}
    measured = {titles[row["method"]]: row["final"] for row in summary}
    capability = torch.backends.cpu.get_cpu_capability()
    by_capability = readme_accuracies()
    assert set(by_capability) == {"AVX512", "AVX2"}
    assert capability in by_capability, f"README.md states no accuracies for torch's CPU capability {capability}"
    stated = by_capability[capability]
    assert set(stated) == set(measured) == {"FedIT", "FlexLoRA", "HAFL"}
    # the same capability on another CPU (another vendor, another BLAS path) may flip a headline or two: 0.02 is
    # under 3 of 120 (AVX2 against AVX512 moved 5)
    assert all(abs(measured[name] - value) <= 0.02 for name, value in stated.items()), (measured, stated)
