"""Data per site: ``[[clients]]`` tables, each client training on its own JSONL file, in process and on Flower.

Tiny-bert classification on three small JSONL files (one per site, different label mixes) with heterogeneous
ranks; the server's evaluation data is a fourth file (``dataset``) or, in process, the sites' held-out rows.
The Flower tests run the real ``ClientApp`` on an in-process Grid (``InlineGrid`` of test_flower.py) with a
counting reader: node ``k`` opens only site ``k``'s file, the server opens none. Sites under Ray and under real
SuperLink and SuperNodes (``flower up``) are in test_federated_eval.py: the transport is the same with a server
dataset or without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("datasets")

import tomli_w  # noqa: E402

from lowrank_fed.cli import main as cli_main  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, run_experiment  # noqa: E402

WORDS = {"sport": "ball goal match team win", "tech": "chip code data phone web", "food": "bread cook meal salt taste"}
RANKS = [2, 4, 8]
MIXES = ({"sport": 20, "tech": 10}, {"tech": 18, "food": 12}, {"food": 16, "sport": 14})


def _rows(seed: int, mix: dict[str, int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, n in mix.items():
        words = WORDS[label].split() + "the a of and to in".split()
        rows += [{"text": " ".join(rng.choice(words, size=8)), "label": label} for _ in range(n)]
    return [rows[i] for i in rng.permutation(len(rows))]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _sites(tmp_path, mixes=MIXES):
    return [_write(tmp_path / f"site{k}.jsonl", _rows(k, mix)) for k, mix in enumerate(mixes)]


def _server_file(tmp_path) -> str:
    return _write(tmp_path / "server.jsonl", _rows(99, {"sport": 10, "tech": 10, "food": 10}))


def _settings(tmp_path, *, dataset: str | None = None, weights=None, **overrides) -> dict:
    tables = [{"data": p, "rank": r} for p, r in zip(_sites(tmp_path), RANKS, strict=True)]
    for table, w in zip(tables, weights or [None] * 3, strict=True):
        if w is not None:
            table["weight"] = w
    settings = dict(name="sites", model="tiny-bert", methods=["fedit"], clients=tables, rounds=2, local_steps=2,
                    batch_size=4, lr=0.01, max_length=16, val_size=4, eval_size=40, eval_every=1, checkpoint=False)
    if dataset is not None:
        settings["dataset"] = dataset
    settings.update(overrides)
    return settings


def _metrics(folder) -> str:
    return (Path(folder) / "metrics.jsonl").read_text()


def _rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in _metrics(folder).splitlines()]


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize("server_data", [False, True], ids=["held-out-pool", "server-dataset"])
def test_each_client_trains_on_its_own_file_through_lowrank_fed_run(tmp_path, server_data):
    """`lowrank-fed run` on three site files: each client's n_k is its file's training rows, its rank its table's."""
    # Prepare
    settings = _settings(tmp_path, dataset=_server_file(tmp_path) if server_data else None,
                         methods=["fedit", "flexlora", "hafl"])
    config = tmp_path / "sites.toml"
    config.write_text(tomli_w.dumps(settings))
    sizes = [sum(mix.values()) for mix in MIXES]
    # Execute
    status = cli_main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"])
    # Assert
    assert status == 0
    setup = json.loads((tmp_path / "out" / "setup.json").read_text())
    held = [0 if server_data else sum(round(0.2 * n) for n in mix.values()) for mix in MIXES]
    assert setup["n_k"] == [n - h for n, h in zip(sizes, held, strict=True)]
    assert setup["ranks"] == RANKS
    assert setup["label_names"] == ["food", "sport", "tech"]
    rows = _rows_of(tmp_path / "out")
    assert {r["method"] for r in rows} == {"fedit", "flexlora", "hafl"}
    for r in rows:
        if r["round"] > 0:
            assert [(c["client"], c["n"], c["rank"]) for c in r["clients"]] == [
                (k, setup["n_k"][k], RANKS[k]) for k in range(3)]
    test_rows = 30 - settings["val_size"] if server_data else sum(held) - settings["val_size"]
    assert setup["eval_size"] == test_rows and sum(setup["holdout_sizes"]) == test_rows
    if not server_data:  # each client's local score is on its own held-out rows (those not drawn for validation)
        assert all(h <= n for h, n in zip(setup["holdout_sizes"], held, strict=True))


