"""Flower: records, the strategy and the ClientApp on an in-process Grid, and Flower's simulation against the runner.

The in-process runner is the reference: a config run through Flower must give the same adapters and metrics.
``InlineGrid`` is a Flower ``Grid`` that hands each message to the real ``ClientApp`` in this process (one
``Context`` per node, kept across rounds), so the strategy, the ClientApp's state handling and the fault paths
are tested in seconds; ``test_flower_simulation_equals_the_runner`` runs Flower's own Simulation Runtime (Ray).
"""

from __future__ import annotations

import json
import math
import tomllib
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower.client_app import app as client_app  # noqa: E402
from lowrank_fed.llm.flower.engine import FlowerSettings, FlowerSimulation, split_run_config  # noqa: E402
from lowrank_fed.llm.flower.records import from_records, to_records  # noqa: E402
from lowrank_fed.llm.methods import METHODS  # noqa: E402
from lowrank_fed.llm.protocol import Message as LFMessage  # noqa: E402
from lowrank_fed.llm.runner.simulation import UpdateDroppedWarning, load_final, run_experiment  # noqa: E402
from tests.llm.helpers import Interrupt, sha_tree, tiny_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALL_METHODS = list(METHODS)


class InlineGrid:
    """A Flower Grid whose nodes run the ClientApp in this process; ``lost`` replies never arrive.

    Node ``100 + i`` is client ``i`` (``--node-config partition-id=i``). ``lost`` holds ``(round, client)``
    pairs whose train message is delivered and trained on but whose reply is lost (a node killed before it
    answered). ``fail`` holds pairs whose ClientApp raises (an error reply).
    """

    def __init__(self, n, *, lost=(), fail=(), ranks=None):
        self.contexts = {}
        for i in range(n):
            node_config = {"partition-id": i, "num-partitions": n}
            if ranks is not None:
                node_config["rank"] = ranks[i]
            self.contexts[100 + i] = Context(run_id=1, node_id=100 + i, node_config=node_config, state=RecordDict(),
                                             run_config={})
        self.lost, self.fail, self.sent = set(lost), set(fail), []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_run_id"] = 1
            msg.metadata.__dict__["_src_node_id"] = 1
            node = msg.metadata.dst_node_id
            key = (msg.metadata.group_id and int(msg.metadata.group_id), node - 100)
            self.sent.append((msg.metadata.message_type, key, sorted(msg.content.keys())))
            if key in self.fail:
                replies.append(Message(Error(code=0, reason="ClientApp raised: boom"), reply_to=msg))
                continue
            reply = client_app(msg, self.contexts[node])
            if key not in self.lost:
                replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """The identity Flower's runtime gives a ServerApp process (Messages read it); restored after each test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _cfg(**overrides):
    return RunConfig.from_dict(tiny_settings(**{"rounds": 2, **overrides}))


def _final(folder, method):
    return (Path(folder) / "adapters" / f"{method}.safetensors").read_bytes()


def _metrics(folder):
    return (Path(folder) / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------------- records


def test_records_round_trip_keeps_dtypes_order_and_config():
    # Prepare: a bfloat16 factor (ArrayRecord rejects bfloat16), an int64 index tensor, nested config
    B = torch.randn(4, 2).to(torch.bfloat16)
    idx = torch.tensor([3, 1], dtype=torch.int64)
    msg = LFMessage({"lora/q/B": B, "slots": idx, "lora/q/A": torch.randn(2, 5, dtype=torch.float64)},
                    {"round": 2, "rank": 2, "client": 1, "slots": [[0, 1], [2]], "flag": True},
                    {"train_loss": 0.25, "steps": 3})
    # Execute
    content = to_records(msg)
    back = from_records(content)
    # Assert: exact tensors and dtypes, in order; config only in the ConfigRecord
    assert list(back.arrays) == list(msg.arrays)
    for key, t in msg.arrays.items():
        assert back.arrays[key].dtype == t.dtype
        assert torch.equal(back.arrays[key], t)
    assert content.array_records["msg.arrays"]["lora/q/B"].dtype == "float32"
    assert back.config == msg.config and back.metrics == msg.metrics
    assert set(content.metric_records["msg.metrics"]) == {"train_loss", "steps"}
    assert "client" not in content.metric_records["msg.metrics"]


def test_records_refuse_a_message_that_is_not_there():
    with pytest.raises(ValueError, match=r"no records 'state'"):
        from_records(to_records(LFMessage({}, {"round": 1})), "state")


# ----------------------------------------------------------------------------- config


def test_pyproject_flower_config_is_the_flat_default_config():
    """``[tool.flwr.app.config]`` must list every run-config key (``flwr run --run-config`` only overrides those)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    expected = {**RunConfig.from_dict({}).to_flat(), **FlowerSettings().to_flat()}
    assert app["config"] == expected, (
        "[tool.flwr.app.config] of pyproject.toml is out of date; its keys must be RunConfig().to_flat() plus "
        "FlowerSettings().to_flat(): print them with tomli_w.dumps({**RunConfig.from_dict({}).to_flat(), "
        "**FlowerSettings().to_flat()})")
    assert app["components"] == {"serverapp": "lowrank_fed.llm.flower.server_app:app",
                                 "clientapp": "lowrank_fed.llm.flower.client_app:app"}
    settings, cfg = split_run_config(app["config"])
    assert cfg == RunConfig.from_dict({}) and settings == FlowerSettings()


