"""LoRA-A2 as a federated method: alternating factors, probe-based model-wide slot selection, masked uploads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair, select_slots  # noqa: E402
from lowrank_fed.llm.client import run_client  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods import ClientState, make_method  # noqa: E402
from lowrank_fed.llm.methods.lora_a2 import factor_of  # noqa: E402
from lowrank_fed.llm.protocol import Message, decode_extras, decode_pairs, encode_extras  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import kill_and_resume, make_sim, run_rounds, sha_tree  # noqa: E402
from tests.llm.helpers import nbytes as _nbytes  # noqa: E402
from tests.llm.helpers import start as _start  # noqa: E402

BUDGETS = [1, 2, 4]
SIM = dict(name="t", model="tiny-bert", dataset="synthetic", methods=["lora_a2"], clients=3, ranks=BUDGETS,
           rounds=2, local_steps=2, batch_size=8, lr=0.01, eval_size=80, max_length=32, checkpoint=False)


def _sim(tmp_path, **overrides):
    return make_sim(tmp_path, {**SIM, **overrides})


def _run_rounds(sim, method, rounds, monkeypatch):
    """``rounds`` rounds through ``sim.run_round``, recording every client's download, probe, training, reply."""
    return run_rounds(sim, method, rounds, monkeypatch, record_probe=True)


def _slots(reply):
    return {key[len("slots/"):]: v.tolist() for key, v in reply.arrays.items() if key.startswith("slots/")}


def _hand_scores(start, probe, factor):
    """||dB[:, i]|| ||A[i, :]|| (B-round) or ||B[:, i]|| ||dA[i, :]|| (A-round), written out by hand."""
    out = {}
    for m, p in start.items():
        if factor == "B":
            out[m] = ((probe[m].B - p.B) ** 2).sum(dim=0).sqrt() * (p.A ** 2).sum(dim=1).sqrt()
        else:
            out[m] = (p.B ** 2).sum(dim=0).sqrt() * ((probe[m].A - p.A) ** 2).sum(dim=1).sqrt()
    return out


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """Two rounds (a B-round, then an A-round) of LoRA-A2 with budgets [1, 2, 4] and r_G = 16."""
    mp = pytest.MonkeyPatch()
    try:
        sim = _sim(tmp_path_factory.mktemp("a2"))
        method = make_method("lora_a2")
        log = _run_rounds(sim, method, 2, mp)
    finally:
        mp.undo()
    return sim, method, log


# ----------------------------------------------------------------------------- the alternating factor


def test_rounds_alternate_B_then_A_with_eta_B_five_eta_A(two_rounds):
    # Prepare
    sim, method, log = two_rounds
    # Execute
    plans = [method.client_plan(rnd.calls[0].message, ClientState(), sim.contexts[0], torch.Generator())[0]
             for rnd in log]
    # Assert
    assert [factor_of(t) for t in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    assert plans[0].lrs == {"B": 5 * 0.01, "extras": 0.01}
    assert plans[1].lrs == {"A": 0.01, "extras": 0.01}


def test_B_round_never_changes_A_and_A_round_never_changes_B(two_rounds):
    # Prepare
    _, _, log = two_rounds
    for rnd, frozen in zip(log, ("A", "B"), strict=True):
        # Execute / Assert: on every client ...
        for k, call in rnd.calls.items():
            download = decode_pairs(call.message.arrays)
            for m, p in call.trained.items():
                assert torch.equal(getattr(p, frozen), getattr(download[m], frozen)), (k, m)
                assert torch.equal(getattr(call.probe[m], frozen), getattr(download[m], frozen)), (k, m)
            assert not any(key.endswith(f"/{frozen}") for key in call.reply.arrays)
        # ... and on the server
        for m, prev in rnd.before.pairs.items():
            assert torch.equal(getattr(rnd.after.pairs[m], frozen), getattr(prev, frozen)), m
        changed = "B" if frozen == "A" else "A"
        assert any(not torch.equal(getattr(rnd.after.pairs[m], changed), getattr(p, changed))
                   for m, p in rnd.before.pairs.items())


def test_server_step_through_the_runner_is_the_mean_of_the_local_products(two_rounds):
    # Prepare: p_k = n_k / sum n_j; each client's local product with its trained (masked) factor
    sim, _, log = two_rounds
    for rnd in log:
        n = torch.tensor([float(rnd.calls[k].reply.config["num_examples"]) for k in sorted(rnd.calls)])
        p = (n / n.sum()).tolist()
        for m, new in rnd.after.pairs.items():
            # Execute
            local = sum(pk * (rnd.calls[k].trained[m].B @ rnd.calls[k].trained[m].A)
                        for pk, k in zip(p, sorted(rnd.calls), strict=True))
            # Assert: (B + sum_k p_k dB_k) A == sum_k p_k (B + dB_k) A, compared as products
            torch.testing.assert_close(new.B @ new.A, local, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), r_G=st.integers(1, 6), factor=st.sampled_from("BA"))
