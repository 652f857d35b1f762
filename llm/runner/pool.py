r"""Clients in parallel in one run: a pool of worker processes, each with its own copy of the model (``workers``).

The in-process runner trains a round's clients one after another on one workspace. With ``workers = N > 1``
it hands them to :class:`ClientPool`: ``N`` processes, each holding the run's model (built once per process
by :func:`~lowrank_fed.llm.federation.build_model`, from the same seed, so the same weights) and the contexts of
the clients it has served (built by :func:`~lowrank_fed.llm.federation.build_client` from each client's own rows,
kept for later rounds). A task is what a client does in a round,

.. math:: (\text{reply}_k, \text{state}_k) = \text{run\_client}(\text{method}, \text{message}_k,
          \text{state}_k, \text{context}_k),

or the scores of one model on one split (evaluation). Every random draw of a client comes from the run's seed,
the round and the client id (:mod:`~lowrank_fed.llm.streams`), never from the process or from the clients it ran
before, and each worker runs torch with ``threads`` threads as the sequential runner does; so a task's result is
the same tensor, bit for bit, whichever worker computes it and in whatever order. :meth:`ClientPool.run` returns
the results in the order of the tasks, so the runner checks, attacks and aggregates the replies in client order
(the float sums of an aggregation in one fixed order) and every output equals that of ``workers = 1``.

Why processes from a *forkserver*: threads would share one workspace (one set of LoRA parameters) and the
interpreter lock; ``fork`` copies a parent whose torch may already run OpenMP / intra-op threads, and a child
forked from a multi-threaded process can deadlock on a lock held by a thread that does not exist in it. The
forkserver is a small single-threaded process started once (torch imported there before any thread exists);
each worker is forked from it, so starting one costs milliseconds instead of ``spawn``'s fresh interpreter and
torch import (seconds), and a pool rebuilt after a worker died, or a second run in one process, starts fast.

A worker that dies (killed, a segfault, the kernel's out-of-memory killer) is a client that sent no reply:
:meth:`ClientPool.run` returns ``("died", why)`` for the task it held, starts a new worker in its place, and the
other tasks go on; the runner drops that update as it drops a client that raised (``UpdateDroppedWarning``,
``dropped`` in ``metrics.jsonl``), as Flower does for a node that did not answer. An exception inside a task
(a ``MemoryError`` included) leaves the worker alive and comes back as ``("error", "Type: message")``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import signal
import time
import weakref
from multiprocessing.connection import wait

__all__ = ["ClientPool", "WORKER_EXIT_ENV", "START_METHOD"]

#: The start method of the worker processes (see the module docstring).
START_METHOD = "forkserver"

#: Fault injection for tests: ``"<method>:<round>:<client>"`` makes the worker that trains that client exit at
#: once (``os._exit``), as a process killed mid-round would; read from the runner's environment when the pool
#: starts. Unused by the sequential runner (``workers = 1``), where the client is the runner itself.
WORKER_EXIT_ENV = "LOWRANK_FED_WORKER_EXIT"

_EXIT_STATUS = 70  # what a worker told to exit by WORKER_EXIT_ENV exits with


def _exit_text(code: int | None) -> str:
    """A dead process's exit code in words (``signal 9 (SIGKILL)``, ``exit status 70``)."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class _Worker:
    r"""The state of one worker process: the model, a data source, client contexts and methods, built on demand."""

    def __init__(self, setup: dict):
        import torch
        from threadpoolctl import threadpool_limits

        from ..config import RunConfig
        from ..federation import Shared, build_model
        from ..sites import open_source

        self.cfg = cfg = RunConfig.from_dict(setup["config"])
        torch.set_num_threads(cfg.threads)
        self._blas = threadpool_limits(limits=cfg.threads)  # one BLAS thread per torch thread, kept for the process
        self.exit_at = setup["exit_at"]
        self.shared = Shared.from_json(setup["shared"])
        self.source = open_source(cfg)
        self.model = build_model(cfg, self.shared, len(self.source.label_names), setup["reference_rank"])
        self.contexts: dict[int, object] = {}
        self.methods: dict[str, object] = {}
        self.encoded: dict[str, dict] = {}

    def context(self, k: int):
        from ..federation import build_client

        if k not in self.contexts:
            self.contexts[k] = build_client(self.cfg, k, shared=self.shared, source=self.source, model=self.model)
        return self.contexts[k]

    def method(self, name: str):
        from ..methods import make_method

        if name not in self.methods:
            self.methods[name] = make_method(name, **self.cfg.method_options.get(name, {}))
        return self.methods[name]

    def split(self, name: str) -> dict:
        """The server's ``"test"`` or ``"val"`` split, encoded as :meth:`Simulation.setup` encodes it."""
        from ..federation import encode_examples, source_plan

        if name not in self.encoded:
            if name == "test":
                examples = self.source.test
            else:
                _, val_rows, _ = source_plan(self.cfg, self.source)
                examples = self.source.examples(val_rows)
            self.encoded[name] = encode_examples(self.model.tokenizer, examples, self.cfg.max_length)
        return self.encoded[name]

    def train(self, name: str, message, state, k: int):
        """``run_client`` for client ``k``: ``(reply, state, seconds)``."""
        from ..client import run_client

        if self.exit_at == f"{name}:{int(message.config['round'])}:{k}":
            os._exit(_EXIT_STATUS)
        start = time.perf_counter()
        reply, state, _ = run_client(self.method(name), message, state, self.context(k))
        return reply, state, time.perf_counter() - start

    def score(self, model, split: str, rows) -> dict:
        """The per-example scores of ``model`` (a :class:`~lowrank_fed.llm.methods.Model`) on ``split``'s ``rows``."""
        from ..evaluate import score_encoded

        ws = self.model.workspace
        ws.set_base(model.base)
        ws.load(model.pairs, model.extras)
        return score_encoded(ws.peft, self.split(split), rows, self.source.task)


