"""The read path's own machinery: inode numbers resolved by position, the inode table
shrinking after forgets, request counters, and memory handed back when the kernel forgets."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from oppiefs import fs, tree
from oppiefs import vfs as V
from oppiefs.errors import NotFound
from tests.mountutil import Daemon
from tests.treeutil import make_odd_tree, make_sized_tree


@pytest.fixture
def odd_vfs(tmp_path: Path):
    src = tmp_path / "odd"
    make_odd_tree(src)
    store = tree.open_store(tmp_path / "store")
    root = tree.import_dir(store, src, skip_special=True).root
    v = V.Vfs(tree.Reader(store, trees=4), offsets_cache=4)  # tiny caches: force reloads
    yield v, root
    store.close()


def test_every_inode_resolves_to_its_entry(odd_vfs):
    """entry(ino) walks down by position and finds what readdir numbered ino."""
    v, root = odd_vfs
    rino, _ = v.snapshot_root(root.hex().encode())
    seen = 0
    todo = [rino]
    while todo:
        parent = todo.pop()
        for _, ino, e in v.children(parent):
            assert v.entry(ino) == e
            assert v.child(parent, e.name) == (ino, e)
            seen += 1
            if e.is_dir:
                todo.append(ino)
    assert seen > 20
    with pytest.raises(NotFound):
        v.entry(rino + seen + 1)  # past the last node
    with pytest.raises(NotFound):
        v.entry((99 << V.SNAP_SHIFT) | 1)  # a snapshot this mount never met


def test_table_shrinks_after_forget(odd_vfs):
    v, _ = odd_vfs
    base = V.FIRST_SNAPSHOT
    n = 4 * V.SHRINK_MIN
    for i in range(n):
        v.remember(base + i)
    v.remember(base)  # a second reference
    assert len(v) == n and not v.forgotten()
    big = sys.getsizeof(v._lookups)
    for i in range(n):
        v.forget(base + i, 1)
    assert v.known(base) and len(v) == 1
    assert v.forgotten()  # rebuilt ...
    assert sys.getsizeof(v._lookups) < big / 10  # ... at its new size
    v.forget(base, 1)
    assert len(v) == 0 and not v.forgotten()


def _counts(d: Daemon, path: Path) -> dict[str, int]:
    before = path.stat().st_mtime_ns if path.exists() else 0
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGUSR1)
    for _ in range(500):
        if path.exists() and path.stat().st_mtime_ns != before:
            return json.loads(path.read_text())
        time.sleep(0.01)
    raise AssertionError("no request counts written")


def test_request_counters_and_forget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Counters count requests per handler; after the kernel forgets, so does the daemon."""
    src = tmp_path / "src"
    make_sized_tree(src, files=300, total_bytes=600_000, dirs=6)
    store = tree.open_store(tmp_path / "store")
    ident = tree.import_dir(store, src).root.hex()
    store.close()
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("OPPIEFS_REQUEST_STATS", str(stats))
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    try:
        root = d.mnt / "snapshots" / ident
        files = sorted(p for p in root.rglob("*") if p.is_file())
        assert len(files) == 300
        for p in files:
            p.read_bytes()
        before = _counts(d, stats)
        assert before["inodes"] >= 300 + 6
        for p in files:  # warm: no reads; in no-open mode no request at all
            with open(p, "rb") as f:
                f.read()
        after = _counts(d, stats)
        assert after["open"] - before["open"] == (0 if fs.NO_OPEN else 300)
        assert after["release"] - before["release"] == (0 if fs.NO_OPEN else 300)
        assert after["read"] == before["read"]
        assert after["pid"] == d.tree_server_pid()  # snapshot trees are served there
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        deadline = time.monotonic() + 20
        while _counts(d, stats)["inodes"] > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _counts(d, stats)["inodes"] == 0
        assert sorted(p for p in root.rglob("*") if p.is_file()) == files  # looked up again
        assert all(p.read_bytes() == (src / p.relative_to(root)).read_bytes()
                   for p in files[:20])
    finally:
        d.stop()