def test_split_run_config_names_a_bad_flower_key():
    flat = {**_cfg().to_flat(), "flower-round-timeout": 5, "flower-min-replies": 2}
    settings, cfg = split_run_config(flat)
    assert settings.round_timeout == 5.0 and settings.min_replies == 2 and cfg == _cfg()
    with pytest.raises(ValueError, match=r"Unknown Flower setting 'flower-timeout'"):
        split_run_config({"flower-timeout": 3})
    with pytest.raises(ValueError, match=r"'flower-min-replies' must be >= 1. Got 0"):
        FlowerSettings(min_replies=0)


# ----------------------------------------------------------------------------- strategy + ClientApp, in process


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_through_the_strategy_and_clientapp_equals_the_runner(tmp_path, method):
    # Prepare
    cfg = _cfg(methods=[method], checkpoint=True, score_uploads=True)
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute: the same config, each client's round through Flower messages to its node's ClientApp
    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False)
    grid = InlineGrid(cfg.clients)
    sim.serve(grid)
    # Assert: byte-identical adapters, metrics and checkpoints; one message per client per round, per-node ranks
    assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method)
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")
    trains = [key for kind, key, _ in grid.sent if kind == "train"]
    assert sorted(trains) == [(t, k) for t in (1, 2) for k in range(cfg.clients)]


def test_a_lost_reply_and_a_nan_reply_are_dropped_and_counted(tmp_path):
    # Prepare: client 1's round-2 reply never arrives (its node died); client 2's round-2 reply is NaN
    cfg = _cfg(methods=["hetlora"], faults=[{"round": 2, "client": 2, "kind": "nan"}])
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    # Execute
    with pytest.warns(UpdateDroppedWarning) as caught:
        sim.serve(InlineGrid(cfg.clients, lost={(2, 1)}))
    # Assert: the run finished; round 2 aggregated client 0 alone; both drops named and counted
    rows = [json.loads(line) for line in _metrics(tmp_path).splitlines()]
    last = rows[-1]
    assert last["round"] == 2 and last["dropped"] == 2
    reasons = {r["client"]: r.get("reason", "") for r in last["clients"]}
    assert "no reply from SuperNode 101" in reasons[1]
    assert "non-finite" in reasons[2]
    assert not any(r["dropped"] for r in rows[1]["clients"])
    assert any("client 1: update dropped (no reply from SuperNode 101" in str(w.message) for w in caught)
    tensors = load_final(tmp_path / "adapters" / "hetlora.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_round_below_min_replies_keeps_the_global_state(tmp_path):
    # Prepare: min_replies 3, and client 0's round-2 ClientApp raises
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False, settings=FlowerSettings(min_replies=3))
    states = []
    sim.on_round_end = lambda name, r: states.append({m: p.B.clone() for m, p in sim.strategy.server.pairs.items()})
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="every update was dropped"):
        sim.serve(InlineGrid(cfg.clients, fail={(2, 0)}))
    # Assert: round 2 kept round 1's adapter; the failing node's error is the drop reason
    assert all(torch.equal(states[0][m], states[1][m]) for m in states[0])
    last = json.loads(_metrics(tmp_path).splitlines()[-1])
    assert last["clients"][0]["reason"].startswith("SuperNode 100 answered with error 0: ClientApp raised: boom")


