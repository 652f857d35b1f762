"""Contaminated clients in the runner (``[[attacks]]``) and CLAIR as a server of the federated loop.

Properties, not code paths: each update attack does to the product what its equation says; data attacks
change exactly the attackers' rows; a planted contaminated client is flagged and left out of the benign
mean and the head; a benign client's download is ``P Theta_k + (I - P) mean_G Theta_j`` at its rank (checked
against a dense SVD by hand); attacks replay identically after ``--resume``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.attacks import attack_reply, choose_attackers, poison_dataset  # noqa: E402
from lowrank_fed.llm.config import Attack, ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.data import TextDataset  # noqa: E402
from lowrank_fed.llm.methods import ServerState, make_method  # noqa: E402
from lowrank_fed.llm.protocol import Message, decode_pairs, encode_extras, encode_pairs  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import SHAPES, head, kill_and_resume, pairs, tiny_settings  # noqa: E402


def _dense(p: FactorPair) -> np.ndarray:
    return (p.B.double() @ p.A.double()).numpy()


def _reply(seed, rank=3):
    arrays = encode_pairs(pairs(rank, seed))
    arrays.update(encode_extras(head(seed)))
    arrays["slots/m0"] = torch.arange(rank)
    return Message(arrays, {"rank": rank, "num_examples": 10, "client": 0, "round": 1}, {"train_loss": 1.0})


# ----------------------------------------------------------------------------- update attacks
@pytest.mark.parametrize("kind, factor", [("scaled", 5.0), ("sign_flip", -1.0)])
def test_scaled_and_sign_flip_multiply_the_product(kind, factor):
    reply = _reply(0)
    out = attack_reply(reply, Attack(kind=kind, clients=[0]), seed=0, round_=1, client=0)
    honest, attacked = decode_pairs(reply.arrays), decode_pairs(out.arrays)
    for m in SHAPES:
        np.testing.assert_allclose(_dense(attacked[m]), factor * _dense(honest[m]), rtol=1e-6)
    assert torch.equal(out.arrays["slots/m0"], reply.arrays["slots/m0"])  # indices untouched
    assert all(torch.equal(out.arrays[k], reply.arrays[k]) for k in encode_extras(head(0)))  # honest head


def test_random_attack_keeps_the_norm_ratio_and_differs_per_client():
    reply = _reply(0)
    a = attack_reply(reply, Attack(kind="random", clients=[0], scale=2.0), seed=0, round_=1, client=0)
    b = attack_reply(reply, Attack(kind="random", clients=[0], scale=2.0), seed=0, round_=1, client=1)
    again = attack_reply(reply, Attack(kind="random", clients=[0], scale=2.0), seed=0, round_=1, client=0)
    honest = decode_pairs(reply.arrays)
    for m in SHAPES:
        pa, pb = decode_pairs(a.arrays)[m], decode_pairs(b.arrays)[m]
        assert np.linalg.norm(_dense(pa)) == pytest.approx(2.0 * np.linalg.norm(_dense(honest[m])), rel=1e-5)
        assert float(pa.A.norm()) == pytest.approx(float(honest[m].A.norm()), rel=1e-5)
        cos = np.sum(_dense(pa) * _dense(pb)) / (np.linalg.norm(_dense(pa)) * np.linalg.norm(_dense(pb)))
        assert abs(cos) < 0.9  # independent directions
    assert all(torch.equal(a.arrays[k], again.arrays[k]) for k in a.arrays)  # seeded: replays identically


def test_coordinated_attackers_send_one_direction():
    one, two = _reply(0), _reply(1)
    a = attack_reply(one, Attack(kind="coordinated", fraction=0.2), seed=3, round_=2, client=0)
    b = attack_reply(two, Attack(kind="coordinated", fraction=0.2), seed=3, round_=2, client=5)
    for m in SHAPES:
        da, db = _dense(decode_pairs(a.arrays)[m]), _dense(decode_pairs(b.arrays)[m])
        cos = np.sum(da * db) / (np.linalg.norm(da) * np.linalg.norm(db))
        assert cos == pytest.approx(1.0, abs=1e-6)
        assert np.linalg.norm(da) == pytest.approx(np.linalg.norm(_dense(decode_pairs(one.arrays)[m])), rel=1e-5)


def test_single_factor_and_delta_uploads_are_attacked_too():
    reply = Message({"delta/m0/B": torch.ones(4, 2), "slots/m0": torch.tensor([0, 3])}, {"rank": 2}, {})
    out = attack_reply(reply, Attack(kind="random", clients=[0], scale=3.0), seed=0, round_=1, client=0)
    assert float(out.arrays["delta/m0/B"].norm()) == pytest.approx(3.0 * float(reply.arrays["delta/m0/B"].norm()), rel=1e-5)
    flipped = attack_reply(reply, Attack(kind="sign_flip", clients=[0]), seed=0, round_=1, client=0)
    assert torch.equal(flipped.arrays["delta/m0/B"], -reply.arrays["delta/m0/B"])


# ----------------------------------------------------------------------------- who, and data attacks
def test_attackers_are_chosen_from_the_seed_and_disjoint():
    attacks = [Attack(kind="label_flip", clients=[4]), Attack(kind="random", fraction=0.3)]
    chosen = choose_attackers(attacks, 10, seed=1)
    assert chosen[4].kind == "label_flip"
    assert sum(a.kind == "random" for a in chosen.values()) == 3 and len(chosen) == 4
    assert chosen == choose_attackers(attacks, 10, seed=1)
    assert len({frozenset(choose_attackers(attacks, 10, seed=s)) for s in range(6)}) > 1  # the seed draws them
    assert sorted(choose_attackers([Attack(kind="random", fraction=0.01)], 10, seed=0)) != []  # at least one


@pytest.mark.parametrize("attacks, key, expected", [
    ([{"kind": "random"}], "attacks[0]", "exactly one of 'fraction' and 'clients'"),
    ([{"kind": "random", "fraction": 0.2, "clients": [1]}], "attacks[0]", "exactly one"),
    ([{"kind": "random", "clients": [3]}], "attacks[0].clients[0]", "[0, clients) = [0, 3)"),
    ([{"kind": "random", "clients": [1]}, {"kind": "scaled", "clients": [1]}], "attacks[1].clients[0]",
     "not already contaminated"),
    ([{"kind": "random", "fraction": 0.9}], "attacks", "fewer contaminated clients than clients = 3"),
    ([{"kind": "poison"}], "attacks[0].kind", "'label_flip'"),
    ([{"kind": "random", "fraction": 1.5}], "attacks[0].fraction", "a value < 1.0"),
    ([{"kind": "label_flip", "clients": [1], "from_round": 2}], "attacks[0].from_round", "[1, rounds] = [1, 1]"),
])
def test_bad_attacks_are_config_errors(attacks, key, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(tiny_settings(attacks=attacks))
    text = str(err.value)
    assert f"'{key}'" in text and expected in text, text


def test_data_attacks_change_exactly_the_attackers_rows():
    texts = [" ".join(["w"] * (i % 7 + 1)) for i in range(40)]
    train = TextDataset(texts, np.arange(40) % 4, ["a", "b", "c", "d"])
    parts = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30), np.arange(30, 40)]
    attackers = choose_attackers([Attack(kind="label_flip", clients=[1]), Attack(kind="shuffle_targets", clients=[2]),
                                  Attack(kind="other_task", clients=[3])], 4, seed=0)
    out = poison_dataset(train, parts, attackers, seed=0)
    np.testing.assert_array_equal(out.labels[:10], train.labels[:10])  # benign rows unchanged
    np.testing.assert_array_equal(out.labels[10:20], (train.labels[10:20] + 1) % 4)
    assert sorted(out.labels[20:30]) == sorted(train.labels[20:30])  # a permutation of its own labels
    lengths = np.array([len(t.split()) for t in texts[30:]])
    assert all(np.diff(out.labels[30:][np.argsort(lengths, kind="stable")]) >= 0)  # longer text, higher class
    np.testing.assert_array_equal(train.labels, np.arange(40) % 4)  # the input is not changed


def test_label_flip_on_a_generation_task_is_refused_before_anything_is_written(tmp_path):
    cfg = RunConfig.from_dict(tiny_settings(model="tiny-llama", dataset="copy", attacks=[{"kind": "label_flip", "clients": [0]}]))
    with pytest.raises(ConfigError, match="'attacks'.*label_flip.*classification"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- CLAIR's server
WIDE = {"m0": (24, 9), "m1": (16, 11)}


def _federation(n_benign=6, rank=2, seed=0):
    """Benign adapters in one shared column space U (rank 2) plus small noise; one random attacker (id 6)."""
    gen = torch.Generator().manual_seed(seed)
    U = {m: torch.linalg.qr(torch.randn(d_out, 2, generator=gen, dtype=torch.float64))[0] for m, (d_out, _) in WIDE.items()}
    replies = {}
    for k in range(n_benign + 1):
        arrays = {}
        for m, (d_out, d_in) in WIDE.items():
            if k < n_benign:
                B = U[m] @ torch.randn(2, rank, generator=gen, dtype=torch.float64) + 1e-3 * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
            else:
                B = 3.0 * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
            arrays[f"lora/{m}/B"] = B
            arrays[f"lora/{m}/A"] = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
        arrays.update(encode_extras({"w": torch.full((2,), float(k))}))
        replies[k] = Message(arrays, {"rank": rank, "num_examples": 10 + k, "client": k, "round": 1})
    init = {m: FactorPair(torch.zeros(d_out, rank, dtype=torch.float64), torch.zeros(rank, d_in, dtype=torch.float64))
            for m, (d_out, d_in) in WIDE.items()}
    server = ServerState(0, init, {"w": torch.zeros(2)}, dict(WIDE), {k: rank for k in replies})
    return server, replies


def test_clair_flags_a_planted_attacker_and_refines_benign_downloads():
    server, replies = _federation()
    method = make_method("clair", lam="default", rank=2)
    after = method.aggregate(server, replies)
    det = after.info["detection"]
    assert det["flagged"] == [6]
    n = np.array([10.0 + k for k in range(6)])
    pi = n / n.sum()
    # the head: data-weighted over the benign clients only
    assert float(after.extras["w"][0]) == pytest.approx(float(np.sum(pi * np.arange(6))), rel=1e-6)
    for m in WIDE:
        thetas = [_dense(decode_pairs(replies[k].arrays)[m]) for k in range(7)]
        mean = sum(p * t for p, t in zip(pi, thetas[:6], strict=True))
        # the global: the best rank-r_max approximation of the benign mean (the attacker left out)
        U_, s_, Vh_ = np.linalg.svd(mean)
        np.testing.assert_allclose(_dense(after.pairs[m]), (U_[:, :2] * s_[:2]) @ Vh_[:2], atol=1e-8)
        # a benign client's download: best rank-r_k approximation of P Theta_k + (I - P) mean_G
        B_u = np.linalg.svd(np.hstack(thetas[:6]))[0][:, :2]  # the subspace refitted on the benign stack
        P = B_u @ B_u.T
        k = 2
        refined = P @ thetas[k] + (np.eye(P.shape[0]) - P) @ mean
        Ur, sr, Vr = np.linalg.svd(refined)
        down = decode_pairs(method.configure(after, k).arrays)[m]
        np.testing.assert_allclose(_dense(down), (Ur[:, :2] * sr[:2]) @ Vr[:2], atol=1e-9 * np.linalg.norm(refined))
        # the flagged client gets the benign mean at its rank
        flagged = decode_pairs(method.configure(after, 6).arrays)[m]
        np.testing.assert_allclose(_dense(flagged), _dense(after.pairs[m]), atol=1e-8)


def test_clair_update_scoring_is_adapter_scoring_from_a_zero_download():
    # Prepare: round 1, every client downloaded the zero initial adapter, so its round update is its adapter
    server, replies = _federation()
    # Execute
    by_adapter = make_method("clair", lam="default", rank=2).aggregate(server, replies)
    by_update = make_method("clair", lam="default", rank=2, score="update").aggregate(server, replies)
    # Assert: the same scores, flags, global model and downloads
    assert by_update.info["detection"]["flagged"] == by_adapter.info["detection"]["flagged"] == [6]
    for k, v in by_adapter.info["detection"]["scores"].items():
        assert by_update.info["detection"]["scores"][k] == pytest.approx(v, abs=1e-5)
    for m in WIDE:
        np.testing.assert_allclose(_dense(by_update.pairs[m]), _dense(by_adapter.pairs[m]), atol=1e-8)
    for key, value in by_adapter.arrays.items():
        np.testing.assert_allclose(np.asarray(by_update.arrays[key]), np.asarray(value), atol=1e-8)


def test_clair_update_scoring_scores_upload_minus_download_and_refines_whole_adapters():
    from lowrank_fed.factors import difference
    from lowrank_fed.llm.methods.clair import _client_key, flag_clients

    # Prepare: a later round: each client was sent its own download D_k (kept by the server), and the attacker's
    # upload is its download plus a tiny step, so only its whole adapter stands out, not its round update
    server, replies = _federation()
    gen = torch.Generator().manual_seed(1)
    uploads = {k: decode_pairs(r.arrays) for k, r in replies.items()}
    for k in replies:
        for m, (d_out, d_in) in WIDE.items():
            if k == 6:
                sent = FactorPair(uploads[6][m].B, uploads[6][m].A - 0.01 * torch.randn(2, d_in, generator=gen,
                                                                                          dtype=torch.float64))
            else:
                sent = FactorPair(0.1 * torch.randn(d_out, 2, generator=gen, dtype=torch.float64),
                                  torch.randn(2, d_in, generator=gen, dtype=torch.float64))
            server.arrays[_client_key(k, m, "B")], server.arrays[_client_key(k, m, "A")] = sent.B, sent.A
    server.info["aggregated"] = True
    method = make_method("clair", lam="default", rank=2, score="update")
    ids = list(replies)
    expected = flag_clients([{m: difference(uploads[k][m], method.client_pairs(server, k)[m]) for m in WIDE}
                             for k in ids], rank=2, threshold="gap", weights=[10.0 + k for k in ids])
    # Execute
    after = method.aggregate(server, replies)
    # Assert: the scores are those of the round updates (the attacker's is benign-looking: not flagged) ...
    det = after.info["detection"]
    assert det["flagged"] == [ids[i] for i in np.flatnonzero(~expected.benign)]
    assert 6 not in det["flagged"]
    for k, z in zip(ids, expected.scores, strict=True):
        assert det["scores"][str(k)] == pytest.approx(float(z), abs=1e-5)
    # ... while the global model is the kept clients' whole adapters' mean, as with adapter scoring
    kept = [k for k in ids if k not in det["flagged"]]
    n = np.array([10.0 + k for k in kept])
    for m in WIDE:
        mean = sum((w / n.sum()) * _dense(uploads[k][m]) for w, k in zip(n, kept, strict=True))
        U_, s_, Vh_ = np.linalg.svd(mean)
        np.testing.assert_allclose(_dense(after.pairs[m]), (U_[:, :2] * s_[:2]) @ Vh_[:2], atol=1e-8)
        # a kept client's download refines its whole adapter in the subspace of the kept whole adapters
        P = (lambda U: U @ U.T)(np.linalg.svd(np.hstack([_dense(uploads[k][m]) for k in kept]))[0][:, :2])
        refined = P @ _dense(uploads[2][m]) + (np.eye(P.shape[0]) - P) @ mean
        Ur, sr, Vr = np.linalg.svd(refined)
        down = decode_pairs(method.configure(after, 2).arrays)[m]
        np.testing.assert_allclose(_dense(down), (Ur[:, :2] * sr[:2]) @ Vr[:2], atol=1e-9 * np.linalg.norm(refined))


def test_oracle_is_told_the_truth_and_averages_the_others():
    server, replies = _federation()
    server.info["contaminated"] = [6]
    after = make_method("oracle").aggregate(server, replies)
    assert after.info["detection"]["flagged"] == [6]
    n = np.array([10.0 + k for k in range(6)])
    for m in WIDE:
        mean = sum((n[k] / n.sum()) * _dense(decode_pairs(replies[k].arrays)[m]) for k in range(6))
        U_, s_, Vh_ = np.linalg.svd(mean)
        np.testing.assert_allclose(_dense(after.pairs[m]), (U_[:, :2] * s_[:2]) @ Vh_[:2], atol=1e-8)


# ----------------------------------------------------------------------------- in the runner
def _attacked(**overrides):
    settings = tiny_settings(methods=["fedit", "clair", "oracle", "local"], clients=5, ranks=[2, 2, 4, 4, 4], rounds=2,
                             local_steps=3, val_size=16, eval_size=60, checkpoint=True,
                             attacks=[{"kind": "random", "clients": [1], "scale": 3.0},
                                      {"kind": "label_flip", "fraction": 0.2}])
    settings.update(overrides)
    return RunConfig.from_dict(settings)


def test_attack_truth_and_detection_reach_the_metrics(tmp_path):
    out = tmp_path / "run"
    run_experiment(_attacked(), out, progress=False)
    setup = json.loads((out / "setup.json").read_text())
    truth = {int(k): v for k, v in setup["attackers"].items()}
    assert truth[1] == "random" and sorted(truth.values()) == ["label_flip", "random"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["round"] == 0:
            continue
        for c in row["clients"]:
            assert c.get("attack") == truth.get(c["client"])
        if row["method"] in ("clair", "oracle"):
            det = row["detection"]
            assert det["contaminated"] == sorted(truth)
            hits = len(set(det["flagged"]) & set(truth))
            assert det["recall"] == pytest.approx(hits / len(truth))
        if "accuracy" in row:
            assert "benign_local_accuracy" in row
    oracle = [r for r in rows if r["method"] == "oracle" and r["round"] > 0]
    assert all(r["detection"]["precision"] == 1.0 and r["detection"]["recall"] == 1.0 for r in oracle)
    assert "flag precision" in (out / "summary.md").read_text()


def test_local_clients_keep_training_their_own_adapter(tmp_path, monkeypatch):
    from tests.llm.helpers import make_sim, run_rounds

    sim = make_sim(tmp_path, tiny_settings(methods=["local"], rounds=2, local_steps=3))
    method = make_method("local")
    log = run_rounds(sim, method, 2, monkeypatch)
    for k, call in log[1].calls.items():
        assert call.message.arrays == {}  # nothing downloaded after the first round
        assert call.reply.arrays == {}  # nothing uploaded
        start = decode_pairs(log[0].calls[k].new_state.arrays)
        assert all(torch.equal(start[m].B, p.B) for m, p in decode_pairs(call.state.arrays).items())
        assert any(not torch.equal(start[m].B, call.trained[m].B) for m in start)  # it trained on from there
    assert log[1].after.pairs.keys() == log[0].before.pairs.keys()
    assert all(torch.equal(log[1].after.pairs[m].B, log[0].before.pairs[m].B) for m in log[0].before.pairs)


def test_attacks_replay_identically_after_resume(tmp_path):
    cfg = _attacked(methods=["clair"], rounds=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_experiment(cfg, full, progress=False)
    kill_and_resume(cfg, cut, 1)
    assert (full / "metrics.jsonl").read_bytes() == (cut / "metrics.jsonl").read_bytes()
    assert (full / "adapters" / "clair.safetensors").read_bytes() == (cut / "adapters" / "clair.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["label_flip", "random"])
def test_an_attack_from_a_later_round_is_honest_until_then(tmp_path, kind):
    # Prepare: the same run with client 1 honest throughout, and contaminated from round 2
    settings = dict(methods=["clair"], clients=4, ranks=[2, 2, 4, 4], rounds=2, local_steps=3, val_size=16,
                    eval_size=60)
    honest, late = tmp_path / "honest", tmp_path / "late"
    run_experiment(RunConfig.from_dict(tiny_settings(**settings)), honest, progress=False)
    run_experiment(RunConfig.from_dict(tiny_settings(**settings, attacks=[
        {"kind": kind, "clients": [1], "from_round": 2}])), late, progress=False)
    # Execute
    rows = {name: {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
            for name, out in (("honest", honest), ("late", late))}
    # Assert: round 1 is the honest run's, to the bit: the same training, uploads and global model
    h1, l1 = rows["honest"][1], rows["late"][1]
    assert [c["train_loss"] for c in l1["clients"]] == [c["train_loss"] for c in h1["clients"]]
    assert l1["accuracy"] == h1["accuracy"] and l1["val_accuracy"] == h1["val_accuracy"]
    assert "attack" not in l1["clients"][1] and l1["detection"]["contaminated"] == []
    # ... and from round 2 client 1 is contaminated: marked, counted in the detection's truth, and it changes
    # what the server receives (a data attack already changes the client's own training loss)
    l2, h2 = rows["late"][2], rows["honest"][2]
    assert l2["clients"][1]["attack"] == kind and l2["detection"]["contaminated"] == [1]
    assert l2["accuracy"] != h2["accuracy"] or l2["val_accuracy"] != h2["val_accuracy"] \
        or l2["detection"]["scores"] != h2["detection"]["scores"]
    if kind == "label_flip":
        assert l2["clients"][1]["train_loss"] != h2["clients"][1]["train_loss"]
