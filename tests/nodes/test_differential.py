"""Differential test: a commit captures exactly what the node showed, and a fork shows it.

Random sequences of the edits agents make (write, append, truncate, delete, mkdir, rmdir,
rm -rf + recreate, moves of files and directories, chmod, symlinks, type changes, mtime-only
changes) are applied to a fresh node. Two oracles:

* the node's merged dir, walked with ``tree_meta`` (type, mode, size, bytes or symlink
  target, mtime to the nanosecond, owner): the committed snapshot served under
  ``snapshots/`` and a new node forked from it must equal it exactly;
* a plain host directory that got the same operations: equal in type, mode, size and bytes
  (mtimes legitimately differ: copy-up and copying moves restamp them). This catches an
  overlay set-up that breaks POSIX semantics before a commit ever sees the upper dir.

Each example commits twice from the same node (the node stays writable; the second commit
captures the later state while the first snapshot stays as it was). Examples per run:
``OPPIEFS_DIFF_EXAMPLES`` (default 50; a soak run by hand used 500).

Directory moves: nodes are mounted with ``redirect_dir=off``, so ``rename(2)`` of a
directory that exists in the lower layer fails with EXDEV, and tools fall back to copying
(``mv``, ``shutil.move``). The random ops use ``shutil.move`` like real tools;
``test_rename_of_lower_dir_is_exdev`` pins down the raw behaviour.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oppiefs import tree
from oppiefs.client import Client
from tests.nodeutil import fsck_clean, node_dirs
from tests.treeutil import assert_same_meta, det_bytes, tree_meta

POOL = ("a", "b", "c", "d", "e", "l", "d/a", "d/b", "d/c", "d/e", "d/e/a", "d/e/b", "e/a",
        "c/a")
# No "..": a relative target without it cannot lead out of the node, whatever follows it.
TARGETS = ("a", "b", "d", "d/a", "e", "nowhere")
MODES = (0o000, 0o600, 0o644, 0o444, 0o700, 0o755, 0o555, 0o4755, 0o1777)
# Multi-chunk contents (FastCDC min chunk is 16 KiB), so chunk lists are exercised too.
BLOBS = (det_bytes(100_000, "blob0"), det_bytes(300_000, "blob1"))
BASE_MTIME = 1_600_000_000_123_456_789

paths = st.sampled_from(POOL)
data = st.one_of(st.binary(max_size=40), st.sampled_from(BLOBS))
ops = st.one_of(
    st.tuples(st.just("write"), paths, data),
    st.tuples(st.just("append"), paths, data),
    st.tuples(st.just("truncate"), paths, st.sampled_from([0, 1, 17, 20_000, 150_000])),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("rm_rf_recreate"), paths),
    st.tuples(st.just("move"), paths, paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("symlink"), paths, st.sampled_from(TARGETS)),
    st.tuples(st.just("replace"), paths, st.sampled_from(["file", "dir", "symlink"])),
    # ext4 keeps nanoseconds from 1901 to 2446; include pre-epoch and far-future times.
    st.tuples(st.just("utime"), paths, st.integers(-(2**61), 2**63 - 1)),
)


def make_base(root: Path) -> None:
    """Small tree with every kind of entry the ops can hit, at fixed mtimes. ``d`` also
    holds filler files around the names the ops use, so that it is stored split into
    parts (tree.SPLIT_OVER) and commits exercise part reuse."""
    (root / "d" / "e").mkdir(parents=True)
    for i in range(tree.SPLIT_OVER + 40):
        (root / "d" / (f"{i:03d}" if i % 2 else f"z{i:03d}")).write_bytes(b"%d\n" % i)
    (root / "e").mkdir()
    (root / "a").write_bytes(b"alpha\n")
    (root / "b").write_bytes(BLOBS[0])
    os.chmod(root / "b", 0o600)
    (root / "d" / "a").write_bytes(b"d/a\n")
    os.symlink("a", root / "d" / "b")
    (root / "d" / "e" / "a").write_bytes(BLOBS[1])
    os.chmod(root / "d" / "e" / "a", 0o755)
    os.chmod(root / "e", 0o700)
    os.symlink("d", root / "l")
    for i, rel in enumerate(["d/e/a", "d/e", "d/a", "d/b", "d", "e", "a", "b", "l"]):
        ns = BASE_MTIME + i * 1_000_000_007
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)


def _remove(p: Path) -> None:
    """``rm -rf``: a directory (not a symlink to one) recursively, anything else unlinked."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)


