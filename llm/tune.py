r"""Choosing hyper-parameters on validation data only (``lowrank-fed tune``).

One config is one setting (model, data, budget, skew). For each method ``m`` of it, a parameter ``theta`` (``lr``,
any option of the method's table such as ``hafl.beta1`` or ``clair.rank``, or a numeric run-wide key) takes each
value ``v`` of a grid, and every (``m``, ``v``) runs as an ordinary run, method ``m`` alone, on each tuning seed
``s`` in ``S`` (default 100, 101, 102: disjoint from the seeds 0..99 a reproduction reports). A trial is scored on
the validation split only (``val_size`` examples held out of the training data), from the metrics the runner
already computes for the global model after the last round:

    y(m, v, s) = val_accuracy (higher is better), or val_perplexity / val_loss (lower is better).

A personalised method (``local``, FedSA-LoRA: each client keeps its own model; CLAIR and its references: each
client gets its own download) is scored on what its clients use instead: ``val_local_<metric>``, the mean over
clients of each client's own model on its share of the validation rows (the validation split cut per client by its
label mix, as its held-out test set is), over the benign clients where some are contaminated
(``val_benign_local_<metric>``, what the claims compare). With ``--score-on downloads`` (the config key
``val_downloads``) a method that is not personalised is scored the same way on each client's download (a truncation
of its global model at the client's rank).

No test score is used here (the trials score the test split, as every run does, and nothing looks at it). A trial
is scored at round 0 and after its last round only (``eval_every = rounds``): a run's trained bits do not depend on
when it is scored, and the rounds between would be compute that nothing reads (half of a HAFL trial's time).
When the tuned key is ``lr``, round 0 (the untrained start, the same for every rate and every method that is not
personalised) is scored by the first trial of each seed and reused by the others.

- **Choice**: ``v* = argbest_v ybar(v)``, ``ybar(v) = (1/|S|) sum_s y(m, v, s)``; equal means (within 1e-9,
  relative: sums of the same scores in another order differ in the last bit): the smaller value (the first in grid
  order for a grid that is not numeric).
- **Edges**: when ``v*`` (or a value whose mean equals ``v*``'s) is the smallest or largest value of a numeric grid,
  one value beyond that edge is added and run: ``v_new = v_e (v_e / v_n)`` (the same ratio) when every grid value
  is positive, else ``v_new = v_e + (v_e - v_n)`` (the same step), ``v_e`` the edge value and ``v_n`` its neighbour
  (rounded to 6 significant digits; to an integer for an integer key). Repeated until no value with the best mean
  is at an edge, or
  ``max_extensions`` values were added, or the next value would leave :data:`LR_BOUNDS` (for ``lr``) or is refused
  by the config (a rank of 0); the report says which.
- **Separation**: for each neighbour ``u`` of ``v*`` (the adjacent values of a numeric grid; every other value
  otherwise) the per-seed differences ``d_s = +-(y(v*, s) - y(u, s))`` (positive when ``v*`` is better) give
  ``dbar`` and a standard error ``se``, the larger of ``sd(d, ddof=1) / sqrt(|S|)`` (paired over seeds) and, for
  accuracy, ``sqrt(p (1 - p) / (|S| N) + q (1 - q) / (|S| N))`` (binomial over seeds x the ``N`` validation
  examples; :func:`separation`). ``v*`` is separated from ``u`` when ``dbar > se``; otherwise (or with no ``se``:
  one seed, not accuracy) the two are tied, and the report marks the tie.

- **Calibrated cut** (``calibrate = q``, CLAIR only, on an uncontaminated config): a method's decision cut and its
  rate are coupled (the cut is the benign scores' quantile at that rate), so each value ``v`` gets its own cut,
  ``z*(v) = calibrate_threshold({s_k}, q)``, the ``(1 - q)`` quantile of the benign scores pooled over the rounds
  and seeds of runs at ``v`` that flag nobody (``trials/<method>/<v>/calibration/seed<s>/``); ``v``'s trials then
  run with ``threshold = z*(v)``, and ``tuned.toml`` gets ``threshold = z*(v*)`` beside ``v*``.

Plain loop, not Optuna: the grids are small (3-6 values), every trial is a run folder that a rerun reuses, and the
reports must be byte-identical on a rerun; a pruner would stop trials from per-round scores on other seeds' noise,
and the separation test needs every seed of every neighbour anyway.

Outputs in ``DIR``: ``tuned.toml`` (``[method] option = value`` tables, or a top-level key for a run-wide
parameter, that a config's ``tuned`` key merges in), ``tune.json`` (every score), ``tune.md`` (the tables) and
``trials/<method>/<param>=<value>/seed<s>/`` (ordinary run folders).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank_fed.robust.detection import calibrate_threshold

from .config import ConfigError, RunConfig, apply_overrides, load_config, parse_value, tuned_paths
from .methods import method_options
from .outputs import OutputFolderError, atomic_write_text, clear_folder, hold_lock, output_path, plan_output
from .packages import check_model_package
from .reproduce.runs import MAX_SEEDS
# the parameter, the grid and the choice (tune_choice), the outputs (tune_report): every name importable from here
from .reproduce.tune_choice import (DEFAULT_SEEDS, LR_BOUNDS, MAX_EXTENSIONS, NOT_TUNED, SCORED_ON,  # noqa: F401
                                    SCORES, TUNE_LAYOUT, TUNE_SIGNATURE, Target, _folder_name, _is_number, _mean,
                                    _MethodTune, _numeric_field, _score_key, _se_of_mean, choose, extend_value, label,
                                    request_changes, resolve_param, same_mean, separation)
from .reproduce.tune_report import _how, _num, _verdict, tune_markdown, tuned_toml  # noqa: F401
from .reproduce.tune_report import tune_report as _report
from .reproduce.tune_trials import FLAGS_NOBODY, benign_scores, run_trial, trials_sharing_round0

__all__ = ["add_arguments", "main", "tune", "Target", "resolve_param", "extend_value", "separation", "choose",
           "run_trial", "DEFAULT_SEEDS", "LR_BOUNDS", "MAX_EXTENSIONS", "TUNE_SIGNATURE", "TUNE_LAYOUT"]


# ----------------------------------------------------------------------------- the tune


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
         progress: bool = True, log: Callable[[str], None] = print, trial: Callable[..., dict] | None = None,
         calibrate: float | None = None, score_on: str = "global") -> dict:
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
    calibrate : float, optional
        ``q``: each value's decision ``threshold`` calibrated to a false-flag rate ``q`` on runs at that value that
        flag nobody (module docstring); for methods with a ``threshold`` option (CLAIR) on a config without
        ``[[attacks]]``.
    score_on : {"global", "downloads"}
        ``downloads``: every method scored on what its clients receive, ``val_local_<metric>``, as a claim about
        downloads (HAFL's truncation) compares them: the trials run with ``val_downloads = true`` (a config that
        sets that key is scored so too).

    Raises
    ------
    ConfigError
        Every bad input, before anything is written.
    """
    config = Path(config)
    data = apply_overrides(load_config(config), overrides)
    base = _validated(data, f"config '{config}'")
    check_model_package(base.model)  # PackageMissingError: the packaged model is not installed
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
    if score_on not in SCORED_ON:
        raise ConfigError(f"--score-on: expected one of {', '.join(SCORED_ON)}; got {score_on!r}.")
    if score_on == "downloads":
        data = {**data, "val_downloads": True}
    if not 0 <= max_extensions <= 20:
        raise ConfigError(f"--max-extensions: expected an integer from 0 to 20; got {max_extensions}.")
    if methods:
        _validated({**data, "methods": list(methods)}, "--methods")
    target, methods = resolve_param(param, list(methods) if methods else None, list(base.methods))
    if calibrate is not None:
        _check_calibration(calibrate, target, methods, base, config)
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
               "score": score, "max_extensions": max_extensions, "calibrate": calibrate}  # None: as before it existed
    if plan == "existing":
        try:
            earlier = json.loads((out / "tune.json").read_text()).get("request")
        except (OSError, json.JSONDecodeError, AttributeError):
            earlier = None
        if earlier is None and (out / "tune.json").exists():
            raise ConfigError(f"--out '{out}': its tune.json cannot be read; nothing was changed. Use --overwrite "
                              "to replace it, or choose another --out.")
        keys = request_changes(earlier or {}, request)
        if earlier is not None and keys:  # the config's path and execution keys may differ; nothing else may
            raise ConfigError(f"--out '{out}' holds a tune of another request (it differs in: {', '.join(keys)}); "
                              "nothing was changed. Use --overwrite to replace it, or choose another --out.")
    if plan == "clear":
        clear_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    run = trial or trials_sharing_round0(target, progress, log)
    with hold_lock(out):
        atomic_write_text(out / "tune.json", _json({"request": request, "finished": False}))
        for m, mt in plans.items():
            _tune_method(mt, target, data, seeds, out, run, score, max_extensions, log, calibrate)
        report = _report(plans, target, base, request, score)
        atomic_write_text(out / "tune.json", _json(report))
        atomic_write_text(out / "tune.md", tune_markdown(report))
        atomic_write_text(out / "tuned.toml", tuned_toml(report))
    report["out"] = str(out)
    return report


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def _check_calibration(q: float, target: Target, methods: list[str], base: RunConfig, config: Path) -> None:
    if not 0 < q < 1:
        raise ConfigError(f"--calibrate-threshold: expected a false-flag rate between 0 and 1 (e.g. 0.05); got {q}.")
    if base.attacks:
        raise ConfigError(f"--calibrate-threshold: config '{config}' has [[attacks]]; the cut is calibrated on the "
                          "benign scores of uncontaminated runs (tune at gamma = 0, use the cut at every gamma).")
    without = [m for m in methods if "threshold" not in method_options(m).model_fields]
    if without:
        raise ConfigError(f"--calibrate-threshold: {', '.join(without)} has no `threshold` option (a detection cut, "
                          "as CLAIR's); tune it separately or pass --methods clair.")
    if target.run_wide or target.option in ("threshold", "z_threshold", "gap_level"):
        raise ConfigError(f"--calibrate-threshold calibrates the threshold at each value of a method option (lr, "
                          f"clair.rank); got --param {target.param}.")
    older = [m for m in methods if base.method_options.get(m, {}).get("z_threshold") is not None]
    if older:
        raise ConfigError(f"--calibrate-threshold: config '{config}' sets [{older[0]}] z_threshold, the former fixed "
                          "cut, which the calibrated threshold would contradict; remove it.")


