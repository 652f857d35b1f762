"""The federation as data: the server's view, a client built from its own rows alone, the table of random streams.

``build_client(cfg, k)`` must read client ``k``'s examples and nobody else's (the data source is instrumented),
and give the very batches a context over the whole training set gives (outputs stay byte-identical).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm import streams  # noqa: E402
from lowrank_fed.llm.attacks import poison_dataset  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.data import make_batch  # noqa: E402
from lowrank_fed.llm.federation import (DataSource, Shared, build_client, build_federation, build_model,  # noqa: E402
                                        encode_examples, plan_rows)
from tests.llm.helpers import tiny_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class CountingSource(DataSource):
    """A data source that records the rows of every example it hands out."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reads: list[np.ndarray] = []

    def examples(self, rows):
        self.reads.append(np.array(rows, dtype=np.int64))
        return super().examples(rows)


def _cfg(**overrides):
    return RunConfig.from_dict(tiny_settings(**overrides))


ATTACKED = dict(clients=5, ranks=[2, 4, 8, 2, 4], train_size=240, partition="iid",
                attacks=[{"kind": "label_flip", "clients": [0]}, {"kind": "other_task", "clients": [1]},
                         {"kind": "shuffle_targets", "clients": [3]}, {"kind": "random", "clients": [4]}])


# ----------------------------------------------------------------------------- build_client


@pytest.mark.parametrize("settings", [{}, ATTACKED, dict(model="tiny-llama", dataset="copy", val_size=10,
                                                          attacks=[{"kind": "shuffle_targets", "clients": [2]}])],
                         ids=["plain", "attacked", "generation"])
def test_build_client_reads_only_its_own_rows_and_gives_the_whole_sets_batches(settings):
    # Prepare: the server's view, and the whole training set poisoned and encoded as one (the reference)
    cfg = _cfg(**settings)
    fed = build_federation(cfg)
    model = build_model(cfg, fed.shared, len(fed.source.label_names), max(fed.ranks))
    train = fed.source.examples(fed.train_rows)
    whole = encode_examples(model.tokenizer, poison_dataset(train, fed.client_idx, fed.attackers, cfg.seed),
                            cfg.max_length)
    for k in range(cfg.clients):
        source = CountingSource(cfg)
        # Execute
        ctx = build_client(cfg, k, shared=Shared.from_json(fed.shared.to_json()), source=source, model=model)
        # Assert: one read, of exactly client k's rows; its batches are the whole set's rows of client k
        assert len(source.reads) == 1
        np.testing.assert_array_equal(source.reads[0], fed.client_rows(k))
        assert ctx.client_id == k and len(ctx.indices) == fed.n_k[k]
        assert all(len(t) == fed.n_k[k] for t in ctx.data.values())  # it holds its own rows and nothing else
        mine = make_batch(ctx.data, ctx.indices)
        ref = make_batch(whole, fed.client_idx[k])
        assert mine.keys() == ref.keys()
        for key in ref:
            assert torch.equal(mine[key], ref[key]), (k, key)


def test_a_bbc_news_node_opens_its_own_article_files_and_no_other(monkeypatch):
    # Prepare: the server's view (it reads every training article once, for the tiny model's vocabulary)
    from lowrank_fed.llm.data import loaders as data

    cfg = _cfg(dataset="bbc_news", clients=4, ranks=[2, 4, 8, 4], eval_size=40)
    fed = build_federation(cfg)
    paths = fed.source._train.texts.paths  # one file per training row of the source
    opened, read = [], data._read
    monkeypatch.setattr(data, "_read", lambda path: opened.append(path) or read(path))
    # Execute: node 2 opens its own data source and builds its client
    ctx = build_client(cfg, 2, shared=Shared.from_json(fed.shared.to_json()))
    # Assert: exactly client 2's article files were opened, once each
    assert sorted(opened) == sorted(paths[i] for i in fed.client_rows(2))
    assert len(ctx.indices) == fed.n_k[2] == len(opened) > 0


def test_the_attacks_change_only_the_attackers_rows_as_on_the_whole_set():
    # Prepare
    cfg = _cfg(**ATTACKED)
    fed = build_federation(cfg)
    # Execute
    contexts = [build_client(cfg, k, shared=fed.shared, source=fed.source) for k in range(cfg.clients)]
    clean = [fed.source.examples(fed.client_rows(k)).labels for k in range(cfg.clients)]
    # Assert: label_flip and other_task change client 0's and 1's labels, shuffle_targets permutes client 3's
    # (stream SHUFFLE_TARGETS of (seed, 3)); the benign client 2 and the update attacker 4 train on their own
    labels = [c.data["labels"].numpy() for c in contexts]
    assert sorted(fed.attackers) == [0, 1, 3, 4]
    np.testing.assert_array_equal(labels[0], (clean[0] + 1) % 4)
    assert not np.array_equal(labels[1], clean[1]) and set(labels[1].tolist()) <= {0, 1, 2, 3}
    perm = streams.SHUFFLE_TARGETS.rng(cfg.seed, 3).permutation(fed.n_k[3])
    assert not np.array_equal(perm, np.arange(fed.n_k[3]))
    np.testing.assert_array_equal(labels[3], clean[3][perm])
    np.testing.assert_array_equal(labels[2], clean[2])
    np.testing.assert_array_equal(labels[4], clean[4])


