"""The round loop over a transport (``runner/rounds.py``): a transport is a dict-in, dict-out function.

The property: a run's outputs are a function of its config, not of what carries the messages; a toy transport
(a plain function in this file that runs each client in its own order) drives the runner to the bytes of the
in-process runner, and a client the transport reports as lost is a dropped update, counted and never aggregated.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.client import run_client  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.runner.rounds import ClientResult, UpdateDroppedWarning  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, run_experiment  # noqa: E402
from tests.llm.helpers import sha_tree, tiny_settings  # noqa: E402


def _toy_transport(sim, lost=()):
    """A transport as a plain function: each download through ``run_client`` on the client's own context, the last
    client first; ``(round, client)`` pairs in ``lost`` send no reply."""
    seen = []

    def transport(downloads, call):
        seen.append((call.method.name, call.round, sorted(downloads)))
        out = {}
        for k in sorted(downloads, reverse=True):
            if (call.round, k) in lost:
                out[k] = f"node of client {k} lost"
                continue
            reply, state, _ = run_client(call.method, downloads[k], call.clients.get(k), sim.contexts[k])
            out[k] = ClientResult(reply, state)
        return out

    return transport, seen


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::lowrank_fed.llm.runner.rounds.UpdateDroppedWarning")  # the fault's
def test_a_toy_transport_drives_the_loop_to_the_in_process_runners_bytes(tmp_path):
    # Prepare: a method that keeps client state, an update attacker, a fault, 2 of 3 clients a round
    cfg = RunConfig.from_dict(tiny_settings(methods=["fedsa"], rounds=2, clients_per_round=2,
                                            checkpoint=True, attacks=[{"kind": "sign_flip", "clients": [1]}],
                                            faults=[{"round": 1, "client": k, "kind": "nan"} for k in range(3)]))
    run_experiment(cfg, tmp_path / "ref", progress=False)
    sim = Simulation(cfg, tmp_path / "toy", progress=False)
    sim.transport, seen = _toy_transport(sim)
    # Execute
    sim.run()
    # Assert: every round went through the toy transport, and every output but the timings is the runner's
    assert [(m, t) for m, t, _ in seen] == [(m, t) for m in cfg.methods for t in (1, 2)]
    assert all(len(clients) == 2 for _, _, clients in seen)
    assert _rows(tmp_path / "toy") == _rows(tmp_path / "ref")
    timed = ("timings.jsonl", "summary.json", "summary.md")
    assert sha_tree(tmp_path / "toy", exclude=timed) == sha_tree(tmp_path / "ref", exclude=timed)


def test_a_client_the_transport_reports_lost_is_a_dropped_update(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict(tiny_settings(methods=["fedit"], rounds=2))
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.transport, _ = _toy_transport(sim, lost={(2, 1)})
    # Execute
    with pytest.warns(UpdateDroppedWarning, match=r"round 2, client 1: update dropped \(node of client 1 lost\)"):
        sim.run()
    # Assert: counted in the round's row, its client row says why, and the others were kept
    last = _rows(tmp_path)[-1]
    assert last["round"] == 2 and last["dropped"] == 1
    by_client = {r["client"]: r for r in last["clients"]}
    assert by_client[1]["dropped"] and by_client[1]["reason"] == "node of client 1 lost"
    assert by_client[1]["bytes_up"] == 0 and not by_client[0]["dropped"] and not by_client[2]["dropped"]
