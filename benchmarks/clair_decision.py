r"""CLAIR's decision rule, measured: the fixed cut ``z > 3``, the gap rule and a calibrated threshold.

Scores ``s_k`` are CLAIR's per-client mean z-scores of the off-subspace residual (what
:func:`lowrank_fed.robust.flag_clients` returns). For each rule: pooled over rounds and seeds,

.. math:: \text{precision} = \frac{TP}{TP + FP},\quad \text{recall} = \frac{TP}{TP + FN},\quad
          \text{false-flag rate} = \frac{FP}{FP + TN},

and the rounds with at least one benign client flagged (``(n/N)`` in the output), with the truth
(which clients are contaminated) used here for scoring only. Two sources:

1. recorded runs: the ``detection.scores`` of every CLAIR row of ``metrics.jsonl`` under the folders
   given (default ``results/reproduce/clair/*/seed*``), grouped by setting (``copy``, ``minilm``) and
   contaminated share; the calibrated threshold of a setting is the ``(1 - q)`` quantile of the benign
   scores of its uncontaminated runs (``--calibration`` folders, else the same setting's ``gamma = 0``
   runs, which is then in-sample: said in the output),
2. synthetic LoRA federations (:func:`lowrank_fed.synthetic.make_lora_clients`, noisy benign updates,
   ``random`` attackers whose off-subspace size is 0.32 and 0.36 against the benign noise's 0.3), ``M`` modules per round scored by
   :func:`lowrank_fed.robust.clair` and averaged as the federated method does; the calibrated threshold
   comes from uncontaminated draws with other seeds.

Run: ``python -m benchmarks.clair_decision [--quick] [--runs DIR...] [--calibration DIR...] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from lowrank_fed.robust import ClairWarning, clair
from lowrank_fed.robust.detection import calibrate_threshold, threshold_flags
from lowrank_fed.synthetic import make_lora_clients

QUANTILE = 0.05  # calibrated threshold: the (1 - q) quantile of benign gamma = 0 scores
SCALES = (0.32, 0.36)  # attackers' B = a Z against benign off-subspace noise 0.3: barely and clearly louder


def rates(rounds, rule) -> dict:
    """Pooled precision / recall / false-flag rate of ``rule(scores) -> mask`` over ``(scores, truth)`` rounds."""
    tp = fp = fn = tn = bad_rounds = 0
    for s, truth in rounds:
        f = rule(np.asarray(s))
        tp += int(np.sum(f & truth)); fp += int(np.sum(f & ~truth))
        fn += int(np.sum(~f & truth)); tn += int(np.sum(~f & ~truth))
        bad_rounds += bool(np.any(f & ~truth))
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "false_flag_rate": fp / (fp + tn) if fp + tn else None, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "rounds": len(rounds), "rounds_with_a_false_flag": bad_rounds}


def calibrate(rounds, q: float = QUANTILE) -> float:
    """The ``(1 - q)`` quantile of the benign scores pooled over ``rounds``
    (:func:`~lowrank_fed.robust.calibrate_threshold`)."""
    return calibrate_threshold(np.concatenate([np.asarray(s)[~t] for s, t in rounds]), q)


def rules(calibrated: float) -> dict:
    return {"z>3": lambda s: threshold_flags(s, 3.0),
            "gap.05": lambda s: threshold_flags(s, "gap"),
            "gap.01": lambda s: threshold_flags(s, "gap", level=0.01),
            "calibrated": lambda s: threshold_flags(s, calibrated)}


def _cell(label: str, r: dict) -> str:
    fmt = lambda v: "  - " if v is None else f"{v:.2f}"  # noqa: E731
    return (f" | {label:10s} P {fmt(r['precision'])} R {fmt(r['recall'])} FF {fmt(r['false_flag_rate'])}"
            f" ({r['rounds_with_a_false_flag']}/{r['rounds']})")


# ---------------------------------------------------------------------------- recorded runs
def recorded(folders) -> dict:
    """``{(setting, gamma): {seed: [(round, scores, truth)]}}`` from CLAIR rows of ``metrics.jsonl``."""
    out = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        path = Path(folder) / "metrics.jsonl"
        if not path.exists():
            continue
        # the setting from the folder named like a config (minilm_g01): a run's parent (<config>/seed0), or a tune
        # trial's <config>/trials/<method>/<value>/seed100, whose seeds are told apart by method and value too
        parents, seed = Path(folder).parents, Path(folder).name
        m = re.match(r"([a-z]+)_g(\d+)$", parents[0].name)
        if not m and len(parents) > 3 and parents[2].name == "trials":
            m = re.match(r"([a-z]+)_g(\d+)$", parents[3].name)
            seed = Path(folder).relative_to(parents[2]).as_posix()
        setting, gamma = (m.group(1), int(m.group(2)) / 10) if m else (parents[0].name, None)
        for line in path.open():
            row = json.loads(line)
            det = row.get("detection")
            if row.get("method") != "clair" or not det or "scores" not in det:
                continue
            ids = sorted(det["scores"], key=int)
            s = np.array([det["scores"][k] for k in ids])
            truth = np.array([int(k) in set(det.get("contaminated", [])) for k in ids])
            if gamma is None:
                gamma = round(truth.mean(), 1)
            out[(setting, gamma)][seed].append((row["round"], s, truth))
    return out


def auc(s, truth) -> float | None:
    """``P(s_attacker > s_benign) + P(=)/2`` over all pairs; None when one class is empty."""
    s, truth = np.asarray(s), np.asarray(truth)
    a, b = s[truth], s[~truth]
    if not a.size or not b.size:
        return None
    return float(np.mean((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])))


def report_recorded(runs, calibration) -> dict:
    result = {}
    for setting in sorted({s for s, _ in runs}):
        cal_src = calibration.get((setting, 0.0)) or runs.get((setting, 0.0))
        in_sample = (setting, 0.0) not in calibration
        cal_rounds = [(s, t) for seeds in [cal_src] for rs in seeds.values() for _, s, t in rs]
        tau = calibrate(cal_rounds)
        print(f"\n[{setting}] calibrated threshold {tau:.3f} = 0.95 quantile of {sum(len(r) for r in cal_src.values())}"
              f" gamma = 0 rounds ({'in-sample: the same runs' if in_sample else 'calibration runs'})")
        for gamma in sorted(g for s, g in runs if s == setting):
            seeds = runs[(setting, gamma)]
            for which in ("all rounds", "last round"):
                rounds = [(s, t) for rs in seeds.values() for i, (_, s, t) in enumerate(sorted(rs, key=lambda x: x[0]))
                          if which == "all rounds" or i == len(rs) - 1]
                aucs = [a for s, t in rounds if (a := auc(s, t)) is not None]
                line = f"  gamma {gamma:.1f} {which:10s} AUC {np.mean(aucs):.2f}" if aucs else f"  gamma {gamma:.1f} {which:10s}        "
                for label, rule in rules(tau).items():
                    r = rates(rounds, rule)
                    result[f"{setting}/{gamma}/{which}/{label}"] = r
                    line += _cell(label, r)
                print(line)
        result[f"{setting}/threshold"] = tau
    return result


# ---------------------------------------------------------------------------- synthetic federations
def synthetic_round(seed: int, gamma: float, modules: int, scale: float, *, K=10, d=64, rank=4, noise=0.3):
    """One round: ``modules`` noisy LoRA federations sharing the contaminated set, mean z-score per client."""
    z, truth = [], None
    for m in range(modules):
        fed = make_lora_clients(K, d, d, rank, contamination=gamma, attack="random", seed=np.random.default_rng([seed, m]),
                                noise=noise, attack_scale=scale)
        order = np.concatenate([np.flatnonzero(fed.contaminated), np.flatnonzero(~fed.contaminated)])
        truth = fed.contaminated[order]  # the same clients (listed first) contaminated in every module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClairWarning)
            res = clair([fed.pairs[i] for i in order], rank=rank, lam="default", gamma_bar=0.3)
        z.append(res.scores)
    return np.mean(z, axis=0), truth


def report_synthetic(seeds: int) -> dict:
    result = {}
    for modules in (1, 12):
        cal = [synthetic_round(10_000 + i, 0.0, modules, SCALES[0]) for i in range(seeds)]
        tau = calibrate(cal)
        print(f"\n[synthetic, M = {modules} modules, K = 10, d = 64, rank 4, benign noise 0.3] calibrated threshold "
              f"{tau:.3f} (0.95 quantile, {seeds} gamma = 0 calibration rounds, other seeds)")
        for scale in SCALES:
            for gamma in (0.0, 0.1, 0.2, 0.3):
                if gamma == 0.0 and scale != SCALES[0]:
                    continue
                rounds = [synthetic_round(i, gamma, modules, scale) for i in range(seeds)]
                aucs = [a for s, t in rounds if (a := auc(s, t)) is not None]
                line = f"  attack size {scale:.2f} gamma {gamma:.1f} AUC {np.mean(aucs) if aucs else float('nan'):.2f}"
                for label, rule in rules(tau).items():
                    r = rates(rounds, rule)
                    result[f"synthetic/M{modules}/a{scale}/{gamma}/{label}"] = r
                    line += _cell(label, r)
                print(line)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clair_decision", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 synthetic rounds per cell instead of 100")
    parser.add_argument("--runs", nargs="*", default=None, help="run folders (default: results/reproduce/clair/*/seed*)")
    parser.add_argument("--calibration", nargs="*", default=[], help="uncontaminated validation run folders")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    folders = args.runs if args.runs is not None else sorted(glob.glob("results/reproduce/clair/*/seed*"))
    out = report_recorded(recorded(folders), recorded(args.calibration))
    if not args.no_synthetic:
        out.update(report_synthetic(20 if args.quick else 100))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
