"""Federated evaluation: a ``[[clients]]`` run without a server ``dataset`` is scored by its sites, each on its own
held-out rows, in process and on Flower (the strategy and the real ClientApp on an in-process Grid), to the same
bytes. The models are tiny ones saved with ``save_pretrained`` (with their word tokenizer): on Flower without a
server dataset the server holds no text to build a tiny model's vocabulary from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("flwr")

import tomli_w  # noqa: E402

from lowrank_fed.cli import main as cli_main  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.evaluate import score_encoded, summarise  # noqa: E402
from lowrank_fed.llm.fedeval import share, split_held  # noqa: E402
from lowrank_fed.llm.federation import encode_examples  # noqa: E402
from lowrank_fed.llm.models import tiny_bert, tiny_llama, word_tokenizer, word_vocabulary  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, run_experiment  # noqa: E402
from tests.llm.helpers import flower_up  # noqa: E402
from tests.llm.test_flower import InlineGrid, _task_identity  # noqa: E402,F401
from tests.llm.test_sites import MIXES, RANKS, WORDS, _Reads, _rows, _write  # noqa: E402

LABELS = ["food", "sport", "tech"]


def _save(folder: Path, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> str:
    """tiny-bert with a word tokenizer over the sites' words, three labels."""
    tokenizer = word_tokenizer(words=word_vocabulary([" ".join(WORDS.values()) + " the a of and to in"]))
    return _save(tmp_path_factory.mktemp("models") / "bert", tiny_bert(3, vocab_size=len(tokenizer), seed=0),
                 tokenizer)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    tokenizer = word_tokenizer(words=word_vocabulary([WORDS["tech"] + " ok"]), causal=True)
    return _save(tmp_path_factory.mktemp("models") / "llama", tiny_llama(vocab_size=len(tokenizer), seed=0), tokenizer)


def _classification(tmp_path, model: str, **overrides) -> dict:
    tables = [{"data": _write(tmp_path / f"site{k}.jsonl", _rows(k, mix)), "rank": r}
              for k, (mix, r) in enumerate(zip(MIXES, RANKS, strict=True))]
    settings = dict(name="fedeval", model=model, task="classification", labels=LABELS, methods=["fedit", "flexlora"],
                    clients=tables, rounds=2, local_steps=2, batch_size=4, lr=0.01, max_length=16, val_size=5,
                    eval_size=40, eval_every=1, checkpoint=False)
    settings.update(overrides)
    return settings


def _generation(tmp_path, model: str, **overrides) -> dict:
    tables = []
    for k in range(2):
        rng = np.random.default_rng(k)
        rows = [{"prompt": " ".join(rng.choice(WORDS["tech"].split(), 4)), "response": "ok " * (1 + k)}
                for _ in range(20)]
        tables.append({"data": _write(tmp_path / f"gen{k}.jsonl", rows), "rank": [2, 4][k]})
    settings = dict(name="fedgen", model=model, task="generation", methods=["fedit", "flexlora"], rounds=2,
                    local_steps=1, batch_size=4, max_length=16, val_size=2, eval_size=20, rouge_size=5,
                    max_new_tokens=2, eval_every=1, checkpoint=False, clients=tables)
    settings.update(overrides)
    return settings


def _read(folder, name) -> str:
    return (Path(folder) / name).read_text()


def _serve(cfg, out, monkeypatch, ranks):
    """The Flower strategy and ClientApp on an in-process Grid whose reads are counted per node."""
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSimulation

    monkeypatch.setattr(client_app_module, "_NODE", {})
    reads = _Reads(monkeypatch)
    grid = reads.grid(cfg.clients, ranks=ranks)
    sim = FlowerSimulation(cfg, out, progress=False)
    sim.serve(grid)
    return sim, reads, grid


# ----------------------------------------------------------------------------- the per-site split


def test_each_sites_validation_share_is_its_part_of_val_size_and_the_shares_sum_to_it():
    # Execute / Assert
    assert [share(7, 3, k) for k in range(3)] == [3, 2, 2]
    assert sum(share(11, 4, k) for k in range(4)) == 11


