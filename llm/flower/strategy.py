r"""The Flower ``Strategy`` of every lowrank-fed method: per-node downloads, the runner's checks, the method's rule.

A round ``t`` on Flower's Message API is the runner's round (:mod:`~lowrank_fed.llm.runner.rounds`), with Flower
carrying the messages:

1. :meth:`LowRankStrategy.configure_train`: for each client ``k`` the round samples, the method's own download
   ``method.configure(server, k)`` (:func:`~lowrank_fed.llm.runner.rounds.configure_round`; its rank ``r_k``:
   heterogeneous ranks need one message per node, never one broadcast) goes to the SuperNode whose
   ``partition-id`` is ``k`` (found by a ``query`` message, :meth:`LowRankStrategy.discover`);
2. the ``ClientApp`` (:mod:`.client_app`) runs :func:`~lowrank_fed.llm.client.run_client`;
3. :meth:`LowRankStrategy.aggregate_train`: the replies decoded (:meth:`LowRankStrategy.collect`), then
   :func:`~lowrank_fed.llm.runner.rounds.settle_round`: each reply through the runner's
   :func:`~lowrank_fed.llm.runner.rounds.accept_reply` (:meth:`Method.check_reply`: NaN/Inf, shapes, ranks, keys;
   the upload scoring of ``score_uploads``; attack/fault injection), so a bad reply is dropped and counted exactly
   as in the runner. A reply that cannot be decoded (a missing record, bad JSON, an unknown dtype), a node that
   did not answer within the round's timeout or that the SuperLink reports lost (``NODE_UNAVAILABLE``,
   ``MESSAGE_UNAVAILABLE``: both give the reason ``"no reply from SuperNode <id> ..."``), and a node whose
   ClientApp raised are dropped updates too (``reason`` names the node); then
   :func:`~lowrank_fed.llm.runner.rounds.aggregate_round` applies the method's server rule to the replies kept.
   With fewer than ``min_replies`` replies kept, the round keeps the global state and the kept clients' rows say
   ``"aggregated": false``.

The runner's loop drives the same :meth:`~LowRankStrategy.messages` and :meth:`~LowRankStrategy.collect` through
:class:`~.engine.FlowerTransport` (``lowrank-fed run --engine flower``, the ServerApp), and settles the round
itself with the same function.

A node that joins mid-run and cannot serve the run (its ``partition-id`` is not a client, its node count is not
``clients``, its rank budget is too small, its answer is malformed) is logged and ignored from then on; during
the start-up wait (``strict``) it stops the run before anything is written.

No aggregation arithmetic lives here: the rule is the method's, the checks are the runner's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..methods import ClientState, Method, ServerState
from ..protocol import Message as LFMessage
from ..protocol import encode_pairs
from ..runner.rounds import ClientResult, RoundResult, configure_round, settle_round
from .records import from_records, has_part, to_records

__all__ = ["LowRankStrategy", "decode_reply", "LOST_NODE"]

log = logging.getLogger("lowrank_fed.llm.flower")

#: Error codes of a reply the SuperLink writes itself because the node or the message is gone: a lost node.
LOST_NODE = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
#: Metrics of a reply that the runner reads as numbers (rows, timings).
_NUMERIC_METRICS = ("train_loss", "train_accuracy", "params_up", "steps", "train_seconds", "probe_seconds")


def decode_reply(content: RecordDict) -> tuple[LFMessage, ClientState | None]:
    r"""A train reply's upload (records ``"msg"``) and the client's new state (``"state"``; None if not sent).

    Raises
    ------
    ValueError
        The reply cannot be decoded: a missing record, bad JSON, a dtype the protocol does not send, tensors that
        do not match their listed dtypes, or a metric the runner reads (``train_loss``, ``steps``, ...) that is
        not a number. The message names what was wrong.
    """
    try:
        reply = from_records(content, "msg")
        state = from_records(content, "state") if has_part(content, "state") else None
    except Exception as err:  # anything off the wire: the node's reply is malformed, the server is fine
        raise ValueError(str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}") from err
    for key in _NUMERIC_METRICS:
        value = reply.metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"reply metric {key!r} must be a number; got {value!r}")
    return reply, None if state is None else ClientState(state.arrays, state.config)


def _int(info, key: str, default=None) -> int:
    value = info.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}' must be an int; got {value!r}")
    return value


class LowRankStrategy(Strategy):
    r"""Per-node messages out, the runner's reply checks and the method's server rule in.

    Parameters
    ----------
    cfg : RunConfig
    federation : Federation
        The server's view of the federation (:func:`~lowrank_fed.llm.federation.build_federation`): each client's
        rank, the attackers (reporting and injection), :class:`~lowrank_fed.llm.federation.Shared`. No client's
        examples: each node builds its own.
    min_replies : int
        Replies a round needs (after the checks) to be aggregated; below it the global state is kept.
    query_timeout : float
        Seconds a discovery query waits for new nodes' answers (:meth:`discover`; the engine passes the round
        timeout).
    score_upload : callable(method, server, k, reply) -> dict, optional
        Scores an upload (option ``score_uploads``; the runner's ``Simulation.score_upload``).

    Attributes
    ----------
    nodes : dict client id -> node id
        The SuperNode serving each client (from ``query`` replies; a node that rejoins gets a new id).
    refused : dict node id -> str
        Nodes that cannot serve the run, with the reason; never queried again.
    method, server, clients
        The method being run, its server state and the server's copy of each client's state; set by
        :meth:`begin` and updated by each :meth:`aggregate_train`.
    rows, times : list of dict, dict
        The last round's per-client rows (as the runner writes them) and timings.
    counts : dict
        The last round's ``replies`` (kept after the checks), ``dropped`` and ``aggregated`` (1, or 0: fewer than
        ``min_replies`` kept, the global state kept), as :meth:`aggregate_train` returns them.
    """

    def __init__(self, cfg, federation, *, min_replies: int = 1, query_timeout: float = 60.0,
                 score_upload=None):
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"The 'min_replies' parameter must be a positive int. Got {min_replies!r}.")
        if not query_timeout > 0:
            raise ValueError(f"The 'query_timeout' parameter must be positive. Got {query_timeout!r}.")
        self.cfg, self.federation, self.score_upload = cfg, federation, score_upload
        self.min_replies = min_replies
        self.query_timeout = float(query_timeout)
        self.nodes: dict[int, int] = {}
        self.refused: dict[int, str] = {}
        self._seen: set[int] = set()  # node ids that answered the query (or are gone): never queried again
        self.method: Method | None = None
        self.server: ServerState | None = None
        self.clients: dict[int, ClientState] = {}
        self._state_round: dict[int, int] = {}  # client -> round of the server's copy of its state
        self._held: dict[int, tuple[int, int]] = {}  # client -> (node, state round) the node is known to hold
        self._sent: dict[int, tuple[int, int]] = {}  # flwr message object id -> (client, node)
        self._rows: dict[int, dict] = {}
        self._pending: list[Message] = []
        self.rows: list[dict] = []
        self.times: dict = {}
        self.counts: dict = {}

    # ------------------------------------------------------------------ set-up
    def summary(self) -> None:
        log.info("LowRankStrategy: method %s, %d clients, min_replies %d", self.method and self.method.name,
                 self.cfg.clients, self.min_replies)

    def begin(self, method: Method, server: ServerState, clients: dict[int, ClientState]) -> None:
        """Start (or resume) ``method`` from ``server`` and the server's copy of the clients' states."""
        self.method, self.server, self.clients = method, server, clients
        self._state_round = {k: server.round for k in clients}  # a resumed state: the node must be sent it
        self._held = {}

    def discover(self, grid: Grid, *, timeout: float | None = None, strict: bool = False) -> None:
        r"""Ask every node not seen before for its ``partition-id``, node count and rank budget; map clients to nodes.

        A node that does not answer within ``timeout`` seconds (default :attr:`query_timeout`) is asked again next
        time. A node that cannot serve the run is refused: with ``strict`` (the start-up wait) a ``ValueError``;
        otherwise (a node joining mid-run) it is logged, remembered in :attr:`refused` and never asked again.

        Raises
        ------
        ValueError
            ``strict`` only: a node's ``partition-id`` is not a client of the run, its ``num-partitions`` (the
            federation's node count) is not ``clients``, its rank budget is below the rank the run assigns its
            client, its answer cannot be read, or its ClientApp raised on the query.
        """
        new = [n for n in grid.get_node_ids() if n not in self._seen and n not in self.refused]
        if not new:
            return
        queries = [Message(RecordDict({"query": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                           message_type="query") for n in new]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout if timeout is None else timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                err = reply.error
                if err.code in LOST_NODE:  # gone; a node that comes back gets a new id
                    log.warning("SuperNode %s is lost (error %s: %s)", node, err.code, err.reason)
                    self._seen.add(node)
                else:
                    self._refuse(node, f"SuperNode {node} answered the discovery query with error {err.code}: "
                                       f"{err.reason}", strict)
                continue
            reason = self._identify(node, reply)
            if reason is not None:
                self._refuse(node, reason, strict)

    def _identify(self, node: int, reply: Message) -> str | None:
        """Map the client of ``node``'s query answer to it; the reason it cannot serve the run, or None."""
        clients = self.cfg.clients
        try:
            info = reply.content.config_records["node"]
            k, budget, parts = _int(info, "partition-id"), _int(info, "rank"), _int(info, "num-partitions", -1)
        except (KeyError, ValueError, TypeError) as err:
            return f"SuperNode {node} sent a discovery answer that cannot be read ({type(err).__name__}: {err})"
        if parts != -1 and parts != clients:
            return (f"SuperNode {node} (partition-id {k}) reports num-partitions = {parts} (the federation's node "
                    f"count), but the run has clients = {clients}; expected one SuperNode per client "
                    f"(num-supernodes = {clients}).")
        if not 0 <= k < clients:
            return (f"SuperNode {node}: partition-id {k} is not a client of this run; expected 0 <= partition-id "
                    f"< clients = {clients}.")
        rank = self.federation.ranks[k]
        if self.cfg.sites and budget != -1 and budget != rank:  # [[clients]]: the node's rank is its table's
            return (f"SuperNode {node} (client {k}): --node-config rank={budget} contradicts the run config's "
                    f"clients[{k}].rank = {rank}. Give the node rank={rank} or leave rank out.")
        if budget != -1 and budget < rank:
            return (f"SuperNode {node} (client {k}): rank budget {budget} is below the rank the run assigns client "
                    f"{k}: {rank}. Give the node rank >= {rank} or change 'ranks'.")
        self._seen.add(node)
        if k in self.nodes and self.nodes[k] != node:
            log.warning("client %d moves from node %s to node %s (a rejoined node)", k, self.nodes[k], node)
            self._held.pop(k, None)
        self.nodes[k] = node
        return None

    def _refuse(self, node: int, reason: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"{reason} Nothing was written.")
        self.refused[node] = reason
        log.warning("%s; the node is ignored for the rest of the run", reason.rstrip("."))

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r"""One message per sampled client: its own download ``method.configure(server, k)`` to its node.

        The downloads and rows are :func:`~lowrank_fed.llm.runner.rounds.configure_round`'s, the runner's.
        ``arrays`` and ``config`` (Flower's single global model) are not used: each client's download is the
        method's. A client with no node gets no message; :meth:`aggregate_train` counts it as dropped.
        """
        downloads, self._rows = configure_round(self.method, self.server, self.cfg, server_round)
        self._t0 = time.perf_counter()
        return self.messages(downloads, server_round, grid)

    def messages(self, downloads: dict[int, LFMessage], server_round: int, grid: Grid) -> list[Message]:
        r"""The Flower messages carrying ``downloads`` (``{client: download}``) to the clients' nodes.

        Nodes that joined since the last round are discovered first. A download carries the run (config, method,
        options, :class:`~lowrank_fed.llm.federation.Shared`: what no node can compute from its own examples) and,
        where the node may not hold it (resume, rejoin), the server's copy of the client's state.
        """
        cfg = self.cfg
        self.discover(grid)  # nodes that joined since the last round
        self._sent, self._pending = {}, []
        run = {"config": json.dumps(cfg.to_dict(), sort_keys=True), "method": self.method.name,
               "options": json.dumps(cfg.method_options.get(self.method.name, {}), sort_keys=True),
               "shared": self.federation.shared.to_json()}  # what no node can compute from its own examples
        out = []
        for k, download in downloads.items():
            node = self.nodes.get(k)
            if node is None:
                self._sent[-k - 1] = (k, -1)  # no node: dropped in collect
                continue
            state_round = self._state_round.get(k, 0)
            content = to_records(download, "msg")
            content["run"] = ConfigRecord({**run, "state-round": state_round})
            if k in self.clients and self._held.get(k) != (node, state_round):
                state = self.clients[k]  # the node may not hold it (resume, rejoin): send the server's copy
                to_records(LFMessage(state.arrays, state.info), "state", content)
            msg = Message(content, dst_node_id=node, message_type="train", group_id=str(server_round))
            self._sent[id(msg)] = (k, node)
            out.append(msg)
        self._pending = out
        return out

    def collect(self, server_round: int, replies: Iterable[Message]) -> dict[int, ClientResult | str]:
        r"""The replies to :meth:`messages`, decoded: ``{client: ClientResult or why it sent none}``, in the order
        of the messages.

        A reply that cannot be decoded (a missing record, bad JSON, an unknown dtype), a node that did not answer
        within the round's timeout or that the SuperLink reports lost (``NODE_UNAVAILABLE``,
        ``MESSAGE_UNAVAILABLE``: ``"no reply from SuperNode <id> ..."``), a node whose ClientApp raised and a client
        with no node are strings: dropped updates, the reason naming the node. The client state a node sends back
        is what the node holds from then on.
        """
        ids = {m.metadata.message_id: id(m) for m in self._pending}
        got = {}
        for reply in replies:
            key = ids.get(reply.metadata.reply_to_message_id)
            if key is not None:
                got[key] = reply
        out: dict[int, ClientResult | str] = {}
        for key, (k, node) in self._sent.items():
            if node == -1:
                error = "no SuperNode serves this client (none answered the discovery query with its partition-id)"
            elif key not in got:
                error = f"no reply from SuperNode {node} within the round's timeout (node lost or too slow)"
            elif got[key].has_error():
                err = got[key].error
                error = (f"no reply from SuperNode {node}: the SuperLink reports it lost (error {err.code}: "
                         f"{err.reason})" if err.code in LOST_NODE else
                         f"SuperNode {node} answered with error {err.code}: {err.reason}")
            else:
                try:
                    reply, state = decode_reply(got[key].content)
                except ValueError as err:
                    error = f"SuperNode {node} sent a reply that cannot be decoded: {err}"
                else:
                    if state is not None:
                        self._state_round[k] = server_round
                        self._held[k] = (node, server_round)
                    out[k] = ClientResult(reply, state, None)
                    continue
            self._held.pop(k, None)  # what the node holds is unknown now
            log.warning("%s, round %d: client %d (SuperNode %s) is missing: %s", self.method.title, server_round, k,
                        node if node != -1 else "none", error)
            out[k] = error
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r"""Check each reply as the runner does, then the method's server rule on those kept.

        :meth:`collect`, then :func:`~lowrank_fed.llm.runner.rounds.settle_round` (the runner's checks and
        :func:`~lowrank_fed.llm.runner.rounds.aggregate_round`). Returns the global adapter (``ArrayRecord`` of
        folded ``lora/<module>/B|A``) and the round's counts: ``replies`` (kept after the checks), ``dropped`` and
        ``aggregated`` (1, or 0 when fewer than ``min_replies`` were kept and the global state was kept); the new
        server state is :attr:`server`.
        """
        wall = time.perf_counter() - self._t0
        results = self.collect(server_round, replies)
        result = settle_round(self.method, self.server, server_round, self._rows, results, self.clients,
                              cfg=self.cfg, attackers=self.federation.attackers, ranks=self.federation.ranks,
                              score_upload=self.score_upload, min_replies=self.min_replies)
        result.times["client_overhead_seconds"] = max(wall - result.times["train_seconds"], 0.0)
        result.times["flower_round_seconds"] = wall
        self.settled(result)
        arrays = ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in
                              encode_pairs(self.server.pairs).items()})
        return arrays, MetricRecord(self.counts)

    def settled(self, result: RoundResult) -> None:
        """Take a settled round (:func:`~lowrank_fed.llm.runner.rounds.settle_round`): the new server state, the
        rows, timings and counts."""
        self.server, self.rows, self.times, self.counts = result.server, result.rows, result.times, result.counts

    # ------------------------------------------------------------------ evaluation
    def evaluate_sites(self, requests: dict[int, LFMessage], grid: Grid, *, timeout: float) -> dict[int, LFMessage]:
        r"""Federated evaluation (:mod:`~lowrank_fed.llm.fedeval`): each request ``{client: evaluate request}`` to
        the client's node (message type ``evaluate``: records ``"eval"`` and the run's config and
        :class:`~lowrank_fed.llm.federation.Shared`), and each node's answer decoded (records ``"scores"``).

        The scores of a model on the test set pool every site's, so a missing answer cannot be left out: a
        client without a node, a node that does not answer within ``timeout`` seconds, a ClientApp that raised or
        an answer that cannot be decoded stops the run (a ``RuntimeError`` naming the client, the node and why).
        """
        run = ConfigRecord({"config": json.dumps(self.cfg.to_dict(), sort_keys=True),
                            "shared": self.federation.shared.to_json()})
        self.discover(grid)
        out, sent = [], {}
        for k, req in requests.items():
            node = self.nodes.get(k)
            if node is None:
                raise RuntimeError(f"Federated evaluation: client {k} has no SuperNode (none answered the discovery "
                                   "query with its partition-id); the sites' scores cannot be pooled without it.")
            content = to_records(req, "eval")
            content["run"] = run
            msg = Message(content, dst_node_id=node, message_type="evaluate")
            sent[id(msg)] = (k, node)
            out.append(msg)
        replies = list(grid.send_and_receive(out, timeout=timeout)) if out else []
        ids = {m.metadata.message_id: id(m) for m in out}
        got = {ids[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in ids}
        answers = {}
        for key, (k, node) in sent.items():
            why = None
            if key not in got:
                why = f"no answer within {timeout:g} s"
            elif got[key].has_error():
                why = f"error {got[key].error.code}: {got[key].error.reason}"
            else:
                try:
                    answers[k] = from_records(got[key].content, "scores")
                except Exception as err:  # anything off the wire
                    why = f"an answer that cannot be decoded ({type(err).__name__}: {err})"
            if why is not None:
                raise RuntimeError(f"Federated evaluation: SuperNode {node} (client {k}) sent no scores: {why}. "
                                   "The sites' scores cannot be pooled without it; the run stops (resume it "
                                   "from its last checkpoint).")
        return answers

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Not Flower's evaluate rounds: the runner scores the models itself (``Simulation.evaluate``), asking
        the sites (:meth:`evaluate_sites`) in a ``[[clients]]`` run without ``dataset``."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
