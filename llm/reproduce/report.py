r"""A reproduction's report: ``report.json`` (every per-seed number), ``report.md`` (the claims table, every paired
comparison with its interval, the runs' settings, each config's methods) and ``claims.png`` (one panel per config).

Everything here is a function of the finished runs and the config files: :func:`write_report` on the same runs
writes the same bytes, which is what ``lowrank-fed reproduce --analyse-only`` relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import EXECUTION_KEYS, ConfigError, RunConfig, load_config, same_run_keys, tuned_paths
from ..outputs import atomic_write_text
from .analysis import Experiment, describe
from .runs import Results, Run
from .tune_report import tuned_ties
from .verdicts import DEPENDS, MIN_SEEDS, mean_sd

__all__ = ["write_report", "report_markdown", "SETTING_KEYS", "DEFAULT_SCALING"]


#: The settings every report states per config, read from its runs' own ``config.json``.
SETTING_KEYS = ("model", "clients", "rounds", "local_steps", "batch_size", "lr", "lora_alpha", "lora_scaling",
                "eval_size", "train_size")
#: ``lora_scaling`` of a run whose config.json predates the key (the config default).
DEFAULT_SCALING = "alpha_over_r"


def _run_setting(config: dict) -> dict:
    """A run's config with ``lora_scaling`` filled in where it predates the key (it then used the default)."""
    return {**config, "lora_scaling": config.get("lora_scaling") or DEFAULT_SCALING}


def _as_now(stored: dict, defaults: dict) -> dict:
    """A run's stored config with every key added since at its default, in entries too (an ``[[attacks]]``
    entry's ``from_round``): read back through :class:`RunConfig`, or, where it no longer validates, merged with
    the top-level ``defaults``."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(same_run_keys(stored)).to_dict()))
    except ConfigError:
        return {**defaults, **stored}


def _settings(experiment: Experiment, results: Results, config_root: Path) -> dict[str, dict]:
    r"""Per config: its runs' settings (:data:`SETTING_KEYS` and each method's own ``lr``, per seed) and every key in
    which the runs differ from the config file as it is now (``"differs"``: key -> [runs' value, file's value]),
    and the choices its tuned files record as tied with a neighbour (``"ties"``: method -> text; :func:`tuned_ties`)."""
    out = {}
    defaults = json.loads(json.dumps(RunConfig().to_dict()))
    for stem in experiment.configs:
        path = config_root / experiment.name / f"{stem}.toml"
        now = json.loads(json.dumps(RunConfig.from_dict(load_config(path)).to_dict())) if path.is_file() else None
        by_seed = results.get(stem) or {}
        runs = [_run_setting(_as_now(by_seed[s].config, defaults)) for s in sorted(by_seed)]
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
        ties = {m: t for f in (tuned_paths(path) if path.is_file() else []) for m, t in tuned_ties(f).items()}
        if ties:
            entry["ties"] = dict(sorted(ties.items()))
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


def _describe(experiment: Experiment, results: Results, config_root: Path) -> str:
    """``Experiment.differences`` filled from the runs' own config.json (the config file's values where none ran)."""
    settings = {}
    for stem in experiment.configs:
        if results.get(stem):
            settings[stem] = [_run_setting(results[stem][s].config) for s in sorted(results[stem])]
        elif (config_root / experiment.name / f"{stem}.toml").is_file():
            settings[stem] = [_run_setting(RunConfig.from_dict(
                load_config(config_root / experiment.name / f"{stem}.toml")).to_dict())]
    return describe(experiment.differences, settings)


def write_report(experiment: Experiment, results: Results, out: Path, *, quick: bool, timing: dict | None,
                 config_root: Path) -> dict:
    """Analyse ``results``, write ``report.json``, ``report.md`` and ``claims.png`` into ``out``; return the report.

    ``config_root`` holds the experiment's config files (``<config_root>/<name>/<stem>.toml``): the report states
    where the runs differ from them, and a config without runs is described from its file. ``timing`` is None for
    ``--analyse-only`` (the report says nothing was run).
    """
    claims = experiment.claims(results, config_root)
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    report = {
        "experiment": experiment.name, "title": experiment.title, "paper": experiment.paper, "quick": quick,
        "out": str(out), "seeds": seeds, "configs": list(experiment.configs),
        "differences": _describe(experiment, results, config_root),
        "settings": _settings(experiment, results, config_root),
        "analysis_only": timing is None, **(timing or {}),
        "run_seconds_total": _total_run_seconds(results),
        "claims": [c.to_dict() for c in claims],
        "methods": {stem: _method_table(by_seed) for stem, by_seed in results.items() if by_seed},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True, default=_json_default))
    atomic_write_text(out / "report.md", report_markdown(report))
    _plot(report, out / "claims.png")
    return report


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _total_run_seconds(results: Results) -> float:
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
              "method above the majority class, a model the claim needs trained that had not learnt in enough "
              "seeds, learning rates chosen for another setting, or a tie on 5 seeds that even a winner right on "
              "every test example would not have won (at the ceiling; the cell says which).", ""]
    if any(c.get("twin") for c in report["claims"]):
        lines += ["Scale conventions: a claim that reads a config with a constant twin (`<config>_constant`, "
                  "`lora_scaling = \"constant\"`) is analysed on both; the published verdict is the one both agree "
                  f"on, **{DEPENDS}** where they disagree (both sets of numbers are given, the twin's marked "
                  "`[constant]`); where only one has runs, that one's, and the cell says which (\"alpha_over_r "
                  "only\").", ""]
    lines += [f"How this differs from the paper: {report['differences']}", ""]
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
        interval = "-" if comp["low"] is None else f"[{comp['low']:+.3f}, {comp['high']:+.3f}] (t, n - 1 df" + (
            ", spread floored at the se" if comp.get("sd_floor", 0) > (comp["sd"] or 0) else "") + ")"
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
    notes, ties = [], []
    for stem, e in settings.items():
        seeds = ", ".join(map(str, e["seeds"])) if e["seeds"] else "none (config file)"
        lrs = ", ".join(f"{m} {v:g}" for m, v in e.get("method_lr", {}).items()) or "-"
        lines.append(f"| `{stem}` | {seeds} | " + " | ".join(cell(e.get(k)) for k in SETTING_KEYS) + f" | {lrs} |")
        if e.get("differs"):
            notes.append(f"- `{stem}`: the runs used " + "; ".join(
                f"{k} = {cell(ran)} (the config file now says {cell(now)})" for k, (ran, now) in e["differs"].items()))
        if e.get("ties"):
            ties.append(f"- `{stem}`: " + "; ".join(f"{m} {t}" for m, t in e["ties"].items()))
    lines.append("")
    if notes:
        lines += ["These runs differ from the config files as they are now (the report describes the runs):", "",
                  *notes, ""]
    if ties:
        lines += ["Ties in the tune: validation did not separate these choices from a neighbouring value by more than "
                  "a standard error (the config's tuned file). Every comparison with such a method was run at its "
                  "chosen value only, and may read differently at the tied one:", "", *ties, ""]
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