def _cut(mt: _MethodTune, target: Target, data: dict, value: Any, seeds: list[int], out: Path, run, q: float,
         log) -> float:
    """The ``threshold`` calibrated at ``value`` (module docstring), from runs that flag nobody; kept in ``mt.cuts``."""
    lab = label(value)
    if lab not in mt.cuts:
        scores = []
        for s in seeds:
            log(f"[tune] {mt.method}, {target.where(mt.method)} = {lab}, seed {s}: calibration run (flags nobody)")
            folder = out / "trials" / mt.method / _folder_name(target, value) / "calibration" / f"seed{s}"
            run(_trial_config(target, data, mt.method, value, s, {"threshold": FLAGS_NOBODY}), folder)
            scores += benign_scores(folder, mt.method)
        cut = float(f"{calibrate_threshold(scores, q):.4g}")
        if not cut > 0:  # a z-score cut must be positive (CLAIR's option)
            raise ConfigError(f"--calibrate-threshold {q}: at {target.where(mt.method)} = {lab} the {1 - q:g} quantile "
                              f"of {len(scores)} benign scores is {cut:g}, not a positive cut; use a smaller Q.")
        mt.cuts[lab] = {"threshold": cut, "n_scores": len(scores)}
        log(f"[tune] {mt.method}, {target.where(mt.method)} = {lab}: threshold {cut:g} (the {1 - q:g} quantile of "
            f"{len(scores)} benign scores)")
    return mt.cuts[lab]["threshold"]


