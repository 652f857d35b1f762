r"""``lowrank-fed flower up CONFIG``: a SuperLink and one SuperNode per client on this machine, one run, shut down.

Usage::

    lowrank-fed flower up [CONFIG.toml] [--supernodes N] [--set key=value ...] [--out DIR] [--overwrite]
                          [--round-timeout S] [--min-replies M] [--start-timeout S] [--timeout S]

What it does, with real processes (``--insecure``: localhost only; docs/flower.md has TLS and node
authentication for real sites):

1. validates the config and the output folder and sets the run up once here (data, model, each client's rank),
   before anything is written, exactly as ``lowrank-fed run`` does;
2. starts ``flower-superlink`` (its Fleet, Control and Runtime APIs share one free port of 127.0.0.1);
3. starts SuperNode ``i = 0..N-1`` (``N = clients``) with ``--node-config "partition-id=i num-partitions=N
   rank=r_i"``: client ``i`` of the run, with the LoRA rank budget the config assigns it;
4. builds a Flower app folder (``<out>/.flower/app``: a ``pyproject.toml`` whose ``[tool.flwr.app.config]`` is
   this run's flat config) and submits it with ``flwr run <app> lowrank-fed --stream``; the ServerApp
   (:mod:`.server_app`) writes ``metrics.jsonl``, ``checkpoints/``, ``adapters/``, ``summary.*`` into ``<out>``
   (``runs/<name>`` by default) as any run;
5. stops every process of the run, however the command ends: normally, on errors, on Ctrl-C, SIGTERM or SIGHUP
   (exit status 130 / 128 + signal), when the run exceeds ``--timeout``, and, through a watchdog process, when
   this command is killed with SIGKILL (:mod:`.processes`).

Processes are found by a marker in their environment, not by a list of ids taken earlier (an id can be reused
once its process exited): every process started here gets ``LOWRANK_FED_FLOWER=<out>/.flower`` and
``LOWRANK_FED_FLOWER_PROCESS=<name>``, and Flower's helpers (SuperExec, the ServerApp and ClientApp processes)
inherit them, also after their parent died. :func:`marked_processes` reads them from ``/proc/<pid>/environ``.

A port is chosen free but released before Flower binds it; a process that exits with "already in use" is started
again on another port.

Logs: ``<out>/.flower/superlink.log``, ``supernode-<i>.log``, ``flwr-run.log``. The same folder holds ``FLWR_HOME``
and the caches (:func:`~.engine.flower_environment`). A folder that holds an earlier (interrupted) run of the same
config is resumed from its checkpoints; ``--overwrite`` empties the folder and starts afresh.

Exit status: 0 done, 2 invalid config, setting or folder (one line on stderr, before anything is written), 3 a
package is missing, 1 the run did not finish, 130 Ctrl-C, 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..outputs import hold_lock, output_path
from .processes import MARK, MARK_PROCESS, Terminated, marked_processes, signals_raise, stop_marked, watchdog

__all__ = ["add_arguments", "main", "up", "LocalFederation", "free_port", "write_app", "marked_processes", "MARK",
           "RUN_TIMEOUT"]

#: Default of ``--timeout``: seconds a whole ``flower up`` run may take before it is stopped (one day).
RUN_TIMEOUT = 24 * 3600.0
_PORT_TRIES = 5


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _listener_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on ``port`` (``/proc/net/tcp``, ``tcp6``); None without such tables."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.exists() for t in tables):
        return None
    inodes = set()
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                cols = line.split()  # sl local_address rem_address st ... inode
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(cols[9])
    return inodes


def _listens(pids: list[int], port: int) -> bool:
    """Whether one of ``pids`` listens on ``port`` (not some other process that took the port); without ``/proc``,
    whether anything listens on it."""
    inodes = _listener_inodes(port)
    if inodes is None:
        return _listening(port)
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in sockets:
                        return True
    return False


def _bin(name: str) -> str:
    """The console script ``name`` of this Python's environment (else from PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def write_app(folder: Path, flat_config: dict) -> Path:
    r"""A Flower app folder for ``flwr run``: ``pyproject.toml`` naming this package's ServerApp and ClientApp.

    ``[tool.flwr.app.config]`` is ``flat_config`` (the run's flat config and ``flower-*`` settings). The folder
    holds no code: the ServerApp and ClientApps import the installed ``lowrank_fed``.
    """
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    project = {"project": {"name": "lowrank-fed-app", "version": "0.1.0", "license": "Apache-2.0",
                           "description": "lowrank-fed on Flower (generated by lowrank-fed flower up)"},
               "tool": {"flwr": {"app": {"publisher": "lowrank-fed",
                                         "components": {"serverapp": "lowrank_fed.llm.flower.server_app:app",
                                                        "clientapp": "lowrank_fed.llm.flower.client_app:app"},
                                         "config": flat_config}}}}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    (folder / "README.md").write_text("Generated by `lowrank-fed flower up`; see docs/flower.md.\n", encoding="utf-8")
    return folder


