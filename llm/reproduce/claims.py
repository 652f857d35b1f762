r"""The five reproductions: which configs each runs, and how its claims are read from the runs.

Every claim is reduced to one number per seed whose sign says whether the claim held in that seed (a margin:
the claimed winner minus the best of the others, a drop, a gap), and a verdict over seeds
(:func:`verdict`): **holds** when the margin is positive in every seed, **partly** when only its mean is,
**does not hold** otherwise. The claims and the papers' numbers are those of the papers (see
``docs/reproduce.md``); nothing here is tuned on the test set: the configs' hyper-parameters were chosen on
validation splits, as their headers say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["EXPERIMENTS", "Experiment", "Claim", "Run", "mean_sd", "verdict"]


@dataclass(frozen=True)
class Run:
    """One finished run: ``summary`` (method -> summary row), ``history`` (method -> per-round rows), ``setup``."""

    summary: dict[str, dict]
    history: dict[str, list[dict]]
    setup: dict


Results = dict[str, dict[int, Run]]  # config stem -> seed -> run


@dataclass(frozen=True)
class Claim:
    """A claim, the paper's number, ours (text), the verdict, a note; ``values``: label -> per-seed numbers."""

    claim: str
    paper: str
    ours: str
    verdict: str
    note: str = ""
    values: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Experiment:
    """A reproduction: its configs (stems of ``configs/reproduce/<name>/*.toml``) and its claims' analysis."""

    name: str
    title: str
    paper: str
    configs: tuple[str, ...]
    differences: str
    analyse: Callable[[Results], list[Claim]]


def mean_sd(values: Sequence[float]) -> dict:
    """``{"mean", "sd", "n"}``: the mean and the sample standard deviation (None for one value)."""
    x = np.asarray([float(v) for v in values], dtype=float)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else None, "n": int(len(x))}


def _ms(values: Sequence[float], digits: int = 3) -> str:
    s = mean_sd(values)
    return f"{s['mean']:.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def verdict(margins: Sequence[float], tol: float = 0.0) -> str:
    """``holds`` if every margin exceeds ``tol``, ``partly`` if their mean does, else ``does not hold``."""
    x = np.asarray(margins, dtype=float)
    if len(x) and bool(np.all(x > tol)):
        return "holds"
    if len(x) and float(x.mean()) > tol:
        return "partly"
    return "does not hold"


def _seeds(by_seed: dict[int, Run]) -> list[int]:
    return sorted(by_seed)


def _per_seed(by_seed: dict[int, Run], fn: Callable[[Run], float]) -> list[float]:
    return [float(fn(by_seed[s])) for s in _seeds(by_seed)]


def _final(method: str, key: str = "final") -> Callable[[Run], float]:
    return lambda run: run.summary[method][key]


def _last(run: Run, method: str) -> dict:
    """The method's last evaluated round."""
    return [h for h in run.history[method] if "per_client" in h or "by_rank" in h][-1]


def _titles(run: Run) -> dict[str, str]:
    return {m: row["title"] for m, row in run.summary.items()}


# ----------------------------------------------------------------------------- lora-a2


