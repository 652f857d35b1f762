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
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .verdicts import advice, combine, exact, example_se, mean_sd, not_run, paired, proportion, sign_count, verdict

__all__ = ["EXPERIMENTS", "Experiment", "Claim", "Run", "UNTUNED", "describe", "mean_sd", "verdict", "model_params"]


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
    #: the configs whose runs the claim reads; whether its outcome depends on training (a learning rate)
    configs: tuple[str, ...] = ()
    trained: bool = True
    #: why it is "not testable here", in a few words for the verdict cell
    why: str = ""

    def to_dict(self) -> dict:
        """The claim as JSON would read it back (``configs`` a list)."""
        return {**asdict(self), "configs": list(self.configs)}


#: The verdict cell's reason for a claim whose runs used a learning rate chosen for another setting.
UNTUNED = "learning rate not tuned for this setting"


@dataclass(frozen=True)
class Experiment:
    r"""A reproduction: its configs (stems of ``configs/reproduce/<name>/*.toml``) and its claims' analysis.

    ``differences`` says how the experiment differs from the paper; ``{stem.key}`` (``{minilm_bbc.local_steps}``,
    ``{dir001_r1.method_options.fedit.lr}``) is filled from that config's runs' own ``config.json``
    (:func:`describe`), so the text never states a setting the runs did not use.

    ``tuned`` lists the configs whose learning rates were chosen on validation data **for their own setting**
    (None: every config's, as its header says). A config whose TOML has a ``tuned`` key (the choice of
    ``lowrank-fed tune`` for that config) counts as tuned too. A claim on training outcomes that reads any other
    config is "not testable here" (:data:`UNTUNED`, :meth:`claims`); counts of bytes or parameters are not.
    """

    name: str
    title: str
    paper: str
    configs: tuple[str, ...]
    differences: str
    analyse: Callable[[Results], list[Claim]]
    tuned: tuple[str, ...] | None = None

    def untuned(self, config_root) -> set[str]:
        """The configs whose learning rates were not chosen for their own setting (see the class docstring)."""
        import tomllib
        from pathlib import Path

        if self.tuned is None:
            return set()
        out = set()
        for stem in self.configs:
            path = Path(config_root) / self.name / f"{stem}.toml"
            keyed = path.is_file() and "tuned" in tomllib.loads(path.read_text())
            if stem not in self.tuned and not keyed:
                out.add(stem)
        return out

    def claims(self, results: Results, config_root) -> list[Claim]:
        """:attr:`analyse`, with every claim on training outcomes over an untuned config made "not testable here"."""
        untuned = self.untuned(config_root)
        out = []
        for c in self.analyse(results):
            bad = sorted(set(c.configs) & untuned)
            if c.trained and bad and c.verdict != "not run yet":
                note = (f"not testable here: {UNTUNED} ({', '.join(bad)} reuse the learning rates chosen for "
                        f"{', '.join(self.tuned) or 'another setting'})" + (f"; {c.note}" if c.note else ""))
                c = Claim(c.claim, c.paper, c.ours, "not testable here", note, c.values, c.comparisons, "",
                          c.configs, c.trained, UNTUNED)
            out.append(c)
        return out


_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_]+)+)\}")


def _setting(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(text: str, settings: dict[str, list[dict]]) -> str:
    r"""``text`` with every ``{stem.key.subkey}`` replaced by that value in the config dicts of ``settings[stem]``
    (one per seed; differing values are all given, ``a / b``).

    Raises
    ------
    KeyError
        A placeholder naming a config without settings or a key its config does not have.
    """
    def one(m: re.Match) -> str:
        stem, path = m.group(1), m.group(2)[1:].split(".")
        if not settings.get(stem):
            raise KeyError(f"describe: no settings of config '{stem}' for '{m.group(0)}'")
        values = []
        for cfg in settings[stem]:
            v = cfg
            for key in path:
                if not isinstance(v, dict) or key not in v:
                    raise KeyError(f"describe: config '{stem}' has no '{'.'.join(path)}' (for '{m.group(0)}')")
                v = v[key]
            if _setting(v) not in values:
                values.append(_setting(v))
        return " / ".join(values)
    return _PLACEHOLDER.sub(one, text)


def _ms(values: Sequence[float], digits: int = 3) -> str:
    s = mean_sd(values)
    return f"{s['mean']:.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def _decide(claim: str, paper: str, ours: str, comparisons: list[dict], note: str = "",
            values: dict[str, list] | None = None, *, untestable: str = "", configs: Sequence[str] = (),
            trained: bool = True) -> Claim:
    """The claim with the combined verdict of its comparisons (``untestable``: the reason it is not testable here;
    ``configs``: the configs it reads; ``trained``: whether it is about training outcomes)."""
    word = combine(c["verdict"] for c in comparisons)
    why = ""
    if untestable and word != "not run yet":
        word, why = "not testable here", "no method above the majority class"
        note = f"not testable here: {untestable}" + (f"; {note}" if note else "")
    return Claim(claim, paper, ours, word, note, values or {}, comparisons,
                 advice(comparisons) if word not in ("not testable here", "not run yet") else "", tuple(configs),
                 trained, why)


