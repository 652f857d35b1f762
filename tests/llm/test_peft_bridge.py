"""PEFT bridge: scale folding, exact round trips, state dicts, extras, merges, the adapter workspace."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.models import tiny_bert  # noqa: E402
from lowrank_fed.llm.peft_bridge import (  # noqa: E402
    AdapterWorkspace,
    get_factor_pairs,
    init_pairs,
    lora_layers,
    lora_scale,
    merge_into_base,
    pairs_to_state_dict,
    set_factor_pairs,
    state_dict_to_pairs,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TARGETS = ["query", "value"]


def _peft(config: LoraConfig, seed: int = 0):
    model = get_peft_model(tiny_bert(3, vocab_size=50, seed=0), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make B non-zero so the products are non-trivial
        for p_name, p in model.named_parameters():
            if "lora_" in p_name or "modules_to_save" in p_name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


CONFIGS = {
    "pow2": LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS",
                       rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"layer.0.attention.self.value": 4}),
    "odd": LoraConfig(r=3, lora_alpha=10, target_modules=TARGETS, task_type="SEQ_CLS", rank_pattern={"value": 5}),
    "rslora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS", use_rslora=True),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_folded_product_is_peft_delta(kind):
    # Prepare
    model = _peft(CONFIGS[kind])
    # Execute
    pairs, extras = get_factor_pairs(model)
    # Assert: B @ A is exactly PEFT's delta s * B_peft @ A_peft, module by module
    layers = lora_layers(model)
    assert set(pairs) == set(layers) and len(pairs) == 4
    for name, pair in pairs.items():
        torch.testing.assert_close(pair.B @ pair.A, layers[name].get_delta_weight("default"), rtol=1e-6, atol=1e-6)
        assert lora_scale(CONFIGS[kind], name) == layers[name].scaling["default"]
    assert set(extras) == {"classifier.weight", "classifier.bias"}


def test_per_module_ranks_and_scales():
    model = _peft(CONFIGS["pow2"])
    pairs, _ = get_factor_pairs(model)
    assert pairs["bert.encoder.layer.1.attention.self.query"].rank == 2
    assert pairs["bert.encoder.layer.0.attention.self.query"].rank == 4
    assert lora_scale(CONFIGS["pow2"], "bert.encoder.layer.0.attention.self.value") == 1.0  # alpha 4 / r 4
    assert lora_scale(CONFIGS["pow2"], "bert.encoder.layer.1.attention.self.query") == 8.0  # 16 / 2


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_round_trip_live_model(kind):
    # Prepare
    source, target = _peft(CONFIGS[kind], seed=1), _peft(CONFIGS[kind], seed=2)
    pairs, extras = get_factor_pairs(source)
    # Execute
    set_factor_pairs(target, pairs, extras)
    # Assert: the weights come back (bit-exact for power-of-two scales, one rounding otherwise)
    exact = kind == "pow2"
    sd_s, sd_t = source.state_dict(), target.state_dict()
    for key, value in sd_s.items():
        if "lora_" in key or "modules_to_save" in key:
            if exact:
                assert torch.equal(sd_t[key], value), key
            else:
                torch.testing.assert_close(sd_t[key], value, rtol=2e-7, atol=0)
    again, _ = get_factor_pairs(target)
    for name in pairs:
        torch.testing.assert_close(again[name].B @ again[name].A, pairs[name].B @ pairs[name].A, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_and_outputs():
    # Prepare
    cfg = CONFIGS["odd"]
    source = _peft(cfg, seed=3)
    state = get_peft_model_state_dict(source)
    # Execute
    pairs, extras = state_dict_to_pairs(state, cfg)
    rebuilt = pairs_to_state_dict(pairs, cfg, extras)
    fresh = _peft(cfg, seed=4)
    set_peft_model_state_dict(fresh, rebuilt)
    # Assert
    live, _ = get_factor_pairs(source)
    for name in live:
        torch.testing.assert_close(pairs[name].B, live[name].B, rtol=0, atol=0)
    assert set(rebuilt) == set(state)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    source.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_state_dict_of_one_adapter_among_several():
    model = _peft(CONFIGS["pow2"])
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS"))
    pairs, extras = state_dict_to_pairs(model.state_dict(), CONFIGS["pow2"], adapter_name="default")
    live, live_extras = get_factor_pairs(model, "default")
    assert set(pairs) == set(live) and set(extras) == set(live_extras)
    for name in live:
        assert torch.equal(pairs[name].B, live[name].B) and torch.equal(pairs[name].A, live[name].A)


def test_set_factor_pairs_rejects_wrong_shapes_and_names():
    model = _peft(CONFIGS["pow2"])
    pairs, extras = get_factor_pairs(model)
    name = "bert.encoder.layer.0.attention.self.query"
    bad = dict(pairs)
    bad[name] = FactorPair(torch.zeros(32, 3), torch.zeros(3, 32))
    with pytest.raises(ValueError, match="got B \\(32, 3\\), A \\(3, 32\\); the adapter has B \\(32, 4\\)"):
        set_factor_pairs(model, bad)
    with pytest.raises(ValueError, match="Missing"):
        set_factor_pairs(model, {name: pairs[name]})
    with pytest.raises(ValueError, match="Unknown extra weight 'head.weight'"):
        set_factor_pairs(model, pairs, {"head.weight": torch.zeros(1)})


def test_merge_into_base_adds_the_product():
    model = _peft(CONFIGS["pow2"])
    pairs, _ = get_factor_pairs(model)
    layers = lora_layers(model)
    before = {m: layers[m].get_base_layer().weight.detach().clone() for m in pairs}
    merge_into_base(model, pairs)
    for m, pair in pairs.items():
        torch.testing.assert_close(layers[m].get_base_layer().weight, before[m] + pair.B @ pair.A)


def test_workspace_load_extract_ranks_and_base():
    # Prepare
    ws = AdapterWorkspace(tiny_bert(3, vocab_size=50), target_modules=TARGETS, lora_alpha=16, task_type="SEQ_CLS")
    gen = torch.Generator().manual_seed(0)
    pairs = {m: FactorPair(torch.randn(d_out, 4, generator=gen), torch.randn(4, d_in, generator=gen))
             for m, (d_out, d_in) in ws.shapes.items()}
    mixed = dict(pairs)
    first = next(iter(ws.shapes))
    mixed[first] = FactorPair(pairs[first].B[:, :2], pairs[first].A[:2])
    head = {k: torch.full_like(v, 0.5) for k, v in ws.extras_template().items()}
    # Execute / Assert: uniform rank 4, then per-module ranks (rank_pattern)
    for candidate in (pairs, mixed):
        ws.load(candidate, head)
        got, extras = ws.extract()
        for m in candidate:
            assert torch.equal(got[m].B, candidate[m].B) and torch.equal(got[m].A, candidate[m].A)
        assert all(torch.equal(extras[k], head[k]) for k in head)
    assert ws.config_for({m: p.rank for m, p in mixed.items()}).rank_pattern
    # trainable parameters follow the policy
    params = ws.parameters(A=False, B=True, extras=False)
    assert len(params) == len(ws.shapes) and all(p.shape[1] in (2, 4) for p in params)
    assert sum(p.requires_grad for p in ws.peft.parameters()) == len(params)
    # the base: W0 + delta, then W0 again
    layer = lora_layers(ws.peft)[first].get_base_layer()
    w0 = layer.weight.detach().clone()
    ws.set_base({first: torch.ones_like(w0)})
    assert torch.equal(layer.weight, w0 + 1)
    ws.set_base(None)
    assert torch.equal(layer.weight, w0)


def test_live_pairs_carry_gradients():
    ws = AdapterWorkspace(tiny_bert(3, vocab_size=50), target_modules=TARGETS, task_type="SEQ_CLS")
    init = init_pairs(ws.shapes, 4, torch.Generator().manual_seed(0))
    ws.load({m: FactorPair(torch.ones_like(p.B), p.A) for m, p in init.items()})
    params = ws.parameters()
    total = sum((p.B ** 2).sum() + p.A.sum() for p in ws.live_pairs().values())
    total.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params if p.ndim == 2 and p.shape[0] != 3)


def test_init_pairs_match_peft_initialisation_bounds():
    shapes = {"q": (16, 64)}
    pair = init_pairs(shapes, 8, torch.Generator().manual_seed(0))["q"]
    assert torch.equal(pair.B, torch.zeros(16, 8))
    assert float(pair.A.abs().max()) <= 1 / 8 and float(pair.A.abs().max()) > 0.1
    again = init_pairs(shapes, 8, torch.Generator().manual_seed(0))["q"]
    assert torch.equal(pair.A, again.A)
    assert copy.deepcopy(pair).rank == 8
