r"""The Flower ``ClientApp``: one client of ``lowrank-fed run`` per SuperNode, running :func:`run_client`.

A SuperNode is client ``k = partition-id`` of its ``--node-config`` (Flower's simulation sets ``partition-id``
itself). Three message types reach it:

- ``query`` (the server's discovery): the reply's ``ConfigRecord`` ``"node"`` holds ``partition-id``, the
  node's LoRA rank budget ``rank`` and the federation's node count ``num-partitions`` (``-1`` when the node
  names none);
- ``train``: the download (records ``"msg"``, see :mod:`.records`), the run's config (``ConfigRecord`` ``"run"``:
  the :class:`~lowrank_fed.llm.config.RunConfig` as JSON, the method, ``state-round``, and ``shared``: the
  :class:`~lowrank_fed.llm.federation.Shared` facts the server computed from every client's texts, such as a tiny
  model's vocabulary) and, when the server cannot know that the node holds it, the client's state (records
  ``"state"``). The app builds **only its own** :class:`~lowrank_fed.llm.client.ClientContext` with
  :func:`~lowrank_fed.llm.federation.build_client`: its rows from the catalogue's labels and the seed, then its own
  examples read, attacked (if the seed makes it a contaminated client), encoded; the model built as the server
  builds it. No other client's example is read, and no ``Simulation`` is built. It then runs
  ``run_client(method, download, client_state, context)`` and replies with the upload (``"msg"``) and the client's
  new state (``"state"``).

- ``evaluate`` (federated evaluation of a ``[[clients]]`` run without a server ``dataset``,
  :mod:`~lowrank_fed.llm.fedeval`): the models to score (records ``"eval"``) and the run (``"run"``); the node
  scores them on its own validation and test rows (:func:`site_evaluator`) and answers with the per-example scores
  (records ``"scores"``), never an example.

The client's state (FedSA's ``B`` and head, FLoRA's merged base, ...) lives in the node's persistent
``context.state`` as records ``"state/<method>"``, tagged with the round that produced it (``ConfigRecord``
``"state-tag/<method>"``). The server sends ``state-round``, the round of the state it expects the client to
train from (0: none); a stored state with another tag is never used. A copy of the state goes back with each
reply so that the server's checkpoints and personalised scores equal the in-process runner's: the client's
state (personal factors and head included) therefore leaves the site every round. After a resume or a node
restart the server attaches its copy to the download.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..methods import ClientState, make_method
from ..protocol import Message as LFMessage
from .records import from_records, has_part, to_records

__all__ = ["app", "client_context", "node_identity", "node_site", "site_evaluator", "evaluate"]

log = logging.getLogger("lowrank_fed.llm.flower")

app = ClientApp()

_NODE: dict = {}  # this process's set-up: {"key": (config JSON, shared JSON), "source", "model", "contexts"}


def node_identity(node_config) -> tuple[int, int, int]:
    r"""``(partition-id, rank budget, num-partitions)`` of a node's ``--node-config`` (``-1``: not named).

    ``num-partitions`` is the federation's node count (Flower's simulation sets it; ``lowrank-fed flower up``
    passes it); the server refuses a node whose count is not the run's ``clients``.

    Raises
    ------
    ValueError
        ``partition-id`` is missing or not a non-negative integer, ``rank`` is not a positive integer, or
        ``num-partitions`` is not a positive integer.
    """
    pid = node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ValueError(f"SuperNode --node-config 'partition-id' must be a non-negative int (the client id). "
                         f"Got {pid!r} in {dict(node_config)}.")
    out = [pid]
    for key, meaning in (("rank", "the node's LoRA rank budget"), ("num-partitions", "the federation's node count")):
        value = node_config.get(key, -1)
        if isinstance(value, bool) or not isinstance(value, int) or (value != -1 and value < 1):
            raise ValueError(f"SuperNode --node-config {key!r} must be a positive int ({meaning}). Got {value!r}.")
        out.append(value)
    return out[0], out[1], out[2]


def node_site(node_config) -> tuple[str | None, int]:
    r"""``(data-path, rank)`` of a node's ``--node-config`` (None / ``-1``: not named): a ``[[clients]]`` node's own
    data source (it overrides the table's ``data``) and its rank.

    Raises
    ------
    ValueError
        ``data-path`` is not a non-empty string (in ``--node-config`` write it quoted: ``data-path="site.jsonl"``).
    """
    path = node_config.get("data-path")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ValueError(f"SuperNode --node-config 'data-path' must be a non-empty string (the node's data file, "
                         f"quoted: data-path=\"site.jsonl\"). Got {path!r}.")
    return path, node_identity(node_config)[1]


def client_context(config_json: str, client: int, shared_json: str | None = None, *, data_path: str | None = None,
                   rank: int = -1):
    r"""Client ``client``'s :class:`ClientContext` for the run config ``config_json``, from its own examples only.

    :func:`~lowrank_fed.llm.federation.build_client` with the server's ``shared_json``
    (:meth:`~lowrank_fed.llm.federation.Shared.to_json`; None: nothing shared). Kept per process: the data source
    and the model are opened once per run config (several virtual nodes of Flower's simulation can share a
    process; each reads its own rows, and they train one at a time on the one model, as in-process clients do).

    With ``[[clients]]`` tables the node opens only its own data source (:class:`~lowrank_fed.llm.sites.NodeSource`:
    ``data_path``, its ``--node-config data-path``, else its table's ``data``), with the label set the server sent
    (``Shared.labels``).

    Raises
    ------
    ValueError
        ``[[clients]]``: the node's ``rank`` (``-1``: not named) is not its table's ``rank``; its data source
        cannot be used (the message names the file, the column or the label).
    """
    import torch

    from ..config import RunConfig
    from ..federation import DataSource, Shared, build_client, build_model, client_ranks, source_plan

    key = (config_json, shared_json)
    if _NODE.get("key") != key:
        cfg = RunConfig.from_dict(json.loads(config_json))
        torch.set_num_threads(cfg.threads)
        shared = Shared() if shared_json is None else Shared.from_json(shared_json)
        if cfg.sites:  # each client's source is opened when it is served (sites.NodeSource)
            source, reference_rank = None, max(cfg.ranks)
            num_labels = 1 if shared.labels is None else len(shared.labels)
        else:
            source = DataSource(cfg)
            _, _, client_idx = source_plan(cfg, source)
            reference_rank = max(client_ranks(cfg, [len(i) for i in client_idx]))
            num_labels = len(source.label_names)
        _NODE.clear()  # one run at a time per process
        _NODE.update(key=key, cfg=cfg, shared=shared, source=source, contexts={}, sources={}, evaluators={},
                     model=build_model(cfg, shared, num_labels, reference_rank))
    cfg, contexts = _NODE["cfg"], _NODE["contexts"]
    if not 0 <= client < cfg.clients:
        raise ValueError(f"Client id {client} is outside the run's clients [0, {cfg.clients}).")
    if (client, data_path) not in contexts:
        source = _site_source(client, data_path, rank) if cfg.sites else _NODE["source"]
        contexts[(client, data_path)] = build_client(cfg, client, shared=_NODE["shared"], source=source,
                                                     model=_NODE["model"])
    return contexts[(client, data_path)]


def _site_source(client: int, data_path: str | None, rank: int):
    """A ``[[clients]]`` node's :class:`~lowrank_fed.llm.sites.NodeSource` (its own file alone), opened once."""
    from ..sites import NodeSource

    cfg, sources = _NODE["cfg"], _NODE["sources"]
    if rank != -1 and rank != cfg.sites[client].rank:
        raise ValueError(f"SuperNode --node-config rank={rank} contradicts the run config's "
                         f"clients[{client}].rank = {cfg.sites[client].rank}; give the node rank="
                         f"{cfg.sites[client].rank} or leave rank out.")
    if (client, data_path) not in sources:
        sources[(client, data_path)] = NodeSource(cfg, client, _NODE["shared"].labels, data_path)
    return sources[(client, data_path)]


def site_evaluator(config_json: str, client: int, shared_json: str | None = None, *, data_path: str | None = None,
                   rank: int = -1):
    r"""Client ``client``'s :class:`~lowrank_fed.llm.fedeval.SiteEvaluator`: its own validation and test rows
    (:class:`~lowrank_fed.llm.sites.NodeSource`, its file alone) on the node's model; kept per process like
    :func:`client_context`.

    Raises
    ------
    ValueError
        The run has no ``[[clients]]`` tables or has a server ``dataset`` (it is not scored by its sites); as
        :func:`client_context`.
    """
    from ..fedeval import SiteEvaluator, federated

    client_context(config_json, client, shared_json, data_path=data_path, rank=rank)  # the node's set-up
    cfg, evaluators = _NODE["cfg"], _NODE["evaluators"]
    if not federated(cfg):
        raise ValueError("An evaluate message reached a node of a run that its server scores itself (it has a "
                         "server dataset, or no [[clients]] tables).")
    if (client, data_path) not in evaluators:
        source = _site_source(client, data_path, rank)
        evaluators[(client, data_path)] = SiteEvaluator(cfg, _NODE["model"], source.val, source.test)
    return evaluators[(client, data_path)]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery: this node's client id, rank budget and node count (``-1``: not named)."""
    pid, rank, parts = node_identity(context.node_config)
    content = RecordDict({"node": ConfigRecord({"partition-id": pid, "rank": rank, "num-partitions": parts})})
    return Message(content, reply_to=msg)


def _stored_state(context: Context, method: str, state_round: int) -> ClientState | None:
    tag = context.state.config_records.get(f"state-tag/{method}")
    if state_round == 0:
        return None
    if tag is None or int(tag["round"]) != state_round:
        have = None if tag is None else int(tag["round"])
        raise ValueError(f"Client state of {method!r} from round {state_round} expected; this node holds "
                         f"{'none' if have is None else f'round {have}'} and the server sent none.")
    stored = from_records(context.state, f"state/{method}")
    return ClientState(stored.arrays, stored.config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (:mod:`~lowrank_fed.llm.fedeval`): the per-example scores of the request's models on
    this site's own validation and test rows (records ``"scores"``); no example leaves the node."""
    pid, _, _ = node_identity(context.node_config)
    run = msg.content.config_records["run"]
    shared = str(run["shared"]) if "shared" in run else None
    data_path, rank = node_site(context.node_config)
    evaluator = site_evaluator(str(run["config"]), pid, shared, data_path=data_path, rank=rank)
    return Message(to_records(evaluator.answer(from_records(msg.content, "eval")), "scores"), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of client ``partition-id``: :func:`run_client` on the download; reply upload + new state."""
    from ..client import run_client

    pid, _, _ = node_identity(context.node_config)
    run = msg.content.config_records["run"]
    config_json, name = str(run["config"]), str(run["method"])
    options = json.loads(str(run["options"]))
    download = from_records(msg.content, "msg")
    if int(download.config["client"]) != pid:
        raise ValueError(f"Download for client {download.config['client']} reached the node of client {pid}.")
    state_round = int(run["state-round"])
    if has_part(msg.content, "state"):
        sent = from_records(msg.content, "state")
        state = ClientState(sent.arrays, sent.config)
    else:
        state = _stored_state(context, name, state_round)
    method = make_method(name, **options)
    shared = str(run["shared"]) if "shared" in run else None
    data_path, rank = node_site(context.node_config)
    context_k = client_context(config_json, pid, shared, data_path=data_path, rank=rank)
    reply, new_state, _ = run_client(method, download, state, context_k)
    round_ = int(download.config["round"])
    to_records(LFMessage(new_state.arrays, new_state.info), f"state/{name}", context.state)
    context.state[f"state-tag/{name}"] = ConfigRecord({"round": round_})
    content = to_records(reply, "msg")
    to_records(LFMessage(new_state.arrays, new_state.info), "state", content)
    return Message(content, reply_to=msg)
