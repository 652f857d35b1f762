"""The LoRA scale convention (``lora_scaling``): one rule for ``s(r)`` in training, folding, downloads and export.

Every ``Delta W`` here is computed from the raw PEFT tensors and the scale PEFT itself applies
(``layer.scaling[adapter] * lora_B @ lora_A``), never through the bridge under test; products are compared,
not factors.
"""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

import lowrank_fed.llm.runner.transports as simulation  # noqa: E402
from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm import Adapter, load_peft_adapter, save_peft_adapter  # noqa: E402
from lowrank_fed.llm.client import run_client  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.methods import METHODS, make_method  # noqa: E402
from lowrank_fed.llm.models import load_model, tiny_bert  # noqa: E402
from lowrank_fed.llm.peft_bridge import (LORA_SCALINGS, AdapterWorkspace, client_lora_config,  # noqa: E402
                                         convention_scale, lora_layers, lora_scale)
from tests.llm.helpers import make_sim, start, tiny_settings  # noqa: E402

TARGETS = ["query", "value"]
ALPHA = 16.0


def _base(seed=0):
    return tiny_bert(3, vocab_size=50, seed=seed).eval()


@torch.no_grad()
def _live(peft_model, adapter=None):
    """``{module: (s, s * lora_B @ lora_A)}`` of an adapter, from PEFT's own tensors and scale (float64)."""
    out = {}
    for name, layer in lora_layers(peft_model).items():
        a = adapter or next(iter(layer.lora_A))
        if a in layer.lora_A:
            s = float(layer.scaling[a])
            out[name] = (s, s * (layer.lora_B[a].weight.double() @ layer.lora_A[a].weight.double()))
    return out


def _pairs(ranks, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {m: FactorPair(torch.randn(shapes[m][0], ranks[m], generator=gen) * 0.1,
                          torch.randn(ranks[m], shapes[m][1], generator=gen) * 0.1) for m in shapes}


def _assert_products(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for m in want:
        g, w = got[m].double(), want[m].double()
        torch.testing.assert_close(g, w, rtol=0, atol=rtol * max(float(w.abs().max()), 1e-12), msg=m)


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("scaling", LORA_SCALINGS)
def test_the_adapter_peft_builds_has_the_conventions_scale(scaling):
    # Prepare: one workspace per convention, adapters of ranks 2, 4, 8 and one with a rank per module
    ws = AdapterWorkspace(_base(), target_modules=TARGETS, lora_alpha=ALPHA, scaling=scaling, reference_rank=8,
                          task_type="SEQ_CLS")
    modules = list(ws.shapes)
    layouts = [{m: r for m in modules} for r in (2, 4, 8)] + [{m: (2, 4, 8, 3)[i % 4] for i, m in enumerate(modules)}]
    for ranks in layouts:
        # Execute
        name = ws.activate(ranks)
        live = _live(ws.peft, name)
        # Assert: PEFT's own scale is the convention's at each module's rank
        for m, r in ranks.items():
            assert live[m][0] == pytest.approx(convention_scale(scaling, ALPHA, r, 8), rel=1e-15), (m, r)


def test_constant_gives_the_same_scale_at_ranks_2_4_8():
    # Prepare
    ws = AdapterWorkspace(_base(), target_modules=TARGETS, lora_alpha=ALPHA, scaling="constant", reference_rank=8)
    # Execute
    scales = {r: {s for s, _ in _live(ws.peft, ws.activate({m: r for m in ws.shapes})).values()} for r in (2, 4, 8)}
    # Assert: exactly alpha / r_ref = 2 at every rank (PEFT's alpha / r gives it back exactly for powers of two)
    assert scales == {2: {2.0}, 4: {2.0}, 8: {2.0}}
    assert [convention_scale("alpha_over_r", ALPHA, r) for r in (2, 4, 8)] == [8.0, 4.0, 2.0]
    assert [convention_scale("rslora", ALPHA, r) for r in (4, 16)] == [8.0, 4.0]


def test_constant_with_ranks_that_are_not_powers_of_two_is_within_one_rounding():
    cfg = client_lora_config(3, target_modules=["q"], rank_pattern={"l1.q": 5, "l2.q": 7}, lora_alpha=10.0,
                             scaling="constant", reference_rank=6)
    scales = [lora_scale(cfg, m) for m in ("l0.q", "l1.q", "l2.q")]
    for s in scales:
        assert abs(s - 10.0 / 6) <= math.ulp(10.0 / 6)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(scaling="alpha_over_sqrt"), r"'scaling' parameter must be one of \['alpha_over_r', 'rslora', 'constant'\]"),
    (dict(scaling="constant"), r"'reference_rank' parameter must be a positive int .*Got None"),
    (dict(scaling="constant", reference_rank=0), r"'reference_rank' .* Got 0"),
    (dict(scaling="constant", use_rslora=True), r"'use_rslora' and 'scaling' parameters disagree"),
    (dict(scaling="constant", reference_rank=4, alpha_pattern={"q": 2.0}),
     r"'alpha_pattern' parameter must be empty"),
])
def test_bad_conventions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        client_lora_config(4, target_modules=["q"], **kwargs)


