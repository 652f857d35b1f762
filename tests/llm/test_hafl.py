"""HAFL: importance scores, top-r_k slot selection, truncation and freezing clients, slot-wise server (tiny models)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank_fed.llm.runner.simulation as simulation  # noqa: E402
from lowrank_fed import FactorPair, aggregate  # noqa: E402
from lowrank_fed.aggregation import weighted_average  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.protocol import Message, decode_pairs, encode_extras, encode_pairs  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from lowrank_fed.llm.training import SlotImportance, slot_scores  # noqa: E402
from tests.llm.helpers import SHAPES, kill_and_resume, make_sim, tiny_settings  # noqa: E402
from tests.llm.helpers import head as _head  # noqa: E402
from tests.llm.helpers import nbytes as _nbytes  # noqa: E402
from tests.llm.helpers import pairs as _pairs  # noqa: E402
from tests.llm.helpers import run_rounds as _run_rounds  # noqa: E402
from tests.llm.helpers import sha_tree as _sha  # noqa: E402

VARIANTS = ("truncation", "freezing")
SCORERS = ("client", "server")


# ----------------------------------------------------------------------------- helpers (patterns of test_methods.py)


def _sim(tmp_path, **overrides):
    return make_sim(tmp_path, tiny_settings(**{"methods": ["hafl"], **overrides}))


def _slots(arrays):
    return {k[len("slots/"):]: v for k, v in arrays.items() if k.startswith("slots/")}


def _take(pair, idx):
    return FactorPair(pair.B[:, idx], pair.A[idx, :])


class _ToyWorkspace:
    """The one method SlotImportance reads: ``lora_parameters() -> {module: (lora_B, lora_A)}``."""

    def __init__(self, params):
        self.params = params

    def lora_parameters(self):
        return self.params


def _server_with_scores(variant, scores, ranks, R=8, scorer="client"):
    """A rank-R server whose stored slot scores are ``scores[m]`` (so the selections are known)."""
    method = make_method("hafl", variant=variant, scorer=scorer)
    server = method.init_server(_pairs(R, 9), _head(9), ranks, init_seed=0)
    server.arrays = {f"scores/{m}": torch.as_tensor(s, dtype=torch.float32) for m, s in scores.items()}
    return method, server


def _reply_for(method, server, k, seed, n):
    """A well-formed reply of client k: random compact factors of its given slots, its slots, a head, scores."""
    rank, R = server.ranks[k], 8
    given = method.selection(server, rank)
    pairs = _pairs(rank, seed)
    arrays = {**encode_pairs(pairs), **{f"slots/{m}": idx.clone() for m, idx in given.items()},
              **encode_extras(_head(seed))}
    if method.options.scorer == "client":
        held = rank if method.options.variant == "truncation" else R
        gen = torch.Generator().manual_seed(100 + seed)
        arrays.update({f"scores/{m}": torch.rand(held, generator=gen) for m in SHAPES})
    return Message(arrays, {"num_examples": n, "rank": rank, "client": k, "round": server.round + 1})


SCORES = {"m0": [0.1, 0.9, 0.0, 0.5, 0.7, 0.2, 0.3, 0.8], "m1": [1.0, 0.0, 0.2, 0.4, 0.3, 0.6, 0.5, 0.1]}
# top-2 / top-4 by these scores (sorted indices): m0 {1, 7} / {1, 3, 4, 7}; m1 {0, 5} / {0, 3, 5, 6}
TOP = {2: {"m0": [1, 7], "m1": [0, 5]}, 4: {"m0": [1, 3, 4, 7], "m1": [0, 3, 5, 6]}, 8: {m: list(range(8)) for m in SHAPES}}


# ----------------------------------------------------------------------------- the importance hook


def test_importance_ema_equals_a_hand_computation_over_three_steps():
    # Prepare: one module, B (2, 2) and A (2, 3) in float64; hand-written gradients; A has none at step 2
    B = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
    A = torch.nn.Parameter(torch.tensor([[2.0, 0.0, -1.0], [1.0, 4.0, -0.5]], dtype=torch.float64))
    grads_B = [[[0.2, 0.1], [-0.4, 0.0]], [[1.0, -0.3], [0.2, 0.5]], [[-0.1, 0.2], [0.3, -0.6]]]
    grads_A = [[[0.5, 1.0, -2.0], [0.1, 0.0, 0.3]], None, [[-1.0, 0.2, 0.4], [0.6, -0.25, 2.0]]]
    hook = SlotImportance(_ToyWorkspace({"m": (B, A)}), beta1=0.85, beta2=0.85)
    # Execute
    for step, (gB, gA) in enumerate(zip(grads_B, grads_A, strict=True)):
        B.grad = torch.tensor(gB, dtype=torch.float64)
        A.grad = None if gA is None else torch.tensor(gA, dtype=torch.float64)
        hook.after_backward(step)
    # Assert: element by element in plain Python floats
    b1 = b2 = 0.85

    def by_hand(w, grads):
        rows, cols = len(w), len(w[0])
        ibar = [[0.0] * cols for _ in range(rows)]
        ubar = [[0.0] * cols for _ in range(rows)]
        for g in grads:
            if g is None:  # no gradient: skipped, averages unchanged
                continue
            for i in range(rows):
                for j in range(cols):
                    sens = abs(w[i][j] * g[i][j])
                    ibar[i][j] = b1 * ibar[i][j] + (1 - b1) * sens
                    ubar[i][j] = b2 * ubar[i][j] + (1 - b2) * abs(sens - ibar[i][j])
        return ibar, ubar

    (ib_B, ub_B), (ib_A, ub_A) = hook.averages()["m"]
    hand_ib_B, hand_ub_B = by_hand(B.tolist(), grads_B)
    hand_ib_A, hand_ub_A = by_hand(A.tolist(), grads_A)
    for got, want in ((ib_B, hand_ib_B), (ub_B, hand_ub_B), (ib_A, hand_ib_A), (ub_A, hand_ub_A)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    score_B, score_A = hook.element_scores()["m"]
    torch.testing.assert_close(score_B, torch.tensor(hand_ib_B, dtype=torch.float64) * torch.tensor(hand_ub_B))
    assert hook.steps == 3
    # one value by hand: B[0, 0] = 1 with gradients 0.2, 1.0, -0.1 -> I = 0.2, 1.0, 0.1
    ib = ub = 0.0
    for sens in (0.2, 1.0, 0.1):
        ib = 0.85 * ib + 0.15 * sens
        ub = 0.85 * ub + 0.15 * abs(sens - ib)
    assert float(ib_B[0, 0]) == pytest.approx(ib, rel=1e-12) and float(ub_B[0, 0]) == pytest.approx(ub, rel=1e-12)


def test_slot_scores_reduce_element_scores_by_column_and_row_means():
    # Prepare
    score_B = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 6.0]])  # (d_out=2, r=3)
    score_A = torch.tensor([[1.0, 1.0], [0.0, 2.0], [5.0, 1.0]])  # (r=3, d_in=2)
    # Execute
    got = slot_scores(score_B, score_A)
    # Assert: S_i = mean_j score_B[j, i] + mean_j score_A[i, j]
    torch.testing.assert_close(got, torch.tensor([(1 + 3) / 2 + 1.0, (2 + 4) / 2 + 1.0, (0 + 6) / 2 + 3.0]))
    with pytest.raises(ValueError, match=r"shapes \(d_out, r\) and \(r, d_in\). Got \(2, 3\) and \(2, 2\)"):
        slot_scores(score_B, score_A[:2])


def test_hook_slot_scores_are_the_reduction_of_its_element_scores():
    gen = torch.Generator().manual_seed(0)
    params = {m: (torch.nn.Parameter(torch.randn(d_out, 3, generator=gen)),
                  torch.nn.Parameter(torch.randn(3, d_in, generator=gen))) for m, (d_out, d_in) in SHAPES.items()}
    hook = SlotImportance(_ToyWorkspace(params))
    for step in range(4):
        for B, A in params.values():
            B.grad, A.grad = torch.randn(B.shape, generator=gen), torch.randn(A.shape, generator=gen)
        hook.after_backward(step)
    elements = hook.element_scores()
    for m, S in hook.slot_scores().items():
        sB, sA = elements[m]
        torch.testing.assert_close(S, sB.mean(dim=0) + sA.mean(dim=1))
        assert S.shape == (3,) and bool((S > 0).all())


def test_sensitivity_on_raw_peft_tensors_equals_the_folded_one():
    # Prepare: W = W0 + s B_peft A with s = 4; the folded factor is B_f = s B_peft
    gen = torch.Generator().manual_seed(1)
    s, x = 4.0, torch.randn(10, 5, generator=gen, dtype=torch.float64)
    B_peft = torch.randn(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(10, 6, generator=gen, dtype=torch.float64)

    def loss(B_folded):
        return ((x @ (B_folded @ A).T - target) ** 2).mean()

    # Execute
    loss(s * B_peft).backward()
    B_f = (s * B_peft).detach().requires_grad_(True)
    loss(B_f).backward()
    # Assert: |w dL/dw| is the same on either tensor (the scale cancels)
    torch.testing.assert_close((B_peft * B_peft.grad).abs(), (B_f * B_f.grad).abs())


def test_importance_rejects_bad_betas():
    with pytest.raises(ValueError, match=r"The 'beta1' parameter must be in \[0, 1\). Got 1.0"):
        SlotImportance(_ToyWorkspace({}), beta1=1.0)
    with pytest.raises(ValueError, match="Input should be"):
        make_method("hafl", variant="prefix")


# ----------------------------------------------------------------------------- server side


@pytest.mark.parametrize("variant", VARIANTS)
def test_selection_is_each_modules_top_r_and_the_prefix_before_any_score(variant):
    # Prepare
    method, server = _server_with_scores(variant, SCORES, {0: 2, 1: 4, 2: 8})
    fresh = make_method("hafl", variant=variant).init_server(_pairs(8, 9), {}, {0: 2, 1: 4, 2: 8}, init_seed=0)
    # Execute / Assert: top-r_k indices (sorted), not a prefix; the prefix when there are no scores yet
    for r in (2, 4, 8):
        got = method.selection(server, r)
        assert {m: v.tolist() for m, v in got.items()} == TOP[r]
        assert all(v.dtype == torch.int64 for v in got.values())
        assert {m: v.tolist() for m, v in make_method("hafl", variant=variant).selection(fresh, r).items()} == \
            {m: list(range(r)) for m in SHAPES}


def test_server_scorer_ranks_slots_by_the_norm_of_each_rank_one_term():
    # Prepare: slot norms ||b_i|| ||a_i|| set by scaling columns of B
    method = make_method("hafl", scorer="server")
    pairs = _pairs(4, 3)
    scale = torch.tensor([0.1, 5.0, 0.0, 2.0])
    pairs = {m: FactorPair(p.B * scale, p.A) for m, p in pairs.items()}
    server = method.init_server(pairs, {}, {0: 2, 1: 4}, init_seed=0)
    # Execute
    got = method.selection(server, 2)
    # Assert
    for m, p in pairs.items():
        norms = torch.linalg.vector_norm(p.B, dim=0) * torch.linalg.vector_norm(p.A, dim=1)
        assert got[m].tolist() == sorted(torch.argsort(norms, descending=True)[:2].tolist())
    zero = method.init_server({m: FactorPair(torch.zeros_like(p.B), p.A) for m, p in pairs.items()}, {}, {0: 2},
                              init_seed=0)
    assert all(v.tolist() == [0, 1] for v in method.selection(zero, 2).values())  # round 1: B = 0, the prefix


@pytest.mark.parametrize("variant", VARIANTS)
def test_download_holds_the_selected_slots_and_its_bytes_are_the_tensors_sent(variant):
    # Prepare
    method, server = _server_with_scores(variant, SCORES, {0: 2, 1: 4, 2: 8})
    for k, r in server.ranks.items():
        # Execute
        message = method.configure(server, k)
        # Assert: slots as int64 arrays; truncation sends those slots only, freezing all R
        pairs, slots = decode_pairs(message.arrays), _slots(message.arrays)
        assert {m: v.tolist() for m, v in slots.items()} == TOP[r]
        for m, g in server.pairs.items():
            want = _take(g, slots[m]) if variant == "truncation" else g
            assert torch.equal(pairs[m].B, want.B) and torch.equal(pairs[m].A, want.A)
        held = r if variant == "truncation" else 8
        by_hand = sum(4 * held * (d_out + d_in) + 8 * r for d_out, d_in in SHAPES.values()) + 4 * (15 + 3)
        assert message.nbytes == _nbytes(message.arrays) == by_hand
        assert message.config == {"round": 1, "rank": r, "client": k}
        # the model evaluated for this rank is the one sent
        model = method.downloaded_model(server, r)
        for m in SHAPES:
            assert torch.equal(model.pairs[m].B, pairs[m].B) and torch.equal(model.pairs[m].A, pairs[m].A)
        assert method.download_is_global(server, r) == (variant == "freezing" or r == 8)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_server_step_is_the_core_slotwise_rule_and_scores_are_data_weighted(variant, scorer):
    # Prepare: clients of ranks 2 and 4 against a rank-8 global: slots 2, 6 (m0) and 1, 2, 4, 7 (m1) nobody trains
    method, server = _server_with_scores(variant, SCORES, {0: 2, 1: 4}, scorer=scorer)
    if scorer == "server":
        server.arrays = {}
    replies = {k: _reply_for(method, server, k, 20 + k, n) for k, n in ((0, 3), (1, 1))}
    for k, reply in replies.items():
        method.check_reply(server, k, reply)
    # Execute
    new = method.aggregate(server, replies)
    # Assert: the core rule called directly gives the same pairs; untouched slots keep their value
    for m, prev in server.pairs.items():
        expected = aggregate("slotwise", [decode_pairs(r.arrays)[m] for r in replies.values()], [3, 1],
                             slots=[r.arrays[f"slots/{m}"] for r in replies.values()], previous=prev)
        torch.testing.assert_close(new.pairs[m].B, expected.B)
        torch.testing.assert_close(new.pairs[m].A, expected.A)
        given = set().union(*(method.selection(server, r)[m].tolist() for r in (2, 4)))
        untouched = sorted(set(range(8)) - given)
        assert untouched and torch.equal(new.pairs[m].B[:, untouched], prev.B[:, untouched])
        assert torch.equal(new.pairs[m].A[untouched], prev.A[untouched])
    for e in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(new.extras[e], weighted_average([_head(20)[e], _head(21)[e]], [3, 1]))
    if scorer == "server":
        assert new.arrays == {}
        return
    # scores: per slot, the n_k-weighted mean of this round's reports; slots nobody reported keep theirs
    for m in SHAPES:
        num, den = torch.zeros(8), torch.zeros(8)
        for reply, n in zip(replies.values(), (3, 1), strict=True):
            held = reply.arrays[f"slots/{m}"] if variant == "truncation" else torch.arange(8)
            num[held] += n * reply.arrays[f"scores/{m}"]
            den[held] += n
        want = torch.where(den > 0, num / den.clamp(min=1), torch.tensor(SCORES[m]))
        torch.testing.assert_close(new.arrays[f"scores/{m}"], want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_padding_at_the_slots_dilutes_what_the_adaptive_rule_averages(variant):
    """``aggregation = "zero_pad"``: the same client side, the core rule with ``absent="zero"``; a slot one of the
    two clients trained is shrunk by that client's weight, the slots both trained are the same, the scores too."""
    # Prepare
    method, server = _server_with_scores(variant, SCORES, {0: 2, 1: 4})
    padded = make_method("hafl", variant=variant, aggregation="zero_pad")
    replies = {k: _reply_for(method, server, k, 20 + k, n) for k, n in ((0, 3), (1, 1))}
    # Execute
    adaptive, diluted = method.aggregate(server, replies), padded.aggregate(server, replies)
    # Assert
    for m, prev in server.pairs.items():
        slots = [r.arrays[f"slots/{m}"] for r in replies.values()]
        expected = aggregate("slotwise", [decode_pairs(r.arrays)[m] for r in replies.values()], [3, 1],
                             slots=slots, previous=prev, absent="zero")
        torch.testing.assert_close(diluted.pairs[m].B, expected.B)
        torch.testing.assert_close(diluted.pairs[m].A, expected.A)
        both = sorted(set(slots[0].tolist()) & set(slots[1].tolist()))
        only_1 = sorted(set(slots[1].tolist()) - set(slots[0].tolist()))
        assert only_1, "client 1 (rank 4) must hold a slot client 0 does not"
        torch.testing.assert_close(diluted.pairs[m].B[:, only_1], adaptive.pairs[m].B[:, only_1] * 0.25)
        torch.testing.assert_close(diluted.pairs[m].B[:, both], adaptive.pairs[m].B[:, both])
    for key, value in adaptive.arrays.items():
        assert torch.equal(diluted.arrays[key], value)


