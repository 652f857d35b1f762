r"""Byun & Lee (2024): zero-padding against replication for a high-rank client; its three claims.

The claims' texts and numbers are the paper's; how each is read from the runs is stated in its note
(:mod:`..claims` for the rules every claim follows)."""

from __future__ import annotations

import numpy as np

from ..analysis import (Claim, Experiment, Results, Run, _against, _decide, _diff, _final, _ms, _near_chance,
                        _per_seed, _read, _seeds, _vs)
from ..chance import MIN_LEARNT_SEEDS, learnt_seeds
from ..verdicts import paired


def _top_client(run: Run) -> int:
    ranks = run.setup["ranks"]
    return int(np.argmax(ranks))


_BYUN_LEE_CLAIMS = (("Zero-padding: the rank-20 client's accuracy falls after one aggregation", "84.3% -> 39.0%"),
                    ("Replication keeps it (smaller drop than zero-padding)", "84.3% -> 82.1%"),
                    ("Replication's global model is at least as good as zero-padding's",
                     "implied (replication is proposed as the fix)"))


#: :func:`_unlearnt`'s reason in a few words (the report's verdict cell).
_UNLEARNT = f"the rank-20 client had not learnt before aggregation in {MIN_LEARNT_SEEDS} seeds"


def _unlearnt(runs: dict[int, Run], before_test: dict[str, list[float]]) -> str:
    r"""Why the drop claims are not testable here, or ``""``.

    A drop at aggregation needs a model that had something to lose: the rank-20 client's own model before round
    1's aggregation must be above always answering the test set's majority class by more than 2 standard errors,
    ``acc - p > 2 sqrt(p (1 - p) / N)`` (:func:`..chance.learnt_seeds`),
    for every method compared, in at least :data:`~..chance.MIN_LEARNT_SEEDS` seeds.
    """
    seeds = _seeds(runs)
    learnt = learnt_seeds(runs, before_test)
    if learnt is None or len(learnt) >= MIN_LEARNT_SEEDS:
        return ""
    who = " and ".join("zero-padding's" if m == "fedit" else f"{m}'s" for m in before_test)
    return (f"{who} rank-20 client had learnt before aggregation (its own model more than 2 standard errors above "
            f"the test set's majority share) in {len(learnt)} of {len(seeds)} seeds"
            + (f" (seed {', '.join(map(str, learnt))})" if learnt else "")
            + f": a drop needs a model with something to lose, in at least {MIN_LEARNT_SEEDS} seeds")


def _byun_lee(results: Results) -> list[Claim]:
    return _read(results, ("top10_bbc",), _BYUN_LEE_CLAIMS, _top10)


def _top10(runs: dict[int, Run]) -> list[Claim]:
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
                 "after (test)": zp["after_test"]}, untestable=_unlearnt(runs, {"fedit": zp["before_test"]}),
                short=_UNLEARNT, configs=("top10_bbc",)),
        _decide("Replication keeps it (smaller drop than zero-padding)",
                "84.3% -> 82.1%",
                f"{_ms(rep['before'])} -> {_ms(rep['after'])} (test set: {_ms(rep['before_test'])} -> "
                f"{_ms(rep['after_test'])}); zero-padding's drop minus replication's {_vs(rep_comp)}",
                rep_comp, "difference: zero-padding's drop minus replication's, same seed",
                {"before": rep["before"], "after": rep["after"], "before (test)": rep["before_test"],
                 "after (test)": rep["after_test"]},
                untestable=_unlearnt(runs, {"fedit": zp["before_test"], "replication": rep["before_test"]}),
                short=_UNLEARNT, configs=("top10_bbc",)),
    ]
    g_zp, g_rep = _per_seed(runs, _final("fedit")), _per_seed(runs, _final("replication"))
    comps = _against({"replication": g_rep, "fedit": g_zp}, "replication", ("fedit",), {"fedit": "zero-padding"},
                     tol=-0.01, by_seed=runs, best=1.0)
    claims.append(_decide(
        "Replication's global model is at least as good as zero-padding's",
        "implied (replication is proposed as the fix)",
        f"replication {_ms(g_rep)} vs zero-padding {_ms(g_zp)}; {_vs(comps)}",
        comps, "global test accuracy (rank 20) after the last round; holds if the interval lies above -0.01 "
        "(a 1-point tolerance)", {"replication": g_rep, "zero-padding": g_zp},
        untestable=_near_chance(runs, ("fedit", "replication")), configs=("top10_bbc",)))
    return claims


EXPERIMENT = Experiment(
    "byun-lee", "Byun & Lee: zero-padding vs replication for a high-rank client",
    "Byun & Lee (2024): top 10% of clients at rank 20, the rest at 5",
    ("top10_bbc",),
    "MiniLM on BBC News, {top10_bbc.clients} clients with {top10_bbc.classes_per_client} topics each; the "
    "rank-20 client is the one with the most data (the paper picks the top 10% by validation accuracy); "
    "{top10_bbc.rounds} rounds of {top10_bbc.local_steps} local steps.",
    _byun_lee)