def _trial_config(target: Target, data: dict, method: str, value: Any, seed: int,
                  options: dict | None = None) -> RunConfig:
    # trials are not checkpointed: an interrupted trial runs again; finished ones are reused. They are scored at
    # round 0 and the last round only (eval_every = rounds): the choice reads the last round, and the scoring
    # schedule changes no trained bit (tests/llm/test_tune.py), so the rounds between are compute nobody reads
    trial = target.apply({**data, "methods": [method], "seed": seed, "checkpoint": False}, method, value)
    if options:  # a calibrated threshold beside the tuned value
        trial[method] = {**trial.get(method, {}), **options}
    rounds = trial.get("rounds", RunConfig().rounds)
    if isinstance(rounds, int) and rounds >= 1:  # else the validation below names the bad rounds
        trial["eval_every"] = rounds
    return _validated(trial, f"{target.where(method)} = {label(value)}, seed {seed}")


def _tune_method(mt: _MethodTune, target: Target, data: dict, seeds: list[int], out: Path, run, score: str,
                 max_extensions: int, log, calibrate: float | None = None) -> None:
    """Score every value on every seed, extending a numeric grid past an edge that holds the best mean."""
    while True:
        for v in mt.values:
            by_seed = mt.scores.setdefault(label(v), {})
            if all(s in by_seed for s in seeds):
                continue
            cut = {} if calibrate is None else {"threshold": _cut(mt, target, data, v, seeds, out, run, calibrate, log)}
            for s in seeds:
                if s not in by_seed:
                    log(f"[tune] {mt.method}, {target.where(mt.method)} = {label(v)}, seed {s}")
                    folder = out / "trials" / mt.method / _folder_name(target, v) / f"seed{s}"
                    by_seed[s] = run(_trial_config(target, data, mt.method, v, s, cut), folder)
        if not mt.numeric:
            return
        key, higher = _score_key(score, mt.scores[label(mt.values[0])][seeds[0]], mt.method,
                                 contaminated=bool(data.get("attacks")), downloads=bool(data.get("val_downloads")))
        means = {label(v): _mean([mt.scores[label(v)][s][key] for s in seeds]) for v in mt.values}
        best = choose(means, [label(v) for v in mt.values], higher)
        # an edge whose mean equals the best one is extended too: the tie-break chose the other value, but the
        # best may lie past that edge
        top = {label(v) for v in mt.values if same_mean(means[label(v)], means[best])}
        if not top & {label(mt.values[0]), label(mt.values[-1])}:
            return
        low = label(mt.values[0]) in top
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
    parser.add_argument("--score-on", choices=SCORED_ON, default="global",
                        help="global: the global model (a personalised method: its clients' own models; default); "
                             "downloads: what every client receives, on its share of the validation split")
    parser.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS, metavar="N",
                        help=f"values added past the grid's edges per method, at most (default {MAX_EXTENSIONS})")
    parser.add_argument("--calibrate-threshold", type=float, default=None, metavar="Q",
                        help="CLAIR: calibrate its decision threshold at each value to a false-flag rate Q (e.g. "
                             "0.05) on runs that flag nobody, and write the chosen value's beside it (a config "
                             "without [[attacks]])")
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
                      overwrite=args.overwrite, progress=not args.no_progress, calibrate=args.calibrate_threshold,
                      score_on=args.score_on,
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
