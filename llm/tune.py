r"""Choosing hyper-parameters on validation data only (``lowrank-fed tune``).

One config is one setting (model, data, budget, skew). For each method ``m`` of it, a parameter ``theta`` (``lr``,
any option of the method's table such as ``hafl.beta1`` or ``clair.rank``, or a numeric run-wide key) takes each
value ``v`` of a grid, and every (``m``, ``v``) runs as an ordinary run, method ``m`` alone, on each tuning seed
``s`` in ``S`` (default 100, 101, 102: disjoint from the seeds 0..99 a reproduction reports). A trial is scored on
the validation split only (``val_size`` examples held out of the training data), from the metrics the runner
already computes for the global model after the last round:

    y(m, v, s) = val_accuracy (higher is better), or val_perplexity / val_loss (lower is better).

No test score is used here (the trials score the test split, as every run does, and nothing looks at it).

- **Choice**: ``v* = argbest_v ybar(v)``, ``ybar(v) = (1/|S|) sum_s y(m, v, s)``; equal means: the smaller value
  (the first in grid order for a grid that is not numeric).
- **Edges**: when ``v*`` is the smallest or largest value of a numeric grid, one value beyond that edge is added and
  run: ``v_new = v_e (v_e / v_n)`` (the same ratio) when every grid value is positive, else
  ``v_new = v_e + (v_e - v_n)`` (the same step), ``v_e`` the edge value and ``v_n`` its neighbour (rounded to 6
  significant digits; to an integer for an integer key). Repeated until ``v*`` is interior, or
  ``max_extensions`` values were added, or the next value would leave :data:`LR_BOUNDS` (for ``lr``) or is refused
  by the config (a rank of 0); the report says which.
- **Separation**: for each neighbour ``u`` of ``v*`` (the adjacent values of a numeric grid; every other value
  otherwise) the per-seed differences ``d_s = +-(y(v*, s) - y(u, s))`` (positive when ``v*`` is better) give
  ``dbar`` and a standard error ``se``, the larger of ``sd(d, ddof=1) / sqrt(|S|)`` (paired over seeds) and, for
  accuracy, ``sqrt(p (1 - p) / (|S| N) + q (1 - q) / (|S| N))`` (binomial over seeds x the ``N`` validation
  examples; :func:`separation`). ``v*`` is separated from ``u`` when ``dbar > se``; otherwise (or with no ``se``:
  one seed, not accuracy) the two are tied, and the report marks the tie.

Plain loop, not Optuna: the grids are small (3-6 values), every trial is a run folder that a rerun reuses, and the
reports must be byte-identical on a rerun; a pruner would stop trials from per-round scores on other seeds' noise,
and the separation test needs every seed of every neighbour anyway.

Outputs in ``DIR``: ``tuned.toml`` (``[method] option = value`` tables, or a top-level key for a run-wide
parameter, that a config's ``tuned`` key merges in), ``tune.json`` (every score), ``tune.md`` (the tables) and
``trials/<method>/<param>=<value>/seed<s>/`` (ordinary run folders).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, apply_overrides, load_config, parse_value, tuned_paths
from .methods import METHODS, method_options
from .outputs import OutputFolderError, atomic_write_text, clear_folder, hold_lock, output_path, plan_output
from .reproduce.run import MAX_SEEDS, _finished, load_run

__all__ = ["add_arguments", "main", "tune", "Target", "resolve_param", "extend_value", "separation", "choose",
           "run_trial", "DEFAULT_SEEDS", "LR_BOUNDS", "MAX_EXTENSIONS", "TUNE_SIGNATURE", "TUNE_LAYOUT"]

#: Tuning seeds: from :data:`~lowrank_fed.llm.reproduce.run.MAX_SEEDS` up, never a seed a reproduction reports.
DEFAULT_SEEDS = (MAX_SEEDS, MAX_SEEDS + 1, MAX_SEEDS + 2)
#: The range an edge extension of ``lr`` may not leave.
LR_BOUNDS = (1e-6, 1.0)
#: Values added beyond the grid's edges per method, at most (default of ``--max-extensions``).
MAX_EXTENSIONS = 3
#: Run-wide keys that are not tuned: the seed (the tune's own), what the validation or test split is, the scoring.
NOT_TUNED = ("seed", "val_size", "eval_size", "eval_every", "rouge_size", "max_new_tokens", "threads", "workers")
#: The names that mark a folder as a tune's (``plan_output``), and what else it holds.
TUNE_SIGNATURE = ("tune.json", "trials")
TUNE_LAYOUT = ("tuned.toml", "tune.md")
#: The score: ``metric`` is the task's (val_accuracy, or val_perplexity for generation); ``loss`` is val_loss.
SCORES = ("metric", "loss")


# ----------------------------------------------------------------------------- what is tuned


@dataclass(frozen=True)
class Target:
    r"""What ``--param`` names: a method option (``[method] option``) or a run-wide key.

    Attributes
    ----------
    param : str
        As given (``lr``, ``clair.rank``, ``local_steps``).
    option : str
        The option or key name.
    method : str or None
        The one method a ``METHOD.OPTION`` parameter belongs to.
    run_wide : bool
        A top-level config key (tuned for one method at a time; written at the top of ``tuned.toml``).
    """

    param: str
    option: str
    method: str | None = None
    run_wide: bool = False

    def where(self, method: str) -> str:
        """How the value is set for ``method``, as a config reads: ``[fedit] lr`` or ``local_steps``."""
        return self.option if self.run_wide else f"[{method}] {self.option}"

    def apply(self, data: dict, method: str, value: Any) -> dict:
        """A copy of the config dict ``data`` with the value set for ``method``."""
        out = copy.deepcopy(data)
        if self.run_wide:
            out[self.option] = value
        else:
            table = out.get(method)
            out[method] = {**(table if isinstance(table, Mapping) else {}), self.option: value}
        return out

    def current(self, data: dict, method: str) -> Any:
        """The value the config gives (the method's table, else the run's ``lr`` for ``lr``, else the default)."""
        table = data.get(method) if isinstance(data.get(method), Mapping) else {}
        if not self.run_wide and self.option in table:
            return table[self.option]
        if self.run_wide or self.option == "lr":
            return data.get(self.option, RunConfig.model_fields[self.option].default)
        return method_options(method).model_fields[self.option].default


def _numeric_field(name: str) -> bool:
    annotation = RunConfig.model_fields[name].annotation
    return annotation in (int, float)


def resolve_param(param: str, requested: list[str] | None, default: list[str]) -> tuple[Target, list[str]]:
    r"""The :class:`Target` of ``--param`` and the methods it is tuned for.

    ``requested`` are the methods ``--methods`` names (None: not given), ``default`` the config's; a
    ``METHOD.OPTION`` parameter is tuned for ``METHOD`` alone.

    Raises
    ------
    ConfigError
        An unknown method or option, an option only some of the methods have, a run-wide key that is not numeric
        or is one of :data:`NOT_TUNED`, or a run-wide key with more than one method.
    """
    if "." in param:
        method, option = param.split(".", 1)
        if method not in METHODS:
            raise ConfigError(f"--param '{param}': unknown method '{method}'; expected METHOD.OPTION with METHOD one "
                              f"of {', '.join(METHODS)}.")
        options = [o for o in method_options(method).model_fields]
        if option not in options:
            raise ConfigError(f"--param '{param}': [{method}] has no option '{option}'; its options: "
                              f"{', '.join(options) or 'none'}.")
        if requested and requested != [method]:
            raise ConfigError(f"--param '{param}' is an option of [{method}] only; got --methods {' '.join(requested)} "
                              f"(leave --methods out, or give --methods {method}).")
        return Target(param, option, method=method), [method]
    methods = list(requested or default)
    having = [m for m in methods if param in method_options(m).model_fields]
    if having and len(having) == len(methods):
        return Target(param, param), methods
    if having:
        others = [m for m in methods if m not in having]
        raise ConfigError(f"--param '{param}' is an option of {', '.join(f'[{m}]' for m in having)} but not of "
                          f"{', '.join(f'[{m}]' for m in others)}; use --param METHOD.{param} or --methods.")
    if param in RunConfig.model_fields and param != "method_options":
        if param in NOT_TUNED or not _numeric_field(param):
            why = ("it defines the tune itself (its seeds, the validation or test split, the scoring)"
                   if param in NOT_TUNED else "only numeric run-wide keys and method options are tuned")
            raise ConfigError(f"--param '{param}': cannot be tuned: {why}.")
        if len(methods) != 1:
            raise ConfigError(f"--param '{param}' is a run-wide key: tune it for one method at a time (--methods "
                              f"NAME; got {len(methods)} methods: {', '.join(methods)}); its choice is written at "
                              "the top of tuned.toml.")
        return Target(param, param, run_wide=True), methods
    options = sorted({o for m in methods for o in method_options(m).model_fields})
    numeric = [k for k in RunConfig.model_fields if k not in NOT_TUNED and k != "method_options" and _numeric_field(k)]
    raise ConfigError(f"--param '{param}': unknown; expected a method option ({', '.join(options)}), METHOD.OPTION, "
                      f"or a numeric run-wide key ({', '.join(numeric)}).")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def label(value: Any) -> str:
    """A value as TOML writes it (``0.002``, ``16``, ``true``, ``"svd"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def _folder_name(target: Target, value: Any) -> str:
    return re.sub(r"[^\w.+=-]", "_", f"{target.param}={label(value).strip(chr(34))}")


def extend_value(edge: Any, neighbour: Any, *, geometric: bool, integer: bool) -> Any:
    r"""The value one step beyond ``edge``, away from ``neighbour``.

    ``edge * (edge / neighbour)`` (the same ratio) when ``geometric``, else ``edge + (edge - neighbour)`` (the same
    step); rounded to 6 significant digits, or to an integer (at least one away from ``edge``) when ``integer``.

    >>> extend_value(0.02, 0.005, geometric=True, integer=False), extend_value(0.002, 0.005, geometric=True, integer=False)
    (0.08, 0.0008)
    >>> extend_value(8, 4, geometric=True, integer=True), extend_value(0.0, 0.5, geometric=False, integer=False)
    (16, -0.5)
    """
    new = edge * (edge / neighbour) if geometric else edge + (edge - neighbour)
    if integer:
        step = 1 if edge > neighbour else -1
        rounded = int(round(new))
        return rounded if rounded != edge else edge + step
    return float(f"{new:.6g}")


# ----------------------------------------------------------------------------- statistics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _se_of_mean(values: list[float]) -> float | None:
    """``sd(values, ddof=1) / sqrt(n)``; None for one value."""
    n = len(values)
    if n < 2:
        return None
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def choose(means: dict[Any, float], order: list[Any], higher_is_better: bool) -> Any:
    """The value with the best mean; equal means: the first in ``order`` (the smaller value of a sorted grid)."""
    best = None
    for v in order:
        if best is None or (means[v] > means[best] if higher_is_better else means[v] < means[best]):
            best = v
    return best


def separation(chosen: list[float], other: list[float], *, higher_is_better: bool, accuracy: bool,
               n_val: int | None) -> dict:
    r"""Whether the chosen value's scores beat ``other``'s by more than a standard error.

    ``d_s = +-(chosen_s - other_s)`` over the ``S`` seeds (positive when the chosen value is better), ``dbar`` their
    mean. Standard error of ``dbar``:

    - paired over seeds: ``se_seeds = sd(d, ddof=1) / sqrt(S)`` (``S >= 2``);
    - for accuracy, also over seeds x validation examples: ``se_examples = sqrt(p (1 - p) / (S N) + q (1 - q) / (S N))``
      with ``p``, ``q`` the two mean accuracies and ``N`` = ``n_val`` (unpaired binomial);
    - ``se`` is the larger of the two that exist (two seeds that happen to agree give ``se_seeds = 0``; a few
      examples give a large ``se_examples``), None when neither does (one seed, not accuracy).

    ``separated = dbar > se`` (False when ``se`` is None).

    >>> separation([0.8, 0.7, 0.9], [0.5, 0.6, 0.4], higher_is_better=True, accuracy=True, n_val=50)["separated"]
    True
    >>> separation([0.8, 0.6], [0.7, 0.7], higher_is_better=True, accuracy=True, n_val=50)["separated"]
    False
    >>> separation([0.3, 0.3], [0.2, 0.2], higher_is_better=True, accuracy=True, n_val=30)["se_from"]
    'seeds x validation examples'
    """
    sign = 1.0 if higher_is_better else -1.0
    d = [sign * (a - b) for a, b in zip(chosen, other, strict=True)]
    dbar = _mean(d)
    candidates = {}
    if (se_seeds := _se_of_mean(d)) is not None:
        candidates["paired over seeds"] = se_seeds
    if accuracy and n_val:
        p, q, n = _mean(chosen), _mean(other), len(d) * n_val
        candidates["seeds x validation examples"] = math.sqrt(p * (1 - p) / n + q * (1 - q) / n)
    how, se = max(candidates.items(), key=lambda kv: kv[1]) if candidates else ("none (one seed, not accuracy)", None)
    return {"difference": dbar, "se": se, "se_from": how, "se_seeds": se_seeds, "separated": se is not None and dbar > se}


# ----------------------------------------------------------------------------- one trial


def run_trial(cfg: RunConfig, folder: Path, *, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    r"""Run ``cfg`` (one method, one seed) into ``folder``, or reuse the finished run there; its validation scores.

    Returns the last round's ``val_*`` metrics of the global model (``val_accuracy``, ``val_loss``; generation:
    ``val_perplexity``, ...), with ``val_size`` and ``round``, read back from the run's ``metrics.jsonl`` and
    ``setup.json`` (:func:`~lowrank_fed.llm.reproduce.run.load_run`). No test score is used.
    """
    from .runner.simulation import run_experiment

    if _finished(folder, cfg):
        log(f"reusing the finished trial in {folder}")
    else:
        log(f"running {folder}")
        if folder.exists():
            clear_folder(folder)  # an unfinished trial
        run_experiment(cfg, folder, progress=progress)
    run = load_run(folder)
    last = run.history[cfg.methods[0]][-1]
    scores = {k: v for k, v in last.items() if k.startswith("val_") and _is_number(v)}
    return {**scores, "val_size": run.setup["val_size"], "round": last["round"]}


# ----------------------------------------------------------------------------- the tune


@dataclass
class _MethodTune:
    method: str
    grid: list[Any]
    values: list[Any]
    numeric: bool
    integer: bool
    scores: dict[str, dict[int, dict]] = field(default_factory=dict)  # label -> seed -> trial scores
    extensions: list[dict] = field(default_factory=list)
    stopped: str | None = None


def _validated(data: dict, where: str) -> RunConfig:
    try:
        return RunConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{where}: " + "; ".join(str(err).splitlines()), err.errors) from None


def _integer_key(target: Target, method: str) -> bool:
    """Whether the key holds integers only (its type names no float): an extension is rounded to an integer."""
    fields = RunConfig.model_fields if target.run_wide else method_options(method).model_fields
    return "float" not in str(fields[target.option].annotation)


def _default_grid(target: Target, data: dict, method: str) -> list[Any]:
    if target.option != "lr":
        raise ConfigError(f"--param '{target.param}': give --grid V1 V2 ... (a default grid exists for lr only).")
    lr = float(target.current(data, method))
    return [float(f"{lr / 3:.6g}"), lr, float(f"{lr * 3:.6g}")]


def tune(config: str | Path, *, param: str = "lr", grid: list[Any] | None = None, seeds: list[int] | None = None,
         methods: list[str] | None = None, score: str = "metric", max_extensions: int = MAX_EXTENSIONS,
         overrides: list[str] | None = None, out: str | Path | None = None, overwrite: bool = False,
         progress: bool = True, log: Callable[[str], None] = print, trial: Callable[..., dict] | None = None) -> dict:
    r"""Choose ``param`` per method of ``config`` on validation data only; write ``out``; return ``tune.json``'s dict.

    Parameters
    ----------
    config : path
        The setting (a run config; its ``tuned`` key is merged in as for a run).
    param : str
        ``lr`` (each method's ``[method] lr``), ``METHOD.OPTION``, a method option every method has, or a numeric
        run-wide key (one method only).
    grid : list, optional
        The values (TOML values); default for ``lr``: the config's lr times 1/3, 1, 3.
    seeds : list of int, optional
        Tuning seeds, each at least :data:`~lowrank_fed.llm.reproduce.run.MAX_SEEDS` (default 100, 101, 102).
    methods : list of str, optional
        Default: the config's methods.
    score : {"metric", "loss"}
        ``val_accuracy`` / ``val_perplexity`` (the task's metric), or ``val_loss``.
    max_extensions : int
        Values added beyond the grid's edges per method, at most.
    overrides : list of str
        ``KEY=VALUE`` as ``run --set`` (e.g. ``val_size=200`` for a config without a validation split).
    out : path, optional
        Default ``runs/tune/<name>-<param>``.
    overwrite : bool
        Replace an earlier tune in ``out`` (without it, an earlier tune of the same request is continued and its
        finished trials reused; one of another request is refused).
    trial : callable(cfg, folder) -> dict, optional
        The seam tests use: runs (or reuses) one trial and returns its ``val_*`` scores and ``val_size``
        (default :func:`run_trial`).

    Raises
    ------
    ConfigError
        Every bad input, before anything is written.
    """
    config = Path(config)
    data = apply_overrides(load_config(config), overrides)
    base = _validated(data, f"config '{config}'")
    from .run import _check_packages

    _check_packages(base)  # PackageMissingError: the packaged model is not installed
    if base.val_size == 0:
        raise ConfigError(f"config '{config}' has val_size = 0: no validation split to choose on (the test split is "
                          "never used for selection). Set one, e.g. --set val_size=200.")
    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    low = [s for s in seeds if s < MAX_SEEDS]
    if not seeds or low or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct seeds >= {MAX_SEEDS} (seeds below are the ones reproductions "
                          f"report); got {seeds}.")
    if score not in SCORES:
        raise ConfigError(f"--score: expected one of {', '.join(SCORES)}; got {score!r}.")
    if not 0 <= max_extensions <= 20:
        raise ConfigError(f"--max-extensions: expected an integer from 0 to 20; got {max_extensions}.")
    if methods:
        _validated({**data, "methods": list(methods)}, "--methods")
    target, methods = resolve_param(param, list(methods) if methods else None, list(base.methods))
    for m in methods:
        if not METHODS[m].scores_global:
            raise ConfigError(f"method '{m}' has no global model (each client keeps its own), and validation scores "
                              "the global model only: tune cannot choose for it; leave it out with --methods.")
    plans: dict[str, _MethodTune] = {}
    for m in methods:
        values = list(grid) if grid else _default_grid(target, data, m)
        labels = [label(v) for v in values]
        if len(values) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(f"--grid: expected at least two distinct values; got {' '.join(labels)}.")
        numeric = all(_is_number(v) for v in values)
        for v in values:
            _validated(target.apply({**data, "methods": [m], "seed": seeds[0]}, m, v),
                       f"--grid value {label(v)} for --param {param} ({target.where(m)})")
        integer = numeric and all(isinstance(v, int) for v in values) and _integer_key(target, m)
        plans[m] = _MethodTune(m, values, sorted(values) if numeric else values, numeric, integer)
    try:
        out = output_path(None if out is None else str(out), Path("runs") / "tune" / f"{base.name}-{param}")
        from .models import cache_dir

        plan = plan_output(out, signature=TUNE_SIGNATURE, layout=TUNE_LAYOUT, overwrite=overwrite,
                           inputs=[config, *tuned_paths(config), cache_dir()],
                           hint="Expected a new folder or one holding an earlier tune of the same request; use "
                                "--overwrite to replace it, or choose another --out.")
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    request = {"config": str(config), "config_data": json.loads(json.dumps(data)), "param": param,
               "grid": None if grid is None else [label(v) for v in grid], "seeds": seeds, "methods": methods,
               "score": score, "max_extensions": max_extensions}
    if plan == "existing":
        try:
            earlier = json.loads((out / "tune.json").read_text()).get("request")
        except (OSError, json.JSONDecodeError, AttributeError):
            earlier = None
        if earlier is None and (out / "tune.json").exists():
            raise ConfigError(f"--out '{out}': its tune.json cannot be read; nothing was changed. Use --overwrite "
                              "to replace it, or choose another --out.")
        keys = [k for k in request if k != "config" and (earlier or {}).get(k) != request[k]]
        if earlier is not None and keys:  # the config's path may be spelled otherwise; its contents may not differ
            raise ConfigError(f"--out '{out}' holds a tune of another request (it differs in: {', '.join(keys)}); "
                              "nothing was changed. Use --overwrite to replace it, or choose another --out.")
    if plan == "clear":
        clear_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    run = trial or (lambda cfg, folder: run_trial(cfg, folder, progress=progress, log=log))
    with hold_lock(out):
        atomic_write_text(out / "tune.json", _json({"request": request, "finished": False}))
        for m, mt in plans.items():
            _tune_method(mt, target, data, seeds, out, run, score, max_extensions, log)
        report = _report(plans, target, base, request, score)
        atomic_write_text(out / "tune.json", _json(report))
        atomic_write_text(out / "tune.md", tune_markdown(report))
        atomic_write_text(out / "tuned.toml", tuned_toml(report))
    report["out"] = str(out)
    return report


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def _trial_config(target: Target, data: dict, method: str, value: Any, seed: int) -> RunConfig:
    # trials are not checkpointed: an interrupted trial runs again; finished ones are reused
    trial = target.apply({**data, "methods": [method], "seed": seed, "checkpoint": False}, method, value)
    return _validated(trial, f"{target.where(method)} = {label(value)}, seed {seed}")


def _tune_method(mt: _MethodTune, target: Target, data: dict, seeds: list[int], out: Path, run, score: str,
                 max_extensions: int, log) -> None:
    """Score every value on every seed, extending a numeric grid past an edge that holds the best mean."""
    while True:
        for v in mt.values:
            by_seed = mt.scores.setdefault(label(v), {})
            for s in seeds:
                if s not in by_seed:
                    log(f"[tune] {mt.method}, {target.where(mt.method)} = {label(v)}, seed {s}")
                    folder = out / "trials" / mt.method / _folder_name(target, v) / f"seed{s}"
                    by_seed[s] = run(_trial_config(target, data, mt.method, v, s), folder)
        if not mt.numeric:
            return
        key, higher = _score_key(score, mt.scores[label(mt.values[0])][seeds[0]], mt.method)
        means = {label(v): _mean([mt.scores[label(v)][s][key] for s in seeds]) for v in mt.values}
        best = choose(means, [label(v) for v in mt.values], higher)
        if best not in (label(mt.values[0]), label(mt.values[-1])):
            return
        low = best == label(mt.values[0])
        edge, neighbour = (mt.values[0], mt.values[1]) if low else (mt.values[-1], mt.values[-2])
        side = "low" if low else "high"
        if len(mt.extensions) >= max_extensions:
            mt.stopped = (f"the best value {label(edge)} is still at the {side} edge: the limit of {max_extensions} "
                          "extensions was reached")
            return
        new = extend_value(edge, neighbour, geometric=all(v > 0 for v in mt.values), integer=mt.integer)
        if target.option == "lr" and not LR_BOUNDS[0] <= new <= LR_BOUNDS[1]:
            mt.stopped = (f"the best value {label(edge)} is at the {side} edge: the next value {label(new)} would "
                          f"leave the lr bounds [{LR_BOUNDS[0]:g}, {LR_BOUNDS[1]:g}]")
            return
        try:
            _trial_config(target, data, mt.method, new, seeds[0])
        except ConfigError as err:
            mt.stopped = (f"the best value {label(edge)} is at the {side} edge: the next value {label(new)} is not "
                          f"valid ({err})")
            return
        log(f"[tune] {mt.method}: best {label(edge)} at the {side} edge; adding {label(new)}")
        mt.extensions.append({"value": new, "edge": side, "best_before": edge})
        mt.values = sorted([*mt.values, new])


def _score_key(score: str, scores: dict, method: str) -> tuple[str, bool]:
    """The key of a trial's ``scores`` that is compared, and whether higher is better."""
    if score == "loss":
        key, higher = "val_loss", False
    elif "val_accuracy" in scores:
        key, higher = "val_accuracy", True
    else:
        key, higher = "val_perplexity", False
    if key not in scores:
        raise ConfigError(f"{method}: the trials have no validation score {key!r} (they have {sorted(scores)}).")
    return key, higher


# ----------------------------------------------------------------------------- reports


def _report(plans: dict[str, _MethodTune], target: Target, base: RunConfig, request: dict, score: str) -> dict:
    """``tune.json``: per method every value's per-seed scores, mean, standard error, the choice, ties, extensions."""
    seeds = request["seeds"]
    rows_by_method, key, higher, n_val = [], None, True, None
    for m, mt in plans.items():
        first = mt.scores[label(mt.values[0])][seeds[0]]
        key, higher = _score_key(score, first, m)
        n_val = first.get("val_size")
        per_seed = {label(v): [mt.scores[label(v)][s][key] for s in seeds] for v in mt.values}
        means = {lab: _mean(ys) for lab, ys in per_seed.items()}
        order = [label(v) for v in mt.values]
        chosen = choose(means, order, higher)
        i = order.index(chosen)
        neighbours = ([order[j] for j in (i - 1, i + 1) if 0 <= j < len(order)] if mt.numeric
                      else [lab for lab in order if lab != chosen])
        added = {label(e["value"]): e for e in mt.extensions}
        values = []
        for v in mt.values:
            lab = label(v)
            row = {"value": v, "label": lab, "per_seed": per_seed[lab], "mean": means[lab],
                   "se": _se_of_mean(per_seed[lab]), "chosen": lab == chosen, "added": lab in added,
                   "round": mt.scores[lab][seeds[0]].get("round")}
            if lab in neighbours:
                row["vs_choice"] = separation(per_seed[chosen], per_seed[lab], higher_is_better=higher,
                                              accuracy=key == "val_accuracy", n_val=n_val)
            values.append(row)
        tied = [r["label"] for r in values if "vs_choice" in r and not r["vs_choice"]["separated"]]
        choice = next(r["value"] for r in values if r["chosen"])
        rows_by_method.append({
            "method": m, "title": METHODS[m].title, "where": target.where(m), "grid": [label(v) for v in mt.grid],
            "config_value": target.current(request["config_data"], m), "values": values, "choice": choice,
            "choice_label": chosen, "tie": bool(tied), "tied_with": tied, "extensions": mt.extensions,
            "stopped": mt.stopped, "at_edge": mt.numeric and chosen in (order[0], order[-1]),
        })
    return {
        "request": request, "finished": True, "param": target.param, "option": target.option,
        "run_wide": target.run_wide, "score": key, "higher_is_better": higher, "val_size": n_val, "seeds": seeds,
        "setting": {"config": request["config"], "name": base.name, "model": base.model, "dataset": base.dataset,
                    "clients": base.clients, "ranks": base.ranks, "partition": base.partition, "alpha": base.alpha,
                    "rounds": base.rounds, "local_steps": base.local_steps, "local_epochs": base.local_epochs},
        "rule": {"choice": "the best mean over the seeds; equal means: the smaller value (grid order if not numeric)",
                 "separation": "the mean per-seed difference to each neighbour > its standard error, the larger "
                               "of sd(d, ddof=1)/sqrt(seeds) (paired over seeds) and, for accuracy, the binomial "
                               "sqrt(p(1-p)/(S N) + q(1-q)/(S N)) over seeds x validation examples; no standard "
                               "error (one seed, not accuracy): a tie",
                 "extension": "a numeric grid whose best mean is at an edge gets one value beyond it (the same "
                              f"ratio if every value is positive, else the same step), at most "
                              f"{request['max_extensions']} per method" + (
                                  f", within lr bounds [{LR_BOUNDS[0]:g}, {LR_BOUNDS[1]:g}]"
                                  if target.option == "lr" else "")},
        "methods": rows_by_method,
    }


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _how(report: dict) -> list[str]:
    """The sentences that say how and on what the choices were made (tune.md and tuned.toml's header)."""
    s, r = report["setting"], report["rule"]
    direction = "higher" if report["higher_is_better"] else "lower"
    return [
        f"Setting: {s['config']} ({s['name']}: {s['model']} / {s['dataset']}, {s['clients']} clients, ranks "
        f"{s['ranks']}, {s['partition']} alpha {s['alpha']}, {s['rounds']} rounds).",
        f"Score: {report['score']} of the global model after the last round ({direction} is better), on the "
        f"validation split: {report['val_size']} examples held out of the training data (no test score was used).",
        f"Seeds: {', '.join(map(str, report['seeds']))} (reproductions report seeds 0..{MAX_SEEDS - 1}).",
        f"Choice: {r['choice']}.",
        f"Separation: {r['separation']}.",
        f"Edges: {r['extension']}.",
    ]


def _verdict(row: dict) -> str:
    text = f"{row['where']} = {row['choice_label']}"
    if row["tie"]:
        text += f" (TIE: not separated by more than a standard error from {', '.join(row['tied_with'])})"
    else:
        text += " (separated from its neighbours)"
    if row["extensions"]:
        text += f"; {len(row['extensions'])} value(s) added past the edges ({', '.join(label(e['value']) for e in row['extensions'])})"
    if row["stopped"]:
        text += f"; STILL AT AN EDGE: {row['stopped']}"
    return text


def tune_markdown(report: dict) -> str:
    """``tune.md``: how the choices were made, a summary, then per method every value's scores."""
    lines = [f"# Tune: `{report['param']}` on `{report['setting']['name']}`", "", *_how(report), "",
             "| method | choice | grid (values added past an edge) | tie | edge |", "|---|---|---|---|---|"]
    for row in report["methods"]:
        values = ", ".join(v["label"] + (" (added)" if v["added"] else "") for v in row["values"])
        tie = ("tie with " + ", ".join(row["tied_with"])) if row["tie"] else "separated"
        lines.append(f"| {row['title']} | `{row['where']} = {row['choice_label']}` | {values} | {tie} | "
                     f"{row['stopped'] or 'interior'} |")
    seeds = report["seeds"]
    for row in report["methods"]:
        lines += ["", f"## {row['title']} (`{row['method']}`)", "",
                  f"Config's value: {label(row['config_value'])}. Grid asked: {', '.join(row['grid'])}.", "",
                  f"| {row['where']} | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | SE of mean | choice minus value ± SE | |",
                  "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
        for v in row["values"]:
            vs = v.get("vs_choice")
            se = "(no SE)" if vs is None or vs["se"] is None else f"± {_num(vs['se'])}"
            diff = "-" if vs is None else (f"{vs['difference']:+.4f} {se}"
                                           f" {'separated' if vs['separated'] else '**tie**'}")
            mark = ("**chosen**" if v["chosen"] else "") + (" added" if v["added"] else "")
            lines.append(f"| {v['label']} | " + " | ".join(_num(y) for y in v["per_seed"])
                         + f" | {_num(v['mean'])} | {_num(v['se'])} | {diff} | {mark.strip()} |")
        lines += ["", f"Result: {_verdict(row)}."]
        for e in row["extensions"]:
            lines.append(f"- added {label(e['value'])}: the best mean was {label(e['best_before'])}, at the "
                         f"{e['edge']} edge.")
    return "\n".join(lines) + "\n"


def tuned_toml(report: dict) -> str:
    r"""``tuned.toml``: a comment header (how and on what), then the choices as ``[method]`` tables (or a top-level
    key for a run-wide parameter) that a config's ``tuned`` key merges in. Checked to read back as written."""
    import tomllib

    lines = [f"# Chosen by lowrank-fed tune --param {report['param']} on validation data only.",
             *(f"# {line}" for line in _how(report)), "#"]
    lines += [f"# {row['method']}: {_verdict(row)}" for row in report["methods"]]
    lines.append("# Merge into a run config with: tuned = \"<path to this file>\" (relative to the config).")
    lines = [line.replace("\n", " ") for line in lines]
    body: dict[str, Any] = {}
    if report["run_wide"]:
        (row,) = report["methods"]
        lines += [f"{report['option']} = {label(row['choice'])}"]
        body[report["option"]] = row["choice"]
    else:
        for row in report["methods"]:
            lines += ["", f"[{row['method']}]", f"{report['option']} = {label(row['choice'])}"]
            body[row["method"]] = {report["option"]: row["choice"]}
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != body:  # a value label() cannot write as TOML: a defect here, never a silent change
        raise RuntimeError(f"tuned.toml would not read back as the choices {body}:\n{text}")
    return text


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` command's arguments to ``parser``."""
    parser.add_argument("config", metavar="CONFIG.toml", help="the setting: a run config with a validation split")
    parser.add_argument("--param", default="lr", metavar="NAME",
                        help="lr (each method's [method] lr; default), METHOD.OPTION (e.g. clair.rank), a method "
                             "option, or a numeric run-wide key (with one method)")
    parser.add_argument("--grid", nargs="+", default=None, metavar="V",
                        help="the values (TOML values); default for lr: the config's lr x 1/3, 1, 3")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                        help=f"tuning seeds, each >= {MAX_SEEDS} (default {' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--methods", nargs="+", default=None, metavar="M", help="default: the config's methods")
    parser.add_argument("--score", choices=SCORES, default="metric",
                        help="metric: val_accuracy (val_perplexity for generation; default); loss: val_loss")
    parser.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS, metavar="N",
                        help=f"values added past the grid's edges per method, at most (default {MAX_EXTENSIONS})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for run (e.g. val_size=200)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/tune/<name>-<param>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier tune in the output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """``lowrank-fed tune``: exit status 0 done, 2 bad arguments or config, 3 a packaged model missing, 130 interrupted."""
    from .catalog import PackageMissingError

    try:
        grid = None if args.grid is None else [parse_value(v) for v in args.grid]
        report = tune(args.config, param=args.param, grid=grid, seeds=args.seeds, methods=args.methods,
                      score=args.score, max_extensions=args.max_extensions, overrides=args.overrides, out=args.out,
                      overwrite=args.overwrite, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except PackageMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; the same command continues the tune (its finished trials are reused)", file=sys.stderr)
        return 130
    for row in report["methods"]:
        print(f"{row['method']}: {_verdict(row)}")
    print(f"choices: {report['out']}/tuned.toml; scores: {report['out']}/tune.md")
    return 0
