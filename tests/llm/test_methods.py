"""Each method's round does what its rule says (tiny models, seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair, aggregate, redistribute, truncate  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods import (  # noqa: E402
    METHODS,
    ClientState,
    LocalPlan,
    average_extras,
    decode_pairs,
    encode_extras,
    encode_pairs,
    make_method,
    message_bytes,
)
from lowrank_fed.llm.simulation import Simulation  # noqa: E402

SHAPES = {"m0": (6, 5), "m1": (4, 7)}


def _pairs(rank, seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {m: FactorPair(torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen))
            for m, (d_out, d_in) in shapes.items()}


def _head(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"classifier.weight": torch.randn(3, 5, generator=gen), "classifier.bias": torch.randn(3, generator=gen)}


def _sim(tmp_path, **overrides):
    settings = dict(name="t", model="tiny-bert", dataset="synthetic", methods=["fedit"], clients=3, ranks=[2, 4, 8],
                    rounds=1, local_steps=2, batch_size=8, lr=0.01, eval_size=40, max_length=32, checkpoint=False)
    settings.update(overrides)
    sim = Simulation(RunConfig.from_dict(settings), tmp_path, progress=False)
    sim.setup()
    return sim


def _one_round(sim, name, **options):
    method = make_method(name, **options)
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    sent = {k: method.download(server, c.rank) for k, c in enumerate(clients)}
    new_server, new_clients, rows, _ = sim.run_round(method, server, clients, 1)
    return method, server, new_server, new_clients, rows, sent


# ----------------------------------------------------------------------------- messages


def test_messages_round_trip_and_bytes():
    pairs = _pairs(3, 0)
    msg = encode_pairs(pairs)
    msg.update(encode_extras(_head(0)))
    back = decode_pairs(msg)
    assert all(torch.equal(back[m].B, pairs[m].B) and torch.equal(back[m].A, pairs[m].A) for m in pairs)
    assert message_bytes(msg) == 4 * (3 * (6 + 5) + 3 * (4 + 7) + 15 + 3)


def test_average_extras_is_data_weighted_mean():
    a, b = _head(0), _head(1)
    avg = average_extras([a, b], [1, 3])
    torch.testing.assert_close(avg["classifier.bias"], 0.25 * a["classifier.bias"] + 0.75 * b["classifier.bias"])


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="Unknown method 'nope'; expected one of"):
        make_method("nope")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['beta'\] for method 'hetlora'"):
        make_method("hetlora", beta=1)


# ----------------------------------------------------------------------------- server rules at the message level


@pytest.mark.parametrize("name,rule,options", [
    ("fedit", "zero_pad", {}),
    ("hetlora", "zero_pad", {"weighting": "frobenius"}),
    ("replication", "replication", {}),
    ("flexlora", "svd", {}),
])
def test_server_rule_is_the_core_rule(name, rule, options):
    # Prepare: three clients of ranks 2, 3, 4 against a rank-4 global
    method = make_method(name)
    server = method.init_server(_pairs(4, 9), _head(9))
    ups = [_pairs(r, 10 + r) for r in (2, 3, 4)]
    heads = [_head(20 + r) for r in (2, 3, 4)]
    uploads = [{**encode_pairs(p), **encode_extras(h)} for p, h in zip(ups, heads, strict=True)]
    weights = [5, 1, 2]
    # Execute
    new = method.aggregate(server, uploads, weights)
    # Assert
    for m in SHAPES:
        expected = aggregate(rule, [u[m] for u in ups], weights, **options)
        torch.testing.assert_close(new.pairs[m].B, expected.B)
        torch.testing.assert_close(new.pairs[m].A, expected.A)
    torch.testing.assert_close(new.extras["classifier.weight"], average_extras(heads, weights)["classifier.weight"])
    assert new.round == 1


def test_fedit_equal_ranks_is_fedavg():
    method = make_method("fedit")
    server = method.init_server(_pairs(3, 0), {})
    ups = [_pairs(3, s) for s in (1, 2, 3)]
    new = method.aggregate(server, [encode_pairs(p) for p in ups], [1, 2, 3])
    for m in SHAPES:
        expected = aggregate("fedavg", [u[m] for u in ups], [1, 2, 3])
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, expected.B @ expected.A)


def test_prefix_methods_keep_slots_no_participant_holds():
    method = make_method("fedit")
    server = method.init_server(_pairs(6, 0), {})
    new = method.aggregate(server, [encode_pairs(_pairs(2, 1))], [1])
    for m in SHAPES:
        assert new.pairs[m].rank == 6
        assert torch.equal(new.pairs[m].B[:, 2:], server.pairs[m].B[:, 2:])


def test_prelort_uses_segment_with_previous():
    method = make_method("prelort")
    server = method.init_server(_pairs(6, 0), {})
    ups = [_pairs(2, 1), _pairs(4, 2)]
    new = method.aggregate(server, [encode_pairs(p) for p in ups], [1, 1])
    for m in SHAPES:
        expected = aggregate("segment", [u[m] for u in ups], [1, 1], previous=server.pairs[m])
        assert torch.equal(new.pairs[m].B, expected.B) and torch.equal(new.pairs[m].A, expected.A)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "rank", "keys", "extra"])
def test_check_upload_rejects_bad_updates(kind):
    method = make_method("fedit")
    server = method.init_server(_pairs(4, 0), _head(0))
    upload = {**encode_pairs(_pairs(4, 1)), **encode_extras(_head(1))}
    key = "lora/m0/B"
    if kind == "nan":
        upload[key] = upload[key].clone()
        upload[key][0, 0] = float("nan")
        match = "lora/m0/B: 1 non-finite entries"
    elif kind == "inf":
        upload[key] = upload[key].clone()
        upload[key][1, 1] = float("inf")
        match = "non-finite"
    elif kind == "shape":
        upload[key] = torch.zeros(5, 4)
        match = r"Module 'm0': B has shape \(5, 4\); expected \(6, 4\)"
    elif kind == "rank":
        upload = {**encode_pairs(_pairs(3, 1)), **encode_extras(_head(1))}
        match = r"upload rank 3; expected in \[4, 4\]"
    elif kind == "keys":
        del upload["lora/m1/A"]
        match = "missing keys"
    else:
        upload["extra/classifier.bias"] = torch.zeros(4)
        match = r"Extra 'classifier.bias': shape \(4,\); expected \(3,\)"
    with pytest.raises(ValueError, match=match):
        method.check_upload(server, upload, 4)


# ----------------------------------------------------------------------------- client policies through a real round


def test_fedit_round_aggregates_what_clients_sent(tmp_path):
    sim = _sim(tmp_path)
    method, server, new, clients, rows, sent = _one_round(sim, "fedit")
    assert [r["rank"] for r in rows] == [2, 4, 8]
    for k, c in enumerate(clients):  # downloads are prefixes of the global (init) pair
        got = decode_pairs(sent[k])
        for m, pair in got.items():
            assert torch.equal(pair.A, truncate(server.pairs[m], c.rank).A)
    assert all(new.pairs[m].rank == 8 for m in new.pairs)
    assert any(float(new.pairs[m].B.abs().sum()) > 0 for m in new.pairs)


def test_ffa_never_changes_A(tmp_path):
    sim = _sim(tmp_path, rounds=2)
    method = make_method("ffa")
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    for t in (1, 2):
        server, clients, rows, _ = sim.run_round(method, server, clients, t)
    for m, pair in server.pairs.items():
        assert torch.equal(pair.A, sim.init[m].A)
        assert float(pair.B.abs().sum()) > 0
    upload_keys = {k for k in method.client_finish(LocalPlan(sim.init, {}, 8), sim.init, {}, clients[2])[0]}
    assert upload_keys and all(k.endswith("/B") for k in upload_keys)
    # the trainer froze A: a client's extracted A is its download
    plan = method.client_start(method.download(server, 4), clients[1], shapes=sim.ws.shapes, generator=torch.Generator())
    assert plan.train_A is False and plan.train_B is True


def test_fedsa_keeps_B_and_head_local(tmp_path):
    sim = _sim(tmp_path)
    method, server, new, clients, rows, sent = _one_round(sim, "fedsa")
    for k, msg in sent.items():  # the server sends only A: no B, no head
        assert msg and all(key.endswith("/A") for key in msg)
    for m, pair in new.pairs.items():  # the server holds no B
        assert float(pair.B.abs().sum()) == 0
    for c in clients:  # each client kept a trained B and its own head
        assert any(float(v.abs().sum()) > 0 for key, v in c.arrays.items() if key.startswith("B/"))
        assert any(key.startswith("extra/") for key in c.arrays)
    heads = [c.arrays["extra/classifier.weight"] for c in clients]
    assert not torch.equal(heads[0], heads[1])
    # personalised model: own B, global A prefix, own head
    pairs, extras, _ = method.personal_model(new, clients[0])
    m = next(iter(pairs))
    assert torch.equal(pairs[m].B, clients[0].arrays[f"B/{m}"])
    assert torch.equal(pairs[m].A, truncate(new.pairs[m], clients[0].rank).A)


def test_flora_merged_base_is_base_plus_stacked_product(tmp_path):
    sim = _sim(tmp_path)
    method = make_method("flora")
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    captured = []
    original = method.aggregate

    def spy(server_, uploads, weights):
        captured.append((uploads, weights))
        return original(server_, uploads, weights)

    method.aggregate = spy
    s1, clients, _, _ = sim.run_round(method, server, clients, 1)
    s2, clients, _, _ = sim.run_round(method, s1, clients, 2)
    for m in sim.ws.shapes:
        expected = 0
        for uploads, weights in captured:
            p = np.asarray(weights, dtype=float) / np.sum(weights)
            expected = expected + sum(pk * (u[f"lora/{m}/B"] @ u[f"lora/{m}/A"]) for pk, u in zip(p, uploads, strict=True))
            stacked = aggregate("stack", [decode_pairs(u)[m] for u in uploads], weights)
            assert stacked.rank == sum(sim.ranks)
        torch.testing.assert_close(s2.base[m], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2.merge[m].B @ s2.merge[m].A, s2.base[m] - s1.base[m], rtol=1e-5, atol=1e-6)
    # the model's frozen weights are W0 + base while the method runs; fresh adapters start from B = 0
    from lowrank_fed.llm.peft_bridge import lora_layers

    sim.ws.set_base(s2.base)
    m = next(iter(sim.ws.shapes))
    torch.testing.assert_close(lora_layers(sim.ws.peft)[m].get_base_layer().weight, sim.ws._W0[m] + s2.base[m])
    plan = method.client_start(method.download(s2, 4), clients[1], shapes=sim.ws.shapes, generator=torch.Generator())
    assert all(float(p.B.abs().sum()) == 0 and p.rank == 4 for p in plan.pairs.values())
    assert set(plan.merge) == set(sim.ws.shapes)
    sim.ws.set_base(None)


def test_flexlora_clients_receive_best_rank_r_approximation(tmp_path):
    sim = _sim(tmp_path, rounds=2)
    method = make_method("flexlora")
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    first = decode_pairs(method.download(server, 4))  # round 1: the shared init's prefix
    assert all(torch.equal(first[m].A, sim.init[m].A[:4]) for m in first)
    server, clients, _, _ = sim.run_round(method, server, clients, 1)
    for r in (2, 4):
        got = decode_pairs(method.download(server, r))
        for m, glob in server.pairs.items():
            dense = (glob.B @ glob.A).double()
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            approx = (got[m].B @ got[m].A).double()
            assert got[m].rank == r
            torch.testing.assert_close(approx, best, rtol=1e-4, atol=1e-5)
            err = float(torch.linalg.matrix_norm(dense - approx) ** 2)
            assert math.isclose(err, float((S[r:] ** 2).sum()), rel_tol=1e-3, abs_tol=1e-8)
            assert torch.equal(got[m].B, redistribute(glob, r, method="svd").B)


def test_hetlora_regulariser_and_self_pruning(tmp_path):
    # Prepare: a strong tail regulariser so the tail product falls in round 2
    sim = _sim(tmp_path, rounds=2, ranks=[4, 4, 8], local_steps=4)
    method = make_method("hetlora", lam=5.0)
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    # Execute
    server, clients, rows1, _ = sim.run_round(method, server, clients, 1)
    server, clients, rows2, _ = sim.run_round(method, server, clients, 2)
    # Assert: round 1 starts from B = 0 (tail 0, cannot fall); round 2 prunes r -> floor(0.99 r)
    assert [c.rank for c in clients] == [3, 3, 7]
    assert [r.get("new_rank") for r in rows2] == [3, 3, 7]
    assert all(not r["dropped"] for r in rows2)
    assert all(p.rank == 8 for p in server.pairs.values())  # the global keeps r_max slots


def test_hetlora_prunes_only_when_the_tail_falls():
    method = make_method("hetlora", r_min=2)
    pairs = _pairs(4, 0)
    plan = method.client_start(encode_pairs(pairs), ClientState(4), shapes=SHAPES, generator=torch.Generator())
    assert plan.info["t"] == 3
    shrunk = {m: FactorPair(torch.cat([p.B[:, :3], 0.5 * p.B[:, 3:]], 1), p.A) for m, p in pairs.items()}
    grown = {m: FactorPair(torch.cat([p.B[:, :3], 2.0 * p.B[:, 3:]], 1), p.A) for m, p in pairs.items()}
    up, c = method.client_finish(plan, shrunk, {}, ClientState(4))
    assert c.rank == 3 and up["lora/m0/B"].shape == (6, 3) and c.info["pruned"] == 1
    up, c = method.client_finish(plan, grown, {}, ClientState(4))
    assert c.rank == 4 and up["lora/m0/B"].shape == (6, 4)
    # r_min bounds the pruning
    plan2 = method.client_start(encode_pairs(_pairs(2, 0)), ClientState(2), shapes=SHAPES, generator=torch.Generator())
    small = {m: FactorPair(0.1 * p.B, p.A) for m, p in _pairs(2, 0).items()}
    _, c = method.client_finish(plan2, small, {}, ClientState(2))
    assert c.rank == 2
    # the regulariser has a gradient on live tensors
    live = {m: FactorPair(p.B.clone().requires_grad_(True), p.A.clone().requires_grad_(True)) for m, p in pairs.items()}
    plan.regularizer(live).backward()
    assert all(float(p.B.grad[:, 3:].abs().sum()) > 0 and float(p.B.grad[:, :3].abs().sum()) == 0 for p in live.values())


def test_every_method_runs_a_round(tmp_path):
    sim = _sim(tmp_path)
    for name in sorted(METHODS):
        method, server, new, clients, rows, _ = _one_round(sim, name)
        assert new.round == 1 and not any(r["dropped"] for r in rows)
        for pair in new.pairs.values():
            assert bool(torch.isfinite(pair.B).all() and torch.isfinite(pair.A).all())
        res = sim.evaluate(method, new, clients)
        assert 0.0 <= res["accuracy"] <= 1.0
