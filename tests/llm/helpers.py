"""Helpers shared by the LLM method tests: tiny simulations, recorded rounds, kill-and-resume runs, folder hashes.

Import after the test module's ``pytest.importorskip("torch")`` / ``("peft")``: ``from tests.llm.helpers import ...``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank_fed.llm.runner.transports as simulation  # noqa: E402
from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.client import run_client  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods import ClientState, ServerState  # noqa: E402
from lowrank_fed.llm.protocol import Message  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, run_experiment  # noqa: E402

SHAPES = {"m0": (6, 5), "m1": (4, 7)}


def tiny_settings(**overrides):
    """A one-round, three-client (ranks 2, 4, 8) tiny-bert run on synthetic data, no checkpoints."""
    settings = dict(name="t", model="tiny-bert", dataset="synthetic", methods=["fedit"], clients=3, ranks=[2, 4, 8],
                    rounds=1, local_steps=2, batch_size=8, lr=0.01, eval_size=80, max_length=32, checkpoint=False,
                    eval_every=1)
    settings.update(overrides)
    return settings


def make_sim(tmp_path, settings):
    """A set-up :class:`Simulation` of ``settings`` (a RunConfig dict) writing under ``tmp_path``."""
    sim = Simulation(RunConfig.from_dict(settings), tmp_path, progress=False)
    sim.setup()
    return sim


def start(sim, method):
    """``method``'s server for ``sim``: the shared init, the clients' ranks, the init seed."""
    return method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)


def pairs(rank, seed, shapes=SHAPES, dtype=torch.float32):
    """A random rank-``rank`` adapter of ``shapes``, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return {m: FactorPair(torch.randn(d_out, rank, generator=gen, dtype=dtype),
                          torch.randn(rank, d_in, generator=gen, dtype=dtype))
            for m, (d_out, d_in) in shapes.items()}


def head(seed):
    """A random classifier head (3 classes, width 5), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return {"classifier.weight": torch.randn(3, 5, generator=gen),
            "classifier.bias": torch.randn(3, generator=gen)}


def nbytes(arrays):
    """Bytes on the wire, recomputed by hand: sum numel * element size."""
    return sum(t.numel() * t.element_size() for t in arrays.values())


@dataclass
class Call:
    """One client's round as run_client saw it, with the adapter it trained (read right after training).

    ``probe`` is the adapter LoRA-A2's probe produced, when :func:`run_rounds` records it (else ``None``).
    """

    message: Message
    state: ClientState | None
    reply: Message
    new_state: ClientState
    trained: dict
    trained_extras: dict
    probe: dict | None = None


@dataclass
class Round:
    before: ServerState
    calls: dict
    rows: list
    after: ServerState
    clients: dict


def run_rounds(sim, method, rounds, monkeypatch, *, record_probe=False):
    """Run ``rounds`` rounds with ``sim.run_round``, recording every run_client call.

    With ``record_probe`` (LoRA-A2) the adapter each client's probe hands to ``method.client_after_probe`` is
    recorded too, as ``Call.probe``; a client whose probe did not run fails the round with a ``KeyError``.
    """
    calls: dict[int, Call] = {}
    probes: dict[int, dict] = {}

    def recording(method_, message, state, context):
        reply, new_state, stats = run_client(method_, message, state, context)
        trained, trained_extras = context.workspace.extract()
        k = context.client_id
        probe = probes.pop(k) if record_probe else None
        calls[k] = Call(message, state, reply, new_state, trained, trained_extras, probe)
        return reply, new_state, stats

    if record_probe:
        after_probe = method.client_after_probe

        def recording_probe(plan, pairs_, extras, state, message):
            probes[int(message.config["client"])] = pairs_
            return after_probe(plan, pairs_, extras, state, message)

        monkeypatch.setattr(method, "client_after_probe", recording_probe)
    monkeypatch.setattr(simulation, "run_client", recording)
    server, clients, log = start(sim, method), {}, []
    for t in range(1, rounds + 1):
        calls.clear()
        before = server
        server, clients, rows, _ = sim.run_round(method, server, clients, t)
        log.append(Round(before, dict(calls), rows, server, dict(clients)))
    return log


class Interrupt(BaseException):
    """A kill: not an Exception, so the runner does not turn it into a dropped client update."""


def sha_tree(folder, *, exclude=()):
    """sha256 of every file under ``folder`` (relative path -> hex), except the names in ``exclude``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def kill_after_round(cfg, out, round_=1, *, method=None):
    """Run ``cfg`` into ``out`` and kill it (:class:`Interrupt`) at the end of round ``round_`` (of ``method``)."""

    def stop(method_, round_done):
        if round_done == round_ and (method is None or method_ == method):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(cfg, out, progress=False, on_round_end=stop)


def kill_and_resume(cfg, out, round_=1):
    """Run ``cfg`` into ``out``, killed at the end of round ``round_``, then resumed to the end."""
    kill_after_round(cfg, out, round_)
    run_experiment(cfg, out, resume=True, progress=False)


def flower_up(cfg, out, nodes: int):
    """``lowrank-fed flower up`` of ``cfg`` into ``out`` on ``nodes`` real SuperNodes (a SuperLink, a 400 s limit);
    fails with the tail of Flower's log unless the run exits 0."""
    from lowrank_fed.llm.flower import deploy
    from lowrank_fed.llm.flower.engine import FlowerSettings

    sim = Simulation(cfg, out, progress=False)
    sim.setup()
    status = deploy.up(cfg, out, nodes, sim.ranks, FlowerSettings(round_timeout=60.0, start_timeout=120.0),
                       timeout=400.0)
    assert status == 0, (out / ".flower" / "flwr-run.log").read_text()[-3000:]