def apply(root: Path, op: tuple) -> str:
    """Apply one op below ``root``; return "ok" or the name of the error it raised."""
    kind, rel, *args = op
    p = root / rel
    try:
        if kind == "write":
            with open(p, "wb") as f:
                f.write(args[0])
        elif kind == "append":
            with open(p, "ab") as f:
                f.write(args[0])
        elif kind == "truncate":
            os.truncate(p, args[0])
        elif kind == "unlink":
            os.unlink(p)
        elif kind == "mkdir":
            os.mkdir(p)
        elif kind == "rmdir":
            os.rmdir(p)
        elif kind == "rm_rf_recreate":
            _remove(p)
            os.mkdir(p)
            (p / "new").write_bytes(b"recreated\n")
        elif kind == "move":
            shutil.move(p, root / args[0])
        elif kind == "chmod":
            os.chmod(p, args[0])
        elif kind == "symlink":
            os.symlink(args[0], p)
        elif kind == "replace":
            _remove(p)
            if args[0] == "file":
                p.write_bytes(b"replaced\n")
            elif args[0] == "dir":
                os.mkdir(p)
            else:
                os.symlink("a", p)
        elif kind == "utime":
            os.utime(p, ns=(args[0], args[0]), follow_symlinks=False)
        else:  # pragma: no cover
            raise AssertionError(kind)
    except (OSError, shutil.Error) as exc:
        return type(exc).__name__
    return "ok"


def without_times(meta: dict[bytes, tuple]) -> dict[bytes, tuple]:
    return {k: (v[0], v[1], v[2], v[4]) for k, v in meta.items()}