def test_held_mean_is_the_fedavg_of_what_each_freezing_client_holds():
    """``aggregation = "held_mean"`` under freezing: each client holds all R slots, its own trained and the rest at
    the global value, and the new global adapter is the factor-wise FedAvg of those held adapters (weights n_k)."""
    # Prepare
    method, server = _server_with_scores("freezing", SCORES, {0: 2, 1: 4})
    held_mean = make_method("hafl", variant="freezing", aggregation="held_mean")
    replies = {k: _reply_for(method, server, k, 20 + k, n) for k, n in ((0, 3), (1, 1))}
    # Execute
    new = held_mean.aggregate(server, replies)
    # Assert
    for m, prev in server.pairs.items():
        held = []
        for r in replies.values():
            B, A, idx = prev.B.clone(), prev.A.clone(), r.arrays[f"slots/{m}"]
            B[:, idx], A[idx] = decode_pairs(r.arrays)[m].B, decode_pairs(r.arrays)[m].A
            held.append((B, A))
        torch.testing.assert_close(new.pairs[m].B, 0.75 * held[0][0] + 0.25 * held[1][0])
        torch.testing.assert_close(new.pairs[m].A, 0.75 * held[0][1] + 0.25 * held[1][1])
        untouched = sorted(set(range(8)) - set(TOP[4][m]))  # nobody trained these: the global value
        torch.testing.assert_close(new.pairs[m].B[:, untouched], prev.B[:, untouched])