def _send(conn, obj) -> None:
    """``obj`` down the pipe as plain pickle bytes: tensors are copied, as on a wire (``Connection.send`` would
    move them to shared memory, torch's reduction for multiprocessing, which the receiver could then write)."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _serve(conn, setup: dict) -> None:
    """A worker's main: build the model, then answer tasks until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle; it stops the workers
    os.environ.clear()
    os.environ.update(setup["env"])  # the runner's, not the forkserver's (started earlier, perhaps elsewhere)
    try:
        worker = _Worker(setup)
    except Exception as err:  # the runner built the same model and data: a bug or the machine, not a client
        _send(conn, ("failed", f"{type(err).__name__}: {err}"))
        return
    _send(conn, ("ready", None))
    while True:
        try:
            task = _recv(conn)
        except (EOFError, OSError):
            return
        if task is None:
            return
        kind, args = task
        try:
            result = ("ok", getattr(worker, kind)(*args))
        except Exception as err:  # a failing task is the client's failure, not the worker's (MemoryError included)
            result = ("error", f"{type(err).__name__}: {err}")
        _send(conn, result)


def _stop(procs: list, conns: list) -> None:
    """Ask every live worker to stop, then end those that do not within a few seconds."""
    for conn in conns:
        if conn is not None:
            try:
                _send(conn, None)
            except OSError:
                pass
    for proc in procs:
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    for conn in conns:
        if conn is not None:
            conn.close()


