r"""The server's round: sampling, downloads, reply checks, aggregation, the metrics row; one loop over a transport.

A round ``t`` of a method is, whatever carries the messages:

1. :func:`configure_round`: the clients of round ``t`` (:func:`~lowrank_fed.llm.federation.sample_clients`) and
   each one's download ``method.configure(server, k)``, in client order, with the row each client gets in
   ``metrics.jsonl``;
2. a **transport** carries the downloads ``{k: Message}`` to the clients and returns ``{k: ClientResult or
   error}``: in process one after another or on the worker pool (:mod:`.transports`), on Flower's simulation or
   deployment (:class:`~lowrank_fed.llm.flower.engine.FlowerTransport`);
3. :func:`settle_round`: each reply, in client order, through :func:`accept_reply` (check, score, attack, fault,
   row), then :func:`aggregate_round` on the replies kept.

:func:`run_round` is that loop; the in-process runner and the Flower engine call it with their transport, and
the Flower ``Strategy`` (:class:`~lowrank_fed.llm.flower.strategy.LowRankStrategy`) calls the same
:func:`configure_round` and :func:`settle_round` from its ``configure_train`` / ``aggregate_train``. A reply is
therefore checked, dropped, counted and aggregated the same way on every transport, and for one config and seed
the new server state is the same tensor whichever transport carried the round: every function here reads only
its arguments, and the replies are settled in client order (the float sums of an aggregation in one order).
:func:`round_row` builds a round's ``metrics.jsonl`` row, the one place that does.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..attacks import attack_reply, attackers_at
from ..config import RunConfig
from ..federation import sample_clients
from ..methods import ClientState, Method, ServerState
from ..methods.exactness import aggregation_errors, error_fields
from ..protocol import Message
from ..training import prefix_shares

__all__ = ["UpdateDroppedWarning", "ClientResult", "RoundCall", "RoundResult", "Transport", "configure_round",
           "accept_reply", "aggregate_round", "settle_round", "run_round", "round_row", "fault_kind", "corrupt",
           "evaluated", "mean", "mean_shares"]

log = logging.getLogger("lowrank_fed.llm")


class UpdateDroppedWarning(UserWarning):
    """A client reply was rejected (NaN/Inf, wrong shape or rank) and left out of the aggregation."""


def warn_dropped(msg: str) -> None:
    """Say ``msg`` once: an :class:`UpdateDroppedWarning`, and the same line in the log only where a handler shows
    it (Flower's log stream in the ServerApp); without one, logging's last-resort handler would print it again."""
    warnings.warn(msg, UpdateDroppedWarning, stacklevel=4)
    if log.hasHandlers():
        log.warning(msg)


class ClientResult(NamedTuple):
    """What a transport hands back for a client that answered.

    ``state`` is the client's new state (None: the transport did not carry it back, the server's copy is kept);
    ``seconds`` the client's wall time as the transport measured it (None where it cannot: Flower).
    """

    reply: Message
    state: ClientState | None
    seconds: float | None = None


@dataclass
class RoundCall:
    """What a transport may read besides the downloads: the method, the round, the server's state and its copy of
    each client's state (``clients``), and ``tick(n)`` to advance a progress bar by ``n`` clients."""

    method: Method
    round: int
    server: ServerState
    clients: dict[int, ClientState]
    tick: Callable[[int], None] = lambda n: None


class Transport(Protocol):
    r"""Carries one round's downloads to the clients: ``transport(downloads, call) -> {k: ClientResult | str}``.

    The result has one entry per download: a :class:`ClientResult`, or a string saying why the client sent no
    reply (it raised, its node was lost, ...), which drops its update. Optional attributes, read with defaults:
    ``min_replies`` (replies a round needs to be aggregated; 1), ``round_times()`` (extra timings of the last
    round; ``{}``) and ``settled(call, result)`` (told the settled :class:`RoundResult`). A plain function is a
    transport.
    """

    def __call__(self, downloads: dict[int, Message], call: RoundCall) -> Mapping[int, ClientResult | str]: ...


@dataclass
class RoundResult:
    """A settled round: the new server state, the per-client rows, the replies kept and the round's counts."""

    server: ServerState
    rows: list[dict]
    kept: dict[int, Message]
    aggregated: bool
    times: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict:
        """``replies`` (kept after the checks), ``dropped`` and ``aggregated`` (1, or 0: the global state kept)."""
        return {"replies": len(self.kept), "dropped": sum(r["dropped"] for r in self.rows),
                "aggregated": int(self.aggregated)}