def test_a_sites_split_is_stratified_deterministic_and_disjoint(tmp_path, bert_folder):
    # Prepare
    from lowrank_fed.llm.sites import SiteData

    cfg = RunConfig.from_dict(_classification(tmp_path, bert_folder))
    site = SiteData(cfg, 1, LABELS)
    # Execute
    val, test = split_held(cfg, 1, site.held)
    again = split_held(cfg, 1, site.held)
    # Assert
    assert len(val) == share(cfg.val_size, 3, 1) and len(set(val) & set(test)) == 0
    assert len(val) + len(test) == len(site.held)
    assert np.array_equal(val, again[0]) and np.array_equal(test, again[1])


# ----------------------------------------------------------------------------- in process


def test_the_pooled_scores_equal_a_direct_computation_on_the_concatenated_held_out_rows(tmp_path, bert_folder):
    """Round 0's accuracy, macro-F1 and loss of the global model: the sites' per-example scores pooled equal one
    pass over the sites' test rows concatenated (each site's rows as split_held picks them)."""
    # Prepare
    from lowrank_fed.llm.methods import make_method
    from lowrank_fed.llm.sites import SiteData, concat

    cfg = RunConfig.from_dict(_classification(tmp_path, bert_folder, methods=["fedit"]))
    sim = Simulation(cfg, tmp_path / "out", progress=False)
    sim.setup()
    method = make_method("fedit")
    server, clients = sim._start(method)
    sites = [SiteData(cfg, k, LABELS) for k in range(3)]
    pooled = concat([s.test for s in sites], "classification", LABELS)
    # Execute
    scores = sim.evaluate(method, server, clients)
    sim._load(method.global_model(server))
    direct = summarise(score_encoded(sim.ws.peft, encode_examples(sim.tokenizer, pooled, cfg.max_length), None,
                                     "classification"))
    # Assert
    assert scores["accuracy"] == direct["accuracy"] and scores["macro_f1"] == direct["macro_f1"]
    assert scores["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert sim.describe()["eval_size"] == len(pooled)
    assert sim.describe()["holdout_sizes"] == [len(s.test) for s in sites]
    assert [len(s.test) for s in sites] == [len(h) for h in sim.holdout]


# ----------------------------------------------------------------------------- Flower


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_flower_nodes_score_their_own_rows_and_equal_the_in_process_run(tmp_path, monkeypatch, bert_folder,
                                                                         llama_folder, task):
    """No server dataset: node k opens site k's file only, the server opens none; metrics (ROUGE-L, FedSA's
    personal scores and the uploads' scores included), setup.json (but n_k) and adapters equal the in-process run
    byte for byte."""
    # Prepare
    if task == "classification":
        cfg, ranks = RunConfig.from_dict(_classification(tmp_path, bert_folder, score_uploads=True,
                                                         methods=["fedit", "flexlora", "fedsa"])), RANKS
    else:
        cfg, ranks = RunConfig.from_dict(_generation(tmp_path, llama_folder)), [2, 4]
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute
    sim, reads, grid = _serve(cfg, tmp_path / "fl", monkeypatch, ranks)
    # Assert
    assert not [p for who, p in reads.opened if who is None]
    for k, site in enumerate(cfg.sites):
        assert {p for who, p in reads.opened if who == k} == {site.data}
    assert any(kind == "evaluate" for kind, *_ in grid.sent)
    assert _read(tmp_path / "fl", "metrics.jsonl") == _read(tmp_path / "ref", "metrics.jsonl")
    fl, ref = (json.loads(_read(tmp_path / f, "setup.json")) for f in ("fl", "ref"))
    assert fl.pop("n_k") == [None] * cfg.clients  # the server never learns a site's training rows
    ref.pop("n_k")
    assert fl == ref  # eval_size, val_size, holdout_sizes, majority_accuracy: from the sites' answers
    for method in cfg.methods:
        assert (tmp_path / "fl" / "adapters" / f"{method}.safetensors").read_bytes() == \
            (tmp_path / "ref" / "adapters" / f"{method}.safetensors").read_bytes()
    last = json.loads(_read(tmp_path / "fl", "metrics.jsonl").splitlines()[-1])
    if task == "generation":
        assert "rouge_l" in last and "samples" not in last
    else:
        assert all(v is not None for v in last["per_client"])


def test_a_node_that_fails_to_evaluate_stops_the_run_naming_it(tmp_path, monkeypatch, bert_folder):
    # Prepare: node 1's ClientApp raises on every message after the first round's training
    cfg = RunConfig.from_dict(_classification(tmp_path, bert_folder, methods=["fedit"], rounds=1))

    class Failing(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            evaluate = [m for m in messages if m.metadata.message_type == "evaluate"]
            if evaluate and self.trained:
                self.fail |= {(m.metadata.group_id and int(m.metadata.group_id), 1) for m in evaluate}
            self.trained = self.trained or any(m.metadata.message_type == "train" for m in messages)
            return super().send_and_receive(messages, timeout=timeout)

    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSimulation

    monkeypatch.setattr(client_app_module, "_NODE", {})
    grid = Failing(3, ranks=RANKS)
    grid.trained = False
    # Execute / Assert
    with pytest.raises(RuntimeError, match=r"Federated evaluation: SuperNode 101 \(client 1\) sent no scores"):
        FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(grid)


@pytest.mark.parametrize("key", ["labels", "model"])
def test_a_flower_run_without_dataset_needs_labels_and_a_model_with_its_own_tokenizer(tmp_path, capsys, key):
    # Prepare: no label set (the server cannot take the sites' union), or a tiny model (no text for its vocabulary)
    settings = _classification(tmp_path, "tiny-bert")
    del settings["task"]
    if key == "labels":
        del settings["labels"]
    config = tmp_path / "sites.toml"
    config.write_text(tomli_w.dumps(settings))
    # Execute
    status = cli_main(["run", str(config), "--engine", "flower", "--out", str(tmp_path / "out"), "--no-progress"])
    # Assert
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert f"Config key '{key}'" in err and "[[clients]] on Flower without dataset" in err
    assert not (tmp_path / "out").exists()


def test_the_flower_checks_pass_with_labels_and_a_model_folder(tmp_path, bert_folder):
    # Prepare
    from lowrank_fed.llm.sites import check_flower_sites

    cfg = RunConfig.from_dict(_classification(tmp_path, bert_folder))
    # Execute / Assert: no ConfigError
    check_flower_sites(cfg)
    with pytest.raises(ConfigError, match="Config key 'labels'"):
        check_flower_sites(RunConfig.from_dict(_classification(tmp_path, bert_folder, labels=[])))


@pytest.mark.slow
def test_flower_simulation_without_dataset_equals_the_in_process_run(tmp_path, bert_folder):
    """`lowrank-fed run --engine flower` (Ray), [[clients]] without dataset: the sites score; the same bytes."""
    # Prepare
    settings = _classification(tmp_path, bert_folder)
    config = tmp_path / "sites.toml"
    config.write_text(tomli_w.dumps(settings))
    run_experiment(RunConfig.from_dict(settings), tmp_path / "ref", progress=False)
    # Execute
    status = cli_main(["run", str(config), "--engine", "flower", "--out", str(tmp_path / "fl"), "--no-progress"])
    # Assert
    assert status == 0
    assert _read(tmp_path / "fl", "metrics.jsonl") == _read(tmp_path / "ref", "metrics.jsonl")
    for method in settings["methods"]:
        assert (tmp_path / "fl" / "adapters" / f"{method}.safetensors").read_bytes() == \
            (tmp_path / "ref" / "adapters" / f"{method}.safetensors").read_bytes()


@pytest.mark.slow
def test_flower_up_without_dataset_equals_the_in_process_run(tmp_path, bert_folder):
    """Real SuperLink and SuperNodes (`flower up`), two sites, each node given only its own file, no server
    dataset: the nodes answer the evaluate messages; the metrics equal the in-process run's."""
    # Prepare
    settings = _classification(tmp_path, bert_folder, rounds=1, methods=["fedit"])
    settings["clients"] = settings["clients"][:2]
    cfg = RunConfig.from_dict(settings)
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute
    flower_up(cfg, tmp_path / "out", 2)
    # Assert
    assert _read(tmp_path / "out", "metrics.jsonl") == _read(tmp_path / "ref", "metrics.jsonl")
    last = json.loads(_read(tmp_path / "out", "metrics.jsonl").splitlines()[-1])
    assert [(c["client"], c["rank"], c["dropped"]) for c in last["clients"]] == [(0, RANKS[0], False),
                                                                                 (1, RANKS[1], False)]
