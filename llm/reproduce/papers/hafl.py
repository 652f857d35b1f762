r"""HAFL (2025): importance-based freezing and rank-1 aggregation; its drop, speed and bytes claims.

The claims' texts and numbers are the paper's; how each is read from the runs is stated in its note
(:mod:`..claims` for the rules every claim follows)."""

from __future__ import annotations

from functools import partial

import numpy as np

from ..analysis import (Claim, Experiment, Results, Run, _decide, _diff, _final, _last, _ms, _per_seed, _read,
                        _seeds, _vs)
from ..verdicts import exact, paired, sign_count


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


_CLAIMS = (("Freezing: no accuracy drop at distribution (truncation has one)", "no drop with freezing"),
           ("Adaptive rank-1 aggregation converges faster than zero-padding", "faster (rounds to a target accuracy)"),
           ("HAFL (freezing) moves fewer bytes than truncation-based schemes (HAFL's truncation variant, HetLoRA)",
            "lower communication than truncation-based HetLoRA-style schemes"),
           ("HAFL (freezing) moves fewer bytes than the homogeneous rank-R federation it replaces (FedIT, every "
            "client at rank R)", "lower communication (ours: against the federation freezing replaces)"),
           ("Adaptive rank-1 aggregation converges faster than zero-padding at the same slots (HAFL's clients "
            "unchanged)", "faster (ours: the rule isolated)"),
           ("Adaptive rank-1 aggregation converges faster than the FedAvg of the clients' held adapters (HAFL's "
            "clients unchanged)", "faster (ours: the rule isolated, zero-padding read as FedAvg)"))

# the two server rules the adaptive one is raced against with HAFL's clients unchanged: config, claim, label, what a
# client that did not train slot i counts as there
_RULES = {"freezing_zeropad": (_CLAIMS[4], "zero-padding at the slots", "zero"),
          "freezing_heldmean": (_CLAIMS[5], "the held adapters' FedAvg", "the previous global value it holds")}


def _hafl(results: Results) -> list[Claim]:
    return [*_read(results, ("freezing", "truncation"), [_CLAIMS[0]], _drop),
            *_read(results, ("freezing",), [_CLAIMS[1]], _speed),
            *(claim for stem, (text, _, _) in _RULES.items()
              for claim in _read(results, ("freezing", stem), [text], partial(_speed_rule, stem=stem))),
            *_read(results, ("freezing", "truncation"), [_CLAIMS[2]], _bytes),
            *_read(results, ("freezing", "homogeneous"), [_CLAIMS[3]], _bytes_homogeneous)]


def _drop(frz: dict[int, Run], trn: dict[int, Run]) -> list[Claim]:
    drops = {name: _per_seed(runs, lambda r: _client_drop(r, "hafl"))
             for name, runs in (("frz", frz), ("trn", trn))}
    where = ("own held-out data" if all("per_client_global" in _last(r, "hafl") for r in (*frz.values(),
                                                                                             *trn.values()))
             else "test set, global minus the download of the client's rank")
    local_frz, local_trn = _per_seed(frz, _final("hafl", "local")), _per_seed(trn, _final("hafl", "local"))
    comps = [paired(_diff(local_frz, local_trn), against="truncation (clients' accuracy on what they receive)")]
    per_client_trn = "; ".join(f"seed {s}: " + ", ".join(f"{d:+.3f}" for d in _client_drops(trn[s], "hafl"))
                               for s in _seeds(trn))
    return [_decide(
        *_CLAIMS[0],
        f"clients' accuracy on their own held-out data under what they receive: freezing {_ms(local_frz)}, "
        f"truncation {_ms(local_trn)}; freezing minus truncation {_vs(comps)}; signed drop (global minus "
        f"download, mean over clients, {where}): freezing {_ms(drops['frz'])}, truncation {_ms(drops['trn'])} "
        f"(truncation per client, {per_client_trn})",
        comps, "the verdict compares what the clients receive: freezing minus truncation, mean over clients of "
        "each one's accuracy on its own held-out data under its download, same seed; the drop is signed (a "
        "download may beat the global model)",
        {"drop, freezing": drops["frz"], "drop, truncation": drops["trn"], "local, freezing": local_frz,
         "local, truncation": local_trn}, configs=("freezing", "truncation"))]


