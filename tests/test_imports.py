"""The shape of the code: no oversized module, no import circle among the split modules, the old import paths kept.

Read from the source with ``ast`` (nothing is imported), so the checks are cheap and run without torch.

The import graph has an edge ``m -> t`` for every ``import`` / ``from ... import`` of a project module ``t`` in
module ``m``, at the top or inside a function (a function-level import is still a dependency: it only hides a
circle until the function runs). Importing ``a.b.c`` imports the packages ``a.b`` and ``a`` first, so these are
edges too, except the importer's own ancestors (they are initialised before it in any case).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> source folder (pyproject's package-dir: ``lowrank_fed.llm`` lives in ``llm/``).
SOURCES = {"lowrank_fed": "lowrank_fed", "lowrank_fed.llm": "llm"}
MAX_LINES = 400

#: Modules still over MAX_LINES while their owners split them (issue 20). The final merge empties this list;
#: a file that is split must leave it (test_the_allow_list_names_only_oversized_files).
OVERSIZED_FOR_NOW = {
    # The core: issue 20's rule names llm/ only, and nobody splits these in it. robust/api.py (508: clair() and
    # its checks) is where CLAIR's server mathematics lands (item 4); synthetic.py is 404.
    "lowrank_fed/robust/api.py",
    "lowrank_fed/synthetic.py",
}

#: Every name imported from these modules anywhere in the repository before the split (issue 20): each still
#: imports from the same path, so other branches merge without touching their imports.
KEPT_NAMES = {
    "lowrank_fed.llm.data": [
        "TextDataset", "LazyTexts", "DATASETS", "load_dataset", "load_bbc_news", "load_20newsgroups",
        "load_bbc_headlines", "make_synthetic", "make_copy_task", "make_copy_substitution", "COPY_SUB_WORDS",
        "COPY_SIGMA", "COPY_TAU", "stratified_split", "split_validation", "holdout_sets", "partition", "partition_iid",
        "partition_dirichlet", "partition_pathological", "assign_ranks", "FLORA_RANKS", "RANK_DISTRIBUTIONS",
        "encode_classification", "encode_generation", "make_batch", "BBC_TOPICS", "PROMPT",
    ],
    "lowrank_fed.llm.models": [
        "PackageMissingError", "ModelSpec", "MODELS", "package_path", "cache_dir", "minilm_dir", "smollm2_gguf",
        "load_minilm", "load_smollm2", "tiny_bert", "tiny_llama", "word_tokenizer", "word_vocabulary",
        "needs_vocabulary", "COPY_LLAMA", "copy_tokenizer", "copy_llama", "pretrain_copy", "copy_examples",
        "load_model", "count_parameters", "parameter_count",
    ],
    "lowrank_fed.llm.peft_bridge": [
        "LORA_SCALINGS", "convention_scale", "resolve_scaling", "lora_scale", "client_lora_config", "adapter_config",
        "lora_layers", "get_factor_pairs", "set_factor_pairs", "state_dict_to_pairs", "pairs_to_state_dict",
        "merge_into_base", "init_pairs", "AdapterWorkspace",
    ],
    "lowrank_fed.llm.flower.deploy": [
        "add_arguments", "main", "up", "LocalFederation", "free_port", "write_app", "marked_processes", "MARK",
        "RUN_TIMEOUT",
    ],
    "lowrank_fed.llm.run": ["add_arguments", "main", "check_output_folder", "_check_packages"],
}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project: import name -> file (a package's name -> its ``__init__.py``)."""
    out = {}
    for name, folder in SOURCES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if name == "lowrank_fed" and parts[0] == "llm":  # not a package of the core (pyproject maps llm/)
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


