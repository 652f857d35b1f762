r"""A Flower federation as processes of this machine: a SuperLink and SuperNodes (``--insecure``, 127.0.0.1).

:class:`LocalFederation` starts each process on a free port (again on another one if the port was taken
meanwhile), waits until it listens, runs ``flwr run``, and stops every process of the run, found by the marker in
its environment (:mod:`.processes`), not by a list of ids taken earlier.
"""

from __future__ import annotations

import contextlib
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

from .processes import MARK, MARK_PROCESS, marked_processes, stop_marked

__all__ = ["LocalFederation", "free_port"]

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
