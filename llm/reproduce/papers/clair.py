r"""CLAIR (2025): contaminated clients in a federated LoRA run; detection, specificity and the benign gain.

The claims' texts and numbers are the paper's; how each is read from the runs is stated in its note
(:mod:`..claims` for the rules every claim follows)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..analysis import (Claim, Experiment, Results, Run, _decide, _diff, _ms, _not_run, _per_seed, _read, _seeds,
                        _vs)
from ..verdicts import not_run, paired, proportion


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
        shared = (f"{name}: detection helps the shared model: CLAIR's global model (the kept clients' average) above "
                  "the same average of everyone, both with the refinement (γ > 0)",
                  "robust aggregation (ours: the shared model isolated)")
        texts = (detect, clean, gain, specific, beyond, shared)
        claims += _read(results, stems, texts, partial(_task, task, key, label, texts))
    return claims


def _task(task: str, key: str, label: str, texts: tuple[tuple[str, str], ...], *runs: dict[int, Run]) -> list[Claim]:
    """The six claims of one task (``copy`` or ``minilm``) from its runs at γ = 0, 0.1, 0.2, 0.3 (in that order)."""
    detect, clean, gain, specific, beyond, shared = texts
    stems = tuple(f"{task}_g{tag}" for tag, _ in _GAMMAS)
    taken = dict(zip(stems, runs, strict=True))
    claims = []
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
    score.update(_by_gamma(taken, task, ("clair", "fedit", "oracle", "clair_nodetect",
                                         *(b for b, _ in _CLAIR_BASELINES)), lambda r, m: _benign(r, m, key)))
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
        *gain, f"benign clients' {label}: " + "; ".join(texts) + "; CLAIR minus each, paired by seed: "
        + _vs(gain_comps), gain_comps,
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
            *beyond, f"benign clients' {label}, CLAIR minus each, paired by seed: {_vs(ref_comps)}", ref_comps,
            "CLAIR minus its refinement without detection (clair_nodetect) per seed, at each γ > 0; CLAIR minus "
            "FedIT mixes detection with personalisation",
            {f"CLAIR - no detection, γ {g}": _diff(score[("clair", g)], score[("clair_nodetect", g)])
             for _, g in _GAMMAS[1:]}, configs=stems))
    claims.append(_shared(task, key, label, shared, taken, stems))
    return claims


def _by_gamma(taken: dict[str, dict[int, Run]], task: str, methods: tuple[str, ...],
              read: Callable[[Run, str], float]) -> dict[tuple[str, float], list[float] | None]:
    """``{(method, γ): [read(run, method) per seed]}`` over the task's runs at every γ; None for a method that is
    not in every seed's runs at that γ."""
    out = {}
    for tag, gamma in _GAMMAS:
        runs = taken[f"{task}_g{tag}"]
        for m in methods:
            have = all(m in runs[s].history for s in _seeds(runs))
            out[(m, gamma)] = _per_seed(runs, lambda r, m=m: read(r, m)) if have else None
    return out


def _shared(task: str, key: str, label: str, text: tuple[str, str], taken: dict[str, dict[int, Run]],
            stems: tuple[str, ...]) -> Claim:
    r"""CLAIR's global model against ``clair_nodetect``'s, on the test set, paired by seed at each γ > 0.

    Both are the same rule, the best rank-``R`` (``R`` the largest client rank) approximation of the exact
    average ``sum_{k in G} p_k B_k A_k``, CLAIR's over the clients it keeps and ``clair_nodetect``'s over
    everyone. Neither global model has a personal part (the benign-gain claim scores CLAIR's refined downloads),
    but both runs refine: each round's clients train from their refined downloads, so the difference is what
    leaving the flagged clients out does to the shared model of a refining federation, not of plain averaging.
    FlexLoRA (everyone's exact average, not truncated to ``R``) and the oracle (the contaminated clients left out by
    hand) are shown beside.
    """
    glob = _by_gamma(taken, task, ("clair", "clair_nodetect", "flexlora", "oracle"),
                     lambda r, m: r.history[m][-1][key])
    if any(glob[("clair_nodetect", g)] is None for _, g in _GAMMAS[1:]):
        return _not_run(*text, "no 'clair_nodetect' (the same average of everyone) in the runs' methods",
                        configs=stems)
    comps = [paired(_diff(glob[("clair", g)], glob[("clair_nodetect", g)]),
                    against=f"the same average of everyone at γ {g}") for _, g in _GAMMAS[1:]]
    names = (("clair", "CLAIR"), ("clair_nodetect", "everyone"), ("flexlora", "FlexLoRA"), ("oracle", "oracle"))
    parts = [f"γ {g}: " + ", ".join(f"{title} {_ms(glob[(m, g)])}" for m, title in names if glob[(m, g)] is not None)
             for _, g in _GAMMAS]
    return _decide(
        *text, f"global model's test {label}: " + "; ".join(parts) + f"; CLAIR minus each, paired by seed: "
        f"{_vs(comps)}", comps,
        "CLAIR's global model minus clair_nodetect's (the same rank-R average over everyone) on the test set per "
        "seed, at each γ > 0, each required; FlexLoRA (everyone's exact average) and the oracle beside",
        {f"CLAIR - everyone (global), γ {g}": _diff(glob[("clair", g)], glob[("clair_nodetect", g)])
         for _, g in _GAMMAS[1:]}, configs=stems)


EXPERIMENT = Experiment(
    "clair", "CLAIR: contaminated clients in a federated LoRA run",
    "CLAIR (2025): a small Transformer on a text-copying task; our MiniLM run as a second setting",
    tuple(f"{t}_g{g}" for t in ("copy", "minilm") for g, _ in _GAMMAS),
    "the copy task is ours (a 1-layer Llama pretrained to copy, LoRA on o_proj, contaminated clients learn "
    "another substitution; {copy_g01.rounds} rounds of {copy_g01.local_steps} local steps); MiniLM / BBC News "
    "with other_task contamination ({minilm_g01.rounds} rounds of {minilm_g01.local_steps} local steps); "
    "{copy_g01.clients} clients, γ = 0, 0.1, 0.2, 0.3.",
    _clair)
