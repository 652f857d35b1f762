r"""Running an experiment's configs over seeds, and writing its report (``lowrank-fed reproduce``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..config import EXECUTION_KEYS, ConfigError, RunConfig, load_config, same_run_keys
from ..outputs import OutputFolderError, atomic_write_text, clear_folder, output_path, plan_output
from .claims import EXPERIMENTS, Claim, Experiment, Run, describe, mean_sd
from .verdicts import MIN_SEEDS

__all__ = ["CONFIG_ROOT", "add_arguments", "main", "reproduce", "analyse", "quick_config", "load_run", "find_runs",
           "SETTING_KEYS"]

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
    parser.add_argument("--analyse-only", action="store_true",
                        help="run nothing: rewrite report.md, report.json and claims.png from the finished runs "
                             "already in --out (configs without runs: 'not run yet')")


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
    differs, or a stored config that no longer validates, is not the same run; ``workers`` is not compared
    (:data:`~lowrank_fed.llm.config.EXECUTION_KEYS`).
    """
    try:
        stored = json.loads((folder / "config.json").read_text())
        # `workers` (how the run was computed) is not compared, nor validated against this machine's cores
        stored = RunConfig.from_dict(same_run_keys(stored) if isinstance(stored, dict) else stored)
    except (OSError, json.JSONDecodeError, ConfigError):
        return False
    return (folder / "summary.json").is_file() and stored.definition() == cfg.definition()


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
    return _write_report(experiment, results, out, quick=quick,
                         timing={"seconds_this_call": time.perf_counter() - start, "run_seconds": seconds})


#: The settings every report states per config, read from its runs' own ``config.json``.
SETTING_KEYS = ("model", "clients", "rounds", "local_steps", "batch_size", "lr", "lora_alpha", "lora_scaling",
                "eval_size", "train_size")
#: ``lora_scaling`` of a run whose config.json predates the key (the config default).
DEFAULT_SCALING = "alpha_over_r"


def _run_setting(config: dict) -> dict:
    """A run's config with ``lora_scaling`` filled in where it predates the key (it then used the default)."""
    return {**config, "lora_scaling": config.get("lora_scaling") or DEFAULT_SCALING}


def _settings(experiment: Experiment, results: dict[str, dict[int, Run]]) -> dict[str, dict]:
    r"""Per config: its runs' settings (:data:`SETTING_KEYS` and each method's own ``lr``, per seed) and every key in
    which the runs differ from the config file as it is now (``"differs"``: key -> [runs' value, file's value])."""
    out = {}
    for stem in experiment.configs:
        path = CONFIG_ROOT / experiment.name / f"{stem}.toml"
        now = json.loads(json.dumps(RunConfig.from_dict(load_config(path)).to_dict())) if path.is_file() else None
        by_seed = results.get(stem) or {}
        runs = [_run_setting(by_seed[s].config) for s in sorted(by_seed)]
        entry: dict = {"seeds": sorted(by_seed), "source": "runs" if runs else "config file (no runs)"}
        configs = runs or ([_run_setting(now)] if now else [])
        for key in SETTING_KEYS:
            values = []
            for c in configs:
                if c.get(key) not in values:
                    values.append(c.get(key))
            entry[key] = values[0] if len(values) == 1 else values
        entry["method_lr"] = {m: o["lr"] for m, o in sorted((configs[0].get("method_options") or {}).items())
                              if "lr" in o} if configs else {}
        if runs and now:
            differs = {}
            for key in sorted(set(now) | set(runs[0])):
                if key == "seed" or key in EXECUTION_KEYS:  # how a run was executed is not what it computed
                    continue
                ran = [c.get(key) for c in runs]
                want = _run_setting(now).get(key)
                if any(v != want for v in ran):
                    differs[key] = [ran[0] if all(v == ran[0] for v in ran) else ran, want]
            entry["differs"] = differs
        out[stem] = entry
    return out


def _describe(experiment: Experiment, results: dict[str, dict[int, Run]]) -> str:
    """``Experiment.differences`` filled from the runs' own config.json (the config file's values where none ran)."""
    settings = {}
    for stem in experiment.configs:
        if results.get(stem):
            settings[stem] = [_run_setting(results[stem][s].config) for s in sorted(results[stem])]
        elif (CONFIG_ROOT / experiment.name / f"{stem}.toml").is_file():
            settings[stem] = [_run_setting(RunConfig.from_dict(
                load_config(CONFIG_ROOT / experiment.name / f"{stem}.toml")).to_dict())]
    return describe(experiment.differences, settings)


def _write_report(experiment: Experiment, results: dict[str, dict[int, Run]], out: Path, *, quick: bool,
                  timing: dict | None) -> dict:
    """Analyse ``results``, write ``report.json``, ``report.md`` and ``claims.png`` into ``out``; return the report."""
    claims = experiment.claims(results, CONFIG_ROOT)
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    report = {
        "experiment": experiment.name, "title": experiment.title, "paper": experiment.paper, "quick": quick,
        "out": str(out), "seeds": seeds, "configs": list(experiment.configs),
        "differences": _describe(experiment, results), "settings": _settings(experiment, results),
        "analysis_only": timing is None, **(timing or {}),
        "run_seconds_total": _total_run_seconds(results),
        "claims": [c.to_dict() for c in claims],
        "methods": {stem: _method_table(by_seed) for stem, by_seed in results.items() if by_seed},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True, default=_json_default))
    atomic_write_text(out / "report.md", report_markdown(report))
    _plot(report, out / "claims.png")
    return report


