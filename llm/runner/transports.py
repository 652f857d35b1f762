r"""The in-process transports of the round loop (:func:`~.rounds.run_round`): clients one after another, or on
the worker pool.

A transport takes a round's downloads ``{k: Message}`` and returns ``{k: ClientResult or error}``
(:class:`~.rounds.Transport`). Both here run

.. math:: (\text{reply}_k, \text{state}_k) = \text{run\_client}(\text{method}, \text{message}_k,
          \text{state}_k, \text{context}_k)

for each sampled client, from the server's copy of the client's state; a client that raises (or whose worker
died) is the error string ``"client failed: ..."`` and keeps its state. Every random draw of a client comes from
the seed, the round and the client id, so both give the same replies, bit for bit, and the loop settles them in
client order either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..client import ClientContext, run_client
from ..protocol import Message
from .rounds import ClientResult, RoundCall

__all__ = ["Sequential", "Pooled"]


class Sequential:
    """The clients one after another in this process, each with its own context (``contexts()[k]``, built on first
    use: a run whose clients live elsewhere never builds them)."""

    def __init__(self, contexts: Callable[[], Sequence[ClientContext]]):
        self._contexts = contexts

    def __call__(self, downloads: dict[int, Message], call: RoundCall) -> dict[int, ClientResult | str]:
        contexts = self._contexts()
        out: dict[int, ClientResult | str] = {}
        for k, message in downloads.items():
            t0 = time.perf_counter()
            try:
                reply, state, _ = run_client(call.method, message, call.clients.get(k), contexts[k])
            except Exception as err:  # a failing client is a dropped update, not a failed run
                out[k] = f"client failed: {type(err).__name__}: {err}"
            else:
                out[k] = ClientResult(reply, state, time.perf_counter() - t0)
            call.tick(1)
        return out


class Pooled:
    """The clients at once on the worker processes (:class:`~.pool.ClientPool`, ``pool()``, started on first use),
    each worker with its own model and each client's own context; results handed back in client order."""

    def __init__(self, pool: Callable[[], object]):
        self._pool = pool

    def __call__(self, downloads: dict[int, Message], call: RoundCall) -> dict[int, ClientResult | str]:
        tasks = [("train", (call.method.name, message, call.clients.get(k), k)) for k, message in downloads.items()]
        results = self._pool().run(tasks, on_result=lambda _: call.tick(1))
        out: dict[int, ClientResult | str] = {}
        for k, (status, value) in zip(downloads, results, strict=True):
            if status == "ok":
                reply, state, seconds = value
                out[k] = ClientResult(reply, state, seconds)
            else:
                out[k] = f"client failed: {value}"
        return out
