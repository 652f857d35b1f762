r"""``lowrank-fed run --engine flower``: the runner's round loop with Flower as its transport.

:class:`FlowerSimulation` is the runner (:class:`~lowrank_fed.llm.runner.simulation.Simulation`: set-up, the round
loop of :mod:`~lowrank_fed.llm.runner.rounds`, evaluation, ``metrics.jsonl``, checkpoints every round, ``--resume``,
reports) given :class:`FlowerTransport`: a round's downloads go to Flower SuperNodes through a Flower ``Grid``
(:class:`.LowRankStrategy` builds the messages and decodes the replies) and the loop settles the replies with the
same functions as in process. Everything the runner writes is written the same way, so a run on Flower and an
in-process run of one config give the same adapters and metrics (only ``timings.jsonl`` differs).

:meth:`FlowerSimulation.run` starts Flower's Simulation Runtime (Ray backend): ``clients`` virtual SuperNodes,
each client's ``ClientApp`` given ``threads`` CPUs (``num_gpus`` GPUs), the ``ServerApp`` in a thread of this
process. :meth:`FlowerSimulation.serve` is the ``ServerApp``'s body, also used by ``flwr run .`` and
``lowrank-fed flower up`` (:mod:`.server_app`).

Environment (:func:`flower_environment`, the one place that decides it; :func:`flower_env` sets it in this
process, ``lowrank-fed flower up`` gives it to the processes it starts): ``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, ``RAY_USAGE_STATS_ENABLED=0``;
``FLWR_HOME``, ``RAY_TMPDIR``, ``MPLCONFIGDIR`` and ``XDG_CACHE_HOME`` in ``<run folder>/.flower/`` (Ray's socket
paths must stay under 107 bytes: a run folder whose path is too long gets a short temporary ``RAY_TMPDIR``
instead, removed afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lowrank_fed.cholesky_qr import one_blas_thread

from ..runner.simulation import Simulation
from .settings import FlowerSettings, split_run_config

__all__ = ["FlowerSettings", "FlowerSimulation", "FlowerTransport", "flower_environment", "flower_env",
           "split_run_config", "ENV"]

log = logging.getLogger("lowrank_fed.llm.flower")

#: Environment every Flower process of a run gets (no telemetry, no update check, no package installs).
# RAY_worker_niceness: Ray starts its workers (the ClientApps) at nice 15, so any other busy process on the
# machine (a second pytest worker, another run) starves them and the nodes miss the start-up timeout.
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_worker_niceness": "0"}
_RAY_TMP_MAX = 40  # characters: Ray appends ~60 to this for its AF_UNIX sockets (limit 107)
_SERVER_JOIN = 60.0  # seconds the end of run() waits for the ServerApp thread (it may be evaluating)


@contextlib.contextmanager
def flower_environment(folder: str | Path) -> Iterator[dict[str, str]]:
    r"""The environment of a run's Flower processes: :data:`ENV` and their folders in ``folder/.flower``.

    Yields ``{name: value}``: :data:`ENV`, ``FLWR_HOME`` (``.flower/home``), ``RAY_TMPDIR`` (``.flower/ray``),
    ``MPLCONFIGDIR`` (``.flower/matplotlib``) and ``XDG_CACHE_HOME`` (``.flower/cache``), each folder created.
    Ray's AF_UNIX socket paths must stay under 107 bytes: when ``.flower/ray`` is longer than
    ``_RAY_TMP_MAX`` characters, ``RAY_TMPDIR`` is a short temporary folder instead, removed when the block ends.
    Changes nothing in this process (:func:`flower_env` does).
    """
    base = Path(folder).resolve() / ".flower"
    paths = {"FLWR_HOME": base / "home", "RAY_TMPDIR": base / "ray", "MPLCONFIGDIR": base / "matplotlib",
             "XDG_CACHE_HOME": base / "cache"}
    short = None
    if len(str(paths["RAY_TMPDIR"])) > _RAY_TMP_MAX:
        short = tempfile.mkdtemp(prefix="lrf-ray-")
        paths["RAY_TMPDIR"] = Path(short)
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    try:
        yield {**ENV, **{k: str(v) for k, v in paths.items()}}
    finally:
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


@contextlib.contextmanager
def flower_env(folder: str | Path) -> Iterator[dict[str, str]]:
    r"""Set :func:`flower_environment`'s variables in this process for the block; restore them after.

    Yields the dict of variables set. ``PYTHONPATH`` (which Ray's start-up extends) is restored too.
    """
    with flower_environment(folder) as values:
        saved = {k: os.environ.get(k) for k in (*values, "PYTHONPATH")}
        os.environ.update(values)
        try:
            yield values
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class FlowerTransport:
    r"""The round loop's transport over a Flower ``Grid`` (:class:`~lowrank_fed.llm.runner.rounds.Transport`).

    A round's downloads go out as :meth:`.LowRankStrategy.messages`, Flower carries them to the SuperNodes and
    back (``grid.send_and_receive``), and the replies come back decoded by :meth:`.LowRankStrategy.collect`:
    ``{client: ClientResult or why it sent none}``. The loop then settles the round with the runner's functions
    (the ones :meth:`.LowRankStrategy.aggregate_train` calls) and hands the result back to the strategy
    (:meth:`settled`). Replies wait ``round_timeout`` seconds, the first round ``round_timeout + start_timeout``
    (each node's first ClientApp also loads the model and its data).
    """

    def __init__(self, settings: FlowerSettings):
        self.settings = settings
        self.strategy = None
        self.grid = None
        self.rounds_run = 0  # rounds carried (the first one waits longer: cold ClientApps)
        self._wall = 0.0

    @property
    def min_replies(self) -> int:
        return self.settings.min_replies

    def round_timeout(self) -> float:
        """Seconds the next round waits for replies: ``round_timeout``, plus ``start_timeout`` for the first."""
        return self.settings.round_timeout + (self.settings.start_timeout if self.rounds_run == 0 else 0.0)

    def __call__(self, downloads, call):
        st = self.strategy
        if st.method is not call.method:
            st.begin(call.method, call.server, call.clients)
        st.server, st.clients = call.server, call.clients
        t0 = time.perf_counter()
        messages = st.messages(downloads, call.round, self.grid)
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout()) if messages else []
        self.rounds_run += 1
        results = st.collect(call.round, replies)
        self._wall = time.perf_counter() - t0
        call.tick(len(downloads))
        return results

    def round_times(self) -> dict:
        return {"flower_round_seconds": self._wall}

    def evaluate_sites(self, requests):
        """Federated evaluation: the requests to the sites' nodes, their answers
        (:meth:`.LowRankStrategy.evaluate_sites`; each waits ``round_timeout``, plus ``start_timeout`` before the
        first round: cold ClientApps)."""
        return self.strategy.evaluate_sites(requests, self.grid, timeout=self.round_timeout())

    def settled(self, call, result) -> None:
        self.strategy.settled(result)


def _forwarded(name: str) -> property:
    """An attribute of the runner, read and written through the :class:`FlowerSimulation`."""
    return property(lambda self: getattr(self.runner, name), lambda self, value: setattr(self.runner, name, value),
                    doc=f"The runner's ``{name}``.")


class FlowerSimulation:
    r"""A run whose rounds' clients are Flower SuperNodes (see the module docstring).

    The runner (:class:`~lowrank_fed.llm.runner.simulation.Simulation`, :attr:`runner`: set-up, the round loop,
    evaluation, checkpoints, reports) with :class:`FlowerTransport` as its transport; every other attribute
    (``cfg``, ``ranks``, ``federation``, ``setup``, ``evaluate``, ...) is the runner's.

    Parameters
    ----------
    config, out_dir, progress, on_round_end
        As :class:`~lowrank_fed.llm.runner.simulation.Simulation`.
    settings : FlowerSettings, optional
    stop : threading.Event, optional
        Once set, :meth:`serve` raises :class:`RunStopped` at its next exchange with the nodes (it writes nothing
        more). :meth:`run` sets its own when the command ends; the ServerApp sets one when its SuperExec is gone.
    """

    on_round_end = _forwarded("on_round_end")
    score_upload = _forwarded("score_upload")

    def __init__(self, config, out_dir, *, progress: bool = True, on_round_end=None,
                 settings: FlowerSettings | None = None, stop=None):
        self.settings = settings or FlowerSettings()
        self.transport = FlowerTransport(self.settings)
        self.runner = Simulation(config, out_dir, progress=progress, on_round_end=on_round_end,
                                 transport=self.transport)
        self.grid = None
        self.strategy = None
        self.summary = None
        self.startup_seconds = None  # Flower's start-up: from run() to the ServerApp's first line
        self._stop = stop  # once set, serve() stops at its next exchange with the nodes (RunStopped)

    def __getattr__(self, name):
        if name == "runner":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.runner, name)

    # ------------------------------------------------------------------ the ServerApp's body
    def serve(self, grid, *, resume: bool = False) -> list[dict]:
        r"""Run every method over ``grid`` (the ServerApp's main): wait for the nodes, then the runner's ``run``.

        Raises
        ------
        ValueError
            Before anything is written: the settings do not fit the config (:meth:`FlowerSettings.check`), a node
            that cannot serve the run answered the discovery (its partition-id,
            node count or rank budget does not fit the config), or some client has no SuperNode after
            ``start_timeout`` seconds (the message names the node count and ``clients``).
        """
        from .strategy import LowRankStrategy

        self.settings.check(self.cfg)
        self.setup()
        self.grid = grid if self._stop is None else _StoppableGrid(grid, self._stop)
        grid = self.grid
        settings = self.settings
        st = self.strategy = LowRankStrategy(self.cfg, self.federation, min_replies=settings.min_replies,
                                             query_timeout=settings.round_timeout,
                                             score_upload=lambda *args: self.runner.score_upload(*args))
        self.transport.strategy, self.transport.grid = st, grid
        deadline = time.monotonic() + settings.start_timeout
        while True:
            left = deadline - time.monotonic()
            st.discover(grid, timeout=min(settings.round_timeout, max(left, 1.0)), strict=True)
            missing = sorted(set(range(self.cfg.clients)) - set(st.nodes))
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if missing:
            n = len(list(grid.get_node_ids()))
            raise ValueError(
                f"The run has clients = {self.cfg.clients}, one SuperNode each, but after flower-start-timeout = "
                f"{settings.start_timeout:g} s only {self.cfg.clients - len(missing)} have one ({n} SuperNode"
                f"{'s' if n != 1 else ''} connected; clients without a node: {missing}). Start one SuperNode per "
                f"client (--node-config partition-id=0..{self.cfg.clients - 1}; in Flower's simulation "
                f"num-supernodes = {self.cfg.clients}) or set 'clients' to the node count. Nothing was written.")
        self.transport.rounds_run = 0
        if self.runner.federated and self.runner.site_sizes is None:  # the sites' set sizes: a request without jobs
            from ..fedeval import request

            self.runner.learn_sites(self.transport.evaluate_sites({k: request([]) for k in range(self.cfg.clients)}))
        self.summary = self.runner.run(resume=resume)
        return self.summary

    # ------------------------------------------------------------------ lowrank-fed run --engine flower
    def run(self, *, resume: bool = False) -> list[dict]:
        r"""Run every method on Flower's Simulation Runtime; return the summary rows (as ``Simulation.run``).

        ``clients`` virtual SuperNodes (``partition-id`` = client id), each ClientApp with ``threads`` CPUs and
        ``settings.num_gpus`` GPUs; the ServerApp (:meth:`serve`) in a thread of this process.

        Every process it starts (Ray's GCS, raylet and workers: they inherit ``LOWRANK_FED_FLOWER=<out>/.flower``)
        is stopped when it returns, however it ends (:mod:`.processes`): an exception, Ctrl-C, SIGTERM or SIGHUP
        (raised as :class:`~.processes.Terminated`; the ServerApp thread stops at its next exchange with the
        nodes and writes nothing more), and, through a watchdog process, SIGKILL of this process.
        """
        import threading
        import warnings

        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        from .client_app import app as client_app
        from .processes import MARK, Terminated, signals_raise, stop_marked, watchdog

        if self.cfg.sites:  # Flower's simulation: every node's file is on this machine; refuse a missing one now
            from ..sites import check_site_paths

            check_site_paths(self.cfg)
        self.setup()
        self.settings.check(self.cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        server_app = ServerApp()
        t0 = time.perf_counter()

        errors: list[BaseException] = []
        servers: list[threading.Thread] = []
        self._stop = threading.Event()

        @server_app.main()
        def main(grid, context):
            servers.append(threading.current_thread())
            self.startup_seconds = time.perf_counter() - t0
            try:
                self.serve(grid, resume=resume)
            except BaseException as err:  # re-raised below: Flower only logs what a ServerApp raises
                errors.append(err)
                raise

        self.summary = None
        backend = {"client_resources": {"num_cpus": self.cfg.threads, "num_gpus": self.settings.num_gpus},
                   "init_args": {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, self.cfg.threads),
                                 "configure_logging": False}}
        folder = (self.out / ".flower").resolve()
        saved = os.environ.get(MARK)
        flwr_log = logging.getLogger("flwr")
        # one_blas_thread here, in the main thread: a limit the ServerApp thread set itself would be ignored
        # (OpenBLAS, see the block), so its aggregation runs on one BLAS thread per module thread as in process;
        # its other server-side linear algebra (CLAIR's detection) runs on one BLAS thread too
        with signals_raise(), flower_env(self.out), watchdog(folder), warnings.catch_warnings(), one_blas_thread(), \
                _log_filter(flwr_log, _OwnerExitFilter()):
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            os.environ[MARK] = str(folder)  # inherited by Ray's processes: the clean-up finds them by it
            try:
                run_simulation(server_app=server_app, client_app=client_app, num_supernodes=self.cfg.clients,
                               backend_config=backend)
            except SystemExit as err:  # Ray's driver turns SIGTERM into sys.exit(SIGTERM)
                if err.code == signal.SIGTERM:
                    # Ray's core worker saw the SIGTERM too (its C++ handler) and aborts the interpreter's
                    # shutdown (exit -6): once the clean-up below is done, the command ends with os._exit.
                    terminated = Terminated(signal.SIGTERM)
                    terminated.hard_exit = True
                    raise terminated from None
                raise
            finally:
                quiet = sys.exc_info()[0] is not None and not flwr_log.disabled
                if quiet:  # stopped early: Flower's workers log a traceback for each ClientApp cut off mid-round
                    flwr_log.disabled = True
                try:
                    self._stop.set()  # the ServerApp thread stops at its next exchange with the nodes
                    for thread in servers:
                        thread.join(timeout=_SERVER_JOIN)
                    _ray_shutdown()
                    stop_marked(folder)
                finally:  # restored even where the clean-up raises
                    if quiet:
                        flwr_log.disabled = False
                    if saved is None:
                        os.environ.pop(MARK, None)
                    else:
                        os.environ[MARK] = saved
        if errors:
            raise RuntimeError(f"The Flower simulation of {self.cfg.name!r} stopped: {type(errors[0]).__name__}: "
                               f"{errors[0]}") from errors[0]
        if self.summary is None:
            raise RuntimeError(f"The Flower simulation of {self.cfg.name!r} ended without finishing its run; "
                               f"see the log above (resume it with --resume {self.out}).")
        return self.summary


class RunStopped(RuntimeError):
    """The command running the ServerApp thread ended (:meth:`FlowerSimulation.run`); nothing more is written."""


class _StoppableGrid:
    r"""``grid`` whose :meth:`send_and_receive` polls (as Flower's does) and raises :class:`RunStopped` once
    ``stop`` is set, so the ServerApp thread ends with its command instead of waiting out a round's timeout."""

    def __init__(self, grid, stop):
        self._grid, self._stop = grid, stop

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        pending = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies = []
        while True:
            if self._stop.is_set():
                raise RunStopped("the command ended; the ServerApp stops")
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (timeout is not None and time.monotonic() >= end):
                return replies
            time.sleep(0.05)


@contextlib.contextmanager
def _log_filter(logger: logging.Logger, log_filter: logging.Filter) -> Iterator[None]:
    """``log_filter`` on ``logger`` for the block, removed however it ends."""
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


class _OwnerExitFilter(logging.Filter):
    """Drops Flower's report of a ClientApp actor that died "because its owner has died" (Ray's
    ``ActorDiedError``): its owner is this process, which is ending. A SIGTERM reaches Ray's core worker before
    the Python handler can quiet Flower's log, so the report is a consequence of the stop, never its cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "because its owner has died" not in record.getMessage()


def _ray_shutdown() -> None:
    with contextlib.suppress(ImportError):
        import ray

        if ray.is_initialized():
            ray.shutdown()
