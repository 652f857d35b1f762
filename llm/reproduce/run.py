r"""``lowrank-fed reproduce``: running an experiment's configs over seeds (:func:`reproduce`) or re-reading its
finished runs (:func:`analyse`), then writing its report (:mod:`.report`); finished run folders are read by
:mod:`.runs`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..outputs import OutputFolderError, clear_folder, output_path, plan_output
from .claims import EXPERIMENTS, Experiment
# names this module held before the report and the run folders moved out, kept importable from here
from .report import (DEFAULT_SCALING, SETTING_KEYS, _comparison_cells, _describe, _fmt,  # noqa: F401
                     _json_default, _method_table, _plot, _run_setting, _settings, _settings_markdown,
                     _total_run_seconds, report_markdown, write_report)
from .runs import MAX_SEEDS, Results, find_runs, finished_run, load_run, unfinished_run

__all__ = ["CONFIG_ROOT", "add_arguments", "main", "reproduce", "analyse", "quick_config", "load_run", "find_runs",
           "SETTING_KEYS"]

#: The former private name of :func:`~.runs.finished_run` (``lowrank-fed tune`` imported it).
_finished = finished_run
#: The former private name of :func:`~.report.write_report`.
_write_report = write_report

# configs/reproduce/ of the checkout (llm/ sits beside configs/).
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "reproduce"
# --quick: the packaged models swapped for tiny random ones of the same task.
QUICK_MODELS = {"minilm": "tiny-bert", "smollm2": "tiny-llama"}
QUICK_SEEDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``reproduce`` command's arguments to ``parser``."""
    parser.add_argument("name", nargs="?", choices=sorted(EXPERIMENTS), metavar="NAME",
                        help=f"the experiment: one of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--list", action="store_true", help="list the experiments and stop")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"seeds 0..N-1 (default 3; {QUICK_SEEDS} with --quick); at least 2 for a spread")
    parser.add_argument("--quick", action="store_true",
                        help="plumbing check: tiny random models, a few steps; the numbers mean nothing")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default runs/reproduce/NAME, or NAME-quick with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--configs", nargs="+", default=None, metavar="STEM",
                        help="run only these of the experiment's configs (e.g. minilm_bbc); the report still reads "
                             "every finished run in --out")
    parser.add_argument("--analyse-only", action="store_true",
                        help="run nothing: rewrite report.md, report.json and claims.png from the finished runs "
                             "already in --out (configs without runs: 'not run yet')")


def quick_config(data: dict) -> dict:
    """A config dict shrunk to a plumbing check: tiny models, at most 2 rounds of 2 steps, small splits.

    A key the config does not set is read at :class:`RunConfig`'s default (one source for the defaults)."""
    out = dict(data)

    def value(key: str) -> int:
        return int(out.get(key, RunConfig.model_fields[key].default))

    out["model"] = QUICK_MODELS.get(out.get("model", RunConfig.model_fields["model"].default), out.get("model"))
    out["rounds"] = min(value("rounds"), 2)
    out["local_steps"] = 2
    out["eval_every"] = 1
    out["eval_size"] = min(value("eval_size"), 40)
    out["max_length"] = min(value("max_length"), 48)
    if out.get("train_size"):
        out["train_size"] = min(int(out["train_size"]), 240)
    if "val_size" in out and out["val_size"]:
        out["val_size"] = min(int(out["val_size"]), 20)
    out["rouge_size"] = min(value("rouge_size"), 2)
    out["max_new_tokens"] = min(value("max_new_tokens"), 4)
    return out


def _configs(experiment: Experiment, seeds: list[int], quick: bool,
             only: Sequence[str] | None = None) -> dict[str, dict[int, RunConfig]]:
    """Every (config, seed) of the experiment (``only``: of those configs), validated before anything runs."""
    folder = CONFIG_ROOT / experiment.name
    unknown = sorted(set(only or ()) - set(experiment.configs))
    if unknown:
        raise ConfigError(f"--configs: {unknown} are not configs of 'reproduce {experiment.name}'; expected some of "
                          f"{list(experiment.configs)}.")
    out: dict[str, dict[int, RunConfig]] = {}
    for stem in experiment.configs:
        if only and stem not in only:
            continue
        path = folder / f"{stem}.toml"
        if not path.is_file():
            raise ConfigError(f"reproduce {experiment.name}: config '{path}' is missing; expected the files "
                              f"{[f'{s}.toml' for s in experiment.configs]} in '{folder}'.")
        data = load_config(path)
        if quick:
            data = quick_config(data)
        out[stem] = {s: RunConfig.from_dict({**data, "seed": s}) for s in seeds}
    return out