def _bad(kind, method, server):
    reply = _reply_for(method, server, 1, 5, 2)  # rank 4, given TOP[4]
    a = reply.arrays
    if kind == "other_slots":
        a["slots/m0"] = torch.tensor([0, 1, 2, 3])
        return reply, r"slots/m0: indices \[0, 1, 2, 3\]; expected the slots this client was given, \[1, 3, 4, 7\]"
    if kind == "duplicate":
        a["slots/m0"] = torch.tensor([1, 1, 4, 7])
        return reply, r"slots/m0: indices \[1, 1, 4, 7\] must be distinct and in \[0, 7\]"
    if kind == "range":
        a["slots/m1"] = torch.tensor([0, 3, 5, 8])
        return reply, r"slots/m1: indices \[0, 3, 5, 8\] must be distinct and in \[0, 7\]"
    if kind == "count":
        a["slots/m0"] = torch.tensor([1, 3, 4])
        return reply, r"slots/m0: dtype torch.int64, shape \(3,\); expected torch.int64, shape \(4,\)"
    if kind == "dtype":
        a["slots/m0"] = a["slots/m0"].float()
        return reply, r"slots/m0: dtype torch.float32, shape \(4,\); expected torch.int64"
    if kind == "scores_shape":
        a["scores/m1"] = torch.ones(3)
        return reply, r"scores/m1: dtype torch.float32, shape \(3,\); expected floating, shape"
    if kind == "scores_negative":
        a["scores/m1"] = -a["scores/m1"]
        return reply, r"scores/m1: entries must be finite and >= 0"
    if kind == "scores_nan":
        a["scores/m0"] = a["scores/m0"].clone()
        a["scores/m0"][0] = float("nan")
        return reply, r"scores/m0: entries must be finite and >= 0"
    if kind == "missing":
        del a["slots/m1"]
        return reply, r"missing keys \['slots/m1'\] and unknown keys \[\]; expected 4 slot and score keys"
    if kind == "unknown":
        a["slots/m2"] = torch.tensor([0])
        return reply, r"missing keys \[\] and unknown keys \['slots/m2'\]"
    if kind == "factor_shape":
        a["lora/m0/B"] = torch.zeros(6, 3)
        return reply, r"Module 'm0': B has shape \(6, 3\); expected \(6, 4\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["other_slots", "duplicate", "range", "count", "dtype", "scores_shape",
                                  "scores_negative", "scores_nan", "missing", "unknown", "factor_shape"])