def find_runs(experiment: Experiment, out: Path) -> dict[str, dict[int, Run]]:
    """Every finished run (a ``summary.json``) in ``out/<config>/seed<s>/``, whatever config it ran."""
    results: dict[str, dict[int, Run]] = {}
    for stem in experiment.configs:
        folder = out / stem
        if not folder.is_dir():
            continue
        for seed_dir in sorted(folder.iterdir()):
            name = seed_dir.name
            if name.startswith("seed") and name[4:].isdigit() and (seed_dir / "summary.json").is_file():
                results.setdefault(stem, {})[int(name[4:])] = load_run(seed_dir)
    return {stem: dict(sorted(by_seed.items())) for stem, by_seed in results.items()}


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
    return _write_report(experiment, results, out, quick=quick, timing=None)


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
              "Other outcomes: a 0/1 outcome per seed and round (CLAIR's detection) is counted, k/n, with a "
              "Clopper-Pearson 95% interval; a count (bytes, parameters) is exact, no interval; rounds to a target "
              "(an integer capped at the last round + 1) get a sign count over seeds. **not testable here**: no "
              "method above the majority class, or learning rates chosen for another setting.", "",
              f"How this differs from the paper: {report['differences']}", ""]
    if report.get("analysis_only"):
        lines += ["Analysis only (`--analyse-only`): this report was rewritten from the finished runs in this "
                  "folder; nothing was run.", ""]
    lines += _settings_markdown(report.get("settings") or {})
    lines += ["## Claims", "", "| claim | paper | ours | verdict | note |", "|---|---|---|---|---|"]
    for c in report["claims"]:
        advice = f"; {c['advice']}" if c.get("advice") else ""
        why = f" ({c['why']})" if c.get("why") else ""
        lines.append(f"| {c['claim']} | {c['paper']} | {c['ours']} | **{c['verdict']}**{why}{advice} | {c['note']} |")
    lines += ["", "Per-seed values of every claim are in `report.json` (`claims[*].values`, `claims[*].comparisons`).",
              "", "## Paired comparisons", "",
              "| claim | against | per seed | mean | 95% interval | threshold | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        for comp in c.get("comparisons", []):
            lines.append(f"| {c['claim']} | {comp['against']} | " + " | ".join(_comparison_cells(comp)) + " |")
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


def _comparison_cells(comp: dict) -> list[str]:
    """The per-seed, mean, interval, threshold and verdict cells of one comparison, by its kind."""
    kind = comp.get("kind", "t")
    if kind == "not run":
        return [f"not run yet: {comp.get('missing', '')}", "-", "-", "-", comp["verdict"]]
    if kind == "proportion":
        return [f"{comp['k']}/{comp['n']} (seeds x rounds)", f"{comp['mean']:.3f}",
                f"[{comp['low']:.3f}, {comp['high']:.3f}] (Clopper-Pearson)", f"{comp['tol']:.3f}", comp["verdict"]]
    per_seed = ", ".join(f"{d:+.3f}" for d in comp["differences"])
    if comp.get("example_se"):
        per_seed += " (se over test examples " + ", ".join(f"{se:.3f}" for se in comp["example_se"]) + ")"
    if kind == "exact":
        interval = "exact (a count, no interval)"
    elif kind == "sign":
        interval = f"sign count {comp['k_plus']} for, {comp['k_minus']} against, p = {comp['p_value']:.2f}"
    else:
        interval = "-" if comp["low"] is None else f"[{comp['low']:+.3f}, {comp['high']:+.3f}] (t, n - 1 df)"
    return [per_seed, f"{comp['mean']:+.3f}", interval, f"{comp['tol']:+.3f}", comp["verdict"]]


def _settings_markdown(settings: dict) -> list[str]:
    """The runs' settings per config, from their own config.json, and where they differ from the config file now."""
    if not settings:
        return []
    def cell(v):
        return " / ".join(map(str, v)) if isinstance(v, list) else str(v)
    lines = ["## Settings of the runs (their own config.json)", "",
             "| config | seeds | " + " | ".join(SETTING_KEYS) + " | methods' own lr |",
             "|---|---|" + "---|" * len(SETTING_KEYS) + "---|"]
    notes = []
    for stem, e in settings.items():
        seeds = ", ".join(map(str, e["seeds"])) if e["seeds"] else "none (config file)"
        lrs = ", ".join(f"{m} {v:g}" for m, v in e.get("method_lr", {}).items()) or "-"
        lines.append(f"| `{stem}` | {seeds} | " + " | ".join(cell(e.get(k)) for k in SETTING_KEYS) + f" | {lrs} |")
        if e.get("differs"):
            notes.append(f"- `{stem}`: the runs used " + "; ".join(
                f"{k} = {cell(ran)} (the config file now says {cell(now)})" for k, (ran, now) in e["differs"].items()))
    lines.append("")
    if notes:
        lines += ["These runs differ from the config files as they are now (the report describes the runs):", "",
                  *notes, ""]
    return lines


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
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if getattr(args, "analyse_only", False):
            if args.seeds is not None or args.quick:
                raise ConfigError("--analyse-only runs nothing: it takes neither --seeds nor --quick (it reads "
                                  "every finished run in --out).")
            report = analyse(args.name, out=args.out, log=log)
        else:
            report = reproduce(args.name, seeds=args.seeds, quick=args.quick, out=args.out,
                               progress=not args.no_progress, log=log)
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