def _not_run(claim: str, paper: str, missing: str, note: str = "", configs: Sequence[str] = ()) -> Claim:
    """A claim whose runs (or the numbers it needs from them) do not exist yet: no verdict, never a fake one."""
    return Claim(claim, paper, f"not run yet: {missing}", "not run yet", note, configs=tuple(configs))


def _take(results: Results, stems: Sequence[str]) -> dict[str, dict[int, Run]] | None:
    """The runs of ``stems`` on the seeds they all have (None when one has none): claims pair configs by seed."""
    if any(not results.get(s) for s in stems):
        return None
    common = set.intersection(*(set(results[s]) for s in stems))
    if not common:
        return None
    return {s: {k: results[s][k] for k in sorted(common)} for s in stems}


def _no_runs(results: Results, stems: Sequence[str]) -> str:
    """What is missing for a claim on ``stems``, for its "not run yet" text."""
    missing = [s for s in stems if not results.get(s)]
    return (f"no finished runs of {', '.join(missing)}" if missing
            else f"no seed that every one of {', '.join(stems)} has run")


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

    A method has learnt something measurable only if it is **above** always answering the test set's majority
    class by more than 2 standard errors, ``acc - p > 2 sqrt(p (1 - p) / N)`` (one-sided: an accuracy at or below
    ``p`` is no sign of learning), with ``p`` that class's share of the ``N`` test examples (``majority_accuracy``
    and ``eval_size`` in ``setup.json``; not ``1 / C``, which the majority class always beats). The claim is not
    testable when no method has, in any seed.
    """
    for run in by_seed.values():
        p, n = run.setup.get("majority_accuracy"), int(run.setup.get("eval_size") or 0)
        if p is None or n < 1:
            return ""
        if any(run.summary[m]["final"] - p > 2 * math.sqrt(p * (1 - p) / n) for m in methods):
            return ""
    return ("no method's accuracy more than 2 standard errors above the majority class's share of the test set, in "
            "any seed: none has learnt anything measurable")


def _vs(comparisons: list[dict], digits: int = 3) -> str:
    """``vs X +0.091 [+0.050, +0.132]; ...``: each comparison's mean and interval."""
    def one(c):
        if c.get("kind") == "not run":
            return f"vs {c['against']} not run yet"
        if c.get("kind") == "proportion":
            return f"{c['against']} {c['k']}/{c['n']} [{c['low']:.2f}, {c['high']:.2f}]"
        if c.get("kind") == "exact":
            return f"vs {c['against']} " + ", ".join(f"{d:+.{digits}f}" for d in c["differences"]) + " (exact)"
        if c.get("kind") == "sign":
            return (f"vs {c['against']} {c['k_plus']} seeds for, {c['k_minus']} against "
                    f"(sign test p = {c['p_value']:.2f})")
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
_LORA_A2_BASELINES = ("fedit", "ffa", "flexlora")


def _within(d: Sequence[float], band: float, against: str) -> list[dict]:
    r"""Closeness as two one-sided comparisons: ``d > -band`` and ``-d > -band`` (both must hold)."""
    return [paired(d, -band, against=f"{against}: LoRA-A2 minus it"),
            paired([-x for x in d], -band, against=f"{against}: it minus LoRA-A2")]


