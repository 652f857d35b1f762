r"""The five reproductions: which configs each runs, and how its claims are read from the runs.

Every claim is read from paired per-seed differences (:mod:`.verdicts`): the claimed winner minus **each**
baseline on the same seed (same split, partition and batches), a drop, a saving. Each difference gets a 95%
Student-t interval over seeds and a verdict against its threshold (**holds** above, **tie** across, **does not
hold** below; **too few seeds** under 3); a claim against several baselines holds only if it holds against each
(:func:`~.verdicts.combine`). A claim whose runs do not exist yet says **not run yet**; one that the experiment
cannot test says **not testable here** and why. Counts follow the papers: LoRA-A2's saving is against fine-tuning
the whole model, HAFL's bytes against the homogeneous rank-``R`` federation that freezing replaces, HAFL's drop at
distribution is scored per client on what it downloads. The claims and the papers' numbers are those of the papers
(see ``docs/reproduce.md``); nothing here is tuned on the test set: the configs' hyper-parameters were chosen on
validation splits, as their headers say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .verdicts import advice, combine, example_se, mean_sd, paired, verdict

__all__ = ["EXPERIMENTS", "Experiment", "Claim", "Run", "mean_sd", "verdict", "model_params"]


@dataclass(frozen=True)
class Run:
    """One finished run: ``summary`` (method -> summary row), ``history`` (method -> per-round rows), ``setup``,
    ``config`` (its ``config.json``; empty when not loaded)."""

    summary: dict[str, dict]
    history: dict[str, list[dict]]
    setup: dict
    config: dict = field(default_factory=dict)


Results = dict[str, dict[int, Run]]  # config stem -> seed -> run


@dataclass(frozen=True)
class Claim:
    r"""A claim, the paper's number, ours (text), the verdict, a note; ``values``: label -> per-seed numbers;
    ``comparisons``: the paired comparisons the verdict combines (:func:`~.verdicts.paired`); ``advice``:
    :data:`~.verdicts.ADD_SEEDS` for a tie on fewer than 5 seeds."""

    claim: str
    paper: str
    ours: str
    verdict: str
    note: str = ""
    values: dict[str, list] = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)
    advice: str = ""

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


def _ms(values: Sequence[float], digits: int = 3) -> str:
    s = mean_sd(values)
    return f"{s['mean']:.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def _decide(claim: str, paper: str, ours: str, comparisons: list[dict], note: str = "",
            values: dict[str, list] | None = None, *, untestable: str = "") -> Claim:
    """The claim with the combined verdict of its comparisons (``untestable``: the reason it is not testable here)."""
    word = "not testable here" if untestable else combine(c["verdict"] for c in comparisons)
    if untestable:
        note = f"not testable here: {untestable}" + (f"; {note}" if note else "")
    return Claim(claim, paper, ours, word, note, values or {}, comparisons, "" if untestable else advice(comparisons))


def _not_run(claim: str, paper: str, missing: str, note: str = "") -> Claim:
    """A claim whose runs (or the numbers it needs from them) do not exist yet: no verdict, never a fake one."""
    return Claim(claim, paper, f"not run yet: {missing}", "not run yet", note)


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


def _diff(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per seed ``a - b``."""
    return [x - y for x, y in zip(a, b, strict=True)]


def _against(scores: dict[str, list[float]], winner: str, baselines: Sequence[str], titles: dict[str, str], *,
             tol: float = 0.0, lower_is_better: bool = False, by_seed: dict[int, Run] | None = None) -> list[dict]:
    r"""``winner`` against each baseline, paired per seed (``winner - b``, or ``b - winner`` when lower is better).

    With ``by_seed`` (final global accuracy) each comparison also gets ``example_se``: per seed, the paired
    standard error over the test examples (:func:`~.verdicts.example_se`), when every run recorded them.
    """
    out = []
    for b in baselines:
        d = _diff(scores[b], scores[winner]) if lower_is_better else _diff(scores[winner], scores[b])
        comp = paired(d, tol, against=titles.get(b, b))
        if by_seed is not None:
            ses = [_example_se(by_seed[s], winner, b) for s in _seeds(by_seed)]
            if all(se is not None for se in ses):
                comp["example_se"] = ses
        out.append(comp)
    return out