def test_server_step_is_exact_for_the_product(seed, k, r_G, factor):
    # Prepare: random global rank-r_G pairs of two modules; each client sends a random delta on a random
    # slot set of budget r_k * N across the modules (a module may get none: it then sends no key)
    gen = torch.Generator().manual_seed(seed)
    shapes = {"m0": (5, 4), "m1": (3, 6)}
    glob = {m: FactorPair(torch.randn(d_out, r_G, generator=gen, dtype=torch.float64),
                          torch.randn(r_G, d_in, generator=gen, dtype=torch.float64))
            for m, (d_out, d_in) in shapes.items()}
    method = make_method("lora_a2", global_rank=r_G)
    budgets = {c: int(torch.randint(1, r_G + 1, (1,), generator=gen)) for c in range(k)}
    server = method.init_server(glob, {}, budgets, init_seed=0)
    server.round = 0 if factor == "B" else 1
    replies, full = {}, {}
    for c, r in budgets.items():
        chosen = torch.randperm(2 * r_G, generator=gen)[: 2 * r].sort().values
        arrays, full[c] = {}, {}
        for j, (m, (d_out, d_in)) in enumerate(shapes.items()):
            idx = chosen[(chosen >= j * r_G) & (chosen < (j + 1) * r_G)] - j * r_G
            shape = (d_out, len(idx)) if factor == "B" else (len(idx), d_in)
            delta = torch.randn(shape, generator=gen, dtype=torch.float64)
            dense = torch.zeros_like(getattr(glob[m], factor))
            if factor == "B":
                dense[:, idx] = delta
            else:
                dense[idx] = delta
            full[c][m] = dense
            if len(idx):
                arrays[f"delta/{m}/{factor}"], arrays[f"slots/{m}"] = delta, idx.to(torch.int64)
        replies[c] = Message(arrays, {"num_examples": c + 1, "rank": r, "client": c, "round": server.round + 1})
        method.check_reply(server, c, replies[c])
    p = [(c + 1) / sum(range(1, k + 1)) for c in range(k)]
    # Execute
    new = method.aggregate(server, replies)
    # Assert: the other factor is untouched; the product is the weighted mean of the local products
    for m, g in glob.items():
        other = "A" if factor == "B" else "B"
        assert torch.equal(getattr(new.pairs[m], other), getattr(g, other))
        local = []
        for c in range(k):
            B = g.B + full[c][m] if factor == "B" else g.B
            A = g.A + full[c][m] if factor == "A" else g.A
            local.append(p[c] * (B @ A))
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, sum(local))


# ----------------------------------------------------------------------------- masked local training and uploads


def test_slots_a_client_may_not_train_are_bit_identical(two_rounds):
    # Prepare
    _, _, log = two_rounds
    for rnd, factor in zip(log, ("B", "A"), strict=True):
        for k, call in rnd.calls.items():
            download, selected = decode_pairs(call.message.arrays), _slots(call.reply)
            moved = 0
            for m, p in call.trained.items():
                # Execute: the trained factor, split into selected and other slots
                start, got = getattr(download[m], factor), getattr(p, factor)
                if factor == "A":
                    start, got = start.T, got.T
                keep = [i for i in range(start.shape[1]) if i not in selected.get(m, [])]
                # Assert
                assert torch.equal(got[:, keep], start[:, keep]), (k, m)
                moved += sum(not torch.equal(got[:, i], start[:, i]) for i in selected.get(m, []))
            assert moved > 0, k


