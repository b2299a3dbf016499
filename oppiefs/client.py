"""Python client for the control file: what an MCTS engine imports.

    from oppiefs.client import Client
    c = Client("/mnt/state")
    node = c.fork(snapshot_id)          # Node(id, path, snapshot)
    ...edit files under node.path...
    snap = c.commit(node.id)
    c.drop(node.id); c.prune(old_id)

Thread-safe: each thread gets its own ctl handle (a handle is a session with ordered
replies, so sharing one between threads would interleave them). Errors raise the
OppieError subclass named by the reply's errno (NotFound for ENOENT, ...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from typing import Any, NamedTuple

from . import overlay
from .errors import InvalidArgument, NotMounted, from_errno_name


class Node(NamedTuple):
    id: str
    path: str
    snapshot: str


def _line(words: tuple[str, ...]) -> bytes:
    """The command line for ``words``: ``import``'s path verbatim (it may hold blanks, the
    daemon takes the rest of the line), every other word without blanks."""
    if words and words[0] == "import":
        head, args = "import", words[1:]
        if any("\n" in a or "\r" in a for a in args):
            raise InvalidArgument(f"import: a path with a line break cannot be sent: {args!r}")
    else:
        head, args = "", words
        for w in words:
            if not w or w != "".join(w.split()):
                raise InvalidArgument(f"argument {w!r} is empty or contains blanks "
                                      "(ids and commands are single words)")
    text = " ".join((head, *args)) if head else " ".join(args)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        raise InvalidArgument(f"{text!r} is not UTF-8, which the control protocol carries "
                              "(`oppiefs import PATH` writes to the store directly and takes "
                              "any path)") from None


class Client:
    def __init__(self, mountpoint: str | os.PathLike[str] = "/mnt/state") -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.ctl = os.path.join(self.mountpoint, "ctl")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._fds: set[int] = set()

    def _fd(self) -> int:
        fd = getattr(self._local, "fd", None)
        if fd is None:
            hint = (f" (is oppiefs mounted at {self.mountpoint}? `oppiefs mount "
                    f"{self.mountpoint}` starts it)")
            if not any(m.mountpoint == self.mountpoint and m.fstype == "fuse.oppiefs"
                       for m in overlay.mounts()):  # never write commands into a file
                raise NotMounted(f"{self.mountpoint} is not an oppiefs mount{hint}")
            try:
                fd = self._local.fd = os.open(self.ctl, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                why = hint if exc.errno == errno.ENOENT else ""
                raise NotMounted(f"cannot open {self.ctl}: {exc.strerror}{why}") from exc
            with self._lock:
                self._fds.add(fd)
        return fd

    def _forget_fd(self) -> None:
        """Close this thread's handle (after an error: the session may be out of step)."""
        fd = getattr(self._local, "fd", None)
        if fd is not None:
            self._local.fd = None
            with self._lock:
                self._fds.discard(fd)
            os.close(fd)

    def close(self) -> None:
        """Close every thread's handle; a thread that calls again gets a new session."""
        with self._lock:
            fds, self._fds = self._fds, set()
        self._local = threading.local()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def call(self, *words: str) -> dict[str, Any]:
        """Send one command, return its reply; raise the matching OppieError on failure.

        Words are checked here, where the line is built: an id with a blank in it would
        reach the daemon as two words, and a path that is not UTF-8 cannot be written
        at all. Whatever interrupts a call between its write and its read (a timeout, a
        signal, Ctrl-C) closes this thread's handle: its late reply would otherwise be
        read as the answer to the next command.
        """
        line = _line(words)
        fd = self._fd()
        try:
            os.write(fd, line)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise NotMounted("control file closed without a reply")
                buf += chunk
        except OSError as exc:
            self._forget_fd()
            raise NotMounted(f"control file {self.ctl}: {exc.strerror}") from exc
        except BaseException:
            self._forget_fd()
            raise
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise from_errno_name(reply.get("error", "EIO"), reply.get("message", ""))
        return reply

    def import_(self, path: str | bytes | os.PathLike[str]) -> str:
        return self.call("import", os.fsdecode(path))["snapshot"]

    def fork(self, snapshot: str) -> Node:
        r = self.call("fork", snapshot)
        return Node(r["node"], r["path"], r["snapshot"])

    def commit(self, node: str | Node) -> str:
        return self.call("commit", node.id if isinstance(node, Node) else node)["snapshot"]

    def drop(self, node: str | Node, *, force: bool = False) -> None:
        nid = node.id if isinstance(node, Node) else node
        self.call("drop", "--force", nid) if force else self.call("drop", nid)

    def prune(self, snapshot: str) -> None:
        self.call("prune", snapshot)

    def status(self) -> dict[str, Any]:
        r = self.call("status")
        r.pop("ok", None)
        return r

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
