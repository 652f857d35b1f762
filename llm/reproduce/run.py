r"""Running an experiment's configs over seeds, and writing its report (``lowrank-fed reproduce``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError, RunConfig, load_config
from ..outputs import OutputFolderError, clear_folder, output_path, plan_output
from ..runner.checkpoint import atomic_write_text
from .claims import EXPERIMENTS, Claim, Experiment, Run, mean_sd
from .verdicts import MIN_SEEDS

__all__ = ["CONFIG_ROOT", "add_arguments", "main", "reproduce", "quick_config", "load_run"]

# configs/reproduce/ of the checkout (llm/ sits beside configs/).
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "reproduce"
# --quick: the packaged models swapped for tiny random ones of the same task.
QUICK_MODELS = {"minilm": "tiny-bert", "smollm2": "tiny-llama"}
QUICK_SEEDS = 2
#: The most seeds a reproduction takes (each is a full run of every config: hours each on this machine).
MAX_SEEDS = 100


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


def quick_config(data: dict) -> dict:
    """A config dict shrunk to a plumbing check: tiny models, at most 2 rounds of 2 steps, small splits."""
    out = dict(data)
    out["model"] = QUICK_MODELS.get(out.get("model", "minilm"), out.get("model", "minilm"))
    out["rounds"] = min(int(out.get("rounds", 4)), 2)
    out["local_steps"] = 2
    out["eval_every"] = 1
    out["eval_size"] = min(int(out.get("eval_size", 200)), 40)
    out["max_length"] = min(int(out.get("max_length", 64)), 48)
    if out.get("train_size"):
        out["train_size"] = min(int(out["train_size"]), 240)
    if "val_size" in out and out["val_size"]:
        out["val_size"] = min(int(out["val_size"]), 20)
    out["rouge_size"] = min(int(out.get("rouge_size", 16)), 2)
    out["max_new_tokens"] = min(int(out.get("max_new_tokens", 24)), 4)
    return out


def load_run(folder: Path) -> Run:
    """A finished run's summary rows, per-round history and set-up, by method, and its config."""
    summary = {row["method"]: row for row in json.loads((folder / "summary.json").read_text())}
    history: dict[str, list[dict]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            history.setdefault(row["method"], []).append(row)
    config = folder / "config.json"
    return Run(summary, history, json.loads((folder / "setup.json").read_text()),
               json.loads(config.read_text()) if config.is_file() else {})


def _configs(experiment: Experiment, seeds: list[int], quick: bool) -> dict[str, dict[int, RunConfig]]:
    """Every (config, seed) of the experiment, validated before anything runs."""
    folder = CONFIG_ROOT / experiment.name
    out: dict[str, dict[int, RunConfig]] = {}
    for stem in experiment.configs:
        path = folder / f"{stem}.toml"
        if not path.is_file():
            raise ConfigError(f"reproduce {experiment.name}: config '{path}' is missing; expected the files "
                              f"{[f'{s}.toml' for s in experiment.configs]} in '{folder}'.")
        data = load_config(path)
        if quick:
            data = quick_config(data)
        out[stem] = {s: RunConfig.from_dict({**data, "seed": s}) for s in seeds}
    return out


def _finished(folder: Path, cfg: RunConfig) -> bool:
    r"""Whether ``folder`` holds a finished run of exactly ``cfg``.

    The stored ``config.json`` is read back through :meth:`RunConfig.from_dict` before it is compared, so a key
    added to the config after the run was made (absent from its ``config.json``) takes its default, which by the
    project's rule leaves an existing config's behaviour unchanged (``lora_scaling``'s ``alpha_over_r`` is the
    scale every earlier run used): a config that now spells that default out still finds the run. Any value that
    differs, or a stored config that no longer validates, is not the same run.
    """
    try:
        stored = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, ConfigError):
        return False
    return (folder / "summary.json").is_file() and _as_json(stored) == _as_json(cfg)


def _as_json(cfg: RunConfig) -> dict:
    """``cfg`` as its ``config.json`` holds it (JSON types: lists, not tuples)."""
    return json.loads(json.dumps(cfg.to_dict()))


