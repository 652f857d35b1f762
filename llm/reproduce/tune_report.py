r"""``lowrank-fed tune``'s outputs: ``tune.json`` (every trial's validation score, the choice, its separation, the
edge extensions; :func:`tune_report`), ``tune.md`` (the tables; :func:`tune_markdown`) and ``tuned.toml`` (the
choices a config's ``tuned`` key merges in; :func:`tuned_toml`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..methods import METHODS
from .runs import MAX_SEEDS
from .tune_choice import LR_BOUNDS, Target, _MethodTune, _mean, _score_key, _se_of_mean, choose, label, separation

__all__ = ["tune_report", "tune_markdown", "tuned_toml", "tuned_ties"]

#: How tuned.toml's header says that a choice tied with a neighbour (written by :func:`_verdict`, read back by
#: :func:`tuned_ties`).
TIE_TEXT = "TIE: not separated by more than a standard error from "


def tune_report(plans: dict[str, _MethodTune], target: Target, base: RunConfig, request: dict, score: str) -> dict:
    """``tune.json``: per method every value's per-seed scores, mean, standard error, the choice, ties, extensions."""
    seeds = request["seeds"]
    rows_by_method, keys, n_split = [], {}, None
    for m, mt in plans.items():
        first = mt.scores[label(mt.values[0])][seeds[0]]
        key, higher = keys[m] = _score_key(score, first, m, contaminated=bool(base.attacks),
                                           downloads=bool(request["config_data"].get("val_downloads")))
        n_split = first.get("val_size")
        n_val = n_split
        if "_local_" in key:  # a mean of per-client scores: its own effective number of examples, per seed
            n_key = key.rsplit("_", 1)[0] + "_n"
            ns = [mt.scores[label(mt.values[0])][s].get(n_key) for s in seeds]
            if any(not n for n in ns):
                raise ConfigError(f"{m}: trials without {n_key!r}, the effective number of validation examples of "
                                  f"{key!r}; they predate it: remove them to run them again.")
            n_val = len(ns) / sum(1.0 / n for n in ns)  # S N over seeds with N_s differing: S^2 / sum 1/N_s
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
                   "round": mt.scores[lab][seeds[0]].get("round"), **mt.cuts.get(lab, {})}
            if lab in neighbours:
                row["vs_choice"] = separation(per_seed[chosen], per_seed[lab], higher_is_better=higher,
                                              accuracy=key.endswith("_accuracy"), n_val=n_val)
            values.append(row)
        tied = [r["label"] for r in values if "vs_choice" in r and not r["vs_choice"]["separated"]]
        choice = next(r["value"] for r in values if r["chosen"])
        check = _global_check(mt, key, seeds, order, chosen, higher, n_split) if not METHODS[m].personalised else None
        rows_by_method.append({
            "method": m, "title": METHODS[m].title, "score": key, "where": target.where(m),
            "grid": [label(v) for v in mt.grid],
            "config_value": target.current(request["config_data"], m), "values": values, "choice": choice,
            "choice_label": chosen, "tie": bool(tied), "tied_with": tied, "extensions": mt.extensions,
            "stopped": mt.stopped, "at_edge": mt.numeric and chosen in (order[0], order[-1]),
            **({"threshold": mt.cuts[chosen]["threshold"]} if chosen in mt.cuts else {}),
            **({"global_check": check} if check else {}),
        })
    # the run-wide score names the global model's, unless every method is personalised
    key, higher = next((k for m, k in keys.items() if not METHODS[m].personalised), next(iter(keys.values())))
    return {
        "request": request, "finished": True, "param": target.param, "option": target.option,
        "run_wide": target.run_wide, "score": key, "higher_is_better": higher, "val_size": n_split, "seeds": seeds,
        "setting": {"config": request["config"], "name": base.name, "model": base.model, "dataset": base.dataset,
                    "clients": base.clients, "ranks": base.ranks, "partition": base.partition, "alpha": base.alpha,
                    "rounds": base.rounds, "local_steps": base.local_steps, "local_epochs": base.local_epochs},
        "rule": {"choice": "the best mean over the seeds; equal means (within 1e-9, relative): the smaller value "
                           "(grid order if not numeric)",
                 "separation": "the mean per-seed difference to each neighbour > its standard error, the larger "
                               "of sd(d, ddof=1)/sqrt(seeds) (paired over seeds) and, for accuracy, the binomial "
                               "sqrt(p(1-p)/(S N) + q(1-q)/(S N)) over seeds x validation examples; no standard "
                               "error (one seed, not accuracy): a tie",
                 "extension": "a numeric grid whose best mean is at an edge (the choice's, or one whose mean "
                              "equals it) gets one value beyond it (the same ratio if every value is positive, "
                              f"else the same step), at most "
                              f"{request['max_extensions']} per method" + (
                                  f", within lr bounds [{LR_BOUNDS[0]:g}, {LR_BOUNDS[1]:g}]"
                                  if target.option == "lr" else "")},
        "methods": rows_by_method,
    }