def _race(first: dict[int, Run], m1: str, second: dict[int, Run], m2: str) -> tuple[list, list, list, int]:
    """Per seed, rounds to 90% of the lower of the two best validation accuracies: ``m1`` in ``first``'s run,
    ``m2`` in ``second``'s (the same run or a paired one of the same seed); the targets; the cap (never)."""
    r1, r2, targets = [], [], []
    for s in _seeds(first):
        h1, h2 = first[s].history[m1], second[s].history[m2]
        target = 0.9 * min(max(h.get("val_accuracy", 0.0) for h in h1), max(h.get("val_accuracy", 0.0) for h in h2))
        targets.append(target)
        r1.append(_rounds_to(h1, target))
        r2.append(_rounds_to(h2, target))
    return r1, r2, targets, int(max(h["round"] for h in first[_seeds(first)[0]].history[m1])) + 1


def _speed(frz: dict[int, Run]) -> list[Claim]:
    r_hafl, r_zp, targets, cap = _race(frz, "hafl", frz, "fedit")
    comps = [sign_count(_diff(r_zp, r_hafl), against="zero-padding (FedIT)")]
    return [_decide(
        *_CLAIMS[1],
        f"rounds to 90% of the lower of the two best validation accuracies (integers, {cap} = never): HAFL "
        f"{', '.join(f'{r:g}' for r in r_hafl)}, zero-padding (FedIT) {', '.join(f'{r:g}' for r in r_zp)}; "
        f"FedIT minus HAFL {_vs(comps)}",
        comps, f"validation accuracy every round; an integer capped at the last round + 1 ({cap}), so a sign "
        "count over seeds (ties dropped), not a t interval; HAFL and FedIT differ on the clients too (importance "
        "selection and freezing against prefix slots)",
        {"rounds, HAFL": r_hafl, "rounds, zero-padding": r_zp, "target": targets}, configs=("freezing",))]


def _speed_rule(frz: dict[int, Run], other: dict[int, Run], stem: str) -> list[Claim]:
    r"""The rule alone: HAFL with its adaptive average against HAFL with another server rule at the same slots
    (config ``stem``: zero-padding, or the FedAvg of the held adapters; :data:`_RULES`).

    The runs of a seed share the split, the partition and the batches; the server rule differs, and with it the
    rate each config's tune chose, so the selections part after round 1. Decided as the whole-method claim: a sign
    count of the rounds to a target.
    """
    text, label, absent = _RULES[stem]
    r_hafl, r_other, targets, cap = _race(frz, "hafl", other, "hafl")
    comps = [sign_count(_diff(r_other, r_hafl), against=f"{label} (HAFL's clients)")]
    final = {name: _per_seed(runs, _final("hafl")) for name, runs in (("adaptive", frz), ("other", other))}
    return [_decide(
        *text,
        f"rounds to 90% of the lower of the two best validation accuracies (integers, {cap} = never): adaptive "
        f"{', '.join(f'{r:g}' for r in r_hafl)}, {label} {', '.join(f'{r:g}' for r in r_other)}; "
        f"{label} minus adaptive {_vs(comps)}; final test accuracy: adaptive {_ms(final['adaptive'])}, "
        f"{label} {_ms(final['other'])}",
        comps, f"HAFL in both (freezing, the clients' importance scores); the server averages slot i over the "
        f"clients that trained it, or over every client, one that did not counting as {absent} there; validation "
        f"accuracy every round, capped at {cap}, a sign count over seeds (ties dropped)",
        {"rounds, adaptive": r_hafl, f"rounds, {label}": r_other, "target": targets,
         "final, adaptive": final["adaptive"], f"final, {label}": final["other"]},
        configs=("freezing", stem))]


def _saved(mb: dict, ours: str, other: str, title: str) -> tuple[dict, str]:
    """The deciding comparison, MB up + down saved by ``ours`` against ``other`` (exact per seed), and the text of
    the two directions apart."""
    total = {who: [u + d for u, d in zip(mb[(who, "up")], mb[(who, "down")], strict=True)] for who in (ours, other)}
    comp = exact(_diff(total[other], total[ours]), against=f"{title}, MB up + down saved")
    ways = "; ".join(f"{way} " + ", ".join(f"{v:+.1f}" for v in _diff(mb[(other, way)], mb[(ours, way)]))
                     for way in ("up", "down"))
    return comp, f"{title}: {ways}"