@pytest.mark.parametrize("scaling", LORA_SCALINGS)
@pytest.mark.parametrize("rank", [1, 3, 4, 6])
def test_folding_round_trips_through_the_live_adapter(scaling, rank):
    # Prepare
    ws = AdapterWorkspace(_base(), target_modules=TARGETS, lora_alpha=ALPHA, scaling=scaling, reference_rank=6)
    pairs = _pairs({m: rank for m in ws.shapes}, ws.shapes)
    # Execute: fold in (a download unfolded at the client's rank), read PEFT's own Delta W, fold out
    name = ws.load(pairs)
    live = _live(ws.peft, name)
    back, _ = ws.extract()
    # Assert
    want = {m: p.B @ p.A for m, p in pairs.items()}
    _assert_products({m: d for m, (_, d) in live.items()}, want)
    _assert_products({m: p.B @ p.A for m, p in back.items()}, want)


def test_use_rslora_keeps_meaning_rslora():
    ws = AdapterWorkspace(_base(), target_modules=TARGETS, lora_alpha=ALPHA, use_rslora=True)
    live = _live(ws.peft, ws.activate({m: 4 for m in ws.shapes}))
    assert ws.scaling == "rslora" and {s for s, _ in live.values()} == {8.0}


# ----------------------------------------------------------------------------- the config key


def _validate(given):
    """A config dict, or Flower's flat run config (every key, lists as JSON) when it holds every key."""
    return RunConfig.from_flat(given) if set(given) >= set(RunConfig().to_flat()) else RunConfig.from_dict(given)


@pytest.mark.parametrize(("given", "scaling", "rslora"), [
    ({}, "alpha_over_r", False),
    ({"use_rslora": True}, "rslora", True),
    ({"lora_scaling": "rslora"}, "rslora", True),
    ({"lora_scaling": "rslora", "use_rslora": True}, "rslora", True),
    ({"lora_scaling": "alpha_over_r", "use_rslora": True}, "rslora", True),  # the default: as if absent
    ({"lora_scaling": "rslora", "use_rslora": False}, "rslora", True),
    ({**RunConfig().to_flat(), "use_rslora": True}, "rslora", True),  # Flower's run config holds every key
    ({**RunConfig().to_flat(), "lora_scaling": "rslora"}, "rslora", True),
    ({"lora_scaling": "constant"}, "constant", False),
    ({"lora_scaling": "constant", "use_rslora": False}, "constant", False),
])
def test_the_two_keys_agree_after_validation_and_round_trip(given, scaling, rslora):
    cfg = _validate(given)
    assert (cfg.lora_scaling, cfg.use_rslora) == (scaling, rslora)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize(("given", "expected", "value"), [
    ({"lora_scaling": "alpha_over_sqrt_r"}, "one of 'alpha_over_r', 'rslora' or 'constant'", "'alpha_over_sqrt_r'"),
    ({"lora_scaling": 2}, "one of 'alpha_over_r', 'rslora' or 'constant'", "2"),
    ({"lora_scaling": "constant", "use_rslora": True}, "'rslora' when use_rslora = true", "'constant'"),
    ({**RunConfig().to_flat(), "lora_scaling": "constant", "use_rslora": True}, "'rslora' when use_rslora = true",
     "'constant'"),
])
def test_bad_or_contradicting_scaling_is_a_config_error(given, expected, value):
    with pytest.raises(ConfigError) as err:
        _validate(given)
    message = str(err.value)
    assert message.startswith(f"Config key 'lora_scaling': expected {expected}")
    assert message.endswith(f"; got {value}.")
    assert "\n" not in message  # one problem, one line; a contradiction names both keys
    assert [e[0] for e in err.value.errors] == ["lora_scaling"]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("scaling", LORA_SCALINGS)