def test_upload_holds_exactly_the_selected_slots(two_rounds):
    # Prepare
    sim, _, log = two_rounds
    n_modules = len(sim.ws.shapes)
    for rnd, factor in zip(log, ("B", "A"), strict=True):
        for k, call in rnd.calls.items():
            budget = rnd.before.ranks[k]
            download = decode_pairs(call.message.arrays)
            # Execute
            selected = _slots(call.reply)
            expected = select_slots(_hand_scores(download, call.probe, factor), budget * n_modules)
            # Assert: the indices are the selection, r_k * N of them in all; the deltas are the trained slots
            assert {m: v.tolist() for m, v in expected.items() if len(v)} == selected
            assert sum(len(v) for v in selected.values()) == budget * n_modules
            keys = {f"delta/{m}/{factor}" for m in selected} | {f"slots/{m}" for m in selected}
            assert set(call.reply.arrays) == keys | {f"extra/{e}" for e in sim.init_extras}
            for m, idx in selected.items():
                assert call.reply.arrays[f"slots/{m}"].dtype == torch.int64
                if factor == "B":
                    want = call.trained[m].B[:, idx] - download[m].B[:, idx]
                else:
                    want = call.trained[m].A[idx] - download[m].A[idx]
                assert torch.equal(call.reply.arrays[f"delta/{m}/{factor}"], want), (k, m)
            assert call.reply.metrics["params_up"] == sum(t.numel() for key, t in call.reply.arrays.items()
                                                          if not key.startswith("slots/"))


def test_selection_is_select_slots_of_the_probe_scores_and_the_probe_is_discarded(two_rounds):
    # Prepare
    sim, _, log = two_rounds
    for rnd, factor in zip(log, ("B", "A"), strict=True):
        for k, call in rnd.calls.items():
            download = decode_pairs(call.message.arrays)
            scores = _hand_scores(download, call.probe, factor)
            # Execute
            chosen = select_slots(scores, rnd.before.ranks[k] * len(sim.ws.shapes))
            # Assert: the selection, and a trained adapter that is not the probe's (the probe is discarded)
            assert {m: v.tolist() for m, v in chosen.items() if len(v)} == _slots(call.reply)
            assert all(float(s.sum()) > 0 for s in scores.values()) or factor == "A"
            assert any(not torch.equal(getattr(call.trained[m], factor), getattr(call.probe[m], factor))
                       for m in download)


def test_a_module_may_get_from_zero_to_all_of_its_slots(two_rounds):
    # The budget is model-wide: over both rounds and three clients, modules got uneven shares
    sim, _, log = two_rounds
    counts = [len(_slots(call.reply).get(m, [])) for rnd in log for call in rnd.calls.values() for m in sim.ws.shapes]
    assert len(set(counts)) > 1


def test_same_seed_gives_the_same_selection_and_upload(tmp_path):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("lora_a2")
    message = method.configure(_start(sim, method), 2)
    # Execute
    a, _, _ = run_client(method, message, None, sim.contexts[2])
    b, _, _ = run_client(method, message, None, sim.contexts[2])
    # Assert
    assert set(a.arrays) == set(b.arrays)
    assert all(torch.equal(a.arrays[key], b.arrays[key]) for key in a.arrays)
    assert a.config == b.config == {"num_examples": sim.n_k[2], "rank": 4, "client": 2, "round": 1}


def test_a_full_budget_reproduces_the_probe(tmp_path):
    # Prepare: r_k = r_G selects every slot, so the masked round is the probe's round, step for step
    sim = _sim(tmp_path, ranks=[1, 2, 4])
    method = make_method("lora_a2", global_rank=4)
    server = _start(sim, method)
    probes = {}
    after_probe = method.client_after_probe

    def recording(plan, pairs, extras, state, message):
        probes["pairs"] = pairs
        return after_probe(plan, pairs, extras, state, message)

    method.client_after_probe = recording
    # Execute
    reply, _, _ = run_client(method, method.configure(server, 2), None, sim.contexts[2])
    trained, _ = sim.ws.extract()
    # Assert
    assert sum(len(v) for v in _slots(reply).values()) == 4 * len(sim.ws.shapes)
    for m, p in trained.items():
        assert torch.equal(p.B, probes["pairs"][m].B)


