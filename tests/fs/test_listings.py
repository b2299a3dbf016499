"""Directory listings: cached by the kernel where that is safe, fresh where they change.

With a pyfuse3 built with contrib/pyfuse3-ino-without-open.patch the kernel caches every
listing (no-opendir mode): a second walk of a snapshot sends no OPENDIR/READDIR at all.
``snapshots/`` and ``nodes/`` change, and must show every change: at once after a control
command, and within the attribute timeout after a store change made outside the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from oppiefs import fs
from oppiefs.client import Client
from tests.cliutil import Cli
from tests.mountutil import Daemon


def _src(root: Path, tag: str) -> Path:
    for d in range(5):
        (root / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(10):
            (root / f"d{d}" / "sub" / f"f{f}").write_text(f"{tag} {d} {f}\n")
    return root


def _walk(top: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            out.append((os.path.join(dirpath, name), os.lstat(os.path.join(dirpath, name)).st_size))
    return sorted(out)


def _counts(d: Daemon, stats: Path) -> dict[str, int]:
    assert d.proc is not None
    stats.unlink(missing_ok=True)
    d.proc.send_signal(signal.SIGUSR1)
    for _ in range(100):
        if stats.exists() and stats.stat().st_size:
            return json.loads(stats.read_text())
        time.sleep(0.05)
    raise AssertionError("the daemon wrote no request counts")


@pytest.mark.skipif(not fs.NO_OPENDIR, reason="pyfuse3 without the readdir patch")
def test_second_walk_of_a_snapshot_sends_no_directory_requests(tmp_path):
    stats = tmp_path / "stats.json"
    env = {**os.environ, fs.STATS_ENV: str(stats)}
    with Daemon(tmp_path / "mnt", tmp_path / "store", env=env) as d, Client(d.mnt) as c:
        snap = d.mnt / "snapshots" / c.import_(_src(tmp_path / "src", "a"))
        first = _walk(snap)
        before = _counts(d, stats)
        assert _walk(snap) == first
        after = _counts(d, stats)
    for op in ("opendir", "readdir", "releasedir", "lookup"):
        assert after.get(op, 0) == before.get(op, 0), op


@pytest.mark.skipif(not fs.NO_OPENDIR, reason="pyfuse3 without the readdir patch")
def test_read_only_commands_keep_the_cached_listing(tmp_path):
    """A monitor polling ``status`` must not make every ``ls snapshots/`` a fresh read."""
    stats = tmp_path / "stats.json"
    env = {**os.environ, fs.STATS_ENV: str(stats)}
    with Daemon(tmp_path / "mnt", tmp_path / "store", env=env) as d, Client(d.mnt) as c:
        a = c.import_(_src(tmp_path / "a", "a"))
        assert os.listdir(d.mnt / "snapshots") == [a]
        before = _counts(d, stats)
        for _ in range(3):
            c.status()
            assert os.listdir(d.mnt / "snapshots") == [a]
        after = _counts(d, stats)
    assert after["readdir"] == before["readdir"]


def test_control_commands_show_in_listings_at_once(tmp_path):
    with Daemon(tmp_path / "mnt", tmp_path / "store") as d, Client(d.mnt) as c:
        snaps, nodes = d.mnt / "snapshots", d.mnt / "nodes"
        a = c.import_(_src(tmp_path / "a", "a"))
        assert os.listdir(snaps) == [a] and os.listdir(nodes) == []
        node = c.fork(a)
        assert os.listdir(nodes) == [node.id]
        (Path(node.path) / "new").write_text("x")
        b = c.commit(node.id)
        assert sorted(os.listdir(snaps)) == sorted([a, b])
        c.drop(node.id)
        assert os.listdir(nodes) == []
        c.prune(a)
        assert os.listdir(snaps) == [b]


def test_store_change_outside_the_daemon_shows_up(tmp_path):
    """An import straight into the store (CLI, no control file) moves ``snapshots/``'s
    mtime, so a cached listing is dropped once the attribute timeout has passed."""
    with Daemon(tmp_path / "mnt", tmp_path / "store") as d, Client(d.mnt) as c:
        snaps = d.mnt / "snapshots"
        a = c.import_(_src(tmp_path / "a", "a"))
        assert os.listdir(snaps) == [a]
        b = Cli(d.store)("import", _src(tmp_path / "b", "b")).out.strip()
        deadline = time.monotonic() + 3 * fs.DYNAMIC_TIMEOUT + 2
        while sorted(os.listdir(snaps)) != sorted([a, b]):
            assert time.monotonic() < deadline, os.listdir(snaps)
            time.sleep(0.1)