def test_peft_reloads_an_exported_adapter_with_the_same_delta_w(tmp_path, scaling):
    # Prepare: ranks that differ by module (one not a power of two), a head
    ws = AdapterWorkspace(_base(), target_modules=TARGETS, lora_alpha=ALPHA, task_type="SEQ_CLS",
                          modules_to_save=["classifier"])
    modules = sorted(ws.shapes)
    pairs = _pairs({m: (2, 4, 3, 8)[i % 4] for i, m in enumerate(modules)}, ws.shapes, seed=1)
    extras = {k: v + 0.5 for k, v in ws.extras_template().items()}
    ws.load(pairs, extras)
    x = {"input_ids": torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0)),
         "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    with torch.no_grad():
        want_logits = ws.peft(**x).logits
    # Execute
    out = save_peft_adapter(tmp_path / scaling, Adapter(pairs, extras), lora_alpha=ALPHA, scaling=scaling,
                            reference_rank=8, task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected keys
        loaded = PeftModel.from_pretrained(_base(), out).eval()
    # Assert: PEFT's own Delta W is the folded product, PEFT's scale is the convention's, outputs agree
    live = _live(loaded)
    _assert_products({m: d for m, (_, d) in live.items()}, {m: p.B @ p.A for m, p in pairs.items()})
    for m, (s, _) in live.items():
        assert s == pytest.approx(convention_scale(scaling, ALPHA, pairs[m].rank, 8), rel=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, want_logits, rtol=1e-5, atol=1e-6)
    again = load_peft_adapter(out)
    _assert_products({m: p.B @ p.A for m, p in again.pairs.items()}, {m: p.B @ p.A for m, p in pairs.items()})


@pytest.mark.parametrize("scaling", LORA_SCALINGS)
def test_the_runs_peft_export_reloads_with_the_server_delta_w(tmp_path, monkeypatch, scaling):
    # Prepare: one FedIT round of the tiny run (ranks 2, 4, 8) under the convention
    sim = make_sim(tmp_path, tiny_settings(lora_scaling=scaling))
    method = make_method("fedit")
    server, _, _, _ = sim.run_round(method, start(sim, method), {}, 1)
    batch = {k: v[:6] for k, v in sim.enc["test"].items() if k in ("input_ids", "attention_mask")}
    sim._load(method.global_model(server))
    with torch.no_grad():
        want_logits = sim.ws.peft(**batch).logits
    # Execute: what `lowrank-fed run` writes, loaded by PEFT onto a fresh copy of the same base model
    sim._save_final(method, server)
    base, _, _ = load_model(sim.cfg.model, num_labels=len(sim.train.label_names), texts=sim.train.texts,
                            seed=sim.cfg.seed)
    loaded = PeftModel.from_pretrained(base.eval(), tmp_path / "adapters" / "fedit-peft").eval()
    # Assert
    live = _live(loaded)
    _assert_products({m: d for m, (_, d) in live.items()}, {m: p.B @ p.A for m, p in server.pairs.items()})
    r_max = max(sim.ranks)
    assert {s for s, _ in live.values()} == {convention_scale(scaling, ALPHA, r_max, r_max)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want_logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- every method, one round


def _record(monkeypatch):
    """Wrap run_client: per client, its reply and state, and ``{module: (s, r, s lora_B, lora_A)}`` read from PEFT's
    own tensors and scale right after local training."""
    seen = {}

    def recording(method_, message, state, context):
        reply, new_state, stats = run_client(method_, message, state, context)
        ws = context.workspace
        layers = lora_layers(ws.peft)
        with torch.no_grad():
            live = {m: (float(layer.scaling[ws.active]), int(layer.r[ws.active]),
                        float(layer.scaling[ws.active]) * layer.lora_B[ws.active].weight.double(),
                        layer.lora_A[ws.active].weight.double())
                    for m, layer in layers.items() if ws.active in layer.lora_A}
        seen[context.client_id] = (reply, new_state, live)
        return reply, new_state, stats

    monkeypatch.setattr(simulation, "run_client", recording)
    return seen


def _delta_after(method, server, k, new_state, shapes):
    """``Delta W`` of the model client ``k`` holds after ``server``'s aggregation: its own (personalised
    methods) or the global model (FLoRA: the merged base)."""
    model = (method.personal_model(method.configure(server, k), new_state, shapes) if method.personalised
             else method.global_model(server))
    out = {}
    for m in shapes:
        d = model.base[m].double() if model.base and m in model.base else 0.0
        out[m] = d + model.pairs[m].B.double() @ model.pairs[m].A.double() if model.pairs else d
    return out


@pytest.mark.parametrize("scaling", LORA_SCALINGS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_folds_the_delta_w_its_clients_trained(tmp_path, monkeypatch, scaling, name):
    # Prepare: the tiny run (ranks 2, 4, 8; r_ref = 8), one round
    sim = make_sim(tmp_path, tiny_settings(methods=[name], lora_scaling=scaling))
    method = make_method(name)
    seen = _record(monkeypatch)
    before = start(sim, method)
    # Execute
    sim.run_round(method, before, {}, 1)
    # Assert: the adapter every client trained has the convention's scale at its rank (HAFL's R, LoRA-A2's r_G
    # included); under `constant` one scale for all
    assert sorted(seen) == [0, 1, 2]
    r_ref = max(sim.ranks)
    scales = {s for _, _, live in seen.values() for s, *_ in live.values()}
    for k, (_, _, live) in seen.items():
        for m, (s, r, _, _) in live.items():
            assert s == pytest.approx(convention_scale(scaling, ALPHA, r, r_ref), rel=1e-15), (k, m, r)
    if scaling == "constant":
        assert scales == {ALPHA / r_ref}
    # ... and what the client trained is what the server folds: its reply aggregated alone gives back the
    # product it trained (round 1 starts from B = 0, so slots it did not hold add nothing). HetLoRA: the slots
    # of its upload (a pruned tail is dropped); CLAIR needs two clients: the same reply twice.
    for k, (reply, new_state, live) in seen.items():
        kept = int(reply.config["rank"]) if name == "hetlora" else None
        trained = {m: B[:, :kept] @ A[:kept] for m, (_, _, B, A) in live.items()}
        if name == "local":  # no server: the client keeps what it trained
            solo = before
        else:
            solo = method.aggregate(before, {k: reply, **({(k + 1) % 3: reply} if method.rule == "clair" else {})})
        got = _delta_after(method, solo, k, new_state, sim.ws.shapes)
        assert any(float(d.abs().max()) > 0 for d in trained.values())  # the client did move Delta W
        _assert_products(got, trained, rtol=2e-4 if method.rule in ("svd", "clair") else 1e-5)


# ----------------------------------------------------------------------------- the step-size measurement


def test_step_size_benchmark_constant_equals_alpha_over_r_at_the_reference_rank():
    # Prepare / Execute: the docs' measurement, small (tiny-bert, two ranks, one client, two steps)
    from benchmarks.bench_scaling import step_sizes

    got = step_sizes("tiny-bert", ranks=(2, 8), clients=1, local_steps=2)
    # Assert: every step moved Delta W; constant holds s at alpha / r_ref; at r = r_ref it is alpha_over_r's
    # adapter, so the same start, batches and optimiser give the same step
    for conv in LORA_SCALINGS:
        assert all(d > 0 for d in got[conv]["delta"].values())
    assert got["constant"]["s"] == {2: 2.0, 8: 2.0} and got["alpha_over_r"]["s"] == {2: 8.0, 8: 2.0}
    assert got["constant"]["delta"][8] == got["alpha_over_r"]["delta"][8]
    assert got["constant"]["delta"][2] < got["alpha_over_r"]["delta"][2]  # s is 4x smaller at rank 2


# ----------------------------------------------------------------------------- resuming a run from before the key


def _drop_key_from_checkpoints(out, key):
    """Rewrite every checkpoint's state.json (and config.json) as a version without ``key`` wrote it."""
    import hashlib
    import json

    for state in out.glob("checkpoints/*/round-*/state.json"):
        data = json.loads(state.read_text())
        data["config"].pop(key)
        state.write_text(json.dumps(data, sort_keys=True))
        manifest = json.loads((state.parent / "manifest.json").read_text())
        raw = state.read_bytes()
        manifest["files"]["state.json"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (state.parent / "manifest.json").write_text(json.dumps(manifest))
    config = json.loads((out / "config.json").read_text())
    config.pop(key)
    (out / "config.json").write_text(json.dumps(config))


def test_a_run_checkpointed_before_lora_scaling_existed_resumes_and_a_changed_one_is_refused(tmp_path):
    from lowrank_fed.llm.runner.simulation import Simulation, run_experiment

    # Prepare: a finished one-round run whose checkpoints and config.json do not know lora_scaling
    settings = tiny_settings(checkpoint=True)
    run_experiment(RunConfig.from_dict(settings), tmp_path / "run", progress=False)
    _drop_key_from_checkpoints(tmp_path / "run", "lora_scaling")
    # Execute / Assert: the missing key is its default, so the same config resumes ...
    Simulation(RunConfig.from_dict(settings), tmp_path / "run", progress=False).check_resume()
    # ... as does one whose only change is the table of a method the run does not train ...
    untrained = next(m for m in ("clair", "local", "fedit") if m not in RunConfig.from_dict(settings).methods)
    Simulation(RunConfig.from_dict({**settings, untrained: {"lr": 0.123}}), tmp_path / "run",
               progress=False).check_resume()
    # ... and another convention is refused, naming the key and both values
    with pytest.raises(ConfigError, match='lora_scaling checkpointed "alpha_over_r", now "constant"'):
        Simulation(RunConfig.from_dict({**settings, "lora_scaling": "constant"}), tmp_path / "run",
                   progress=False).check_resume()