def test_a_node_whose_rank_budget_is_too_small_is_refused(tmp_path):
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"rank budget 2 is below the rank the run assigns client 2: 8"):
        sim.serve(InlineGrid(cfg.clients, ranks=[2, 4, 2]))


def test_the_serverapp_resumes_and_resends_client_state_to_new_nodes(tmp_path):
    """Killed after round 1 and resumed on fresh nodes (new contexts), FedSA ends as an uninterrupted run."""
    # Prepare
    cfg = _cfg(methods=["fedsa"], rounds=3, checkpoint=True)
    run_experiment(cfg, tmp_path / "ref", progress=False)

    def kill(name, round_):
        if round_ == 1:
            raise Interrupt

    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False, on_round_end=kill)
    with pytest.raises(Interrupt):
        sim.serve(InlineGrid(cfg.clients))
    # Execute: a new ServerApp, new SuperNodes (their context.state is empty)
    grid = InlineGrid(cfg.clients)
    FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(grid, resume=True)
    # Assert: the state went with each client's first download after the resume, not after
    assert _final(tmp_path / "fl", "fedsa") == _final(tmp_path / "ref", "fedsa")
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    with_state = [key for kind, key, parts in grid.sent if kind == "train" and "state.config" in parts]
    assert with_state == [(2, k) for k in range(cfg.clients)]


def test_the_clientapp_refuses_a_state_it_does_not_hold(tmp_path):
    # Prepare: a round-2 download saying the client trained in round 1, to a node that holds no state
    cfg = _cfg(methods=["fedsa"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    sim.setup()
    method = METHODS["fedsa"]()
    server = method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)
    server.round = 1
    content = to_records(method.configure(server, 0))
    from flwr.app import ConfigRecord

    content["run"] = ConfigRecord({"config": json.dumps(cfg.to_dict()), "method": "fedsa", "options": "{}",
                                   "state-round": 1})
    msg = Message(content, dst_node_id=100, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m"
    # Execute / Assert
    grid = InlineGrid(cfg.clients)
    with pytest.raises(ValueError, match=r"state of 'fedsa' from round 1 expected; this node holds none"):
        client_app(msg, grid.contexts[100])


# ----------------------------------------------------------------------------- Flower's Simulation Runtime


@pytest.mark.slow
def test_flower_simulation_equals_the_runner(tmp_path):
    """Every method, 2 rounds, 3 clients (ranks 2, 4, 8), a NaN reply (HetLoRA): Ray-run Flower vs the runner, bytewise."""
    # Prepare
    from lowrank_fed.cli import main as cli_main

    settings = tiny_settings(rounds=2, methods=ALL_METHODS, checkpoint=True,
                             faults=[{"round": 2, "client": 1, "kind": "nan", "method": "hetlora"}])
    config = tmp_path / "tiny.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                                for k, v in settings.items() if k != "faults")
                      + '\n\n[[faults]]\nround = 2\nclient = 1\nkind = "nan"\nmethod = "hetlora"\n')
    run_experiment(RunConfig.from_dict(settings), tmp_path / "ref", progress=False)
    # Execute: `lowrank-fed run --engine flower`
    status = cli_main(["run", str(config), "--engine", "flower", "--out", str(tmp_path / "fl"), "--no-progress"])
    # Assert
    assert status == 0
    for method in ALL_METHODS:
        assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method), method
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")
    rows = [json.loads(line) for line in _metrics(tmp_path / "fl").splitlines()]
    assert all(r["dropped"] == (1 if (r["round"], r["method"]) == (2, "hetlora") else 0) for r in rows)
    timings = [json.loads(line) for line in (tmp_path / "fl" / "timings.jsonl").read_text().splitlines()]
    assert all(math.isfinite(t["flower_round_seconds"]) for t in timings if t["round"] > 0)
