"""The reproductions' verdicts (``llm/reproduce/verdicts.py``) and the claims counted as the papers count them:
the paired rule on constructed differences, pairwise against each baseline (simulated), LoRA-A2's whole-model
count, HAFL's per-client drop at distribution, claims whose runs do not exist yet."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods.hafl import HAFL  # noqa: E402
from lowrank_fed.llm.models import count_parameters, tiny_bert  # noqa: E402
from lowrank_fed.llm.reproduce import EXPERIMENTS, reproduce  # noqa: E402
from lowrank_fed.llm.reproduce.claims import Run, model_params  # noqa: E402
from lowrank_fed.llm.reproduce.run import load_run  # noqa: E402
from lowrank_fed.llm.reproduce.verdicts import (  # noqa: E402
    ADD_SEEDS,
    VERDICTS,
    advice,
    combine,
    example_se,
    paired,
    verdict,
)
from lowrank_fed.llm.runner.simulation import Simulation, run_experiment  # noqa: E402

T_975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


# ----------------------------------------------------------------------------- the rule


def test_the_interval_is_students_t_over_seeds_computed_by_hand():
    # Execute
    c = paired([0.10, 0.12, 0.11], against="B")
    # Assert: mean 0.11, sd 0.01, half-width t_{0.975,2} * 0.01 / sqrt(3)
    half = T_975_2DF * 0.01 / math.sqrt(3)
    assert c["mean"] == pytest.approx(0.11) and c["sd"] == pytest.approx(0.01) and c["n"] == 3
    assert c["low"] == pytest.approx(0.11 - half) and c["high"] == pytest.approx(0.11 + half)
    assert c["verdict"] == "holds" and c["against"] == "B" and c["level"] == 0.95


@pytest.mark.parametrize(("differences", "tol", "expected"), [
    ([0.10, 0.12, 0.11], 0.0, "holds"),                    # interval [0.085, 0.135] above 0
    ([0.10, -0.05, 0.02], 0.0, "tie"),                     # covers 0
    ([-0.10, -0.12, -0.11], 0.0, "does not hold"),         # below 0
    ([0.5, 0.6], 0.0, "too few seeds"),                    # 2 seeds: no verdict, however clear
    ([0.3], 0.0, "too few seeds"),
    ([-0.005, -0.004, -0.006], -0.01, "holds"),            # at least as good within 1 point
    ([-0.05, -0.04, -0.06], -0.01, "does not hold"),
    ([0.0, 0.0, 0.0], 0.0, "tie"),                         # exactly equal: a tie, not a win or a loss
    ([0.0018] * 3, 0.0, "holds"),                          # a count: the same every seed, a zero-width interval
])
def test_verdict_on_constructed_differences(differences, tol, expected):
    assert verdict(differences, tol) == expected
    assert paired(differences, tol)["verdict"] == expected


def test_a_tie_on_fewer_than_five_seeds_asks_for_more_seeds():
    three, five = paired([0.10, -0.05, 0.02]), paired([0.10, -0.05, 0.02, 0.04, -0.03])
    assert three["verdict"] == five["verdict"] == "tie"
    assert advice([three]) == ADD_SEEDS == "add seeds (interval straddles zero)"
    assert advice([five]) == ""
    assert advice([paired([0.10, 0.12, 0.11])]) == ""  # holds: nothing to add
    assert advice([three, paired([-0.1, -0.12, -0.11])]) == ""  # does not hold against one: decided


def test_combine_holds_only_against_each_baseline():
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "tie"]) == "tie"
    assert combine(["holds", "tie", "does not hold"]) == "does not hold"
    assert combine(["holds", "too few seeds"]) == "too few seeds"
    assert combine(["holds", "not run yet"]) == "not run yet"
    assert "partly" not in VERDICTS
    with pytest.raises(ValueError, match=r"The 'verdicts' must be a non-empty list of .*got \['partly'\]"):
        combine(["partly"])


def test_non_finite_differences_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"against FedIT must be finite .*got \[0.1, inf\]"):
        paired([0.1, math.inf], against="FedIT")


def test_the_test_sets_noise_floors_the_interval_so_equal_differences_are_not_a_certain_win():
    # Prepare: three seeds each one test example (of 200) apart, and each seed's paired se over its test examples
    d, se = [0.005, 0.005, 0.005], [0.010, 0.012, 0.008]
    floor = math.sqrt(np.mean(np.square(se)))
    # Execute
    bare, floored = paired(d), paired(d, se=se)
    wide = paired([0.10, 0.02, 0.06], se=[0.001] * 3)
    # Assert: without the floor a zero-width interval "holds"; with it, t * rms(se) / sqrt(n) each side: a tie
    assert bare["sd"] == 0 and bare["low"] == bare["high"] == pytest.approx(0.005) and bare["verdict"] == "holds"
    half = T_975_2DF * floor / math.sqrt(3)
    assert floored["low"] == pytest.approx(0.005 - half) and floored["high"] == pytest.approx(0.005 + half)
    assert floored["verdict"] == "tie" and floored["sd_floor"] == pytest.approx(floor) and floored["example_se"] == se
    # a floor below the seeds' own spread changes nothing
    assert (wide["low"], wide["high"]) == pytest.approx((paired([0.10, 0.02, 0.06])["low"],
                                                         paired([0.10, 0.02, 0.06])["high"]))
    with pytest.raises(ValueError, match=r"'se' against FedIT must be one finite value >= 0 per difference \(3\)"):
        paired(d, se=[0.01, -0.01, 0.01], against="FedIT")


def test_a_tie_that_even_a_perfect_winner_would_not_have_won_is_not_testable_on_five_seeds():
    from lowrank_fed.llm.reproduce.claims import _decide

    # Prepare: five seeds that tie (interval +-0.021); a perfect winner against a baseline at 0.99-0.995 (200 test
    # examples, its per-example error std(c_b) / sqrt 200) ties too, one against a baseline at 0.95-0.96 holds
    d = [0.02, -0.01, 0.015, -0.02, 0.005]
    high_b, low_b = [0.995, 0.99, 0.995, 0.99, 0.995], [0.95, 0.96, 0.955, 0.95, 0.96]
    capped_best = ([1 - b for b in high_b], [math.sqrt(b * (1 - b) / 199) for b in high_b])
    roomy_best = ([1 - b for b in low_b], [math.sqrt(b * (1 - b) / 199) for b in low_b])
    assert paired(capped_best[0], se=capped_best[1])["verdict"] == "tie"
    assert paired(roomy_best[0], se=roomy_best[1])["verdict"] == "holds"
    # Execute
    capped, roomy = paired(d, against="b", perfect=capped_best), paired(d, against="c", perfect=roomy_best)
    three = paired(d[:3], perfect=(capped_best[0][:3], capped_best[1][:3]))
    # Assert: the perfect winner's comparison decides whether a tie is one; it never touches a decided verdict
    assert capped["verdict"] == "not testable here" and capped["ceiling"] and capped["perfect"]["verdict"] == "tie"
    assert roomy["verdict"] == "tie" and not roomy["ceiling"] and roomy["perfect"]["verdict"] == "holds"
    assert three["verdict"] == "tie" and three["perfect"] is None and advice([three]) == ADD_SEEDS  # add seeds first
    assert paired([0.01, 0.012, 0.011, 0.013, 0.01], perfect=capped_best)["verdict"] == "holds"
    assert paired([-0.03, -0.02, -0.025, -0.03, -0.02], perfect=capped_best)["verdict"] == "does not hold"
    # "at least as good within 0.01" (tol -0.01): the perfect winner holds against -0.01, so the tie stands
    assert paired([-0.02, 0.0, -0.015, 0.01, -0.005], -0.01, perfect=capped_best)["verdict"] == "tie"
    # within a claim: not testable only where every tie is at the ceiling; a tie with room, or a loss, decides
    both = _decide("a above b", "higher", "", [capped, paired(d, against="d", perfect=capped_best)])
    assert both.verdict == "not testable here" and both.why == "at the ceiling" and both.advice == ""
    assert both.note.startswith("not testable here: at the ceiling, even a winner right on every test example "
                                "would not have won against b (it would gain +0.007 [")
    mixed = _decide("a above b and c", "higher", "", [capped, roomy])
    assert mixed.verdict == "tie" and mixed.why == "" and "at the ceiling" in mixed.note
    lost = _decide("a above b and c", "higher", "", [capped, paired([-0.05, -0.04, -0.06, -0.05, -0.04])])
    assert lost.verdict == "does not hold" and lost.why == ""


def test_the_perfect_winner_is_made_against_the_baseline_from_its_own_correctness():
    from lowrank_fed.llm.reproduce.claims import _against

    # Prepare: 5 seeds, 8 test examples; the baseline b is right on 7 (or 6) of them, the winner a on all but one
    runs = {}
    for s in range(5):
        b = [1] * 7 + [0] if s % 2 else [1] * 6 + [0, 0]
        runs[s] = Run({m: {"final": v} for m, v in (("a", 0.875), ("b", sum(b) / 8))},
                      {"a": [{"test_correct": _bits([0] + [1] * 7)}], "b": [{"test_correct": _bits(b)}]},
                      {"eval_size": 8})
    acc = {"a": [0.875] * 5, "b": [float(runs[s].summary["b"]["final"]) for s in range(5)]}
    # Execute
    (comp,) = _against(acc, "a", ("b",), {}, by_seed=runs, best=1.0)
    # Assert: d_s = 1 - b_s (not 1 - a_s), and each seed's error std(c_b) / sqrt 8
    c_b = [np.array([1] * 7 + [0] if s % 2 else [1] * 6 + [0, 0]) for s in range(5)]
    expected = paired([1 - b for b in acc["b"]], se=[np.std(c, ddof=1) / math.sqrt(8) for c in c_b])
    assert comp["perfect"]["mean"] == pytest.approx(expected["mean"])
    assert comp["perfect"]["low"] == pytest.approx(expected["low"])
    with pytest.raises(ValueError, match="'best' is the best score of a higher-is-better claim"):
        _against(acc, "a", ("b",), {}, best=1.0, lower_is_better=True)


def test_example_se_is_the_paired_standard_error_over_test_examples():
    a, b = np.array([1, 1, 0, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 0])
    assert example_se(a, b) == pytest.approx(np.std(a - b, ddof=1) / math.sqrt(6))
    with pytest.raises(ValueError, match="two vectors of one length"):
        example_se(a, b[:3])


def test_equal_methods_tie_pairwise_where_the_best_of_five_loses():
    r"""A method equal in expectation to each of 5 baselines: per seed a shared seed effect plus independent noise of
    sd 0.025 (200 test examples). Against the best of the five per seed it loses by about 0.03 and, over 10 seeds,
    mostly reads "does not hold"; pairwise it reads "tie", and "does not hold" at most about 1 - 0.975^5 of the
    time (any one of five intervals falling below zero)."""
    # Prepare
    rng = np.random.default_rng(20261205)
    new, old = [], []
    # Execute: 300 synthetic experiments of 10 seeds each
    for _ in range(300):
        acc = rng.normal(0.80, 0.05, size=10)[None, :] + rng.normal(0.0, 0.025, size=(6, 10))  # row 0: the claim
        new.append(combine(paired(acc[0] - acc[b])["verdict"] for b in range(1, 6)))
        old.append(paired(acc[0] - acc[1:].max(axis=0))["verdict"])
    # Assert
    assert set(new) <= {"tie", "does not hold"} and "holds" not in old
    assert new.count("tie") / 300 >= 0.85 and new.count("does not hold") / 300 <= 0.15
    assert old.count("does not hold") / 300 >= 0.6


# ----------------------------------------------------------------------------- counted as the papers count


def _tiny_bert_params(vocab: int, labels: int, hidden: int = 32, layers: int = 2, positions: int = 512,
                      types: int = 2) -> int:
    """tiny-bert's parameters by hand: embeddings, encoder layers, pooler, classifier head."""
    inner = 2 * hidden
    embeddings = (vocab + positions + types) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + (hidden * inner + inner) + (inner * hidden + hidden) + 2 * hidden
    return embeddings + layers * layer + (hidden * hidden + hidden) + (hidden * labels + labels)


