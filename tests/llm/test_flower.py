"""Flower: records, the strategy and the ClientApp on an in-process Grid, and Flower's simulation against the runner.

The in-process runner is the reference: a config run through Flower must give the same adapters and metrics.
``InlineGrid`` is a Flower ``Grid`` that hands each message to the real ``ClientApp`` in this process (one
``Context`` per node, kept across rounds), so the strategy, the ClientApp's state handling and the fault paths
are tested in seconds; ``test_flower_simulation_equals_the_runner`` runs Flower's own Simulation Runtime (Ray).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")

import tomli_w  # noqa: E402

from flwr.app import Array, Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower.client_app import app as client_app  # noqa: E402
from lowrank_fed.llm.flower.deploy import add_arguments  # noqa: E402
from lowrank_fed.llm.flower.deploy import main as deploy_main  # noqa: E402
from lowrank_fed.llm.flower.engine import (ENV, FlowerSettings, FlowerSimulation, flower_environment,  # noqa: E402
                                           split_run_config)
from lowrank_fed.llm.flower.server_app import output_folder  # noqa: E402
from lowrank_fed.llm.flower.records import from_records, to_records  # noqa: E402
from lowrank_fed.llm.methods import METHODS  # noqa: E402
from lowrank_fed.llm.protocol import Message as LFMessage  # noqa: E402
from lowrank_fed.llm.run import check_output_folder  # noqa: E402
from lowrank_fed.llm.runner.simulation import UpdateDroppedWarning, load_final, run_experiment  # noqa: E402
from tests.llm.helpers import Interrupt, sha_tree, tiny_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALL_METHODS = list(METHODS)


class InlineGrid:
    """A Flower Grid whose nodes run the ClientApp in this process; replies can be lost, failed or tampered with.

    Node ``100 + i`` is client ``i`` (``--node-config partition-id=i``). Keys are ``(round, client)`` pairs:
    ``lost`` replies never arrive (the node died after training); ``fail`` replies are the error of a ClientApp
    that raised; ``unavailable`` replies are the SuperLink's ``NODE_UNAVAILABLE`` error (a node it lost);
    ``tamper[key](content)`` edits a reply's records before it arrives (a malformed reply). ``sent`` lists
    ``(message type, key, record names, download rank or None)`` of every message; :meth:`add_node` adds a
    node (one that joins mid-run).
    """

    def __init__(self, n, *, lost=(), fail=(), unavailable=(), tamper=None, ranks=None, num_partitions=None):
        self.contexts = {}
        for i in range(n):
            node_config = {"partition-id": i, "num-partitions": n if num_partitions is None else num_partitions}
            if ranks is not None:
                node_config["rank"] = ranks[i]
            self.add_node(100 + i, node_config)
        self.lost, self.fail, self.unavailable, self.sent = set(lost), set(fail), set(unavailable), []
        self.tamper = dict(tamper or {})

    def add_node(self, node, node_config):
        self.contexts[node] = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(),
                                      run_config={})

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
            kind = msg.metadata.message_type
            rank = from_records(msg.content, "msg").config["rank"] if kind == "train" else None
            self.sent.append((kind, key, sorted(msg.content.keys()), rank))
            if key in self.fail:
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                             reason="ClientApp raised: boom"), reply_to=msg))
                continue
            if key in self.unavailable:
                replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                                       reply_to=msg))
                continue
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # what Flower's runtime sends back for a ClientApp that raised
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(err)),
                                       reply_to=msg))
                continue
            if key in self.tamper:
                self.tamper[key](reply.content)
            if key not in self.lost:
                replies.append(reply)
        return replies

    def trains(self):
        """``(round, client, rank)`` of every train message sent."""
        return [(*key, rank) for kind, key, _, rank in self.sent if kind == "train"]


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


def test_flwr_run_dot_accepts_every_committed_file_of_the_project():
    """``flwr run .`` reads the project tree (less .gitignore) and refuses a path deeper than Flower's limit before
    it applies ``fab-include``: a committed results folder one level too deep would break it for everyone."""
    import subprocess

    from flwr.cli.utils import filter_paths_for_publish

    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = {path: ROOT / path for path in listed.stdout.splitlines()}
    kept = filter_paths_for_publish(files)  # AppPathDepthError names the first path too deep
    assert "pyproject.toml" in kept


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


def test_flower_environment_keeps_flowers_paths_and_caches_in_the_run_folder(tmp_path):
    # Prepare: a run folder short enough for Ray's sockets, and a deep one
    short_root = Path(tempfile.mkdtemp(prefix="lrf-t-"))  # /tmp/lrf-t-XXXXXXXX/.flower/ray: under 40 characters
    deep = tmp_path / ("d" * 60)
    try:
        # Execute
        with flower_environment(short_root) as env:
            made = {k: Path(env[k]).is_dir() for k in ("FLWR_HOME", "RAY_TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME")}
        with flower_environment(deep) as deep_env:
            ray = Path(deep_env["RAY_TMPDIR"])
            ray_made = ray.is_dir()
        # Assert: every folder inside <run>/.flower and created; Ray's too-long path replaced, removed after
        base = short_root.resolve() / ".flower"
        assert env == {**ENV, "FLWR_HOME": str(base / "home"), "RAY_TMPDIR": str(base / "ray"),
                       "MPLCONFIGDIR": str(base / "matplotlib"), "XDG_CACHE_HOME": str(base / "cache")}
        assert all(made.values()), made
        assert deep_env["XDG_CACHE_HOME"] == str(deep.resolve() / ".flower" / "cache")
        assert deep_env["MPLCONFIGDIR"] == str(deep.resolve() / ".flower" / "matplotlib")
        assert ray_made and len(str(ray)) <= 40 and not ray.exists()
    finally:
        shutil.rmtree(short_root)


def _flower_up(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return deploy_main(parser.parse_args(["up", *argv]))


def test_one_output_folder_rule_resume_same_config_overwrite_starts_afresh(tmp_path, monkeypatch, capsys):
    # Prepare: a folder holding an interrupted run of the tiny config; `up` itself replaced by a recorder
    settings = tiny_settings()
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(settings))
    cfg = RunConfig.from_dict(settings)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    (out / "metrics.jsonl").write_text("round 1 of the earlier run\n")
    seen = []

    def fake_up(cfg, out, supernodes, ranks, settings, *, timeout):
        # .flower: Flower's scratch; the lock flower up holds while the run writes
        seen.append(sorted(p.name for p in Path(out).iterdir() if p.name not in (".flower", ".lowrank-fed.lock")))
        (Path(out) / "summary.json").write_text("[]")
        return 0

    monkeypatch.setattr("lowrank_fed.llm.flower.deploy.up", fake_up)
    # Execute / Assert: the same config resumes (flower up and the ServerApp agree) ...
    assert output_folder(cfg, FlowerSettings(out=str(out))) == (out, True)
    assert _flower_up([str(config), "--out", str(out)]) == 0
    assert seen[-1] == ["config.json", "metrics.jsonl"] and "(resuming)" in capsys.readouterr().out
    # ... --overwrite empties the folder first, so the ServerApp starts afresh
    assert _flower_up([str(config), "--out", str(out), "--overwrite"]) == 0
    assert seen[-1] == [] and "(resuming)" not in capsys.readouterr().out
    # ... another config, or files that are no run, are refused (exit 2, nothing changed) by both
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert check_output_folder(out, cfg, overwrite=True, hint="") == "clear"
    assert _flower_up([str(config), "--out", str(out), "--set", "rounds=5"]) == 2
    assert f"Output folder '{out}' holds a run of another config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds a run of another config"):
        output_folder(RunConfig.from_dict(tiny_settings(rounds=5)), FlowerSettings(out=str(out)))
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match=r"already holds files \(summary.json\); nothing was changed. Set flower-out"):
        output_folder(cfg, FlowerSettings(out=str(out)))
    assert len(seen) == 2


def test_flower_up_needs_one_supernode_per_client(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_settings()))
    assert _flower_up([str(config), "--out", str(tmp_path / "run"), "--supernodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--supernodes must equal clients = 3" in err and "Got 2." in err
    assert not (tmp_path / "run").exists()


def _cli(argv, monkeypatch):
    """``lowrank-fed ARGV`` in this process with ``deploy.up`` replaced (a case it reaches was accepted): its
    exit status."""
    from lowrank_fed.cli import main as cli_main

    def started(*args, **kwargs):
        raise AssertionError("the run was started")

    monkeypatch.setattr("lowrank_fed.llm.flower.deploy.up", started)
    try:
        return cli_main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("args, message", [
    (["--min-replies", "99"], "'flower-min-replies' (flower up --min-replies) must be at most the clients a round "
                              "samples (clients = 3): with more, no round is ever aggregated. Got 99."),
    (["--min-replies", "3", "--set", "clients_per_round=2"], "at most the clients a round samples "
                                                            "(clients_per_round = 2)"),
    (["--supernodes", "abc"], "lowrank-fed flower up: error: argument --supernodes: invalid int value: 'abc'"),
    (["--min-replies", "x"], "argument --min-replies: invalid int value: 'x'"),
    (["--timeout", "inf"], "--timeout must be a finite number of seconds, > 0. Got inf."),
    (["--round-timeout", "inf"], "--round-timeout must be a finite number of seconds, > 0. Got inf."),
    (["--start-timeout", "inf"], "--start-timeout must be a finite number of seconds, >= 0. Got inf."),
    (["--out", "/proc/lowrank-fed-test/run"], "'/proc/lowrank-fed-test/run' cannot be written"),
])
def test_flower_up_refuses_each_bad_value_in_one_line_before_writing(tmp_path, monkeypatch, capsys, args, message):
    # Prepare
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_settings()))
    argv = ["flower", "up", str(config), "--out", str(tmp_path / "run"), *args]
    # Execute
    status = _cli(argv, monkeypatch)
    # Assert: exit 2, one line on stderr naming the value, nothing written
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_flower_without_an_action_is_one_line_and_up_help_is_plain_text(monkeypatch, capsys):
    assert _cli(["flower"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err == "lowrank-fed flower: error: the following arguments are required: ACTION (see lowrank-fed " \
                  "flower --help)\n"
    assert _cli(["flower", "up", "--help"], monkeypatch) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "``" not in out and ":mod:" not in out
    assert "stop every process of the run" in out and "SIGTERM" in out


def test_the_serverapp_refuses_min_replies_above_the_clients_before_writing(tmp_path):
    # Prepare: 3 clients, min_replies 4 (flwr run . --run-config "flower-min-replies=4")
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path / "run", progress=False, settings=FlowerSettings(min_replies=4))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'flower-min-replies' .* must be at most the clients a round samples "
                                         r"\(clients = 3\).* Got 4\."):
        sim.serve(InlineGrid(cfg.clients))
    assert not (tmp_path / "run").exists()


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
    # Assert: byte-identical adapters, metrics and checkpoints; one message per client per round, each carrying
    # its own client's rank (ranks 2, 4, 8: one broadcast could not)
    assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method)
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")
    assert sorted(grid.trains()) == [(t, k, sim.ranks[k]) for t in (1, 2) for k in range(cfg.clients)]
    assert len(set(sim.ranks)) == cfg.clients


def _counting(sim, name):
    """Wrap ``sim.<name>`` to record the client of each call."""
    calls, original = [], getattr(sim, name)

    def wrapped(method, server, k, reply):
        calls.append(k)
        return original(method, server, k, reply)

    setattr(sim, name, wrapped)
    return calls


def test_each_upload_is_scored_once_per_scored_round_through_the_strategy(tmp_path):
    # Prepare: 3 rounds, scored every 2nd and the last (rounds 2 and 3)
    cfg = _cfg(methods=["fedit"], rounds=3, eval_every=2, score_uploads=True)
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    calls = _counting(sim, "score_upload")
    # Execute
    sim.serve(InlineGrid(cfg.clients))
    # Assert: clients x scored rounds, each once; the scores are in the rows of the scored rounds only
    assert sorted(calls) == sorted(list(range(cfg.clients)) * 2)
    rows = [json.loads(line) for line in _metrics(tmp_path).splitlines()]
    assert [all("upload_accuracy" in c for c in r["clients"]) for r in rows[1:]] == [False, True, True]


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
    assert reasons[1].startswith("no reply from SuperNode 101 within the round's timeout")
    assert "non-finite" in reasons[2]
    assert not any(r["dropped"] for r in rows[1]["clients"])
    assert any("client 1: update dropped (no reply from SuperNode 101" in str(w.message) for w in caught)
    tensors = load_final(tmp_path / "adapters" / "hetlora.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_node_the_superlink_reports_unavailable_is_a_lost_node(tmp_path):
    # Prepare: in round 2 the SuperLink answers client 2's message with NODE_UNAVAILABLE (its node was killed)
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="client 2: update dropped"):
        sim.serve(InlineGrid(cfg.clients, unavailable={(2, 2)}))
    # Assert: the same reason prefix as a timeout, the SuperLink's error quoted
    last = json.loads(_metrics(tmp_path).splitlines()[-1])
    reason = last["clients"][2]["reason"]
    assert reason.startswith("no reply from SuperNode 102: the SuperLink reports it lost")
    assert f"error {int(ErrorCode.NODE_UNAVAILABLE)}" in reason
    assert [r["dropped"] for r in last["clients"]] == [False, False, True]


def _bad_dtype(content):
    dtypes = json.loads(content.config_records["msg.config"]["dtypes"])
    content.config_records["msg.config"]["dtypes"] = json.dumps([[k, "complex64"] for k, _ in dtypes])


def _no_arrays(content):
    del content["msg.arrays"]


def _bad_json(content):
    content.config_records["msg.config"]["meta"] = "{not json"


def _no_dtypes_key(content):
    del content.config_records["msg.config"]["dtypes"]


def _text_metric(content):
    meta = json.loads(content.config_records["msg.config"]["meta"])
    meta["metrics"]["train_loss"] = "low"
    content.config_records["msg.config"]["meta"] = json.dumps(meta)


def _serve_scored_with_tamper(tmp_path, *, client, tamper):
    """Serve FedIT with upload scoring where ``client``'s round-2 reply is tampered with on the wire.

    Returns the last ``metrics.jsonl`` row and the client indices ``score_upload`` was called for.
    """
    cfg = _cfg(methods=["fedit"], score_uploads=True)
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    scored = _counting(sim, "score_upload")
    with pytest.warns(UpdateDroppedWarning, match=f"client {client}: update dropped"):
        sim.serve(InlineGrid(cfg.clients, tamper={(2, client): tamper}))
    return json.loads(_metrics(tmp_path).splitlines()[-1]), scored


@pytest.mark.parametrize("tamper, why", [
    (_bad_dtype, "dtype 'complex64' is not one this protocol sends"),
    (_no_arrays, "do not match the dtypes"),
    (_bad_json, "JSONDecodeError"),
    (_no_dtypes_key, "KeyError"),
    (_text_metric, "reply metric 'train_loss' must be a number; got 'low'"),
], ids=["dtype", "missing-part", "json", "missing-key", "metric"])
def test_a_malformed_reply_is_dropped_not_a_crash(tmp_path, tamper, why):
    # Prepare and execute: client 1's round-2 reply is malformed on the wire
    last, scored = _serve_scored_with_tamper(tmp_path, client=1, tamper=tamper)
    # Assert: the run finished; client 1 dropped in round 2 with the decoding error, never scored
    reason = last["clients"][1]["reason"]
    assert reason.startswith("SuperNode 101 sent a reply that cannot be decoded: ") and why in reason
    assert [r["dropped"] for r in last["clients"]] == [False, True, False]
    assert sorted(scored) == [0, 0, 1, 2, 2]


def test_a_wrong_shape_reply_is_dropped_before_it_is_scored(tmp_path):
    # Prepare: client 2's round-2 upload has one column of B too few (it decodes; the check must catch it)
    def narrow(content):
        arrays = content.array_records["msg.arrays"]
        key = sorted(k for k in arrays.keys() if k.endswith("/B"))[0]
        arrays[key] = Array(arrays[key].numpy()[:, :-1].copy())

    # Execute
    last, scored = _serve_scored_with_tamper(tmp_path, client=2, tamper=narrow)
    # Assert: dropped with the shape named; scored in round 1 only
    assert "has shape" in last["clients"][2]["reason"] and "expected" in last["clients"][2]["reason"]
    assert "upload_accuracy" not in last["clients"][2]
    assert sorted(scored) == [0, 0, 1, 1, 2]


def test_a_round_below_min_replies_keeps_the_global_state_and_says_so(tmp_path):
    # Prepare: min_replies 3, and client 0's round-2 ClientApp raises
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False, settings=FlowerSettings(min_replies=3))
    products = []
    sim.on_round_end = lambda name, r: products.append(
        {m: p.B.double() @ p.A.double() for m, p in sim.strategy.server.pairs.items()})
    # Execute
    with pytest.warns(UpdateDroppedWarning, match=r"round 2: 2 updates kept, fewer than min_replies = 3; the "
                                                  r"global state is kept"):
        sim.serve(InlineGrid(cfg.clients, fail={(2, 0)}))
    # Assert: round 2 kept round 1's adapter (B @ A of every module); the rows say who was dropped and who was
    # kept but not aggregated; round 1 (all aggregated) says nothing
    assert products and products[0]
    for m in products[0]:
        torch.testing.assert_close(products[1][m], products[0][m], rtol=0, atol=0)
    rows = [json.loads(line) for line in _metrics(tmp_path).splitlines()]
    last = rows[-1]
    assert last["clients"][0]["reason"].startswith(
        f"SuperNode 100 answered with error {int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)}: ClientApp raised: boom")
    assert [c.get("aggregated") for c in last["clients"]] == [None, False, False]
    assert last["dropped"] == 1
    assert all("aggregated" not in c for c in rows[1]["clients"])
    assert sim.strategy.counts == {"replies": 2, "dropped": 1, "aggregated": 0}


def test_a_node_whose_rank_budget_is_too_small_is_refused_at_start(tmp_path):
    cfg = _cfg(methods=["fedit"])
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"rank budget 2 is below the rank the run assigns client 2: 8"):
        sim.serve(InlineGrid(cfg.clients, ranks=[2, 4, 2]))
    assert not any(tmp_path.iterdir())


def test_fewer_nodes_than_clients_is_refused(tmp_path):
    # Prepare / Execute / Assert: a federation of 2 nodes for 3 clients says so at once (num-partitions) ...
    cfg = _cfg(methods=["fedit"])
    with pytest.raises(ValueError, match=r"reports num-partitions = 2 \(the federation's node count\), but the run "
                                         r"has clients = 3"):
        FlowerSimulation(cfg, tmp_path, progress=False).serve(InlineGrid(2))
    # ... and nodes that name no count are waited for, then refused naming what is there
    grid = InlineGrid(2, num_partitions=-1)
    sim = FlowerSimulation(cfg, tmp_path, progress=False, settings=FlowerSettings(start_timeout=0.0))
    with pytest.raises(ValueError, match=r"clients = 3, one SuperNode each, but after flower-start-timeout = 0 s "
                                         r"only 2 have one \(2 SuperNodes connected; clients without a node: \[2\]\)"):
        sim.serve(grid)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("node_config, why", [
    ({"partition-id": 7, "num-partitions": 3}, "partition-id 7 is not a client of this run"),
    ({"partition-id": 2, "num-partitions": 3, "rank": 1}, "rank budget 1 is below the rank the run assigns client 2"),
    ({"partition-id": -1}, "answered the discovery query with error"),
], ids=["partition-id", "rank", "bad-node-config"])
def test_a_node_joining_mid_run_that_cannot_serve_is_ignored(tmp_path, caplog, node_config, why):
    # Prepare: after round 1 a misconfigured node joins
    cfg = _cfg(methods=["fedit"], rounds=3)
    grid = InlineGrid(cfg.clients)
    sim = FlowerSimulation(cfg, tmp_path, progress=False)
    sim.on_round_end = lambda name, r: grid.add_node(200, node_config) if r == 1 else None
    # Execute
    with caplog.at_level(logging.WARNING, logger="lowrank_fed.llm.flower"):
        sim.serve(grid)
    # Assert: the run finished with every client; the node was asked once, refused and logged once
    rows = [json.loads(line) for line in _metrics(tmp_path).splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["dropped"] == 0 for r in rows)
    to_new_node = [kind for kind, (_, client), _, _ in grid.sent if client == 200 - 100]  # node 200
    assert to_new_node == ["query"]
    assert list(sim.strategy.refused) == [200] and why in sim.strategy.refused[200]
    assert sum(why in r.getMessage() and "ignored for the rest of the run" in r.getMessage()
               for r in caplog.records) == 1
    assert sim.strategy.nodes == {0: 100, 1: 101, 2: 102}


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
    with_state = [key for kind, key, parts, _ in grid.sent if kind == "train" and "state.config" in parts]
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


def test_the_strategys_flower_api_settles_each_round_as_the_runners_loop(tmp_path):
    """configure_train / aggregate_train (Flower's Strategy API, as a Flower ServerApp would call them) use the
    runner's round functions: each round's server state, rows and counts equal the runner's loop in process."""
    # Prepare: a method with client state and an update attacker; the strategy sees the server's federation only
    from flwr.app import ArrayRecord, ConfigRecord

    from lowrank_fed.llm.flower.strategy import LowRankStrategy
    from lowrank_fed.llm.runner.simulation import Simulation

    cfg = _cfg(methods=["fedsa"], attacks=[{"kind": "sign_flip", "clients": [1]}])
    ref = Simulation(cfg, tmp_path, progress=False)
    ref.setup()
    grid = InlineGrid(cfg.clients)
    ours, theirs = METHODS["fedsa"](), METHODS["fedsa"]()
    strategy = LowRankStrategy(cfg, ref.federation)
    strategy.discover(grid)
    strategy.begin(ours, ours.init_server(ref.init, ref.init_extras, dict(enumerate(ref.ranks)),
                                          init_seed=ref.init_seed), {})
    server = theirs.init_server(ref.init, ref.init_extras, dict(enumerate(ref.ranks)), init_seed=ref.init_seed)
    clients = {}
    for t in (1, 2):
        # Execute: one round each way
        messages = list(strategy.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
        arrays, counts = strategy.aggregate_train(t, grid.send_and_receive(messages))
        server, clients, rows, _ = ref.run_round(theirs, server, clients, t)
        # Assert
        assert strategy.rows == rows
        assert dict(counts) == {"replies": 3, "dropped": 0, "aggregated": 1}
        for m, pair in server.pairs.items():
            assert torch.equal(strategy.server.pairs[m].B, pair.B) and torch.equal(strategy.server.pairs[m].A, pair.A)
        assert sorted(arrays.keys()) == sorted(f"lora/{m}/{f}" for m in server.pairs for f in "BA")
        assert strategy.clients.keys() == clients.keys()


def test_each_node_reads_only_its_own_examples_and_the_federation_equals_the_runner(tmp_path, monkeypatch):
    """Every node's data loader is instrumented: a node reads its own rows, once, and nobody else's; no node builds a
    Simulation; the run (with a data attacker) equals the in-process runner byte for byte."""
    # Prepare
    import lowrank_fed.llm.flower.client_app as client_app_module
    from lowrank_fed.llm.federation import DataSource
    from lowrank_fed.llm.runner.simulation import Simulation

    cfg = _cfg(methods=["fedit", "fedsa"], clients=4, ranks=[2, 4, 8, 4], checkpoint=True,
               attacks=[{"kind": "label_flip", "clients": [2]}])
    run_experiment(cfg, tmp_path / "ref", progress=False)
    monkeypatch.setattr(client_app_module, "_NODE", {})  # no set-up left by an earlier test in this process
    serving, reads = [None], []  # the client whose node is running; (client, rows) of every example read by a node
    examples = DataSource.examples

    def recorded(self, rows):
        if serving[0] is not None:
            reads.append((serving[0], np.array(rows, dtype=np.int64)))
        return examples(self, rows)

    def no_simulation(self):
        if serving[0] is not None:
            raise AssertionError(f"the node of client {serving[0]} set up a whole Simulation")
        return setup(self)

    setup = Simulation.setup
    monkeypatch.setattr(DataSource, "examples", recorded)
    monkeypatch.setattr(Simulation, "setup", no_simulation)

    class NodeGrid(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for msg in messages:  # one at a time, so each read is the serving node's
                serving[0] = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                try:
                    out += super().send_and_receive([msg], timeout=timeout)
                finally:
                    serving[0] = None
            return out

    # Execute
    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False)
    sim.serve(NodeGrid(cfg.clients))
    # Assert: each node read exactly its own rows, once (its context is kept across rounds and methods)
    fed = sim.federation
    assert sorted(k for k, _ in reads) == list(range(cfg.clients))
    for k, rows in reads:
        np.testing.assert_array_equal(rows, fed.client_rows(k))
    assert sim._contexts is None  # the server never built a client
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    for method in cfg.methods:
        assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method)
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")


# ----------------------------------------------------------------------------- Flower's Simulation Runtime


@pytest.mark.slow
def test_flower_simulation_equals_the_runner(tmp_path):
    """Every method, 2 rounds, 3 clients (ranks 2, 4, 8), a NaN reply (HetLoRA): Ray-run Flower vs the runner, bytewise."""
    # Prepare
    from lowrank_fed.cli import main as cli_main

    settings = tiny_settings(rounds=2, methods=ALL_METHODS, checkpoint=True,
                             faults=[{"round": 2, "client": 1, "kind": "nan", "method": "hetlora"}])
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(settings))  # tomli-w comes with flwr
    run_experiment(RunConfig.from_dict(settings), tmp_path / "ref", progress=False)
    # Execute: `lowrank-fed run --engine flower`
    status = cli_main(["run", str(config), "--engine", "flower", "--out", str(tmp_path / "fl"), "--no-progress"])
    # Assert
    assert status == 0
    assert json.loads((tmp_path / "fl" / "config.json").read_text()) == json.loads(
        json.dumps(RunConfig.from_dict(settings).to_dict()))  # the TOML file said what the settings say
    for method in ALL_METHODS:
        assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method), method
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")
    rows = [json.loads(line) for line in _metrics(tmp_path / "fl").splitlines()]
    assert all(r["dropped"] == (1 if (r["round"], r["method"]) == (2, "hetlora") else 0) for r in rows)
    timings = [json.loads(line) for line in (tmp_path / "fl" / "timings.jsonl").read_text().splitlines()]
    assert all(math.isfinite(t["flower_round_seconds"]) for t in timings if t["round"] > 0)


def test_flower_config_prints_the_run_config_flwr_reads_back(tmp_path, capsys):
    # Prepare
    from lowrank_fed.cli import main
    from lowrank_fed.llm.config import load_config
    from lowrank_fed.llm.flower.engine import split_run_config

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_smoke.toml"
    # Execute
    status = main(["flower", "config", str(config), "--set", "rounds=2", "--out", str(tmp_path / "o"),
                   "--min-replies", "2"])
    text = capsys.readouterr().out
    # Assert: the TOML Flower reads (--run-config FILE) gives back the same config and settings
    settings, cfg = split_run_config(tomllib.loads(text))
    assert status == 0 and "flwr run . --stream --run-config" in text
    assert cfg == RunConfig.from_dict({**load_config(config), "rounds": 2})
    assert settings.out == str(tmp_path / "o") and settings.min_replies == 2
    assert main(["flower", "config", str(config), "--set", "rounds=0"]) == 2
    assert "Config key 'rounds'" in capsys.readouterr().err
