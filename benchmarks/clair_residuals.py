r"""Why CLAIR's per-round decision loses a client it caught: the per-module residuals of recorded runs.

Each CLAIR round row of ``metrics.jsonl`` records, per client ``k`` and module ``m``, the off-subspace residual
norm ``res_{k,m}`` and its robust z-score (``detection.module_residuals`` / ``module_scores``). A module's
residuals are read relative to their median over the round's clients,

.. math:: \rho_k = \frac{1}{M} \sum_m \frac{\mathrm{res}_{k,m}}{\operatorname{med}_j \mathrm{res}_{j,m}},

so ``rho = 1`` is a typical client and ``rho - 1`` is a client's excess. Clients are grouped by the truth (which
the method never sees: each round's ``detection.contaminated``) and by history: benign (an attack's client before
its ``from_round`` counts benign); contaminated in round 1; in its first contaminated round after round 1 (an
attack with ``from_round > 1``); contaminated in a later round, flagged the round before or not. Per group:
``rho`` (mean and median), the median mean z-score and how many were flagged. Per round (1, then later
rounds): the median residual and the relative spread ``MAD / median`` that the z-scores divide by.

The same rows also give a count that keeps every flag for the rest of the run (the union of the flagged sets so
far): on runs made with the per-round rule this is an estimate (the later rounds would have gone differently with
the flags kept); on runs made with ``clair.keep_flags = true`` it is what the run did.

Run: ``python -m benchmarks.clair_residuals RUN_FOLDER... [--json PATH]`` (finished run folders, read by
``load_run``; per-module entries exist in runs made since 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lowrank_fed.llm.reproduce.runs import load_run


def detection_rows(folder) -> list[tuple[set[int], dict]]:
    """``(the round's contaminated ids, CLAIR's detection dict)`` per round, in round order, of one run folder."""
    run = load_run(Path(folder))
    return [({int(k) for k in r["detection"]["contaminated"]}, r["detection"])
            for r in run.history.get("clair", []) if "detection" in r]


def residual_groups(folders) -> dict:
    """Per group ``{rho, z, flagged}`` lists and per round phase ``{median, spread}`` (docstring above)."""
    groups = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        before: set[int] = set()
        bad_before: set[int] = set()
        for t, (bad, det) in enumerate(detection_rows(folder), start=1):
            if "module_residuals" not in det:
                raise ValueError(f"{folder}: round {t} has no detection.module_residuals (a run made before they "
                                 "were recorded); rerun it")
            ids = [int(k) for k in det["scores"]]
            res = np.array([det["module_residuals"][str(k)] for k in ids])  # (K, M)
            med = np.median(res, axis=0)
            if not np.all(med > 0):
                raise ValueError(f"{folder}: round {t} has a module whose median residual is 0; rho is undefined")
            phase = "round 1" if t == 1 else "later rounds"
            groups[phase]["median"].append(float(med.mean()))
            groups[phase]["spread"].append(float(np.mean(np.median(np.abs(res - med), axis=0) / med)))
            for i, k in enumerate(ids):
                if k not in bad:
                    group = f"benign, {phase}"
                elif t == 1:
                    group = "contaminated, round 1"
                elif k not in bad_before:
                    group = "contaminated, first contaminated round, after round 1"
                else:
                    group = f"contaminated, later, {'flagged' if k in before else 'not flagged'} the round before"
                groups[group]["rho"].append(float(np.mean(res[i] / med)))
                groups[group]["z"].append(float(det["scores"][str(k)]))
                groups[group]["flagged"].append(k in det["flagged"])
            before, bad_before = set(det["flagged"]), bad
    return groups


def kept_flag_counts(folders) -> dict:
    """Exact rounds, recall and false-flag rate, per round and with every flag kept (the union so far)."""
    c = defaultdict(int)
    for folder in folders:
        union: set[int] = set()
        for bad, det in detection_rows(folder):
            ids = {int(k) for k in det["scores"]}
            union |= set(det["flagged"])
            for rule, flagged in (("per round", set(det["flagged"]) & ids), ("kept", union & ids)):
                c[rule, "rounds"] += 1
                c[rule, "exact"] += flagged == bad & ids
                c[rule, "tp"] += len(flagged & bad)
                c[rule, "fn"] += len((bad & ids) - flagged)
                c[rule, "fp"] += len(flagged - bad)
                c[rule, "benign"] += len(ids - bad)
    out = {}
    for rule in ("per round", "kept"):
        positives = c[rule, "tp"] + c[rule, "fn"]
        out[rule] = {"exact": c[rule, "exact"], "rounds": c[rule, "rounds"],
                     "recall": c[rule, "tp"] / positives if positives else None,
                     "false_flag_rate": c[rule, "fp"] / c[rule, "benign"] if c[rule, "benign"] else None}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clair_residuals", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders with CLAIR rows")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    groups = residual_groups(args.runs)
    print(f"{len(args.runs)} runs")
    for phase in ("round 1", "later rounds"):
        g = groups.get(phase)
        if g:
            print(f"{phase}: median residual per module {np.mean(g['median']):.3f}, MAD / median "
                  f"{np.mean(g['spread']):.3f}")
    summary = {}
    for name, g in sorted(groups.items()):
        if "rho" in g:
            summary[name] = {"n": len(g["rho"]), "rho_mean": float(np.mean(g["rho"])),
                             "rho_median": float(np.median(g["rho"])), "z_median": float(np.median(g["z"])),
                             "flagged": int(sum(g["flagged"]))}
            s = summary[name]
            print(f"  {name:55s} n {s['n']:3d}  rho mean {s['rho_mean']:.3f} median {s['rho_median']:.3f}  "
                  f"z median {s['z_median']:+.2f}  flagged {s['flagged']}/{s['n']}")
    counts = kept_flag_counts(args.runs)
    for rule, r in counts.items():
        recall = "-" if r["recall"] is None else f"{r['recall']:.2f}"
        false = "-" if r["false_flag_rate"] is None else f"{r['false_flag_rate']:.3f}"
        print(f"flags {rule:9s}: exact {r['exact']}/{r['rounds']} rounds, recall {recall}, false-flag rate {false}")
    if args.json:
        Path(args.json).write_text(json.dumps({"groups": summary, "counts": counts,
                                               "phases": {p: {k: float(np.mean(v)) for k, v in groups[p].items()}
                                                          for p in ("round 1", "later rounds") if p in groups}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