def _lora_a2(results: Results) -> list[Claim]:
    baselines = _LORA_A2_BASELINES
    methods = (*baselines, "lora_a2")
    claims = []
    first = ("Dir 0.01, upload budget 1: LoRA-A2 above FL+LoRA, FFA-LoRA and FlexLoRA",
             "54.84 vs 36.58 / 34.44 / 35.54")
    taken = _take(results, ("dir001_r1",))
    if taken is None:
        claims.append(_not_run(*first, _no_runs(results, ("dir001_r1",)), configs=("dir001_r1",)))
    else:
        r1 = taken["dir001_r1"]
        titles = _titles(next(iter(r1.values())))
        acc = {m: _per_seed(r1, _final(m)) for m in methods}
        comps = _against(acc, "lora_a2", baselines, titles, by_seed=r1)
        claims.append(_decide(
            *first,
            f"{_ms(acc['lora_a2'])} vs " + " / ".join(_ms(acc[b]) for b in baselines) + f"; {_vs(comps)}",
            comps, "global test accuracy after the last round; LoRA-A2 minus each baseline per seed",
            {titles[m]: v for m, v in acc.items()}, untestable=_near_chance(r1, methods), configs=("dir001_r1",)))
    # The paper's rank-8 numbers put FlexLoRA above LoRA-A2: its advantage is a low-budget one.
    second = ("Dir 0.01: LoRA-A2's margin over each baseline is larger at budget 1 than at budget 8",
              "+18.3 at rank 1, -5.9 at rank 8 (FlexLoRA 60.41 vs 54.50)")
    taken = _take(results, ("dir001_r1", "dir001_r8"))
    if taken is None:
        claims.append(_not_run(*second, _no_runs(results, ("dir001_r1", "dir001_r8")),
                               configs=("dir001_r1", "dir001_r8")))
    else:
        r1, r8 = taken["dir001_r1"], taken["dir001_r8"]
        titles = _titles(next(iter(r1.values())))
        acc = {m: _per_seed(r1, _final(m)) for m in methods}
        acc8 = {m: _per_seed(r8, _final(m)) for m in methods}
        gains = {b: _diff(_diff(acc["lora_a2"], acc[b]), _diff(acc8["lora_a2"], acc8[b])) for b in baselines}
        comps = [paired(gains[b], against=titles[b]) for b in baselines]
        claims.append(_decide(
            *second,
            "margin at 8: " + ", ".join(f"{titles[b]} {_ms(_diff(acc8['lora_a2'], acc8[b]))}" for b in baselines)
            + f"; margin at 1 minus margin at 8: {_vs(comps)}",
            comps, "per baseline: (LoRA-A2 - it at budget 1) - (LoRA-A2 - it at budget 8), same seed",
            {f"margin(1) - margin(8), {titles[b]}": gains[b] for b in baselines},
            untestable=_near_chance(r1, methods) and _near_chance(r8, methods), configs=("dir001_r1", "dir001_r8")))
    third = ("Dir 0.5: LoRA-A2 within about 1 point of each baseline", "within ~1 point")
    stems = tuple(f"dir05_r{r}" for r in (1, 2, 8))
    taken = _take(results, stems)
    if taken is None:
        claims.append(_not_run(*third, _no_runs(results, stems), configs=stems))
    else:
        comps, texts, values, chance = [], [], {}, []
        for r in (1, 2, 8):
            runs = taken[f"dir05_r{r}"]
            titles = _titles(next(iter(runs.values())))
            a = {m: _per_seed(runs, _final(m)) for m in methods}
            chance.append(_near_chance(runs, methods))
            for b in baselines:
                d = _diff(a["lora_a2"], a[b])
                values[f"LoRA-A2 - {titles[b]}, budget {r}"] = d
                comps += _within(d, LORA_A2_BAND, f"{titles[b]}, budget {r}")
            texts.append(f"budget {r}: LoRA-A2 {_ms(a['lora_a2'])}, minus " + ", ".join(
                f"{titles[b]} {_ms(values[f'LoRA-A2 - {titles[b]}, budget {r}'])}" for b in baselines))
        claims.append(_decide(
            *third, "; ".join(texts), comps,
            f"holds if every interval of LoRA-A2 minus a baseline lies within ±{LORA_A2_BAND:g} (2 points, at "
            "budgets 1, 2 and 8)", values, untestable=chance[0] if all(chance) else "", configs=stems))
    fourth = ("Uploads at budget 1 are 99.8% below full fine-tuning", "0.27B vs 186B parameters (99.8% less)")
    taken = _take(results, ("dir001_r1",))
    if taken is None:
        claims.append(_not_run(*fourth, _no_runs(results, ("dir001_r1",)), configs=("dir001_r1",)))
        return claims
    r1 = taken["dir001_r1"]
    whole = _per_seed(r1, lambda run: 1.0 - run.summary["lora_a2"]["upload_vs_full"] * run.setup["adapted_params"]
                      / model_params(run))
    adapted = _per_seed(r1, lambda run: 1.0 - run.summary["lora_a2"]["upload_vs_full"])
    comps = [exact([s - LORA_A2_SAVING for s in whole], against=f"{100 * LORA_A2_SAVING:.1f}% saved")]
    claims.append(_decide(
        *fourth,
        f"{100 * np.mean(whole):.2f}% less than fine-tuning the whole model (base and head; the paper's count); "
        f"{100 * np.mean(adapted):.2f}% less than fine-tuning only the adapted query/value matrices (exact counts)",
        comps, "parameters uploaded over the run against every upload carrying the whole model; a count, exact (no "
        "interval); the verdict is on the paper's count",
        {"fraction saved (whole model)": whole, "fraction saved (adapted matrices)": adapted},
        configs=("dir001_r1",), trained=False))
    return claims


# ----------------------------------------------------------------------------- byun-lee


def _top_client(run: Run) -> int:
    ranks = run.setup["ranks"]
    return int(np.argmax(ranks))


_BYUN_LEE_CLAIMS = (("Zero-padding: the rank-20 client's accuracy falls after one aggregation", "84.3% -> 39.0%"),
                    ("Replication keeps it (smaller drop than zero-padding)", "84.3% -> 82.1%"),
                    ("Replication's global model is at least as good as zero-padding's",
                     "implied (replication is proposed as the fix)"))


def _byun_lee(results: Results) -> list[Claim]:
    taken = _take(results, ("top10_bbc",))
    if taken is None:
        return [_not_run(*c, _no_runs(results, ("top10_bbc",)), configs=("top10_bbc",)) for c in _BYUN_LEE_CLAIMS]
    runs = taken["top10_bbc"]
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
                 "after (test)": zp["after_test"]}, configs=("top10_bbc",)),
        _decide("Replication keeps it (smaller drop than zero-padding)",
                "84.3% -> 82.1%",
                f"{_ms(rep['before'])} -> {_ms(rep['after'])} (test set: {_ms(rep['before_test'])} -> "
                f"{_ms(rep['after_test'])}); zero-padding's drop minus replication's {_vs(rep_comp)}",
                rep_comp, "difference: zero-padding's drop minus replication's, same seed",
                {"before": rep["before"], "after": rep["after"], "before (test)": rep["before_test"],
                 "after (test)": rep["after_test"]}, configs=("top10_bbc",)),
    ]
    g_zp, g_rep = _per_seed(runs, _final("fedit")), _per_seed(runs, _final("replication"))
    comps = _against({"replication": g_rep, "fedit": g_zp}, "replication", ("fedit",), {"fedit": "zero-padding"},
                     tol=-0.01, by_seed=runs)
    claims.append(_decide(
        "Replication's global model is at least as good as zero-padding's",
        "implied (replication is proposed as the fix)",
        f"replication {_ms(g_rep)} vs zero-padding {_ms(g_zp)}; {_vs(comps)}",
        comps, "global test accuracy (rank 20) after the last round; holds if the interval lies above -0.01 "
        "(a 1-point tolerance)", {"replication": g_rep, "zero-padding": g_zp},
        untestable=_near_chance(runs, ("fedit", "replication")), configs=("top10_bbc",)))
    return claims


