"""Evaluation: accuracy, perplexity, ROUGE-L with greedy generation."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from lowrank_fed.llm.data import encode_classification, encode_generation, make_copy_task, make_synthetic  # noqa: E402
from lowrank_fed.llm.evaluate import evaluate_classification, evaluate_lm, greedy_generate, rouge_l  # noqa: E402
from lowrank_fed.llm.models import tiny_bert, tiny_llama, word_tokenizer  # noqa: E402


def test_rouge_l():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert rouge_l(["dog"], ["the cat sat"]) == 0.0
    assert 0 < rouge_l(["the cat", "x"], ["the cat sat", "x y"]) < 1
    with pytest.raises(ValueError, match="equally many"):
        rouge_l(["a"], [])


def test_accuracy_matches_a_manual_count():
    data = make_synthetic(30, seed=0)
    tok = word_tokenizer(data.texts)
    enc = encode_classification(tok, data.texts, data.labels, 32)
    model = tiny_bert(4, vocab_size=len(tok)).eval()
    res = evaluate_classification(model, enc, batch_size=7)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert res["accuracy"] == pytest.approx(float((logits.argmax(-1) == enc["labels"]).float().mean()))
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, enc["labels"])), rel=1e-5)


def test_perplexity_is_exp_of_target_token_nll():
    data = make_copy_task(10, seed=0)
    tok = word_tokenizer(data.texts, causal=True)
    enc = encode_generation(tok, data.texts, data.targets, 40)
    model = tiny_llama(vocab_size=len(tok)).eval()
    res = evaluate_lm(model, enc, batch_size=3)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["labels"])
    assert res["loss"] == pytest.approx(float(out.loss), rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


def test_greedy_generation_returns_text():
    data = make_copy_task(6, seed=0)
    tok = word_tokenizer(data.texts, causal=True)
    enc = encode_generation(tok, data.texts, data.targets, 40)
    model = tiny_llama(vocab_size=len(tok)).eval()
    preds = greedy_generate(model, tok, enc["prompt_ids"], enc["prompt_mask"], max_new_tokens=4, batch_size=4)
    assert len(preds) == 6 and all(isinstance(p, str) for p in preds)
    assert 0.0 <= rouge_l(preds, data.targets) <= 1.0