def test_a_table_weight_changes_the_aggregation_weights(tmp_path):
    """`weight` replaces n_k in the server's rule: FedIT's global adapter moves; the rows still say n_k."""
    # Prepare
    plain = RunConfig.from_dict(_settings(tmp_path, rounds=1))
    weighted = RunConfig.from_dict(_settings(tmp_path, rounds=1, weights=[1.0, 50.0, None]))
    # Execute
    run_experiment(plain, tmp_path / "plain", progress=False)
    run_experiment(weighted, tmp_path / "weighted", progress=False)
    # Assert
    a = (tmp_path / "plain" / "adapters" / "fedit.safetensors").read_bytes()
    b = (tmp_path / "weighted" / "adapters" / "fedit.safetensors").read_bytes()
    assert a != b
    assert [c["n"] for c in _rows_of(tmp_path / "weighted")[-1]["clients"]] == \
        [c["n"] for c in _rows_of(tmp_path / "plain")[-1]["clients"]]


def test_attacks_sampling_and_workers_keep_working_with_sites(tmp_path):
    """A label-flip attacker (by id), 2 clients a round, 2 worker processes: the same bytes as 1 worker."""
    # Prepare
    settings = _settings(tmp_path, attacks=[{"kind": "label_flip", "clients": [1]}], clients_per_round=2,
                         methods=["fedit"], rounds=1)
    # Execute
    for workers in (1, 2):
        run_experiment(RunConfig.from_dict({**settings, "workers": workers}), tmp_path / f"w{workers}",
                       progress=False)
    # Assert
    assert _metrics(tmp_path / "w1") == _metrics(tmp_path / "w2")
    rows = [r for r in _rows_of(tmp_path / "w1") if r["round"] > 0]
    assert all(len(r["clients"]) == 2 for r in rows)
    assert all(c.get("attack") == ("label_flip" if c["client"] == 1 else None) for r in rows for c in r["clients"])


def test_generation_sites_train_on_their_own_prompt_response_files(tmp_path):
    """tiny-llama on two prompt/response files (ranks 2 and 4), the held-out pool as evaluation data."""
    # Prepare
    files = []
    for k in range(2):
        rng = np.random.default_rng(k)
        rows = [{"prompt": " ".join(rng.choice(WORDS["tech"].split(), 4)), "response": "ok " * (1 + k)}
                for _ in range(20)]
        files.append(_write(tmp_path / f"gen{k}.jsonl", rows))
    cfg = RunConfig.from_dict(dict(name="gen", model="tiny-llama", methods=["fedit"], rounds=1, local_steps=1,
                                   batch_size=4, max_length=16, val_size=2, eval_size=20, rouge_size=2,
                                   max_new_tokens=2, checkpoint=False,
                                   clients=[{"data": files[0], "rank": 2}, {"data": files[1], "rank": 4}]))
    # Execute
    run_experiment(cfg, tmp_path / "out", progress=False)
    # Assert: 20 rows a site, round(0.2 * 20) = 4 held out
    setup = json.loads((tmp_path / "out" / "setup.json").read_text())
    assert setup["n_k"] == [16, 16] and setup["ranks"] == [2, 4] and setup["eval_size"] == 8 - 2
    assert _rows_of(tmp_path / "out")[-1]["perplexity"] > 0


def test_weights_of_reads_the_table_weight_else_num_examples():
    # Prepare
    from lowrank_fed.llm.methods.base import weights_of
    from lowrank_fed.llm.protocol import Message

    replies = {0: Message({}, {"num_examples": 7}), 1: Message({}, {"num_examples": 3, "weight": 0.5})}
    # Execute / Assert
    assert weights_of(replies) == [7.0, 0.5]