def test_a_node_builds_the_servers_model_from_the_shared_vocabulary_alone():
    # Prepare
    cfg = _cfg()
    fed = build_federation(cfg)
    server = build_model(cfg, fed.shared, len(fed.source.label_names), max(fed.ranks))
    # Execute: the node's own model, from the facts the server sends (JSON) and its own rows
    ctx = build_client(cfg, 1, shared=Shared.from_json(fed.shared.to_json()), source=CountingSource(cfg))
    # Assert: the same base weights and head (the live LoRA factors are loaded from each download) and token ids
    node = {n: t for n, t in ctx.workspace.peft.state_dict().items() if "lora_" not in n}
    ref = {n: t for n, t in server.workspace.peft.state_dict().items() if "lora_" not in n}
    assert len(ref) > 10 and node.keys() == ref.keys() and all(torch.equal(node[n], ref[n]) for n in ref)
    assert fed.shared.vocabulary is not None and fed.shared.length_edges is None
    text = fed.source.examples([0]).texts
    assert server.tokenizer(text)["input_ids"] == ctx_tokenizer_ids(cfg, fed, text)


def ctx_tokenizer_ids(cfg, fed, text):
    return build_model(cfg, Shared.from_json(fed.shared.to_json()), len(fed.source.label_names),
                       max(fed.ranks)).tokenizer(text)[
        "input_ids"]


def test_build_client_refuses_what_it_cannot_build():
    cfg = _cfg()
    with pytest.raises(ValueError, match=r"Client id 3 is outside the run's clients \[0, 3\)"):
        build_client(cfg, 3)
    with pytest.raises(ValueError, match=r"'tiny-bert' builds its tokenizer from the vocabulary of the whole "
                                         r"training set.*Shared.vocabulary"):
        build_client(cfg, 0, shared=Shared())
    with pytest.raises(ValueError, match=r"Attack 'other_task' of client 1 needs the length-class edges"):
        fed = build_federation(_cfg(**ATTACKED))
        build_client(_cfg(**ATTACKED), 1, shared=Shared(vocabulary=fed.shared.vocabulary))
    with pytest.raises(ValueError, match="Shared set-up must be a JSON object"):
        Shared.from_json('{"vocab": []}')


def test_the_partition_needs_the_labels_only_and_equals_the_servers():
    # Prepare
    cfg = _cfg(clients=4, ranks=[2, 2, 4, 4], val_size=12)
    source = CountingSource(cfg)
    fed = build_federation(cfg, source)
    # Execute
    train_rows, val_rows, client_idx = plan_rows(cfg, source.labels.copy(), source.task)
    # Assert: no example read (the tiny model's vocabulary is the server's only read), the same split
    assert len(source.reads) == 1 and np.array_equal(source.reads[0], fed.train_rows)
    assert np.array_equal(train_rows, fed.train_rows) and np.array_equal(val_rows, fed.val_rows)
    assert all(np.array_equal(a, b) for a, b in zip(client_idx, fed.client_idx, strict=True))
    rows = np.concatenate([fed.client_rows(k) for k in range(cfg.clients)])
    assert len(val_rows) == 12 and sorted(rows.tolist() + val_rows.tolist()) == list(range(len(source)))


@pytest.mark.parametrize("settings", [dict(clients=4, ranks=[2, 2, 4, 4], val_size=40, partition="dirichlet",
                                           alpha=0.3),
                                      dict(model="tiny-llama", dataset="copy", clients=3, ranks=2, val_size=10)],
                         ids=["classification", "generation"])