def mean(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def mean_shares(shares) -> dict[str, float | None]:
    """Per level ``t``: the mean of the clients' prefix shares at ``t`` (those that have the level and a share)."""
    by_level: dict[str, list] = {}
    for share in shares:
        for t, value in (share or {}).items():
            by_level.setdefault(t, []).append(value)
    return {t: mean(by_level[t]) for t in sorted(by_level, key=int)}


# ----------------------------------------------------------------------------- downloads


def configure_round(method: Method, server: ServerState, cfg: RunConfig,
                    round_: int) -> tuple[dict[int, Message], dict[int, dict]]:
    """The clients of round ``round_`` and their downloads ``method.configure(server, k)``, in client order, with
    each one's row (``client``, ``rank``, ``bytes_down``, ``dropped``)."""
    downloads, rows = {}, {}
    for k in sample_clients(cfg, round_):
        message = method.configure(server, k)
        downloads[k] = message
        rows[k] = {"client": k, "rank": int(message.config["rank"]), "bytes_down": message.nbytes, "dropped": False}
    return downloads, rows


# ----------------------------------------------------------------------------- reply checks


def fault_kind(cfg: RunConfig, method: str, round_: int, k: int) -> str | None:
    """The ``[[faults]]`` entry's kind for ``(method, round_, k)``, or None."""
    for f in cfg.faults:
        if f.round == round_ and f.client == k and (f.method is None or f.method == method):
            return f.kind
    return None


def corrupt(reply: Message, kind: str) -> Message:
    """The reply with one entry made NaN/Inf, or one tensor a column short; unchanged if it uploads nothing (``local``)."""
    if not reply.arrays:
        return reply
    key = sorted(reply.arrays)[0]
    arrays = dict(reply.arrays)
    t = arrays[key]
    if kind == "shape":
        arrays[key] = t[..., :-1].clone() if t.shape[-1] > 1 else torch.cat([t, t], dim=-1)
    else:
        t = t.clone()
        t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
        arrays[key] = t
    return Message(arrays, dict(reply.config), dict(reply.metrics))


def evaluated(cfg: RunConfig, round_: int) -> bool:
    """Whether round ``round_`` is scored (every ``eval_every`` rounds and the last)."""
    return round_ % cfg.eval_every == 0 or round_ == cfg.rounds


def accept_reply(method: Method, server: ServerState, round_: int, k: int, reply: Message | None,
                 error: str | None, row: dict, *, cfg: RunConfig, attackers: Mapping, ranks: list[int],
                 score_upload: Callable | None = None) -> tuple[Message | None, float]:
    r"""Check client ``k``'s reply; return ``(reply to aggregate or None, seconds spent scoring the upload)``.

    The reply as the client sent it must pass :meth:`Method.check_reply`; only then is it scored (option
    ``score_uploads``: ``score_upload(method, server, k, reply)``, the client's own model, before any attack),
    given the configured attack (``attackers[k]`` from its ``from_round`` on,
    :func:`~lowrank_fed.llm.attacks.attack_reply`) and fault (``[[faults]]``) and, if they changed it, checked
    again. A reply that fails a check, or no reply at all (``reply`` None: the client raised, or its node did not
    answer or sent a reply that cannot be decoded; ``error`` says why), sets ``row["dropped"]`` and ``row["reason"]`` and gives an :class:`UpdateDroppedWarning`;
    the first value returned is then None. ``row`` also gets what the reply carries (examples, loss, bytes up,
    ...; ``prefix_share`` at the levels of the federation's ``ranks``). The second value is the time spent
    scoring the upload: evaluation, not server work (callers subtract it).
    """

    def complaint(reply: Message) -> str | None:
        try:
            method.check_reply(server, k, reply)
        except ValueError as err:
            return str(err)
        except TypeError as err:  # a value of the wrong type (a reply off the wire)
            return f"{type(err).__name__}: {err}"
        return None

    eval_s = 0.0
    if reply is not None:
        error = complaint(reply)  # the reply as sent: nothing malformed is scored, attacked or aggregated
        if error is None and cfg.score_uploads and score_upload is not None and evaluated(cfg, round_):
            start = time.perf_counter()
            row.update(score_upload(method, server, k, reply))  # the client's own model, before any attack
            eval_s = time.perf_counter() - start
        sent = reply
        if k in attackers_at(attackers, round_):
            row["attack"] = attackers[k].kind
            if error is None:
                reply = attack_reply(reply, attackers[k], seed=cfg.seed, round_=round_, client=k)
        kind = fault_kind(cfg, method.name, round_, k)
        if kind and error is None:
            reply = corrupt(reply, kind)
        m = reply.metrics
        row.update(n=reply.config.get("num_examples"), train_loss=m.get("train_loss"),
                   train_accuracy=m.get("train_accuracy"), bytes_up=reply.nbytes,
                   params_up=m.get("params_up"), steps=m.get("steps"),
                   prefix_share=prefix_shares(m.get("prefix_energy"), ranks))
        if error is None and reply is not sent:
            error = complaint(reply)
    else:
        row.update(n=None, train_loss=None, train_accuracy=None, bytes_up=0, params_up=0, steps=0,
                   prefix_share=None)
    if error is None:
        if reply.config["rank"] != row["rank"]:
            row["new_rank"] = int(reply.config["rank"])
        if cfg.sites and cfg.sites[k].weight is not None:  # the table's weight, not the reply's num_examples
            reply = Message(reply.arrays, {**reply.config, "weight": float(cfg.sites[k].weight)}, reply.metrics)
        return reply, eval_s
    row["dropped"], row["reason"] = True, error
    warn_dropped(f"{method.title}, round {round_}, client {k}: update dropped ({error})")
    return None, eval_s


def aggregate_round(method: Method, server: ServerState, replies: dict[int, Message], round_: int,
                    *, min_replies: int = 1) -> ServerState:
    r"""``method.aggregate(server, replies)``; with fewer than ``min_replies`` replies, the global state kept.

    In the runner ``min_replies`` is 1 (a round with no reply left); the Flower strategy passes its own. A
    round that keeps the global state gives an :class:`UpdateDroppedWarning` saying why: every update was
    dropped, or too few were kept. The in-process loop and the Flower strategy both call this one function.

    The new state's ``cache["aggregation_error"]`` holds the round's exactness per module
    (:func:`~lowrank_fed.llm.methods.exactness.aggregation_errors`; None for a method without a global adapter).
    """
    if replies and len(replies) >= min_replies:
        new = method.aggregate(server, replies)
        # how far the global adapter is from the exact weighted mean of what the clients trained
        new.cache["aggregation_error"] = aggregation_errors(method, server, replies, new)
        return new
    why = ("every update was dropped" if not replies else
           f"{len(replies)} update{'s' if len(replies) > 1 else ''} kept, fewer than min_replies = {min_replies}")
    warn_dropped(f"{method.title}, round {round_}: {why}; the global state is kept.")
    return ServerState(server.round + 1, server.pairs, server.extras, server.shapes, server.ranks,
                       server.arrays, server.info)


def settle_round(method: Method, server: ServerState, round_: int, rows: dict[int, dict],
                 results: Mapping[int, ClientResult | str], clients: dict[int, ClientState], *, cfg: RunConfig,
                 attackers: Mapping, ranks: list[int], score_upload: Callable | None = None,
                 min_replies: int = 1) -> RoundResult:
    r"""Every sampled client's result through :func:`accept_reply`, in client order, then :func:`aggregate_round`.

    A :class:`ClientResult` whose ``state`` is not None replaces ``clients[k]`` (the server's copy); a string
    result (no reply) keeps the client's previous state. When fewer than ``min_replies`` replies are kept, the
    rows of the kept clients say ``"aggregated": false``. ``times`` of the result: ``server_seconds`` (checks and
    aggregation, upload scoring excluded), ``aggregate_seconds``, ``train_seconds``, ``probe_seconds`` and
    ``client_overhead_seconds`` (the clients' own seconds less training, where the transport measured them).
    """
    kept: dict[int, Message] = {}
    server_s = client_s = train_s = probe_s = 0.0
    for k, row in rows.items():
        t0 = time.perf_counter()
        result = results.get(k, "no reply (the transport returned none for this client)")
        if isinstance(result, str):
            reply, error = None, result
        else:
            reply, error = result.reply, None
            if result.state is not None:
                clients[k] = result.state
            m = reply.metrics
            probe_s += m.get("probe_seconds", 0.0)
            train_s += m.get("train_seconds", 0.0)
            if result.seconds is not None:
                client_s += result.seconds - m.get("train_seconds", 0.0)
        accepted, eval_s = accept_reply(method, server, round_, k, reply, error, row, cfg=cfg, attackers=attackers,
                                        ranks=ranks, score_upload=score_upload)
        if accepted is not None:
            kept[k] = accepted
        server_s += time.perf_counter() - t0 - eval_s  # scoring the upload is evaluation, not server work
    t0 = time.perf_counter()
    new = aggregate_round(method, server, kept, round_, min_replies=min_replies)
    aggregate_s = time.perf_counter() - t0
    aggregated = bool(kept) and len(kept) >= min_replies
    if not aggregated:
        for row in rows.values():
            if row["client"] in kept:
                row["aggregated"] = False  # passed the checks, but the round kept the global state
    times = {"server_seconds": server_s + aggregate_s, "aggregate_seconds": aggregate_s,
             "client_overhead_seconds": client_s, "train_seconds": train_s, "probe_seconds": probe_s}
    return RoundResult(new, list(rows.values()), kept, aggregated, times)


# ----------------------------------------------------------------------------- the loop


def run_round(method: Method, server: ServerState, clients: dict[int, ClientState], round_: int,
              transport: Transport, *, cfg: RunConfig, attackers: Mapping, ranks: list[int],
              score_upload: Callable | None = None, tick: Callable[[int], None] | None = None):
    r"""One round over ``transport``: :func:`configure_round`, the transport, :func:`settle_round`.

    Returns ``(server, clients, rows, times)``: the new server state, the server's copy of the clients' states
    (``clients``, updated in place), the per-client rows in client order and the round's timings (those of
    :func:`settle_round`, the transport's ``round_times()``, and the configuration in ``server_seconds``). Where a
    transport cannot time its clients (every ``seconds`` None), ``client_overhead_seconds`` is the transport's
    wall time less the clients' training.
    """
    t0 = time.perf_counter()
    downloads, rows = configure_round(method, server, cfg, round_)
    configure_s = time.perf_counter() - t0
    call = RoundCall(method, round_, server, clients, tick or (lambda n: None))
    t1 = time.perf_counter()
    results = transport(downloads, call) if downloads else {}
    wall = time.perf_counter() - t1
    result = settle_round(method, server, round_, rows, results, clients, cfg=cfg, attackers=attackers,
                          ranks=ranks, score_upload=score_upload, min_replies=getattr(transport, "min_replies", 1))
    times = result.times
    times["server_seconds"] += configure_s
    answered = [r for r in results.values() if not isinstance(r, str)]
    if answered and all(r.seconds is None for r in answered):
        times["client_overhead_seconds"] = max(wall - times["train_seconds"], 0.0)
    round_times = getattr(transport, "round_times", None)
    if round_times is not None:
        times.update(round_times())
    settled = getattr(transport, "settled", None)
    if settled is not None:
        settled(call, result)
    return result.server, clients, result.rows, times


def round_row(name: str, round_: int, server: ServerState, rows: list[dict], *, clients: int,
              scores: dict | None = None) -> dict:
    r"""A round's ``metrics.jsonl`` row: its scores, then the sums over its clients' rows.

    ``bytes_up``, ``bytes_down``, ``params_up`` and ``dropped`` are sums over ``rows``; ``train_loss`` the mean of
    the clients' losses (None if none); ``prefix_share`` the per-level mean (:func:`mean_shares`); ``ranks`` each
    client's rank after the round; ``clients`` the rows themselves; ``aggregation_error`` (and per module) the
    round's exactness, where the round aggregated and the method has a global adapter.
    """
    row = {"method": name, "round": round_, **(scores or {})}
    row.update(bytes_up=sum(r["bytes_up"] for r in rows), bytes_down=sum(r["bytes_down"] for r in rows),
               params_up=sum(r["params_up"] or 0 for r in rows), dropped=sum(r["dropped"] for r in rows),
               train_loss=mean(r["train_loss"] for r in rows),
               prefix_share=mean_shares(r["prefix_share"] for r in rows),
               ranks=[server.ranks[k] for k in range(clients)], clients=rows)
    row.update(error_fields(server.cache.get("aggregation_error")))
    return row