def _example_se(run: Run, a: str, b: str) -> float | None:
    """Seed's paired standard error over test examples of ``a - b`` (None when a run did not record them)."""
    from ..runner.report import per_example_correct

    packed = [run.history[m][-1].get("test_correct") for m in (a, b)]
    n = int(run.setup.get("eval_size", 0))
    if any(p is None for p in packed) or n < 2:
        return None
    ca, cb = (per_example_correct(p, n) for p in packed)
    return None if ca is None or cb is None else example_se(ca, cb)


def _near_chance(by_seed: dict[int, Run], methods: Sequence[str]) -> str:
    r"""Why a claim on these methods' global accuracy is not testable here, or ``""``.

    It is not when, in every seed, every method's accuracy is within 2 standard errors of always answering the
    majority class, ``|acc - p| <= 2 sqrt(p (1 - p) / N)``, with ``p`` that class's share of the ``N`` test examples
    (``majority_accuracy`` and ``eval_size`` in ``setup.json``): then no method has learnt anything measurable.
    """
    for run in by_seed.values():
        p, n = run.setup.get("majority_accuracy"), int(run.setup.get("eval_size") or 0)
        if p is None or n < 1:
            return ""
        if any(abs(run.summary[m]["final"] - p) > 2 * math.sqrt(p * (1 - p) / n) for m in methods):
            return ""
    return ("every method's accuracy within 2 standard errors of the majority class's share of the test set, in "
            "every seed: within noise of chance")


def _vs(comparisons: list[dict], digits: int = 3) -> str:
    """``vs X +0.091 [+0.050, +0.132]; ...``: each comparison's mean and interval."""
    def one(c):
        if c["low"] is None:
            return f"vs {c['against']} {c['mean']:+.{digits}f}"
        return f"vs {c['against']} {c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
    return "; ".join(one(c) for c in comparisons)


def model_params(run: Run) -> int:
    r"""Every parameter of the run's model, base and head (``setup.json``'s ``model_params``).

    Runs written before the runner recorded it get it from the model their config names
    (:func:`~lowrank_fed.llm.models.parameter_count`; packaged models only).
    """
    if run.setup.get("model_params"):
        return int(run.setup["model_params"])
    from ..models import parameter_count

    if not run.config.get("model"):
        raise ValueError("The run's setup.json has no 'model_params' and its config.json was not loaded; expected "
                         "a run folder with both (lowrank_fed.llm.reproduce.run.load_run).")
    labels = run.setup.get("label_names") if run.setup.get("task") == "classification" else None
    return parameter_count(run.config["model"], num_labels=len(labels) if labels else None)


# ----------------------------------------------------------------------------- lora-a2

#: LoRA-A2's paper: 0.27B uploaded parameters against 186B for full fine-tuning, "99.8% less".
LORA_A2_SAVING = 0.998
#: "within about 1 point": a band of 2 points on each pairwise difference (as generous as the earlier range rule).
LORA_A2_BAND = 0.02


def _within(d: Sequence[float], band: float, against: str) -> list[dict]:
    r"""Closeness as two one-sided comparisons: ``d > -band`` and ``-d > -band`` (both must hold)."""
    return [paired(d, -band, against=f"{against}: LoRA-A2 minus it"),
            paired([-x for x in d], -band, against=f"{against}: it minus LoRA-A2")]