def test_bytes_match_the_tensors_sent_indices_included(two_rounds):
    # Prepare
    sim, _, log = two_rounds
    head = sum(v.numel() * 4 for v in sim.init_extras.values())
    for rnd, factor in zip(log, ("B", "A"), strict=True):
        for row in rnd.rows:
            call = rnd.calls[row["client"]]
            # Execute: by hand, 4 bytes per float32 delta entry, 8 per int64 index
            by_hand = head
            for m, idx in _slots(call.reply).items():
                d_out, d_in = sim.ws.shapes[m]
                by_hand += len(idx) * ((d_out if factor == "B" else d_in) * 4 + 8)
            down = head + sum((d_out + d_in) * 16 * 4 for d_out, d_in in sim.ws.shapes.values())
            # Assert
            assert row["bytes_up"] == _nbytes(call.reply.arrays) == by_hand
            assert row["bytes_down"] == _nbytes(call.message.arrays) == down


def test_the_probe_is_counted_in_the_local_compute(two_rounds, tmp_path):
    # Prepare
    _, _, log = two_rounds
    sim = _sim(tmp_path)
    fedit = make_method("fedit")
    # Execute
    plain, _, stats = run_client(fedit, fedit.configure(_start(sim, fedit), 0), None, sim.contexts[0])
    # Assert: LoRA-A2's train_seconds = probe + training; a method without a probe reports 0.0
    for rnd in log:
        for call in rnd.calls.values():
            m = call.reply.metrics
            assert m["probe_seconds"] > 0 and m["train_seconds"] > m["probe_seconds"] and m["steps"] == 2
    assert plain.metrics["probe_seconds"] == 0.0 and plain.metrics["train_seconds"] == stats.seconds
    assert plain.metrics["params_up"] == sum(t.numel() for t in plain.arrays.values())


def test_probe_epoch_is_one_pass_over_the_client_data(tmp_path):
    # Prepare
    sim = _sim(tmp_path, local_steps=0, local_epochs=3)
    rounds_probe, epoch_probe = make_method("lora_a2", probe="round"), make_method("lora_a2")
    context = sim.contexts[1]
    message = rounds_probe.configure(_start(sim, rounds_probe), 1)
    plan, _ = rounds_probe.client_plan(message, ClientState(), context, torch.Generator())
    # Execute
    _, steps_round = rounds_probe.client_probe(plan, message, ClientState(), context)
    _, steps_epoch = epoch_probe.client_probe(plan, message, ClientState(), context)
    # Assert
    one_epoch = math.ceil(sim.n_k[1] / 8)
    assert (steps_round, steps_epoch) == (3 * one_epoch, one_epoch)


# ----------------------------------------------------------------------------- server state and replies


def test_init_server_truncates_or_pads_the_shared_init_to_the_global_rank():
    # Prepare: a shared init of rank 4 (B = 0, A random)
    gen = torch.Generator().manual_seed(0)
    init = {"m0": FactorPair(torch.zeros(5, 4), torch.rand(4, 9, generator=gen) - 0.5)}
    # Execute
    small = make_method("lora_a2", global_rank=2).init_server(init, {}, {0: 1, 1: 2}, init_seed=7)
    large = make_method("lora_a2", global_rank=6).init_server(init, {}, {0: 1, 1: 6}, init_seed=7)
    again = make_method("lora_a2", global_rank=6).init_server(init, {}, {0: 6}, init_seed=7)
    # Assert: truncation keeps the first slots; padding adds B = 0 and fresh A rows in PEFT's bound
    assert torch.equal(small.pairs["m0"].A, init["m0"].A[:2]) and small.pairs["m0"].rank == 2
    A = large.pairs["m0"].A
    assert torch.equal(A[:4], init["m0"].A) and torch.equal(large.pairs["m0"].B, torch.zeros(5, 6))
    assert bool((A[4:] != 0).all()) and float(A[4:].abs().max()) <= 1 / math.sqrt(9)
    assert torch.equal(again.pairs["m0"].A, A)  # drawn from (init_seed, r_G)
    assert large.ranks == {0: 1, 1: 6}