def _global_check(mt: _MethodTune, key: str, seeds: list[int], order: list[str], chosen: str, higher: bool,
                  n_val: int | None) -> dict | None:
    """Where the downloads were scored (``val_local_<metric>``, or over the benign clients ``val_benign_local_``),
    the value the global model's score of the same trials
    (``val_<metric>``) would choose, and on that score the downloads' choice against it (:func:`separation`);
    None where the global score is the one chosen on or a trial lacks it."""
    prefix = next((p for p in ("val_local_", "val_benign_local_") if key.startswith(p)), None)
    if prefix is None:
        return None
    gkey = "val_" + key[len(prefix):]
    if any(gkey not in mt.scores[lab][s] for lab in order for s in seeds):
        return None
    per_seed = {lab: [mt.scores[lab][s][gkey] for s in seeds] for lab in order}
    means = {lab: _mean(ys) for lab, ys in per_seed.items()}
    best = choose(means, order, higher)
    out = {"score": gkey, "choice_label": best, "same": best == chosen, "means": means}
    if best != chosen:
        out["vs_choice"] = separation(per_seed[best], per_seed[chosen], higher_is_better=higher,
                                      accuracy=gkey.endswith("_accuracy"), n_val=n_val)
    return out


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _how(report: dict) -> list[str]:
    """The sentences that say how and on what the choices were made (tune.md and tuned.toml's header)."""
    s, r = report["setting"], report["rule"]
    direction = "higher" if report["higher_is_better"] else "lower"
    if "_local_" not in report["score"]:
        scored = "the global model"
    elif report["request"]["config_data"].get("val_downloads"):  # --score-on downloads
        scored = ("each client's download (the global model where it is one; a personalised method's own model) on "
                  "its share, averaged over the clients")
    else:
        scored = "each client's own model, averaged"
    return [
        f"Setting: {s['config']} ({s['name']}: {s['model']} / {s['dataset']}, {s['clients']} clients, ranks "
        f"{s['ranks']}, {s['partition']} alpha {s['alpha']}, {s['rounds']} rounds).",
        f"Score: {report['score']} of {scored}"
        + f" after the last round ({direction} is better), on the "
        f"validation split: {report['val_size']} examples held out of the training data (no test score was used)"
        + "".join(f"; {row['title']}, personalised: {row['score']}, the mean over "
                  f"{'the benign ' if 'benign' in row['score'] else ''}clients of each client's own model on its share "
                  "of the validation split" for row in report["methods"]
                  if row.get("score", report["score"]) != report["score"]) + ".",
        f"Seeds: {', '.join(map(str, report['seeds']))} (reproductions report seeds 0..{MAX_SEEDS - 1}).",
        f"Choice: {r['choice']}.",
        f"Separation: {r['separation']}.",
        f"Edges: {r['extension']}.",
    ] + ([f"Threshold: each value's trials ran at the cut calibrated at that value, the "
          f"{1 - report['request']['calibrate']:g} quantile of the benign scores of runs at it that flag nobody "
          "(the same seeds)."] if report["request"].get("calibrate") else [])