def test_check_reply_rejects_bad_slots_and_scores(variant, kind):
    # Prepare
    method, server = _server_with_scores(variant, SCORES, {0: 2, 1: 4, 2: 8})
    method.check_reply(server, 1, _reply_for(method, server, 1, 5, 2))  # the good reply passes
    reply, match = _bad(kind, method, server)
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        method.check_reply(server, 1, reply)


# ----------------------------------------------------------------------------- clients, through run_round


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_two_rounds_upload_exactly_the_selected_slots(tmp_path, monkeypatch, variant, scorer):
    # Prepare
    sim = _sim(tmp_path)
    method = make_method("hafl", variant=variant, scorer=scorer)
    R = max(sim.ranks)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert
    for t, rnd in enumerate(log, start=1):
        assert rnd.after.round == t and not any(row["dropped"] for row in rnd.rows)
        for row in rnd.rows:
            k = row["client"]
            call, r = rnd.calls[k], sim.ranks[k]
            given = method.selection(rnd.before, r)
            if t == 1:  # no scores yet (client scorer) or B = 0 (server scorer): the prefix
                assert all(v.tolist() == list(range(r)) for v in given.values())
            # the download: its slots, and the factors of the variant
            assert {m: v.tolist() for m, v in _slots(call.message.arrays).items()} == \
                {m: v.tolist() for m, v in given.items()}
            # the upload: exactly the selected slots (count and indices), equal to the trained ones
            up, up_slots = decode_pairs(call.reply.arrays), _slots(call.reply.arrays)
            expected_keys = {f"lora/{m}/{f}" for m in sim.ws.shapes for f in "BA"} | \
                {f"slots/{m}" for m in sim.ws.shapes} | {f"extra/{e}" for e in sim.init_extras}
            if scorer == "client":
                expected_keys |= {f"scores/{m}" for m in sim.ws.shapes}
            assert set(call.reply.arrays) == expected_keys
            for m in sim.ws.shapes:
                assert up_slots[m].dtype == torch.int64 and up_slots[m].tolist() == given[m].tolist()
                assert up[m].rank == r == len(up_slots[m])
                trained = call.trained[m] if variant == "truncation" else _take(call.trained[m], given[m])
                assert torch.equal(up[m].B, trained.B) and torch.equal(up[m].A, trained.A)
                if scorer == "client":
                    held = r if variant == "truncation" else R
                    assert call.reply.arrays[f"scores/{m}"].shape == (held,)
                    assert call.reply.arrays[f"scores/{m}"].dtype == torch.float32
            assert call.reply.config["rank"] == r
            # bytes: sum numel * element size of what travelled, indices and scores included
            assert row["bytes_down"] == _nbytes(call.message.arrays) > 0
            assert row["bytes_up"] == _nbytes(call.reply.arrays) > 0
            score_bytes = sum(4 * (r if variant == "truncation" else R) for _ in sim.ws.shapes)
            lora_bytes = sum(4 * r * (d_out + d_in) + 8 * r for d_out, d_in in sim.ws.shapes.values())
            head_bytes = sum(4 * v.numel() for v in sim.init_extras.values())
            assert row["bytes_up"] == lora_bytes + head_bytes + (score_bytes if scorer == "client" else 0)
    # the server step of each round is the core rule on the replies
    for rnd in log:
        replies = {k: c.reply for k, c in sorted(rnd.calls.items())}
        for m, prev in rnd.before.pairs.items():
            expected = aggregate("slotwise", [decode_pairs(r.arrays)[m] for r in replies.values()],
                                 [r.config["num_examples"] for r in replies.values()],
                                 slots=[r.arrays[f"slots/{m}"] for r in replies.values()], previous=prev)
            torch.testing.assert_close(rnd.after.pairs[m].B, expected.B)
            torch.testing.assert_close(rnd.after.pairs[m].A, expected.A)
    res = sim.evaluate(method, log[-1].after, log[-1].clients)
    assert 0.0 <= res["accuracy"] <= 1.0 and set(res["by_rank"]) == {"2", "4", "8"}


