"""The reproductions' analysis after the fairness review: statistics per kind of outcome (counts with
Clopper-Pearson intervals, exact counts, sign counts), chance as the majority class and one-sided, CLAIR's and
HAFL's claims, untuned learning rates, ``--analyse-only`` on the committed runs, and the committed reports and
README against a re-analysis."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.cli import main as cli_main  # noqa: E402
from lowrank_fed.llm.config import ConfigError  # noqa: E402
from lowrank_fed.llm.reproduce import EXPERIMENTS  # noqa: E402
from lowrank_fed.llm.reproduce import run as reproduce_run  # noqa: E402
from lowrank_fed.llm.reproduce.claims import UNTUNED, Run, _near_chance, describe  # noqa: E402
from lowrank_fed.llm.reproduce.run import CONFIG_ROOT, analyse, find_runs  # noqa: E402
from lowrank_fed.llm.reproduce.verdicts import exact, proportion, sign_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "reproduce"
NAMES = list(EXPERIMENTS)


def _claims(name: str, folder: str | None = None) -> dict:
    """The committed runs of ``name`` (in ``results/reproduce/<folder or name>``) analysed in memory: claim text ->
    Claim."""
    experiment = EXPERIMENTS[name]
    return {c.claim: c for c in experiment.claims(find_runs(experiment, RESULTS / (folder or name)), CONFIG_ROOT)}


# ----------------------------------------------------------------------------- statistics per kind of outcome


def test_proportion_is_clopper_pearson_by_hand():
    # k = n: the lower end solves p^n = 0.025; k = 0: the upper end solves (1 - p)^n = 0.025
    all_right = proportion([True] * 12, 0.5, seeds=3)
    none_right = proportion([False] * 9, 0.5, seeds=3)
    assert all_right["k"] == 12 and all_right["n"] == 12 and all_right["high"] == pytest.approx(1.0)
    assert all_right["low"] == pytest.approx(0.025 ** (1 / 12), abs=1e-9) and all_right["verdict"] == "holds"
    assert none_right["high"] == pytest.approx(1 - 0.025 ** (1 / 9), abs=1e-9)
    assert none_right["verdict"] == "does not hold" and none_right["low"] == pytest.approx(0.0)
    # 8 of 12 covers one half; 2 seeds give no verdict whatever the count
    assert proportion([True] * 8 + [False] * 4, 0.5, seeds=3)["verdict"] == "tie"
    assert proportion([True] * 12, 0.5, seeds=2)["verdict"] == "too few seeds"


def test_exact_counts_have_no_interval():
    saved = exact([0.1, 0.1, 0.1], against="x")
    assert saved["verdict"] == "holds" and saved["low"] is None and saved["high"] is None and saved["kind"] == "exact"
    assert exact([0.0, 0.0, 0.0])["verdict"] == "tie"  # equal bytes save nothing
    assert exact([-1.0, 1.0, 1.0])["verdict"] == "does not hold"  # one seed below is a fact, not noise


def test_rounds_to_target_are_a_sign_count():
    few = sign_count([-1.0, 0.0, -1.0], against="FedIT")
    assert few["k_plus"] == 0 and few["k_minus"] == 2 and few["p_value"] == pytest.approx(0.5)
    assert few["verdict"] == "tie" and few["low"] is None  # 3 seeds can never decide a sign test at 5%
    assert sign_count([1.0] * 6)["verdict"] == "holds"  # 2 / 2^6 = 0.031
    assert sign_count([-2.0] * 6)["verdict"] == "does not hold"
    assert sign_count([1.0] * 5)["verdict"] == "tie"  # 2 / 2^5 = 0.0625


def _run(finals: dict[str, float], majority: float, n: int) -> Run:
    return Run({m: {"final": v} for m, v in finals.items()}, {}, {"majority_accuracy": majority, "eval_size": n})


def test_a_method_below_the_majority_class_has_not_learnt():
    # lora-a2 dir05_r1 seed 0: FedIT 0.037 against a majority share of 0.09 on 400 examples (2 se = 0.029)
    below = {s: _run({"fedit": 0.037, "lora_a2": 0.10}, 0.09, 400) for s in range(3)}
    above = {s: _run({"fedit": 0.037, "lora_a2": 0.09 + 0.03 * (s == 1)}, 0.09, 400) for s in range(3)}
    assert "majority class" in _near_chance(below, ("fedit", "lora_a2"))
    assert _near_chance(above, ("fedit", "lora_a2")) == ""


def test_lora_a2_accuracy_claims_need_every_method_trained_in_three_seeds():
    from lowrank_fed.llm.reproduce.papers.lora_a2 import _budget_one

    def runs(baseline: float, n_seeds: int = 3) -> dict[int, Run]:
        # 400 test examples, majority share 0.09 (2 se = 0.029): LoRA-A2 at 0.20 has learnt, a baseline at 0.10 not
        finals = {"fedit": baseline, "ffa": baseline, "flexlora": baseline, "lora_a2": 0.20}
        return {s: Run({m: {"final": v + 0.001 * s, "title": m} for m, v in finals.items()},
                       {m: [{}] for m in finals}, {"majority_accuracy": 0.09, "eval_size": 400})
                for s in range(n_seeds)}

    # baselines that have not left chance: not testable, naming each method's count of learnt seeds
    (untrained,) = _budget_one(runs(0.10))
    assert untrained.verdict == "not testable here"
    assert untrained.why == "not every baseline left chance in at least 3 seeds"
    assert "budget 1: fedit in 0 of 3, ffa in 0 of 3, flexlora in 0 of 3" in untrained.note
    # LoRA-A2 at chance beside trained baselines: a result against the claim, not gated
    (lost,) = _budget_one({s: Run({**r.summary, "lora_a2": {"final": 0.05, "title": "lora_a2"}}, r.history, r.setup)
                           for s, r in runs(0.15).items()})
    assert lost.verdict == "does not hold" and not lost.why
    # trained baselines below LoRA-A2: a verdict from the paired intervals
    (trained,) = _budget_one(runs(0.15))
    assert trained.verdict == "holds" and not trained.why
    # the committed runs: every baseline at chance in every seed
    claim = _claims("lora-a2")["Dir 0.01, upload budget 1: LoRA-A2 above FL+LoRA, FFA-LoRA and FlexLoRA"]
    assert claim.verdict == "not testable here"
    assert "FedIT (zero-pad) in 0 of 3, FFA-LoRA in 0 of 3, FlexLoRA in 0 of 3" in claim.note


# ----------------------------------------------------------------------------- the committed runs, re-read


def test_clair_detection_is_counted_over_seeds_and_rounds_and_specificity_apart():
    claims = _claims("clair", "clair-zcut3")  # the earlier runs: fixed cut z > 3, seeds 0-2
    detect = claims["copy task (copy-llama): CLAIR flags exactly the contaminated clients (γ = 0.1, 0.2, 0.3)"]
    clean = claims["copy task (copy-llama): CLAIR flags nobody when no client is contaminated (γ = 0)"]
    assert [(c["k"], c["n"]) for c in detect.comparisons] == [(12, 12), (10, 12), (8, 12)]
    assert "12/12 rounds exact" in detect.ours
    # made at lr 5e-3; the copy configs now read the rates tuned on validation (0.015): not tuned runs
    assert detect.verdict == "not testable here" and "not made at its tuned values" in detect.note
    assert (clean.comparisons[0]["k"], clean.comparisons[0]["n"]) == (8, 12) and "5 false flags" in clean.ours
    minilm = claims["MiniLM / BBC News: CLAIR flags exactly the contaminated clients (γ = 0.1, 0.2, 0.3)"]
    # nobody exact in any round; made at lr 5e-3, and minilm_g0 now reads its tuned rates: not tuned runs either
    assert all(c["k"] == 0 for c in minilm.comparisons)
    assert minilm.verdict == "not testable here" and "not made at its tuned values" in minilm.note


def test_clair_gain_is_against_local_and_exact_product_fedavg_with_fedit_beside():
    claims = _claims("clair", "clair-zcut3")  # the earlier runs: no FlexLoRA among their methods
    gain = claims["copy task (copy-llama): benign clients do better under CLAIR than under local training and than "
                  "exact-product FedAvg of everyone (γ > 0)"]
    specific = claims["copy task (copy-llama): CLAIR's gain grows with contamination (gain at γ minus gain at γ = 0)"]
    # the committed runs have no FlexLoRA: not run yet, the local comparisons shown all the same
    assert gain.verdict == specific.verdict == "not run yet"
    against = [c["against"] for c in gain.comparisons]
    assert sum("local training" in a for a in against) == 3 and sum("FlexLoRA" in a for a in against) == 3
    assert all("FedIT" not in a for a in against) and "fedit 0.628" in gain.ours  # FedIT beside, not decisive
    # CLAIR - FedIT at γ 0 is the reviewer's -0.015, +0.620, +0.149: reported, never a baseline
    assert gain.values["CLAIR - FedIT (beside), γ 0.0"] == pytest.approx([-0.015, 0.620, 0.149], abs=2e-3)
    # the contamination-specific gain is (CLAIR - local at γ) - (CLAIR - local at γ 0), paired by seed
    d01 = gain.values["CLAIR - local, γ 0.1"]
    spec = specific.values["(CLAIR - local) at γ 0.1 minus at γ 0"]
    runs = find_runs(EXPERIMENTS["clair"], RESULTS / "clair-zcut3")
    last = {m: [runs["copy_g0"][s].history[m][-1] for s in (0, 1, 2)] for m in ("clair", "local")}
    # at γ 0 every client is benign: their score is every client's
    d0 = [c["local_exact_match"] - lo["local_exact_match"] for c, lo in zip(last["clair"], last["local"], strict=True)]
    assert spec == pytest.approx([a - b for a, b in zip(d01, d0, strict=True)])


def test_clair_shared_model_claim_compares_the_global_models_alone():
    text = ("detection helps the shared model: CLAIR's global model (the kept clients' average) above the same "
            "average of everyone, both with the refinement (γ > 0)")
    # the reruns at the tuned rates (clair_nodetect, FlexLoRA, the oracle; 5 seeds); MiniLM's runs at CLAIR's former
    # rate 0.015 are kept (its configs have moved on: "not testable here" under them)
    for task, name, key, folder, verdict in (("copy", "copy task (copy-llama)", "exact_match", "clair", "tie"),
                                             ("minilm", "MiniLM / BBC News", "accuracy", "clair", "tie"),
                                             ("minilm", "MiniLM / BBC News", "accuracy", "clair-minilm-lr0.015",
                                              "not testable here")):
        runs = find_runs(EXPERIMENTS["clair"], RESULTS / folder)
        shared = _claims("clair", folder)[f"{name}: {text}"]
        for tag, gamma in (("01", 0.1), ("02", 0.2), ("03", 0.3)):
            by_seed = runs[f"{task}_g{tag}"]
            assert sorted(by_seed) == [0, 1, 2, 3, 4]
            # the test score of the two global models (the same rule, with and without detection), by hand
            d = [by_seed[s].history["clair"][-1][key] - by_seed[s].history["clair_nodetect"][-1][key]
                 for s in sorted(by_seed)]
            assert shared.values[f"CLAIR - everyone (global), γ {gamma}"] == pytest.approx(d)
        assert [c["against"] for c in shared.comparisons] == [f"the same average of everyone at γ {g}"
                                                               for g in (0.1, 0.2, 0.3)]
        assert shared.verdict == verdict
        assert verdict != "tie" or ("FlexLoRA" in shared.ours and "oracle" in shared.ours)  # beside


@pytest.mark.parametrize("folder, exact, recalls, verdict", [
    # the rerun at CLAIR's rate tuned on its downloads (0.005, cut 1.086), 5 seeds x 3 rounds
    ("clair", [(6, 15), (3, 15), (0, 15)], (8 / 15, 14 / 30, 11 / 45), "does not hold"),  # 0.53, 0.47, 0.24
    # the rerun at the rates tuned on global models (CLAIR 0.015, cut 0.958), now in clair-minilm-lr0.015/ (its
    # verdict, "does not hold", was read under the configs it ran; today's make it "not testable here")
    ("clair-minilm-lr0.015", [(2, 15), (0, 15), (0, 15)], (3 / 15, 5 / 30, 6 / 45), "not testable here"),
])
def test_clair_minilm_rerun_detection_counts_and_pooled_recall(folder, exact, recalls, verdict):
    # README and docs/reproduce.md quote these
    detect = _claims("clair", folder)["MiniLM / BBC News: CLAIR flags exactly the contaminated clients (γ = 0.1, "
                                      "0.2, 0.3)"]
    assert [(c["k"], c["n"]) for c in detect.comparisons] == exact and detect.verdict == verdict
    runs = find_runs(EXPERIMENTS["clair"], RESULTS / folder)
    for tag, recall in zip(("01", "02", "03"), recalls, strict=True):
        found = missed = 0
        for run in runs[f"minilm_g{tag}"].values():
            for h in run.history["clair"]:
                if h["round"] > 0 and h.get("detection"):
                    truth, flagged = set(h["detection"]["contaminated"]), set(h["detection"]["flagged"])
                    found, missed = found + len(truth & flagged), missed + len(truth - flagged)
        assert found / (found + missed) == pytest.approx(recall)


def test_clair_configs_run_flexlora_for_the_next_rerun():
    for stem in EXPERIMENTS["clair"].configs:
        text = (CONFIG_ROOT / "clair" / f"{stem}.toml").read_text()
        assert re.search(r'^methods = \[.*"flexlora".*\]$', text, re.M), stem


def test_hafl_bytes_are_exact_against_truncation_the_total_deciding():
    claims = _claims("hafl")
    claim = claims["HAFL (freezing) moves fewer bytes than truncation-based schemes (HAFL's truncation variant, "
                   "HetLoRA)"]
    assert claim.verdict == "does not hold" and not claim.trained
    against = ["HAFL truncation, MB up + down saved", "HetLoRA, MB up + down saved"]
    assert [c["against"] for c in claim.comparisons] == against + [f"[constant] {a}" for a in against]  # the twins
    assert all(c["kind"] == "exact" and c["low"] is None for c in claim.comparisons)
    # the total saved is the sum of the two directions, each reported: freezing downloads all R = 32 slots
    v = claim.values
    totals = [(tu + td) - (fu + fd) for tu, td, fu, fd in zip(v["MB up, truncation"], v["MB down, truncation"],
                                                             v["MB up, hafl"], v["MB down, hafl"], strict=True)]
    assert claim.comparisons[0]["differences"] == pytest.approx(totals)
    assert totals == pytest.approx([-47.8] * 5, abs=0.1)  # seeds 0-4 (freezing's seed 5 has no truncation twin)
    assert "down -47.8, -47.8, -47.8" in claim.ours
    assert "homogeneous" not in claim.ours  # the homogeneous federation is its own claim


def test_hafl_bytes_against_the_homogeneous_federation_the_total_deciding():
    from lowrank_fed.llm.reproduce.papers.hafl import _bytes_homogeneous

    def runs(method, up, down):
        return {s: Run({method: {"mb_up": up, "mb_down": down}}, {}, {}) for s in range(3)}

    # freezing uploads r_k slots and downloads R slots with their indices; the homogeneous federation R both ways
    (claim,) = _bytes_homogeneous(runs("hafl", 25.0, 72.76), runs("fedit", 72.7, 72.7))
    (comp,) = claim.comparisons
    assert (comp["against"], comp["verdict"]) == ("homogeneous FedIT at rank R, MB up + down saved", "holds")
    assert comp["differences"] == pytest.approx([47.64] * 3)
    assert "up +47.7, +47.7, +47.7; down -0.1, -0.1, -0.1" in claim.ours  # each direction reported
    assert claim.verdict == "holds" and not claim.trained and claim.configs == ("freezing", "homogeneous")
    (more,) = _bytes_homogeneous(runs("hafl", 25.0, 130.0), runs("fedit", 72.7, 72.7))
    assert more.verdict == "does not hold"


def test_hafl_drop_is_signed_per_client_and_the_verdict_compares_what_clients_receive():
    claims = _claims("hafl")
    drop = claims["Freezing: no accuracy drop at distribution (truncation has one)"]
    values = drop.values
    # truncation's downloads beat its global model in seeds 0 and 1: a negative drop (the old floor was 0)
    assert values["drop, truncation"][0] < 0 and values["drop, truncation"][1] < 0
    assert values["drop, freezing"] == [0.0] * 5
    assert drop.comparisons[0]["differences"] == pytest.approx(
        [f - t for f, t in zip(values["local, freezing"], values["local, truncation"], strict=True)])


def test_lora_a2_budget_eight_claim_is_gated_on_lora_a2_having_learnt():
    from lowrank_fed.llm.reproduce.papers.lora_a2 import _flexlora_at_eight

    learnt = 0.25 + 2 * (0.25 * 0.75 / 300) ** 0.5 + 0.01  # above a majority share of 0.25 by 2 SE on 300 examples

    def runs(flexlora, others, lora_a2):
        return {s: Run({m: {"final": acc, "title": m} for m, acc in (("fedit", others), ("ffa", others),
                                                                     ("flexlora", flexlora[s]), ("lora_a2", lora_a2))},
                       {}, {"majority_accuracy": 0.25, "eval_size": 300}) for s in range(3)}

    # as at budget 1, the method the claim puts below must have learnt (here LoRA-A2); FedIT and FFA-LoRA do not gate
    (claim,) = _flexlora_at_eight(runs([learnt + 0.2, learnt + 0.21, learnt + 0.23], 0.25, learnt))
    assert claim.verdict == "holds"
    assert claim.comparisons[0]["differences"] == pytest.approx([0.2, 0.21, 0.23])
    # FlexLoRA at chance beside a trained LoRA-A2 is a result against the claim
    (claim,) = _flexlora_at_eight(runs([0.25, 0.25, 0.25], learnt + 0.2, learnt))
    assert claim.verdict == "does not hold"
    # a trained FlexLoRA above a LoRA-A2 still at chance: not testable (the committed budget-8 rerun)
    (claim,) = _flexlora_at_eight(runs([learnt + 0.2] * 3, 0.25, 0.25))
    assert claim.verdict == "not testable here" and "lora_a2 in 0 of 3" in claim.note


def test_claims_on_untuned_learning_rates_are_not_testable_here(tmp_path, monkeypatch):
    claims = list(_claims("lora-a2").values())
    assert not any(c.verdict == "not testable here" and c.why == UNTUNED for c in claims)
    assert claims[0].why == "not every baseline left chance in at least 3 seeds"  # tuned at its setting, untrained
    # budget 8, rerun at its tuned rates (5 seeds): FlexLoRA above LoRA-A2 in every seed, LoRA-A2 learnt in none
    assert claims[1].why == "LoRA-A2 did not leave chance in at least 3 seeds"
    assert len(claims[1].comparisons[0]["differences"]) == 5
    # Dir 0.5: every budget rerun at its tuned rates; FFA-LoRA learnt in no seed at budgets 1 and 2
    assert claims[2].why == claims[3].why == claims[0].why and "reuses the learning" not in claims[3].note
    assert claims[4].verdict == "holds" and claims[4].comparisons[0]["kind"] == "exact"  # a count: lr-free
    # a config that reads a tuned file (lowrank-fed tune's choice for it) counts as tuned
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT / "lora-a2", root / "lora-a2")
    for stem in ("dir001_r2",):
        path = root / "lora-a2" / f"{stem}.toml"
        path.write_text('tuned = "tuned.toml"\n' + path.read_text())
    assert EXPERIMENTS["lora-a2"].untuned(root) == set()
    assert EXPERIMENTS["lora-a2"].untuned(CONFIG_ROOT) == {"dir001_r2"}
    # a linked config's runs made before the link (at other rates than its tuned file holds) are not tuned runs,
    # nor are runs with a method the tuned file leaves out; an option at its default matches a tuned default
    hafl = tmp_path / "hafl-configs"
    shutil.copytree(CONFIG_ROOT / "hafl", hafl / "hafl")
    path = hafl / "hafl" / "freezing.toml"
    path.write_text(path.read_text().replace('tuned = "tuned/freezing.toml"', 'tuned = "chosen.toml"'))
    runs = find_runs(EXPERIMENTS["hafl"], RESULTS / "hafl-lr5e-3")  # fedit, hetlora, hafl, all at lr 5e-3
    at = "[fedit]\nlr = {}\n[hetlora]\nlr = 0.005\n[hafl]\nlr = 0.005\nbeta1 = 0.85\n"
    for chosen, stale in ((at.format(0.015), "fedit.lr = 0.005 (tuned: 0.015)"), (at.format(0.005), ""),
                          ("[fedit]\nlr = 0.005\n[hafl]\nlr = 0.005\n", "hetlora not tuned (no [hetlora] table)"),
                          (at.format(0.005) + "beta2 = 0.5\n", "hafl.beta2 = 0.85 (tuned: 0.5)")):
        (hafl / "hafl" / "chosen.toml").write_text(chosen)
        reasons = EXPERIMENTS["hafl"]._untuned_reasons(hafl, runs)
        assert (reasons.get("freezing", "").split("(seed 0: ")[-1].split("; ")[0] if stale else
                "freezing" not in reasons) == (stale or True), (chosen, reasons)
        assert "freezing" not in EXPERIMENTS["hafl"].untuned(hafl)  # without runs: the config alone decides
    (hafl / "hafl" / "chosen.toml").write_text(at.format(0.015))
    claims = EXPERIMENTS["hafl"].claims(runs, hafl)
    notes = [c.note for c in claims if "freezing" in c.configs and c.verdict == "not testable here"]
    assert notes and all("freezing's runs were not made at its tuned values (seed 0: fedit.lr = 0.005 (tuned: "
                         "0.015)" in n for n in notes)
    # an experiment that says every config was tuned (tuned=None) still checks a linked config's runs: Byun & Lee's
    # earlier runs are at 5e-3, its tuned file at FedIT 0.015, replication 0.005; the rerun is at the tuned rates
    old = find_runs(EXPERIMENTS["byun-lee"], RESULTS / "byun-lee-lr5e-3")
    assert EXPERIMENTS["byun-lee"].tuned is None and EXPERIMENTS["byun-lee"].untuned(CONFIG_ROOT) == set()
    assert EXPERIMENTS["byun-lee"].untuned(CONFIG_ROOT, old) == {"top10_bbc"}
    assert EXPERIMENTS["byun-lee"].untuned(CONFIG_ROOT, find_runs(EXPERIMENTS["byun-lee"], RESULTS / "byun-lee")) == set()
    # PreLort: only the MiniLM config is linked to its tune (50 local steps); the others reuse the 5-step rate, and
    # the committed 5-step MiniLM runs were not made at the tuned rates
    assert EXPERIMENTS["prelort"].untuned(CONFIG_ROOT) == set(EXPERIMENTS["prelort"].configs) - {"minilm_bbc"}
    five_steps = find_runs(EXPERIMENTS["prelort"], RESULTS / "prelort")
    assert "minilm_bbc" in EXPERIMENTS["prelort"].untuned(CONFIG_ROOT, five_steps)
    # (HAFL's configs are all linked now; its earlier runs used 5e-3, which is neither freezing's FedIT or HetLoRA
    # rate nor truncation's, tuned since on its clients' downloads (0.015); the twins had no runs then. The rerun is
    # at the tuned rates, truncation's again at its new rate, its runs at 0.005 kept beside.)
    assert EXPERIMENTS["hafl"].untuned(CONFIG_ROOT) == set()
    earlier = find_runs(EXPERIMENTS["hafl"], RESULTS / "hafl-lr5e-3")
    assert EXPERIMENTS["hafl"].untuned(CONFIG_ROOT, earlier) == {"freezing", "truncation"}
    global_score = find_runs(EXPERIMENTS["hafl"], RESULTS / "hafl-truncation-lr0.005")
    assert EXPERIMENTS["hafl"].untuned(CONFIG_ROOT, global_score) == {"truncation"}
    assert EXPERIMENTS["hafl"].untuned(CONFIG_ROOT, find_runs(EXPERIMENTS["hafl"], RESULTS / "hafl")) == set()
    assert EXPERIMENTS["clair"].untuned(CONFIG_ROOT) == set()  # chosen on validation seeds 100-104 (headers)


def test_the_setting_is_read_from_the_runs_own_config():
    settings = {"a": [{"rounds": 4, "local_steps": 5, "m": {"lr": 0.002}}, {"rounds": 4, "local_steps": 6}]}
    with pytest.raises(KeyError, match="has no 'm.lr'"):
        describe("{a.m.lr}", settings)
    assert describe("{a.rounds} rounds of {a.local_steps} steps", settings) == "4 rounds of 5 / 6 steps"
    with pytest.raises(KeyError, match="no settings of config 'b'"):
        describe("{b.rounds}", settings)


def test_a_run_made_before_an_entry_key_existed_does_not_differ_from_its_config():
    # Prepare: a CLAIR run's stored config as written before [[attacks]] entries had from_round
    from lowrank_fed.llm.reproduce.report import _settings

    run = next(iter(find_runs(EXPERIMENTS["clair"], RESULTS / "clair")["minilm_g02"].values()))
    assert all("from_round" not in a for a in run.config["attacks"])
    # Execute
    entry = _settings(EXPERIMENTS["clair"], {"minilm_g02": {0: run}}, CONFIG_ROOT)["minilm_g02"]
    # Assert: the missing key is its default (1, the whole run), so the run is the config's; a changed value is not
    assert entry["differs"] == {}
    changed = dataclasses.replace(run, config={**run.config, "attacks": [{**run.config["attacks"][0], "from_round": 2}]})
    entry = _settings(EXPERIMENTS["clair"], {"minilm_g02": {0: changed}}, CONFIG_ROOT)["minilm_g02"]
    assert list(entry["differs"]) == ["attacks"]


# ----------------------------------------------------------------------------- --analyse-only


def test_analyse_only_rewrites_prelort_from_its_runs_beside_other_files(tmp_path):
    # Prepare: the committed prelort folder, with its slot_scaling/ study beside the runs
    out = tmp_path / "prelort"
    shutil.copytree(RESULTS / "prelort", out)
    (out / "report.md").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent != out}
    # Execute
    assert cli_main(["reproduce", "prelort", "--analyse-only", "--out", str(out)]) == 0
    # Assert: the report describes what the runs ran (5 local steps), not the config file now (50)
    text = (out / "report.md").read_text()
    assert "4 rounds of 5 local steps" in text and "50 local steps" not in text.split("## Settings")[0]
    assert "local_steps = 5 (the config file now says 50)" in text
    assert "| alpha_over_r |" in text  # each run's lora_scaling, the default where config.json predates it
    report = json.loads((out / "report.json").read_text())
    assert report["analysis_only"] and report["settings"]["minilm_bbc"]["local_steps"] == 5
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent != out} == before  # ran nothing


def test_analyse_only_without_runs_says_not_run_yet_and_refuses_a_run_folder(tmp_path):
    report = analyse("hafl", out=tmp_path / "new", log=lambda m: None)
    assert {c["verdict"] for c in report["claims"]} == {"not run yet"}
    assert "6 rounds of 5 local steps" in report["differences"]  # from the config files, said so per config
    assert report["settings"]["freezing"]["source"] == "config file (no runs)"
    with pytest.raises(ConfigError, match="is a run's folder"):
        run = tmp_path / "hafl" / "freezing"
        shutil.copytree(RESULTS / "hafl" / "freezing" / "seed0", run / "seed0")
        (run / "seed0" / "report.json").write_text("{}")
        analyse("hafl", out=run / "seed0", log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds files"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        analyse("hafl", out=tmp_path / "other", log=lambda m: None)
    assert cli_main(["reproduce", "hafl", "--analyse-only", "--seeds", "3", "--out", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------- the committed reports


@pytest.mark.parametrize("name", NAMES)
def test_committed_reports_equal_a_reanalysis_of_the_committed_runs(tmp_path, name):
    out = tmp_path / name
    shutil.copytree(RESULTS / name, out)
    report = analyse(name, out=out, log=lambda m: None)
    committed = json.loads((RESULTS / name / "report.json").read_text())
    fresh = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in committed.items() if k != "out"} == {k: v for k, v in fresh.items() if k != "out"}
    assert (RESULTS / name / "report.md").read_text() == (out / "report.md").read_text()
    assert [c["verdict"] for c in committed["claims"]] == [c["verdict"] for c in report["claims"]]


def test_the_reports_name_the_choices_the_tune_could_not_separate():
    # the committed clair and hafl reports list the ties their tuned files record, per config
    clair = json.loads((RESULTS / "clair" / "report.json").read_text())["settings"]
    hafl = json.loads((RESULTS / "hafl" / "report.json").read_text())["settings"]
    assert clair["copy_g01"]["ties"] == {"clair": "lr = 0.005, tied with 0.015 (from copy_g0)",
                                         "local": "lr = 0.015, tied with 0.005"}
    assert hafl["freezing_constant"]["ties"] == {"fedit": "lr = 0.045, tied with 0.015"}
    assert "ties" not in hafl["freezing"]
    report = (RESULTS / "hafl" / "report.md").read_text()
    assert "- `truncation`: hafl lr = 0.015, tied with 0.005" in report and "- `truncation_constant`" not in report


def _readme_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Do the papers' claims hold?", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row] for row in rows]


def test_the_readme_table_states_the_committed_verdicts():
    # every claim of every committed report has a README row with its exact claim text and its verdict first
    rows = _readme_rows()
    header = "| experiment | claim | paper | ours (3, 5 or 6 seeds) | verdict | why, where it does not hold |"
    assert header in (ROOT / "README.md").read_text()
    by_claim = {}
    for row in rows:
        by_claim.setdefault(row[1], []).append(row)
    missing, wrong = [], []
    for name in NAMES:
        for claim in json.loads((RESULTS / name / "report.json").read_text())["claims"]:
            found = by_claim.get(claim["claim"])
            if not found:
                missing.append(claim["claim"])
            elif not all(r[4].startswith(claim["verdict"]) for r in found):
                wrong.append((claim["claim"], [r[4] for r in found], claim["verdict"]))
    assert not missing and not wrong, (missing, wrong)
    assert len(rows) == sum(len(json.loads((RESULTS / n / "report.json").read_text())["claims"]) for n in NAMES)


def test_the_readme_rows_are_read_as_a_table():
    # the reader of the README test reads today's table (so the xfail above fails on content, not on parsing)
    rows = _readme_rows()
    assert len(rows) >= 18 and all(len(r) == 6 for r in rows)
    assert reproduce_run.CONFIG_ROOT == CONFIG_ROOT



def test_byun_lee_drop_claims_need_a_high_rank_client_that_learnt():
    from lowrank_fed.llm.reproduce.papers.byun_lee import MIN_LEARNT_SEEDS, _unlearnt

    runs = {s: Run({}, {}, {"majority_accuracy": 0.25, "eval_size": 300}) for s in range(5)}
    se2 = 2 * (0.25 * 0.75 / 300) ** 0.5  # 0.05
    learnt, flat = 0.25 + se2 + 0.01, 0.25 + se2 - 0.01
    # 3 seeds above the majority class by more than 2 standard errors: testable; 2: not, naming the seeds
    assert _unlearnt(runs, {"fedit": [learnt] * 3 + [flat] * 2}) == "" and MIN_LEARNT_SEEDS == 3
    why = _unlearnt(runs, {"fedit": [learnt, flat, flat, learnt, 0.1]})
    assert "in 2 of 5 seeds (seed 0, 3)" in why and "zero-padding's" in why
    # two methods: a seed counts only where both had learnt
    both = _unlearnt(runs, {"fedit": [learnt] * 5, "replication": [learnt, learnt, flat, flat, flat]})
    assert "in 2 of 5 seeds" in both and "zero-padding's and replication's" in both
    # the committed rerun: FedIT's rank-20 client learnt before aggregation in seed 3 only
    claims = _claims("byun-lee")
    drop = claims["Zero-padding: the rank-20 client's accuracy falls after one aggregation"]
    assert drop.verdict == "not testable here" and "in 1 of 5 seeds (seed 3)" in drop.note


def test_lora_a2_margin_claim_is_gated_on_the_baselines_and_on_lora_a2_at_budget_eight():
    from lowrank_fed.llm.reproduce.papers.lora_a2 import _margin_shrinks

    learnt = 0.25 + 2 * (0.25 * 0.75 / 300) ** 0.5 + 0.01  # above a majority share of 0.25 by 2 SE on 300 examples

    def runs(baselines, lora_a2, flexlora=None):
        methods = {"fedit": baselines, "ffa": baselines, "flexlora": baselines if flexlora is None else flexlora,
                   "lora_a2": lora_a2}
        return {s: Run({m: {"final": acc + 0.01 * s, "title": m} for m, acc in methods.items()}, {},
                       {"majority_accuracy": 0.25, "eval_size": 300}) for s in range(3)}

    # every method trained at both budgets: margins +0.2 at 1 and -0.1 to +0.1 at 8, so each shrinks by 0.1 to 0.3
    (claim,) = _margin_shrinks(runs(learnt, learnt + 0.2), runs(learnt + 0.1, learnt + 0.1, flexlora=learnt + 0.2))
    assert claim.verdict == "holds"
    assert [c["differences"] for c in claim.comparisons] == [pytest.approx([0.2] * 3), pytest.approx([0.2] * 3),
                                                             pytest.approx([0.3] * 3)]
    # LoRA-A2 at chance at budget 8 (where the paper puts it below FlexLoRA): not testable, though the margins shrink
    (claim,) = _margin_shrinks(runs(learnt, learnt + 0.2), runs(learnt, 0.25))
    assert claim.verdict == "not testable here" and "budget 8: " in claim.note and "lora_a2 in 0 of 3" in claim.note
    # a baseline at chance at budget 1 gates as in the budget-1 claim
    (claim,) = _margin_shrinks(runs(0.25, learnt + 0.2), runs(learnt + 0.1, learnt + 0.1))
    assert claim.verdict == "not testable here" and "budget 1: fedit in 0 of 3" in claim.note
