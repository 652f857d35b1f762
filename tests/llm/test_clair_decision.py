"""CLAIR's decision in the federated loop: the threshold option, per-round detection metrics, the head, the reference.

- ``threshold`` (``"gap"`` by default, or a number; the older ``z_threshold`` still sets a number) reaches
  :func:`~lowrank_fed.llm.methods.clair.flag_clients` and the round's detection info;
- every CLAIR, reference and oracle round row carries the truth-scored metrics (precision, recall,
  false-flag rate, AUC of the scores), AUC checked on a constructed round;
- a flagged client's head never enters the global head; the reference ``clair_nodetect`` flags nobody and
  is CLAIR's refinement over everyone.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import Attack, ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.protocol import decode_pairs  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, detection_auc, run_experiment  # noqa: E402
from tests.llm.helpers import tiny_settings  # noqa: E402
from tests.llm.test_clair_run import WIDE, _dense, _federation  # noqa: E402


def test_threshold_option_defaults_to_gap_and_z_threshold_still_sets_a_number():
    assert make_method("clair").options.decision == "gap"
    assert make_method("clair", threshold=1.25).options.decision == 1.25
    assert make_method("clair", z_threshold=3).options.decision == 3.0  # the former key: the former cut
    with pytest.raises(ValueError, match="not both"):
        make_method("clair", threshold=2.0, z_threshold=3.0)
    with pytest.raises(ValueError, match="threshold"):
        make_method("clair", threshold="calibrated")


def test_threshold_in_a_config_table_and_a_bad_one_is_a_config_error():
    cfg = RunConfig.from_dict(tiny_settings(methods=["clair"], clair={"threshold": 1.1}))
    assert cfg.method_options["clair"]["threshold"] == 1.1
    with pytest.raises(ConfigError, match="threshold"):
        RunConfig.from_dict(tiny_settings(methods=["clair"], clair={"threshold": "median"}))
    with pytest.raises(ConfigError, match="threshold"):
        RunConfig.from_dict(tiny_settings(methods=["clair"], clair={"threshold": -1.0}))


@pytest.mark.parametrize("options", [{}, {"threshold": 3.0}, {"z_threshold": 3.0}])
def test_the_decision_flags_the_planted_attacker_and_reports_its_rule(options):
    server, replies = _federation()
    after = make_method("clair", lam="default", rank=2, **options).aggregate(server, replies)
    det = after.info["detection"]
    assert det["flagged"] == [6]
    assert det["threshold"] == (options.get("threshold", options.get("z_threshold", "gap")))
    # per module: the z-scores whose mean is the client's score, and the residuals they standardise
    assert det["modules"] == list(WIDE)
    for k, row in det["module_scores"].items():
        assert len(row) == len(det["module_residuals"][k]) == len(WIDE)
        assert np.mean(row) == pytest.approx(det["scores"][k], abs=1e-5)
    assert min(det["module_residuals"]["6"]) > max(max(r) for k, r in det["module_residuals"].items() if k != "6")


@pytest.mark.parametrize("keep", [True, False])
def test_keep_flags_keeps_a_caught_client_out_in_later_rounds(keep):
    # Prepare: round 1 flags the attacker (6); in round 2 every client, 6 included, uploads a benign-looking adapter
    server, replies = _federation()
    method = make_method("clair", lam="default", rank=2, keep_flags=keep)
    after = method.aggregate(server, replies)
    _, later = _federation(n_benign=7, seed=1)
    del later[7]  # its attacker: clients 0-6 are all in the shared column space now
    # Execute
    again = method.aggregate(after, later)
    det = again.info["detection"]
    # Assert: with keep_flags client 6 stays flagged (and out of the head); without, round 2 decides afresh
    assert after.info["detection"]["flagged"] == [6]
    n = np.array([10.0 + k for k in range(7)])
    if keep:
        assert det["flagged"] == det["kept"] == det["flagged_so_far"] == [6]
        assert float(again.extras["w"][0]) == pytest.approx(float(np.sum(n[:6] * np.arange(6)) / n[:6].sum()), rel=1e-6)
        assert len(det["module_scores"]["6"]) == len(WIDE)  # still scored and recorded
    else:
        assert det["flagged"] == [] and "kept" not in det
        assert float(again.extras["w"][0]) == pytest.approx(float(np.sum(n * np.arange(7)) / n.sum()), rel=1e-6)


def test_a_flagged_clients_head_and_update_never_reach_the_global_state():
    server, replies = _federation()  # the attacker (6) uploads head w = 6, the benign ones w = k
    after = make_method("clair", lam="default", rank=2).aggregate(server, replies)
    assert after.info["detection"]["flagged"] == [6]
    n = np.array([10.0 + k for k in range(6)])
    assert float(after.extras["w"][0]) == pytest.approx(float(np.sum(n * np.arange(6)) / n.sum()), rel=1e-6)  # float32 head
    # the same round without the attacker gives the same global state: nothing of client 6 is in it
    server2, replies2 = _federation()
    del replies2[6]
    alone = make_method("clair", lam="default", rank=2, threshold=1e9).aggregate(server2, replies2)
    for m in WIDE:
        np.testing.assert_allclose(_dense(after.pairs[m]), _dense(alone.pairs[m]), atol=1e-10)
    assert torch.equal(after.extras["w"], alone.extras["w"])


def test_the_reference_without_detection_refines_over_everyone():
    server, replies = _federation()
    after = make_method("clair_nodetect", rank=2).aggregate(server, replies)
    assert after.info["detection"]["flagged"] == []
    n = np.array([10.0 + k for k in range(7)])
    pi = n / n.sum()
    assert float(after.extras["w"][0]) == pytest.approx(float(np.sum(pi * np.arange(7))), rel=1e-6)  # every head (float32)
    for m in WIDE:
        thetas = [_dense(decode_pairs(replies[k].arrays)[m]) for k in range(7)]
        mean = sum(p * t for p, t in zip(pi, thetas, strict=True))
        U_, s_, Vh_ = np.linalg.svd(mean)
        np.testing.assert_allclose(_dense(after.pairs[m]), (U_[:, :2] * s_[:2]) @ Vh_[:2], atol=1e-8)
        U = np.linalg.svd(np.hstack(thetas))[0][:, :2]  # the subspace of everyone's stack
        P = U @ U.T
        refined = P @ thetas[3] + (np.eye(P.shape[0]) - P) @ mean
        Ur, sr, Vr = np.linalg.svd(refined)
        down = decode_pairs(make_method("clair_nodetect", rank=2).configure(after, 3).arrays)[m]
        np.testing.assert_allclose(_dense(down), (Ur[:, :2] * sr[:2]) @ Vr[:2], atol=1e-9 * np.linalg.norm(refined))


def test_score_detection_on_a_constructed_round():
    fake = SimpleNamespace(attackers={1: Attack(kind="random", clients=[1]), 3: Attack(kind="random", clients=[3])})
    det = {"flagged": [1, 2], "scores": {"0": 0.1, "1": 5.0, "2": 2.0, "3": 1.0, "4": -1.0}, "round": 1, "lam": [1, 1]}
    out = Simulation.score_detection(fake, det, [0, 1, 2, 3, 4], 1)
    # attackers 5.0 and 1.0 against benign 0.1, 2.0, -1.0: 5.0 beats all 3, 1.0 beats 2 of 3
    assert out["auc"] == pytest.approx(5 / 6)
    assert out["precision"] == 0.5 and out["recall"] == 0.5 and out["false_flag_rate"] == pytest.approx(1 / 3)
    assert out["contaminated"] == [1, 3] and out["lam"] == [1, 1] and "round" not in out
    assert detection_auc(det["scores"], [1], [0, 2]) == 1.0
    # an attack from round 2 (from_round): its client counts benign in round 1
    late = SimpleNamespace(attackers={**fake.attackers, 1: Attack(kind="random", clients=[1], from_round=2)})
    assert Simulation.score_detection(late, det, [0, 1, 2, 3, 4], 1)["contaminated"] == [3]
    assert Simulation.score_detection(late, det, [0, 1, 2, 3, 4], 2)["contaminated"] == [1, 3]
    assert detection_auc({"0": 1.0, "1": 1.0}, [1], [0]) == 0.5  # ties count a half
    no_truth = Simulation.score_detection(SimpleNamespace(attackers={}), det, [0, 1, 2, 3, 4], 1)
    assert no_truth["auc"] is None and no_truth["recall"] is None and no_truth["false_flag_rate"] == 0.4


def test_every_round_row_carries_the_detection_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig.from_dict(tiny_settings(methods=["clair", "clair_nodetect", "oracle"], clients=5, ranks=2, rounds=2,
                                            local_steps=2, val_size=16, eval_size=40,
                                            attacks=[{"kind": "random", "clients": [1], "scale": 3.0}]))
    run_experiment(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = set()
    for row in rows:
        if row["round"] == 0:
            continue
        det = row["detection"]
        seen.add(row["method"])
        assert {"precision", "recall", "false_flag_rate", "auc", "flagged", "contaminated"} <= set(det)
        assert det["contaminated"] == [1]
        if row["method"] == "clair":
            benign = [k for k in range(5) if k != 1]
            assert det["auc"] == detection_auc(det["scores"], [1], benign)
            assert det["threshold"] == "gap"
        else:  # the oracle is told the truth; the reference flags nobody; neither has scores
            assert det["auc"] is None
            assert det["false_flag_rate"] == 0.0
            assert det["recall"] == (1.0 if row["method"] == "oracle" else 0.0)
    assert seen == {"clair", "clair_nodetect", "oracle"}