def _lora_a2(results: Results) -> list[Claim]:
    baselines = ("fedit", "ffa", "flexlora")
    claims = []
    r1 = results["dir001_r1"]
    titles = _titles(next(iter(r1.values())))
    acc = {m: _per_seed(r1, _final(m)) for m in (*baselines, "lora_a2")}
    comps = _against(acc, "lora_a2", baselines, titles, by_seed=r1)
    claims.append(_decide(
        "Dir 0.01, upload budget 1: LoRA-A2 above FL+LoRA, FFA-LoRA and FlexLoRA",
        "54.84 vs 36.58 / 34.44 / 35.54",
        f"{_ms(acc['lora_a2'])} vs " + " / ".join(_ms(acc[b]) for b in baselines) + f"; {_vs(comps)}",
        comps, "global test accuracy after the last round; LoRA-A2 minus each baseline per seed",
        {titles[m]: v for m, v in acc.items()}, untestable=_near_chance(r1, (*baselines, "lora_a2"))))
    # The paper's rank-8 numbers put FlexLoRA above LoRA-A2: its advantage is a low-budget one.
    r8 = results["dir001_r8"]
    acc8 = {m: _per_seed(r8, _final(m)) for m in (*baselines, "lora_a2")}
    gains = {b: _diff(_diff(acc["lora_a2"], acc[b]), _diff(acc8["lora_a2"], acc8[b])) for b in baselines}
    comps = [paired(gains[b], against=titles[b]) for b in baselines]
    claims.append(_decide(
        "Dir 0.01: LoRA-A2's margin over each baseline is larger at budget 1 than at budget 8",
        "+18.3 at rank 1, -5.9 at rank 8 (FlexLoRA 60.41 vs 54.50)",
        "margin at 8: " + ", ".join(f"{titles[b]} {_ms(_diff(acc8['lora_a2'], acc8[b]))}" for b in baselines)
        + f"; margin at 1 minus margin at 8: {_vs(comps)}",
        comps, "per baseline: (LoRA-A2 - it at budget 1) - (LoRA-A2 - it at budget 8), same seed",
        {f"margin(1) - margin(8), {titles[b]}": gains[b] for b in baselines},
        untestable=_near_chance(r1, (*baselines, "lora_a2")) and _near_chance(r8, (*baselines, "lora_a2"))))
    comps, texts, values, chance = [], [], {}, []
    for r in (1, 2, 8):
        runs = results[f"dir05_r{r}"]
        a = {m: _per_seed(runs, _final(m)) for m in (*baselines, "lora_a2")}
        chance.append(_near_chance(runs, (*baselines, "lora_a2")))
        for b in baselines:
            d = _diff(a["lora_a2"], a[b])
            values[f"LoRA-A2 - {titles[b]}, budget {r}"] = d
            comps += _within(d, LORA_A2_BAND, f"{titles[b]}, budget {r}")
        texts.append(f"budget {r}: LoRA-A2 minus " + ", ".join(
            f"{titles[b]} {_ms(values[f'LoRA-A2 - {titles[b]}, budget {r}'])}" for b in baselines))
    claims.append(_decide(
        "Dir 0.5: LoRA-A2 within about 1 point of each baseline",
        "within ~1 point", "; ".join(texts), comps,
        f"holds if every interval of LoRA-A2 minus a baseline lies within ±{LORA_A2_BAND:g} (2 points, at budgets "
        "1, 2 and 8)", values, untestable=chance[0] if all(chance) else ""))
    whole = _per_seed(r1, lambda run: 1.0 - run.summary["lora_a2"]["upload_vs_full"] * run.setup["adapted_params"]
                      / model_params(run))
    adapted = _per_seed(r1, lambda run: 1.0 - run.summary["lora_a2"]["upload_vs_full"])
    comps = [paired([s - LORA_A2_SAVING for s in whole], against=f"{100 * LORA_A2_SAVING:.1f}% saved")]
    claims.append(_decide(
        "Uploads at budget 1 are 99.8% below full fine-tuning",
        "0.27B vs 186B parameters (99.8% less)",
        f"{100 * np.mean(whole):.2f}% less than fine-tuning the whole model (base and head; the paper's count); "
        f"{100 * np.mean(adapted):.2f}% less than fine-tuning only the adapted query/value matrices",
        comps, "parameters uploaded over the run against every upload carrying the whole model; the verdict is on "
        "the paper's count", {"fraction saved (whole model)": whole, "fraction saved (adapted matrices)": adapted}))
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
    drop = {m: _diff(v["before"], v["after"]) for m, v in out.items()}
    zp, rep = out["fedit"], out["replication"]
    zp_comp = [paired(drop["fedit"], against="its own model before aggregation")]
    rep_comp = [paired(_diff(drop["fedit"], drop["replication"]), against="zero-padding's drop")]
    claims = [
        _decide("Zero-padding: the rank-20 client's accuracy falls after one aggregation",
                "84.3% -> 39.0%",
                f"{_ms(zp['before'])} -> {_ms(zp['after'])} (test set: {_ms(zp['before_test'])} -> "
                f"{_ms(zp['after_test'])}); drop {_vs(zp_comp)}",
                zp_comp, "its own model before round 1's aggregation, then its download, on its held-out set",
                {"before": zp["before"], "after": zp["after"], "before (test)": zp["before_test"],
                 "after (test)": zp["after_test"]}),
        _decide("Replication keeps it (smaller drop than zero-padding)",
                "84.3% -> 82.1%",
                f"{_ms(rep['before'])} -> {_ms(rep['after'])} (test set: {_ms(rep['before_test'])} -> "
                f"{_ms(rep['after_test'])}); zero-padding's drop minus replication's {_vs(rep_comp)}",
                rep_comp, "difference: zero-padding's drop minus replication's, same seed",
                {"before": rep["before"], "after": rep["after"], "before (test)": rep["before_test"],
                 "after (test)": rep["after_test"]}),
    ]
    g_zp, g_rep = _per_seed(runs, _final("fedit")), _per_seed(runs, _final("replication"))
    comps = [paired(_diff(g_rep, g_zp), tol=-0.01, against="zero-padding")]
    claims.append(_decide(
        "Replication's global model is at least as good as zero-padding's",
        "implied (replication is proposed as the fix)",
        f"replication {_ms(g_rep)} vs zero-padding {_ms(g_zp)}; {_vs(comps)}",
        comps, "global test accuracy (rank 20) after the last round; holds if the interval lies above -0.01 "
        "(a 1-point tolerance)", {"replication": g_rep, "zero-padding": g_zp},
        untestable=_near_chance(runs, ("fedit", "replication"))))
    return claims


