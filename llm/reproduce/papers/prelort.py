r"""PreLort (2025): prefix-nested LoRA against heterogeneous-rank baselines; its six claims.

The claims' texts and numbers are the paper's; how each is read from the runs is stated in its note
(:mod:`..claims` for the rules every claim follows)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ...methods.options import HetLoRAOptions
from ..analysis import (Claim, Experiment, Results, Run, _against, _decide, _diff, _final, _last, _ms, _near_chance,
                        _correct, _not_run, _perfect, _per_seed, _read, _ses, _titles, _vs)
from ..verdicts import paired


_PRELORT_BASELINES = ("fedit", "hetlora", "replication", "flora", "flexlora")
#: "lower than or equal": PreLort's perplexity at most 1% above a baseline's (ln 1.01 on the log ratio).
PRELORT_PPL_TOL = math.log(1.01)


def _by_rank(run: Run, method: str, metric: str) -> dict[int, float]:
    """Each client rank's download, last evaluated round: rank -> score on the test set."""
    return {int(r): float(v[metric]) for r, v in _last(run, method)["by_rank"].items()}


def _download_correct(run: Run, method: str, rank: int | str):
    """The rank-``rank`` download's per-example correctness on the test set (None if not recorded)."""
    return _correct(run, _last(run, method)["by_rank"].get(str(rank), {}).get("test_correct"))


def _lowest(run: Run) -> int:
    """The smallest client rank of the run (``setup.json``'s resolved per-client ranks)."""
    return min(run.setup["ranks"])


def _low_clients(run: Run, method: str) -> list[int]:
    """The rank each client set up at the smallest rank holds at ``method``'s last evaluation: that rank, or a lower
    one where HetLoRA's self-pruning took it there (its download is then that rank's)."""
    start = run.setup["ranks"]
    now = _last(run, method).get("ranks") or start
    low = _lowest(run)
    return [now[k] for k, r in enumerate(start) if r == low]


def _low_score(run: Run, method: str, metric: str = "accuracy") -> float:
    """What the clients set up at the smallest rank receive: the mean over them of their download's test accuracy
    (``metric``: or its test loss)."""
    scores = _by_rank(run, method, metric)
    return float(np.mean([scores[r] for r in _low_clients(run, method)]))


def _low_correct(run: Run, method: str):
    """Per test example, the mean over the smallest rank's clients of their download's correctness (or None)."""
    each = [_download_correct(run, method, r) for r in _low_clients(run, method)]
    return None if any(c is None for c in each) else np.mean(each, axis=0)


def _gamma(runs: dict[int, Run]) -> float:
    """HetLoRA's pruning ratio in these runs (their ``config.json``, else the option's default)."""
    config = next(iter(runs.values())).config or {}
    return float((config.get("hetlora") or {}).get("gamma", HetLoRAOptions.model_fields["gamma"].default))


def _pruned(runs: dict[int, Run], method: str) -> str:
    """Per seed, how many of the smallest rank's clients ``method`` holds at a lower rank (HetLoRA's pruning)."""
    out = []
    for s, run in sorted(runs.items()):
        held = _low_clients(run, method)
        if k := sum(r < _lowest(run) for r in held):
            out.append(f"seed {s}: {k} of {len(held)} clients")
    return "; ".join(out)


