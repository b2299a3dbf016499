"""The control-file protocol: one command line in, one JSON line out.

Each open handle of ``<mnt>/ctl`` is a ``Session``: bytes written are split into lines
(4 KiB limit), each line is executed in order, and its reply is queued for reading on the
same handle. A line that cannot be parsed gets an error reply and changes nothing; the
session stays usable. ``Control.execute`` is synchronous and may block (mount syscalls,
commits): fs.py runs it in a worker thread, never on the FUSE thread.

    import <absolute host path>   -> {"ok": true, "snapshot": ID, ...}
    fork <snapshot>               -> {"ok": true, "node": NODE, "path": PATH, "snapshot": ID}
    commit <node>                 -> {"ok": true, "snapshot": ID, "parent": ID}
    drop [--force] <node>         -> {"ok": true}
    prune <snapshot>              -> {"ok": true}
    status                        -> {"ok": true, "snapshots": N, "nodes": N, ...}
    help                          -> {"ok": true, "commands": [...]}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import Busy, InvalidArgument, OppieError

if TYPE_CHECKING:
    from .state import StateManager

log = logging.getLogger("oppiefs.control")

MAX_LINE = 4096
READY_TIMEOUT = 120.0
# What ``Session.feed`` hands on for an overlong line: longer than any real line can be, so
# it cannot be mistaken for one (a line that is just a NUL byte is a different error).
OVERLONG = b"\0" * (MAX_LINE + 1)

COMMANDS = {
    "import": "import <absolute host path>: import a host directory as a snapshot",
    "fork": "fork <snapshot>: new writable node on top of a snapshot",
    "commit": "commit <node>: capture the node's current state as a snapshot",
    "drop": "drop [--force] <node>: unmount and discard a node (--force: detach lazily)",
    "prune": "prune <snapshot>: release a snapshot; data is freed once nothing needs it",
    "status": "status: counts of snapshots, nodes, objects and bytes",
    "help": "help: this list",
}


READ_ONLY = frozenset({b"status", b"help"})


def read_only(line: bytes) -> bool:
    """Whether a line cannot change snapshots or nodes (listings then stay valid)."""
    words = line.split(None, 1)
    return bool(words) and words[0] in READ_ONLY


def error_reply(exc: OppieError) -> dict[str, Any]:
    return {"ok": False, "error": exc.errno_name, "message": exc.message}


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(", ", ": ")).encode() + b"\n"


class Session:
    """Line framing and reply queue of one ctl handle."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overlong = False
        self._out = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Append written bytes; return the complete lines (an overlong one as OVERLONG)."""
        lines = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._overlong or len(line) > MAX_LINE:
                self._overlong = False
                lines.append(OVERLONG)
            else:
                lines.append(line)
        if len(self._buf) > MAX_LINE:
            self._buf.clear()
            self._overlong = True
        return lines

    def reply(self, reply: dict[str, Any]) -> None:
        self._out += encode_reply(reply)

    def pending(self) -> int:
        """Reply bytes not read yet."""
        return len(self._out)

    def read(self, size: int) -> bytes:
        data = bytes(self._out[:size])
        del self._out[:size]
        return data


class Control:
    """Parses and dispatches command lines to the StateManager."""

    def __init__(self, state: StateManager) -> None:
        self.state = state
        self._handlers: dict[str, tuple[int, int, Callable[..., dict[str, Any]]]] = {
            # name: (min args, max args, handler)
            "import": (1, 1, lambda path: state.import_path(path)),
            "fork": (1, 1, lambda snap: state.fork(snap)),
            "commit": (1, 1, lambda node: state.commit(node)),
            "drop": (1, 2, self._drop),
            "prune": (1, 1, lambda snap: state.prune(snap)),
            "status": (0, 0, lambda: state.status()),
            "help": (0, 0, lambda: {"commands": list(COMMANDS.values())}),
        }

    def _drop(self, *args: str) -> dict[str, Any]:
        if len(args) == 2:
            if args[0] != "--force":
                raise InvalidArgument(f"drop: unknown option {args[0]!r} (only --force)")
            return self.state.drop(args[1], force=True)
        if args[0].startswith("--"):
            raise InvalidArgument("drop: missing node id")
        return self.state.drop(args[0])

    def parse(self, line: bytes) -> tuple[Callable[..., dict[str, Any]], list[str]]:
        if len(line) > MAX_LINE:
            raise InvalidArgument(f"line longer than {MAX_LINE} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("command line is not valid UTF-8") from None
        if not text.replace("\t", " ").isprintable():
            if text.endswith("\r"):
                raise InvalidArgument("command line ends with a carriage return (end lines "
                                      "with \\n alone, not \\r\\n)")
            raise InvalidArgument("command line contains control characters")
        words = text.split()
        if not words:
            raise InvalidArgument("empty command line (try 'help')")
        name, args = words[0], words[1:]
        spec = self._handlers.get(name)
        if spec is None:
            raise InvalidArgument(f"unknown command {name!r} (try 'help')")
        lo, hi, fn = spec
        if name == "import" and args:
            # Paths may contain spaces, leading and trailing ones too: the path is the rest
            # of the line after one separator, verbatim (stripping it could import another
            # directory; extra blanks make a relative path, which is refused).
            args = [text.lstrip()[len(name) + 1:]]
        if not lo <= len(args) <= hi:
            usage = COMMANDS[name].split(":")[0]
            raise InvalidArgument(f"usage: {usage}")
        return fn, args

    def execute(self, line: bytes) -> dict[str, Any]:
        """Run one command line; never raises (errors become error replies).

        Commands wait until the daemon has re-attached its nodes after a (re)start, so a
        client racing the start cannot, say, drop a node that is being re-attached.
        """
        try:
            fn, args = self.parse(line)
            if not self.state.ready.wait(READY_TIMEOUT):
                raise Busy("the daemon is still re-attaching nodes; try again")
            with self.state.busy(line.split(None, 1)[0].decode()):  # parse() checked it
                reply = fn(*args)
        except OppieError as exc:
            return error_reply(exc)
        except Exception as exc:
            log.exception("unexpected error executing %r", line[:200])
            return {"ok": False, "error": "EIO", "message": f"internal error: {exc}"}
        return {"ok": True, **reply}