def test_budgets_above_the_global_rank_are_refused():
    init = {"m0": FactorPair(torch.zeros(5, 4), torch.ones(4, 9))}
    with pytest.raises(ValueError, match=r"must be in \[1, global_rank = 2\]. Got ranks \[4\]"):
        make_method("lora_a2", global_rank=2).init_server(init, {}, {0: 2, 1: 4}, init_seed=0)


def test_every_budget_downloads_the_global_model(two_rounds):
    sim, method, log = two_rounds
    server = log[-1].after
    for r in BUDGETS:
        assert method.download_is_global(server, r)
        model = method.downloaded_model(server, r)
        assert all(torch.equal(model.pairs[m].B, p.B) and model.pairs[m].rank == 16 for m, p in server.pairs.items())


def _good_reply(factor="B"):
    """A valid reply of client 0 (budget 2, two modules, r_G = 4): 4 slots, 3 in m0 and 1 in m1."""
    shapes = {"m0": (5, 3), "m1": (2, 6)}
    glob = {m: FactorPair(torch.ones(d_out, 4), torch.ones(4, d_in)) for m, (d_out, d_in) in shapes.items()}
    method = make_method("lora_a2", global_rank=4)
    server = method.init_server(glob, {"classifier.bias": torch.zeros(3)}, {0: 2}, init_seed=0)
    server.round = 0 if factor == "B" else 1
    if factor == "B":
        arrays = {"delta/m0/B": torch.ones(5, 3), "delta/m1/B": torch.ones(2, 1)}
    else:
        arrays = {"delta/m0/A": torch.ones(3, 3), "delta/m1/A": torch.ones(1, 6)}
    arrays.update({"slots/m0": torch.tensor([0, 2, 3]), "slots/m1": torch.tensor([1]),
                   **encode_extras({"classifier.bias": torch.ones(3)})})
    reply = Message(arrays, {"num_examples": 4, "rank": 2, "client": 0, "round": server.round + 1})
    return method, server, reply


@pytest.mark.parametrize("kind,match", [
    ("count", r"Reply selects 3 slots in all; expected r_k \* N = 2 \* 2 = 4"),
    ("duplicate", r"slots/m0: indices must be distinct and in \[0, 3\]. Got \[0, 2, 2\]"),
    ("range", r"slots/m0: indices must be distinct and in \[0, 3\]. Got \[0, 2, 4\]"),
    ("int32", r"slots/m0: expected a non-empty 1-d int64 tensor. Got dtype torch.int32"),
    ("empty", r"slots/m1: expected a non-empty 1-d int64 tensor"),
    ("shape", r"delta/m0/B: dtype torch.float32, shape \(5, 2\); expected a floating-point tensor of shape \(5, 3\)"),
    ("nan", r"delta/m1/B: 1 non-finite entries \(NaN or Inf\); expected all finite"),
    ("factor", r"unknown keys \['delta/m0/A'\]; a B-round reply holds 'delta/<module>/B'"),
    ("unpaired", r"Modules \['m1'\]: a reply holds both 'delta/<module>/B' and 'slots/<module>', or neither"),
    ("factor_pair", r"unknown keys \['lora/m0/B'\]"),
    ("round", r"Reply config 'round' is 2; expected 1"),
    ("head", r"missing keys \['extra/classifier.bias'\]"),
])
def test_check_reply_rejects_bad_replies(kind, match):
    # Prepare
    method, server, reply = _good_reply()
    method.check_reply(server, 0, reply)  # the good reply passes
    arrays = reply.arrays
    if kind == "count":
        arrays["slots/m0"], arrays["delta/m0/B"] = torch.tensor([0, 2]), torch.ones(5, 2)
    elif kind == "duplicate":
        arrays["slots/m0"] = torch.tensor([0, 2, 2])
    elif kind == "range":
        arrays["slots/m0"] = torch.tensor([0, 2, 4])
    elif kind == "int32":
        arrays["slots/m0"] = arrays["slots/m0"].to(torch.int32)
    elif kind == "empty":
        arrays["slots/m1"], arrays["delta/m1/B"] = torch.zeros(0, dtype=torch.int64), torch.ones(2, 0)
    elif kind == "shape":
        arrays["delta/m0/B"] = torch.ones(5, 2)
    elif kind == "nan":
        arrays["delta/m1/B"] = torch.tensor([[float("nan")], [0.0]])
    elif kind == "factor":
        arrays["delta/m0/A"] = arrays.pop("delta/m0/B")
    elif kind == "unpaired":
        del arrays["slots/m1"]
    elif kind == "factor_pair":
        arrays["lora/m0/B"] = torch.ones(5, 4)
    elif kind == "round":
        reply.config["round"] = 2
    elif kind == "head":
        del arrays["extra/classifier.bias"]
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        method.check_reply(server, 0, reply)


