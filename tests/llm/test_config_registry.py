"""The config checked without torch, and one place to add a method (the method registry).

- validating every shipped TOML imports no torch, transformers or PEFT (a fresh interpreter);
- ``lowrank-fed run BAD.toml`` answers one line, exit status 2, within 2 s, before torch is imported;
- a toy method added by one :func:`register_method` line is a valid config entry, runs, and is listed in the
  generated docs tables; the registry agrees with the classes it names.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from pydantic import Field  # noqa: E402

from lowrank_fed.llm import run  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig, config_reference  # noqa: E402
from lowrank_fed.llm.methods import METHODS, FedIT, PairOptions, make_method, register_method  # noqa: E402
from lowrank_fed.llm.methods import registry  # noqa: E402
from lowrank_fed.llm.methods.options import GAP_LEVEL  # noqa: E402
from lowrank_fed.robust import detection  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LOWRANK_FED = Path(sys.executable).with_name("lowrank-fed")
HEAVY = ("torch", "transformers", "peft")


# ----------------------------------------------------------------------------- no torch before the config passed


def test_validating_every_shipped_config_imports_no_torch():
    # Prepare: a fresh interpreter that loads and validates every TOML under configs/, then lists heavy modules
    script = (
        "import sys, pathlib\n"
        "from lowrank_fed.llm.config import RunConfig, apply_overrides, load_config\n"
        f"paths = sorted(pathlib.Path({str(ROOT / 'configs')!r}).rglob('*.toml'))\n"
        "for p in paths:\n"
        "    RunConfig.from_dict(apply_overrides(load_config(p), ['rounds=2']))\n"
        f"print(len(paths), [m for m in {HEAVY!r} if m in sys.modules])\n"
    )

    # Execute
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    # Assert: every config validated (35 and more), and none of torch, transformers, peft imported
    assert done.returncode == 0, done.stderr
    count, heavy = done.stdout.split(" ", 1)
    assert int(count) >= 30 and heavy.strip() == "[]"


def test_a_bad_config_is_one_line_exit_2_within_2_seconds_without_torch(tmp_path):
    # Prepare: a config with a bad value; the command run from an empty folder
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = 3\nlr = "abc"\n')
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}

    # Execute: three tries (the fastest counts: the machine is shared), each with its imports listed
    tries = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([str(LOWRANK_FED), "run", str(bad)], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=60)
        tries.append((time.perf_counter() - start, done))

    # Assert: exit 2, one line naming the key, expected and got; torch never imported; nothing written; < 2 s
    seconds, done = min(tries, key=lambda t: t[0])
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 2 and done.stdout == ""
    assert lines == ["error: Config key 'lr': expected a number; got 'abc'."]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]
    assert seconds < 2.0, f"{seconds:.2f} s (tries: {[round(t, 2) for t, _ in tries]})"


@pytest.mark.parametrize("command", [["run"], ["tune"], ["flower", "config"], ["flower", "up", "--supernodes", "2"]])
def test_every_command_refuses_a_bad_config_before_importing_torch(command, tmp_path):
    # Prepare: a config with a bad value
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "abc"\n')

    # Execute
    done = subprocess.run([str(LOWRANK_FED), *command, str(bad)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)

    # Assert: exit 2, one line naming the key; none of torch, transformers, peft imported
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 2 and len(lines) == 1 and "Config key 'lr': expected a number; got 'abc'." in lines[0]
    assert not imported & set(HEAVY)


def test_clair_gap_level_default_is_the_cores():
    # Prepare / Execute: the default written out in methods/options.py (the core's import costs SciPy)
    # Assert
    assert GAP_LEVEL == detection.GAP_LEVEL
    assert METHODS["clair"].Options.model_fields["gap_level"].default == detection.GAP_LEVEL


# ----------------------------------------------------------------------------- the registry


def test_every_registry_line_names_its_class_and_options():
    # Prepare / Execute: each line resolved (its class imported and checked against the line)
    classes = {name: METHODS[name] for name in registry.REGISTRY}

    # Assert: the names, the options models and the order agree; a make_method of each gives that class
    assert list(METHODS) == list(registry.REGISTRY) and len(METHODS) == 14
    for name, cls in classes.items():
        assert cls.name == name and cls.Options is registry.method_options(name)
        assert type(make_method(name)) is cls


def test_a_registry_line_that_disagrees_with_its_class_is_a_type_error(monkeypatch):
    # Prepare: a line naming FedIT's class under another name
    monkeypatch.setitem(registry.REGISTRY, "fedit2", (".fedit:FedIT", ".options:PairOptions"))

    # Execute / Assert
    with pytest.raises(TypeError, match="Method registry line 'fedit2': expected a Method class with name = 'fedit2'"):
        METHODS["fedit2"]


def test_register_method_refuses_a_taken_or_malformed_name():
    with pytest.raises(ValueError, match="'fedit': expected a new name"):
        register_method("fedit", FedIT)
    with pytest.raises(ValueError, match="expected a word of letters, digits and '_'; got 'a-b'"):
        register_method("a-b", FedIT)


class ToyOptions(PairOptions):
    damping: float = Field(1.0, gt=0.0, le=1.0, description="toy: unused, to show an option in the docs")


class Toy(FedIT):
    """A toy method: FedIT's client policy and server rule (FedAvg of the factors, zero-padded) under a new name."""

    name, title, rule = "toy", "Toy (FedIT's client, zero-pad)", "zero_pad"
    Options = ToyOptions