# ----------------------------------------------------------------------------- hafl


def _client_drops(run: Run, method: str) -> list[float]:
    r"""Each client's signed drop at distribution, last evaluated round:

    .. math:: \mathrm{drop}_k = \mathrm{acc}_k(\text{global}) - \mathrm{acc}_k(\text{download}_k)

    on the client's own held-out data where the run recorded the global model's per-client scores
    (``per_client_global`` and ``per_client`` in ``metrics.jsonl``); otherwise on the test set, the global model's
    accuracy minus that of the download of the client's rank (``accuracy`` and ``by_rank[r_k]``). Signed: a download
    that beats the global model gives a negative drop (the global's own rank is no floor).
    """
    last = _last(run, method)
    if "per_client_global" in last:
        return [float(g - c) for g, c in zip(last["per_client_global"], last["per_client"], strict=True)
                if g is not None and c is not None]
    ranks = last.get("ranks") or run.setup["ranks"]
    return [float(last["accuracy"] - last["by_rank"][str(r)]["accuracy"]) for r in ranks]


def _client_drop(run: Run, method: str) -> float:
    """The mean over clients of :func:`_client_drops`."""
    return float(np.mean(_client_drops(run, method)))


def _rounds_to(history: list[dict], target: float) -> float:
    """The first round whose validation accuracy reaches ``target``; the last round + 1 if none does."""
    for h in history:
        if h["round"] > 0 and h.get("val_accuracy", -1.0) >= target:
            return float(h["round"])
    return float(max(h["round"] for h in history) + 1)