def test_check_reply_accepts_an_A_round_and_a_module_with_no_slot():
    method, server, reply = _good_reply("A")
    method.check_reply(server, 0, reply)
    # all four slots in m0, none in m1: m1 sends nothing
    reply.arrays["slots/m0"], reply.arrays["delta/m0/A"] = torch.tensor([3, 0, 1, 2]), torch.ones(4, 3)
    del reply.arrays["slots/m1"], reply.arrays["delta/m1/A"]
    method.check_reply(server, 0, reply)
    new = method.aggregate(server, {0: reply})
    assert torch.equal(new.pairs["m1"].A, server.pairs["m1"].A)
    torch.testing.assert_close(new.pairs["m0"].A, server.pairs["m0"].A + 1)


# ----------------------------------------------------------------------------- the frozen head


def test_frozen_head_neither_trains_nor_travels(tmp_path, monkeypatch):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("lora_a2", freeze_head=True, global_rank=8)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert: the initial head in the first download only, never in a reply; the client trains with it
    for t, rnd in enumerate(log, start=1):
        for call in rnd.calls.values():
            assert bool(decode_extras(call.message.arrays)) == (t == 1)
            assert not decode_extras(call.reply.arrays)
            for e, v in sim.init_extras.items():
                assert torch.equal(call.trained_extras[e], v)
                assert torch.equal(call.new_state.arrays[f"extra/{e}"], v)
        assert all(torch.equal(rnd.after.extras[e], v) for e, v in sim.init_extras.items())
    assert log[-1].after.info["joined"] == ["0", "1", "2"]


# ----------------------------------------------------------------------------- end to end


def _sha(folder):
    return sha_tree(folder, exclude=("timings.jsonl", "summary.json", "summary.md"))


@pytest.mark.parametrize("options", [{}, {"freeze_head": True}])
def test_run_experiment_runs_resumes_and_evaluates(tmp_path, options):
    # Prepare
    cfg = RunConfig.from_dict({**SIM, "checkpoint": True, "eval_size": 40, "lora_a2": options})
    full, cut = tmp_path / "full", tmp_path / "cut"

    # Execute: one uninterrupted run; one killed after round 1 and resumed
    summary = run_experiment(cfg, full, progress=False)
    kill_and_resume(cfg, cut)
    # Assert: the same bytes; every budget scored with the global model
    assert _sha(full) == _sha(cut) and "adapters/lora_a2.safetensors" in _sha(full)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    assert set(last["by_rank"]) == {"1", "2", "4"}
    assert all(v["accuracy"] == last["accuracy"] for v in last["by_rank"].values())
    assert last["dropped"] == 0 and all(c["bytes_up"] > 0 for c in last["clients"])
    assert summary[0]["method"] == "lora_a2" and 0.0 <= summary[0]["final"] <= 1.0
    np.testing.assert_array_equal([c["rank"] for c in last["clients"]], BUDGETS)