def test_each_clients_validation_share_is_cut_from_the_validation_rows_as_its_test_share_is(settings):
    # Prepare
    cfg = _cfg(**settings)
    fed = build_federation(cfg)
    labelled = fed.task == "classification"
    # Execute: the shares, and the shares holdout_sets gives the validation labels with the stream VAL_HOLDOUT
    from lowrank_fed.llm.data import holdout_sets

    train_labels = fed.source.labels[fed.train_rows]
    expected = holdout_sets(train_labels if labelled else None, fed.client_idx,
                            fed.source.labels[fed.val_rows] if labelled else None,
                            streams.VAL_HOLDOUT.rng(cfg.seed), n_test=len(fed.val_rows))
    # Assert: positions in the validation rows, disjoint; every row of a class some client trains on is someone's
    shares = fed.val_holdout
    assert all(np.array_equal(a, b) for a, b in zip(shares, expected, strict=True))
    pooled = np.concatenate(shares)
    assert len(np.unique(pooled)) == len(pooled) and set(pooled.tolist()) <= set(range(len(fed.val_rows)))
    if labelled:  # a client's share has no class it does not train on, and together they cover the trained classes
        trained = set(train_labels.tolist())
        val_labels = fed.source.labels[fed.val_rows]
        assert sorted(pooled.tolist()) == [i for i, y in enumerate(val_labels) if y in trained]
        for k, share in enumerate(shares):
            assert set(val_labels[share].tolist()) <= set(train_labels[fed.client_idx[k]].tolist())
    else:  # without labels: every validation row, shared in proportion to the training sizes
        assert len(pooled) == len(fed.val_rows)


def test_build_federation_names_the_key_a_data_attack_breaks():
    cfg = _cfg(model="tiny-llama", dataset="copy", attacks=[{"kind": "label_flip", "clients": [0]}])
    with pytest.raises(ConfigError, match=r"attacks.*label_flip.*needs a classification task"):
        build_federation(cfg)


# ----------------------------------------------------------------------------- the table of random streams


def test_no_two_streams_draw_from_the_same_entropy():
    # Assert: every pair of streams with one root differs on every key (SeedSequence's zero padding included)
    names = [s.name for s in streams.STREAMS]
    assert len(set(names)) == len(names)
    for i, a in enumerate(streams.STREAMS):
        for b in streams.STREAMS[i + 1:]:
            assert streams.entropy_overlap(a, b) == [], (a.name, b.name)


def test_purpose_13_is_shared_safely_only_because_rounds_start_at_1():
    # Assert: ATTACKERS [s, 13] reads as [s, 13, 0, 0]; a round-0 batch stream would be the same stream
    purposes = {}
    for s in streams.STREAMS:
        if s.purpose is not None:
            purposes.setdefault((s.root, s.purpose), []).append(s.name)
    shared = {k: v for k, v in purposes.items() if len(v) > 1}
    assert shared == {("seed", 13): ["ATTACKERS", "BATCHES"],
                      ("seed", 15): ["ATTACK_DIRECTION", "SHARED_ATTACK_DIRECTION"]}
    assert streams.entropy_overlap(streams.ATTACKERS, streams.BATCHES) == []
    assert streams.entropy_overlap(streams.ATTACKERS, streams.BATCHES, rounds=range(0, 2)) != []
    a, b = streams.ATTACKERS.rng(5).integers(1 << 30, size=4), np.random.default_rng([5, 13, 0, 0]).integers(
        1 << 30, size=4)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("stream, key, old", [
    (streams.PARTITION, (), lambda s: np.random.default_rng([s, 2])),
    (streams.BATCHES, (3, 2), lambda s: np.random.default_rng([s, 13, 3, 2])),
    (streams.SAMPLING, (4,), lambda s: np.random.default_rng([s, 11, 4])),
    (streams.DATA, (), lambda s: np.random.default_rng(s)),
])
def test_streams_draw_what_the_literal_seeds_drew(stream, key, old):
    assert np.array_equal(stream.rng(7, *key).random(5), old(7).random(5))


def test_torch_stream_seeds_are_the_derived_seeds_of_before():
    ss = np.random.SeedSequence
    assert streams.DROPOUT.seed(7, 2, 1) == int(ss([7, 17, 2, 1]).generate_state(1)[0])
    assert streams.SHARED_ATTACK_DIRECTION.seed(7, 2, 0) == int(ss([7, 15, 2, 0]).generate_state(1)[0])
    assert streams.GLOBAL_RANK_PAD.seed(99, 8) == int(ss([99, 29, 8]).generate_state(1)[0])
    assert streams.MODEL_INIT.seed(7) == 7
    with pytest.raises(ValueError, match=r"Stream BATCHES takes the key \(round, client\).*got 1 value"):
        streams.BATCHES.rng(7, 1)


def test_every_stream_of_the_seed_comes_from_the_table():
    # Assert: outside streams.py, no literal purpose list and no SeedSequence in the torch layer
    for path in sorted((ROOT / "llm").rglob("*.py")):
        if path.name == "streams.py":
            continue
        text = path.read_text()
        assert not re.search(r"np\.random\.default_rng\(\[", text), path
        assert "SeedSequence(" not in text, path
        assert not re.search(r"^\s*torch\.manual_seed\((seed|cfg\.seed)\)\s*$", text, re.M), path