def _nested(runs: dict[int, Run], metric: str, lower_is_better: bool) -> tuple[list[dict], dict[str, list], list[int]]:
    """PreLort against replication at each client rank (its download), paired per seed; accuracies with their
    per-example standard errors where the runs recorded them (the interval's floor, :func:`~..verdicts.paired`)
    and a perfect winner's comparison (the ceiling rule). Returns the comparisons, the per-seed values and the
    ranks."""
    ranks = sorted(_by_rank(next(iter(runs.values())), "prelort", metric))
    comps, values = [], {}
    for r in ranks:
        p = _per_seed(runs, lambda run, r=r: _by_rank(run, "prelort", metric)[r])
        q = _per_seed(runs, lambda run, r=r: _by_rank(run, "replication", metric)[r])
        if metric == "perplexity":  # on the log ratio: perplexities of different seeds differ by factors
            d, se = _diff(np.log(q).tolist(), np.log(p).tolist()), None
        elif lower_is_better:  # a loss: replication's minus PreLort's
            d, se = _diff(q, p), None
        else:
            d, se = _diff(p, q), _ses(runs, lambda run, m, r=r: _download_correct(run, m, r), "prelort",
                                      "replication")
        best = None if lower_is_better else _perfect(q, runs, lambda run, r=r: _download_correct(run, "replication", r))
        comps.append(paired(d, against=f"replication at rank {r}", se=se, perfect=best))
        values[f"PreLort, rank {r}"], values[f"replication, rank {r}"] = p, q
    return comps, values, ranks


def _prefix_shares(runs: dict[int, Run], ranks: list[int]) -> str:
    """Per round, PreLort's and replication's ``prefix_share`` at each truncated level ``t`` (``metrics.jsonl``: the
    share of a client's round update carried by its first ``t`` slots, the round's mean over the clients above rank
    ``t``), then the mean over seeds: whether nested training put more of the update into the prefixes, the room it
    had to act (docs/methods.md#prelort). Empty where the runs did not record it (runs before the key existed)."""
    levels = [str(r) for r in ranks[:-1]]
    # per method, each seed's rounds that recorded a share: round -> {level: share or None}
    recorded = {m: [{h["round"]: h["prefix_share"] for h in run.history[m] if h.get("prefix_share")}
                    for run in runs.values()] for m in _NESTING}
    rounds = sorted(set.intersection(*(set(seed) for seeds in recorded.values() for seed in seeds)))
    if not levels or not rounds:
        return ""

    def mean(method: str, round_: int, t: str) -> str:
        values = [v for seed in recorded[method] if (v := seed[round_].get(t)) is not None]
        return f"{np.mean(values):.2f}" if values else "-"

    per_method = "; ".join(f"{title} " + ", ".join(" / ".join(mean(m, r, t) for t in levels) for r in rounds)
                           for m, title in zip(_NESTING, ("PreLort", "replication"), strict=True))
    return (f". Share of each round's update in the first {' / '.join(levels)} slots (`prefix_share`, mean over "
            f"the clients above that rank, then over seeds; an update spread evenly over a rank-r client's slots "
            f"gives t / r), rounds {', '.join(map(str, rounds))}: {per_method}")


def _truncation_loss(runs: dict[int, Run], method: str, received) -> float:
    """The mean over seeds of ``method``'s global accuracy minus ``received(run, method)``, what its clients receive:
    what they lose against the global model, the room nesting has to act in."""
    return float(np.mean(_per_seed(runs, lambda run: _last(run, method)["accuracy"] - received(run, method))))


#: The nesting claim, isolated: PreLort against the same segment-wise rule without nested training, decided on
#: the truncated downloads, what nesting is for; the full rank (every slot, which sampled truncations train less
#: often) is reported beside it, not decided on (a fairness review before the 50-step reruns).
_NESTED_CLAIM = ("{model}: prefix-nested training {verb} every truncated download (each client rank below the "
                 "largest) {what} (the same segment-wise rule without it)")
_NESTED_PAPER = "nested training makes every prefix a good model (ours: the claim isolated)"