# ----------------------------------------------------------------------------- hafl


def _client_drop(run: Run, method: str) -> float | None:
    r"""The mean over clients of the drop at distribution, on each client's own held-out data, last round:

    .. math:: \frac{1}{K'} \sum_k \big(\mathrm{acc}_k(\text{global}) - \mathrm{acc}_k(\text{download}_k)\big)

    over the ``K'`` clients with a held-out set (``per_client_global`` and ``per_client`` in ``metrics.jsonl``).
    None when the run predates ``per_client_global``.
    """
    last = _last(run, method)
    if "per_client_global" not in last:
        return None
    d = [g - c for g, c in zip(last["per_client_global"], last["per_client"], strict=True)
         if g is not None and c is not None]
    return float(np.mean(d))


def _rounds_to(history: list[dict], target: float) -> float:
    """The first round whose validation accuracy reaches ``target``; the last round + 1 if none does."""
    for h in history:
        if h["round"] > 0 and h.get("val_accuracy", -1.0) >= target:
            return float(h["round"])
    return float(max(h["round"] for h in history) + 1)


def _hafl(results: Results) -> list[Claim]:
    frz, trn = results["freezing"], results["truncation"]
    claims = []
    drop_claim = ("Freezing: no accuracy drop at distribution (truncation has one)", "no drop with freezing")
    drops = {name: [_client_drop(runs[s], "hafl") for s in _seeds(runs)] for name, runs in (("frz", frz), ("trn", trn))}
    if any(d is None for ds in drops.values() for d in ds):
        claims.append(_not_run(*drop_claim, "these runs predate the per-client scores of the global model "
                               "(per_client_global in metrics.jsonl); run freezing and truncation again",
                               "each client's accuracy on its own held-out data under the global model minus "
                               "under its download"))
    else:
        d_frz, d_trn = drops["frz"], drops["trn"]
        comps = [paired(_diff(d_trn, d_frz), against="freezing's drop")]
        local_frz, local_trn = _per_seed(frz, _final("hafl", "local")), _per_seed(trn, _final("hafl", "local"))
        claims.append(_decide(
            *drop_claim,
            f"mean over clients of (global minus its download), each on its own held-out data: freezing "
            f"{_ms(d_frz)}, truncation {_ms(d_trn)}; truncation minus freezing {_vs(comps)}; clients' downloads on "
            f"their own data: freezing {_ms(local_frz)}, truncation {_ms(local_trn)}",
            comps, "freezing's drop is 0 by construction (every client downloads the global adapter itself, all R "
            "slots); holds if truncation's drop is larger, same seed",
            {"drop, freezing": d_frz, "drop, truncation": d_trn, "local, freezing": local_frz,
             "local, truncation": local_trn}))
    r_hafl, r_zp, targets = [], [], []
    for s in _seeds(frz):
        run = frz[s]
        best = min(max(h.get("val_accuracy", 0.0) for h in run.history[m]) for m in ("hafl", "fedit"))
        target = 0.9 * best
        targets.append(target)
        r_hafl.append(_rounds_to(run.history["hafl"], target))
        r_zp.append(_rounds_to(run.history["fedit"], target))
    comps = [paired(_diff(r_zp, r_hafl), against="zero-padding (FedIT)")]
    claims.append(_decide(
        "Adaptive rank-1 aggregation converges faster than zero-padding",
        "faster (rounds to a target accuracy)",
        f"rounds to 90% of the lower of the two best validation accuracies: HAFL {_ms(r_hafl, 2)}, "
        f"zero-padding (FedIT) {_ms(r_zp, 2)}; FedIT minus HAFL {_vs(comps, 2)}",
        comps, "validation accuracy every round; a run that never reaches the target counts as the last round + 1",
        {"rounds, HAFL": r_hafl, "rounds, zero-padding": r_zp, "target": targets}))
    bytes_claim = ("HAFL (freezing) moves fewer bytes than the homogeneous rank-R federation it replaces",
                   "lower communication")
    hom = results.get("homogeneous")
    if not hom or set(_seeds(hom)) != set(_seeds(frz)):
        claims.append(_not_run(*bytes_claim, "configs/reproduce/hafl/homogeneous.toml (FedIT with every client at "
                               "rank R = 32) has no runs for these seeds",
                               "MB up and down over the run against FedIT with every client at rank R"))
        return claims
    mb = {(who, way): _per_seed(runs, _final(m, f"mb_{way}"))
          for who, runs, m in (("hafl", frz, "hafl"), ("fedit", hom, "fedit")) for way in ("up", "down")}
    total = {who: [u + d for u, d in zip(mb[(who, "up")], mb[(who, "down")], strict=True)] for who in ("hafl", "fedit")}
    saved = {way: _diff(mb[("fedit", way)], mb[("hafl", way)]) for way in ("up", "down")}
    comps = [paired(_diff(total["fedit"], total["hafl"]), against="FedIT, every client at rank R")]
    claims.append(_decide(
        *bytes_claim,
        f"MB over the run, up / down: HAFL {_ms(mb[('hafl', 'up')], 1)} / {_ms(mb[('hafl', 'down')], 1)}, "
        f"homogeneous FedIT {_ms(mb[('fedit', 'up')], 1)} / {_ms(mb[('fedit', 'down')], 1)}; saved up "
        f"{_ms(saved['up'], 1)}, down {_ms(saved['down'], 1)}; total saved {_vs(comps, 1)}",
        comps, "verdict on up + down; freezing downloads all R slots (as the homogeneous federation does) and "
        "uploads only each client's r_k", {"MB up, HAFL": mb[("hafl", "up")], "MB down, HAFL": mb[("hafl", "down")],
                                            "MB up, FedIT rank R": mb[("fedit", "up")],
                                            "MB down, FedIT rank R": mb[("fedit", "down")]}))
    return claims


