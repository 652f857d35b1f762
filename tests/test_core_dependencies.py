"""The core installs with only what it imports: pyproject's ``dependencies`` are exactly the core's needs.

Every module of ``lowrank_fed`` outside the torch layer (``lowrank_fed.llm``) and the CLI's tables and plots is
imported in a fresh interpreter; every top-level module its own import statements name must be the standard
library's, the project's, or a declared core dependency, and none of
the extras' packages may be loaded at all, even through a dependency. The rest (torch, PEFT, pydantic, rich,
matplotlib, cvxpy) lives in extras.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not the core: the command line (argparse front end and its tables) and the torch layer.
OUTSIDE_CORE = ("lowrank_fed.llm", "lowrank_fed.cli", "lowrank_fed.experiments.table",
                "lowrank_fed.experiments.compare_cli", "lowrank_fed.experiments.recover",
                "lowrank_fed.experiments.bench_cli")
# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"array-api-compat": "array_api_compat"}

PROBE = r"""
import builtins, importlib, json, pkgutil, sys
before, direct, original = set(sys.modules), set(), builtins.__import__

def recording(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and str((globals or {}).get("__name__", "")).startswith("lowrank_fed"):
        direct.add(name.split(".")[0])  # a project module's own import statement
    return original(name, globals, locals, fromlist, level)

builtins.__import__ = recording
import lowrank_fed
names = [m.name for m in pkgutil.walk_packages(lowrank_fed.__path__, "lowrank_fed.")
         if not m.name.startswith(tuple(sys.argv[1].split(",")))]
for name in names:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print(json.dumps({"modules": names, "direct": sorted(direct), "loaded": loaded}))
"""


def _import_names(declared) -> set[str]:
    names = set()
    for spec in declared:
        dist = spec.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            dist = dist.split(sep)[0]
        names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def _core_dependencies() -> set[str]:
    return _import_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def _source_imports(modules: list[str]) -> set[str]:
    """Every top-level name the modules' import statements name, function-level ones included."""
    found = set()
    for name in modules:
        path = ROOT / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "lowrank_fed"}


def test_the_core_loads_only_its_declared_dependencies():
    # Prepare
    allowed = _core_dependencies()
    # Execute: a fresh interpreter, so nothing the test session imported hides a dependency
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(OUTSIDE_CORE)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # Assert
    assert "lowrank_fed.robust.federated" in probe["modules"] and "lowrank_fed.linalg" in probe["modules"]
    third_party = {m for m in probe["direct"] if m not in sys.stdlib_module_names and m != "lowrank_fed"}
    assert third_party <= allowed, f"the core imports undeclared modules: {sorted(third_party - allowed)}"
    # each declared dependency is used by the core; a function-level import of anything else keeps an extra optional
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    used = _source_imports(probe["modules"])
    assert allowed <= used, f"declared but never imported by the core: {sorted(allowed - used)}"
    assert used - allowed <= _import_names(project["optional-dependencies"]["cvxpy"]), sorted(used - allowed)
    # nor through a dependency: none of the extras' packages is loaded at all
    assert not {"torch", "pydantic", "rich", "matplotlib", "cvxpy", "tqdm"} & set(probe["loaded"])


def test_a_command_that_needs_an_absent_extra_names_the_extra():
    # Prepare: rich made unimportable, as on a core-only install
    code = ("import sys; sys.modules['rich'] = None\n"
            "from lowrank_fed.cli import main\n"
            "sys.exit(main(['compare', '--help']))")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert: one line naming the extra, exit status 2, no traceback
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("lowrank-fed: this command prints tables; install them with "
                               "`pip install 'lowrank-fed[cli]'` (missing module 'rich")