def _hafl(results: Results) -> list[Claim]:
    claims = []
    drop_claim = ("Freezing: no accuracy drop at distribution (truncation has one)", "no drop with freezing")
    both = _take(results, ("freezing", "truncation"))
    if both is None:
        claims.append(_not_run(*drop_claim, _no_runs(results, ("freezing", "truncation")),
                               configs=("freezing", "truncation")))
    else:
        frz, trn = both["freezing"], both["truncation"]
        drops = {name: _per_seed(runs, lambda r: _client_drop(r, "hafl"))
                 for name, runs in (("frz", frz), ("trn", trn))}
        where = ("own held-out data" if all("per_client_global" in _last(r, "hafl") for r in (*frz.values(),
                                                                                                 *trn.values()))
                 else "test set, global minus the download of the client's rank")
        local_frz, local_trn = _per_seed(frz, _final("hafl", "local")), _per_seed(trn, _final("hafl", "local"))
        comps = [paired(_diff(local_frz, local_trn), against="truncation (clients' accuracy on what they receive)")]
        per_client_trn = "; ".join(f"seed {s}: " + ", ".join(f"{d:+.3f}" for d in _client_drops(trn[s], "hafl"))
                                   for s in _seeds(trn))
        claims.append(_decide(
            *drop_claim,
            f"clients' accuracy on their own held-out data under what they receive: freezing {_ms(local_frz)}, "
            f"truncation {_ms(local_trn)}; freezing minus truncation {_vs(comps)}; signed drop (global minus "
            f"download, mean over clients, {where}): freezing {_ms(drops['frz'])}, truncation {_ms(drops['trn'])} "
            f"(truncation per client, {per_client_trn})",
            comps, "the verdict compares what the clients receive: freezing minus truncation, mean over clients of "
            "each one's accuracy on its own held-out data under its download, same seed; the drop is signed (a "
            "download may beat the global model)",
            {"drop, freezing": drops["frz"], "drop, truncation": drops["trn"], "local, freezing": local_frz,
             "local, truncation": local_trn}, configs=("freezing", "truncation")))
    speed_claim = ("Adaptive rank-1 aggregation converges faster than zero-padding",
                   "faster (rounds to a target accuracy)")
    taken = _take(results, ("freezing",))
    if taken is None:
        claims.append(_not_run(*speed_claim, _no_runs(results, ("freezing",)), configs=("freezing",)))
    else:
        frz = taken["freezing"]
        r_hafl, r_zp, targets = [], [], []
        for s in _seeds(frz):
            run = frz[s]
            best = min(max(h.get("val_accuracy", 0.0) for h in run.history[m]) for m in ("hafl", "fedit"))
            target = 0.9 * best
            targets.append(target)
            r_hafl.append(_rounds_to(run.history["hafl"], target))
            r_zp.append(_rounds_to(run.history["fedit"], target))
        cap = int(max(h["round"] for h in frz[_seeds(frz)[0]].history["hafl"])) + 1
        comps = [sign_count(_diff(r_zp, r_hafl), against="zero-padding (FedIT)")]
        claims.append(_decide(
            *speed_claim,
            f"rounds to 90% of the lower of the two best validation accuracies (integers, {cap} = never): HAFL "
            f"{', '.join(f'{r:g}' for r in r_hafl)}, zero-padding (FedIT) {', '.join(f'{r:g}' for r in r_zp)}; "
            f"FedIT minus HAFL {_vs(comps)}",
            comps, f"validation accuracy every round; an integer capped at the last round + 1 ({cap}), so a sign "
            "count over seeds (ties dropped), not a t interval",
            {"rounds, HAFL": r_hafl, "rounds, zero-padding": r_zp, "target": targets}, configs=("freezing",)))
    bytes_claim = ("HAFL (freezing) moves fewer bytes than truncation-based schemes (HAFL's truncation variant, "
                   "HetLoRA)", "lower communication than truncation-based HetLoRA-style schemes")
    both = _take(results, ("freezing", "truncation"))
    if both is None:
        claims.append(_not_run(*bytes_claim, _no_runs(results, ("freezing", "truncation")),
                               configs=("freezing", "truncation")))
        return claims
    frz, trn = both["freezing"], both["truncation"]
    mb = {(who, way): _per_seed(runs, _final(m, f"mb_{way}"))
          for who, runs, m in (("hafl", frz, "hafl"), ("truncation", trn, "hafl"), ("hetlora", frz, "hetlora"))
          for way in ("up", "down")}
    names = {"truncation": "HAFL truncation", "hetlora": "HetLoRA"}
    comps = [exact(_diff(mb[(other, way)], mb[("hafl", way)]), against=f"{names[other]}, MB {way} saved")
             for other in ("truncation", "hetlora") for way in ("up", "down")]
    hom = _take(results, ("freezing", "homogeneous"))
    if hom is None:
        beside = "homogeneous FedIT at rank R: not run yet (configs/reproduce/hafl/homogeneous.toml)"
    else:
        h = hom["homogeneous"]
        beside = ("homogeneous FedIT at rank R (every client at 32) " + ", ".join(
            f"{v:.1f}" for v in _per_seed(h, _final("fedit", "mb_up"))) + " up / " + ", ".join(
            f"{v:.1f}" for v in _per_seed(h, _final("fedit", "mb_down"))) + " down")

    def per_seed(key):
        return ", ".join(f"{v:.1f}" for v in mb[key])

    claims.append(_decide(
        *bytes_claim,
        f"MB over the run per seed, up / down (exact): HAFL freezing {per_seed(('hafl', 'up'))} / "
        f"{per_seed(('hafl', 'down'))}; HAFL truncation {per_seed(('truncation', 'up'))} / "
        f"{per_seed(('truncation', 'down'))}; HetLoRA {per_seed(('hetlora', 'up'))} / {per_seed(('hetlora', 'down'))}"
        f"; beside: {beside}; saved by freezing {_vs(comps, 1)}",
        comps, "bytes are counted, not sampled: exact per seed, no interval; up and down apart, each must be saved "
        "(equal: tie); freezing downloads all R slots and uploads each client's r_k",
        {f"MB {way}, {who}": mb[(who, way)] for who in ("hafl", "truncation", "hetlora") for way in ("up", "down")},
        configs=("freezing", "truncation"), trained=False))
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


_PRELORT_CLAIMS = (
    ("minilm_bbc", "MiniLM / BBC News: PreLort's global accuracy above every baseline", "higher accuracy"),
    ("minilm_bbc", "Low-rank clients gain from high-rank ones: PreLort's rank-4 download above the prefix baselines'",
     "higher accuracy at low ranks"),
    ("minilm_bbc", "MiniLM: prefix-nested training lifts every rank's download above replication's (the same "
     "segment-wise rule without it)", "nested training makes every prefix a good model"),
    ("smollm2_headlines", "SmolLM2 / BBC headlines: PreLort's ROUGE-L above every baseline", "higher ROUGE-L"),
    ("smollm2_headlines", "SmolLM2: PreLort's perplexity lower than or equal to the baselines'",
     "lower or equal perplexity"),
    ("smollm2_headlines", "SmolLM2: prefix-nested training gives every rank's download a lower perplexity than "
     "replication's", "nested training makes every prefix a good model"),
)


def _prelort(results: Results) -> list[Claim]:
    out = []
    for stem, analyse in (("minilm_bbc", _prelort_minilm), ("smollm2_headlines", _prelort_smollm2)):
        taken = _take(results, (stem,))  # each half of the experiment is read alone
        if taken is None:
            out += [_not_run(claim, paper, _no_runs(results, (stem,)), configs=(stem,))
                    for s, claim, paper in _PRELORT_CLAIMS if s == stem]
        else:
            out += analyse(taken[stem])
    return out