@pytest.fixture(scope="module")
def base(mdaemon, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("differential")
    src = work / "base"
    src.mkdir()
    make_base(src)
    client = Client(mdaemon.mnt)
    snap = client.import_(src)
    with tree.open_store(mdaemon.store, create=False) as store:
        reader = tree.Reader(store)
        assert reader.tree(reader.lookup(bytes.fromhex(snap), "d").ref).parts is not None
    try:
        yield client, snap, src, work
    finally:
        client.close()


_counter = itertools.count()


@settings(max_examples=int(os.environ.get("OPPIEFS_DIFF_EXAMPLES", "50")), deadline=None,
          database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(first=st.lists(ops, max_size=12), second=st.lists(ops, max_size=8))
def test_commit_equals_merged_view(mdaemon, base, first, second):
    client, snap, src, work = base
    mirror = work / f"mirror-{next(_counter)}"
    shutil.copytree(src, mirror, symlinks=True)
    node = client.fork(snap)
    forks: list[str] = []
    commits: list[str] = []
    try:
        merged = Path(node.path)
        snaps = []
        for batch in (first, second):
            for op in batch:
                got, want = apply(merged, op), apply(mirror, op)
                event(f"{op[0]}: {got}")
                assert got == want, f"{op}: node gave {got}, host dir gave {want}"
            meta = tree_meta(merged, owners=True)
            assert_same_meta(without_times(tree_meta(mirror)), without_times(meta),
                             "host dir vs node")
            commits.append(client.commit(node.id))
            assert_same_meta(meta, tree_meta(mdaemon.mnt / "snapshots" / commits[-1],
                                             owners=True), "node vs its commit")
            snaps.append((commits[-1], meta))
        # The first commit still shows the first state; a fork of the last shows the last.
        first_id, first_meta = snaps[0]
        assert_same_meta(first_meta, tree_meta(mdaemon.mnt / "snapshots" / first_id,
                                               owners=True), "first commit after the second")
        child = client.fork(snaps[1][0])
        forks.append(child.id)
        assert_same_meta(snaps[1][1], tree_meta(child.path, owners=True), "fork of commit")
    finally:
        for n in [*forks, node.id]:
            client.drop(n)
        for s in commits:
            client.prune(s)
        shutil.rmtree(mirror, ignore_errors=True)


def test_commit_twice_from_one_node(mdaemon, base):
    """The node stays writable after a commit; each commit is the state at its moment."""
    client, snap, _, _ = base
    node = client.fork(snap)
    merged = Path(node.path)
    try:
        (merged / "a").write_bytes(b"first\n")
        s1 = client.commit(node.id)
        (merged / "a").write_bytes(b"second\n")
        (merged / "new").write_bytes(b"later\n")
        s2 = client.commit(node.id)
        assert s1 != s2
        assert (mdaemon.mnt / "snapshots" / s1 / "a").read_bytes() == b"first\n"
        assert not (mdaemon.mnt / "snapshots" / s1 / "new").exists()
        assert (mdaemon.mnt / "snapshots" / s2 / "a").read_bytes() == b"second\n"
        assert (mdaemon.mnt / "snapshots" / s2 / "new").read_bytes() == b"later\n"
        # Committing an unchanged node again gives the same id (and one more reference).
        assert client.commit(node.id) == s2
        client.prune(s2)
        assert s2 in os.listdir(mdaemon.mnt / "snapshots")
        client.prune(s2)
        client.prune(s1)
        assert not {s1, s2} & set(os.listdir(mdaemon.mnt / "snapshots"))
    finally:
        client.drop(node.id)


def test_commit_of_unchanged_node_returns_base_id(mdaemon, base):
    client, snap, _, _ = base
    before = client.status()["snapshots"]
    node = client.fork(snap)
    try:
        assert client.commit(node.id) == snap
        assert client.status()["snapshots"] == before
    finally:
        client.drop(node.id)
    client.prune(snap)  # the commit took a reference of its own
    assert snap in os.listdir(mdaemon.mnt / "snapshots")


def test_commit_equal_to_other_snapshot_returns_its_id(mdaemon, base, tmp_path):
    """Editing a node into exactly another imported tree yields that tree's id."""
    client, snap, src, _ = base
    other = tmp_path / "other"
    shutil.copytree(src, other, symlinks=True)
    (other / "a").write_bytes(b"changed\n")
    shutil.rmtree(other / "d" / "e")
    os.symlink("nowhere", other / "new-link")
    for rel, ns in (("a", 5), ("d", 6), ("new-link", 7)):
        os.utime(other / rel, ns=(ns, ns), follow_symlinks=False)
    other_id = client.import_(other)
    node = client.fork(snap)
    merged = Path(node.path)
    try:
        (merged / "a").write_bytes(b"changed\n")
        shutil.rmtree(merged / "d" / "e")
        os.symlink("nowhere", merged / "new-link")
        for rel, ns in (("a", 5), ("d", 6), ("new-link", 7)):
            os.utime(merged / rel, ns=(ns, ns), follow_symlinks=False)
        before = client.status()["snapshots"]
        assert client.commit(node.id) == other_id
        assert client.status()["snapshots"] == before
    finally:
        client.drop(node.id)
    client.prune(other_id)
    client.prune(other_id)
    assert other_id not in os.listdir(mdaemon.mnt / "snapshots")


def test_rename_of_lower_dir_is_exdev(mdaemon, base):
    """redirect_dir=off: renaming a lower directory is EXDEV (tools copy); files rename."""
    client, snap, _, _ = base
    node = client.fork(snap)
    merged = Path(node.path)
    try:
        with pytest.raises(OSError) as exc:
            os.rename(merged / "d", merged / "d2")
        assert exc.value.errno == errno.EXDEV
        os.rename(merged / "a", merged / "a2")  # files: copy-up, then a plain rename
        (merged / "fresh").mkdir()  # a directory only in the upper layer renames fine
        os.rename(merged / "fresh", merged / "fresh2")
        shutil.move(merged / "d", merged / "d2")  # the copying fallback
        s = client.commit(node.id)
        names = sorted(os.listdir(mdaemon.mnt / "snapshots" / s))
        assert names == ["a2", "b", "d2", "e", "fresh2", "l"]
        assert (mdaemon.mnt / "snapshots" / s / "d2" / "e" / "a").read_bytes() == BLOBS[1]
        client.prune(s)
    finally:
        client.drop(node.id)


def test_module_left_nothing_behind(mdaemon, base):
    """Every example dropped its nodes and pruned its commits; refcounts are exact."""
    client, _, _, _ = base
    st_ = client.status()
    assert st_["nodes"] == 0 and st_["snapshots"] == 1
    assert node_dirs(mdaemon.store) == []
    assert os.listdir(mdaemon.mnt / "nodes") == []
    fsck_clean(mdaemon.store)