def _is_type_checking(node) -> bool:
    """Whether ``node`` is an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``m -> {t, ...}``: the project modules ``m`` imports, at the top or in a function (the module docstring)."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                       for stmt in block.body for n in ast.walk(stmt)}  # its `else:` does run
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run: annotations only, no circle
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name inside a module -> that module
                    target = target.rpartition(".")[0]
                while target:  # the module and the packages above it, but not the importer's own ancestors
                    if target in modules and target != name and not name.startswith(target + "."):
                        found.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds an import circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def oversized(root: Path = ROOT) -> dict[str, int]:
    """``{path relative to root: lines}`` of every project module over :data:`MAX_LINES` lines."""
    out = {}
    for path in project_modules(root).values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out[path.relative_to(root).as_posix()] = n
    return out


def test_no_module_is_over_400_lines_except_those_still_being_split():
    # Prepare / Execute
    found = oversized()
    # Assert
    over = {path: n for path, n in found.items() if path not in OVERSIZED_FOR_NOW}
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): {over}"


def test_the_allow_list_names_only_oversized_files():
    # Prepare / Execute
    found = oversized()
    # Assert: a file split below the limit leaves the allow-list, so the list only shrinks
    assert OVERSIZED_FOR_NOW <= set(found), f"no longer oversized, drop from OVERSIZED_FOR_NOW: " \
                                            f"{sorted(OVERSIZED_FOR_NOW - set(found))}"


def test_the_import_graph_has_no_circle():
    # Prepare
    graph = import_graph()
    # Execute
    found = cycles(graph)
    # Assert: no circle anywhere in llm/ or lowrank_fed/, top-level or function-level imports alike
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_function_level_imports_and_package_parents(tmp_path):
    # Prepare: a toy project whose only circle goes through a function-level import and a package __init__
    (tmp_path / "lowrank_fed" / "pkg").mkdir(parents=True)
    (tmp_path / "llm").mkdir()
    (tmp_path / "lowrank_fed" / "__init__.py").write_text("")
    (tmp_path / "lowrank_fed" / "a.py").write_text("from .pkg.b import x\n")
    (tmp_path / "lowrank_fed" / "pkg" / "__init__.py").write_text("from .b import x\nfrom . import c\n")
    (tmp_path / "lowrank_fed" / "pkg" / "b.py").write_text("x = 1\n")
    (tmp_path / "lowrank_fed" / "pkg" / "c.py").write_text("def f():\n    from ..a import y\n")
    # Execute
    graph = import_graph(tmp_path)
    # Assert: a -> pkg.b and its package pkg; pkg.c -> a inside a function; pkg.b -> pkg is no edge (an ancestor)
    assert graph["lowrank_fed.a"] == {"lowrank_fed.pkg", "lowrank_fed.pkg.b"}
    assert graph["lowrank_fed.pkg.c"] == {"lowrank_fed.a"} and graph["lowrank_fed.pkg.b"] == set()
    assert cycles(graph) == [["lowrank_fed.a", "lowrank_fed.pkg", "lowrank_fed.pkg.c"]]


@pytest.mark.parametrize("module", sorted(KEPT_NAMES))
def test_every_name_imported_before_the_split_still_imports_from_its_old_path(module):
    # Prepare
    pytest.importorskip("torch")
    if module.endswith(".deploy"):
        pytest.importorskip("flwr")
    # Execute
    loaded = importlib.import_module(module)
    # Assert
    missing = [name for name in KEPT_NAMES[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} lost {missing}"


#: The modules that may import project modules inside a function, and why: each keeps something heavy or optional
#: (torch, transformers and PEFT: the `llm` extra; Flower: the `flower` extra; rich: the `cli` extra) out of a path
#: that must work without it. Every other module imports the project's modules at the top (issue 20).
LAZY_IMPORTS = {
    "llm/run.py": "command entry: torch only after the config passed (a bad config answers in about 1 s)",
    "llm/merge.py": "command entry: torch and PEFT only after the arguments passed",
    "llm/tune.py": "command entry: torch only after the config and the grid passed",
    "llm/reproduce/tune_trials.py": "the runner (torch) only when a trial runs, not when a finished one is reused",
    "llm/reproduce/run.py": "command entry: the runner (torch) only when a run is made, not for --analyse-only",
    "llm/reproduce/analysis.py": "the analysis runs without torch; only counting a model's parameters needs it",
    "llm/flower/deploy.py": "command entry: torch and Flower (the flower extra) only after the config passed",
    "llm/flower/server_app.py": "Flower app: loaded by Flower, imports the runner when it runs",
    "llm/flower/client_app.py": "Flower app: a node builds its client only when Flower starts it",
    "llm/flower/engine.py": "Flower extra: the apps and the strategy are imported only when a Flower run starts",
    "llm/flower/settings.py": "flower-* settings are read before the run config is imported",
    "llm/runner/pool.py": "worker processes: what a worker needs is imported in the worker, after the forkserver",
    "llm/runner/evaluation.py": "the worker pool (and its forkserver) is started only when a run has several workers",
    "llm/training/truncation.py": "importing the training loop does not import PEFT",
    "lowrank_fed/experiments/recover.py": "rich (the cli extra) only to print a table",
}


def _lazy_project_imports(path: Path) -> list[str]:
    """The project modules ``path`` imports inside a function (relative, or ``lowrank_fed...``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith("lowrank_fed")):
                    found.append("." * sub.level + (sub.module or ""))
    return found


def test_function_level_imports_of_project_modules_are_only_where_a_reason_is_stated():
    # Prepare
    files = [p for folder in ("llm", "lowrank_fed") for p in sorted((ROOT / folder).rglob("*.py"))]
    # Execute
    lazy = {str(p.relative_to(ROOT)): _lazy_project_imports(p) for p in files}
    lazy = {path: found for path, found in lazy.items() if found}
    # Assert: no module imports the project inside a function without a stated reason, and no stale reason
    unexplained = {path: found for path, found in lazy.items() if path not in LAZY_IMPORTS}
    assert not unexplained, f"function-level imports of project modules without a reason: {unexplained}"
    assert sorted(set(LAZY_IMPORTS) - set(lazy)) == [], "reasons left for modules that import at the top now"