def _lora_a2(results: Results) -> list[Claim]:
    baselines = ("fedit", "ffa", "flexlora")
    claims = []
    r1 = results["dir001_r1"]
    titles = _titles(next(iter(r1.values())))
    acc = {m: _per_seed(r1, _final(m)) for m in (*baselines, "lora_a2")}
    margin = [a - max(acc[b][i] for b in baselines) for i, a in enumerate(acc["lora_a2"])]
    claims.append(Claim(
        "Dir 0.01, upload budget 1: LoRA-A2 above FL+LoRA, FFA-LoRA and FlexLoRA",
        "54.84 vs 36.58 / 34.44 / 35.54",
        f"{_ms(acc['lora_a2'])} vs " + " / ".join(_ms(acc[b]) for b in baselines)
        + f"; margin over the best {_ms(margin)}",
        verdict(margin), "global test accuracy after the last round",
        {**{titles[m]: v for m, v in acc.items()}, "margin": margin}))
    # The paper's rank-8 numbers put FlexLoRA above LoRA-A2: its advantage is a low-budget one.
    r8 = results["dir001_r8"]
    acc8 = {m: _per_seed(r8, _final(m)) for m in (*baselines, "lora_a2")}
    gain = [(acc["lora_a2"][i] - max(acc[b][i] for b in baselines)) - (acc8["lora_a2"][i] - max(acc8[b][i] for b in baselines))
            for i in range(len(margin))]
    claims.append(Claim(
        "Dir 0.01: LoRA-A2's margin over the best baseline is larger at budget 1 than at budget 8",
        "+18.3 at rank 1, -5.9 at rank 8 (FlexLoRA 60.41 vs 54.50)",
        f"margin at 8: {_ms([acc8['lora_a2'][i] - max(acc8[b][i] for b in baselines) for i in range(len(margin))])}; "
        f"margin at 1 minus margin at 8: {_ms(gain)}",
        verdict(gain), "", {"margin(1) - margin(8)": gain}))
    ranges, texts = [], []
    for r in (1, 2, 8):
        runs = results[f"dir05_r{r}"]
        accs = np.array([_per_seed(runs, _final(m)) for m in (*baselines, "lora_a2")])  # methods x seeds
        spread = list(accs.max(axis=0) - accs.min(axis=0))
        ranges.append(spread)
        texts.append(f"budget {r}: {_ms(spread)}")
    worst = list(np.max(np.array(ranges), axis=0))
    claims.append(Claim(
        "Dir 0.5: the four methods within about 1 point of each other",
        "within ~1 point",
        "largest minus smallest accuracy, " + "; ".join(texts),
        verdict([0.02 - w for w in worst]),
        "holds if the range is below 2 points in every seed at every budget",
        {"range, budget 1": ranges[0], "range, budget 2": ranges[1], "range, budget 8": ranges[2]}))
    saved = _per_seed(r1, lambda run: 1.0 - run.summary["lora_a2"]["upload_vs_full"])
    claims.append(Claim(
        "Uploads at budget 1 are 99.8% below full fine-tuning",
        "0.27B vs 186B parameters (99.8% less)",
        f"{100 * np.mean(saved):.2f}% less",
        verdict([s - 0.998 for s in saved], tol=-1e-12),
        "against full fine-tuning of the adapted matrices (query, value) over the same uploads; "
        "the paper counts the whole model, which makes its ratio smaller still",
        {"fraction saved": saved}))
    return claims


# ----------------------------------------------------------------------------- byun-lee


def _top_client(run: Run) -> int:
    ranks = run.setup["ranks"]
    return int(np.argmax(ranks))