def reproduce(name: str, *, seeds: int | None = None, quick: bool = False, out: str | Path | None = None,
              progress: bool = True, log=print) -> dict:
    """Run experiment ``name`` over ``seeds`` seeds (finished runs reused) and write its report; return it."""
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
    configs = _configs(experiment, seed_list, quick)  # raises before anything is written
    try:  # a new folder, or one holding this experiment's runs or report; never a run's folder or anything else
        plan_output(out, signature=("report.json", *experiment.configs), layout=("report.md", "claims.png"),
                    inputs=[CONFIG_ROOT / name],
                    hint=f"Expected a new folder or one holding an earlier 'reproduce {name}'; choose another --out.")
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    stale = [str(out / stem / f"seed{s}") for stem, by_seed in configs.items() for s, cfg in by_seed.items()
             if (out / stem / f"seed{s}" / "summary.json").is_file() and not _finished(out / stem / f"seed{s}", cfg)]
    if stale:  # a finished result is never deleted to make room
        raise ConfigError(f"--out '{out}': {len(stale)} folders hold finished runs of other configs ({stale[0]}"
                          f"{', ...' if len(stale) > 1 else ''}); nothing was changed. Move them away or choose "
                          "another --out.")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, Run]] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for seed in seed_list:
        for stem, by_seed in configs.items():
            cfg, folder = by_seed[seed], out / stem / f"seed{seed}"
            if _finished(folder, cfg):
                log(f"[{name}] {stem}, seed {seed}: reusing the finished run in {folder}")
            else:
                log(f"[{name}] {stem}, seed {seed}: running into {folder}")
                if folder.exists():
                    clear_folder(folder)  # an unfinished run (finished ones of other configs were refused above)
                t0 = time.perf_counter()
                run_experiment(cfg, folder, progress=progress)
                seconds[f"{stem}/seed{seed}"] = time.perf_counter() - t0
            results.setdefault(stem, {})[seed] = load_run(folder)
    claims = experiment.analyse(results)
    report = {
        "experiment": name, "title": experiment.title, "paper": experiment.paper, "quick": quick, "out": str(out),
        "seeds": seed_list, "configs": list(experiment.configs), "differences": experiment.differences,
        "seconds_this_call": time.perf_counter() - start, "run_seconds": seconds,
        "run_seconds_total": _total_run_seconds(results),
        "claims": [c.to_dict() for c in claims],
        "methods": {stem: _method_table(by_seed) for stem, by_seed in results.items()},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True, default=_json_default))
    atomic_write_text(out / "report.md", report_markdown(report))
    _plot(report, out / "claims.png")
    return report


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _total_run_seconds(results: dict[str, dict[int, Run]]) -> float:
    """Wall seconds of every run (training, server and evaluation), from their summaries."""
    return float(sum(row["seconds"] for by_seed in results.values() for run in by_seed.values()
                     for row in run.summary.values()))


