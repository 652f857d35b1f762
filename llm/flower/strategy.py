r"""The Flower ``Strategy`` of every lowrank-fed method: per-node downloads, the runner's checks, the method's rule.

A round ``t`` on Flower's Message API does what :meth:`Simulation.run_round` does in one process:

1. :meth:`LowRankStrategy.configure_train`: for each client ``k`` the runner samples
   (:meth:`Simulation.sampled`), the method's own download ``method.configure(server, k)`` (its rank ``r_k``:
   heterogeneous ranks need one message per node, never one broadcast) goes to the SuperNode whose
   ``partition-id`` is ``k`` (found by a ``query`` message, :meth:`LowRankStrategy.discover`);
2. the ``ClientApp`` (:mod:`.client_app`) runs :func:`~lowrank_fed.llm.client.run_client`;
3. :meth:`LowRankStrategy.aggregate_train`: each reply goes through :meth:`Simulation.accept_reply` (the
   runner's attack/fault injection and :meth:`Method.check_reply`: NaN/Inf, shapes, ranks, keys), so a bad reply
   is dropped and counted exactly as in the runner; a node that did not answer within the round's timeout, or
   answered with an error, is a dropped update too (``reason`` names the node); then
   :meth:`Simulation.aggregate_round` applies the method's server rule to the replies kept. With fewer than
   ``min_replies`` replies kept, the round keeps the global state (as the runner does with none).

No aggregation arithmetic lives here: the rule is the method's, the checks are the runner's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..methods import ClientState, Method, ServerState
from ..protocol import Message as LFMessage
from ..protocol import encode_pairs
from .records import from_records, has_part, to_records

__all__ = ["LowRankStrategy"]

log = logging.getLogger("lowrank_fed.llm.flower")


class LowRankStrategy(Strategy):
    r"""Per-node messages out, the runner's reply checks and the method's server rule in.

    Parameters
    ----------
    sim : Simulation
        The server's set-up run (:class:`~lowrank_fed.llm.runner.simulation.Simulation`): sampling, the reply
        checks, evaluation, checkpoints. Its ``contexts`` are not used: the clients train on their nodes.
    min_replies : int
        Replies a round needs (after the checks) to be aggregated; below it the global state is kept.

    Attributes
    ----------
    nodes : dict client id -> node id
        The SuperNode serving each client (from ``query`` replies; a node that rejoins gets a new id).
    method, server, clients
        The method being run, its server state and the server's copy of each client's state; set by
        :meth:`begin` and updated by each :meth:`aggregate_train`.
    rows, times : list of dict, dict
        The last round's per-client rows (as the runner writes them) and timings.
    """

    def __init__(self, sim, *, min_replies: int = 1):
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"The 'min_replies' parameter must be a positive int. Got {min_replies!r}.")
        self.sim = sim
        self.min_replies = min_replies
        self.nodes: dict[int, int] = {}
        self._seen: set[int] = set()  # node ids already queried
        self.method: Method | None = None
        self.server: ServerState | None = None
        self.clients: dict[int, ClientState] = {}
        self._state_round: dict[int, int] = {}  # client -> round of the server's copy of its state
        self._held: dict[int, tuple[int, int]] = {}  # client -> (node, state round) the node is known to hold
        self._sent: dict[int, tuple[int, int, dict, LFMessage]] = {}  # flwr message object id -> (client, ...)
        self._pending: list[Message] = []
        self.rows: list[dict] = []
        self.times: dict = {}

    # ------------------------------------------------------------------ set-up
    def summary(self) -> None:
        log.info("LowRankStrategy: method %s, %d clients, min_replies %d", self.method and self.method.name,
                 self.sim.cfg.clients, self.min_replies)

    def begin(self, method: Method, server: ServerState, clients: dict[int, ClientState]) -> None:
        """Start (or resume) ``method`` from ``server`` and the server's copy of the clients' states."""
        self.method, self.server, self.clients = method, server, clients
        self._state_round = {k: server.round for k in clients}  # a resumed state: the node must be sent it
        self._held = {}

    def discover(self, grid: Grid, *, timeout: float = 60.0) -> None:
        r"""Ask every node not seen before for its ``partition-id`` and rank budget; map clients to nodes.

        Raises
        ------
        ValueError
            A node's rank budget is below the rank the run assigns its client, or its ``partition-id`` is not a
            client of the run.
        """
        new = [n for n in grid.get_node_ids() if n not in self._seen]
        if not new:
            return
        queries = [Message(RecordDict({"query": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                           message_type="query") for n in new]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not answer the discovery query (%s)", node, reply.error.reason)
                continue
            self._seen.add(node)
            info = reply.content.config_records["node"]
            k, budget = int(info["partition-id"]), int(info["rank"])
            if not 0 <= k < self.sim.cfg.clients:
                raise ValueError(f"SuperNode {node}: partition-id {k} is not a client of this run; expected "
                                 f"0 <= partition-id < clients = {self.sim.cfg.clients}.")
            rank = self.sim.ranks[k]
            if budget != -1 and budget < rank:
                raise ValueError(f"SuperNode {node} (client {k}): rank budget {budget} is below the rank the run "
                                 f"assigns client {k}: {rank}. Give the node rank >= {rank} or change 'ranks'.")
            if k in self.nodes and self.nodes[k] != node:
                log.warning("client %d moves from node %s to node %s (a rejoined node)", k, self.nodes[k], node)
                self._held.pop(k, None)
            self.nodes[k] = node

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r"""One message per sampled client: its own download ``method.configure(server, k)`` to its node.

        ``arrays`` and ``config`` (Flower's single global model) are not used: each client's download is the
        method's. A client with no node gets no message; :meth:`aggregate_train` counts it as dropped.
        """
        method, server, cfg = self.method, self.server, self.sim.cfg
        self.discover(grid)
        self._sent, self._pending, self.rows, self._t0 = {}, [], [], time.perf_counter()
        run = {"config": json.dumps(cfg.to_dict(), sort_keys=True), "method": method.name,
               "options": json.dumps(cfg.method_options.get(method.name, {}), sort_keys=True)}
        out = []
        for k in self.sim.sampled(server_round):
            download = method.configure(server, k)
            row = {"client": k, "rank": int(download.config["rank"]), "bytes_down": download.nbytes, "dropped": False}
            node = self.nodes.get(k)
            self.rows.append(row)
            if node is None:
                self._sent[-k - 1] = (k, -1, row, download)  # no node: dropped in aggregate_train
                continue
            state_round = self._state_round.get(k, 0)
            content = to_records(download, "msg")
            content["run"] = ConfigRecord({**run, "state-round": state_round})
            if k in self.clients and self._held.get(k) != (node, state_round):
                state = self.clients[k]  # the node may not hold it (resume, rejoin): send the server's copy
                to_records(LFMessage(state.arrays, state.info), "state", content)
            msg = Message(content, dst_node_id=node, message_type="train", group_id=str(server_round))
            self._sent[id(msg)] = (k, node, row, download)
            out.append(msg)
        self._pending = out
        return out

    def _by_message_id(self) -> dict[str, int]:
        return {m.metadata.message_id: id(m) for m in self._pending}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r"""Check each reply as the runner does, then the method's server rule on those kept.

        Returns the global adapter (``ArrayRecord`` of folded ``lora/<module>/B|A``) and the round's counts
        (``replies``, ``dropped``); the new server state is :attr:`server`.
        """
        method, server, sim = self.method, self.server, self.sim
        wall = time.perf_counter() - self._t0
        ids, got = self._by_message_id(), {}
        for reply in replies:
            key = ids.get(reply.metadata.reply_to_message_id)
            if key is not None:
                got[key] = reply
        kept: dict[int, LFMessage] = {}
        train_s = probe_s = server_s = 0.0
        for key, (k, node, row, download) in self._sent.items():
            t0 = time.perf_counter()
            reply, error = None, None
            if node == -1:
                error = "no SuperNode serves this client (none answered the discovery query with its partition-id)"
            elif key not in got:
                error = f"no reply from SuperNode {node} within the round's timeout (node lost or too slow)"
            elif got[key].has_error():
                err = got[key].error
                error = f"SuperNode {node} answered with error {err.code}: {err.reason}"
            else:
                content = got[key].content
                reply = from_records(content, "msg")
                if has_part(content, "state"):
                    state = from_records(content, "state")
                    self.clients[k] = ClientState(state.arrays, state.config)
                    self._state_round[k] = server_round
                    self._held[k] = (node, server_round)
                if sim.cfg.score_uploads and sim._evaluated(server_round):  # as the runner: before the checks
                    row.update(sim.score_upload(method, server, k, reply))
                train_s += reply.metrics.get("train_seconds", 0.0)
                probe_s += reply.metrics.get("probe_seconds", 0.0)
            if reply is None:
                self._held.pop(k, None)  # what the node holds is unknown now
                log.warning("%s, round %d: client %d (SuperNode %s) is missing: %s", method.title, server_round, k,
                            node if node != -1 else "none", error)
            accepted = sim.accept_reply(method, server, server_round, k, reply, error, row)
            if accepted is not None:
                kept[k] = accepted
            server_s += time.perf_counter() - t0 - row.pop("_upload_eval_seconds", 0.0)
        if 0 < len(kept) < self.min_replies:
            log.warning("%s, round %d: %d replies kept, fewer than min_replies = %d; the global state is kept",
                        method.title, server_round, len(kept), self.min_replies)
            kept = {}
        t0 = time.perf_counter()
        self.server = sim.aggregate_round(method, server, kept, server_round)
        aggregate_s = time.perf_counter() - t0
        self.times = {"server_seconds": server_s + aggregate_s, "aggregate_seconds": aggregate_s,
                      "client_overhead_seconds": max(wall - train_s, 0.0), "train_seconds": train_s,
                      "probe_seconds": probe_s, "flower_round_seconds": wall}
        dropped = sum(r["dropped"] for r in self.rows)
        arrays = ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in
                              encode_pairs(self.server.pairs).items()})
        return arrays, MetricRecord({"replies": len(self.rows) - dropped, "dropped": dropped})

    # ------------------------------------------------------------------ evaluation: on the server (the runner's)
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server scores the models itself (:meth:`Simulation.evaluate`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