@dataclass
class LocalFederation:
    r"""A SuperLink and SuperNodes as processes of this machine (``--insecure``), found and stopped by a marker.

    Parameters
    ----------
    folder : Path
        The run's ``.flower`` folder: the logs go there, and every process started here carries
        ``LOWRANK_FED_FLOWER=<folder>`` in its environment (:func:`marked_processes`).
    env : dict
        Environment of every process (:func:`~.engine.flower_environment`: :data:`~.engine.ENV`, ``FLWR_HOME``,
        ``RAY_TMPDIR``, caches), on top of this process's.
    """

    folder: Path
    env: dict
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.folder = Path(self.folder).resolve()
        self.env = {**self.env, MARK: str(self.folder)}

    def _spawn(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        env = {**os.environ, **self.env, MARK_PROCESS: name}
        if "stdout" in kwargs:
            proc = subprocess.Popen(argv, env=env, cwd=self.folder, start_new_session=True, **kwargs)
        else:
            with open(self.folder / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=self.folder, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _launch(self, argvs: dict[str, Callable[[int], list[str]]], *, timeout: float) -> None:
        r"""Start each ``name: argv(port)`` on a free port; wait until each listens. A process that exits
        because its port was taken meanwhile ("already in use" in its log) is started again on another port.

        Raises
        ------
        RuntimeError
            A process exited for another reason, did not listen within ``timeout`` s, or found its port taken
            ``_PORT_TRIES`` times; the message names its log.
        """
        todo, tries = dict(argvs), dict.fromkeys(argvs, 0)
        while todo:
            started = {}
            for name, argv in todo.items():
                log = self.folder / f"{name}.log"
                offset = log.stat().st_size if log.exists() else 0
                port = free_port()
                started[name] = (self._spawn(name, argv(port)), port, offset)
                tries[name] += 1
            deadline = time.monotonic() + timeout
            waiting = dict(started)
            while waiting:
                for name, (proc, port, offset) in list(waiting.items()):
                    if proc.poll() is None and _listens([proc.pid, *marked_processes(self.folder, name)], port):
                        self.ports[name] = port
                        del todo[name], waiting[name]
                        continue
                    if proc.poll() is not None:
                        log = self.folder / f"{name}.log"
                        with open(log, "rb") as f:
                            f.seek(offset)
                            text = f.read().decode(errors="replace")
                        if "already in use" not in text.lower():
                            raise RuntimeError(f"{name} ({Path(proc.args[0]).name}) exited with status "
                                               f"{proc.returncode}; see {log}.")
                        if tries[name] >= _PORT_TRIES:
                            raise RuntimeError(f"{name}: its port was taken by another process {tries[name]} times "
                                               f"in a row; see {log}.")
                        del waiting[name]  # started again on another port
                    elif time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see "
                                           f"{self.folder / f'{name}.log'}.")
                time.sleep(0.2)

    def start_superlink(self, *, timeout: float = 60.0) -> None:
        """Start ``flower-superlink --insecure`` and wait until it listens (Fleet, Control and Runtime on one port)."""
        self._launch({"superlink": lambda port: [
            _bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(self.folder / "superlink.db")]}, timeout=timeout)

    def start_supernodes(self, node_configs: list[str], *, timeout: float = 60.0) -> None:
        """Start SuperNode ``i`` with ``--node-config node_configs[i]`` (``--insecure``, its own ClientAppIo port)."""
        superlink = f"127.0.0.1:{self.ports['superlink']}"
        self._launch({f"supernode-{i}": (lambda port, c=c: [
            _bin("flower-supernode"), "--insecure", "--superlink", superlink, "--node-config", c,
            "--host", "127.0.0.1", "--port", str(port)]) for i, c in enumerate(node_configs)}, timeout=timeout)

    def connection_toml(self) -> str:
        """``FLWR_HOME/config.toml``: the SuperLink connection ``lowrank-fed`` for ``flwr run``."""
        return (f'[superlink]\ndefault = "lowrank-fed"\n\n[superlink.lowrank-fed]\n'
                f'address = "127.0.0.1:{self.ports["superlink"]}"\ninsecure = true\n')

    def run(self, app: Path, *, timeout: float) -> int:
        r"""``flwr run <app> lowrank-fed --stream``: its status; its output goes to ``flwr-run.log`` and stdout.

        Raises
        ------
        RuntimeError
            The run took longer than ``timeout`` seconds (``flwr run`` and its helpers are stopped).
        """
        log_path = self.folder / "flwr-run.log"
        proc = self._spawn("flwr-run", [_bin("flwr"), "run", str(app), "lowrank-fed", "--stream"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def pump():
            with open(log_path, "ab") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    sys.stdout.write(line.decode(errors="replace"))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"The run did not finish within --timeout = {timeout:g} s; it was stopped. See "
                               f"{log_path}; the same command resumes it from its checkpoints.") from None
        finally:
            if proc.poll() is None:
                self.kill("flwr-run")
                proc.wait()
            reader.join(timeout=5)
        return status

    def _alive(self, name: str | None = None) -> list[int]:
        """The marked processes (of ``name``), and any process started here that is still running."""
        pids = set(marked_processes(self.folder, name))
        for n, proc in self.procs.items():
            if (name is None or n == name) and proc.poll() is None:  # not reaped, so its id is still its own
                pids.add(proc.pid)
        return sorted(pids)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        r"""Send ``sig`` to process ``name`` and every helper it started (found now, by the marker); their ids.

        Flower's processes start helpers in sessions of their own (SuperExec, a ClientApp or ServerApp
        process) that outlive their parent, so neither a process group nor the parent's children suffice.
        """
        done = []
        for pid in self._alive(name):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                done.append(pid)
        return done

    def stop(self, *, grace: float = 10.0) -> None:
        """Stop every process of the federation: SIGTERM, SIGKILL after ``grace`` s to what is left; reap them."""
        stop_marked(self.folder, grace=grace, alive=self._alive)
        for proc in self.procs.values():
            proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line on stderr (exit status 2), naming the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    parser.error = lambda message: _Parser.error(parser, message)


DESCRIPTION = ("Start a Flower SuperLink and one SuperNode per client on this machine (127.0.0.1, insecure), run "
               "the config on them, then stop every process of the run: also on errors, Ctrl-C, SIGTERM and "
               "--timeout (a watchdog stops them if this command is killed). Results go to --out (runs/<name> by "
               "default), logs to <out>/.flower/. Exit status: 0 done, 2 invalid config or folder, 3 a package "
               "is missing, 1 the run did not finish, 128+N stopped by signal N. See docs/flower.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lowrank-fed flower up ...``; usage errors are one line on stderr, exit status 2."""
    _one_line_errors(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    up = sub.add_parser("up", help="SuperLink + one SuperNode per client on localhost, run the config, shut down",
                        description=DESCRIPTION)
    up.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml", help="TOML run config (default: the demo)")
    up.add_argument("--supernodes", type=int, default=None, metavar="N",
                    help="SuperNodes to start; must equal clients (node i serves client i; default: clients)")
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (as lowrank-fed run --set)")
    up.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<name>)")
    up.add_argument("--overwrite", action="store_true",
                    help="empty the output folder first and start afresh (default: resume a run of the same config)")
    up.add_argument("--round-timeout", type=float, default=600.0, metavar="S",
                    help="seconds a round waits for replies; a node silent by then is a dropped update (600)")
    up.add_argument("--min-replies", type=int, default=1, metavar="M",
                    help="replies a round needs to be aggregated; below it the global state is kept (1)")
    up.add_argument("--start-timeout", type=float, default=120.0, metavar="S",
                    help="seconds the ServerApp waits for every SuperNode before it refuses the run; round 1 "
                         "also gets them on top of --round-timeout (120)")
    up.add_argument("--timeout", type=float, default=RUN_TIMEOUT, metavar="S",
                    help=f"seconds the whole run may take before it is stopped ({RUN_TIMEOUT:.0f}: one day)")
    _add_config_action(sub)


def _add_config_action(sub) -> None:
    """``lowrank-fed flower config CONFIG.toml``: the flat run config ``flwr run . --run-config`` takes."""
    config = sub.add_parser("config", help="print a config as the TOML 'flwr run . --run-config FILE' takes",
                            description="Print the run config CONFIG.toml (with --set overrides) flattened as Flower's "
                                        "run config: a TOML file for 'flwr run . --run-config FILE', so nobody "
                                        "writes it by hand. Validated first (exit 2 on an error).")
    config.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml", help="TOML run config (default: "
                        "the demo)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (as lowrank-fed run --set)")
    config.add_argument("--out", default=None, metavar="DIR", help="flower-out: the output folder, made absolute "
                        "(default: runs/<name> under the folder flwr runs in)")
    config.add_argument("--round-timeout", type=float, default=600.0, metavar="S", help="flower-round-timeout (600)")
    config.add_argument("--min-replies", type=int, default=1, metavar="M", help="flower-min-replies (1)")
    config.add_argument("--start-timeout", type=float, default=120.0, metavar="S", help="flower-start-timeout (120)")


def flat_run_config(args: argparse.Namespace) -> str:
    r"""The TOML text of ``RunConfig.to_flat()`` plus the ``flower-*`` settings, as ``--run-config`` reads it.

    Raises
    ------
    ConfigError, ValueError
        An invalid config or setting (naming the key).
    """
    import tomli_w

    from ..config import ConfigError, RunConfig, apply_overrides, load_config

    cfg = RunConfig.from_dict(apply_overrides(load_config(args.config), args.overrides))  # before torch is imported
    from .engine import FlowerSettings

    out = output_path(args.out, Path("runs") / cfg.name)  # OutputFolderError is a ValueError
    for flag, value in (("--round-timeout", args.round_timeout), ("--start-timeout", args.start_timeout)):
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number of seconds. Got {value}.")
    settings = FlowerSettings(out=str(out.resolve()) if args.out is not None else "",
                              round_timeout=float(args.round_timeout), min_replies=int(args.min_replies),
                              start_timeout=float(args.start_timeout))
    settings.check(cfg)
    head = (f"# lowrank-fed flower config: {cfg.name}, {cfg.clients} clients. Run it from the repository with:\n"
            f"#   flwr run . --stream --run-config THIS_FILE.toml --federation-config "
            f"\"num-supernodes={cfg.clients} client-resources-num-cpus={cfg.threads}\"\n")
    return head + tomli_w.dumps({**cfg.to_flat(), **settings.to_flat()})


def _error(message: object) -> None:
    for line in str(message).splitlines():
        print(f"error: {line}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """``lowrank-fed flower up`` / ``flower config``: returns the exit status."""
    from ..config import ConfigError, RunConfig, apply_overrides, load_config

    if args.action == "config":
        try:
            print(flat_run_config(args), end="")
        except (ConfigError, ValueError) as err:
            _error(err)
            return 2
        return 0
    from ..catalog import PackageMissingError
    from ..run import _check_packages, _clear, check_output_folder

    try:  # the config first: a bad one is refused before torch and Flower are imported
        cfg = RunConfig.from_dict(apply_overrides(load_config(args.config), args.overrides))
    except ConfigError as err:
        _error(err)
        return 2

    try:
        from .engine import FlowerSettings
    except ModuleNotFoundError as err:
        _error(f"lowrank-fed flower needs Flower: pip install 'lowrank-fed[flower]' (missing module {err.name!r}).")
        return 3
    from ..runner.simulation import Simulation

    try:
        supernodes = cfg.clients if args.supernodes is None else args.supernodes
        if supernodes != cfg.clients:
            raise ConfigError(f"--supernodes must equal clients = {cfg.clients} (node i serves client i; a client "
                              f"without a node would be dropped every round). Got {supernodes}.")
        for flag, value in (("--timeout", args.timeout), ("--round-timeout", args.round_timeout),
                            ("--start-timeout", args.start_timeout)):
            if not (math.isfinite(value) and (value >= 0 if flag == "--start-timeout" else value > 0)):
                raise ConfigError(f"{flag} must be a finite number of seconds, "
                                  f"{'>= 0' if flag == '--start-timeout' else '> 0'}. Got {value}.")
        settings = FlowerSettings(round_timeout=float(args.round_timeout), min_replies=int(args.min_replies),
                                  start_timeout=float(args.start_timeout))
        settings.check(cfg)
        out = output_path(args.out, Path("runs") / cfg.name)  # OutputFolderError is a ValueError
        plan = check_output_folder(out, cfg, overwrite=args.overwrite, inputs=[args.config] if args.config else [],
                                   hint="Use --overwrite to replace them or --out to choose another folder.")
        _check_packages(cfg)
        sim = Simulation(cfg, out, progress=False)
        sim.setup()  # ranks; every data/model problem found before anything is written
        try:  # last: Flower's scratch folder (an unwritable --out is refused here, with nothing else written)
            (out / ".flower").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"Output folder '{out}' cannot be written: {err.strerror or err} "
                              f"({err.filename or out}).") from None
    except (ConfigError, ValueError) as err:
        _error(err)
        return 2
    except PackageMissingError as err:
        _error(err)
        return 3
    if plan == "clear":
        _clear(out)
    print(f"lowrank-fed flower up {cfg.name}: SuperLink + {supernodes} SuperNodes on 127.0.0.1, methods "
          f"{cfg.methods}, {cfg.rounds} rounds -> {out}{' (resuming)' if plan == 'resume' else ''}", flush=True)
    try:
        # SIGTERM/SIGHUP: the same clean-up as Ctrl-C (every process of the run stopped); the folder locked meanwhile
        with hold_lock(out), signals_raise():
            status = up(cfg, out, supernodes, sim.ranks, settings, timeout=args.timeout)
    except BlockingIOError:
        _error(f"'{out}' is in use: another process started writing into it; nothing more was written here.")
        return 2
    except KeyboardInterrupt as err:
        how = f"stopped by {signal.Signals(err.signum).name}" if isinstance(err, Terminated) else "interrupted"
        same = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"{how}; every process of the run was stopped; {same} resumes the run from {out}/checkpoints",
              file=sys.stderr, flush=True)
        return err.status if isinstance(err, Terminated) else 130
    except (RuntimeError, OSError) as err:
        _error(err)
        return 1
    if status != 0 or not (out / "summary.json").is_file():
        _error(f"the run did not finish (flwr run status {status}); see {out}/.flower/*.log. The same command "
               f"resumes it from its checkpoints.")
        return 1
    print(f"metrics, plots and adapters in {out}/", flush=True)
    return 0


def up(cfg, out: Path, supernodes: int, ranks, settings, *, watch=None, timeout: float = RUN_TIMEOUT) -> int:
    r"""Start a SuperLink and ``supernodes`` SuperNodes, ``flwr run`` the config, stop them; ``flwr run``'s status.

    Parameters
    ----------
    cfg : RunConfig
    out : Path
        The run folder (the ServerApp writes there; Flower's home, caches and logs go to ``out/.flower``).
    supernodes : int
        Node ``i`` serves client ``i`` with rank budget ``ranks[i]`` (the ServerApp refuses the run unless every
        client has a node).
    ranks : list of int
        Each client's rank (:attr:`Simulation.ranks`).
    settings : FlowerSettings
        Round timeout, minimum replies, start timeout (``out`` is set here).
    watch : callable(LocalFederation), optional
        Run in a thread once every process is up (tests use it to kill a SuperNode mid-round).
    timeout : float
        Seconds the whole run may take; then every process is stopped and RuntimeError raised.

    Raises
    ------
    RuntimeError
        A Flower process did not start, or the run exceeded ``timeout``.
    """
    from .engine import flower_environment

    out = Path(out).resolve()
    folder = out / ".flower"
    with flower_environment(out) as flower:
        env = {**flower, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        flat = {**cfg.to_flat(), **dataclasses.replace(settings, out=str(out)).to_flat()}
        app = write_app(folder / "app", flat)
        with watchdog(folder), LocalFederation(folder, env) as fed:  # the watchdog: if this process is killed
            fed.start_superlink()
            (Path(env["FLWR_HOME"]) / "config.toml").write_text(fed.connection_toml(), encoding="utf-8")
            fed.start_supernodes([f"partition-id={i} num-partitions={supernodes} rank={ranks[i]}"
                                  for i in range(supernodes)])
            print(f"SuperLink pid {fed.procs['superlink'].pid}; SuperNode pids "
                  f"{[fed.procs[f'supernode-{i}'].pid for i in range(supernodes)]}; logs in {folder}", flush=True)
            watcher = None
            if watch is not None:
                watcher = threading.Thread(target=watch, args=(fed,), daemon=True)
                watcher.start()
            status = fed.run(app, timeout=timeout)
            if watcher is not None:
                watcher.join(timeout=5)
    return status