def _prelort_minilm(cls: dict[int, Run]) -> list[Claim]:
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
        acc, untestable=_near_chance(cls, (*_PRELORT_BASELINES, "prelort")), configs=("minilm_bbc",)))

    prefix = ("fedit", "hetlora", "replication")
    lows = {m: _per_seed(cls, lambda r, m=m: min(_by_rank(r, m, "accuracy").items())[1]) for m in (*prefix, "prelort")}
    comps = [paired(_diff(lows["prelort"], lows[b]), against=titles[b]) for b in prefix]
    claims.append(_decide(
        "Low-rank clients gain from high-rank ones: PreLort's rank-4 download above the prefix baselines'",
        "higher accuracy at low ranks",
        f"rank-4 download: PreLort {_ms(lows['prelort'])}, " + ", ".join(f"{titles[b]} {_ms(lows[b])}" for b in prefix)
        + f"; PreLort minus {_vs(comps)}",
        comps, "the methods whose rank-4 clients download a prefix of the global adapter", lows,
        configs=("minilm_bbc",)))

    comps, values = _nested(cls, "accuracy", lower_is_better=False)
    claims.append(_decide(
        "MiniLM: prefix-nested training lifts every rank's download above replication's (the same segment-wise "
        "rule without it)", "nested training makes every prefix a good model",
        f"PreLort minus replication, each rank's download on the test set: {_vs(comps)}", comps,
        "holds only if it holds at every client rank", values, configs=("minilm_bbc",)))

    return claims


