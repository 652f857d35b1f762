"""CLAIR's text-copying task: the ``copy_sub`` data set and the ``copy-llama`` base model (pretrained, cached)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import lowrank_fed.llm.models.copy_model as copy_model  # noqa: E402
from lowrank_fed.llm.data import (  # noqa: E402
    COPY_SUB_WORDS,
    DATASETS,
    encode_generation,
    load_dataset,
    make_copy_substitution,
    make_copy_task,
)
from lowrank_fed.llm.evaluate import score_lm, summarise  # noqa: E402
from lowrank_fed.llm.models import (  # noqa: E402
    COPY_LLAMA,
    MODELS,
    copy_examples,
    copy_llama,
    copy_tokenizer,
    load_model,
)

def token_accuracy(model, encoded):
    """Teacher-forced ``(token accuracy, exact match)`` (the runner's LM scores)."""
    scores = summarise(score_lm(model, encoded))
    return scores["token_accuracy"], scores["exact_match"]


SIGMA = {"t0": "t1", "t1": "t0"}  # the benign swap, written out by hand
TAU = {"t2": "t3", "t3": "t2"}  # the contaminated clients' swap
SHORT = {"steps": 100, "warmup": 20}  # a short pretraining (about 2 s) that already copies


def _apply(mapping, text):
    return " ".join(mapping.get(w, w) for w in text.split())


def test_copy_sub_is_deterministic_in_the_seed():
    a, b, c = (make_copy_substitution(60, seed=s) for s in (3, 3, 4))
    assert a.texts == b.texts and a.targets == b.targets and a.other_targets == b.other_targets
    assert np.array_equal(a.labels, b.labels)
    assert a.texts != c.texts
    assert DATASETS["copy_sub"] == "generation" and a.task == "generation"


def test_sigma_and_tau_targets():
    hand = "t0 t1 t2 t3 t9 t0"
    assert _apply(SIGMA, hand) == "t1 t0 t2 t3 t9 t1"
    assert _apply(TAU, hand) == "t0 t1 t3 t2 t9 t0"
    data = make_copy_substitution(200, seed=0)
    assert data.meta["sigma"] == SIGMA and data.meta["tau"] == TAU
    assert data.targets == [_apply(SIGMA, t) for t in data.texts]
    assert data.other_targets == [_apply(TAU, t) for t in data.texts]
    words = " ".join(data.texts).split()
    assert {"t0", "t1", "t2", "t3"} <= set(words) <= set(COPY_SUB_WORDS)
    assert all(len(t.split()) == 12 for t in data.texts)


def test_subset_and_load_dataset_keep_other_targets():
    data = make_copy_substitution(30, seed=1)
    sub = data.subset([4, 0, 7])
    assert sub.texts == [data.texts[i] for i in (4, 0, 7)]
    assert sub.other_targets == [data.other_targets[i] for i in (4, 0, 7)]
    assert sub.targets == [data.targets[i] for i in (4, 0, 7)]
    train, test = load_dataset("copy_sub", seed=0)
    assert len(train) + len(test) == 4000  # make_copy_substitution's default n
    for part in (train, test):
        assert part.targets == [_apply(SIGMA, t) for t in part.texts]
        assert part.other_targets == [_apply(TAU, t) for t in part.texts]
    assert make_copy_task(10).other_targets is None  # the other data sets are unchanged
    assert make_copy_task(10).subset([1, 2]).other_targets is None


def test_groups_differ_in_token_mix():
    data = make_copy_substitution(400, n_groups=4, seed=0)
    slices = [set(s) for s in data.meta["slices"]]
    assert all(a.isdisjoint(b) for i, a in enumerate(slices) for b in slices[i + 1 :])
    assert set().union(*slices) == set(COPY_SUB_WORDS[4:])
    for g, own in enumerate(slices):
        words = " ".join(np.array(data.texts)[data.labels == g]).split()
        assert np.mean([w in own for w in words]) > 0.6  # mostly its own slice
        assert {"t0", "t1", "t2", "t3"} <= set(words)  # both swaps occur in every group
    with pytest.raises(ValueError, match="n_groups"):
        make_copy_substitution(5, n_groups=0)


def test_tokenizer_is_fixed_and_examples_match_encode_generation():
    tok = copy_tokenizer()
    assert len(tok) == 72 and tok.eos_token_id == 4 and tok.pad_token_id == 0
    data = make_copy_substitution(16, seed=2)
    ids = torch.tensor([[COPY_SUB_WORDS.index(w) for w in t.split()] for t in data.texts])
    mine = copy_examples(tok, ids)
    ref = encode_generation(tok, data.texts, data.texts, max_length=64)
    for key in mine:
        assert torch.equal(mine[key], ref[key])
    assert tok.unk_token_id not in ref["input_ids"]


def test_copy_llama_is_cached_and_copies(tmp_path, monkeypatch):
    model, tok, info = copy_llama(cache=tmp_path, **SHORT)
    assert info["accuracy"] >= 0.98 and info["steps"] == 100 and info["layers"] == COPY_LLAMA["layers"]
    assert len(list(tmp_path.glob("copy-llama-*"))) == 1 and not list(tmp_path.glob(".copy-llama-*"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was pretrained again")

    monkeypatch.setattr(copy_model, "pretrain_copy", no_training)
    again, _, info2 = copy_llama(cache=tmp_path, **SHORT)
    assert info2 == info
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # identity copying of copy_sub texts in encode_generation's exact format
    data = make_copy_substitution(64, seed=5)
    acc, _ = token_accuracy(model, encode_generation(tok, data.texts, data.texts, max_length=64))
    assert acc >= 0.98
    # sigma is not what W0 does: the swapped positions are wrong before fine-tuning
    acc_sigma, exact_sigma = token_accuracy(model, encode_generation(tok, data.texts, data.targets, max_length=64))
    assert acc_sigma < acc and exact_sigma < 1.0


def test_cache_key_covers_seed_and_hyperparameters(tmp_path):
    paths = {copy_llama(cache=tmp_path, steps=2, warmup=1, **extra)[2]["path"]
             for extra in ({}, {"seed": 1}, {"lr": 1e-3})}
    assert len(paths) == 3
    with pytest.raises(ValueError, match="hyper-parameter"):
        copy_llama(cache=tmp_path, depth=3)


def test_copy_llama_pretraining_is_deterministic(tmp_path):
    a = copy_llama(cache=tmp_path / "a", steps=5, warmup=2)[0].state_dict()
    b = copy_llama(cache=tmp_path / "b", steps=5, warmup=2)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spec_targets_exist_on_the_model(tmp_path):
    spec = MODELS["copy-llama"]
    assert spec.task == "generation" and spec.package is None
    model, _, _ = copy_llama(cache=tmp_path, steps=2, warmup=1)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(spec.target_modules) <= names


@pytest.mark.slow
def test_load_model_gives_the_default_pretrained_copier(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_FED_CACHE", str(tmp_path))
    model, tok, spec = load_model("copy-llama", texts=["unused words"], seed=3)
    assert spec.name == "copy-llama" and tok.get_vocab() == copy_tokenizer().get_vocab()
    _, test = load_dataset("copy_sub", seed=0)
    acc, exact = token_accuracy(model, encode_generation(tok, test.texts, test.texts, max_length=64))
    assert acc >= 0.98 and exact >= 0.9


def _hand_written_pretraining(model, tok, *, length, steps, batch_size, lr, warmup, weight_decay, seed):
    """copy-llama's pretraining as a loop of its own (what ``pretrain_copy`` was before it used ``train_local``)."""
    import math

    from lowrank_fed.llm.streams import COPY_PRETRAIN_BATCHES

    rng = COPY_PRETRAIN_BATCHES.rng(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warmup if t < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (t - warmup) / max(steps - warmup, 1))))
    model.train()
    loss = float("nan")
    for _ in range(steps):
        out = model(**copy_examples(tok, torch.from_numpy(rng.integers(0, len(COPY_SUB_WORDS), size=(batch_size, length)))))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = float(out.loss.detach())
    return loss


def test_pretraining_on_the_one_training_loop_equals_a_hand_written_loop_bit_for_bit():
    # Prepare: two copies of one initial copy-llama (the cache key holds no code version, so the loop may not
    # change a single bit)
    from transformers import LlamaForCausalLM

    tok = copy_tokenizer()
    hp = {**COPY_LLAMA, "steps": 12, "warmup": 4}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mine = LlamaForCausalLM(copy_model._copy_config(len(tok), hp))
    theirs = LlamaForCausalLM(copy_model._copy_config(len(tok), hp))
    theirs.load_state_dict(mine.state_dict())
    train = {k: hp[k] for k in ("length", "steps", "batch_size", "lr", "warmup", "weight_decay")}
    # Execute
    stats = copy_model.pretrain_copy(mine, tok, seed=3, **train)
    loss = _hand_written_pretraining(theirs, tok, seed=3, **train)
    # Assert
    assert stats["loss"] == loss
    a, b = mine.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