def _byun_lee(results: Results) -> list[Claim]:
    runs = results["top10_bbc"]
    out: dict[str, dict[str, list[float]]] = {}
    for method in ("fedit", "replication"):
        before, after, before_test, after_test = [], [], [], []
        for s in _seeds(runs):
            run = runs[s]
            k = _top_client(run)
            rank = str(max(run.setup["ranks"]))
            r1 = next(h for h in run.history[method] if h["round"] == 1)
            row = next(c for c in r1["clients"] if c["client"] == k)
            before.append(row["upload_local_accuracy"])
            after.append(r1["per_client"][k])
            before_test.append(row["upload_accuracy"])
            after_test.append(r1["by_rank"][rank]["accuracy"])
        out[method] = {"before": before, "after": after, "before_test": before_test, "after_test": after_test}
    drop = {m: [b - a for b, a in zip(v["before"], v["after"], strict=True)] for m, v in out.items()}
    zp, rep = out["fedit"], out["replication"]
    claims = [
        Claim("Zero-padding: the rank-20 client's accuracy falls after one aggregation",
              "84.3% -> 39.0%",
              f"{_ms(zp['before'])} -> {_ms(zp['after'])} (test set: {_ms(zp['before_test'])} -> {_ms(zp['after_test'])})",
              verdict(drop["fedit"]), "its own model before round 1's aggregation, then its download, on its held-out set",
              {"before": zp["before"], "after": zp["after"], "before (test)": zp["before_test"],
               "after (test)": zp["after_test"]}),
        Claim("Replication keeps it (smaller drop than zero-padding)",
              "84.3% -> 82.1%",
              f"{_ms(rep['before'])} -> {_ms(rep['after'])} (test set: {_ms(rep['before_test'])} -> {_ms(rep['after_test'])})",
              verdict([d0 - d1 for d0, d1 in zip(drop["fedit"], drop["replication"], strict=True)]),
              "margin: zero-padding's drop minus replication's",
              {"before": rep["before"], "after": rep["after"], "before (test)": rep["before_test"],
               "after (test)": rep["after_test"]}),
    ]
    g_zp, g_rep = _per_seed(runs, _final("fedit")), _per_seed(runs, _final("replication"))
    claims.append(Claim(
        "Replication's global model is at least as good as zero-padding's",
        "implied (replication is proposed as the fix)",
        f"replication {_ms(g_rep)} vs zero-padding {_ms(g_zp)}",
        verdict([r - z for r, z in zip(g_rep, g_zp, strict=True)], tol=-0.01),
        "global test accuracy (rank 20) after the last round; a 1-point tolerance",
        {"replication": g_rep, "zero-padding": g_zp}))
    return claims


# ----------------------------------------------------------------------------- hafl


def _rank_drop(run: Run, method: str) -> float:
    """Global accuracy minus the worst client rank's download accuracy (test set), last round."""
    last = _last(run, method)
    return float(last["accuracy"] - min(v["accuracy"] for v in last["by_rank"].values()))


def _rounds_to(history: list[dict], target: float) -> float:
    for h in history:
        if h["round"] > 0 and h.get("val_accuracy", -1.0) >= target:
            return float(h["round"])
    return float("inf")


def _hafl(results: Results) -> list[Claim]:
    frz, trn = results["freezing"], results["truncation"]
    d_frz, d_trn = _per_seed(frz, lambda r: _rank_drop(r, "hafl")), _per_seed(trn, lambda r: _rank_drop(r, "hafl"))
    local_frz, local_trn = _per_seed(frz, _final("hafl", "local")), _per_seed(trn, _final("hafl", "local"))
    claims = [Claim(
        "Freezing: no accuracy drop at distribution (truncation has one)",
        "no drop with freezing",
        f"global minus worst rank's download: freezing {_ms(d_frz)}, truncation {_ms(d_trn)}; "
        f"clients' models on their own data: freezing {_ms(local_frz)}, truncation {_ms(local_trn)}",
        verdict([t - f for f, t in zip(d_frz, d_trn, strict=True)]) if max(d_frz) <= 0.005 else "does not hold",
        "holds if freezing's drop is 0 (every client downloads the full global) and truncation's is larger",
        {"drop, freezing": d_frz, "drop, truncation": d_trn, "local, freezing": local_frz,
         "local, truncation": local_trn})]
    r_hafl, r_zp, targets = [], [], []
    for s in _seeds(frz):
        run = frz[s]
        best = min(max(h.get("val_accuracy", 0.0) for h in run.history[m]) for m in ("hafl", "fedit"))
        target = 0.9 * best
        targets.append(target)
        r_hafl.append(_rounds_to(run.history["hafl"], target))
        r_zp.append(_rounds_to(run.history["fedit"], target))
    claims.append(Claim(
        "Adaptive rank-1 aggregation converges faster than zero-padding",
        "faster (rounds to a target accuracy)",
        f"rounds to 90% of the lower of the two best validation accuracies: HAFL {_ms(r_hafl, 2)}, "
        f"zero-padding (FedIT) {_ms(r_zp, 2)}",
        verdict([z - h for h, z in zip(r_hafl, r_zp, strict=True)]),
        "validation accuracy every round; a tie counts against the claim",
        {"rounds, HAFL": r_hafl, "rounds, zero-padding": r_zp, "target": targets}))
    mb = {m: _per_seed(frz, lambda r, m=m: r.summary[m]["mb_up"] + r.summary[m]["mb_down"]) for m in ("hafl", "fedit")}
    up = {m: _per_seed(frz, _final(m, "mb_up")) for m in ("hafl", "fedit")}
    claims.append(Claim(
        "HAFL moves fewer bytes than zero-padding",
        "lower communication",
        f"MB up + down over the run: HAFL {_ms(mb['hafl'], 1)}, zero-padding {_ms(mb['fedit'], 1)} "
        f"(up only: {_ms(up['hafl'], 1)} vs {_ms(up['fedit'], 1)})",
        verdict([z - h for h, z in zip(mb["hafl"], mb["fedit"], strict=True)]),
        "freezing downloads the full rank R to every client",
        {"MB, HAFL": mb["hafl"], "MB, zero-padding": mb["fedit"]}))
    return claims


