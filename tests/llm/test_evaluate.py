"""Evaluation: accuracy, perplexity, ROUGE-L with greedy generation."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowrank_fed.llm.data import encode_classification, encode_generation, make_copy_task, make_synthetic  # noqa: E402
from lowrank_fed.llm.evaluate import (  # noqa: E402
    SCORE_BATCH,
    batch_plan,
    eval_chunks,
    evaluate_classification,
    evaluate_lm,
    greedy_generate,
    macro_f1,
    rouge_l,
    score_classification,
    score_encoded,
    score_lm,
    summarise,
)
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


def _classifier_setup(n=30):
    data = make_synthetic(n, seed=0)
    tok = word_tokenizer(data.texts)
    enc = encode_classification(tok, data.texts, data.labels, 32)
    torch.manual_seed(0)
    return enc, tiny_bert(4, vocab_size=len(tok)).eval()


def _lm_setup(n=10):
    data = make_copy_task(n, seed=0)
    tok = word_tokenizer(data.texts, causal=True)
    enc = encode_generation(tok, data.texts, data.targets, 40)
    torch.manual_seed(0)
    return enc, tiny_llama(vocab_size=len(tok)).eval()


def test_classification_scores_are_per_example_and_summarise_to_the_evaluation():
    enc, model = _classifier_setup()
    scores = score_classification(model, enc, batch_size=7)
    assert scores["correct"].dtype == np.bool_ and scores["correct"].shape == (30,)
    assert scores["loss"].dtype == np.float64 and scores["loss"].shape == (30,)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    manual_correct = (logits.argmax(-1) == enc["labels"]).numpy()
    manual_loss = torch.nn.functional.cross_entropy(logits, enc["labels"], reduction="none").double().numpy()
    assert np.array_equal(scores["correct"], manual_correct)
    np.testing.assert_allclose(scores["loss"], manual_loss, rtol=1e-5, atol=1e-6)
    # one implementation: evaluate_* is summarise(score_*), and the batch size does not matter
    assert summarise(scores) == evaluate_classification(model, enc, batch_size=7)
    whole = summarise(score_classification(model, enc, batch_size=30))
    assert whole == pytest.approx(summarise(scores), rel=1e-6)
    # a subset's summary is the mean over its rows
    rows = np.array([0, 3, 4, 11, 29])
    sub = summarise(scores, rows)
    assert sub["accuracy"] == pytest.approx(manual_correct[rows].mean())
    assert sub["loss"] == pytest.approx(manual_loss[rows].mean(), rel=1e-5)


def _confusion_macro_f1(pred, label):
    """Macro-F1 from a confusion matrix ``M[true, pred]``, over the classes with a nonzero row or column."""
    k = int(max(pred.max(), label.max())) + 1
    m = np.zeros((k, k))
    np.add.at(m, (label, pred), 1)
    present = (m.sum(0) + m.sum(1)) > 0
    tp = np.diag(m)
    f1 = 2 * tp / np.maximum(m.sum(0) + m.sum(1), 1)  # 2 TP / (2 TP + FP + FN)
    return float(f1[present].mean())


def test_classification_scores_carry_predictions_labels_and_macro_f1():
    # Prepare
    enc, model = _classifier_setup()
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    manual_pred, manual_label = logits.argmax(-1).numpy(), enc["labels"].numpy()
    rows = np.array([0, 3, 4, 11, 29])
    # Execute
    scores = score_classification(model, enc, batch_size=7)
    whole, sub = summarise(scores), summarise(scores, rows)
    # Assert
    assert scores["pred"].dtype == np.int64 and scores["label"].dtype == np.int64
    assert np.array_equal(scores["pred"], manual_pred) and np.array_equal(scores["label"], manual_label)
    assert list(whole) == ["accuracy", "loss", "macro_f1"]
    assert whole["macro_f1"] == pytest.approx(_confusion_macro_f1(manual_pred, manual_label), abs=1e-12)
    assert sub["macro_f1"] == pytest.approx(_confusion_macro_f1(manual_pred[rows], manual_label[rows]), abs=1e-12)
    assert evaluate_classification(model, enc, batch_size=30)["macro_f1"] == whole["macro_f1"]


def test_macro_f1_matches_a_hand_count_and_skips_absent_classes():
    # Prepare: 3 is never predicted (FN only), 4 never true (FP only), 2 and 5 occur nowhere
    label = np.array([0, 0, 1, 1, 1, 3, 0])
    pred = np.array([0, 1, 1, 1, 4, 0, 0])
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 2, FP 1, FN 1 -> 4/6; class 3: 0/1; class 4: 0/1
    expected = (4 / 6 + 4 / 6 + 0 + 0) / 4
    scores = {"correct": pred == label, "loss": np.linspace(0.1, 0.7, 7), "pred": pred, "label": label}
    # Execute
    value = macro_f1(pred, label)
    summary = summarise(scores)
    sub = summarise(scores, [0, 2, 2, 6])  # rows: repeats count
    # Assert
    assert value == pytest.approx(expected, abs=1e-12)
    assert value == pytest.approx(_confusion_macro_f1(pred, label), abs=1e-12)
    assert summary == {"accuracy": pytest.approx(4 / 7), "loss": pytest.approx(0.4), "macro_f1": value}
    assert sub["macro_f1"] == 1.0  # only classes 0 and 1 occur, all right
    assert macro_f1(np.array([2]), np.array([5])) == 0.0


def test_macro_f1_errors():
    cls = {"correct": np.array([True, False]), "loss": np.array([0.1, 0.2]),
           "pred": np.array([1, 0]), "label": np.array([1, 1])}
    with pytest.raises(ValueError, match=r"'scores' parameter must have the keys .*both or neither"):
        summarise({k: v for k, v in cls.items() if k != "label"})
    with pytest.raises(ValueError, match="'correct' must equal 'pred' == 'label'. Got 1 examples"):
        summarise({**cls, "correct": np.array([True, True])})
    with pytest.raises(ValueError, match="1-D of one length"):
        summarise({**cls, "pred": np.array([1, 0, 0])})
    with pytest.raises(TypeError, match="'pred' array must hold integer class indices. Got dtype float64"):
        macro_f1(np.array([1.0]), np.array([1]))
    with pytest.raises(ValueError, match="one length >= 1"):
        macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def test_lm_scores_are_per_example_and_token_weighted():
    enc, model = _lm_setup()
    scores = score_lm(model, enc, batch_size=3)
    assert scores["nll"].dtype == np.float64 and scores["nll"].shape == (10,)
    assert scores["tokens"].dtype == np.int64 and scores["tokens"].shape == (10,)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    labels = enc["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    manual_nll = ce.double().sum(1).numpy()
    manual_tokens = (labels != -100).sum(1).numpy()
    np.testing.assert_allclose(scores["nll"], manual_nll, rtol=1e-5)
    assert np.array_equal(scores["tokens"], manual_tokens)
    assert summarise(scores) == evaluate_lm(model, enc, batch_size=3)
    rows = np.array([1, 2, 7])
    sub = summarise(scores, rows)
    loss = manual_nll[rows].sum() / manual_tokens[rows].sum()
    assert sub["loss"] == pytest.approx(loss, rel=1e-5)
    assert sub["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # token accuracy and exact match: the argmax under teacher forcing, counted by hand
    manual_hits = ((logits[:, :-1].argmax(-1) == labels) & (labels != -100)).sum(1).numpy()
    assert np.array_equal(scores["hits"], manual_hits)
    assert sub["token_accuracy"] == pytest.approx(manual_hits[rows].sum() / manual_tokens[rows].sum())
    assert sub["exact_match"] == pytest.approx(np.mean(manual_hits[rows] == manual_tokens[rows]))


def test_token_accuracy_and_exact_match_by_hand():
    scores = {"nll": np.array([1.0, 1.0, 1.0]), "tokens": np.array([2, 3, 5]), "hits": np.array([2, 1, 5])}
    res = summarise(scores)
    assert res["token_accuracy"] == pytest.approx(8 / 10) and res["exact_match"] == pytest.approx(2 / 3)
    assert summarise(scores, [1])["exact_match"] == 0.0


def test_summarise_weights_lm_loss_by_tokens():
    scores = {"nll": np.array([2.0, 10.0]), "tokens": np.array([1, 10])}
    res = summarise(scores)
    assert res["loss"] == pytest.approx(12 / 11)  # not the mean of per-example means, (2 + 1) / 2
    assert res["perplexity"] == pytest.approx(math.exp(12 / 11))
    assert summarise(scores, [0]) == {"perplexity": pytest.approx(math.exp(2.0)), "loss": 2.0}
    capped = summarise({"nll": np.array([200.0]), "tokens": np.array([2])})
    assert capped["loss"] == 100.0 and capped["perplexity"] == pytest.approx(math.exp(50.0))
    assert summarise({"nll": np.array([0.0]), "tokens": np.array([0])}) == {"perplexity": 1.0, "loss": 0.0}


def test_summarise_classification_subsets():
    scores = {"correct": np.array([True, False, False, True, True]),
              "loss": np.array([0.5, 1.5, 2.5, 0.25, 0.25])}
    assert summarise(scores) == {"accuracy": 0.6, "loss": 1.0}
    assert summarise(scores, np.array([1, 2])) == {"accuracy": 0.0, "loss": 2.0}
    assert summarise(scores, [3, 3]) == {"accuracy": 1.0, "loss": 0.25}  # an index array: repeats count


def test_summarise_errors():
    cls = {"correct": np.array([True, False]), "loss": np.array([0.1, 0.2])}
    with pytest.raises(ValueError, match="'rows' parameter must select at least one example"):
        summarise(cls, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="'rows' parameter must select at least one example"):
        summarise(cls, [])
    with pytest.raises(ValueError, match=r"'scores' parameter must have the keys .*Got \['accuracy', 'loss'"):
        summarise({"accuracy": np.ones(2), "loss": np.ones(2)})
    with pytest.raises(ValueError, match="'scores' parameter must have the keys"):
        summarise({**cls, "nll": np.ones(2)})
    with pytest.raises(ValueError, match="1-D of one length"):
        summarise({"correct": np.array([True]), "loss": np.array([0.1, 0.2])})
    with pytest.raises(ValueError, match=r"must index the 2 scored examples, in \[0, 1\]. Got .* \[0, 2\]"):
        summarise(cls, [0, 2])
    with pytest.raises(ValueError, match="integer index array. Got dtype float64"):
        summarise(cls, np.array([0.0]))
    with pytest.raises(ValueError, match="'rows' parameter must select at least one example"):
        summarise({"nll": np.zeros(0), "tokens": np.zeros(0, dtype=np.int64)})


def _ragged_classification(n=70):
    data = make_synthetic(n, seed=3)
    texts = [" ".join(t.split()[: 3 + (7 * i) % 20]) for i, t in enumerate(data.texts)]  # 3 to 22 words
    tok = word_tokenizer(texts)
    enc = encode_classification(tok, texts, data.labels, 32)
    lengths = enc["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 3  # the plan has lengths to sort
    return tiny_bert(4, vocab_size=len(tok)).eval(), enc


def test_batch_plan_is_longest_first_and_a_subset_of_whole_batches_keeps_them():
    _, enc = _ragged_classification()
    lengths = enc["attention_mask"].sum(dim=1).numpy()
    plan = batch_plan(enc, None, 16)
    order = np.concatenate(plan)
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every row once
    assert np.all(np.diff(lengths[order]) <= 0)  # longest first
    ties = [order[lengths[order] == v] for v in np.unique(lengths)]
    assert all(np.all(np.diff(t) > 0) for t in ties)  # ties by position
    assert [len(b) for b in plan] == [16, 16, 16, 16, 6]
    for i, batch in enumerate(plan):  # one batch, as a subset in plan order, is its own plan
        assert [b.tolist() for b in batch_plan(enc, batch, 16)] == [list(range(len(batch)))], i


@pytest.mark.parametrize("rows", [None, np.array([60, 3, 17, 44, 9, 12, 68, 30, 5, 1, 50, 22, 61, 40, 8]),
                                  np.array([5, 9, 5, 12, 9])])  # a row twice: scattered by position
def test_chunks_scored_apart_give_the_bits_of_one_pass(rows):
    model, enc = _ragged_classification()
    whole = score_encoded(model, enc, rows, "classification")
    chunks = eval_chunks(enc, rows, "classification")
    index = np.arange(70) if rows is None else rows
    assert sorted(np.concatenate([p for p, _ in chunks]).tolist()) == list(range(len(index)))  # every position once
    assert all(np.array_equal(index[p], c) and len(c) <= SCORE_BATCH["classification"] for p, c in chunks)
    for positions, chunk in reversed(chunks):  # any order, any process: each chunk is one of the pass's batches
        part = score_encoded(model, enc, chunk, "classification")
        for key in whole:
            assert np.array_equal(part[key], whole[key][positions]), key


def test_sorting_by_length_changes_no_score_beyond_rounding():
    """The longest-first pass against a pass in row order with the same batch size (the old way)."""
    model, enc = _ragged_classification()
    sorted_pass = score_classification(model, enc, batch_size=16)
    in_order = {k: np.zeros_like(v) for k, v in sorted_pass.items()}
    from lowrank_fed.llm.data import make_batch

    with torch.no_grad():
        for start in range(0, 70, 16):
            rows = np.arange(start, min(start + 16, 70))
            batch = make_batch(enc, rows)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            in_order["loss"][rows] = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double().numpy()
            in_order["pred"][rows] = logits.argmax(-1).numpy()
    np.testing.assert_allclose(sorted_pass["loss"], in_order["loss"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(sorted_pass["pred"], in_order["pred"])


def test_lm_scores_from_the_tail_logits_equal_those_from_every_position():
    """``logits_to_keep``: the LM head from the position before the first labelled token on, the same scores."""
    data = make_copy_task(24, seed=2)
    tok = word_tokenizer(data.texts, causal=True)
    enc = encode_generation(tok, data.texts, data.targets, 40)
    model = tiny_llama(vocab_size=len(tok)).eval()

    class EveryPosition(torch.nn.Module):  # a causal LM without logits_to_keep: the full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    tail, full = score_lm(model, enc, batch_size=5), score_lm(EveryPosition(model), enc, batch_size=5)
    assert np.array_equal(tail["tokens"], full["tokens"]) and np.array_equal(tail["hits"], full["hits"])
    np.testing.assert_allclose(tail["nll"], full["nll"], rtol=1e-6)
