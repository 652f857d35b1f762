"""Real PEFT adapters for ``merge --robust``: benign clients of one task with different configs, and contaminated
clients of four kinds (another task, a 5x copy, random factors, the negative of a benign one).

Task: a frozen tiny Llama (``tiny_llama(vocab_size=50)``, hidden 32, 2 layers) reads random token sequences (tokens
5..49, length 8) and is trained to predict, at every position, the next token's value mod 5 written as token 5..9
(the benign task) or as token 30..34 (the other task: same inputs, other targets, a real adapter trained for
something else). Each client trains its own LoRA (PEFT ``get_peft_model``, everything else frozen) with plain SGD
(lr 1, 25 steps of 32 sequences) on its own sample: every client sees different data and starts from its own ``A``,
so no two benign adapters are equal. (Adam for so few steps gives updates dominated by its sign-like noise, with no
shared column space to test against: benign against benign cosines ~0.1, no better than random factors.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_fed.llm.models import tiny_llama  # noqa: E402

STEPS, BATCH, LR, LENGTH, VOCAB = 25, 32, 1.0, 8, 50

#: Six benign configs: ranks 2-16, alphas 4-32, rsLoRA, different target_modules.
BENIGN = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
    dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["v_proj", "k_proj"]),
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"]),
]
#: The configs of the two contaminated clients (one rsLoRA, two targets; the other three targets).
CONTAMINATED = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"])]
KINDS = ("other_task", "scaled", "random", "negated")


def _base():
    return tiny_llama(vocab_size=VOCAB, seed=0).eval()


def _data(seed: int, n: int, task: str):
    """Inputs: random tokens 5..49; targets: each token mod 5, moved to 5..9 (benign) or 30..34 (the other task)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(5, VOCAB, (n, LENGTH), generator=gen)
    return x, x % 5 + (5 if task == "benign" else 30)


def train_adapter(spec: dict, *, seed: int, task: str = "benign"):
    """A PEFT model with a LoRA adapter of ``spec`` trained on ``task`` (``"benign"`` or ``"other"``)."""
    torch.manual_seed(1000 + seed)  # PEFT's init of A
    model = get_peft_model(_base(), LoraConfig(**spec))
    x, y = _data(seed, STEPS * BATCH, task)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for step in range(STEPS):
        sl = slice(step * BATCH, (step + 1) * BATCH)
        loss = model(input_ids=x[sl], labels=y[sl]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def _edit(model, how: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name and how in ("scaled", "negated"):
            p.mul_(5.0 if how == "scaled" else -1.0)
        elif "lora_" in name and how == "random":
            p.copy_(torch.randn(p.shape, generator=gen) * float(p.std()))  # random directions, a benign-like size
    return model


def make_clients(folder, kind: str, *, seed: int = 0) -> list:
    """Six benign adapter folders ``b0..b5`` and two of ``kind`` (``x6``, ``x7``) under ``folder``; their paths.

    ``other_task``: trained on the other labelling; ``scaled``: benign clients 0 and 3 again with ``B`` times 5;
    ``random``: a trained benign adapter with every LoRA factor replaced by Gaussian entries of the same standard
    deviation; ``negated``: benign clients 0 and 3 again with ``B`` times -1.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    paths = []
    models = []
    for k, spec in enumerate(BENIGN):
        models.append(train_adapter(spec, seed=100 * seed + k))
        paths.append(folder / f"b{k}")
        models[-1].save_pretrained(paths[-1])
    for j, spec in enumerate(CONTAMINATED):
        if kind == "other_task":
            model = train_adapter(spec, seed=100 * seed + 50 + j, task="other")
        elif kind == "random":
            model = _edit(train_adapter(spec, seed=100 * seed + 50 + j), "random", seed=100 * seed + 70 + j)
        else:  # a copy of benign client 0 or 3, edited
            model = _edit(train_adapter(BENIGN[3 * j], seed=100 * seed + 3 * j), kind, seed=0)
        paths.append(folder / f"x{6 + j}")
        model.save_pretrained(paths[-1])
    return paths