def _mb_text(mb: dict, who: str) -> str:
    return " / ".join(", ".join(f"{v:.1f}" for v in mb[(who, way)]) for way in ("up", "down"))


_BYTES_NOTE = ("bytes are counted, not sampled: exact per seed, no interval; the total (up + down) decides, up and "
               "down are reported apart")


def _bytes(frz: dict[int, Run], trn: dict[int, Run]) -> list[Claim]:
    mb = {(who, way): _per_seed(runs, _final(m, f"mb_{way}"))
          for who, runs, m in (("hafl", frz, "hafl"), ("truncation", trn, "hafl"), ("hetlora", frz, "hetlora"))
          for way in ("up", "down")}
    saved = [_saved(mb, "hafl", other, title) for other, title in (("truncation", "HAFL truncation"),
                                                                     ("hetlora", "HetLoRA"))]
    comps = [c for c, _ in saved]
    return [_decide(
        *_CLAIMS[2],
        f"MB over the run per seed, up / down (exact): HAFL freezing {_mb_text(mb, 'hafl')}; HAFL truncation "
        f"{_mb_text(mb, 'truncation')}; HetLoRA {_mb_text(mb, 'hetlora')}; saved by freezing "
        f"{_vs(comps, 1)} (by direction, {'; '.join(t for _, t in saved)})",
        comps, _BYTES_NOTE + "; freezing downloads all R slots and uploads each client's r_k",
        {f"MB {way}, {who}": mb[(who, way)] for who in ("hafl", "truncation", "hetlora") for way in ("up", "down")},
        configs=("freezing", "truncation"), trained=False)]


def _bytes_homogeneous(frz: dict[int, Run], hom: dict[int, Run]) -> list[Claim]:
    r"""Freezing's bytes against FedIT with every client at the global rank ``R`` (exact; total decides).

    Freezing trains each client's ``r_k`` top slots of the rank-``R`` adapter and sends them, and every client
    downloads all ``R`` slots (with their slot indices): against the federation it replaces, where every client
    trains and sends rank ``R``, it saves ``sum_k (R - r_k)`` slots of upload a round and downloads the same ``R``
    slots plus the indices.
    """
    mb = {(who, way): _per_seed(runs, _final(m, f"mb_{way}"))
          for who, runs, m in (("hafl", frz, "hafl"), ("homogeneous", hom, "fedit")) for way in ("up", "down")}
    comp, ways = _saved(mb, "hafl", "homogeneous", "homogeneous FedIT at rank R")
    return [_decide(
        *_CLAIMS[3],
        f"MB over the run per seed, up / down (exact): HAFL freezing {_mb_text(mb, 'hafl')}; homogeneous FedIT at "
        f"rank R {_mb_text(mb, 'homogeneous')}; saved by freezing {_vs([comp], 1)} (by direction, {ways})",
        [comp], _BYTES_NOTE + "; freezing uploads each client's r_k slots of the rank-R adapter, the homogeneous "
        "federation R, and both download R",
        {f"MB {way}, {who}": mb[(who, way)] for who in ("hafl", "homogeneous") for way in ("up", "down")},
        configs=("freezing", "homogeneous"), trained=False)]


EXPERIMENT = Experiment(
    "hafl", "HAFL: importance-based freezing and rank-1 aggregation",
    "HAFL (2025, abstract): 20 Newsgroups; details are our reconstruction",
    ("freezing", "truncation", "homogeneous", "freezing_constant", "truncation_constant", "freezing_zeropad",
     "freezing_heldmean"),
    "MiniLM, {freezing.clients} clients at ranks {freezing.ranks}, Dirichlet {freezing.alpha}, "
    "{freezing.rounds} rounds of {freezing.local_steps} local steps, {freezing.train_size} training examples, "
    "each method's learning rate tuned for its setting where the config links a tuned file; the bytes are compared "
    "with truncation (HAFL's truncation variant and HetLoRA) and with FedIT with every client at rank R = 32 (the "
    "federation freezing replaces); the paper's sizes are not given in its abstract.",
    _hafl, tuned=())  # an unlinked config runs at lr 5e-3, an early lora-a2 choice, never HAFL's setting's
