"""Each method does what its rule says: messages, server rules, client policies (tiny models, seconds)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair, aggregate, redistribute, truncate  # noqa: E402
from lowrank_fed.aggregation import keep_slots, weighted_average  # noqa: E402
from lowrank_fed.llm.client import ClientContext, TrainSettings, run_client  # noqa: E402
from lowrank_fed.llm.methods import METHODS, ClientState, ServerState, make_method  # noqa: E402
from lowrank_fed.llm.protocol import (  # noqa: E402
    Message,
    decode_extras,
    decode_pairs,
    encode_extras,
    encode_pairs,
    from_flat,
    message_bytes,
    to_flat,
)
from lowrank_fed.llm.training import TailRegulariser, tail_norm_product  # noqa: E402
from tests.llm.helpers import SHAPES, make_sim, tiny_settings  # noqa: E402
from tests.llm.helpers import head as _head  # noqa: E402
from tests.llm.helpers import nbytes as _nbytes  # noqa: E402
from tests.llm.helpers import pairs as _pairs  # noqa: E402
from tests.llm.helpers import run_rounds as _run_rounds  # noqa: E402
from tests.llm.helpers import start as _start  # noqa: E402

PREFIX_METHODS = ("fedit", "hetlora", "replication", "prelort")


def _server(name, global_pairs, ranks, extras=None, **options):
    method = make_method(name, **options)
    server = method.init_server(global_pairs, extras or {}, ranks, init_seed=0)
    return method, server


def _reply(pairs, n, *, head=None, rank=None, factors=("B", "A"), client=0, round_=1):
    arrays = encode_pairs(pairs, factors=factors)
    arrays.update(encode_extras(head or {}))
    if rank is None:
        rank = next(iter(pairs.values())).rank
    return Message(arrays, {"num_examples": n, "rank": rank, "client": client, "round": round_})


def _sim(tmp_path, **overrides):
    return make_sim(tmp_path, tiny_settings(**overrides))


def _lora_shapes(shapes, factors, rank):
    return {f"lora/{m}/{f}": ((d_out, rank) if f == "B" else (rank, d_in))
            for m, (d_out, d_in) in shapes.items() for f in factors}


def _shapes_of(arrays):
    return {k: tuple(v.shape) for k, v in arrays.items()}


def _assert_pairs_equal(got, want):
    assert set(got) == set(want)
    for m in want:
        assert torch.equal(got[m].B, want[m].B), m
        assert torch.equal(got[m].A, want[m].A), m


def _best_rank(pair, r):
    dense = (pair.B @ pair.A).double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return dense, (U[:, :r] * S[:r]) @ Vh[:r], S


# ----------------------------------------------------------------------------- messages


def test_messages_round_trip_and_bytes():
    # Prepare
    pairs, head = _pairs(3, 0), _head(0)
    message = Message({**encode_pairs(pairs), **encode_extras(head)}, {"round": 2, "rank": 3, "merges": [1]},
                      {"train_loss": 0.5})
    # Execute
    tensors, meta = to_flat(message, "c0/")
    back = from_flat(tensors, meta, "c0/")
    # Assert
    assert set(tensors) == {"c0/" + k for k in message.arrays}
    assert back.config == message.config and back.metrics == message.metrics
    _assert_pairs_equal(decode_pairs(back.arrays), pairs)
    got_head = decode_extras(back.arrays)
    assert set(got_head) == set(head) and all(torch.equal(got_head[e], head[e]) for e in head)
    expected = 4 * (3 * (6 + 5) + 3 * (4 + 7) + 15 + 3)
    assert message.nbytes == message_bytes(message.arrays) == _nbytes(message.arrays) == expected


def test_messages_reject_unpaired_factors_and_non_json_config():
    arrays = encode_pairs(_pairs(2, 0))
    del arrays["lora/m1/A"]
    with pytest.raises(ValueError, match=r"unpaired factors for modules \['m1'\]"):
        decode_pairs(arrays)
    with pytest.raises(TypeError):
        to_flat(Message({}, {"bad": torch.zeros(1)}))


def test_weighted_average_is_data_weighted_mean():
    a, b = _head(0), _head(1)
    avg = weighted_average([a["classifier.bias"], b["classifier.bias"]], [1, 3])
    torch.testing.assert_close(avg, 0.25 * a["classifier.bias"] + 0.75 * b["classifier.bias"])


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="Unknown method 'nope'; expected one of"):
        make_method("nope")
    with pytest.raises(ValueError, match=r"beta\n.*Extra inputs are not permitted"):
        make_method("hetlora", beta=1)


# ---------------------------------------------------------------------- server rules at the message level


@pytest.mark.parametrize("name,rule,options", [
    ("fedit", "zero_pad", {}),
    ("hetlora", "zero_pad", {"weighting": "frobenius"}),
    ("replication", "replication", {}),
    ("flexlora", "svd", {}),
    ("prelort", "segment", {"previous": True}),
])
def test_server_rule_is_the_core_rule(name, rule, options):
    # Prepare: three clients of ranks 2, 3, 4 against a rank-4 global
    method, server = _server(name, _pairs(4, 9), {0: 2, 1: 3, 2: 4}, _head(9))
    ups = [_pairs(r, 10 + r) for r in (2, 3, 4)]
    heads = [_head(20 + r) for r in (2, 3, 4)]
    weights = [5, 1, 2]
    replies = {k: _reply(p, n, head=h, client=k) for k, (p, h, n) in enumerate(zip(ups, heads, weights, strict=True))}
    for k, reply in replies.items():
        method.check_reply(server, k, reply)
    # Execute
    new = method.aggregate(server, replies)
    # Assert
    core_weights = None if name == "hetlora" else weights
    for m in SHAPES:
        opts = {"previous": server.pairs[m]} if options.get("previous") else options
        expected = aggregate(rule, [u[m] for u in ups], core_weights, **opts)
        torch.testing.assert_close(new.pairs[m].B, expected.B)
        torch.testing.assert_close(new.pairs[m].A, expected.A)
    for e in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(new.extras[e], weighted_average([h[e] for h in heads], weights))
    assert new.round == 1
    assert new.ranks == {0: 2, 1: 3, 2: 4}


def test_ffa_rule_is_exact_and_keeps_A():
    # Prepare: A is the shared rank-4 A; clients send only B of ranks 2 and 4
    method, server = _server("ffa", _pairs(4, 9), {0: 2, 1: 4})
    Bs = [_pairs(r, 30 + r) for r in (2, 4)]
    replies = {k: _reply(p, n, factors=("B",), client=k) for k, (p, n) in enumerate(zip(Bs, [1, 3], strict=True))}
    for k, reply in replies.items():
        method.check_reply(server, k, reply)
    # Execute
    new = method.aggregate(server, replies)
    # Assert: A unchanged; B A = sum_k p_k B_k A[:r_k] (exact)
    for m, prev in server.pairs.items():
        assert torch.equal(new.pairs[m].A, prev.A)
        product = 0.25 * Bs[0][m].B @ prev.A[:2] + 0.75 * Bs[1][m].B @ prev.A[:4]
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, product)


def test_fedsa_rule_averages_A_over_its_holders_and_holds_no_B():
    method, server = _server("fedsa", _pairs(4, 9), {0: 2, 1: 4})
    As = [_pairs(r, 40 + r) for r in (2, 4)]
    replies = {k: _reply(p, n, factors=("A",), client=k) for k, (p, n) in enumerate(zip(As, [1, 3], strict=True))}
    for k, reply in replies.items():
        method.check_reply(server, k, reply)
    new = method.aggregate(server, replies)
    for m, prev in server.pairs.items():
        clients = [FactorPair(torch.zeros(prev.B.shape[0], a[m].rank), a[m].A) for a in As]
        previous = FactorPair(torch.zeros_like(prev.B), prev.A)
        expected = aggregate("segment", clients, [1, 3], previous=previous)
        torch.testing.assert_close(new.pairs[m].A, expected.A)
        assert torch.equal(new.pairs[m].B, torch.zeros_like(prev.B))


@pytest.mark.parametrize("name", ["fedit", "replication", "prelort"])
def test_equal_ranks_reduce_to_fedavg(name):
    method, server = _server(name, _pairs(3, 0), {0: 3, 1: 3, 2: 3})
    ups = [_pairs(3, s) for s in (1, 2, 3)]
    new = method.aggregate(server, {k: _reply(p, k + 1) for k, p in enumerate(ups)})
    for m in SHAPES:
        expected = aggregate("fedavg", [u[m] for u in ups], [1, 2, 3])
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, expected.B @ expected.A)


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_slots_no_participant_held_are_kept(name):
    # Prepare: a rank-6 global; the only participant was sent rank 2
    method, server = _server(name, _pairs(6, 0), {0: 2, 1: 6})
    # Execute
    new = method.aggregate(server, {0: _reply(_pairs(2, 1), 1)})
    # Assert
    for m, prev in server.pairs.items():
        assert new.pairs[m].rank == 6
        assert torch.equal(new.pairs[m].B[:, 2:], prev.B[:, 2:])
        assert torch.equal(new.pairs[m].A[2:], prev.A[2:])
        assert not torch.equal(new.pairs[m].B[:, :2], prev.B[:, :2])


def _bad_reply(kind):
    reply = _reply(_pairs(4, 1), 10, head=_head(1))
    arrays, config = reply.arrays, reply.config
    key = "lora/m0/B"
    if kind == "nan":
        arrays[key] = arrays[key].clone()
        arrays[key][0, 0] = float("nan")
        return reply, r"lora/m0/B: 1 non-finite entries \(NaN or Inf\); expected all finite"
    if kind == "inf":
        arrays["lora/m1/A"] = arrays["lora/m1/A"].clone()
        arrays["lora/m1/A"][1, 1] = float("inf")
        arrays["lora/m1/A"][2, 2] = float("-inf")
        return reply, r"lora/m1/A: 2 non-finite entries \(NaN or Inf\); expected all finite"
    if kind == "shape":
        arrays[key] = torch.zeros(5, 4)
        return reply, r"Module 'm0': B has shape \(5, 4\); expected \(6, 4\)"
    if kind == "shape_A":
        arrays["lora/m1/A"] = torch.zeros(4, 6)
        return reply, r"Module 'm1': A has shape \(4, 6\); expected \(4, 7\)"
    if kind == "rank":
        reply = _reply(_pairs(3, 1), 10, head=_head(1))
        return reply, r"Reply config 'rank' is 3; expected one of \[4\]"
    if kind == "rank_missing":
        del config["rank"]
        return reply, r"Reply config 'rank' is None; expected one of \[4\]"
    if kind == "rank_bool":
        config["rank"] = True
        return reply, r"Reply config 'rank' is True; expected one of \[4\]"
    if kind == "round":
        config["round"] = 3
        return reply, r"Reply config 'round' is 3; expected 1 \(a reply to another round's"
    if kind == "client":
        config["client"] = 2
        return reply, r"Reply config 'client' is 2; expected 0 \(a reply to another round's or another client's"
    if kind == "missing":
        del arrays["lora/m1/A"]
        return reply, r"missing keys \['lora/m1/A'\] and unknown keys \[\]; expected 6 keys"
    if kind == "unknown":
        arrays["lora/m2/B"] = torch.zeros(6, 4)
        return reply, r"missing keys \[\] and unknown keys \['lora/m2/B'\]; expected 6 keys"
    if kind == "extra":
        arrays["extra/classifier.bias"] = torch.zeros(4)
        return reply, r"Extra 'classifier.bias': shape \(4,\); expected \(3,\)"
    n = {"n_zero": 0, "n_float": 2.5, "n_bool": True, "n_missing": None}[kind]
    if n is None:
        del config["num_examples"]
    else:
        config["num_examples"] = n
    return reply, rf"Reply config 'num_examples' must be a positive int. Got {n!r}\."


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "shape_A", "rank", "rank_missing", "rank_bool", "round",
                                  "client", "missing",
                                  "unknown", "extra", "n_zero", "n_float", "n_bool", "n_missing"])
def test_check_reply_rejects_bad_replies(kind):
    # Prepare
    method, server = _server("fedit", _pairs(4, 0), {0: 4}, _head(0))
    method.check_reply(server, 0, _reply(_pairs(4, 1), 10, head=_head(1)))  # the good reply passes
    reply, match = _bad_reply(kind)
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        method.check_reply(server, 0, reply)


def test_hetlora_check_reply_accepts_the_sent_rank_or_one_pruning_step():
    # rank 8, gamma 0.99: the client keeps 8 or prunes to floor(0.99 * 8) = 7; nothing else is legitimate
    method, server = _server("hetlora", _pairs(8, 0), {0: 8}, r_min=2)
    method.check_reply(server, 0, _reply(_pairs(8, 1), 1))
    method.check_reply(server, 0, _reply(_pairs(7, 1), 1))
    for bad in (6, 2, 9):
        with pytest.raises(ValueError, match=rf"Reply config 'rank' is {bad}; expected one of \[7, 8\]"):
            method.check_reply(server, 0, _reply(_pairs(bad, 1), 1))
    # r_min bounds the pruning: rank 2 with r_min 2 can only stay 2
    method, server = _server("hetlora", _pairs(2, 0), {0: 2}, r_min=2)
    with pytest.raises(ValueError, match=r"Reply config 'rank' is 1; expected one of \[2\]"):
        method.check_reply(server, 0, _reply(_pairs(1, 1), 1))


def test_flora_check_reply_requires_every_merge_applied():
    method, server = _server("flora", _pairs(4, 0), {0: 4})
    server.round = 2
    good = _reply(_pairs(4, 1), 3, round_=3)
    good.config["base_round"] = 2
    method.check_reply(server, 0, good)
    good.config["base_round"] = 1
    with pytest.raises(ValueError, match=r"Reply config 'base_round' is 1; expected 2"):
        method.check_reply(server, 0, good)


# ------------------------------------------------------------------------ every method through run_client


def _expected_download(name, sim, t, r):
    shapes, head = sim.ws.shapes, _shapes_of({f"extra/{e}": v for e, v in sim.init_extras.items()})
    if name == "ffa":
        return {**_lora_shapes(shapes, "B", r), **head}
    if name == "fedsa":
        return {**_lora_shapes(shapes, "A", r), **(head if t == 1 else {})}
    if name == "local":  # the initial adapter and head once; then the client trains its own
        return {**_lora_shapes(shapes, "BA", r), **head} if t == 1 else {}
    if name == "flora":
        out, stacked = dict(head), sum(sim.ranks)
        for s in range(1, t):
            for m, (d_out, d_in) in shapes.items():
                out[f"merge/{s}/{m}/B"], out[f"merge/{s}/{m}/A"] = (d_out, stacked), (stacked, d_in)
        return out
    return {**_lora_shapes(shapes, "BA", r), **head}


def _expected_upload(name, sim, rank):
    shapes, head = sim.ws.shapes, _shapes_of({f"extra/{e}": v for e, v in sim.init_extras.items()})
    if name == "ffa":
        return {**_lora_shapes(shapes, "B", rank), **head}
    if name == "fedsa":
        return _lora_shapes(shapes, "A", rank)
    if name == "local":
        return {}
    return {**_lora_shapes(shapes, "BA", rank), **head}


def _check_download_values(name, sim, before, message, t, r):
    arrays = message.arrays
    for e, v in decode_extras(arrays).items():
        assert torch.equal(v, before.extras[e]), e
    if name in PREFIX_METHODS or (name in ("flexlora", "clair", "oracle", "clair_nodetect", "local") and t == 1):
        prefix = {m: redistribute(p, r, method="prefix") for m, p in before.pairs.items()}
        _assert_pairs_equal(decode_pairs(arrays), prefix)
    elif name == "flexlora":  # the best rank-r approximation, A with orthonormal rows
        got = decode_pairs(arrays)
        for m, p in before.pairs.items():
            _, best, _ = _best_rank(p, r)
            torch.testing.assert_close((got[m].B @ got[m].A).double(), best, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[m].A @ got[m].A.T, torch.eye(r), rtol=1e-5, atol=1e-5)
    elif name == "ffa":
        for m, p in before.pairs.items():
            assert torch.equal(arrays[f"lora/{m}/B"], p.B[:, :r])
        assert message.config["init_seed"] == sim.init_seed and message.config["init_rank"] == max(sim.ranks)
    elif name == "fedsa":
        for m, p in before.pairs.items():
            assert torch.equal(arrays[f"lora/{m}/A"], p.A[:r])
    elif name in ("clair", "oracle", "clair_nodetect"):  # the client's own download, kept by the server after aggregating
        k = message.config["client"]
        for m in before.pairs:
            assert torch.equal(arrays[f"lora/{m}/B"], before.arrays[f"client/{k}/{m}/B"])
            assert torch.equal(arrays[f"lora/{m}/A"], before.arrays[f"client/{k}/{m}/A"])
    elif name == "flora":
        assert message.config["merges"] == list(range(1, t))
        for key, v in arrays.items():
            if key.startswith("merge/"):
                assert torch.equal(v, before.arrays[key]), key


def _expected_upload_rank(name, method, call, r):
    """The rank the client should report: HetLoRA prunes iff the tail product fell during training."""
    if name != "hetlora" or method.pruned_rank(r) >= r:
        return r
    t = int(math.floor(method.options.gamma * r))
    start = float(tail_norm_product(decode_pairs(call.message.arrays), t))
    end = float(tail_norm_product(call.trained, t))
    return method.pruned_rank(r) if end < start else r


def _check_trained(name, sim, before, call, t, r):
    trained = call.trained
    assert any(float(p.B.abs().sum()) > 0 for p in trained.values())  # B moved from its start
    if name == "ffa":  # A regenerated from the seed, equal to the server's prefix, and frozen
        for m, p in trained.items():
            assert torch.equal(p.A, before.pairs[m].A[:r])
            assert torch.equal(p.A, truncate(sim.init[m], r).A)
    if name == "fedsa":  # B and the head stay on the client
        for m, p in trained.items():
            assert torch.equal(call.new_state.arrays[f"B/{m}"], p.B)
        for e, v in call.trained_extras.items():
            assert torch.equal(call.new_state.arrays[f"extra/{e}"], v)
    if name == "local":  # the client keeps what it trained and starts from it next round
        _assert_pairs_equal(decode_pairs(call.new_state.arrays), trained)  # (it trains on from it: test_clair_run)
    if name == "flora":  # the client applied every merge up to t - 1 into its base
        assert call.new_state.info["base_round"] == t - 1
        for m in sim.ws.shapes:
            if t == 1:
                assert f"base/{m}" not in call.new_state.arrays
            else:
                torch.testing.assert_close(call.new_state.arrays[f"base/{m}"], before.arrays[f"base/{m}"])


# The seed methods with their own download/upload shapes (HAFL: slot index sets; LoRA-A2: masked deltas of one
# factor) have the same two-round checks in their own files (tests/llm/test_hafl.py, test_lora_a2.py).
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"hafl", "lora_a2"}))
def test_every_method_two_rounds_through_run_client(tmp_path, monkeypatch, name):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method(name)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert
    previous_ranks = dict(enumerate(sim.ranks))
    for t, rnd in enumerate(log, start=1):
        assert rnd.before.round == t - 1 and rnd.after.round == t
        assert rnd.before.ranks == previous_ranks
        assert sorted(rnd.calls) == [0, 1, 2] and [row["client"] for row in rnd.rows] == [0, 1, 2]
        for row in rnd.rows:
            k = row["client"]
            call, r = rnd.calls[k], rnd.before.ranks[k]
            # what was downloaded
            assert call.message.config["round"] == t and call.message.config["rank"] == r
            assert call.message.config["client"] == k
            assert _shapes_of(call.message.arrays) == _expected_download(name, sim, t, r), (t, k)
            _check_download_values(name, sim, rnd.before, call.message, t, r)
            # what was trained
            _check_trained(name, sim, rnd.before, call, t, r)
            # what was uploaded
            cfg = call.reply.config
            assert (cfg["num_examples"], cfg["client"], cfg["round"]) == (sim.n_k[k], k, t)
            upload_rank = _expected_upload_rank(name, method, call, r)
            assert cfg["rank"] == upload_rank
            if name == "flora":
                assert cfg["base_round"] == t - 1
            assert _shapes_of(call.reply.arrays) == _expected_upload(name, sim, upload_rank), (t, k)
            for key, v in call.reply.arrays.items():
                kind, rest = key.split("/", 1)
                if kind == "extra":
                    assert torch.equal(v, call.trained_extras[rest]), key
                else:
                    m, factor = rest.rsplit("/", 1)
                    want = truncate(call.trained[m], upload_rank)
                    assert torch.equal(v, want.B if factor == "B" else want.A), key
            # the row: rank, examples, bytes = sum numel * element size of what travelled
            assert (row["rank"], row["n"], row["dropped"]) == (r, sim.n_k[k], False)
            assert row["bytes_down"] == _nbytes(call.message.arrays) > (0 if name != "local" or t == 1 else -1)
            assert row["bytes_up"] == _nbytes(call.reply.arrays) > (0 if name != "local" else -1)
            again = method.configure(rnd.before, k)  # the message, recomputed from the pre-round state
            assert set(again.arrays) == set(call.message.arrays)
            assert all(torch.equal(again.arrays[key], call.message.arrays[key]) for key in again.arrays)
            assert row["bytes_down"] == _nbytes(again.arrays)
        previous_ranks = {k: int(c.reply.config["rank"]) for k, c in rnd.calls.items()}
        assert rnd.after.ranks == previous_ranks
    final = log[-1].after
    for pair in final.pairs.values():
        assert bool(torch.isfinite(pair.B).all() and torch.isfinite(pair.A).all())
    res = sim.evaluate(method, final, log[-1].clients)
    assert 0.0 <= res["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["fedit", "fedsa"])
def test_evaluate_copes_with_a_client_without_held_out_examples(tmp_path, name):
    # Prepare: client 0's held-out set is empty, as holdout_sets gives a client with a tiny share of a class
    sim = _sim(tmp_path)
    sim.holdout[0] = np.array([], dtype=np.int64)
    method = make_method(name)
    # Execute
    res = sim.evaluate(method, _start(sim, method), {})
    # Assert: that client has no score; the mean is over the others
    assert len(res["per_client"]) == 3 and res["per_client"][0] is None
    assert res[f"local_{sim.metric}"] == pytest.approx(np.mean(res["per_client"][1:]))
    # the global model on each client's held-out set (not for personalised methods: no client holds it)
    if method.personalised:
        assert "per_client_global" not in res
    else:
        assert res["per_client_global"][0] is None and len(res["per_client_global"]) == 3
        assert res["per_client_global"][1:] == res["per_client"][1:]  # FedIT's round-0 download is the global


# ----------------------------------------------------------------------------- FFA


def test_ffa_never_sends_A_and_never_changes_it(tmp_path, monkeypatch):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("ffa")
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert: no download carries A, in round 1 or round 2
    for rnd in log:
        for k, call in rnd.calls.items():
            assert call.message.arrays and not any(key.endswith("/A") for key in call.message.arrays)
            assert not any(key.endswith("/A") for key in call.reply.arrays)
            # the client's regenerated A is the server's A prefix
            r = rnd.before.ranks[k]
            plan, _ = method.client_plan(call.message, ClientState(), sim.contexts[k], torch.Generator())
            assert plan.lrs.keys() == {"B", "extras"}
            for m, p in plan.pairs.items():
                assert torch.equal(p.A, rnd.before.pairs[m].A[:r])
                assert torch.equal(p.B, rnd.before.pairs[m].B[:, :r])
    for m, pair in log[-1].after.pairs.items():
        assert torch.equal(pair.A, sim.init[m].A)
        assert float(pair.B.abs().sum()) > 0


# ----------------------------------------------------------------------------- FedSA


def test_fedsa_keeps_B_and_head_local(tmp_path, monkeypatch):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("fedsa")
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert
    for t, rnd in enumerate(log, start=1):
        for k, call in rnd.calls.items():  # the server sends A, and the head only in the first download
            assert all(key.endswith("/A") for key in call.message.arrays if key.startswith("lora/"))
            assert bool(decode_extras(call.message.arrays)) == (t == 1)
            assert not any(key.endswith("/B") or key.startswith("extra/") for key in call.reply.arrays)
        for pair in rnd.after.pairs.values():  # the server holds no B
            assert float(pair.B.abs().sum()) == 0
    clients = log[-1].clients
    for c in clients.values():  # each client kept a trained B and its own head
        assert any(float(v.abs().sum()) > 0 for key, v in c.arrays.items() if key.startswith("B/"))
        assert any(key.startswith("extra/") for key in c.arrays)
    heads = [c.arrays["extra/classifier.weight"] for c in clients.values()]
    assert not torch.equal(heads[0], heads[1])
    # round 2 starts from the client's own B and head (the download carries neither)
    call = log[1].calls[0]
    plan, _ = method.client_plan(call.message, call.state, sim.contexts[0], torch.Generator())
    for m, p in plan.pairs.items():
        assert torch.equal(p.B, call.state.arrays[f"B/{m}"])
    assert torch.equal(plan.extras["classifier.weight"], call.state.arrays["extra/classifier.weight"])
    # personalised model: own B, global A prefix, own head
    final = log[-1].after
    model = method.personal_model(method.configure(final, 0), clients[0], sim.ws.shapes)
    for m, p in model.pairs.items():
        assert torch.equal(p.B, clients[0].arrays[f"B/{m}"])
        assert torch.equal(p.A, truncate(final.pairs[m], sim.ranks[0]).A)
    assert torch.equal(model.extras["classifier.weight"], clients[0].arrays["extra/classifier.weight"])


# ----------------------------------------------------------------------------- FLoRA


def test_flora_merged_base_is_the_sum_of_stacked_products(tmp_path, monkeypatch):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("flora")
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert
    final = log[-1].after
    for m in sim.ws.shapes:
        expected = 0
        for t, rnd in enumerate(log, start=1):
            replies = [rnd.calls[k].reply for k in sorted(rnd.calls)]
            n = torch.tensor([float(r.config["num_examples"]) for r in replies])
            p = n / n.sum()
            pairs = [decode_pairs(r.arrays)[m] for r in replies]
            round_sum = sum(pk * (q.B @ q.A) for pk, q in zip(p, pairs, strict=True))
            merge = FactorPair(rnd.after.arrays[f"merge/{t}/{m}/B"], rnd.after.arrays[f"merge/{t}/{m}/A"])
            assert merge.rank == sum(sim.ranks)
            torch.testing.assert_close(merge.B @ merge.A, round_sum, rtol=1e-5, atol=1e-6)
            expected = expected + round_sum
        torch.testing.assert_close(final.arrays[f"base/{m}"], expected, rtol=1e-5, atol=1e-6)
    assert final.pairs == {}
    # every client confirmed merge 1 in round 2 (full participation): the server no longer keeps it
    assert not any(key.startswith("merge/1/") for key in final.arrays)
    assert any(key.startswith("merge/2/") for key in final.arrays)
    assert method.global_model(final).base.keys() == sim.ws.shapes.keys()
    # the frozen weights are W0 + base while a client trains; fresh adapters start from B = 0
    from lowrank_fed.llm.peft_bridge import lora_layers

    call = log[1].calls[1]
    sim.ws.set_base({m: final.arrays[f"base/{m}"] for m in sim.ws.shapes})
    m = next(iter(sim.ws.shapes))
    torch.testing.assert_close(lora_layers(sim.ws.peft)[m].get_base_layer().weight,
                               sim.ws._W0[m] + final.arrays[f"base/{m}"])
    sim.ws.set_base(None)
    plan, state = method.client_plan(call.message, call.state, sim.contexts[1], torch.Generator())
    assert all(float(p.B.abs().sum()) == 0 and p.rank == sim.ranks[1] for p in plan.pairs.values())
    assert set(plan.base) == set(sim.ws.shapes)


def test_flora_catches_up_on_every_merge_a_client_missed(tmp_path, monkeypatch):
    # Prepare: one client per round, so clients skip rounds and must catch up
    sim = _sim(tmp_path, clients_per_round=1)
    method = make_method("flora")
    # Execute
    log = _run_rounds(sim, method, 5, monkeypatch)
    # Assert
    confirmed = {k: 0 for k in range(3)}
    longest = 0
    for t, rnd in enumerate(log, start=1):
        (k, call), = rnd.calls.items()
        merges = list(range(confirmed[k] + 1, t))
        longest = max(longest, len(merges))
        assert call.message.config["merges"] == merges
        expected_keys = {key for key in rnd.before.arrays
                         if key.startswith("merge/") and int(key.split("/")[1]) in merges}
        assert {key for key in call.message.arrays if key.startswith("merge/")} == expected_keys
        assert rnd.rows[0]["bytes_down"] == _nbytes(call.message.arrays)
        for m in sim.ws.shapes:  # the client's base is the server's base: every merge applied
            if t > 1:
                torch.testing.assert_close(call.new_state.arrays[f"base/{m}"], rnd.before.arrays[f"base/{m}"],
                                           rtol=1e-5, atol=1e-6)
        confirmed[k] = call.reply.config["base_round"]
        assert confirmed[k] == t - 1
    assert longest >= 2  # some client caught up on several merges at once


# ----------------------------------------------------------------------------- FlexLoRA


def test_flexlora_clients_receive_best_rank_r_approximation(tmp_path, monkeypatch):
    # Prepare / Execute: one round of three clients
    sim = _sim(tmp_path)
    method = make_method("flexlora")
    first = decode_pairs(method.configure(_start(sim, method), 1).arrays)  # round 1: the shared init's prefix
    _assert_pairs_equal(first, {m: truncate(p, 4) for m, p in sim.init.items()})
    server = _run_rounds(sim, method, 1, monkeypatch)[-1].after
    # Assert
    for k, r in enumerate(sim.ranks):
        got = decode_pairs(method.configure(server, k).arrays)
        for m, glob in server.pairs.items():
            dense, best, S = _best_rank(glob, r)
            approx = (got[m].B @ got[m].A).double()
            assert got[m].rank == r
            torch.testing.assert_close(approx, best, rtol=1e-4, atol=1e-6)
            err = float(torch.linalg.matrix_norm(dense - approx) ** 2)
            assert math.isclose(err, float((S[r:] ** 2).sum()), rel_tol=1e-3, abs_tol=1e-8)
            want = redistribute(glob, r, method="svd")
            torch.testing.assert_close(got[m].B @ got[m].A, want.B @ want.A)


def _flexlora_check_full_rank_gradient(down, dense, rank):
    # A has orthonormal rows; B A is the best rank-r approximation (here the whole product)
    torch.testing.assert_close(down.A @ down.A.T, torch.eye(rank, dtype=down.A.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(down.B @ down.A, dense, rtol=1e-10, atol=1e-10)
    # dL/dB = G A^T: every column (every slot) gets a gradient for a generic G
    G = torch.randn(dense.shape, generator=torch.Generator().manual_seed(5), dtype=dense.dtype)
    col_norms = torch.linalg.vector_norm(G @ down.A.T, dim=0)
    assert bool((col_norms > 1e-3).all()), col_norms


def test_flexlora_download_above_the_global_rank_has_a_gradient_in_every_slot():
    # Prepare: a global pair of rank 2; the client is sent rank 6
    shapes = {"m0": (10, 8), "m1": (9, 12)}
    glob = _pairs(2, 3, shapes, dtype=torch.float64)
    server = ServerState(1, glob, {}, shapes, {0: 6}, info={"aggregated": True})
    method = make_method("flexlora")
    # Execute
    down = decode_pairs(method.configure(server, 0).arrays)
    # Assert
    for m, g in glob.items():
        assert down[m].rank == 6
        _flexlora_check_full_rank_gradient(down[m], g.B @ g.A, 6)


def test_flexlora_after_partial_aggregation_sends_orthonormal_A_to_larger_clients():
    # Prepare: only the rank-2 client takes part, so the global has 2 singular directions; client 1 has rank 6
    shapes = {"m0": (10, 8), "m1": (9, 12)}
    method = make_method("flexlora")
    server = method.init_server(_pairs(6, 0, shapes, dtype=torch.float64), {}, {0: 2, 1: 6}, init_seed=0)
    up = _pairs(2, 7, shapes, dtype=torch.float64)
    # Execute
    new = method.aggregate(server, {0: _reply(up, 4)})
    down = decode_pairs(method.configure(new, 1).arrays)
    # Assert
    for m, p in up.items():
        _flexlora_check_full_rank_gradient(down[m], p.B @ p.A, 6)


# ----------------------------------------------------------------------------- HetLoRA


def test_hetlora_weights_by_norms_alone_not_data():
    # Prepare: three clients with very different data sizes
    method, server = _server("hetlora", _pairs(4, 0), {0: 2, 1: 3, 2: 4})
    ups = [_pairs(r, 50 + r) for r in (2, 3, 4)]
    replies = {k: _reply(p, n, client=k) for k, (p, n) in enumerate(zip(ups, [1, 100, 1], strict=True))}
    # Execute
    new = method.aggregate(server, replies)
    # Assert
    for m in SHAPES:
        norms = aggregate("zero_pad", [u[m] for u in ups], None, weighting="frobenius")
        torch.testing.assert_close(new.pairs[m].B, norms.B)
        torch.testing.assert_close(new.pairs[m].A, norms.A)
        data = aggregate("zero_pad", [u[m] for u in ups], [1, 100, 1], weighting="frobenius")
        assert not torch.allclose(new.pairs[m].B, data.B, rtol=1e-2, atol=1e-3)


def test_hetlora_slot_every_holder_pruned_is_zero():
    # Prepare: global rank 8; clients sent ranks 4 and 8, the rank-8 client pruned to 7
    method, server = _server("hetlora", _pairs(8, 0), {0: 4, 1: 8})
    ups = [_pairs(4, 1), _pairs(7, 2)]
    replies = {0: _reply(ups[0], 5), 1: _reply(ups[1], 5, client=1)}
    for k, reply in replies.items():
        method.check_reply(server, k, reply)
    # Execute
    new = method.aggregate(server, replies)
    # Assert
    for m, prev in server.pairs.items():
        assert new.pairs[m].rank == 8
        assert torch.equal(new.pairs[m].B[:, 7], torch.zeros(prev.B.shape[0]))
        assert torch.equal(new.pairs[m].A[7], torch.zeros(prev.A.shape[1]))
        expected = aggregate("zero_pad", [u[m] for u in ups], None, weighting="frobenius")
        torch.testing.assert_close(new.pairs[m].B[:, :7], expected.B)
    assert new.ranks == {0: 4, 1: 7}


def test_hetlora_slots_no_participant_held_keep_their_value():
    # Prepare: global rank 8; the participants were sent ranks 4 and 2 (client 2, rank 8, sat out)
    method, server = _server("hetlora", _pairs(8, 0), {0: 4, 1: 2, 2: 8})
    replies = {0: _reply(_pairs(4, 1), 5), 1: _reply(_pairs(2, 2), 5)}
    # Execute
    new = method.aggregate(server, replies)
    # Assert
    for m, prev in server.pairs.items():
        assert torch.equal(new.pairs[m].B[:, 4:], prev.B[:, 4:])
        assert torch.equal(new.pairs[m].A[4:], prev.A[4:])
        rule = aggregate("zero_pad", [_pairs(4, 1)[m], _pairs(2, 2)[m]], None, weighting="frobenius")
        expected = keep_slots(rule, prev, 4)
        torch.testing.assert_close(new.pairs[m].B, expected.B)


def _plan_context(lr=0.01):
    return SimpleNamespace(settings=TrainSettings(lr=lr, batch_size=1))


def _hetlora_message(method, rank, seed=0):
    server = method.init_server(_pairs(rank, seed), {}, {0: rank}, init_seed=0)
    return method.configure(server, 0)


def test_hetlora_no_regulariser_or_pruning_when_pruning_cannot_reduce_the_rank():
    # Prepare
    method = make_method("hetlora", r_min=1)
    message = _hetlora_message(method, 1)
    # Execute
    plan, state = method.client_plan(message, ClientState(), _plan_context(), torch.Generator())
    tail_gone = {m: FactorPair(0.0 * p.B, p.A) for m, p in plan.pairs.items()}
    reply, _ = method.client_reply(plan, tail_gone, {}, state, message)
    # Assert
    assert plan.hooks == [] and "t" not in plan.info
    assert reply.config["rank"] == 1
    assert _shapes_of(reply.arrays) == _lora_shapes(SHAPES, "BA", 1)


def test_hetlora_rank_four_gets_one_tail_regulariser(tmp_path):
    sim = _sim(tmp_path)
    method = make_method("hetlora", lam=0.5)
    message = _hetlora_message(method, 4)
    plan, _ = method.client_plan(message, ClientState(), _plan_context(), torch.Generator())
    assert len(plan.hooks) == 1 and plan.info["t"] == 3
    hook = plan.hooks[0](sim.ws)
    assert isinstance(hook, TailRegulariser) and (hook.lam, hook.t) == (0.5, 3)
    no_lam = make_method("hetlora", lam=0.0)
    assert no_lam.client_plan(message, ClientState(), _plan_context(), torch.Generator())[0].hooks == []


def test_hetlora_prunes_only_when_the_tail_falls():
    # Prepare
    method = make_method("hetlora", r_min=2)
    message = _hetlora_message(method, 4)
    plan, state = method.client_plan(message, ClientState(), _plan_context(), torch.Generator())
    pairs = plan.pairs
    shrunk = {m: FactorPair(torch.cat([p.B[:, :3], 0.5 * p.B[:, 3:]], 1), p.A) for m, p in pairs.items()}
    grown = {m: FactorPair(torch.cat([p.B[:, :3], 2.0 * p.B[:, 3:]], 1), p.A) for m, p in pairs.items()}
    # Execute
    pruned, _ = method.client_reply(plan, shrunk, {}, state, message)
    kept, _ = method.client_reply(plan, grown, {}, state, message)
    # Assert
    assert plan.info["t"] == 3
    assert pruned.config["rank"] == 3
    assert torch.equal(pruned.arrays["lora/m0/B"], shrunk["m0"].B[:, :3])
    assert kept.config["rank"] == 4 and tuple(kept.arrays["lora/m0/B"].shape) == (6, 4)
    # r_min bounds the pruning: rank 2 with r_min = 2 cannot prune
    message2 = _hetlora_message(method, 2)
    plan2, state2 = method.client_plan(message2, ClientState(), _plan_context(), torch.Generator())
    small = {m: FactorPair(0.1 * p.B, p.A) for m, p in plan2.pairs.items()}
    reply2, _ = method.client_reply(plan2, small, {}, state2, message2)
    assert reply2.config["rank"] == 2 and plan2.hooks == []


def test_hetlora_regulariser_has_a_gradient_on_live_tensors_only_in_the_tail(tmp_path):
    # Prepare: a rank-4 adapter with non-zero B in the live workspace
    sim = _sim(tmp_path)
    ws = sim.ws
    gen = torch.Generator().manual_seed(1)
    pairs = {m: FactorPair(torch.randn(d_out, 4, generator=gen), torch.randn(4, d_in, generator=gen))
             for m, (d_out, d_in) in ws.shapes.items()}
    ws.load(pairs)
    ws.param_groups({"A": 0.1, "B": 0.1})
    hook = TailRegulariser(ws, 0.5, 3)
    # Execute
    penalty = hook.penalty(0)
    penalty.backward()
    # Assert
    torch.testing.assert_close(penalty.detach(), 0.5 * tail_norm_product(pairs, 3), rtol=1e-5, atol=1e-6)
    for layer in (ws._layers[m] for m in ws.shapes):
        gB, gA = layer.lora_B[ws.active].weight.grad, layer.lora_A[ws.active].weight.grad
        assert gB is not None and gA is not None
        assert float(gB[:, 3:].abs().sum()) > 0 and float(gB[:, :3].abs().sum()) == 0
        assert float(gA[3:].abs().sum()) > 0 and float(gA[:3].abs().sum()) == 0


def test_hetlora_regulariser_and_self_pruning_through_rounds(tmp_path, monkeypatch):
    # Prepare: a strong tail regulariser so the tail product falls in round 2
    sim = _sim(tmp_path, ranks=[4, 4, 8], local_steps=4)
    method = make_method("hetlora", lam=5.0)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert: round 1 starts from B = 0 (tail 0, cannot fall); round 2 prunes r -> floor(0.99 r)
    assert [r.get("new_rank") for r in log[0].rows] == [None, None, None]
    assert [r.get("new_rank") for r in log[1].rows] == [3, 3, 7]
    assert all(not r["dropped"] for r in log[1].rows)
    assert log[1].after.ranks == {0: 3, 1: 3, 2: 7}
    assert all(p.rank == 8 for p in log[1].after.pairs.values())  # the global keeps r_max slots


# ----------------------------------------------------------------------------- run_client


def test_run_client_is_deterministic_and_reports_its_config(tmp_path):
    sim = _sim(tmp_path)
    method = make_method("fedit")
    server = _start(sim, method)
    message = method.configure(server, 2)
    context = sim.contexts[2]
    assert isinstance(context, ClientContext)
    a, _, stats = run_client(method, message, None, context)
    b, _, _ = run_client(method, message, None, context)
    assert set(a.arrays) == set(b.arrays) and all(torch.equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert a.config == {"num_examples": sim.n_k[2], "rank": 8, "client": 2, "round": 1}
    assert a.metrics["steps"] == stats.steps == 2 and a.metrics["train_loss"] == stats.loss


# ----------------------------------------------------------------------------- frozen head


@pytest.mark.parametrize("name", ["fedit", "ffa", "flexlora", "hafl", "lora_a2", "clair"])
def test_freeze_head_keeps_the_initial_head_everywhere(tmp_path, monkeypatch, name):
    # Prepare: option freeze_head (LoRA-A2's setting) on a method whose head is otherwise trained and averaged
    sim = _sim(tmp_path)
    method = make_method(name, freeze_head=True)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert: no reply carries the head, the server's head is the initial one, the adapter did learn
    for rnd in log:
        for call in rnd.calls.values():
            assert not any(key.startswith("extra/") for key in call.reply.arrays)
    for e, initial in sim.init_extras.items():
        assert torch.equal(log[-1].after.extras[e], initial)
    assert any(float(p.B.abs().sum()) > 0 for p in log[-1].after.pairs.values())


def test_a_methods_own_lr_replaces_the_runs(tmp_path):
    # Prepare: option lr on FedIT; the run's lr is 0.01 (tiny settings)
    sim = _sim(tmp_path)
    method = make_method("fedit", lr=0.003)
    server = method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)
    seen = []
    original = method.client_plan

    def spy(message, state, context, generator):
        seen.append(context.settings.lr)
        return original(message, state, context, generator)

    method.client_plan = spy
    # Execute
    run_client(method, method.configure(server, 0), None, sim.contexts[0])
    # Assert: the plan was built with the method's lr, and the run's context is left as it was
    assert seen == [0.003] and sim.contexts[0].settings.lr == 0.01
