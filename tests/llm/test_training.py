"""The local training loop: parameter groups, hooks, the plain path, the optimiser factory."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.data import make_batch  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation  # noqa: E402
from lowrank_fed.llm.training import Hook, client_batches, make_optimizer, train_local  # noqa: E402


class TinyClassifier(torch.nn.Module):
    """``frozen(head(dropout(relu(body(x)))))``, returning ``.loss`` and ``.logits`` as transformers does."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 3)
            self.frozen = torch.nn.Linear(3, 3)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x, labels):
        logits = self.frozen(self.head(self.drop(torch.relu(self.body(x)))))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def _batches(n=4, size=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, 4, generator=gen), "labels": torch.randint(0, 3, (size,), generator=gen)}
            for _ in range(n)]


def _groups(model, lrs):
    return [{"params": list(getattr(model, name).parameters()), "lr": lr} for name, lr in lrs.items()]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recorder(Hook):
    """Logs every call as ``(name, call, step)``; checks the gradients exist after the backward pass."""

    def __init__(self, name, log, batches, params):
        self.name, self.log, self.batches, self.params = name, log, batches, params

    def before_forward(self, step, batch):
        assert batch is self.batches[step]
        self.log.append((self.name, "before_forward", step))

    def penalty(self, step):
        self.log.append((self.name, "penalty", step))
        return None

    def after_backward(self, step):
        assert all(p.grad is not None for p in self.params)
        self.log.append((self.name, "after_backward", step))

    def after_step(self, step):
        self.log.append((self.name, "after_step", step))

    def close(self):
        self.log.append((self.name, "close", None))


class GradProbe(Hook):
    """Records the gradient of ``param`` after each backward pass; optionally adds ``lam * ||param||^2``."""

    def __init__(self, param, lam=0.0):
        self.param, self.lam, self.grads = param, lam, []

    def penalty(self, step):
        return self.lam * (self.param**2).sum() if self.lam else None

    def after_backward(self, step):
        self.grads.append(self.param.grad.detach().clone())


# ----------------------------------------------------------------------------- parameter groups