def reproduce(name: str, *, seeds: int | None = None, quick: bool = False, out: str | Path | None = None,
              progress: bool = True, log=print, configs: Sequence[str] | None = None) -> dict:
    """Run experiment ``name`` over ``seeds`` seeds (finished runs reused) and write its report; return it.

    ``configs``: run only these of its configs (a setting tuned and rerun on its own while the others wait for
    compute); the report reads the other configs' finished runs in ``out`` as :func:`analyse` does."""
    from ..runner.simulation import run_experiment

    experiment = EXPERIMENTS[name]
    n_seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else 3)
    if not 1 <= n_seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be from 1 to {MAX_SEEDS}; got {n_seeds}.")
    seed_list = list(range(n_seeds))
    try:
        out = output_path(out, Path("runs") / "reproduce" / (f"{name}-quick" if quick else name))
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    planned = _configs(experiment, seed_list, quick, configs)  # raises before anything is written
    try:  # a new folder, or one holding this experiment's runs or report; never a run's folder or anything else
        plan_output(out, signature=("report.json", *experiment.configs), layout=("report.md", "claims.png"),
                    inputs=[CONFIG_ROOT / name],
                    hint=f"Expected a new folder or one holding an earlier 'reproduce {name}'; choose another --out.")
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    stale = [str(out / stem / f"seed{s}") for stem, by_seed in planned.items() for s, cfg in by_seed.items()
             if (out / stem / f"seed{s}" / "summary.json").is_file()
             and not finished_run(out / stem / f"seed{s}", cfg)]
    if stale:  # a finished result is never deleted to make room
        raise ConfigError(f"--out '{out}': {len(stale)} folders hold finished runs of other configs ({stale[0]}"
                          f"{', ...' if len(stale) > 1 else ''}); nothing was changed. Move them away or choose "
                          "another --out.")
    out.mkdir(parents=True, exist_ok=True)
    results: Results = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for seed in seed_list:
        for stem, by_seed in planned.items():
            cfg, folder = by_seed[seed], out / stem / f"seed{seed}"
            if finished_run(folder, cfg):
                log(f"[{name}] {stem}, seed {seed}: reusing the finished run in {folder}")
            else:
                resume = unfinished_run(folder, cfg)  # each method from its last checkpoint
                log(f"[{name}] {stem}, seed {seed}: " + (f"resuming the unfinished run in {folder}" if resume
                                                         else f"running into {folder}"))
                if folder.exists() and not resume:  # another config's unfinished run (finished ones refused above)
                    clear_folder(folder)
                t0 = time.perf_counter()
                run_experiment(cfg, folder, progress=progress, resume=resume)
                seconds[f"{stem}/seed{seed}"] = time.perf_counter() - t0
            results.setdefault(stem, {})[seed] = load_run(folder)
    if configs:  # the configs not run this time: their finished runs, as --analyse-only reads them
        results.update({stem: by_seed for stem, by_seed in find_runs(experiment, out).items() if stem not in planned})
    return write_report(experiment, results, out, quick=quick, config_root=CONFIG_ROOT,
                        timing={"seconds_this_call": time.perf_counter() - start, "run_seconds": seconds})


def analyse(name: str, *, out: str | Path | None = None, log=print) -> dict:
    r"""Rewrite experiment ``name``'s report from the finished runs in ``out``; run nothing.

    ``out`` is new (every claim "not run yet") or holds this experiment's runs or report, and may hold anything
    else the experiment made beside them (prelort's ``slot_scaling/``): only ``report.md``, ``report.json`` and
    ``claims.png`` are written. A run's own folder (a ``summary.json`` at its top) is refused. The report's setting
    is read from the runs' own ``config.json``; keys where they differ from the config file now are listed.
    """
    experiment = EXPERIMENTS[name]
    try:
        out = output_path(out, Path("runs") / "reproduce" / name)
        plan_output(out, signature=("report.json", *experiment.configs), layout=("*",),
                    inputs=[CONFIG_ROOT / name],
                    hint=f"Expected a folder holding an earlier 'reproduce {name}' (its report.json or a config's "
                         "runs); choose another --out.")
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    if (out / "summary.json").is_file():
        raise ConfigError(f"--out '{out}' is a run's folder (it holds summary.json); expected the folder of a "
                          f"'reproduce {name}', which holds one folder per config. Nothing was written.")
    results = find_runs(experiment, out)
    quick = bool(results) and all(run.config.get("model") in QUICK_MODELS.values()
                                  for by_seed in results.values() for run in by_seed.values())
    for stem in experiment.configs:
        log(f"[{name}] {stem}: " + (f"seeds {sorted(results[stem])}" if stem in results else "no finished runs"))
    out.mkdir(parents=True, exist_ok=True)
    return write_report(experiment, results, out, quick=quick, timing=None, config_root=CONFIG_ROOT)


def _list() -> str:
    lines = []
    for name, e in EXPERIMENTS.items():
        lines.append(f"{name:<9} {e.title}")
        lines.append(f"{'':<9} configs: configs/reproduce/{name}/{{{', '.join(e.configs)}}}.toml")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``lowrank-fed reproduce``: exit status 0 done, 2 bad arguments or config."""
    if args.list:
        print(_list())
        return 0
    if args.name is None:
        print("error: give an experiment NAME or --list; experiments: " + ", ".join(EXPERIMENTS), file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if getattr(args, "analyse_only", False):
            if args.seeds is not None or args.quick or getattr(args, "configs", None):
                raise ConfigError("--analyse-only runs nothing: it takes none of --seeds, --quick, --configs (it "
                                  "reads every finished run in --out).")
            report = analyse(args.name, out=args.out, log=log)
        else:
            report = reproduce(args.name, seeds=args.seeds, quick=args.quick, out=args.out,
                               progress=not args.no_progress, log=log, configs=getattr(args, "configs", None))
    except ConfigError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.quick:
        print("QUICK RUN: a plumbing check on tiny random models; the numbers below say nothing about the claims.")
    for c in report["claims"]:
        advice = f"; {c['advice']}" if c.get("advice") else ""
        why = f" ({c['why']})" if c.get("why") else ""
        print(f"- {c['claim']}: ours {c['ours']} (paper: {c['paper']}) -> {c['verdict']}{why}{advice}")
    print(f"report: {report['out']}/report.md")
    return 0