# ----------------------------------------------------------------------------- prelort

_PRELORT_BASELINES = ("fedit", "hetlora", "replication", "flora", "flexlora")
#: "lower than or equal": PreLort's perplexity at most 1% above a baseline's (ln 1.01 on the log ratio).
PRELORT_PPL_TOL = math.log(1.01)


def _by_rank(run: Run, method: str, metric: str) -> dict[int, float]:
    """Each client rank's download, last evaluated round: rank -> score on the test set."""
    return {int(r): float(v[metric]) for r, v in _last(run, method)["by_rank"].items()}


def _nested(runs: dict[int, Run], metric: str, lower_is_better: bool) -> tuple[list[dict], dict[str, list]]:
    """PreLort against replication at each client rank (its download), paired per seed."""
    ranks = sorted(_by_rank(next(iter(runs.values())), "prelort", metric))
    comps, values = [], {}
    for r in ranks:
        p = _per_seed(runs, lambda run, r=r: _by_rank(run, "prelort", metric)[r])
        q = _per_seed(runs, lambda run, r=r: _by_rank(run, "replication", metric)[r])
        if lower_is_better:  # on the log ratio: perplexities of different seeds differ by factors
            d = _diff(np.log(q).tolist(), np.log(p).tolist())
        else:
            d = _diff(p, q)
        comps.append(paired(d, against=f"replication at rank {r}"))
        values[f"PreLort, rank {r}"], values[f"replication, rank {r}"] = p, q
    return comps, values


