"""Helpers for the nodes tier: raw ctl sessions, store probes, and a polling wait.

The nodes tests talk to a live daemon two ways: through ``oppiefs.client.Client`` (what an
MCTS engine uses) and through a raw ``CtlSession`` that writes exact bytes, so the bad-input
tests can send what the client would never produce (non-UTF-8, overlong lines, several
commands in one write).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cliutil import Cli


class CtlSession:
    """One open handle of ``<mnt>/ctl``: one protocol session with ordered replies."""

    def __init__(self, mnt: Path) -> None:
        self.f = open(mnt / "ctl", "r+b", buffering=0)  # noqa: SIM115 - closed in close()
        self._pending = b""

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.f.write(view):]

    def replies(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Read exactly ``n`` reply lines (a reply is one JSON object ending in newline)."""
        deadline = time.monotonic() + timeout
        while self._pending.count(b"\n") < n:
            chunk = self.f.read(65536)
            if not chunk:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {self._pending!r} after {timeout}s")
                time.sleep(0.01)
                continue
            self._pending += chunk
        lines = self._pending.split(b"\n")
        out, rest = lines[:n], lines[n:]
        self._pending = b"\n".join(rest)
        return [json.loads(line) for line in out]

    def call(self, line: bytes | str) -> dict[str, Any]:
        raw = line.encode() if isinstance(line, str) else line
        self.send(raw + b"\n")
        return self.replies(1)[0]

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> CtlSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def fsck_clean(store: Path) -> None:
    """Run ``oppiefs fsck`` on the store (fine while the daemon serves it: LMDB)."""
    res = Cli(store)("fsck", "--json", expect=None)
    data = res.json()
    assert res.rc == 0 and data["clean"], f"fsck findings: {data['findings']}"


def node_dirs(store: Path) -> list[str]:
    """Node directories the daemon keeps under the store (one per live node).

    Dropped nodes' dirs are renamed ``.trash-<node>`` and deleted in the background.
    """
    d = store / "nodes"
    return sorted(n for n in os.listdir(d) if not n.startswith(".trash-")) if d.is_dir() else []


def trash_dirs(store: Path) -> list[str]:
    d = store / "nodes"
    return sorted(n for n in os.listdir(d) if n.startswith(".trash-")) if d.is_dir() else []
