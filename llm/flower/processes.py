r"""The processes of a run on Flower: found by a marker in their environment, stopped however the command ends.

Standard library only (the watchdog runs this file as a script, without the package).

Guarantee, for ``lowrank-fed flower up`` and ``lowrank-fed run --engine flower``: every process the command
starts, and every helper those start (Flower's SuperExec, ServerApp and ClientApp processes, Ray's raylet, GCS
and workers), is stopped when the command ends, however it ends:

- normal end, an exception, Ctrl-C (SIGINT), SIGTERM or SIGHUP: the command's own clean-up
  (:func:`signals_raise` turns SIGTERM and SIGHUP into :class:`Terminated`, a ``KeyboardInterrupt``, so
  ``finally`` blocks and ``__exit__`` run; Python's default would end the process without them);
- SIGKILL of the command (nothing of it runs any more): a :func:`watchdog` process, started before anything else,
  notices within :data:`POLL` seconds (its pipe from the command closes, or it is re-parented) and stops every
  marked process: SIGTERM, then SIGKILL after ``grace`` seconds.

Why a watchdog and not ``PR_SET_PDEATHSIG``: a death signal reaches only direct children, while Flower's helpers
are grandchildren started in sessions of their own that outlive their parent; and setting it needs a
``preexec_fn``, unsafe in a process with threads. The watchdog uses the same marker scan as the normal clean-up,
so it finds every descendant, whoever started it.

Processes are found by a marker, not by ids taken earlier (an id can be reused once its process exited): every
process gets ``LOWRANK_FED_FLOWER=<folder>`` (and ``LOWRANK_FED_FLOWER_PROCESS=<name>``) in its environment and
the helpers inherit it; :func:`marked_processes` reads ``/proc/<pid>/environ``. Without ``/proc`` (not Linux)
nothing is found, and only the command's direct children are stopped.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MARK", "MARK_PROCESS", "WATCHDOG", "POLL", "Terminated", "marked_processes", "stop_marked",
           "signals_raise", "watchdog"]

#: Environment variable naming the run's ``.flower`` folder in every process of a run on Flower.
MARK = "LOWRANK_FED_FLOWER"
#: Environment variable naming the process (``superlink``, ``supernode-<i>``, ``flwr-run``) it and its helpers serve.
MARK_PROCESS = "LOWRANK_FED_FLOWER_PROCESS"
#: Environment variable of the watchdog (not :data:`MARK`: the clean-up it does must not stop it).
WATCHDOG = "LOWRANK_FED_FLOWER_WATCHDOG"
#: Seconds between two looks of the watchdog at its command.
POLL = 0.2


class Terminated(KeyboardInterrupt):
    """The command received SIGTERM or SIGHUP (:func:`signals_raise`); ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status a shell gives a process ended by this signal: ``128 + signum``."""
        return 128 + self.signum


def marked_processes(folder: str | Path, name: str | None = None, *, mark: str = MARK) -> list[int]:
    r"""Ids of the living processes of the run whose ``.flower`` folder is ``folder`` (``name``: only that one's).

    A process belongs to it when its environment (``/proc/<pid>/environ``) holds ``<mark>=<folder>`` (and
    ``LOWRANK_FED_FLOWER_PROCESS=<name>``). Zombies (no environment left) and other users' processes are not
    listed; this process never is. Empty where ``/proc`` does not exist.
    """
    wanted = {f"{mark}={Path(folder).resolve()}".encode()}
    if name is not None:
        wanted.add(f"{MARK_PROCESS}={name}".encode())
    out = []
    for entry in Path("/proc").glob("[0-9]*/environ"):
        pid = int(entry.parent.name)
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted <= set(entry.read_bytes().split(b"\0")):
                out.append(pid)
    return sorted(out)


def _signal(pids, sig: int) -> list[int]:
    done = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            done.append(pid)
    return done


def stop_marked(folder: str | Path, *, grace: float = 10.0, alive=None) -> None:
    r"""Stop every marked process of ``folder``: SIGTERM, then SIGKILL after ``grace`` s to what is left.

    ``alive()`` (default: :func:`marked_processes` of ``folder``) lists the processes to stop; it is called again
    before each signal, so no stale id is signalled.
    """
    alive = alive or (lambda: marked_processes(folder))
    _signal(alive(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):  # what did not stop on SIGTERM; found again each time
        if not _signal(alive(), signal.SIGKILL):
            break
        time.sleep(0.2)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    r"""For the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (once; a second signal
    while the clean-up runs is ignored), so the clean-up of ``finally`` blocks and ``__exit__`` runs.

    Outside the main thread (where Python cannot install handlers) it changes nothing. The previous handlers are
    restored when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if raised:
            return
        raised.append(signum)
        raise Terminated(signum)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def watchdog(folder: str | Path, *, grace: float = 10.0) -> Iterator[subprocess.Popen | None]:
    r"""A process that stops every marked process of ``folder`` if this one dies without doing so (SIGKILL).

    It holds the read end of a pipe from this process and looks every :data:`POLL` seconds: when the pipe closes
    (this process ended) or it is re-parented, it runs :func:`stop_marked` and exits. When the block ends
    normally, this process tells it ``done`` and it exits at once (the caller has stopped its processes). It
    carries ``LOWRANK_FED_FLOWER_WATCHDOG=<folder>`` (not the marker it scans for). Yields its ``Popen`` (None
    without ``/proc``: nothing to scan).
    """
    if not Path("/proc/self/environ").exists():
        yield None
        return
    folder = Path(folder).resolve()
    env = {k: v for k, v in os.environ.items() if k not in (MARK, MARK_PROCESS)}
    env[WATCHDOG] = str(folder)
    read, write = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), "--watch", str(os.getpid()),
                                 str(folder), str(grace)], stdin=read, stdout=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    finally:
        os.close(read)
    try:
        yield proc
    finally:
        with contextlib.suppress(OSError):
            os.write(write, b"done\n")
        os.close(write)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _watch(parent: int, folder: str, grace: float) -> int:
    """The watchdog's loop (:func:`watchdog`): 0 after ``done``, else stops the marked processes first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL)
        if ready:
            if os.read(sys.stdin.fileno(), 64).startswith(b"done"):
                return 0
            break  # EOF: the command ended without saying done
        if os.getppid() != parent:
            break
    stop_marked(folder, grace=grace)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    raise SystemExit(_watch(int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
