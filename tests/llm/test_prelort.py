"""PreLort's prefix-nested training: truncation hooks on the live adapter, the nested loss, rounds (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank_fed.llm.runner.transports as simulation  # noqa: E402
from lowrank_fed import FactorPair, aggregate, truncate  # noqa: E402
from lowrank_fed.aggregation import keep_slots  # noqa: E402
from lowrank_fed.llm.client import run_client  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.data import make_batch  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.peft_bridge import lora_layers  # noqa: E402
from lowrank_fed.llm.protocol import decode_pairs, message_bytes  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from lowrank_fed.llm.training import (  # noqa: E402
    AllTruncations,
    Hook,
    PrefixMask,
    SampledTruncation,
    client_batches,
    train_local,
    truncation_set,
)
from tests.llm.helpers import kill_and_resume, make_sim  # noqa: E402
from tests.llm.helpers import sha_tree as _sha  # noqa: E402

SETTINGS = dict(name="t", model="tiny-bert", dataset="synthetic", methods=["prelort"], clients=3, ranks=[2, 4, 8],
                rounds=2, local_steps=4, batch_size=8, lr=0.01, eval_size=40, max_length=32, eval_every=1)


def _sim(tmp_path, **overrides):
    return make_sim(tmp_path, {**SETTINGS, "checkpoint": False, **overrides})


def _random_pairs(shapes, rank, seed, scale=0.5):
    """A trained-looking adapter: every slot non-zero in both factors."""
    gen = torch.Generator().manual_seed(seed)
    return {m: FactorPair(scale * torch.randn(d_out, rank, generator=gen), scale * torch.randn(rank, d_in, generator=gen))
            for m, (d_out, d_in) in shapes.items()}


def _batches(sim, client, steps, seed=0):
    ctx = sim.contexts[client]  # the client's own rows
    order = client_batches(len(ctx.indices), steps, 8, np.random.default_rng(seed))
    return [make_batch(ctx.data, ctx.indices[b]) for b in order]


def _server(sim, method, seed=1):
    """A server whose global adapter (rank r_max) has non-zero B and A, so every slot has a gradient."""
    return method.init_server(_random_pairs(sim.ws.shapes, max(sim.ranks), seed), sim.init_extras,
                              dict(enumerate(sim.ranks)), init_seed=sim.init_seed)


def _client_of_rank(sim, rank):
    return sim.ranks.index(rank)


def _lora_A_modules(ws):
    return [layer.lora_A[ws.active] for layer in lora_layers(ws.peft).values() if ws.active in layer.lora_A]


def _equal_arrays(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class GradProbe(Hook):
    """After each backward pass: the truncation in force and the raw gradients ``(lora_B, lora_A)`` per module."""

    def __init__(self, ws, truncation):
        self.params, self.truncation, self.log = ws.lora_parameters(), truncation, []

    def after_backward(self, step):
        grads = {m: (B.grad.detach().clone(), A.grad.detach().clone()) for m, (B, A) in self.params.items()}
        self.log.append((self.truncation.tau, grads))


# ----------------------------------------------------------------------------- the truncation set


def test_truncation_set_is_the_federation_ranks_up_to_the_own_rank():
    assert truncation_set([8, 2, 4, 4], 8) == (2, 4, 8)
    assert truncation_set([2, 4, 8], 4) == (2, 4)
    assert truncation_set([2, 4, 8], 2) == (2,)
    assert truncation_set([2, 8], 5) == (2, 5)  # r_k always included
    with pytest.raises(ValueError, match=r"Ranks must be positive ints\. Got \[0\]"):
        truncation_set([0, 2], 2)


def test_download_carries_the_ranks_ladder_unless_nested_is_off(tmp_path):
    # Prepare
    sim = _sim(tmp_path)
    nested, off = make_method("prelort"), make_method("prelort", nested="off")
    # Execute
    on_msg, off_msg = nested.configure(_server(sim, nested), 0), off.configure(_server(sim, off), 0)
    # Assert: the ladder is config (no slot indices); the arrays and their bytes are the same prefix
    assert nested.options.nested == "sample"
    assert on_msg.config["ranks_ladder"] == sorted(set(sim.ranks)) == [2, 4, 8]
    assert "ranks_ladder" not in off_msg.config
    assert _equal_arrays(on_msg.arrays, off_msg.arrays) and on_msg.nbytes == message_bytes(off_msg.arrays)
    with pytest.raises(ValueError, match="Input should be 'sample', 'all' or 'off'"):
        make_method("prelort", nested="some")
    del on_msg.config["ranks_ladder"]
    with pytest.raises(ValueError, match=r"PreLort download config 'ranks_ladder' is None; expected the federation's"):
        nested.client_plan(on_msg, None, sim.contexts[0], torch.Generator())


# ----------------------------------------------------------------------------- the nested loss


def test_all_nested_loss_and_gradient_are_the_means_over_truncated_copies(tmp_path):
    # Prepare: a rank-8 adapter; T = {2, 4, 8}; dropout off (eval) so every pass sees the same model
    sim = _sim(tmp_path)
    ws, T = sim.ws, (2, 4, 8)
    pairs, head = _random_pairs(ws.shapes, 8, 3), sim.init_extras
    batch = _batches(sim, 2, 1)[0]
    hand_losses, hand_grads = [], []
    for tau in T:  # by hand: an adapter of rank tau holding truncate(pairs, tau) (the same product B_:tau A_:tau)
        ws.load({m: truncate(p, tau) for m, p in pairs.items()}, head)
        ws.param_groups({"A": 0.0})
        ws.peft.zero_grad(set_to_none=True)
        ws.peft.eval()
        loss = ws.peft(**batch).loss
        loss.backward()
        hand_losses.append(loss.detach())
        hand_grads.append({m: A.grad.detach().clone() for m, (_, A) in ws.lora_parameters().items()})
    ws.load(pairs, head)
    ws.param_groups({"A": 0.0})
    ws.peft.zero_grad(set_to_none=True)  # the rank-8 adapter is also the hand copy of tau = 8
    ws.peft.eval()
    full_logits = ws.peft(**batch).logits.detach()
    hook = AllTruncations(ws, T)
    # Execute
    out = hook.forward(0, ws.peft, batch)
    out.loss.backward()
    hook.close()
    # Assert: the loss is the mean of the truncated losses; the logits are the whole adapter's
    assert len(set(float(v) for v in hand_losses)) == 3  # the truncations really differ
    torch.testing.assert_close(out.loss.detach(), torch.stack(hand_losses).mean())
    torch.testing.assert_close(out.logits.detach(), full_logits)
    # Assert: the gradient of A row i is (1/|T|) sum over the truncations that keep slot i
    for m, (_, A) in ws.lora_parameters().items():
        expected = torch.zeros_like(A)
        for grads in hand_grads:
            expected[: grads[m].shape[0]] += grads[m] / len(T)
        torch.testing.assert_close(A.grad, expected, rtol=1e-4, atol=1e-7)


def test_sample_gives_the_slots_past_tau_exactly_zero_gradient(tmp_path):
    # Prepare: a rank-8 adapter with every slot non-zero; T = {2, 4, 8}
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 4), sim.init_extras)
    groups = ws.param_groups({"A": 0.01, "B": 0.01, "extras": 0.01})
    truncation = SampledTruncation(ws, (2, 4, 8), torch.Generator().manual_seed(0))
    probe = GradProbe(ws, truncation)
    # Execute
    train_local(ws.peft, _batches(sim, 2, 12), groups, hooks=[truncation, probe])
    # Assert
    assert [tau for tau, _ in probe.log] == truncation.taus and {2, 4} <= set(truncation.taus)
    for tau, grads in probe.log:
        for m, (gB, gA) in grads.items():
            assert torch.equal(gB[:, tau:], torch.zeros_like(gB[:, tau:])), (m, tau)
            assert torch.equal(gA[tau:], torch.zeros_like(gA[tau:])), (m, tau)
            assert bool((gB[:, :tau].abs().sum(0) > 0).all()) and bool((gA[:tau].abs().sum(1) > 0).all()), (m, tau)


def test_the_same_seed_gives_the_same_truncations(tmp_path):
    # Prepare
    sim = _sim(tmp_path)
    sim.ws.load(_random_pairs(sim.ws.shapes, 8, 0))
    hooks = [SampledTruncation(sim.ws, (2, 4, 8), torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    # Execute
    for h in hooks:
        for step in range(30):
            h.before_forward(step, {})
        h.close()
    # Assert: uniform over T, reproducible, and the seed matters
    assert hooks[0].taus == hooks[1].taus != hooks[2].taus
    assert set(hooks[0].taus) == {2, 4, 8}


def test_run_client_draws_the_same_truncations_and_trains_the_same_given_the_seed(tmp_path):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("prelort")
    k = _client_of_rank(sim, 8)
    message = method.configure(_server(sim, method), k)
    # Execute
    a, _, _ = run_client(method, message, None, sim.contexts[k])
    b, _, _ = run_client(method, message, None, sim.contexts[k])
    # Assert
    assert a.metrics["nested_taus"] == b.metrics["nested_taus"] and len(a.metrics["nested_taus"]) == 4
    assert a.metrics["nested_truncations"] == [2, 4, 8]
    assert a.metrics["nested_counts"] == [a.metrics["nested_taus"].count(t) for t in (2, 4, 8)]
    assert _equal_arrays(a.arrays, b.arrays)


@pytest.mark.parametrize("nested", ["sample", "all"])
def test_a_smallest_rank_client_trains_bit_identically_to_off(tmp_path, nested):
    # Prepare: T_k = {r_k} for the rank-2 client; the rank-8 client has T_k = {2, 4, 8}
    sim = _sim(tmp_path)
    on, off = make_method("prelort", nested=nested), make_method("prelort", nested="off")
    server = _server(sim, on)
    small, large = _client_of_rank(sim, 2), _client_of_rank(sim, 8)
    # Execute
    got, _, got_stats = run_client(on, on.configure(server, small), None, sim.contexts[small])
    want, _, want_stats = run_client(off, off.configure(server, small), None, sim.contexts[small])
    big_on, _, _ = run_client(on, on.configure(server, large), None, sim.contexts[large])
    big_off, _, _ = run_client(off, off.configure(server, large), None, sim.contexts[large])
    # Assert
    assert got.metrics["nested_truncations"] == [2] and got.metrics["nested_counts"] == [4]
    assert _equal_arrays(got.arrays, want.arrays)
    assert got_stats.loss == want_stats.loss
    assert not _equal_arrays(big_on.arrays, big_off.arrays)  # where T_k has several truncations, it matters


def test_close_restores_the_untruncated_forward_pass(tmp_path):
    # Prepare
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 2), sim.init_extras)
    ws.peft.eval()
    batch = _batches(sim, 1, 1)[0]
    with torch.no_grad():
        plain = ws.peft(**batch).logits
    mask = PrefixMask(ws, (2,))
    mask.tau = 2
    # Execute
    with torch.no_grad():
        truncated = ws.peft(**batch).logits
        mask.close()
        after = ws.peft(**batch).logits
    # Assert
    assert not torch.equal(truncated, plain)
    assert torch.equal(after, plain)
    assert all(not module._forward_hooks for module in _lora_A_modules(ws))


def test_training_closes_its_truncation_hooks(tmp_path):
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 2), sim.init_extras)
    groups = ws.param_groups({"A": 0.01, "B": 0.01})
    for make in (lambda: SampledTruncation(ws, (2, 8), torch.Generator().manual_seed(0)),
                 lambda: AllTruncations(ws, (2, 8))):
        hook = make()
        assert all(module._forward_hooks for module in _lora_A_modules(ws))
        train_local(ws.peft, _batches(sim, 2, 2), groups, hooks=[hook])
        assert all(not module._forward_hooks for module in _lora_A_modules(ws)) and hook.tau is None


def test_only_one_hook_may_replace_the_forward_pass(tmp_path):
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 4, 2), sim.init_extras)
    hooks = [AllTruncations(ws, (2, 4)), AllTruncations(ws, (2, 4))]
    with pytest.raises(ValueError, match=r"At most one hook may replace the forward pass\. Got \['AllTruncations', "
                                         r"'AllTruncations'\]"):
        train_local(ws.peft, _batches(sim, 2, 1), ws.param_groups({"A": 0.01}), hooks=hooks)
    with pytest.raises(ValueError, match=r"The 'truncations' parameter must hold positive ints\. Got \[0, 2\]"):
        PrefixMask(ws, [0, 2])


# ----------------------------------------------------------------------------- rounds


def _record_clients(monkeypatch) -> dict:
    """Record every ``run_client`` call of the runner: client id -> (message downloaded, reply uploaded)."""
    calls = {}

    def recording(method_, message, state, context):
        reply, new_state, stats = run_client(method_, message, state, context)
        calls[context.client_id] = (message, reply)
        return reply, new_state, stats

    monkeypatch.setattr(simulation, "run_client", recording)
    return calls


@pytest.mark.parametrize("nested", ["sample", "all"])
def test_two_rounds_through_run_round(tmp_path, monkeypatch, nested):
    # Prepare: record every run_client call
    sim = _sim(tmp_path)
    method = make_method("prelort", nested=nested)
    calls = _record_clients(monkeypatch)
    server, clients = _server(sim, method), {}
    # Execute / Assert, round by round
    for t in (1, 2):
        calls.clear()
        before = server
        server, clients, rows, _ = sim.run_round(method, server, clients, t)
        for row in rows:
            k = row["client"]
            message, reply = calls[k]
            r, T = sim.ranks[k], list(truncation_set(sim.ranks, sim.ranks[k]))
            assert message.config["ranks_ladder"] == [2, 4, 8] and message.config["rank"] == r
            # the download is the prefix, the upload the whole client adapter; bytes are the tensors sent
            for m, p in decode_pairs(message.arrays).items():
                assert torch.equal(p.B, before.pairs[m].B[:, :r]) and torch.equal(p.A, before.pairs[m].A[:r])
            assert all(p.rank == r for p in decode_pairs(reply.arrays).values())
            assert (row["bytes_down"], row["bytes_up"]) == (message_bytes(message.arrays), message_bytes(reply.arrays))
            # the truncations used
            metrics = reply.metrics
            assert metrics["nested_truncations"] == T
            if nested == "sample":
                assert set(metrics["nested_taus"]) <= set(T) and sum(metrics["nested_counts"]) == metrics["steps"]
            else:
                assert metrics["nested_counts"] == [metrics["steps"]] * len(T)
        # the server step is the core's segment rule with previous=
        replies = [calls[k][1] for k in sorted(calls)]
        weights = [float(x.config["num_examples"]) for x in replies]
        for m, previous in before.pairs.items():
            rule = aggregate("segment", [decode_pairs(x.arrays)[m] for x in replies], weights, previous=previous)
            expected = keep_slots(rule, previous, max(sim.ranks))
            torch.testing.assert_close(server.pairs[m].B, expected.B)
            torch.testing.assert_close(server.pairs[m].A, expected.A)
        assert server.round == t
    res = sim.evaluate(method, server, clients)
    assert 0.0 <= res["accuracy"] <= 1.0


@pytest.mark.parametrize("nested", ["sample", "all"])
def test_run_experiment_runs_resumes_and_evaluates(tmp_path, nested):
    # Prepare
    cfg = RunConfig.from_dict({**SETTINGS, "prelort": {"nested": nested}})
    full, cut = tmp_path / "full", tmp_path / "cut"

    # Execute: one run straight through; one killed after round 1 and resumed
    summary = run_experiment(cfg, full, progress=False)
    kill_and_resume(cfg, cut)
    # Assert
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [("prelort", 0), ("prelort", 1), ("prelort", 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert set(summary[0]["by_rank"]) == {"2", "4", "8"}  # each rank's own download, scored
    assert _sha(full / "adapters") == _sha(cut / "adapters") and _sha(full / "adapters")
    assert (full / "metrics.jsonl").read_bytes() == (cut / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------- the step leaves the held slots


class StepProbe(Hook):
    """Around each optimiser step: the truncation in force, and every LoRA factor with its optimiser state, before and after."""

    def __init__(self, ws, truncation):
        self.params, self.truncation, self.log, self.opt = ws.lora_parameters(), truncation, [], None

    def _snapshot(self):
        def state(p):
            return {k: v.clone() for k, v in self.opt.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape}

        return {m: [(p.detach().clone(), state(p), axis) for p, axis in ((B, 1), (A, 0))] for m, (B, A) in self.params.items()}

    def before_step(self, step, optimizer):
        self.opt = optimizer
        self.before = self._snapshot()

    def after_step(self, step):  # listed after the truncation, so this sees the slots it wrote back
        self.log.append((self.truncation.tau, self.before, self._snapshot()))


def _assert_held(log, rank, *, held=True):
    """Slots >= tau bit-identical (parameter and state) across each step where tau < rank; slots < tau moved."""
    checked = 0
    for tau, before, after in log:
        for m in before:
            for (p0, s0, axis), (p1, s1, _) in zip(before[m], after[m]):
                tail0, tail1 = p0.narrow(axis, tau, rank - tau), p1.narrow(axis, tau, rank - tau)
                assert bool((p0.narrow(axis, 0, tau) != p1.narrow(axis, 0, tau)).any()), (m, tau)  # the prefix moved
                if tau == rank:
                    continue
                checked += 1
                if not held:
                    assert not torch.equal(tail0, tail1), (m, tau)
                    continue
                assert torch.equal(tail0, tail1), (m, tau)
                assert set(s1) >= set(s0)
                for key, value in s1.items():
                    want = s0[key].narrow(axis, tau, rank - tau) if key in s0 else torch.zeros_like(value.narrow(axis, tau, rank - tau))
                    assert torch.equal(value.narrow(axis, tau, rank - tau), want), (m, tau, key)
    assert checked > 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_sampled_step_leaves_the_slots_past_tau_and_their_optimiser_state_untouched(tmp_path, optimizer):
    # Prepare: a rank-8 adapter, T = {2, 4, 8}, weight decay on (so the plain step would move every slot)
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 4), sim.init_extras)
    groups = ws.param_groups({"A": 0.01, "B": 0.01, "extras": 0.01})
    truncation = SampledTruncation(ws, (2, 4, 8), torch.Generator().manual_seed(0))
    probe = StepProbe(ws, truncation)
    # Execute
    train_local(ws.peft, _batches(sim, 2, 12), groups, hooks=[truncation, probe], optimizer=optimizer,
                weight_decay=0.1)
    # Assert: every truncation was drawn; the held slots and their Adam moments did not change
    assert {2, 4, 8} <= set(truncation.taus)
    if optimizer == "adamw":
        assert all(set(s) == {"exp_avg", "exp_avg_sq"} for _, _, after in probe.log for m in after for _, s, _ in after[m])
    _assert_held(probe.log, 8)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_without_the_hold_the_optimiser_moves_the_slots_past_tau(tmp_path, optimizer):
    # the same run with hold=False: momentum and weight decay move the slots outside tau (what the hold prevents)
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 4), sim.init_extras)
    groups = ws.param_groups({"A": 0.01, "B": 0.01, "extras": 0.01})
    truncation = SampledTruncation(ws, (2, 4, 8), torch.Generator().manual_seed(0), hold=False)
    probe = StepProbe(ws, truncation)
    train_local(ws.peft, _batches(sim, 2, 12), groups, hooks=[truncation, probe], optimizer=optimizer,
                weight_decay=0.1)
    _assert_held(probe.log, 8, held=False)


def test_the_hold_covers_sgd_momentum(tmp_path):
    # Prepare: SGD with momentum and weight decay (not what make_optimizer builds, any torch optimiser works)
    sim = _sim(tmp_path)
    ws = sim.ws
    ws.load(_random_pairs(ws.shapes, 8, 5), sim.init_extras)
    params = [p for g in ws.param_groups({"A": 0.01, "B": 0.01}) for p in g["params"]]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    mask = PrefixMask(ws, (2, 4, 8))
    probe = StepProbe(ws, mask)
    ws.peft.train()
    # Execute: the full rank first (a momentum buffer in every slot), then truncations 2 and 4
    for step, (tau, batch) in enumerate(zip((8, 2, 4, 2), _batches(sim, 2, 4))):
        mask.tau = tau
        ws.peft(**batch).loss.backward()
        for hook in (mask, probe):
            hook.before_step(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for hook in (mask, probe):
            hook.after_step(step)
    mask.close()
    # Assert: the buffers of the held slots kept the values the first step gave them
    assert all(set(s) == {"momentum_buffer"} for _, before, _ in probe.log[1:] for m in before for _, s, _ in before[m])
    assert all(bool(s["momentum_buffer"].abs().sum() > 0) for _, before, _ in probe.log[1:2]
               for m in before for _, s, _ in before[m])
    _assert_held(probe.log, 8)


# ----------------------------------------------------------------------------- the prefix share of the update


@pytest.mark.parametrize("name", ["prelort", "fedit", "replication"])
def test_each_client_row_carries_the_prefix_share_of_its_update(tmp_path, monkeypatch, name):
    # Prepare: record every run_client call; a server whose adapter is non-zero (so the start matters)
    sim = _sim(tmp_path)
    method = make_method(name)
    calls = _record_clients(monkeypatch)
    # Execute
    _, _, rows, _ = sim.run_round(method, _server(sim, method), {}, 1)
    # Assert: share_t = sum_m ||Delta W_{m,:t}||^2 / sum_m ||Delta W_m||^2 from the download and the upload, densely
    levels = {2: [], 4: ["2"], 8: ["2", "4"]}
    for row in rows:
        message, reply = calls[row["client"]]
        down, up = decode_pairs(message.arrays), decode_pairs(reply.arrays)

        def energy(t):
            return sum(float(torch.linalg.matrix_norm((up[m].B[:, :t] @ up[m].A[:t] - down[m].B[:, :t] @ down[m].A[:t])
                                                      .double()) ** 2) for m in down)

        r = row["rank"]
        assert list(row["prefix_share"]) == levels[r]
        for t, share in row["prefix_share"].items():
            assert share == pytest.approx(energy(int(t)) / energy(r), rel=1e-4)
            assert 0.0 < share < 1.5
        assert reply.metrics["prefix_energy"][-1] == pytest.approx(energy(r), rel=1e-4)


def test_the_round_row_averages_the_clients_prefix_shares(tmp_path):
    # Prepare / Execute: one round of the tiny run, written to metrics.jsonl
    cfg = RunConfig.from_dict({**SETTINGS, "rounds": 1, "methods": ["prelort", "fedit"]})
    run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Assert
    for row in (r for r in rows if r["round"] == 1):
        clients = row["clients"]
        assert set(row["prefix_share"]) == {"2", "4"}
        for t in ("2", "4"):
            values = [c["prefix_share"][t] for c in clients if t in c["prefix_share"]]
            assert row["prefix_share"][t] == pytest.approx(float(np.mean(values)))
        assert len([c for c in clients if "2" in c["prefix_share"]]) == 2


def test_the_toy_benchmark_shows_nesting_putting_the_update_into_the_prefix():
    # benchmarks/bench_prelort.py's toy regression (rank 16, T = {4, 8, 16}), 100 steps, one seed
    from benchmarks.bench_prelort import run_mode

    off, sample, all_ = (run_mode(mode, 0, checkpoints=(20, 100)) for mode in ("off", "sample", "all"))
    # the prefix carries more of the update, and truncated to 4 slots it is a much better rank-4 model
    assert sample[100]["share4"] > off[100]["share4"] + 0.2 and all_[100]["share4"] > off[100]["share4"] + 0.2
    assert sample[100]["err4"] < off[100]["err4"] - 0.2 and all_[100]["err4"] < off[100]["err4"] - 0.2
    # the whole adapter still fits, if more slowly; after 20 steps the prefix is no better than without nesting
    assert sample[100]["err16"] < 0.2 and sample[20]["err4"] > 0.7


def test_update_prefix_energy_sums_modules_and_counts_a_lower_rank_module_whole():
    from lowrank_fed.linalg import prefix_update_energy
    from lowrank_fed.llm.client import update_prefix_energy

    start = {"a": _random_pairs({"a": (5, 6)}, 2, 1)["a"], "b": _random_pairs({"b": (4, 3)}, 4, 2)["b"]}
    end = {"a": _random_pairs({"a": (5, 6)}, 2, 3)["a"], "b": _random_pairs({"b": (4, 3)}, 4, 4)["b"]}
    ea, eb = prefix_update_energy(start["a"], end["a"]), prefix_update_energy(start["b"], end["b"])
    got = update_prefix_energy(start, end)
    assert got == pytest.approx([ea[0] + eb[0], ea[1] + eb[1], ea[1] + eb[2], ea[1] + eb[3]])
    assert update_prefix_energy(start, {"a": end["a"]}) is None  # not the same modules: no energy
    assert update_prefix_energy(start, {"a": end["a"], "b": _random_pairs({"b": (4, 3)}, 3, 4)["b"]}) is None