def test_group_with_lr_zero_and_groups_left_out_do_not_move():
    # Prepare: body trained, head at lr 0, frozen (requires grad, but in no group) left out
    model, batches = TinyClassifier(), _batches()
    before = _snapshot(model)
    # Execute
    stats = train_local(model, batches, _groups(model, {"body": 0.05, "head": 0.0}))
    # Assert
    after = _snapshot(model)
    for name in ("head.weight", "head.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["body.weight"], before["body.weight"])
    assert (stats.steps, stats.examples) == (4, 20)


def test_workspace_groups_train_only_what_the_plan_names(tmp_path):
    # Prepare: a tiny PEFT model; A at lr 0.05, B at lr 0, the head not named (frozen)
    settings = dict(name="t", model="tiny-bert", dataset="synthetic", methods=["fedit"], clients=3,
                    ranks=[2, 4, 8], rounds=1, local_steps=2, batch_size=8, lr=0.01, eval_size=80,
                    max_length=32, checkpoint=False)
    sim = Simulation(RunConfig.from_dict(settings), tmp_path, progress=False)
    sim.setup()
    ws = sim.ws
    gen = torch.Generator().manual_seed(0)
    start = {m: FactorPair(0.1 * torch.randn(d_out, 4, generator=gen),
                           0.1 * torch.randn(4, d_in, generator=gen))
             for m, (d_out, d_in) in ws.shapes.items()}
    ws.load(start, sim.init_extras)
    groups = ws.param_groups({"A": 0.05, "B": 0.0})
    ctx = sim.contexts[2]  # client 2's own rows
    order = client_batches(len(ctx.indices), 3, 8, np.random.default_rng(0))
    batches = [make_batch(ctx.data, ctx.indices[b]) for b in order]
    # Execute
    train_local(ws.peft, batches, groups)
    # Assert
    pairs, extras = ws.extract()
    assert [g["name"] for g in groups] == ["A", "B"]
    for m, p in pairs.items():
        assert torch.equal(p.B, start[m].B), m
        assert not torch.equal(p.A, start[m].A), m
    for e, v in extras.items():
        assert torch.equal(v, sim.init_extras[e]), e


# ----------------------------------------------------------------------------- hooks


def test_hooks_are_called_in_order_every_step_and_closed_once():
    # Prepare: two recording hooks sharing one log
    model, batches, log = TinyClassifier(), _batches(n=3), []
    params = list(model.body.parameters())
    hooks = [Recorder("h1", log, batches, params), Recorder("h2", log, batches, params)]
    # Execute
    train_local(model, batches, _groups(model, {"body": 0.01}), hooks=hooks)
    # Assert
    expected = []
    for step in range(3):
        for call in ("before_forward", "penalty", "after_backward", "after_step"):
            expected += [("h1", call, step), ("h2", call, step)]
    expected += [("h1", "close", None), ("h2", "close", None)]
    assert log == expected


def test_a_penalty_hook_changes_the_gradient_but_not_the_reported_loss():
    # Prepare: the same model, batch and seed, with and without lam * ||W||^2
    lam = 0.3
    plain_model, pen_model, batches = TinyClassifier(), TinyClassifier(), _batches(n=1)
    w0 = pen_model.body.weight.detach().clone()
    plain, pen = GradProbe(plain_model.body.weight), GradProbe(pen_model.body.weight, lam)
    # Execute
    torch.manual_seed(3)
    plain_stats = train_local(plain_model, batches, _groups(plain_model, {"body": 0.01}), hooks=[plain])
    torch.manual_seed(3)
    pen_stats = train_local(pen_model, batches, _groups(pen_model, {"body": 0.01}), hooks=[pen])
    # Assert: the penalty's gradient 2 lam W is added; the reported loss is the model's alone
    torch.testing.assert_close(pen.grads[0] - plain.grads[0], 2 * lam * w0)
    assert float((pen.grads[0] - plain.grads[0]).abs().max()) > 0
    assert pen_stats.loss == plain_stats.loss


# ----------------------------------------------------------------------------- the plain path


def test_plain_path_is_bit_identical_to_a_hand_written_loop():
    # Prepare: two copies of one model; the same batches and dropout seed
    model, batches = TinyClassifier(), _batches(n=5)
    twin = copy.deepcopy(model)
    lrs = {"body": 0.02, "head": 0.01}
    # Execute: train_local without hooks
    torch.manual_seed(7)
    stats = train_local(model, batches, _groups(model, lrs))
    # Execute: forward, loss.backward, AdamW step
    torch.manual_seed(7)
    opt = torch.optim.AdamW(_groups(twin, lrs), weight_decay=0.0)
    twin.train()
    losses, correct = [], 0
    for batch in batches:
        out = twin(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        correct += int((out.logits.detach().argmax(dim=-1) == batch["labels"]).sum())
    twin.eval()
    # Assert
    a, b = _snapshot(model), _snapshot(twin)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert stats.loss == sum(losses) / len(losses)
    assert stats.accuracy == correct / 25
    assert (stats.steps, stats.examples) == (5, 25)
    assert not model.training


# ----------------------------------------------------------------------------- optimiser and batches


def test_make_optimizer_rejects_an_unknown_name():
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adam'; expected 'adamw' or 'sgd'\."):
        make_optimizer(_groups(model, {"body": 0.1}), name="adam")
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lion'"):
        train_local(model, _batches(n=1), _groups(model, {"body": 0.1}), optimizer="lion")


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_make_optimizer_keeps_each_groups_learning_rate(name, cls):
    model = TinyClassifier()
    opt = make_optimizer(_groups(model, {"body": 0.1, "head": 0.02}), name=name, weight_decay=0.01)
    assert isinstance(opt, cls)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)


def test_client_batches_are_seeded_passes_over_permutations():
    a = client_batches(5, 4, 3, np.random.default_rng(0))
    b = client_batches(5, 4, 3, np.random.default_rng(0))
    assert a == b and len(a) == 4 and all(len(x) == 3 for x in a)
    flat = [i for x in a for i in x]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    with pytest.raises(ValueError, match="A client needs at least one example. Got 0."):
        client_batches(0, 1, 1, np.random.default_rng(0))


def test_a_causal_lm_trains_from_the_logits_its_loss_reads_with_the_same_adapters():
    """``logits_to_keep`` in training (llm/logits.py): the LM head on the kept positions only, the same LoRA bits."""
    from peft import LoraConfig, get_peft_model

    from lowrank_fed.llm.data import encode_generation, make_copy_task
    from lowrank_fed.llm.logits import tail_batch
    from lowrank_fed.llm.models import tiny_llama, word_tokenizer

    data = make_copy_task(16, seed=4)
    tok = word_tokenizer(data.texts, causal=True)
    enc = encode_generation(tok, data.texts, data.targets, 40)
    batches = [make_batch(enc, np.arange(i, i + 4)) for i in range(0, 16, 4)]

    class EveryPosition(torch.nn.Module):  # the same model without logits_to_keep: loss from every position
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            return self.inner(**batch)

    def trained(wrap):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(vocab_size=len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)  # B != 0, so every step moves both factors
        run = EveryPosition(model) if wrap else model
        lora = [p for p in model.parameters() if p.requires_grad]
        stats = train_local(run, batches, [{"params": lora, "lr": 1e-2}])
        return [p.detach().clone() for p in lora], stats.loss, model

    cut, loss_cut, model = trained(False)
    full, loss_full, _ = trained(True)
    kept = tail_batch(model, batches[0])
    assert kept["logits_to_keep"] < batches[0]["labels"].shape[1]  # the cut is real
    assert all(torch.equal(a, b) for a, b in zip(cut, full, strict=True))
    assert loss_cut == pytest.approx(loss_full, rel=1e-6)
    from_start = {**batches[0], "labels": batches[0]["input_ids"].clone()}  # position 0 labelled: nothing to cut
    assert tail_batch(model, from_start)["logits_to_keep"] == from_start["labels"].shape[1]
    assert train_local(model, [from_start], [{"params": [p for p in model.parameters() if p.requires_grad],
                                              "lr": 1e-3}]).steps == 1
    model.base_model.model.lm_head.weight.requires_grad_(True)  # a head that trains: every position, no cut
    assert "logits_to_keep" not in tail_batch(model, batches[0])
