"""Concurrency: 16 threads, each with its own Client (its own ctl session), forking,
committing, dropping and pruning at once for a bounded time.

Allowed failures are exactly the races the protocol defines: ``fork`` or ``prune`` of a
snapshot another thread has just pruned (ENOENT). A commit or drop of a thread's own node
must never fail, every node must read back what its thread wrote, nothing may hang (each
thread is joined with a deadline; a hang dumps every thread's stack), and afterwards the
store must fsck clean and GC must free everything but the base snapshot.

Duration: ``OPPIEFS_CONCURRENCY_SECONDS`` (default 30).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from oppiefs.client import Client, Node
from oppiefs.errors import NotFound
from tests.cliutil import Cli
from tests.nodeutil import fsck_clean, node_dirs, trash_dirs, wait_for

THREADS = 16
DURATION = float(os.environ.get("OPPIEFS_CONCURRENCY_SECONDS", "30"))
HANG_GRACE = 120.0  # after DURATION, how long a thread may take to finish its last op


class Shared:
    """Snapshot ids the threads may fork or prune (the base is never pruned)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.ids = [base]

    def pick(self, rng: random.Random, prunable: bool = False) -> str | None:
        with self.lock:
            choices = [s for s in self.ids if not prunable or s != self.base]
            return rng.choice(choices) if choices else None

    def add(self, s: str) -> None:
        with self.lock:
            self.ids.append(s)

    def discard(self, s: str) -> None:
        with self.lock:
            if s in self.ids:
                self.ids.remove(s)


def worker(i: int, mnt: Path, shared: Shared, stop_at: float, counts: Counter,
           errors: list[str]) -> None:
    rng = random.Random(i)
    mine: list[Node] = []
    seq = 0
    with Client(mnt) as c:
        while time.monotonic() < stop_at:
            r = rng.random()
            op = ("fork" if r < 0.3 or not mine else "commit" if r < 0.65
                  else "drop" if r < 0.8 else "prune")
            try:
                if op == "fork":
                    snap = shared.pick(rng)
                    assert snap is not None
                    try:
                        node = c.fork(snap)
                    except NotFound:
                        counts["fork ENOENT"] += 1
                        continue
                    mine.append(node)
                elif op == "commit":
                    node = rng.choice(mine)
                    seq += 1
                    data = f"thread {i} write {seq} ".encode() * rng.randint(1, 2000)
                    (Path(node.path) / f"t{i}").write_bytes(data)
                    (Path(node.path) / f"t{i}-n{seq}").mkdir()
                    s = c.commit(node)
                    if (Path(node.path) / f"t{i}").read_bytes() != data:
                        errors.append(f"thread {i}: node {node.id} lost its write")
                    shared.add(s)
                elif op == "drop":
                    node = mine.pop(rng.randrange(len(mine)))
                    c.drop(node)
                else:
                    snap = shared.pick(rng, prunable=True)
                    if snap is None:
                        continue
                    try:
                        c.prune(snap)
                    except NotFound:
                        counts["prune ENOENT"] += 1
                        continue
                    finally:
                        shared.discard(snap)
                counts[op] += 1
            except Exception as exc:  # anything else is a failure of the test
                errors.append(f"thread {i} {op}: {type(exc).__name__}: {exc}")
        for node in mine:
            try:
                c.drop(node)
            except Exception as exc:
                errors.append(f"thread {i} final drop: {type(exc).__name__}: {exc}")


def test_sixteen_clients_at_once(daemon, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_text("a\n")
    (src / "d" / "b").write_bytes(os.urandom(20_000))
    with Client(daemon.mnt) as c:
        base = c.import_(src)
        Cli(daemon.store)("gc")
        base_bytes = c.status()["stored_bytes"]

    shared = Shared(base)
    counts: Counter = Counter()
    errors: list[str] = []
    stop_at = time.monotonic() + DURATION
    threads = [threading.Thread(target=worker, name=f"client-{i}", daemon=True,
                                args=(i, daemon.mnt, shared, stop_at, counts, errors))
               for i in range(THREADS)]
    for t in threads:
        t.start()
    deadline = stop_at + HANG_GRACE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    if hung:
        frames = sys._current_frames()
        stacks = "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                           for t in hung if t.ident in frames)
        raise AssertionError(f"{len(hung)} clients hung (deadlock?):\n{stacks}\n"
                             f"daemon log:\n{daemon.log_text()}")

    assert not errors, "\n".join(errors[:20])
    # Enough happened for the races to matter.
    assert counts["commit"] >= THREADS * 3 and counts["prune"] >= THREADS, counts
    with Client(daemon.mnt) as c:
        status = c.status()
        assert status["nodes"] == 0, status
        assert node_dirs(daemon.store) == []
        # Dropped nodes' dirs go to the trash, which the daemon empties in the background.
        wait_for(lambda: not trash_dirs(daemon.store), timeout=60, what="an empty trash")
        assert os.listdir(daemon.mnt / "nodes") == []
        assert sorted(os.listdir(daemon.mnt / "snapshots")) == sorted(set(shared.ids))
        fsck_clean(daemon.store)
        for s in set(shared.ids) - {base}:
            while True:  # a snapshot committed twice with equal content has two references
                try:
                    c.prune(s)
                except NotFound:
                    break
        assert os.listdir(daemon.mnt / "snapshots") == [base]
        Cli(daemon.store)("gc")
        assert c.status()["stored_bytes"] == base_bytes
    fsck_clean(daemon.store)
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def test_a_long_command_holds_up_no_other_session(mdaemon, tmp_path):
    """Sessions run their commands at once: while one imports a 1 GiB file (a second or
    more), a ``status`` on another handle is answered, and a ``fork`` too. The kernel holds
    ctl's inode lock while a write is answered, so a write that ran its command queued
    every other client's commands behind it. ``echo cmd > ctl`` still returns once it ran."""
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "f").write_text("f\n")
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "zeros", "wb") as f:
        f.truncate(1 << 30)  # read in full by the import: zeros chunk and hash fast
    with Client(mdaemon.mnt) as c:
        base = c.import_(str(tmp_path / "small"))
        answered: list[str] = []
        importer = threading.Thread(target=lambda: answered.append(c.import_(str(big))))
        importer.start()
        try:
            time.sleep(0.05)
            with Client(mdaemon.mnt) as other:
                during = [importer.is_alive()]
                other.status()
                node = other.fork(base)
                during.append(importer.is_alive())
                other.drop(node)
        finally:
            importer.join(timeout=600)
        assert len(answered) == 1
        assert during == [True, True], "status and fork waited for the other session's import"
        c.prune(answered[0])
    with open(mdaemon.mnt / "ctl", "w") as f:  # fire and forget: done once closed
        f.write(f"fork {base}\n")
    (node_id,) = os.listdir(mdaemon.mnt / "nodes")
    with Client(mdaemon.mnt) as c:
        c.drop(node_id)
        c.prune(base)