def test_a_missing_site_file_is_refused_naming_its_table_before_anything_is_written(tmp_path, capsys):
    # Prepare
    settings = _settings(tmp_path)
    settings["clients"][1]["data"] = str(tmp_path / "nowhere.jsonl")
    config = tmp_path / "sites.toml"
    config.write_text(tomli_w.dumps(settings))
    # Execute
    status = cli_main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"])
    # Assert
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "clients[1].data" in err and "nowhere.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_a_site_label_outside_the_label_set_is_refused_naming_file_and_label(tmp_path, capsys):
    # Prepare: the label set is the server dataset's (sport, tech, food); site 2 has a "travel" row
    settings = _settings(tmp_path, dataset=_server_file(tmp_path))
    _write(tmp_path / "site2.jsonl", _rows(2, {"food": 9}) + [{"text": "train plane hotel", "label": "travel"}])
    config = tmp_path / "sites.toml"
    config.write_text(tomli_w.dumps(settings))
    # Execute
    status = cli_main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"])
    # Assert
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "clients[2].data" in err and "site2.jsonl" in err and "'travel'" in err
    assert not (tmp_path / "out").exists()


def test_val_size_above_the_sites_held_out_rows_is_a_config_error_naming_val_size(tmp_path):
    # Prepare: 6 held-out rows a site; val_size = 18 gives each site a share of 6 (federated evaluation)
    sim = Simulation(RunConfig.from_dict(_settings(tmp_path, val_size=18)), tmp_path / "out", progress=False)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"Config key 'val_size': expected a share below each site's held-out "
                                          r"rows: site 0 \(clients\[0\]\.data\) holds out 6 rows and its share "
                                          r"of val_size is 6"):
        sim.setup()


def test_a_site_too_small_to_hold_out_a_row_is_a_config_error_naming_test_fraction(tmp_path):
    # Prepare: site 1 has 2 rows of each label, so test_fraction 0.2 holds out round(0.4) = 0 of each
    settings = _settings(tmp_path, val_size=0)
    settings["clients"][1]["data"] = _write(tmp_path / "tiny.jsonl", _rows(9, {"sport": 2, "tech": 2}))
    sim = Simulation(RunConfig.from_dict(settings), tmp_path / "out", progress=False)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"Config key 'test_fraction': expected a share that holds out at least "
                                          r"one row of each site: site 1 \(clients\[1\]\.data\) holds out none"):
        sim.setup()
    assert not (tmp_path / "out").exists()


def test_the_config_does_not_open_site_files_a_flower_server_lacks(tmp_path):
    """The ServerApp validates the flat config on a machine without the sites' files: that must pass."""
    # Prepare
    settings = _settings(tmp_path, dataset=_server_file(tmp_path))
    settings["clients"][0]["data"] = "/elsewhere/site0.jsonl"
    # Execute
    cfg = RunConfig.from_dict(settings)
    # Assert
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.sites[0].data == "/elsewhere/site0.jsonl"


# ----------------------------------------------------------------------------- Flower


pytest.importorskip("flwr")

from tests.llm.test_flower import InlineGrid, _task_identity  # noqa: E402,F401


class _Reads:
    """Counts every data source opened (``files.read_table``), by the client whose node was serving (None: the
    server)."""

    def __init__(self, monkeypatch):
        import lowrank_fed.llm.data.files as files

        self.serving, self.opened = [None], []
        read = files.read_table

        def counted(path):
            self.opened.append((self.serving[0], str(path)))
            return read(path)

        monkeypatch.setattr(files, "read_table", counted)

    def grid(self, n, **kwargs):
        reads = self

        class NodeGrid(InlineGrid):
            def send_and_receive(self, messages, *, timeout=None):
                out = []
                for msg in messages:
                    reads.serving[0] = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                    try:
                        out += super().send_and_receive([msg], timeout=timeout)
                    finally:
                        reads.serving[0] = None
                return out

        return NodeGrid(n, **kwargs)