@pytest.mark.parametrize("scorer", SCORERS)
def test_freezing_client_leaves_every_slot_it_may_not_train_bit_identical(tmp_path, monkeypatch, scorer):
    # Prepare
    sim = _sim(tmp_path, local_steps=3)
    method = make_method("hafl", variant="freezing", scorer=scorer)
    R = max(sim.ranks)
    # Execute
    log = _run_rounds(sim, method, 2, monkeypatch)
    # Assert
    non_prefix = False
    for rnd in log:
        for k, call in rnd.calls.items():
            start = decode_pairs(call.message.arrays)
            for m, idx in _slots(call.message.arrays).items():
                frozen = [i for i in range(R) if i not in idx.tolist()]
                assert start[m].rank == R and call.trained[m].rank == R
                assert torch.equal(call.trained[m].B[:, frozen], start[m].B[:, frozen]), (k, m)
                assert torch.equal(call.trained[m].A[frozen], start[m].A[frozen]), (k, m)
                assert not torch.equal(call.trained[m].B[:, idx], start[m].B[:, idx])  # the given slots moved
                non_prefix |= idx.tolist() != list(range(len(idx)))
    assert non_prefix  # round 2 gave some client slots that are not a prefix


def test_freezing_client_scores_frozen_slots_on_their_gradient(tmp_path, monkeypatch):
    # Round 2: slots the rank-2 client may not train but that are non-zero (trained by others in round 1)
    # have a positive score: the importance hook reads the gradient before the slot mask zeroes it.
    sim = _sim(tmp_path)
    method = make_method("hafl", variant="freezing")
    log = _run_rounds(sim, method, 2, monkeypatch)
    call = log[1].calls[0]
    start = decode_pairs(call.message.arrays)
    checked = 0
    for m, idx in _slots(call.message.arrays).items():
        scores = call.reply.arrays[f"scores/{m}"]
        for i in range(8):
            if i not in idx.tolist() and float(start[m].B[:, i].abs().sum()) > 0:
                assert float(scores[i]) > 0, (m, i)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_same_seed_gives_the_same_selections_and_scores(tmp_path, monkeypatch, variant):
    # Prepare / Execute: the same two rounds twice
    runs = [_run_rounds(_sim(tmp_path / str(i)), make_method("hafl", variant=variant), 2, monkeypatch)
            for i in range(2)]
    # Assert: every slot index and score sent or received is identical
    for a, b in zip(*runs, strict=True):
        for k in a.calls:
            for key in a.calls[k].message.arrays:
                if key.startswith("slots/"):
                    assert torch.equal(a.calls[k].message.arrays[key], b.calls[k].message.arrays[key])
            for key, v in a.calls[k].reply.arrays.items():
                assert torch.equal(v, b.calls[k].reply.arrays[key]), key
        for key, v in a.after.arrays.items():
            assert torch.equal(v, b.after.arrays[key])


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("variant", VARIANTS)
def test_run_experiment_two_rounds_resumes_and_evaluates(tmp_path, variant):
    # Prepare
    cfg = RunConfig.from_dict(dict(name="t", model="tiny-bert", dataset="synthetic", methods=["hafl"], clients=3,
                                   ranks=[2, 4, 8], rounds=2, local_steps=2, batch_size=8, lr=0.01, eval_size=40,
                                   max_length=32, hafl={"variant": variant}))

    # Execute: a whole run, and one killed after round 1 then resumed
    summary = run_experiment(cfg, tmp_path / "full", progress=False)
    kill_and_resume(cfg, tmp_path / "cut")
    # Assert
    assert summary[0]["method"] == "hafl"
    assert _sha(tmp_path / "full" / "adapters") == _sha(tmp_path / "cut" / "adapters")
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert set(rows[2]["by_rank"]) == {"2", "4", "8"} and rows[2]["bytes_up"] > 0
    final = simulation.load_final(tmp_path / "full" / "adapters" / "hafl.safetensors")
    assert any(k.startswith("server/arrays/scores/") for k in final)  # the server's slot scores are saved