_PRELORT_CLAIMS = (
    ("minilm_bbc", "MiniLM / BBC News: PreLort's global accuracy above every baseline", "higher accuracy"),
    ("minilm_bbc", "Low-rank clients gain from high-rank ones: PreLort's rank-4 download above each baseline's",
     "higher accuracy at low ranks (ours: the paper's motivation, not a number it states)"),
    ("minilm_bbc", _NESTED_CLAIM.format(model="MiniLM", verb="lifts", what="above replication's"), _NESTED_PAPER),
    ("smollm2_headlines", "SmolLM2 / BBC headlines: PreLort's ROUGE-L above every baseline", "higher ROUGE-L"),
    ("smollm2_headlines", "SmolLM2: PreLort's perplexity lower than or equal to the baselines'",
     "lower or equal perplexity"),
    ("smollm2_headlines", _NESTED_CLAIM.format(model="SmolLM2", verb="gives",
                                               what="a lower perplexity than replication's"),
     _NESTED_PAPER),
)


def _prelort(results: Results) -> list[Claim]:
    out = []
    for stem, analyse in (("minilm_bbc", _prelort_minilm), ("smollm2_headlines", _prelort_smollm2)):
        # each half of the experiment is read alone
        out += _read(results, (stem,), _texts(stem), analyse)
    return out


def _texts(stem: str) -> list[tuple[str, str]]:
    return [(claim, paper) for s, claim, paper in _PRELORT_CLAIMS if s == stem]


def _losses(cls: dict[int, Run], loss: Callable[[Run, str], float]) -> str:
    """Each baseline's test loss minus PreLort's, paired per seed (``loss(run, method)``): shown beside an accuracy
    claim, never deciding (a loss does not saturate where accuracy does; fixed before the 50-step reruns)."""
    values = {m: _per_seed(cls, lambda run, m=m: loss(run, m)) for m in _ALL}
    comps = _against(values, "prelort", _PRELORT_BASELINES, _titles(next(iter(cls.values()))), lower_is_better=True)
    return ". Test loss (cross-entropy), each baseline's minus PreLort's, shown and not decided on: " + _vs(comps)


#: The methods each claim compares: all six, or (nesting isolated) PreLort and replication alone.
_ALL, _NESTING = (*_PRELORT_BASELINES, "prelort"), ("prelort", "replication")


def _each(runs: dict[int, Run], stem: str, builders) -> list[Claim]:
    """Each claim of ``stem`` from its ``(methods, build)``, or "not run yet" where a run lacks one of its
    methods: a config may run only some (a constant twin given the two methods the nesting claim compares)."""
    out = []
    for (claim, paper), (methods, build) in zip(_texts(stem), builders, strict=True):
        missing = [m for m in methods if any(m not in run.summary for run in runs.values())]
        out.append(_not_run(claim, paper, f"no runs of {', '.join(missing)}", configs=(stem,))
                   if missing else build(runs))
    return out


def _prelort_minilm(cls: dict[int, Run]) -> list[Claim]:
    return _each(cls, "minilm_bbc", ((_ALL, _minilm_global), (_ALL, _minilm_low), (_NESTING, _minilm_nested)))


def _prelort_smollm2(gen: dict[int, Run]) -> list[Claim]:
    return _each(gen, "smollm2_headlines", ((_ALL, _smollm2_rouge), (_ALL, _smollm2_perplexity),
                                            (_NESTING, _smollm2_nested)))