def _prelort(results: Results) -> list[Claim]:
    cls, gen = results["minilm_bbc"], results["smollm2_headlines"]
    titles = _titles(next(iter(cls.values())))
    claims = []
    acc = {m: _per_seed(cls, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    comps = _against(acc, "prelort", _PRELORT_BASELINES, titles, by_seed=cls)
    claims.append(_decide(
        "MiniLM / BBC News: PreLort's global accuracy above every baseline",
        "higher accuracy",
        f"PreLort {_ms(acc['prelort'])}; " + ", ".join(f"{titles[b]} {_ms(acc[b])}" for b in _PRELORT_BASELINES)
        + f"; PreLort minus {_vs(comps)}",
        comps, "PreLort minus each of FedIT, HetLoRA, replication, FLoRA, FlexLoRA per seed; holds only against each",
        acc, untestable=_near_chance(cls, (*_PRELORT_BASELINES, "prelort"))))

    prefix = ("fedit", "hetlora", "replication")
    lows = {m: _per_seed(cls, lambda r, m=m: min(_by_rank(r, m, "accuracy").items())[1]) for m in (*prefix, "prelort")}
    comps = [paired(_diff(lows["prelort"], lows[b]), against=titles[b]) for b in prefix]
    claims.append(_decide(
        "Low-rank clients gain from high-rank ones: PreLort's rank-4 download above the prefix baselines'",
        "higher accuracy at low ranks",
        f"rank-4 download: PreLort {_ms(lows['prelort'])}, " + ", ".join(f"{titles[b]} {_ms(lows[b])}" for b in prefix)
        + f"; PreLort minus {_vs(comps)}",
        comps, "the methods whose rank-4 clients download a prefix of the global adapter", lows))

    comps, values = _nested(cls, "accuracy", lower_is_better=False)
    claims.append(_decide(
        "MiniLM: prefix-nested training lifts every rank's download above replication's (the same segment-wise "
        "rule without it)", "nested training makes every prefix a good model",
        f"PreLort minus replication, each rank's download on the test set: {_vs(comps)}", comps,
        "holds only if it holds at every client rank", values))

    rouge = {m: _per_seed(gen, _final(m, "rouge_l")) for m in (*_PRELORT_BASELINES, "prelort")}
    comps = _against(rouge, "prelort", _PRELORT_BASELINES, titles)
    claims.append(_decide(
        "SmolLM2 / BBC headlines: PreLort's ROUGE-L above every baseline",
        "higher ROUGE-L",
        f"PreLort {_ms(rouge['prelort'])}; " + ", ".join(f"{titles[b]} {_ms(rouge[b])}" for b in _PRELORT_BASELINES)
        + f"; PreLort minus {_vs(comps)}",
        comps, "global model, greedy headlines", rouge))

    ppl = {m: _per_seed(gen, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    logs = {m: np.log(v).tolist() for m, v in ppl.items()}
    comps = _against(logs, "prelort", _PRELORT_BASELINES, titles, tol=-PRELORT_PPL_TOL, lower_is_better=True)
    claims.append(_decide(
        "SmolLM2: PreLort's perplexity lower than or equal to the baselines'",
        "lower or equal perplexity",
        f"PreLort {_ms(ppl['prelort'], 2)}; " + ", ".join(f"{titles[b]} {_ms(ppl[b], 2)}" for b in _PRELORT_BASELINES)
        + f"; ln(baseline / PreLort) {_vs(comps)}",
        comps, "per baseline ln(its perplexity / PreLort's); holds if the interval lies above -ln 1.01 (equal "
        "within 1%)", ppl))

    comps, values = _nested(gen, "perplexity", lower_is_better=True)
    claims.append(_decide(
        "SmolLM2: prefix-nested training gives every rank's download a lower perplexity than replication's",
        "nested training makes every prefix a good model",
        f"ln(replication / PreLort), each rank's download: {_vs(comps)}", comps,
        "holds only if it holds at every client rank", values))
    return claims


# ----------------------------------------------------------------------------- clair

_GAMMAS = (("0", 0.0), ("01", 0.1), ("02", 0.2), ("03", 0.3))


def _benign(run: Run, method: str, key: str) -> float:
    last = run.history[method][-1]
    return float(last.get(f"benign_local_{key}", last.get(f"local_{key}")))


def _clair(results: Results) -> list[Claim]:
    claims = []
    for task, key, label in (("copy", "exact_match", "exact match"), ("minilm", "accuracy", "accuracy")):
        gain_comps, detect_comps, values_gain, values_det, texts, texts_det = [], [], {}, {}, [], []
        ref_comps, values_ref = [], {}
        for tag, gamma in _GAMMAS:
            runs = results[f"{task}_g{tag}"]
            with_ref = all("clair_nodetect" in r.history for r in runs.values())  # older results lack the reference
            methods = ("fedit", "clair", "oracle", "local") + (("clair_nodetect",) if with_ref else ())
            v = {m: _per_seed(runs, lambda r, m=m: _benign(r, m, key)) for m in methods}
            texts.append(f"γ {gamma}: CLAIR {_ms(v['clair'])}, FedIT {_ms(v['fedit'])}, oracle {_ms(v['oracle'])}, "
                         f"local {_ms(v['local'])}"
                         + (f", refinement without detection {_ms(v['clair_nodetect'])}" if with_ref else ""))
            values_gain[f"CLAIR - FedIT, γ {gamma}"] = _diff(v["clair"], v["fedit"])
            values_gain[f"oracle - CLAIR, γ {gamma}"] = _diff(v["oracle"], v["clair"])
            if with_ref:
                values_ref[f"CLAIR - no detection, γ {gamma}"] = _diff(v["clair"], v["clair_nodetect"])
            if gamma > 0 and with_ref:  # CLAIR against its own refinement with nobody flagged: detection alone
                ref_comps.append(paired(_diff(v["clair"], v["clair_nodetect"]),
                                        against=f"the refinement without detection at γ {gamma}"))
            if gamma > 0:
                gain_comps.append(paired(_diff(v["clair"], v["fedit"]), against=f"FedIT at γ {gamma}"))
                prec = _per_seed(runs, lambda r: r.summary["clair"].get("precision") or 0.0)
                rec = _per_seed(runs, lambda r: r.summary["clair"].get("recall") or 0.0)
                exact = [min(p, r) for p, r in zip(prec, rec, strict=True)]
                # exactly right: min(precision, recall) = 1; the threshold sits just below 1
                detect_comps.append(paired(exact, tol=0.999, against=f"exact flags at γ {gamma}"))
                values_det[f"precision γ {gamma}"], values_det[f"recall γ {gamma}"] = prec, rec
                texts_det.append(f"γ {gamma}: precision {_ms(prec, 2)}, recall {_ms(rec, 2)}")
            else:
                flagged = _per_seed(runs, lambda r: len(r.history["clair"][-1].get("detection", {}).get("flagged", [])))
                texts_det.append(f"γ 0: {_ms(flagged, 1)} clients flagged (none contaminated)")
        name = "copy task (copy-llama)" if task == "copy" else "MiniLM / BBC News"
        claims.append(_decide(
            f"{name}: CLAIR flags exactly the contaminated clients (γ = 0.1, 0.2, 0.3)",
            "consistent detection (Theorem 3)", "; ".join(texts_det), detect_comps,
            "last round's flags against the truth; per seed min(precision, recall); holds at a γ if its interval "
            "lies above 0.999 (exact in every seed), and only if it holds at every γ", values_det))
        claims.append(_decide(
            f"{name}: benign clients do better under CLAIR than under FedAvg of everyone (γ > 0)",
            "CLAIR above FedAvg under contamination",
            "benign clients' " + label + ": " + "; ".join(texts) + f"; CLAIR minus {_vs(gain_comps)}",
            gain_comps, "CLAIR minus FedIT per seed, at each γ > 0 (holds only at each); oracle = FedAvg of the "
            "benign clients only, told who they are", values_gain))
        if ref_comps:  # FedIT's model is global, CLAIR's personal: this one compares two personal downloads
            claims.append(_decide(
                f"{name}: detection helps benign clients beyond the refinement (γ > 0)",
                "robustness, not only personalisation",
                "benign clients' " + label + ": " + "; ".join(texts) + f"; CLAIR minus {_vs(ref_comps)}",
                ref_comps, "CLAIR minus its refinement without detection (clair_nodetect) per seed, at each γ > 0; "
                "CLAIR minus FedIT mixes detection with personalisation", values_ref))
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
        ("freezing", "truncation", "homogeneous", "freezing_constant", "truncation_constant"),
        "MiniLM, 10 clients at ranks 4..32, Dirichlet 0.5, 6 rounds of 5 local steps, 2000 training examples; "
        "the bytes are compared with FedIT with every client at rank R = 32 (the homogeneous federation freezing "
        "replaces); the paper's sizes are not given in its abstract.",
        _hafl),
    "prelort": Experiment(
        "prelort", "PreLort: prefix-nested LoRA against heterogeneous-rank baselines",
        "PreLort (2025): accuracy, ROUGE-L and perplexity across base models",
        ("minilm_bbc", "smollm2_headlines", "minilm_bbc_constant", "smollm2_headlines_constant"),
        "MiniLM on BBC News (the main job's clients and ranks, 4 rounds of 50 local steps) and SmolLM2-135M on BBC "
        "headlines (4 clients, 2 rounds of 50 steps, 24 test examples, 12 for ROUGE-L): far smaller than the "
        "paper's models and budgets; 50 local steps so that prefix-nested training has room to act "
        "(docs/methods.md#prelort).",
        _prelort),
    "clair": Experiment(
        "clair", "CLAIR: contaminated clients in a federated LoRA run",
        "CLAIR (2025): a small Transformer on a text-copying task; our MiniLM run as a second setting",
        tuple(f"{t}_g{g}" for t in ("copy", "minilm") for g, _ in _GAMMAS),
        "the copy task is ours (a 1-layer Llama pretrained to copy, LoRA on o_proj, contaminated clients learn "
        "another substitution); MiniLM / BBC News with other_task contamination; 10 clients, γ = 0, 0.1, 0.2, 0.3.",
        _clair),
}