def test_whole_model_parameters_of_tiny_bert_by_hand(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict(dict(name="t", model="tiny-bert", dataset="synthetic", methods=["fedit"], clients=3,
                                   ranks=[2, 4, 8], rounds=1, local_steps=1, eval_size=40, max_length=32,
                                   checkpoint=False))
    sim = Simulation(cfg, tmp_path, progress=False)
    # Execute
    sim.setup()
    # Assert: the runner's model_params is every parameter of the base and head, LoRA layers not counted
    labels = len(sim.train.label_names)
    assert count_parameters(tiny_bert(labels, vocab_size=50)) == _tiny_bert_params(50, labels)
    assert sim.describe()["model_params"] == _tiny_bert_params(len(sim.tokenizer), labels)
    assert model_params(Run({}, {}, sim.describe())) == sim.describe()["model_params"]


def test_a_run_without_model_params_or_config_is_refused_by_name():
    with pytest.raises(ValueError, match="no 'model_params' and its config.json was not loaded"):
        model_params(Run({}, {}, {"task": "classification"}))


def _tiny_hafl(tmp_path, variant):
    cfg = RunConfig.from_dict(dict(name="t", model="tiny-bert", dataset="synthetic", methods=["hafl"], clients=3,
                                   ranks=[2, 4, 8], rounds=1, local_steps=5, batch_size=8, lr=0.05, eval_size=120,
                                   max_length=32, checkpoint=False, hafl={"variant": variant}))
    run_experiment(cfg, tmp_path / variant, progress=False)
    rows = [json.loads(x) for x in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]


def test_hafl_drop_at_distribution_is_scored_per_client_on_its_own_held_out_data(tmp_path, monkeypatch):
    # Execute: one round of each variant; then freezing again with its download loaded and scored, not reused
    trn, frz = _tiny_hafl(tmp_path, "truncation"), _tiny_hafl(tmp_path, "freezing")
    monkeypatch.setattr(HAFL, "download_is_global", lambda self, server, rank: False)
    measured = _tiny_hafl(tmp_path / "measured", "freezing")
    # Assert: truncation's low-rank clients lose something; the rank-R client downloads the global itself
    drops = [g - c for g, c in zip(trn["per_client_global"], trn["per_client"], strict=True)]
    assert any(d != 0 for d in drops[:2]) and drops[2] == 0
    # freezing's drop is 0 because every client downloads the global adapter: scored from the download it is the
    # same, client by client
    assert frz["per_client_global"] == frz["per_client"] == measured["per_client"]
    assert measured["per_client_global"] == frz["per_client_global"]
    # each download's per-example correctness is recorded beside its accuracy (the verdicts' standard error)
    from lowrank_fed.llm.runner.report import per_example_correct

    for row, folder in ((trn, tmp_path / "truncation"), (measured, tmp_path / "measured" / "freezing")):
        n = json.loads((folder / "setup.json").read_text())["eval_size"]
        for r, v in row["by_rank"].items():
            assert per_example_correct(v["test_correct"], n).mean() == pytest.approx(v["accuracy"]), r


@pytest.mark.slow
def test_hafl_claims_without_their_runs_say_not_run_yet(tmp_path):
    # Prepare: a quick hafl reproduction, then its freezing runs alone, without the per-client global scores (as in
    # runs written before the runner recorded them)
    reproduce("hafl", quick=True, seeds=1, out=tmp_path, progress=False, log=lambda m: None)
    results = {"freezing": {0: load_run(tmp_path / "freezing" / "seed0")}}
    for row in results["freezing"][0].history["hafl"]:
        row.pop("per_client_global", None)
    # Execute
    claims = {c.claim: c for c in EXPERIMENTS["hafl"].analyse(results)}
    # Assert: the claims that need truncation's runs say so; the one on freezing alone is read
    drop = claims["Freezing: no accuracy drop at distribution (truncation has one)"]
    bytes_ = claims["HAFL (freezing) moves fewer bytes than truncation-based schemes (HAFL's truncation variant, "
                    "HetLoRA)"]
    assert drop.verdict == bytes_.verdict == "not run yet"
    assert "truncation" in drop.ours and "truncation" in bytes_.ours
    assert not drop.comparisons and not bytes_.comparisons
    speed = claims["Adaptive rank-1 aggregation converges faster than zero-padding"]
    assert speed.verdict == "too few seeds" and speed.comparisons[0]["kind"] == "sign"
    # without per_client_global the drop is read on the test set: global minus the download of each client's rank
    last = [h for h in results["freezing"][0].history["hafl"] if "by_rank" in h][-1]
    from lowrank_fed.llm.reproduce.claims import _client_drops

    assert _client_drops(results["freezing"][0], "hafl") == [
        last["accuracy"] - last["by_rank"][str(r)]["accuracy"] for r in last["ranks"]]


def _bits(correct: list[int]) -> str:
    return np.packbits(np.array(correct, dtype=bool)).tobytes().hex()


def _prelort_run(seed: int) -> Run:
    """A run of PreLort's MiniLM setting on 8 test examples, clients at ranks 8, 4, 4; HetLoRA's pruning has taken
    the last client to rank 2, whose download is worse than the rank-4 one (0.5 against 0.75). Each download's test
    loss is 1 minus its accuracy."""
    methods = ("fedit", "hetlora", "replication", "flora", "flexlora", "prelort")
    summary, history = {}, {}
    for i, m in enumerate(methods):
        low = [1, 1, 1, 1, 1, 1, 0, 0] if m != "prelort" else [1, 1, 1, 1, 1, 1, int(seed > 0), 0]
        by_rank = {"8": {"accuracy": 0.875, "loss": 0.125, "test_correct": _bits([1] * 7 + [0])},
                   "4": {"accuracy": sum(low) / 8, "loss": 1 - sum(low) / 8, "test_correct": _bits(low)}}
        ranks = [8, 4, 4]
        if m == "hetlora":
            by_rank["2"], ranks = {"accuracy": 0.5, "loss": 0.5, "test_correct": _bits([1] * 4 + [0] * 4)}, [8, 4, 2]
        summary[m] = {"final": 0.875, "title": m}
        history[m] = [{"round": 2, "accuracy": 0.875, "loss": 0.125, "ranks": ranks, "by_rank": by_rank,
                       "per_client": []}]
    return Run(summary, history, {"majority_accuracy": 0.25, "eval_size": 8, "ranks": [8, 4, 4]}, {"ranks": "tiers"})


def test_prelort_low_rank_claim_reads_what_the_smallest_ranks_clients_receive_against_every_baseline():
    from lowrank_fed.llm.reproduce.claims import _prelort_minilm

    # Prepare: three seeds; PreLort's rank-4 download is one example above every baseline's in seeds 1 and 2
    runs = {s: _prelort_run(s) for s in range(3)}
    # Execute
    claim = _prelort_minilm(runs)[1]
    # Assert: HetLoRA's two rank-4 clients, one pruned to rank 2: the mean of what each receives (0.75 and 0.5),
    # whatever the config's own spelling of its ranks (setup.json's resolved ones are read)
    assert claim.values["hetlora"] == [0.625] * 3 and claim.values["prelort"] == [0.75, 0.875, 0.875]
    assert [c["against"] for c in claim.comparisons] == ["fedit", "hetlora", "replication", "flora", "flexlora"]
    assert "seed 0: 1 of 2 clients" in claim.note and "Global minus rank-4 download: fedit +0.125" in claim.note
    # the rank-4 clients' test loss, each baseline's minus PreLort's, beside it (HetLoRA: (0.25 + 0.5) / 2 - 0.25)
    assert "Test loss (cross-entropy), each baseline's minus PreLort's, shown and not decided on: vs fedit +0.083 [" \
        in claim.note and "vs hetlora +0.208 [" in claim.note
    # each interval is floored at the per-example standard errors of what the rank-4 clients receive
    d = np.array([1, 1, 1, 1, 1, 1, 1, 0]) - np.array([1, 1, 1, 1, 1, 1, 0, 0])
    assert claim.comparisons[0]["example_se"] == pytest.approx([0.0] + [np.std(d, ddof=1) / math.sqrt(8)] * 2)
    mixed = np.array([1, 1, 1, 1, 1, 1, 1, 0]) - (np.array([1, 1, 1, 1, 1, 1, 0, 0]) + np.array([1] * 4 + [0] * 4)) / 2
    assert claim.comparisons[1]["example_se"][1] == pytest.approx(np.std(mixed, ddof=1) / math.sqrt(8))
    assert claim.comparisons[0]["sd_floor"] > 0


def test_prelort_claims_on_a_config_that_ran_two_methods_read_only_the_nesting_claim():
    from lowrank_fed.llm.reproduce.claims import _prelort_minilm

    # Prepare: runs of PreLort and replication alone (a constant twin given the nesting claim's two methods)
    runs = {}
    for s in range(3):
        run = _prelort_run(s)
        keep = ("prelort", "replication")
        runs[s] = Run({m: run.summary[m] for m in keep}, {m: run.history[m] for m in keep}, run.setup, run.config)
    # Execute
    claims = _prelort_minilm(runs)
    # Assert: the claims against every baseline are not run yet, naming what is missing; nesting is read
    assert [c.verdict for c in claims[:2]] == ["not run yet"] * 2
    assert claims[0].ours == "not run yet: no runs of fedit, hetlora, flora, flexlora"
    assert claims[2].verdict != "not run yet" and claims[2].values["PreLort, rank 4"] == [0.75, 0.875, 0.875]


def test_prelort_nesting_claim_is_decided_on_the_truncated_downloads_and_reports_the_full_rank_beside():
    from lowrank_fed.llm.reproduce.claims import _prelort_minilm

    # Prepare: PreLort's rank-4 download above replication's in seeds 1 and 2; both full rank-8 models equal
    runs = {s: _prelort_run(s) for s in range(3)}
    # Execute
    claim = _prelort_minilm(runs)[2]
    # Assert: only rank 4 (below the largest, 8) decides; rank 8 is in the text, not among the comparisons
    assert [c["against"] for c in claim.comparisons] == ["replication at rank 4"]
    assert "the full rank 8 (every slot; not decided on): +0.000" in claim.ours
    assert claim.values["PreLort, rank 8"] == claim.values["replication, rank 8"] == [0.875] * 3
    assert "(ours: the claim isolated)" in claim.paper and "below the largest" in claim.claim
    # one client rank: no truncated download, not testable (the full rank shown as before)
    one = {s: Run(r.summary, {m: [{**h[0], "ranks": [8, 8, 8], "by_rank": {"8": h[0]["by_rank"]["8"]}}]
                              for m, h in r.history.items()}, {**r.setup, "ranks": [8, 8, 8]}, r.config)
           for s, r in runs.items()}
    single = _prelort_minilm(one)[2]
    assert single.verdict == "not testable here" and single.why == "one client rank"
    # the test loss, replication's minus PreLort's, at every rank: in the note, not among the deciding comparisons
    assert "Test loss (cross-entropy), replication's minus PreLort's, shown and not decided on: vs replication " \
           "at rank 4 +0.083 [" in claim.note and "vs replication at rank 8 +0.000" in claim.note


def test_prelort_nesting_claim_reports_the_prefix_share_per_round_where_the_runs_recorded_it():
    from lowrank_fed.llm.reproduce.claims import _prelort_minilm

    # Prepare: rounds 1 and 2 record the share of the update in the first 4 slots (clients above rank 4); PreLort's
    # grows over the rounds and differs by seed, replication's stays at an even spread over a rank-8 client's slots
    runs = {}
    for s in range(3):
        run = _prelort_run(s)
        history = {m: [{"round": 1, "prefix_share": {"4": 0.3 + 0.1 * s if m == "prelort" else 0.5}},
                       {**h[0], "prefix_share": {"4": 0.9 if m == "prelort" else 0.5}}]
                   for m, h in run.history.items()}
        runs[s] = Run(run.summary, history, run.setup, run.config)
    # Execute
    with_shares, without = _prelort_minilm(runs)[2], _prelort_minilm({s: _prelort_run(s) for s in range(3)})[2]
    # Assert: per round, the mean over seeds at each truncated level (rank 8, the largest, has none); not deciding
    assert "first 4 slots (`prefix_share`" in with_shares.note
    assert "rounds 1, 2: PreLort 0.40, 0.90; replication 0.50, 0.50" in with_shares.note
    assert with_shares.comparisons == without.comparisons and "prefix_share" not in without.note


def _run(finals: dict[str, float], majority: float = 0.25, n: int = 200) -> Run:
    return Run({m: {"final": v} for m, v in finals.items()}, {}, {"majority_accuracy": majority, "eval_size": n})


def test_a_claim_among_methods_all_at_chance_is_not_testable_here():
    from lowrank_fed.llm.reproduce.claims import _decide, _near_chance

    # Prepare: 200 test examples, majority class 0.25: 2 standard errors are 0.061
    at_chance = {s: _run({"a": 0.25 + 0.01 * s, "b": 0.22}) for s in range(3)}
    one_learns = {s: _run({"a": 0.25 + 0.1 * (s == 2), "b": 0.22}) for s in range(3)}
    comps = [paired([0.03, 0.02, 0.05], against="b")]
    # Execute
    reason = _near_chance(at_chance, ("a", "b"))
    claim = _decide("a above b", "higher", "", comps, untestable=reason)
    # Assert: the reason is stated, the comparisons are kept, no advice to add seeds
    assert "none has learnt anything measurable" in reason and _near_chance(one_learns, ("a", "b")) == ""
    assert claim.verdict == "not testable here" and claim.note.startswith("not testable here: no method's accuracy")
    assert claim.comparisons == comps and claim.advice == ""