def _prelort_smollm2(gen: dict[int, Run]) -> list[Claim]:
    titles = _titles(next(iter(gen.values())))
    claims = []
    rouge = {m: _per_seed(gen, _final(m, "rouge_l")) for m in (*_PRELORT_BASELINES, "prelort")}
    comps = _against(rouge, "prelort", _PRELORT_BASELINES, titles)
    claims.append(_decide(
        "SmolLM2 / BBC headlines: PreLort's ROUGE-L above every baseline",
        "higher ROUGE-L",
        f"PreLort {_ms(rouge['prelort'])}; " + ", ".join(f"{titles[b]} {_ms(rouge[b])}" for b in _PRELORT_BASELINES)
        + f"; PreLort minus {_vs(comps)}",
        comps, "global model, greedy headlines", rouge, configs=("smollm2_headlines",)))

    ppl = {m: _per_seed(gen, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    logs = {m: np.log(v).tolist() for m, v in ppl.items()}
    comps = _against(logs, "prelort", _PRELORT_BASELINES, titles, tol=-PRELORT_PPL_TOL, lower_is_better=True)
    claims.append(_decide(
        "SmolLM2: PreLort's perplexity lower than or equal to the baselines'",
        "lower or equal perplexity",
        f"PreLort {_ms(ppl['prelort'], 2)}; " + ", ".join(f"{titles[b]} {_ms(ppl[b], 2)}" for b in _PRELORT_BASELINES)
        + f"; ln(baseline / PreLort) {_vs(comps)}",
        comps, "per baseline ln(its perplexity / PreLort's); holds if the interval lies above -ln 1.01 (equal "
        "within 1%)", ppl, configs=("smollm2_headlines",)))

    comps, values = _nested(gen, "perplexity", lower_is_better=True)
    claims.append(_decide(
        "SmolLM2: prefix-nested training gives every rank's download a lower perplexity than replication's",
        "nested training makes every prefix a good model",
        f"ln(replication / PreLort), each rank's download: {_vs(comps)}", comps,
        "holds only if it holds at every client rank", values, configs=("smollm2_headlines",)))
    return claims


# ----------------------------------------------------------------------------- clair

_GAMMAS = (("0", 0.0), ("01", 0.1), ("02", 0.2), ("03", 0.3))
#: CLAIR's detection "holds" when the Clopper-Pearson interval of the share of exact rounds lies above one half
#: (exact in most rounds), and "does not hold" when it lies below.
DETECTION_SHARE = 0.5
#: The benign-gain claim's required baselines: local training, and FedAvg of everyone's exact products.
_CLAIR_BASELINES = (("local", "local training"), ("flexlora", "FlexLoRA (exact-product FedAvg of everyone)"))


def _benign(run: Run, method: str, key: str) -> float:
    last = run.history[method][-1]
    return float(last.get(f"benign_local_{key}", last.get(f"local_{key}")))


def _detections(run: Run) -> list[dict]:
    """CLAIR's detection record of every round after the first aggregation."""
    return [h["detection"] for h in run.history["clair"] if h["round"] > 0 and h.get("detection") is not None]


def _clair(results: Results) -> list[Claim]:
    claims = []
    for task, key, label in (("copy", "exact_match", "exact match"), ("minilm", "accuracy", "accuracy")):
        name = "copy task (copy-llama)" if task == "copy" else "MiniLM / BBC News"
        stems = tuple(f"{task}_g{tag}" for tag, _ in _GAMMAS)
        detect = (f"{name}: CLAIR flags exactly the contaminated clients (γ = 0.1, 0.2, 0.3)",
                  "consistent detection (Theorem 3)")
        clean = (f"{name}: CLAIR flags nobody when no client is contaminated (γ = 0)", "implied (specificity)")
        gain = (f"{name}: benign clients do better under CLAIR than under local training and than exact-product "
                "FedAvg of everyone (γ > 0)", "CLAIR above FedAvg under contamination")
        specific = (f"{name}: CLAIR's gain grows with contamination (gain at γ minus gain at γ = 0)",
                    "CLAIR's advantage comes from handling contamination")
        beyond = (f"{name}: detection helps benign clients beyond the refinement (γ > 0)",
                  "robustness, not only personalisation")
        taken = _take(results, stems)
        if taken is None:
            missing = _no_runs(results, stems)
            claims += [_not_run(*c, missing, configs=stems) for c in (detect, clean, gain, specific, beyond)]
            continue
        # detection: 0/1 per seed and round
        det_comps, values_det, texts_det = [], {}, []
        for tag, gamma in _GAMMAS[1:]:
            runs = taken[f"{task}_g{tag}"]
            hits = [sorted(d.get("flagged") or []) == sorted(d.get("contaminated") or [])
                    for s in _seeds(runs) for d in _detections(runs[s])]
            det_comps.append(proportion(hits, DETECTION_SHARE, seeds=len(runs), against=f"exact flags at γ {gamma}"))
            values_det[f"exact, γ {gamma}"] = [float(h) for h in hits]
            texts_det.append(f"γ {gamma}: {sum(hits)}/{len(hits)} rounds exact "
                             f"[{det_comps[-1]['low']:.2f}, {det_comps[-1]['high']:.2f}]")
        claims.append(_decide(
            *detect, "; ".join(texts_det) + " (seeds x rounds)", det_comps,
            "every round after the first aggregation, every seed: flagged set equal to the contaminated set; "
            f"Clopper-Pearson 95% interval of the share; holds at a γ if it lies above {DETECTION_SHARE:g}, and only "
            "if it holds at every γ", values_det, configs=stems))
        runs0 = taken[f"{task}_g0"]
        rounds0 = [d for s in _seeds(runs0) for d in _detections(runs0[s])]
        quiet = [not d.get("flagged") for d in rounds0]
        false_flags = sum(len(d.get("flagged") or []) for d in rounds0)
        clients = len(runs0[_seeds(runs0)[0]].setup.get("ranks") or []) or None
        comp = proportion(quiet, DETECTION_SHARE, seeds=len(runs0), against="rounds with no client flagged at γ 0")
        claims.append(_decide(
            *clean, f"{sum(quiet)}/{len(quiet)} rounds with nobody flagged [{comp['low']:.2f}, {comp['high']:.2f}]; "
            f"{false_flags} false flags in {len(rounds0)} rounds" + (f" x {clients} clients" if clients else ""),
            [comp], f"γ = 0 (no contaminated client): Clopper-Pearson 95% interval of the share of rounds with no "
            f"flag; holds if it lies above {DETECTION_SHARE:g}", {"no flag, γ 0": [float(q) for q in quiet]},
            configs=stems))
        # benign clients' score: CLAIR against each required baseline, paired by seed; FedIT beside
        score: dict[tuple[str, float], list[float] | None] = {}
        for tag, gamma in _GAMMAS:
            runs = taken[f"{task}_g{tag}"]
            for m in ("clair", "fedit", "oracle", "clair_nodetect", *(b for b, _ in _CLAIR_BASELINES)):
                have = all(m in runs[s].history for s in _seeds(runs))
                score[(m, gamma)] = _per_seed(runs, lambda r, m=m: _benign(r, m, key)) if have else None
        gain_comps, spec_comps, values_gain, values_spec, texts = [], [], {}, {}, []
        for _, gamma in _GAMMAS[1:]:
            for b, title in _CLAIR_BASELINES:
                if score[(b, gamma)] is None or score[(b, 0.0)] is None:
                    gain_comps.append(not_run(f"{title} at γ {gamma}", f"no '{b}' in the runs' methods"))
                    spec_comps.append(not_run(f"{title} at γ {gamma}", f"no '{b}' in the runs' methods"))
                    continue
                d = _diff(score[("clair", gamma)], score[(b, gamma)])
                d0 = _diff(score[("clair", 0.0)], score[(b, 0.0)])
                gain_comps.append(paired(d, against=f"{title} at γ {gamma}"))
                spec_comps.append(paired(_diff(d, d0), against=f"{title}, γ {gamma} minus γ 0"))
                values_gain[f"CLAIR - {b}, γ {gamma}"], values_spec[f"(CLAIR - {b}) at γ {gamma} minus at γ 0"] = (
                    d, _diff(d, d0))
        for _, gamma in _GAMMAS:
            parts = [f"CLAIR {_ms(score[('clair', gamma)])}"] + [
                f"{m} {_ms(score[(m, gamma)])}" if score[(m, gamma)] is not None else f"{m} not run"
                for m in ("local", "flexlora", "fedit", "oracle")]
            texts.append(f"γ {gamma}: " + ", ".join(parts))
            values_gain[f"CLAIR - FedIT (beside), γ {gamma}"] = _diff(score[("clair", gamma)], score[("fedit", gamma)])
        claims.append(_decide(
            *gain, f"benign clients' {label}: " + "; ".join(texts) + f"; CLAIR minus {_vs(gain_comps)}", gain_comps,
            "CLAIR minus local training and minus FlexLoRA (FedAvg of everyone's products B_k A_k, exact, as CLAIR's "
            "own average is) per seed, at each γ > 0, each required; FedIT (factor-wise average) is shown beside, "
            "not decisive: it loses to exact-product averaging without any contamination", values_gain,
            configs=stems))
        claims.append(_decide(
            *specific, f"(CLAIR minus baseline at γ) minus (at γ 0), paired by seed: {_vs(spec_comps)}", spec_comps,
            "the part of CLAIR's gain that contamination adds, against each required baseline, at each γ > 0",
            values_spec, configs=stems))
        if not all(score.get(("clair_nodetect", g)) is not None for _, g in _GAMMAS[1:]):
            claims.append(_not_run(*beyond, "no 'clair_nodetect' (the refinement without detection) in the runs' "
                                   "methods", configs=stems))
        else:
            # FedIT's model is global, CLAIR's personal: this compares two personal downloads, detection alone
            ref_comps = [paired(_diff(score[("clair", g)], score[("clair_nodetect", g)]),
                                against=f"the refinement without detection at γ {g}") for _, g in _GAMMAS[1:]]
            claims.append(_decide(
                *beyond, f"benign clients' {label}: CLAIR minus {_vs(ref_comps)}", ref_comps,
                "CLAIR minus its refinement without detection (clair_nodetect) per seed, at each γ > 0; CLAIR minus "
                "FedIT mixes detection with personalisation",
                {f"CLAIR - no detection, γ {g}": _diff(score[("clair", g)], score[("clair_nodetect", g)])
                 for _, g in _GAMMAS[1:]}, configs=stems))
    return claims


EXPERIMENTS: dict[str, Experiment] = {
    "lora-a2": Experiment(
        "lora-a2", "LoRA-A2: low upload budgets under extreme label skew",
        "Koo et al., LoRA-A2 (ACL 2025), Table 1: 20 Newsgroups",
        tuple(f"dir{a}_r{r}" for a in ("001", "05") for r in (1, 2, 8)),
        "MiniLM-L6 (22.7M) instead of RoBERTa-base; {dir001_r1.clients} clients instead of 30; {dir001_r1.rounds} "
        "rounds of {dir001_r1.local_steps} local steps instead of 50 rounds of 5 local epochs; "
        "{dir001_r1.train_size} training examples, {dir001_r1.max_length} tokens; learning rates chosen on "
        "validation data at Dir 0.01, budget 1 only (the baselines {dir001_r1.method_options.fedit.lr}, LoRA-A2 "
        "{dir001_r1.lr} with B at 5x) and reused at budgets 2 and 8 and at Dir 0.5 (those claims are not testable "
        "here); r_G = {dir001_r1.method_options.lora_a2.global_rank}.",
        _lora_a2, tuned=("dir001_r1",)),
    "byun-lee": Experiment(
        "byun-lee", "Byun & Lee: zero-padding vs replication for a high-rank client",
        "Byun & Lee (2024): top 10% of clients at rank 20, the rest at 5",
        ("top10_bbc",),
        "MiniLM on BBC News, {top10_bbc.clients} clients with {top10_bbc.classes_per_client} topics each; the "
        "rank-20 client is the one with the most data (the paper picks the top 10% by validation accuracy); "
        "{top10_bbc.rounds} rounds of {top10_bbc.local_steps} local steps.",
        _byun_lee),
    "hafl": Experiment(
        "hafl", "HAFL: importance-based freezing and rank-1 aggregation",
        "HAFL (2025, abstract): 20 Newsgroups; details are our reconstruction",
        ("freezing", "truncation", "homogeneous", "freezing_constant", "truncation_constant"),
        "MiniLM, {freezing.clients} clients at ranks {freezing.ranks}, Dirichlet {freezing.alpha}, "
        "{freezing.rounds} rounds of {freezing.local_steps} local steps, {freezing.train_size} training examples, "
        "lr {freezing.lr}; the bytes are compared with truncation (HAFL's truncation variant and HetLoRA), FedIT "
        "with every client at rank R = 32 beside; the paper's sizes are not given in its abstract.",
        _hafl, tuned=()),  # lr 5e-3 came from an early lora-a2 choice, never from HAFL's setting
    "prelort": Experiment(
        "prelort", "PreLort: prefix-nested LoRA against heterogeneous-rank baselines",
        "PreLort (2025): accuracy, ROUGE-L and perplexity across base models",
        ("minilm_bbc", "smollm2_headlines", "minilm_bbc_constant", "smollm2_headlines_constant"),
        "MiniLM on BBC News (the main job's clients and ranks, {minilm_bbc.rounds} rounds of "
        "{minilm_bbc.local_steps} local steps, lr {minilm_bbc.lr}) and SmolLM2-135M on BBC headlines "
        "({smollm2_headlines.rounds} rounds of {smollm2_headlines.local_steps} local steps, "
        "{smollm2_headlines.eval_size} test examples, {smollm2_headlines.rouge_size} for ROUGE-L): far smaller than "
        "the paper's models and budgets; prefix-nested training needs many local steps to act "
        "(docs/methods.md#prelort).",
        _prelort, tuned=()),  # lr never tuned for PreLort's settings
    "clair": Experiment(
        "clair", "CLAIR: contaminated clients in a federated LoRA run",
        "CLAIR (2025): a small Transformer on a text-copying task; our MiniLM run as a second setting",
        tuple(f"{t}_g{g}" for t in ("copy", "minilm") for g, _ in _GAMMAS),
        "the copy task is ours (a 1-layer Llama pretrained to copy, LoRA on o_proj, contaminated clients learn "
        "another substitution; {copy_g01.rounds} rounds of {copy_g01.local_steps} local steps); MiniLM / BBC News "
        "with other_task contamination ({minilm_g01.rounds} rounds of {minilm_g01.local_steps} local steps); "
        "{copy_g01.clients} clients, γ = 0, 0.1, 0.2, 0.3.",
        _clair),
}