def _minilm_global(cls: dict[int, Run]) -> Claim:
    titles = _titles(next(iter(cls.values())))
    acc = {m: _per_seed(cls, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    comps = _against(acc, "prelort", _PRELORT_BASELINES, titles, by_seed=cls, best=1.0)
    top = max(_by_rank(next(iter(cls.values())), "prelort", "accuracy"))
    flex_top = _per_seed(cls, lambda run: _by_rank(run, "flexlora", "accuracy")[top])
    return _decide(
        *_texts("minilm_bbc")[0],
        f"PreLort {_ms(acc['prelort'])}; " + ", ".join(f"{titles[b]} {_ms(acc[b])}" for b in _PRELORT_BASELINES)
        + f"; PreLort minus {_vs(comps)}",
        comps, "PreLort minus each of FedIT, HetLoRA, replication, FLoRA, FlexLoRA per seed; holds only against each. "
        "FlexLoRA's global model is the exact aggregate, which no client holds; its rank-"
        f"{top} download, what its rank-{top} clients receive: {_ms(flex_top)}"
        + _losses(cls, lambda run, m: _last(run, m)["loss"]),
        acc, untestable=_near_chance(cls, (*_PRELORT_BASELINES, "prelort")), configs=("minilm_bbc",))


def _minilm_low(cls: dict[int, Run]) -> Claim:
    titles = _titles(next(iter(cls.values())))
    # what the smallest configured rank's clients receive under each method: a prefix (FedIT, HetLoRA,
    # replication, PreLort), the best rank-r cut of the exact aggregate (FlexLoRA), the whole merge (FLoRA)
    lows = {m: _per_seed(cls, lambda r, m=m: _low_score(r, m)) for m in (*_PRELORT_BASELINES, "prelort")}
    low = _lowest(next(iter(cls.values())))
    comps = [paired(_diff(lows["prelort"], lows[b]), against=titles[b], se=_ses(cls, _low_correct, "prelort", b),
                    perfect=_perfect(lows[b], cls, lambda run, b=b: _low_correct(run, b)))
             for b in _PRELORT_BASELINES]
    pruned = _pruned(cls, "hetlora")
    return _decide(
        *_texts("minilm_bbc")[1],
        f"rank-{low} download: PreLort {_ms(lows['prelort'])}, "
        + ", ".join(f"{titles[b]} {_ms(lows[b])}" for b in _PRELORT_BASELINES) + f"; PreLort minus {_vs(comps)}",
        comps, f"what a rank-{low} client receives: a prefix of the global adapter (FedIT, HetLoRA, replication, "
        f"PreLort), FlexLoRA's best rank-{low} cut, FLoRA's whole merge; holds only against each. Global minus "
        f"rank-{low} download: " + ", ".join(f"{titles[m]} {_truncation_loss(cls, m, _low_score):+.3f}"
                                             for m in (*_PRELORT_BASELINES, "prelort"))
        + (f". HetLoRA's self-pruning took rank-{low} clients lower ({pruned}): each is read at the rank it holds, "
           f"the download it receives (its rule, r -> floor({_gamma(cls)} r), takes a slot a round at these "
           "ranks whenever the tail shrank)" if pruned else "")
        + _losses(cls, lambda run, m: _low_score(run, m, "loss")),
        lows, configs=("minilm_bbc",))


def _full_rank(comps: list[dict], ranks: list[int]) -> str:
    """The largest rank's comparison, reported beside the nesting claim and not decided on."""
    c = comps[-1]
    return (f"the full rank {ranks[-1]} (every slot; not decided on): {c['mean']:+.3f} "
            + ("" if c["low"] is None else f"[{c['low']:+.3f}, {c['high']:+.3f}] ") + f"({c['verdict']})")


def _truncated(comps: list[dict], ranks: list[int]) -> tuple[list[dict], dict]:
    """The nesting claim's deciding comparisons (the ranks below the largest) and, with one client rank (no
    truncated download), the reason it is not testable as ``_decide``'s keywords."""
    if len(ranks) > 1:
        return comps[:-1], {}
    return comps, {"untestable": "one client rank: no truncated download to compare", "short": "one client rank"}


def _minilm_nested(cls: dict[int, Run]) -> Claim:
    comps, values, ranks = _nested(cls, "accuracy", lower_is_better=False)
    # the test loss, which does not saturate where accuracy does: shown, never deciding (fixed before the 50-step
    # reruns, whose tune trials had every method at 0.97-0.99 validation accuracy)
    losses, _, _ = _nested(cls, "loss", lower_is_better=True)
    deciding, why = _truncated(comps, ranks)
    return _decide(
        *_texts("minilm_bbc")[2],
        f"PreLort minus replication, each truncated download on the test set: {_vs(deciding)}; "
        + _full_rank(comps, ranks), deciding,
        "holds only if it holds at every client rank below the largest. Replication's global minus its download, "
        "ranks " + " / ".join(str(r) for r in ranks) + ": "
        + " / ".join(f"{_truncation_loss(cls, 'replication', lambda run, m, r=r: _by_rank(run, m, 'accuracy')[r]):+.3f}"
                     for r in ranks)
        + ". Test loss (cross-entropy), replication's minus PreLort's, shown and not decided on: " + _vs(losses)
        + _prefix_shares(cls, ranks), values, configs=("minilm_bbc",), **why)


def _smollm2_rouge(gen: dict[int, Run]) -> Claim:
    titles = _titles(next(iter(gen.values())))
    rouge = {m: _per_seed(gen, _final(m, "rouge_l")) for m in (*_PRELORT_BASELINES, "prelort")}
    comps = _against(rouge, "prelort", _PRELORT_BASELINES, titles)
    return _decide(
        *_texts("smollm2_headlines")[0],
        f"PreLort {_ms(rouge['prelort'])}; " + ", ".join(f"{titles[b]} {_ms(rouge[b])}" for b in _PRELORT_BASELINES)
        + f"; PreLort minus {_vs(comps)}",
        comps, "global model, greedy headlines", rouge, configs=("smollm2_headlines",))


def _smollm2_perplexity(gen: dict[int, Run]) -> Claim:
    titles = _titles(next(iter(gen.values())))
    ppl = {m: _per_seed(gen, _final(m)) for m in (*_PRELORT_BASELINES, "prelort")}
    logs = {m: np.log(v).tolist() for m, v in ppl.items()}
    comps = _against(logs, "prelort", _PRELORT_BASELINES, titles, tol=-PRELORT_PPL_TOL, lower_is_better=True)
    return _decide(
        *_texts("smollm2_headlines")[1],
        f"PreLort {_ms(ppl['prelort'], 2)}; " + ", ".join(f"{titles[b]} {_ms(ppl[b], 2)}" for b in _PRELORT_BASELINES)
        + f"; ln(baseline / PreLort) {_vs(comps)}",
        comps, "per baseline ln(its perplexity / PreLort's); holds if the interval lies above -ln 1.01 (equal "
        "within 1%)", ppl, configs=("smollm2_headlines",))


def _smollm2_nested(gen: dict[int, Run]) -> Claim:
    comps, values, ranks = _nested(gen, "perplexity", lower_is_better=True)
    deciding, why = _truncated(comps, ranks)
    return _decide(
        *_texts("smollm2_headlines")[2],
        f"ln(replication / PreLort), each truncated download: {_vs(deciding)}; " + _full_rank(comps, ranks),
        deciding, "holds only if it holds at every client rank below the largest" + _prefix_shares(gen, ranks),
        values, configs=("smollm2_headlines",), **why)


EXPERIMENT = Experiment(
    "prelort", "PreLort: prefix-nested LoRA against heterogeneous-rank baselines",
    "PreLort (2025): accuracy, ROUGE-L and perplexity across base models",
    ("minilm_bbc", "smollm2_headlines", "minilm_bbc_constant", "smollm2_headlines_constant"),
    "PreLort as `nested = \"sample\"` (each local step trains one sampled prefix; our reconstruction). "
    "MiniLM on BBC News (the main job's clients and ranks, {minilm_bbc.rounds} rounds of "
    "{minilm_bbc.local_steps} local steps, lr {minilm_bbc.lr}) and SmolLM2-135M on BBC headlines "
    "({smollm2_headlines.rounds} rounds of {smollm2_headlines.local_steps} local steps, "
    "{smollm2_headlines.eval_size} test examples, {smollm2_headlines.rouge_size} for ROUGE-L): far smaller than "
    "the paper's models and budgets; prefix-nested training needs many local steps to act "
    "(docs/methods.md#prelort).",
    _prelort, tuned=())  # tuned only through a config's `tuned` key (minilm_bbc since 2026-12-07)