def test_flower_nodes_read_only_their_own_file_and_equal_the_in_process_run(tmp_path, monkeypatch):
    """Flower strategy + ClientApp with [[clients]] and a server dataset: node k opens site k's file only, the
    server opens only its dataset; metrics and adapters equal the in-process run byte for byte."""
    # Prepare
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSimulation

    server = _server_file(tmp_path)
    cfg = RunConfig.from_dict(_settings(tmp_path, dataset=server, methods=["fedit", "flexlora"],
                                        weights=[2.0, None, 5.0]))
    run_experiment(cfg, tmp_path / "ref", progress=False)
    monkeypatch.setattr(client_app_module, "_NODE", {})
    reads = _Reads(monkeypatch)
    # Execute
    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False)
    sim.serve(reads.grid(cfg.clients, ranks=RANKS))
    # Assert
    sites = {k: s.data for k, s in enumerate(cfg.sites)}
    assert {p for who, p in reads.opened if who is None} == {server}
    for k in range(cfg.clients):
        assert {p for who, p in reads.opened if who == k} == {sites[k]}
    assert sim._contexts is None
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    for method in cfg.methods:
        assert (tmp_path / "fl" / "adapters" / f"{method}.safetensors").read_bytes() == \
            (tmp_path / "ref" / "adapters" / f"{method}.safetensors").read_bytes()


def test_a_node_data_path_overrides_the_table(tmp_path, monkeypatch):
    """A real SuperNode's own file: --node-config data-path replaces clients[k].data (the table's path need not
    exist anywhere)."""
    # Prepare
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSimulation

    settings = _settings(tmp_path, dataset=_server_file(tmp_path), rounds=1)
    real = [t["data"] for t in settings["clients"]]
    for k, table in enumerate(settings["clients"]):
        table["data"] = f"/on/the/node/site{k}.jsonl"
    cfg = RunConfig.from_dict(settings)
    monkeypatch.setattr(client_app_module, "_NODE", {})
    reads = _Reads(monkeypatch)
    grid = reads.grid(3, ranks=RANKS)
    for k, node in enumerate(sorted(grid.contexts)):
        grid.contexts[node].node_config["data-path"] = real[k]
    # Execute
    FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(grid)
    # Assert
    assert {p for who, p in reads.opened if who is not None} == set(real)
    rows = _rows_of(tmp_path / "fl")
    assert not any(c["dropped"] for c in rows[-1]["clients"])


def test_a_node_rank_that_contradicts_its_table_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # Prepare
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSettings, FlowerSimulation

    cfg = RunConfig.from_dict(_settings(tmp_path, dataset=_server_file(tmp_path)))
    monkeypatch.setattr(client_app_module, "_NODE", {})
    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False, settings=FlowerSettings(start_timeout=0.0))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"rank=16 contradicts the run config's clients\[1\]\.rank = 4"):
        sim.serve(InlineGrid(3, ranks=[2, 16, 8]))
    assert not (tmp_path / "fl").exists()


def test_a_node_whose_file_has_a_label_outside_the_set_fails_naming_file_and_label(tmp_path, monkeypatch):
    # Prepare: the server's label set is its dataset's; node 2's own file has "travel"
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.flower.engine import FlowerSimulation
    from lowrank_fed.llm.runner.simulation import UpdateDroppedWarning

    settings = _settings(tmp_path, dataset=_server_file(tmp_path), rounds=1)
    bad = _write(tmp_path / "node2.jsonl", _rows(2, {"food": 9}) + [{"text": "train plane", "label": "travel"}])
    cfg = RunConfig.from_dict(settings)
    monkeypatch.setattr(client_app_module, "_NODE", {})
    grid = InlineGrid(3, ranks=RANKS)
    grid.contexts[102].node_config["data-path"] = bad
    # Execute
    with pytest.warns(UpdateDroppedWarning):
        FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(grid)
    # Assert
    reason = {c["client"]: c for c in _rows_of(tmp_path / "fl")[-1]["clients"]}[2]["reason"]
    assert "node2.jsonl" in reason and "'travel'" in reason and "clients[2].data" in reason


def test_flower_up_gives_each_supernode_its_file_and_rank(tmp_path):
    """`flower up`'s node configs: partition-id, num-partitions, rank and the absolute data-path of each table."""
    # Prepare
    from flwr.common.config import parse_config_args

    from lowrank_fed.llm.flower.deploy import node_config

    cfg = RunConfig.from_dict(_settings(tmp_path, dataset=_server_file(tmp_path)))
    # Execute
    parsed = [parse_config_args([node_config(cfg, i, 3, RANKS[i])]) for i in range(3)]
    # Assert
    assert parsed == [{"partition-id": i, "num-partitions": 3, "rank": RANKS[i],
                       "data-path": str(Path(cfg.sites[i].data).resolve())} for i in range(3)]