class ClientPool:
    r"""``workers`` processes that run a round's clients (and evaluation's scores) in parallel.

    Parameters
    ----------
    config : RunConfig
        The run's config (each worker validates it again, and runs with ``config.threads`` torch threads).
    shared : Shared
        What every client needs from the server (:class:`~lowrank_fed.llm.federation.Shared`).
    workers : int
        Processes, at least 1. They start on the first :meth:`run`.
    reference_rank : int
        The run's largest client rank (``build_model``'s ``reference_rank``), as the server's model has it.

    Tasks are ``("train", (method_name, message, client_state, k))`` and ``("score", (model, split, rows))``;
    :meth:`run` returns, in the order of the tasks, ``("ok", value)``, ``("error", "Type: message")`` or
    ``("died", why)``.
    """

    def __init__(self, config, shared, workers: int, reference_rank: int):
        if workers < 1:
            raise ValueError(f"A client pool needs at least 1 worker. Got workers = {workers}.")
        self.workers = workers
        self._setup = {"config": config.to_dict(), "shared": shared.to_json(), "env": dict(os.environ),
                       "exit_at": os.environ.get(WORKER_EXIT_ENV), "reference_rank": int(reference_rank)}
        self._ctx = multiprocessing.get_context(START_METHOD)
        # imported once in the forkserver (before it has any thread), not again in each worker; ignored once it runs
        self._ctx.set_forkserver_preload(["torch", "lowrank_fed.llm.federation", "lowrank_fed.llm.client",
                                          "lowrank_fed.llm.runner.pool"])
        self._procs: list = [None] * workers
        self._conns: list = [None] * workers
        self.restarts = 0  # workers started again after one died
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)

    def _start(self, i: int) -> None:
        if self._procs[i] is not None:  # a dead worker: gone, replaced
            self._procs[i].join(timeout=5)
            self._conns[i].close()
            self.restarts += 1
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self._setup), daemon=True,
                                 name=f"lowrank-fed worker {i}")
        proc.start()
        child.close()
        self._procs[i], self._conns[i] = proc, parent

    def _check_start(self, i: int) -> None:
        """Raise the error a worker sent if it could not start (it then exits)."""
        try:
            message = _recv(self._conns[i]) if self._conns[i].poll() else None
        except (EOFError, OSError):
            return
        if message is not None and message[0] == "failed":
            raise RuntimeError(f"A worker process could not start: {message[1]}")

    def run(self, tasks: list[tuple[str, tuple]], on_result=None) -> list[tuple[str, object]]:
        r"""Run ``tasks`` on the workers; their results in the order of ``tasks``.

        ``on_result(index)`` is called as each task finishes (in finishing order: progress bars). A worker that
        dies takes its task with it (``("died", "worker process died (signal 9 (SIGKILL))")``) and is replaced
        before the next task goes to it.

        Raises
        ------
        RuntimeError
            A worker could not build its model or data (it says why); the run cannot go on without it.
        """
        results: list = [None] * len(tasks)
        todo = collections.deque(range(len(tasks)))
        busy: dict[int, int] = {}  # worker -> task
        while todo or busy:
            for i in range(self.workers):
                if i in busy or not todo:
                    continue
                if self._procs[i] is None or not self._procs[i].is_alive():
                    self._start(i)
                j = todo.popleft()
                try:
                    _send(self._conns[i], tasks[j])
                except OSError:  # it failed to start (it says why), or died between tasks: start another
                    self._check_start(i)
                    self._start(i)
                    try:
                        _send(self._conns[i], tasks[j])
                    except OSError:
                        self._check_start(i)
                        raise RuntimeError(f"A worker process exited as it started "
                                           f"({_exit_text(self._procs[i].exitcode)}).") from None
                busy[i] = j
            ready = wait([self._conns[i] for i in busy] + [self._procs[i].sentinel for i in busy])
            for i, j in list(busy.items()):
                conn, proc = self._conns[i], self._procs[i]
                if conn not in ready and proc.sentinel not in ready:
                    continue
                try:
                    results[j] = _recv(conn) if conn.poll() else None
                except (EOFError, OSError):
                    results[j] = None
                if results[j] is not None and results[j][0] == "ready":  # started; its task's result comes next
                    results[j] = None
                    continue
                if results[j] is not None and results[j][0] == "failed":
                    raise RuntimeError(f"A worker process could not start: {results[j][1]}")
                if results[j] is None:
                    if proc.is_alive() and proc.sentinel not in ready:
                        continue
                    proc.join(timeout=5)
                    results[j] = ("died", f"worker process died ({_exit_text(proc.exitcode)})")
                del busy[i]
                if on_result is not None:
                    on_result(j)
        return results

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()