def _verdict(row: dict) -> str:
    text = f"{row['where']} = {row['choice_label']}"
    if row["tie"]:
        text += f" ({TIE_TEXT}{', '.join(row['tied_with'])})"
    else:
        text += " (separated from its neighbours)"
    if row["extensions"]:
        text += f"; {len(row['extensions'])} value(s) added past the edges ({', '.join(label(e['value']) for e in row['extensions'])})"
    if row["stopped"]:
        text += f"; STILL AT AN EDGE: {row['stopped']}"
    if "threshold" in row:
        text += f"; threshold = {label(row['threshold'])}, calibrated at that value"
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
                  + " | mean | SE of mean | choice minus value ± SE | |" + (" threshold |" if "threshold" in row else ""),
                  "|---|" + "---|" * len(seeds) + "---|---|---|---|" + ("---|" if "threshold" in row else "")]
        for v in row["values"]:
            vs = v.get("vs_choice")
            se = "(no SE)" if vs is None or vs["se"] is None else f"± {_num(vs['se'])}"
            diff = "-" if vs is None else (f"{vs['difference']:+.4f} {se}"
                                           f" {'separated' if vs['separated'] else '**tie**'}")
            mark = ("**chosen**" if v["chosen"] else "") + (" added" if v["added"] else "")
            lines.append(f"| {v['label']} | " + " | ".join(_num(y) for y in v["per_seed"])
                         + f" | {_num(v['mean'])} | {_num(v['se'])} | {diff} | {mark.strip()} |"
                         + (f" {label(v['threshold'])} ({v['n_scores']} scores) |" if "threshold" in row else ""))
        lines += ["", f"Result: {_verdict(row)}."]
        if "global_check" in row:
            g = row["global_check"]
            lines.append(f"Check on the global model (`{g['score']}` of the same trials): it would choose "
                         f"{g['choice_label']} ({_num(g['means'][g['choice_label']])})" + (
                             ", the same value." if g["same"] else
                             f"; the choice above scores {_num(g['means'][row['choice_label']])} there, "
                             f"{g['vs_choice']['difference']:+.4f} behind"
                             + ("" if g["vs_choice"]["se"] is None else f" ± {_num(g['vs_choice']['se'])}")
                             + (", separated." if g["vs_choice"]["separated"] else ", a tie.")))
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
            if "threshold" in row:  # calibrated at the chosen value (--calibrate-threshold)
                lines.append(f"threshold = {label(row['threshold'])}")
                body[row["method"]]["threshold"] = row["threshold"]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != body:  # a value label() cannot write as TOML: a defect here, never a silent change
        raise RuntimeError(f"tuned.toml would not read back as the choices {body}:\n{text}")
    return text


def tuned_ties(path: str | Path) -> dict[str, str]:
    r"""The choices of a tuned file that validation could not separate from a neighbour: method -> ``"lr = 0.015,
    tied with 0.005"``, read from the header :func:`tuned_toml` writes (``# m: [m] option = v (TIE: ... from u)``).

    A table appended from another tuned file of the same folder (``tune_all.sh`` gives CLAIR's gamma = 0 rate to the
    gamma > 0 files under the comment ``# [m] from <stem>.toml: ...``) takes its tie from that file. A file
    without such lines (written by hand) has no recorded ties: ``{}``.
    """
    path = Path(path)
    ties = {}
    for line in path.read_text().splitlines():
        tie = re.match(rf"# (\w+): \[\1\] (\S+ = \S+) \({re.escape(TIE_TEXT)}([^)]*)\)", line)
        if tie:
            ties[tie[1]] = f"{tie[2]}, tied with {tie[3]}"
        source = re.match(r"# \[(\w+)\] from (\S+)\.toml:", line)
        if source and (path.parent / f"{source[2]}.toml") != path and (path.parent / f"{source[2]}.toml").is_file():
            taken = tuned_ties(path.parent / f"{source[2]}.toml").get(source[1])
            if taken:
                ties[source[1]] = f"{taken} (from {source[2]})"
    return ties