def _method_table(by_seed: dict[int, Run]) -> list[dict]:
    """Per method of one config: the final global score, the clients' score, MB moved; per seed and mean +- sd."""
    seeds = sorted(by_seed)
    first = by_seed[seeds[0]]
    rows = []
    for method, row in first.summary.items():
        entry = {"method": method, "title": row["title"], "metric": row["metric"]}
        for key in ("final", "local", "personal", "benign", "mb_up", "mb_down", "rouge_l"):
            values = [by_seed[s].summary[method].get(key) for s in seeds]
            if all(v is not None for v in values):
                entry[key] = {"per_seed": values, **mean_sd(values)}
        rows.append(entry)
    return rows


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    if stat.get("sd") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def report_markdown(report: dict) -> str:
    """``report.md``: the claims table, then each config's methods (mean ± sd over seeds)."""
    lines = [f"# Reproduction: {report['title']}", ""]
    if report["quick"]:
        lines += ["**QUICK RUN: a plumbing check on tiny random models with a few steps. These numbers say nothing "
                  "about the claims.**", ""]
    seeds = report["seeds"]
    lines += [f"Paper: {report['paper']}", "",
              f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); spreads are sample standard deviations over "
              f"seeds. Total run time of the runs: {report['run_seconds_total'] / 60:.1f} min.", "",
              "Verdicts: each claim is compared with each baseline on the same seed (a paired difference per seed) "
              "and gets a 95% Student-t interval over the seeds: **holds** if it lies above the claim's threshold, "
              "**tie** if it covers it, **does not hold** if it lies below; a claim against several baselines holds "
              f"only if it holds against each; fewer than {MIN_SEEDS} seeds: no verdict (**too few seeds**).", "",
              f"How this differs from the paper: {report['differences']}", "",
              "## Claims", "", "| claim | paper | ours | verdict | note |", "|---|---|---|---|---|"]
    for c in report["claims"]:
        advice = f"; {c['advice']}" if c.get("advice") else ""
        lines.append(f"| {c['claim']} | {c['paper']} | {c['ours']} | **{c['verdict']}**{advice} | {c['note']} |")
    lines += ["", "Per-seed values of every claim are in `report.json` (`claims[*].values`, `claims[*].comparisons`).",
              "", "## Paired comparisons", "",
              "| claim | against | per seed | mean | 95% interval (t, n - 1 df) | threshold | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        for comp in c.get("comparisons", []):
            per_seed = ", ".join(f"{d:+.3f}" for d in comp["differences"])
            if comp.get("example_se"):
                per_seed += " (se over test examples " + ", ".join(f"{se:.3f}" for se in comp["example_se"]) + ")"
            interval = "-" if comp["low"] is None else f"[{comp['low']:+.3f}, {comp['high']:+.3f}]"
            lines.append(f"| {c['claim']} | {comp['against']} | {per_seed} | {comp['mean']:+.3f} | {interval} | "
                         f"{comp['tol']:+.3f} | {comp['verdict']} |")
    lines.append("")
    for stem, rows in report["methods"].items():
        metric = rows[0]["metric"] if rows else "accuracy"
        lines += [f"## `{stem}`", "",
                  f"| method | global {metric} | clients' {metric} (own held-out) | per seed (global) | MB up / down |",
                  "|---|---|---|---|---|"]
        for r in rows:
            local = r.get("local") or r.get("personal")
            per_seed = ", ".join(f"{v:.3f}" for v in r["final"]["per_seed"]) if "final" in r else "-"
            mb = (f"{r['mb_up']['mean']:.1f} / {r['mb_down']['mean']:.1f}" if "mb_up" in r else "-")
            lines.append(f"| {r['title']} | {_fmt(r.get('final'))} | {_fmt(local)} | {per_seed} | {mb} |")
        lines.append("")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    """One panel per config: each method's final global score, mean with a bar of ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stems = [s for s, rows in report["methods"].items() if any("final" in r for r in rows)]
    if not stems:
        return
    cols = min(3, len(stems))
    rows_n = (len(stems) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, stem in zip(axes.ravel(), stems, strict=False):
        rows = [r for r in report["methods"][stem] if "final" in r]
        means = [r["final"]["mean"] for r in rows]
        sds = [r["final"]["sd"] or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=sds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), [r["title"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(stem, fontsize=9)
        ax.set_ylabel(f"global {rows[0]['metric']}", fontsize=8)
    for ax in axes.ravel()[len(stems):]:
        ax.axis("off")
    title = report["title"] + (" (QUICK: plumbing only)" if report["quick"] else "")
    fig.suptitle(f"{title}; seeds {report['seeds']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


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
    try:
        report = reproduce(args.name, seeds=args.seeds, quick=args.quick, out=args.out,
                           progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.quick:
        print("QUICK RUN: a plumbing check on tiny random models; the numbers below say nothing about the claims.")
    for c in report["claims"]:
        advice = f"; {c['advice']}" if c.get("advice") else ""
        print(f"- {c['claim']}: ours {c['ours']} (paper: {c['paper']}) -> {c['verdict']}{advice}")
    print(f"report: {report['out']}/report.md")
    return 0
