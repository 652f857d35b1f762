r"""Federated LoRA methods: a client policy plus a server rule taken from the core.

Each method is a small class. The server side (:meth:`Method.download`, :meth:`Method.aggregate`,
:meth:`Method.check_upload`) and the client side (:meth:`Method.client_start`,
:meth:`Method.client_finish`) exchange *messages*: flat dicts of named tensors,

- ``"lora/<module>/B"``, ``"lora/<module>/A"``: folded factors (``B @ A`` is ``Delta W``, no scale),
- ``"extra/<name>"``: non-LoRA trainable weights (a classifier head),
- ``"merge/<module>/B"``, ``"merge/<module>/A"``: factors to merge into the base (FLoRA),

so the in-process runner (:mod:`lowrank_fed.llm.simulation`) and a Flower app can carry the same
logic. Every server rule is :func:`lowrank_fed.aggregate` with a name from
:data:`lowrank_fed.AGGREGATORS`; nothing here re-implements the arithmetic of a rule.

=============  ==========================  ===========================================================
name           server rule                 client policy
=============  ==========================  ===========================================================
fedit          ``zero_pad`` (data)         download the prefix ``truncate(global, r_k)``, train A and B
ffa            ``zero_pad`` on B           A frozen at the shared random init; train and upload B only
fedsa          ``segment`` on A            upload A only; B and the head stay on the client
hetlora        ``zero_pad`` (frobenius)    prefix; tail regulariser; self-pruning of the rank
replication    ``replication``             prefix download, train A and B
flora          ``stack``                   merge the stacked product into the base; fresh adapters
flexlora       ``svd``                     download the best rank-``r_k`` approximation (SVD)
prelort        ``segment``                 prefix download (nested training comes with the seed methods)
=============  ==========================  ===========================================================

Heads and other extras are averaged with data weights (FedAvg), except FedSA-LoRA's (local).
For the prefix methods, slots of the global pair that no participant of a round holds (partial
participation, or a pruned HetLoRA client) keep their previous value [ours]; the rules themselves
return the participants' ``r_max``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowrank_fed import FactorPair, aggregate, redistribute, truncate

from .peft_bridge import init_pairs
from .training import tail_norm_product

__all__ = [
    "ServerState",
    "ClientState",
    "LocalPlan",
    "Method",
    "METHODS",
    "make_method",
    "encode_pairs",
    "decode_pairs",
    "message_bytes",
    "average_extras",
    "FedIT",
    "FFALoRA",
    "FedSALoRA",
    "HetLoRA",
    "Replication",
    "FLoRA",
    "FlexLoRA",
    "PreLort",
]

Message = dict[str, torch.Tensor]


@dataclass
class ServerState:
    r"""What the server holds between rounds.

    Attributes
    ----------
    round : int
        Rounds completed.
    pairs : dict module -> FactorPair
        The global adapter (folded); empty for FLoRA, whose update lives in ``base``.
    extras : dict name -> tensor
        Global non-LoRA weights (head).
    shapes : dict module -> (d_out, d_in)
    base : dict module -> tensor, shape (d_out, d_in)
        FLoRA: the sum of all merged stacked products (``W = W0 + base``).
    merge : dict module -> FactorPair
        FLoRA: the last round's stacked pair, which clients merge into their base.
    info : dict
        JSON-serialisable flags (e.g. ``"aggregated"``).
    cache : dict
        Derived values a method may reuse within a round (never checkpointed; recomputed identically).
    """

    round: int
    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    merge: dict[str, FactorPair] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class ClientState:
    """What a client keeps between rounds: its current rank, local tensors (FedSA: B, head), flags."""

    rank: int
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class LocalPlan:
    r"""A client's local round: the adapter to start from and what to train.

    ``regularizer``, if set, maps the live folded pairs to a scalar added to the loss.
    """

    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor]
    rank: int
    train_A: bool = True
    train_B: bool = True
    train_extras: bool = True
    regularizer: Callable[[Mapping[str, FactorPair]], torch.Tensor] | None = None
    merge: dict[str, FactorPair] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- messages


def encode_pairs(pairs: Mapping[str, FactorPair], prefix: str = "lora", factors: Sequence[str] = ("B", "A")) -> Message:
    """``{"<prefix>/<module>/B": B, "<prefix>/<module>/A": A}`` (only the named ``factors``)."""
    out: Message = {}
    for name, pair in pairs.items():
        for f in factors:
            out[f"{prefix}/{name}/{f}"] = pair.B if f == "B" else pair.A
    return out


def decode_factors(message: Mapping[str, torch.Tensor], prefix: str, factor: str) -> dict[str, torch.Tensor]:
    """``{module: tensor}`` for the keys ``"<prefix>/<module>/<factor>"``."""
    head, tail = prefix + "/", "/" + factor
    return {k[len(head) : -len(tail)]: v for k, v in message.items() if k.startswith(head) and k.endswith(tail)}


def decode_pairs(message: Mapping[str, torch.Tensor], prefix: str = "lora") -> dict[str, FactorPair]:
    """Inverse of :func:`encode_pairs` for messages that carry both factors."""
    Bs, As = decode_factors(message, prefix, "B"), decode_factors(message, prefix, "A")
    if set(Bs) != set(As):
        raise ValueError(f"Message has unpaired factors for modules {sorted(set(Bs) ^ set(As))[:3]}.")
    return {m: FactorPair(Bs[m], As[m]) for m in Bs}


def encode_extras(extras: Mapping[str, torch.Tensor]) -> Message:
    return {f"extra/{n}": v for n, v in extras.items()}


def decode_extras(message: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("extra/") :]: v for k, v in message.items() if k.startswith("extra/")}


def message_bytes(message: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire: ``sum numel * element size`` over the message's tensors."""
    return int(sum(t.numel() * t.element_size() for t in message.values()))