# ----------------------------------------------------------------------------- prelort

_PRELORT_BASELINES = ("fedit", "hetlora", "replication", "flora", "flexlora")


def _prelort(results: Results) -> list[Claim]:
    cls, gen = results["minilm_bbc"], results["smollm2_headlines"]
    claims = []
    acc = {m: _per_seed(cls, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    margin = [acc["prelort"][i] - max(acc[b][i] for b in _PRELORT_BASELINES) for i in range(len(acc["prelort"]))]
    best_name = max(_PRELORT_BASELINES, key=lambda b: np.mean(acc[b]))
    claims.append(Claim(
        "MiniLM / BBC News: PreLort's global accuracy above every baseline",
        "higher accuracy",
        f"PreLort {_ms(acc['prelort'])}, best baseline ({best_name}) {_ms(acc[best_name])}; margin {_ms(margin)}",
        verdict(margin), "margin: PreLort minus the best of FedIT, HetLoRA, replication, FLoRA, FlexLoRA per seed",
        {**acc, "margin": margin}))

    def low_rank(run: Run, method: str) -> float:
        last = _last(run, method)
        low = min(last["by_rank"], key=int)
        return float(last["by_rank"][low]["accuracy"])

    lows = {m: _per_seed(cls, lambda r, m=m: low_rank(r, m)) for m in ("fedit", "hetlora", "replication", "prelort")}
    low_margin = [lows["prelort"][i] - max(lows[b][i] for b in ("fedit", "hetlora", "replication"))
                  for i in range(len(margin))]
    claims.append(Claim(
        "Low-rank clients gain from high-rank ones: PreLort's rank-4 download above the prefix baselines'",
        "higher accuracy at low ranks",
        f"rank-4 download: PreLort {_ms(lows['prelort'])}, FedIT {_ms(lows['fedit'])}, "
        f"HetLoRA {_ms(lows['hetlora'])}, replication {_ms(lows['replication'])}",
        verdict(low_margin), "the methods whose rank-4 clients download a prefix of the global adapter",
        {**lows, "margin": low_margin}))
    rouge = {m: _per_seed(gen, _final(m, "rouge_l")) for m in (*_PRELORT_BASELINES, "prelort")}
    r_margin = [rouge["prelort"][i] - max(rouge[b][i] for b in _PRELORT_BASELINES) for i in range(len(margin))]
    claims.append(Claim(
        "SmolLM2 / BBC headlines: PreLort's ROUGE-L above every baseline",
        "higher ROUGE-L",
        f"PreLort {_ms(rouge['prelort'])}; baselines " + ", ".join(f"{b} {_ms(rouge[b])}" for b in _PRELORT_BASELINES),
        verdict(r_margin), "global model, greedy headlines", {**rouge, "margin": r_margin}))
    ppl = {m: _per_seed(gen, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    p_margin = [min(ppl[b][i] for b in _PRELORT_BASELINES) - ppl["prelort"][i] for i in range(len(margin))]
    claims.append(Claim(
        "SmolLM2: PreLort's perplexity lower than or equal to the baselines'",
        "lower or equal perplexity",
        f"PreLort {_ms(ppl['prelort'], 2)}; best baseline {_ms([min(ppl[b][i] for b in _PRELORT_BASELINES) for i in range(len(margin))], 2)}",
        verdict(p_margin, tol=-0.01 * float(np.mean(ppl["prelort"]))),
        "margin: the best baseline's perplexity minus PreLort's; equal within 1%", {**ppl, "margin": p_margin}))
    return claims


# ----------------------------------------------------------------------------- clair

_GAMMAS = (("0", 0.0), ("01", 0.1), ("02", 0.2), ("03", 0.3))


def _benign(run: Run, method: str, key: str) -> float:
    last = run.history[method][-1]
    return float(last.get(f"benign_local_{key}", last.get(f"local_{key}")))


def _clair(results: Results) -> list[Claim]:
    claims = []
    for task, key, label in (("copy", "exact_match", "exact match"), ("minilm", "accuracy", "accuracy")):
        gaps_fedit, gaps_oracle, gaps_ref, detect, texts, texts_det = {}, {}, {}, {}, [], []
        for tag, gamma in _GAMMAS:
            runs = results[f"{task}_g{tag}"]
            with_ref = all("clair_nodetect" in r.history for r in runs.values())  # older results lack the reference
            methods = ("fedit", "clair", "oracle", "local") + (("clair_nodetect",) if with_ref else ())
            v = {m: _per_seed(runs, lambda r, m=m: _benign(r, m, key)) for m in methods}
            gaps_fedit[gamma] = [c - f for c, f in zip(v["clair"], v["fedit"], strict=True)]
            gaps_oracle[gamma] = [o - c for c, o in zip(v["clair"], v["oracle"], strict=True)]
            if with_ref:
                gaps_ref[gamma] = [c - n for c, n in zip(v["clair"], v["clair_nodetect"], strict=True)]
            texts.append(f"γ {gamma}: CLAIR {_ms(v['clair'])}, FedIT {_ms(v['fedit'])}, oracle {_ms(v['oracle'])}, "
                         f"local {_ms(v['local'])}"
                         + (f", refinement without detection {_ms(v['clair_nodetect'])}" if with_ref else ""))
            if gamma > 0:
                prec = _per_seed(runs, lambda r: r.summary["clair"].get("precision") or 0.0)
                rec = _per_seed(runs, lambda r: r.summary["clair"].get("recall") or 0.0)
                detect[gamma] = (prec, rec)
                texts_det.append(f"γ {gamma}: precision {_ms(prec, 2)}, recall {_ms(rec, 2)}")
            else:
                flagged = _per_seed(runs, lambda r: len(r.history["clair"][-1].get("detection", {}).get("flagged", [])))
                texts_det.append(f"γ 0: {_ms(flagged, 1)} clients flagged (none contaminated)")
        name = "copy task (copy-llama)" if task == "copy" else "MiniLM / BBC News"
        worst = [min(p, r) for g in detect for p, r in zip(*detect[g], strict=True)]
        claims.append(Claim(
            f"{name}: CLAIR flags exactly the contaminated clients (γ = 0.1, 0.2, 0.3)",
            "consistent detection (Theorem 3)", "; ".join(texts_det),
            verdict([w - 0.999 for w in worst], tol=-1e-9) if worst else "does not hold",
            "last round's flags against the truth; holds if precision = recall = 1 in every seed and γ",
            {f"precision γ {g}": detect[g][0] for g in detect} | {f"recall γ {g}": detect[g][1] for g in detect}))
        contaminated = [x for g, xs in gaps_fedit.items() if g > 0 for x in xs]
        claims.append(Claim(
            f"{name}: benign clients do better under CLAIR than under FedAvg of everyone (γ > 0)",
            "CLAIR above FedAvg under contamination",
            "benign clients' " + label + ": " + "; ".join(texts),
            verdict(contaminated),
            "margin: CLAIR minus FedIT per seed and γ > 0; oracle = FedAvg of the benign clients only, told who they are",
            {f"CLAIR - FedIT, γ {g}": xs for g, xs in gaps_fedit.items()}
            | {f"oracle - CLAIR, γ {g}": xs for g, xs in gaps_oracle.items()}))
        by_detection = [x for g, xs in gaps_ref.items() if g > 0 for x in xs]
        if by_detection:  # CLAIR against the same refinement with nobody flagged: what detection adds
            claims.append(Claim(
                f"{name}: detection helps benign clients beyond the refinement (γ > 0)",
                "robustness, not only personalisation",
                "benign clients' " + label + ": " + "; ".join(texts),
                verdict(by_detection),
                "margin: CLAIR minus its refinement without detection (clair_nodetect, both personalised) per seed "
                "and γ > 0; CLAIR minus FedIT mixes detection with personalisation",
                {f"CLAIR - no detection, γ {g}": xs for g, xs in gaps_ref.items()}))
    return claims


EXPERIMENTS: dict[str, Experiment] = {
    "lora-a2": Experiment(
        "lora-a2", "LoRA-A2: low upload budgets under extreme label skew",
        "Koo et al., LoRA-A2 (ACL 2025), Table 1: 20 Newsgroups",
        tuple(f"dir{a}_r{r}" for a in ("001", "05") for r in (1, 2, 8)),
        "MiniLM-L6 (22.7M) instead of RoBERTa-base; 10 clients instead of 30; 6 rounds of 8 local steps instead of "
        "50 rounds of 5 local epochs; 2000 training examples, 32 tokens; each method's learning rate chosen on "
        "validation data (the baselines 2e-3, LoRA-A2 2e-2 with B at 5x); r_G = 16.",
        _lora_a2),
    "byun-lee": Experiment(
        "byun-lee", "Byun & Lee: zero-padding vs replication for a high-rank client",
        "Byun & Lee (2024): top 10% of clients at rank 20, the rest at 5",
        ("top10_bbc",),
        "MiniLM on BBC News, 10 clients with 2 topics each; the rank-20 client is the one with the most data "
        "(the paper picks the top 10% by validation accuracy); 3 rounds of 5 local steps.",
        _byun_lee),
    "hafl": Experiment(
        "hafl", "HAFL: importance-based freezing and rank-1 aggregation",
        "HAFL (2025, abstract): 20 Newsgroups; details are our reconstruction",
        ("freezing", "truncation"),
        "MiniLM, 10 clients at ranks 4..32, Dirichlet 0.5, 6 rounds of 5 local steps, 2000 training examples; "
        "the paper's sizes are not given in its abstract.",
        _hafl),
    "prelort": Experiment(
        "prelort", "PreLort: prefix-nested LoRA against heterogeneous-rank baselines",
        "PreLort (2025): accuracy, ROUGE-L and perplexity across base models",
        ("minilm_bbc", "smollm2_headlines"),
        "MiniLM on BBC News (the main job's setting, 4 rounds) and SmolLM2-135M on BBC headlines (4 clients, "
        "2 rounds of 3 steps, 24 test examples, 12 for ROUGE-L): far smaller than the paper's models and budgets.",
        _prelort),
    "clair": Experiment(
        "clair", "CLAIR: contaminated clients in a federated LoRA run",
        "CLAIR (2025): a small Transformer on a text-copying task; our MiniLM run as a second setting",
        tuple(f"{t}_g{g}" for t in ("copy", "minilm") for g, _ in _GAMMAS),
        "the copy task is ours (a 1-layer Llama pretrained to copy, LoRA on o_proj, contaminated clients learn "
        "another substitution); MiniLM / BBC News with other_task contamination; 10 clients, γ = 0, 0.1, 0.2, 0.3.",
        _clair),
}