@pytest.fixture
def toy():
    """The toy method registered by its one line (taken out of the registry afterwards)."""
    register_method("toy", Toy)
    yield
    del registry.REGISTRY["toy"]


def test_a_method_added_by_one_registry_line_is_checked_run_and_documented(toy, tmp_path, capsys):
    # Prepare: a tiny run of FedIT and the toy, which share the client policy and the rule
    argv = ["--set", 'model="tiny-bert"', "--set", "dataset=synthetic", "--set", "clients=3", "--set", "ranks=[2,4,4]",
            "--set", "rounds=1", "--set", "local_steps=2", "--set", "eval_size=30", "--set", "max_length=32",
            "--set", "val_size=20", "--set", "workers=1", "--set", 'methods=["fedit","toy"]',
            "--set", "toy.damping=0.5", "--no-progress", "--out", str(tmp_path / "run")]
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)

    # Execute
    status = run.main(parser.parse_args(argv))
    reference = config_reference()

    # Assert: the config knows its name and its options (an unknown option is named with the toy's own list)
    assert RunConfig.from_dict({"methods": ["toy"], "toy": {"damping": 0.5}}).method_options == {"toy": {"damping": 0.5}}
    with pytest.raises(ConfigError, match=r"Config key 'toy.dampng': expected an option of \[toy\] \(.*damping\)"):
        RunConfig.from_dict({"methods": ["toy"], "toy": {"dampng": 0.5}})
    with pytest.raises(ConfigError, match=r"Config key 'methods\[0\]': expected one of .*'local' or 'toy'; got 'toys'"):
        RunConfig.from_dict({"methods": ["toys"]})
    # ... the run ran it beside FedIT, to the same numbers (same client policy, rule and seed)
    assert status == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = {r["method"]: r for r in rows if r.get("round") == 1 and r.get("client") is None}
    assert set(final) == {"fedit", "toy"} and 0 <= final["toy"]["accuracy"] == final["fedit"]["accuracy"] <= 1
    # ... and the generated docs tables list it: the methods table, its options table, the `methods` key's names
    assert "| `toy` | Toy (FedIT's client, zero-pad) | `zero_pad` |" in reference
    assert "`[toy]` (Toy (FedIT's client, zero-pad)):" in reference and "| `damping` |" in reference
    assert "`local` or `toy`" in reference


def test_docs_list_every_registered_method():
    # Prepare / Execute: docs/config.md (generated from the registry by config_reference)
    text = (ROOT / "docs" / "config.md").read_text()

    # Assert: one row per registered method, in registry order
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `") and line.count("|") == 4
            and line.split("|")[3].strip().startswith("`")]
    assert rows == list(registry.REGISTRY)


def test_readme_methods_table_lists_every_registered_method():
    # Prepare / Execute: the first column of README's table under "Methods and how a round runs"
    text = (ROOT / "README.md").read_text().split("### Methods and how a round runs", 1)[1].split("**Composition.**")[0]

    # Assert: every registered method has its row, in registry order
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert rows == list(registry.REGISTRY)