def average_extras(extras: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    r"""FedAvg of non-LoRA weights: ``sum_k p_k x_k`` with ``p_k = w_k / sum_j w_j``."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    p = (w / w.sum()).tolist()
    out = {}
    for name in extras[0]:
        total = extras[0][name] * p[0]
        for x, pk in zip(extras[1:], p[1:], strict=True):
            total = total + x[name] * pk
        out[name] = total
    return out


def _keep_tail(new: FactorPair, previous: FactorPair | None) -> FactorPair:
    """``new`` extended by ``previous``'s slots past ``new.rank`` (slots no participant held)."""
    if previous is None or previous.rank <= new.rank:
        return new
    return FactorPair(torch.cat([new.B, previous.B[:, new.rank :]], dim=1),
                      torch.cat([new.A, previous.A[new.rank :, :]], dim=0))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- methods


class Method:
    r"""Base class: prefix download, both factors trained and uploaded, head averaged.

    Subclasses set ``rule`` (a key of :data:`lowrank_fed.AGGREGATORS`) and override the hooks
    that differ. ``options`` are method settings from the run config (e.g. HetLoRA's ``lam``).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    uploads: ClassVar[tuple[str, ...]] = ("B", "A")
    head: ClassVar[str] = "average"  # or "local"
    personalised: ClassVar[bool] = False
    defaults: ClassVar[dict] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for method {self.name!r}; valid: {sorted(self.defaults)}.")
        self.options = {**self.defaults, **options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # ------------------------------------------------------------------ server side
    def init_server(self, init: Mapping[str, FactorPair], extras: Mapping[str, torch.Tensor]) -> ServerState:
        """Round-0 state from the shared initial adapter (rank ``r_max``: ``B = 0``, ``A`` random)."""
        return ServerState(0, dict(init), dict(extras), {m: p.shape for m, p in init.items()})

    def download(self, server: ServerState, rank: int) -> Message:
        """What a client of rank ``rank`` receives: here ``redistribute(global, rank, "prefix")`` + head."""
        pairs = {m: redistribute(p, rank, method="prefix") for m, p in server.pairs.items()}
        msg = encode_pairs(pairs)
        if self.head == "average":
            msg.update(encode_extras(server.extras))
        return msg

    def rule_options(self, server: ServerState, module: str) -> dict:
        return {}

    def aggregate(self, server: ServerState, uploads: Sequence[Message], weights: Sequence[float]) -> ServerState:
        """Apply the core rule module by module; average the head; bump the round."""
        decoded = [decode_pairs(u) for u in uploads]
        pairs = {}
        for m, previous in server.pairs.items():
            new = aggregate(self.rule, [d[m] for d in decoded], list(weights), **self.rule_options(server, m))
            pairs[m] = _keep_tail(new, previous)
        return self._next(server, pairs, uploads, weights)

    def _next(self, server, pairs, uploads, weights, **changes) -> ServerState:
        extras = server.extras
        if self.head == "average" and server.extras:
            extras = average_extras([decode_extras(u) for u in uploads], weights)
        return ServerState(server.round + 1, pairs, extras, server.shapes,
                           changes.get("base", server.base), changes.get("merge", server.merge),
                           {**server.info, "aggregated": True, **changes.get("info", {})})

    def max_upload_rank(self, rank: int) -> tuple[int, int]:
        """Allowed ``(low, high)`` rank of an upload from a client that downloaded rank ``rank``."""
        return rank, rank

    def check_upload(self, server: ServerState, upload: Message, rank: int) -> None:
        r"""Reject a malformed update: wrong keys, shapes, ranks, or non-finite entries.

        Raises
        ------
        ValueError
            Naming the tensor, the expected and the actual value.
        """
        expected = {f"lora/{m}/{f}" for m in server.shapes for f in self.uploads}
        if self.head == "average":
            expected |= {f"extra/{n}" for n in server.extras}
        missing, unknown = sorted(expected - set(upload)), sorted(set(upload) - expected)
        if missing or unknown:
            raise ValueError(f"Update has missing keys {missing[:3]} and unknown keys {unknown[:3]}.")
        low, high = self.max_upload_rank(rank)
        for m, (d_out, d_in) in server.shapes.items():
            B, A = upload.get(f"lora/{m}/B"), upload.get(f"lora/{m}/A")
            r = B.shape[-1] if B is not None else A.shape[0]
            if not low <= r <= high:
                raise ValueError(f"Module {m!r}: upload rank {r}; expected in [{low}, {high}].")
            if B is not None and tuple(B.shape) != (d_out, r):
                raise ValueError(f"Module {m!r}: B has shape {tuple(B.shape)}; expected {(d_out, r)}.")
            if A is not None and tuple(A.shape) != (r, d_in):
                raise ValueError(f"Module {m!r}: A has shape {tuple(A.shape)}; expected {(r, d_in)}.")
        for n, ref in server.extras.items():
            key = f"extra/{n}"
            if key in upload and tuple(upload[key].shape) != tuple(ref.shape):
                raise ValueError(f"Extra {n!r}: shape {tuple(upload[key].shape)}; expected {tuple(ref.shape)}.")
        for key, t in upload.items():
            if not _finite(t):
                n_bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{key}: {n_bad} non-finite entries (NaN or Inf); expected all finite.")

    def global_model(self, server: ServerState):
        """``(pairs or None, extras, base)`` of the global model to evaluate."""
        return server.pairs, server.extras, server.base

    # ------------------------------------------------------------------ client side
    def init_client(self, rank: int, extras: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]) -> ClientState:
        return ClientState(int(rank))

    def client_start(self, message: Message, client: ClientState, *, shapes, generator: torch.Generator,
                     device=None) -> LocalPlan:
        """Turn the download into the adapter to train and the training policy (``device``: where fresh factors go)."""
        return LocalPlan(decode_pairs(message), decode_extras(message), client.rank)

    def client_finish(self, plan: LocalPlan, pairs: Mapping[str, FactorPair], extras: Mapping[str, torch.Tensor],
                      client: ClientState) -> tuple[Message, ClientState]:
        """The update to upload and the client's new state."""
        msg = encode_pairs(pairs, factors=self.uploads)
        if self.head == "average":
            msg.update(encode_extras(extras))
        return msg, client

    def personal_model(self, server: ServerState, client: ClientState):
        """``(pairs, extras, base)`` of a client's own model (personalised methods)."""
        return self.global_model(server)


class FedIT(Method):
    r"""FedIT ("FL + LoRA", Zhang et al., ICASSP 2024) with zero-padding for heterogeneous ranks.

    Server: ``aggregate("zero_pad", pairs, n_k)`` (data weights; equal ranks make it ``fedavg``).
    """

    name, title, rule = "fedit", "FedIT (zero-pad)", "zero_pad"


class Replication(Method):
    """Replication padding (Byun & Lee, 2024): server ``aggregate("replication", ...)``."""

    name, title, rule = "replication", "Replication", "replication"


class PreLort(Method):
    r"""PreLort's server side: ``aggregate("segment", ..., previous=global)`` and prefix download.

    Reconstruction (ALGORITHMS.md section 2). Clients train plainly here; prefix-nested training
    comes with the seed methods' client side.
    """

    name, title, rule = "prelort", "PreLort (segment)", "segment"

    def rule_options(self, server, module):
        return {"previous": server.pairs[module]}


class HetLoRA(Method):
    r"""HetLoRA (Cho et al., 2024): Frobenius-weighted zero-padding, tail regulariser, self-pruning.

    Client ``k`` of rank ``r_k`` trains with ``lam * sum_m ||B_m[:, t:]||_F ||A_m[t:, :]||_F``,
    ``t = floor(gamma r_k)``, on the live (folded) factors. If the tail product is lower after
    training than at download, it prunes: ``r_k <- max(r_min, floor(gamma r_k))`` and uploads only
    its first ``r_k`` slots. Server: ``aggregate("zero_pad", ..., weighting="frobenius")``.
    """

    name, title, rule = "hetlora", "HetLoRA", "zero_pad"
    defaults = {"lam": 0.01, "gamma": 0.99, "r_min": 1}

    def rule_options(self, server, module):
        return {"weighting": "frobenius"}

    def max_upload_rank(self, rank):
        return 1, rank

    def client_start(self, message, client, *, shapes, generator, device=None):
        plan = super().client_start(message, client, shapes=shapes, generator=generator, device=device)
        lam, t = float(self.options["lam"]), int(math.floor(self.options["gamma"] * client.rank))
        with torch.no_grad():
            plan.info["tail_start"] = float(tail_norm_product(plan.pairs, t))
        plan.info["t"] = t
        plan.regularizer = lambda live: lam * tail_norm_product(live, t)
        return plan

    def client_finish(self, plan, pairs, extras, client):
        with torch.no_grad():
            tail_end = float(tail_norm_product(pairs, plan.info["t"]))
        rank = client.rank
        if tail_end < plan.info["tail_start"]:
            rank = max(int(self.options["r_min"]), int(math.floor(self.options["gamma"] * client.rank)), 1)
            rank = min(rank, client.rank)
        pairs = {m: truncate(p, rank) for m, p in pairs.items()}
        msg, _ = super().client_finish(plan, pairs, extras, client)
        info = {**client.info, "pruned": client.info.get("pruned", 0) + int(rank < client.rank)}
        return msg, ClientState(rank, client.arrays, info)


class FFALoRA(Method):
    r"""FFA-LoRA (Sun et al., ICLR 2024): ``A`` frozen at the shared random init; only ``B`` trained and sent.

    Server: ``B = aggregate("zero_pad", [FactorPair(B_k, A[:r_k])], n_k).B`` and ``A`` unchanged.
    With ``A`` shared and frozen this is exact: ``sum_k p_k B_k A[:r_k] = (sum_k p_k pad(B_k)) A``.
    """

    name, title, rule = "ffa", "FFA-LoRA", "zero_pad"
    uploads = ("B",)

    def client_start(self, message, client, *, shapes, generator, device=None):
        plan = super().client_start(message, client, shapes=shapes, generator=generator, device=device)
        plan.train_A = False
        return plan

    def aggregate(self, server, uploads, weights):
        pairs = {}
        for m, previous in server.pairs.items():
            clients = []
            for u in uploads:
                B = u[f"lora/{m}/B"]
                clients.append(FactorPair(B, previous.A[: B.shape[1], :]))
            new = aggregate(self.rule, clients, list(weights))
            B = new.B if new.rank == previous.rank else torch.cat([new.B, previous.B[:, new.rank :]], dim=1)
            pairs[m] = FactorPair(B, previous.A)
        return self._next(server, pairs, uploads, weights)


class FedSALoRA(Method):
    r"""FedSA-LoRA (Guo et al., ICLR 2025): only ``A`` is shared; ``B`` and the head stay local.

    Server: ``A = aggregate("segment", [FactorPair(0, A_k)], n_k, previous=global).A``: each row of
    ``A`` averaged over the clients that hold it, which is FedAvg for equal ranks [ours for mixed
    ranks]. Personalised: each client is evaluated with its own ``B`` and head.
    """

    name, title, rule = "fedsa", "FedSA-LoRA", "segment"
    uploads = ("A",)
    head = "local"
    personalised = True

    def download(self, server, rank):
        pairs = {m: redistribute(p, rank, method="prefix") for m, p in server.pairs.items()}
        return encode_pairs(pairs, factors=("A",))

    def init_client(self, rank, extras, shapes):
        # B starts at zero (created on first use, on the device of A); the head starts from the global init.
        return ClientState(int(rank), {f"extra/{n}": v.clone() for n, v in extras.items()})

    @staticmethod
    def _local_B(client: ClientState, module: str, A: torch.Tensor, d_out: int) -> torch.Tensor:
        B = client.arrays.get(f"B/{module}")
        return B if B is not None else torch.zeros(d_out, A.shape[0], dtype=A.dtype, device=A.device)

    def client_start(self, message, client, *, shapes, generator, device=None):
        As = decode_factors(message, "lora", "A")
        pairs = {m: FactorPair(self._local_B(client, m, As[m], shapes[m][0]), As[m]) for m in As}
        return LocalPlan(pairs, decode_extras(client.arrays), client.rank)

    def client_finish(self, plan, pairs, extras, client):
        arrays = {f"B/{m}": p.B for m, p in pairs.items()}
        arrays.update(encode_extras(extras))
        return encode_pairs(pairs, factors=("A",)), ClientState(client.rank, arrays, client.info)

    def aggregate(self, server, uploads, weights):
        pairs = {}
        for m, previous in server.pairs.items():
            d_out = server.shapes[m][0]
            clients = [FactorPair(torch.zeros(d_out, u[f"lora/{m}/A"].shape[0], dtype=previous.A.dtype,
                                              device=previous.A.device), u[f"lora/{m}/A"]) for u in uploads]
            new = aggregate(self.rule, clients, list(weights), previous=FactorPair(torch.zeros_like(previous.B), previous.A))
            pairs[m] = FactorPair(torch.zeros_like(new.B), new.A)
        return self._next(server, pairs, uploads, weights)

    def global_model(self, server):
        return server.pairs, server.extras, server.base

    def personal_model(self, server, client):
        pairs = {}
        for m, p in server.pairs.items():
            A = redistribute(p, client.rank, method="prefix").A
            pairs[m] = FactorPair(self._local_B(client, m, A, server.shapes[m][0]), A)
        return pairs, decode_extras(client.arrays), server.base


class FLoRA(Method):
    r"""FLoRA (Wang et al., NeurIPS 2024): stack, merge into the base, fresh adapters every round.

    Server: ``S = aggregate("stack", pairs, n_k)`` (rank ``sum r_k``, ``S.B @ S.A = sum p_k B_k A_k``
    exactly); ``base += S.B @ S.A``; the download carries ``S`` for clients to merge. Clients start
    each round from fresh factors (``B = 0``, ``A`` random) of their own rank.
    """

    name, title, rule = "flora", "FLoRA", "stack"

    def init_server(self, init, extras):
        return ServerState(0, {}, dict(extras), {m: p.shape for m, p in init.items()})

    def download(self, server, rank):
        msg = encode_pairs(server.merge, prefix="merge")
        msg.update(encode_extras(server.extras))
        return msg

    def client_start(self, message, client, *, shapes, generator, device=None):
        return LocalPlan(init_pairs(shapes, client.rank, generator, device=device), decode_extras(message), client.rank,
                         merge=decode_pairs(message, prefix="merge"))

    def aggregate(self, server, uploads, weights):
        decoded = [decode_pairs(u) for u in uploads]
        merge, base = {}, dict(server.base)
        for m in server.shapes:
            stacked = aggregate(self.rule, [d[m] for d in decoded], list(weights))
            merge[m] = stacked
            delta = stacked.B @ stacked.A  # the merge into the frozen weights (FLoRA), not a rule
            base[m] = base[m] + delta if m in base else delta
        return self._next(server, {}, uploads, weights, base=base, merge=merge)

    def global_model(self, server):
        return None, server.extras, server.base


class FlexLoRA(Method):
    r"""FlexLoRA (Bai et al., NeurIPS 2024): exact SVD aggregation, SVD redistribution to each rank.

    Server: ``aggregate("svd", pairs, n_k)`` (``rank=None``: exact ``sum_k p_k B_k A_k``, never
    densified). Download: ``redistribute(global, r_k, method="svd")``, the best rank-``r_k``
    approximation; in round 1 the global product is zero, so clients take the prefix of the shared
    initial adapter.
    """

    name, title, rule = "flexlora", "FlexLoRA", "svd"

    def download(self, server, rank):
        if not server.info.get("aggregated"):
            pairs = {m: redistribute(p, rank, method="prefix") for m, p in server.pairs.items()}
        else:
            # redistribute(g, r, "svd") is the rank-r prefix of redistribute(g, m, "svd") bit for bit
            # (same SVD, balanced_pair keeps the first r slots), so one SVD per module serves every rank.
            if "svd" not in server.cache:
                server.cache["svd"] = {m: redistribute(p, p.rank, method="svd") for m, p in server.pairs.items()}
            pairs = {m: redistribute(p, rank, method="prefix") for m, p in server.cache["svd"].items()}
        msg = encode_pairs(pairs)
        msg.update(encode_extras(server.extras))
        return msg

    def aggregate(self, server, uploads, weights):
        decoded = [decode_pairs(u) for u in uploads]
        pairs = {m: aggregate(self.rule, [d[m] for d in decoded], list(weights)) for m in server.shapes}
        return self._next(server, pairs, uploads, weights)


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FedSALoRA, HetLoRA, Replication, FLoRA, FlexLoRA, PreLort)
}


def make_method(name: str, **options) -> Method:
    """A method by name (a key of :data:`METHODS`) with its options."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    return METHODS[name](**options)
