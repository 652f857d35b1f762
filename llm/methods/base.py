r"""What every method shares: server and client state, the local plan, and the base class.

A method is a client policy plus a server rule from the core. The server side sees only messages
(:class:`~lowrank_fed.llm.protocol.Message`):

- :meth:`Method.configure` (server, client id) -> the download for that client;
- :meth:`Method.check_reply` rejects a malformed reply (never aggregated);
- :meth:`Method.aggregate` (server, ``{client id: reply}``) -> the next server state, with a rule
  from :data:`lowrank_fed.AGGREGATORS`; weights are the ``num_examples`` the replies carry.

The client side (:meth:`Method.client_plan`, :meth:`Method.client_reply`) turns a download and the
client's own state into a :class:`LocalPlan` (the adapter to start from, learning rate per parameter
group, hooks) and the trained adapter into the reply. :func:`lowrank_fed.llm.client.run_client` runs
it; the in-process runner and a Flower ``ClientApp`` both call that one function.

Default policy (FedIT): download the prefix ``truncate(global, r_k)`` and the head, train ``A``, ``B``
and the head, upload all three; the server applies its rule to the participants' pairs, keeps the
slots no participant held (:func:`lowrank_fed.aggregation.keep_slots`) and averages the head with data
weights (:func:`lowrank_fed.aggregation.weighted_average`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from lowrank_fed import FactorPair, aggregate, redistribute
from lowrank_fed.aggregation import keep_slots, weighted_average

from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs
from .options import PAIR_RULES, Options, PairOptions
from .start import start_pairs

__all__ = ["Options", "PairOptions", "PAIR_RULES", "ServerState", "ClientState", "LocalPlan", "Model", "Method", "weights_of",
           "reply_weight"]


class Model(NamedTuple):
    """A model to evaluate: folded pairs (None: no adapter), head weights, dense base deltas (FLoRA)."""

    pairs: dict[str, FactorPair] | None
    extras: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor] | None = None


@dataclass
class ServerState:
    r"""What the server holds between rounds.

    Attributes
    ----------
    round : int
        Rounds completed.
    pairs : dict module -> FactorPair
        The global adapter (folded); empty for FLoRA, whose updates are merged into ``base``.
    extras : dict name -> tensor
        Global non-LoRA weights (head).
    shapes : dict module -> (d_out, d_in)
    ranks : dict client id -> int
        The rank the server sends each client (HetLoRA updates it from the rank a reply reports).
    arrays : dict name -> tensor
        Method-specific tensors (FLoRA: ``base/<module>`` and ``merge/<round>/<module>/B|A``).
    info : dict
        JSON-able method state (``aggregated``; FLoRA: the last merge each client confirmed).
    cache : dict
        Values derived within a round (never checkpointed; recomputed identically).
    """

    round: int
    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[int, int]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class ClientState:
    """What a client keeps between rounds (FedSA: its ``B`` and head; FLoRA: its merged base)."""

    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class LocalPlan:
    r"""A client's local round.

    Attributes
    ----------
    pairs, extras : the adapter and head to start from (folded pairs)
    lrs : dict group -> learning rate
        Groups ``"A"``, ``"B"``, ``"extras"``; a group not named is frozen.
    hooks : list of callables ``workspace -> Hook``
        Built on the live adapter just before training; empty means the plain loop.
    base : dict module -> dense delta, optional
        Frozen weights ``W0 + base`` during training (FLoRA's merged base).
    info : dict
        Anything ``client_reply`` needs (HetLoRA: tail norms at download).
    """

    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor]
    lrs: dict[str, float]
    hooks: list = field(default_factory=list)
    base: dict[str, torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


def weights_of(replies: Mapping[int, Message]) -> list[float]:
    """Data weights of the replies, in their order: ``w_k = num_examples``, or the ``weight`` the server set from
    client ``k``'s ``[[clients]]`` table (:func:`~lowrank_fed.llm.runner.rounds.accept_reply`)."""
    return [reply_weight(r) for r in replies.values()]


def reply_weight(reply: Message) -> float:
    """A reply's data weight: its ``weight`` (the server's, from a ``[[clients]]`` table), else ``num_examples``."""
    return float(reply.config.get("weight", reply.config["num_examples"]))


class Method:
    r"""Base class: prefix download, ``A``, ``B`` and head trained and uploaded, head averaged.

    Subclasses set ``name``, ``title``, ``rule`` (a key of :data:`lowrank_fed.AGGREGATORS`), an
    ``Options`` model, and override the steps that differ.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    uploads: ClassVar[tuple[str, ...]] = ("B", "A")
    downloads: ClassVar[tuple[str, ...]] = ("B", "A")
    head: ClassVar[str] = "average"  # or "local"
    personalised: ClassVar[bool] = False  # each client is scored with its own model (personal_model)
    scores_global: ClassVar[bool] = True  # whether the global model is a model some client would use
    Options: ClassVar[type[Options]] = Options

    def __init__(self, **options: Any):
        self.options = self.Options(**options)
        if self.options.server is not None and self.options.server != type(self).rule:
            self.rule = self.options.server  # composition: this client policy, another core rule
            self.title = f"{type(self).title} + {self.options.server}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options.model_dump()})"

    # ------------------------------------------------------------------ server side
    @property
    def upload_is_model(self) -> bool:
        """Whether a reply's pairs (with the head, unless frozen) are the client's whole trained model."""
        return tuple(self.uploads) == ("B", "A")

    @property
    def head_frozen(self) -> bool:
        """Whether the head is frozen (option ``freeze_head``): clients do not train or upload it, the server keeps it."""
        return bool(self.options.freeze_head)

    @property
    def head_shared(self) -> bool:
        """Whether replies carry the head and the server averages it (``head == "average"``, not frozen)."""
        return self.head == "average" and not self.head_frozen

    def check_ranks(self, ranks) -> None:
        """Raise ``ValueError`` if the federation's client ranks do not suit the method (run before anything is written)."""
        return None

    def init_server(self, init: Mapping[str, FactorPair], extras: Mapping[str, torch.Tensor],
                    ranks: Mapping[int, int], *, init_seed: int) -> ServerState:
        """Round-0 state from the shared initial adapter (rank ``r_max``: ``B = 0``, ``A`` drawn from ``init_seed``)."""
        return ServerState(0, dict(init), dict(extras), {m: p.shape for m, p in init.items()},
                           {int(k): int(r) for k, r in ranks.items()}, info={"init_seed": int(init_seed)})

    def start_from(self, server: ServerState, start) -> ServerState:
        r"""The round-0 state ``server`` (from :meth:`init_server`) continued from an adapter ``start``
        (:class:`~lowrank_fed.llm.adapters.start.Start`, ``init_adapter``).

        Each module the adapter has gets :func:`~.start.start_pair` at the global rank
        ``R``: ``B_0 A_0 = Delta W_0`` exactly when ``R >= r_a``, the best rank-``R`` approximation otherwise; the
        adapter's head (if it carries one) replaces the fresh head. ``info["init_adapter"]`` is set (a method
        whose clients do not download the whole pair, FFA's ``A``, FedSA's ``B``, reads it); the relative errors
        go to ``cache["start_errors"]``. Every client's first download then follows by the method's own rule.
        """
        pairs, errors = start_pairs(start.pairs, server.pairs)
        server.pairs = pairs
        server.extras = {**server.extras, **start.extras}
        server.info = {**server.info, "init_adapter": True}
        server.cache["start_errors"] = errors
        return server

    def download_pairs(self, server: ServerState, rank: int) -> dict[str, FactorPair]:
        """The pairs a client of rank ``rank`` starts from: ``redistribute(global, rank, "prefix")``."""
        return {m: redistribute(p, rank, method="prefix") for m, p in server.pairs.items()}

    def client_pairs(self, server: ServerState, client: int) -> dict[str, FactorPair]:
        """The pairs client ``client`` downloads: those of its rank (CLAIR: its own refined pairs)."""
        return self.download_pairs(server, server.ranks[client])

    def configure(self, server: ServerState, client: int) -> Message:
        """The download for client ``client``: its pairs (the factors in ``downloads``), the head, its rank."""
        rank = server.ranks[client]
        arrays = encode_pairs(self.client_pairs(server, client), factors=self.downloads)
        if self.head == "average":
            arrays.update(encode_extras(server.extras))
        return Message(arrays, {"round": server.round + 1, "rank": rank, "client": int(client)})

    @staticmethod
    def has_joined(server: ServerState, client: int) -> bool:
        """Whether ``client`` has replied before (a method that keeps the head on the client sends it once)."""
        return str(client) in server.info.get("joined", [])

    @staticmethod
    def joined(server: ServerState, replies: Mapping[int, Message]) -> list[str]:
        """The clients that have replied so far, this round's included (``info["joined"]``, sorted ids)."""
        return sorted(set(server.info.get("joined", [])) | {str(k) for k in replies}, key=int)

    def downloaded_model(self, server: ServerState, rank: int) -> Model:
        """The model a client of rank ``rank`` starts the next round from, as the method sends it."""
        return Model(self.download_pairs(server, rank), dict(server.extras), None)

    def download_is_global(self, server: ServerState, rank: int) -> bool:
        """Whether a client of rank ``rank`` downloads exactly the global model (evaluation reuses its score)."""
        return all(p.rank <= rank for p in server.pairs.values())

    def export_pairs(self, server: ServerState) -> dict[str, FactorPair] | None:
        """The global adapter as folded pairs for a PEFT folder (None: the method has no global adapter)."""
        return server.pairs if self.scores_global and server.pairs else None

    def global_model(self, server: ServerState) -> Model:
        """The global model (for a new client, and the global score)."""
        return Model(server.pairs, server.extras, None)

    def upload_ranks(self, rank: int) -> tuple[int, ...]:
        """The ranks a reply may have from a client that was sent rank ``rank`` (here: ``rank`` itself)."""
        return (rank,)

    def check_reply(self, server: ServerState, client: int, reply: Message) -> None:
        r"""Reject a malformed reply: wrong keys, shapes, ranks, config, or non-finite entries.

        Raises
        ------
        ValueError
            Naming the tensor or config key, the expected and the actual value.
        """
        n = reply.config.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Reply config 'num_examples' must be a positive int. Got {n!r}.")
        for key, want in (("round", server.round + 1), ("client", client)):
            if reply.config.get(key) != want or isinstance(reply.config.get(key), bool):
                raise ValueError(f"Reply config {key!r} is {reply.config.get(key)!r}; expected {want} "
                                 "(a reply to another round's or another client's download).")
        arrays = reply.arrays
        expected = {f"lora/{m}/{f}" for m in server.shapes for f in self.uploads}
        if self.head_shared:
            expected |= {f"extra/{e}" for e in server.extras}
        missing, unknown = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        if missing or unknown:
            raise ValueError(f"Reply has missing keys {missing[:3]} and unknown keys {unknown[:3]}; expected "
                             f"{len(expected)} keys.")
        allowed = self.upload_ranks(server.ranks[client])
        rank = reply.config.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank not in allowed:
            raise ValueError(f"Reply config 'rank' is {rank!r}; expected one of {list(allowed)}.")
        for m, (d_out, d_in) in server.shapes.items():
            B, A = arrays.get(f"lora/{m}/B"), arrays.get(f"lora/{m}/A")
            if B is not None and tuple(B.shape) != (d_out, rank):
                raise ValueError(f"Module {m!r}: B has shape {tuple(B.shape)}; expected {(d_out, rank)}.")
            if A is not None and tuple(A.shape) != (rank, d_in):
                raise ValueError(f"Module {m!r}: A has shape {tuple(A.shape)}; expected {(rank, d_in)}.")
        for e, ref in server.extras.items():
            key = f"extra/{e}"
            if key in arrays and tuple(arrays[key].shape) != tuple(ref.shape):
                raise ValueError(f"Extra {e!r}: shape {tuple(arrays[key].shape)}; expected {tuple(ref.shape)}.")
        for key, t in arrays.items():
            if not bool(torch.isfinite(t).all()):
                n_bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{key}: {n_bad} non-finite entries (NaN or Inf); expected all finite.")

    def rule_options(self, server: ServerState, module: str) -> dict:
        return {}

    def rule_weights(self, replies: Mapping[int, Message]) -> list[float] | None:
        """The weights the rule gets: data weights ``num_examples`` (HetLoRA: None, its rule weighs by norms)."""
        return weights_of(replies)

    def aggregate(self, server: ServerState, replies: Mapping[int, Message]) -> ServerState:
        r"""The rule, module by module; slots no participant held keep their value; head averaged.

        ``B, A = keep_slots(aggregate(rule, [pairs_k], w), previous, h)`` with ``h = max_k`` of the
        ranks the participants were sent, so a slot every holder pruned becomes zero (for ``svd``, a
        re-factorisation of the exact sum, the result itself).
        """
        decoded = [decode_pairs(r.arrays) for r in replies.values()]
        weights = self.rule_weights(replies)
        held = max(server.ranks[k] for k in replies)
        pairs = {}
        for m, previous in server.pairs.items():
            new = aggregate(self.rule, [d[m] for d in decoded], weights, **self.rule_options(server, m))
            # svd re-factors the sum: its slots are not the clients' slots, so none is kept from before
            pairs[m] = new if self.rule == "svd" else keep_slots(new, previous, held)
        return self.next_state(server, replies, pairs=pairs)

    def aggregation_target(self, server: ServerState, replies: Mapping[int, Message],
                           new: ServerState) -> tuple[list[dict[str, FactorPair]], list[float]] | None:
        r"""Each aggregated client's trained pairs (its whole adapter after the round) and its weight.

        The round's exact aggregate is ``sum_k p_k B_k A_k`` over these (:mod:`.exactness`). Here: the uploaded
        pairs with data weights, when replies are whole pairs and the global adapter is a model; else None.
        """
        if tuple(self.uploads) != ("B", "A") or not self.scores_global:
            return None
        return [decode_pairs(r.arrays) for r in replies.values()], weights_of(replies)

    def aggregation_result(self, new: ServerState) -> dict[str, FactorPair]:
        """The pairs the server made this round, to compare with :meth:`aggregation_target`: the global adapter."""
        return new.pairs

    def next_state(self, server: ServerState, replies: Mapping[int, Message], **changes) -> ServerState:
        """The state after a round: ``changes`` applied, head averaged (if shared), ranks from the replies."""
        extras = server.extras
        if self.head_shared and server.extras:
            heads = [decode_extras(r.arrays) for r in replies.values()]
            extras = {e: weighted_average([h[e] for h in heads], weights_of(replies)) for e in server.extras}
        ranks = {**server.ranks, **{k: int(r.config["rank"]) for k, r in replies.items()}}
        info = {**server.info, "aggregated": True, **changes.pop("info", {})}
        return ServerState(server.round + 1, changes.pop("pairs", server.pairs), extras, server.shapes, ranks,
                           changes.pop("arrays", server.arrays), info)

    # ------------------------------------------------------------------ client side
    def client_plan(self, message: Message, state: ClientState, context, generator: torch.Generator):
        """``(LocalPlan, state)``: the adapter to start from and what to train, from the download."""
        lr = context.settings.lr
        plan = LocalPlan(decode_pairs(message.arrays), decode_extras(message.arrays), {"A": lr, "B": lr, "extras": lr})
        return plan, state

    def client_probe(self, plan: LocalPlan, message: Message, state: ClientState,
                     context) -> tuple[LocalPlan, int] | None:
        """A training pass before the local round (here: none), whose result finishes the plan.

        ``(probe plan, steps)``: trained from the probe plan's start on the round's first ``steps`` batches
        (the round's dropout seed), then read by :meth:`client_after_probe` and discarded; None: no probe.
        LoRA-A2 probes to choose the slots it trains.
        """
        return None

    def client_after_probe(self, plan: LocalPlan, pairs: Mapping[str, FactorPair], extras: Mapping[str, torch.Tensor],
                           state: ClientState, message: Message) -> tuple[LocalPlan, ClientState]:
        """The round's plan given the probe's trained adapter (``pairs``, ``extras``); here unchanged."""
        return plan, state

    def client_reply(self, plan: LocalPlan, pairs: Mapping[str, FactorPair], extras: Mapping[str, torch.Tensor],
                     state: ClientState, message: Message) -> tuple[Message, ClientState]:
        """The reply (the factors in ``uploads``, the head if shared, the rank) and the client's new state."""
        arrays = encode_pairs(pairs, factors=self.uploads)
        if self.head_shared:
            arrays.update(encode_extras(extras))
        return Message(arrays, {"rank": int(message.config["rank"])}), state

    def personal_model(self, message: Message, state: ClientState, shapes: Mapping[str, tuple[int, int]]) -> Model | None:
        """A personalised method's own model for this client (its local parts + the download); else None."""
        return None
