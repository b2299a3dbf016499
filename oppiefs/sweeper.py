"""The background sweeper's work, in a process of its own.

The sweeper is Python, like the daemon's commands and its FUSE thread, and under one GIL
they slowed each other down: in the daemon a sweep transaction of 256 deletions on the
kernel tree took 25-40 ms against 8 ms alone, and every command it overlapped (the FUSE
thread serving a node's copy-ups, a commit) waited for it. So the sweeping runs in a child
process, on another CPU, with its own caches (which outlive a sweep: see
``Store._sweep_locked``). The daemon keeps the pacing (``StateManager._paced``), since
only it knows when commands are in progress: the child asks before every transaction but
the first of a sweep. One line of JSON each way per step, as the mount helper does
(overlay.py). The child dies with the daemon (parent death signal) or when it closes the
pipe; a child that died is started again for the next sweep, and a sweep the child cannot
do runs in the daemon (as it did before the child).

A transaction the sweeper began in a pause still holds the write lock when the next command
arrives, and that command waited for the rest of its batch (up to ~20 ms on the kernel
tree). So the daemon also shares a ``BusyFlag`` with the child: a sweep transaction ends
(committing what it did) as soon as a command begins.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable

from . import tree
from .errors import OppieError
from .store import Store

log = logging.getLogger("oppiefs.sweeper")

_PR_SET_PDEATHSIG = 1


class BusyFlag:
    """Whether a command is in progress, in one byte of a memory file the daemon and the
    sweeper's child both map: the sweeper reads it before every deletion (a memory read;
    a message would cost a system call per deletion, and a command waits for it only)."""

    def __init__(self, fd: int | None = None) -> None:
        """``fd``: the file the daemon made (the child); default: make one."""
        if fd is None:
            fd = os.memfd_create("oppiefs-busy", os.MFD_CLOEXEC)
            os.ftruncate(fd, mmap.PAGESIZE)
        self.fd = fd
        self._map = mmap.mmap(fd, mmap.PAGESIZE)  # holds a file descriptor of its own
        weakref.finalize(self, os.close, fd)

    def set(self, busy: bool) -> None:
        self._map[0] = busy

    def __call__(self) -> bool:
        return self._map[0] != 0


class _ChildGone(Exception):
    """The child could not be started, or died."""


class Sweeper:
    """The daemon's side: ``sweep`` as ``Store.sweep`` does it, in the child; in this
    process when the child cannot run (a sweep must not wait for a working child)."""

    def __init__(self, store: Store, busy: BusyFlag | None = None,
                 child: list[str] | None = None) -> None:
        """``busy``: set while a command is in progress (sweep transactions then end early);
        ``child``: the command that runs the child (default: this module, on ``store``)."""
        self.store = store
        self.busy = busy
        self.child = child or [sys.executable, "-m", "oppiefs.sweeper", str(store.path),
                               str(os.getpid()), str(busy.fd if busy is not None else -1)]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def sweep(self, batch: int, between: Callable[[float], int | None],
              stop: threading.Event) -> tuple[int, int]:
        """Sweep; ``between`` runs here before each transaction but the first, given how
        long the last one held the write lock, and may answer the next one's batch. Returns
        (objects freed, bytes freed); (0, 0) when ``stop`` ended it early."""
        with self._lock:
            try:
                return self._in_child(batch, between, stop)
            except _ChildGone as exc:
                log.error("%s: sweeping in the daemon this time", exc)
        return self.store.sweep(batch=batch, between=lambda: between(self.store.held_s),
                                yield_to=self.busy)

    def _in_child(self, batch: int, between: Callable[[float], int | None],
                  stop: threading.Event) -> tuple[int, int]:
        try:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    self.child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                    pass_fds=() if self.busy is None else (self.busy.fd,))
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            self._send(proc, {"sweep": batch})
            while True:
                line = proc.stdout.readline()
                if not line:
                    raise _ChildGone("the sweeper process died")
                reply = json.loads(line)
                if "between" not in reply:
                    break
                nxt = between(reply["between"])
                self._send(proc, {"stop": True} if stop.is_set() else {"batch": nxt})
        except (OSError, ValueError) as exc:  # cannot start it, a broken pipe, garbage
            raise _ChildGone(f"the sweeper process failed: {exc}") from exc
        if "error" in reply:
            raise OppieError(reply["error"])
        n, nbytes = reply.get("done", (0, 0))
        return n, nbytes

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], msg: dict[str, object]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(msg).encode() + b"\n")
        proc.stdin.flush()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None


class _Stop(Exception):
    """The daemon is stopping: end the sweep between two transactions."""


def _serve(store_dir: str, daemon_pid: int, busy_fd: int) -> None:
    """The child's loop (``python -m oppiefs.sweeper STORE PID BUSY_FD``; -1: no flag): a
    request on stdin, questions and the result on stdout. Ctrl-C is the daemon's to
    handle; a SIGTERM (which systemd sends every process of the unit) just ends it, as
    every transaction is atomic."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never sweep on for a dead daemon
    if os.getppid() != daemon_pid:
        return  # it died before we asked
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(19)  # the CPU is for commands first; the sweeper has what they leave
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    inbox, outbox = sys.stdin.buffer, sys.stdout.buffer

    def send(msg: dict[str, object]) -> None:
        outbox.write(json.dumps(msg).encode() + b"\n")
        outbox.flush()

    def between() -> int | None:
        send({"between": store.held_s})
        line = inbox.readline()
        answer = json.loads(line) if line else {"stop": True}
        if answer.get("stop"):
            raise _Stop
        return answer.get("batch")

    busy = BusyFlag(busy_fd) if busy_fd >= 0 else None
    store = tree.open_store(store_dir, create=False)
    with store:
        for line in inbox:
            reply: dict[str, object]
            try:
                n, nbytes = store.sweep(batch=json.loads(line)["sweep"], between=between,
                                        yield_to=busy)
                reply = {"done": [n, nbytes]}
            except _Stop:
                reply = {"done": [0, 0]}
            except OppieError as exc:
                reply = {"error": str(exc)}
            send(reply)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
