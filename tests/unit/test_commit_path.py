"""The commit fast path: spliced directories and references counted later by the sweeper.

What must hold: a spliced directory is byte for byte what encoding it from scratch gives
(same id), and the tree it hands the reader equals the decoded one; a commit's
directories log themselves, not their children, and once the sweeper applies that log
every count is exact (fsck clean), objects the commit made stay until nothing needs them,
and nothing else is freed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from oppiefs import overlay, tree
from oppiefs.errors import Corrupt
from oppiefs.state import StateManager
from oppiefs.store import KIND_CHUNK, KIND_TREE, Store
from oppiefs.store import oid_of as store_oid
from tests.treeutil import commit_upper, with_changes


def _entry(rng: random.Random, name: bytes) -> tree.Entry:
    kind = rng.choice([tree.T_FILE, tree.T_CHUNKED, tree.T_DIR, tree.T_SYMLINK])
    if kind == tree.T_SYMLINK:
        return tree.Entry(name, kind, 0o777, 0, 0, 3, rng.randrange(1 << 60), tree.ZERO_ID,
                          rng.randbytes(rng.randrange(1, 40)))
    return tree.Entry(name, kind, rng.choice([0o644, 0o755, 0o4711]), rng.randrange(3),
                      rng.randrange(3), rng.randrange(1 << 40), rng.randrange(-(1 << 62), 1 << 62),
                      rng.randbytes(32))


def _tally(entries: list[tree.Entry]) -> tree.Tally:
    return tree.Tally.of(entries, sub_bytes=1234, sub_files=5)


@pytest.mark.parametrize("seed", range(40))
def test_splice_equals_a_fresh_encoding(seed: int) -> None:
    rng = random.Random(seed)
    names = sorted({rng.randbytes(rng.randrange(1, 12)) for _ in range(rng.randrange(0, 120))})
    lower_entries = [_entry(rng, n) for n in names]
    payload, _, _ = tree.encode_tree(lower_entries, 1234, 5)
    lower = tree.decode_tree(payload, offsets=rng.random() < 0.5)  # a commit's decode: True
    changes: dict[bytes, tree.Entry | None] = {}
    for _ in range(rng.randrange(1, 12)):
        if names and rng.random() < 0.6:
            name = rng.choice(names)  # change or remove an existing name
        else:
            name = rng.randbytes(rng.randrange(1, 12))  # add one (or remove a missing one)
        changes[name] = None if rng.random() < 0.3 else _entry(rng, name)
    want = with_changes(lower_entries, changes)
    expected, _, _ = tree.encode_tree(want, 1234, 5)
    spliced, new = tree.splice_tree(payload, lower, changes, _tally(want))
    assert spliced == expected
    decoded = tree.decode_tree(expected)
    assert (new.entries, new.total_bytes, new.total_files) == (
        decoded.entries, decoded.total_bytes, decoded.total_files)
    # What the next splice on top uses, built alongside instead of from every entry:
    assert (new.names, new.offsets) == (decoded.names, decoded.offsets)
    # A decode that records the offsets as it goes agrees with counting them afterwards.
    assert tree.decode_tree(expected, offsets=True).offsets == decoded.offsets
    files = [e for e in want if e.is_file]
    assert decoded.tally == tree.Tally(decoded.total_bytes, decoded.total_files,
                                       sum(e.size for e in files), len(files),
                                       tree.subtree_entries(want))
    for name in new.names:
        assert new.get(name) == decoded.get(name)


def _same_size(rng: random.Random, e: tree.Entry) -> tree.Entry:
    """Another entry of the same name whose record has the same size (what a commit
    writes for a directory on a changed path, or a rewritten file)."""
    if e.type == tree.T_SYMLINK:
        return e._replace(target=rng.randbytes(len(e.target)), mtime_ns=rng.randrange(1 << 60))
    kind = e.type if e.type == tree.T_DIR else rng.choice([tree.T_FILE, tree.T_CHUNKED])
    return e._replace(type=kind, ref=rng.randbytes(32), size=rng.randrange(1 << 40),
                      mode=rng.choice([0o644, 0o755]), mtime_ns=rng.randrange(1 << 60))


@pytest.mark.parametrize("seed", range(20))
def test_replacing_entries_in_place_equals_a_fresh_encoding(seed: int) -> None:
    """Replacements of same-size records keep names and offsets: the new tree shares them
    (and the name index) with the old one, which must stay as it was; chained splices on
    top still equal fresh encodings."""
    rng = random.Random(seed)
    names = sorted({rng.randbytes(rng.randrange(1, 12)) for _ in range(rng.randrange(1, 120))})
    entries = [_entry(rng, n) for n in names]
    payload, _, _ = tree.encode_tree(entries, 1234, 5)
    lower = tree.decode_tree(payload, offsets=True)
    for _ in range(4):
        before = list(lower.entries)
        changes: dict[bytes, tree.Entry | None] = {
            name: _same_size(rng, lower.get(name))
            for name in rng.sample(names, rng.randrange(1, min(len(names), 8) + 1))}
        want = with_changes(entries, changes)
        expected, _, _ = tree.encode_tree(want, 1234, 5)
        spliced, new = tree.splice_tree(payload, lower, changes, _tally(want))
        assert spliced == expected
        decoded = tree.decode_tree(expected, offsets=True)
        assert (new.entries, new.names, new.offsets, new.total_bytes, new.total_files) == (
            decoded.entries, decoded.names, decoded.offsets, decoded.total_bytes,
            decoded.total_files)
        assert lower.entries == before  # the lower tree is left as it was
        for name in names:
            assert new.get(name) == decoded.get(name)
            assert lower.get(name) == before[names.index(name)]
        payload, lower, entries = spliced, new, want


def test_commit_logs_its_directories_and_the_sweeper_counts_their_children(
        store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("a/b/c", "a/x", "z"):
        (src / d).mkdir(parents=True)
    for i in range(60):
        (src / "a" / "b" / "c" / f"f{i:02d}").write_bytes(b"c%d" % i)
        (src / "a" / "x" / f"g{i:02d}").write_bytes(b"x%d" % i)
    (src / "z" / "keep").write_bytes(b"keep")
    base = tree.import_dir(store, src).root
    reader = tree.Reader(store)
    upper = tmp_path / "upper"
    (upper / "a" / "b" / "c").mkdir(parents=True)
    (upper / "a" / "b" / "c" / "f07").write_bytes(b"changed")
    (upper / "a" / "b" / "c" / "new").write_bytes(b"a new file, stored by this commit")
    os.mknod(upper / "a" / "b" / "c" / "f08", 0o600 | 0o020000, 0)  # whiteout
    child = commit_upper(store, reader, base, upper)

    # Logged, not applied: still exact for fsck (which reads the log) and for refcount().
    assert store.check() == []
    new_file = reader.lookup(child, "a/b/c/new").ref
    assert store.refcount(new_file) == 1
    unchanged = reader.lookup(child, "a/b/c/f09").ref
    assert store.refcount(unchanged) == 2  # in the base and in the child
    with store.read() as txn:
        records = [raw for _, raw in txn.cursor(db=store.db["pending"])]
    assert any(raw[:1] == b"P" for raw in records)
    # The new directories are logged as parents, 32 bytes each, not their 60 children.
    assert sum(len(raw) for raw in records) < 32 * 10

    # The sweeper applies the log; nothing either snapshot needs goes.
    store.sweep(keep=0)
    assert store.check() == []
    with store.read() as txn:
        assert txn.stat(store.db["pending"])["entries"] == 0
    assert store.refcount(unchanged) == 2
    for snap in (base, child):
        for _path, e in reader.walk(snap):
            if e.is_file:
                reader.read_all(e)

    # Pruning the child frees exactly what only it used.
    store.release(child)
    store.sweep()
    assert store.check() == []
    assert not store.exists(new_file)
    assert store.exists(unchanged) and store.refcount(unchanged) == 1
    assert store.exists(reader.lookup(base, "a/b/c/f08").ref)


def test_an_aborted_commit_leaves_nothing_behind(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i}").write_bytes(b"%d" % i)
    base = tree.import_dir(store, src).root
    before = store.stats()
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "f3").write_bytes(b"never published")
    reader = tree.Reader(store)
    with store.writer() as w:
        built = tree.apply_upper(reader, w, base, os.fsencode(upper), overlay.UPPER_DIR)
        w.flush()  # written, then the session ends unpublished
        w.wait()
    assert store.exists(built.oid)
    store.sweep()
    assert not store.exists(built.oid)
    assert store.stats().objects == before.objects
    assert store.check() == []
    kind, _ = store.get(reader.lookup(base, "d").ref)
    assert kind == KIND_TREE


def test_a_log_record_of_children_is_never_read_as_parents(store: Store) -> None:
    """Records of child oids (every store before parent records, and imports still) may
    start with the parent marker's byte: the length tells them apart."""
    w = store.writer()
    n = 0
    while True:  # a chunk whose id starts with b"P", as a child record's first oid would
        payload = b"chunk %d" % n
        if store_oid(payload)[:1] == b"P":
            break
        n += 1
    chunk = w.put(KIND_CHUNK, payload, ())
    store.publish(w, chunk, parent=None, logical_bytes=0, files=0)  # stored, counted once
    store.write(lambda txn: store._log_increments(txn, [chunk]))
    with store.read() as txn:
        assert [children for _, children in store._logged(txn)] == [[chunk]]
    assert store.refcount(chunk) == 2
    store.sweep(keep=0)  # applied as one increment of that chunk
    with store.read() as txn:
        assert txn.stat(store.db["pending"])["entries"] == 0
    assert store.refcount(chunk) == 2


def test_trees_a_commit_hands_the_reader_equal_the_stored_ones(
        store: Store, tmp_path: Path) -> None:
    """The next commit on top takes a just-written directory (spliced or split) from the
    reader, totals included, instead of decoding it: it must be what decoding gives."""
    src = tmp_path / "src"
    (src / "big" / "sub").mkdir(parents=True)
    (src / "small").mkdir()
    for i in range(400):  # split into parts
        (src / "big" / f"f{i:03d}").write_bytes(b"b" * (i % 7))
    for i in range(20):
        (src / "small" / f"s{i}").write_bytes(b"s%d" % i)
        (src / "big" / "sub" / f"t{i}").write_bytes(b"t%d" % i)
    base = tree.import_dir(store, src).root
    reader = tree.Reader(store)
    rng = random.Random(3)
    handed: dict[bytes, tree.Tree] = {}
    for round_ in range(12):
        upper = tmp_path / f"upper{round_}"
        for d in ("big/sub", "small"):
            (upper / d).mkdir(parents=True)
        for _ in range(rng.randrange(1, 6)):
            (upper / "big" / f"f{rng.randrange(500):03d}").write_bytes(rng.randbytes(9))
        os.mknod(upper / "big" / f"f{rng.randrange(400):03d}", 0o600 | 0o020000, 0)
        (upper / "big" / "sub" / f"t{rng.randrange(30)}").write_bytes(b"x")
        (upper / "small" / f"s{rng.randrange(30)}").write_bytes(b"y")
        base = commit_upper(store, reader, base, upper)
        # A split directory is handed over as its parts' trees and committed on as such:
        # its whole entry list is never put together (the cost of a commit is the parts
        # it changes).
        assert all("entries" not in t.__dict__ for t in handed.values() if t.parts)
        handed = dict(reader._written)
        assert any(t.parts for t in handed.values())
        fresh = tree.Reader(store)
        for oid, t in handed.items():
            entries = t.entries if t.parts is None else []  # (a split one's: from its parts)
            for (part, _), pt in zip(t.parts or (), getattr(t, "part_trees", ()), strict=True):
                got = fresh.part(part)
                assert (pt.entries, pt.total_bytes, pt.total_files) == (
                    got.entries, got.total_bytes, got.total_files)
                assert pt.payload in (None, fresh.payload(part))
                entries += pt.entries
            want = fresh.tree(oid)
            assert not t.parts or t.lasts == want.lasts
            assert (entries, t.total_bytes, t.total_files, t.parts) == (
                want.entries, want.total_bytes, want.total_files, want.parts)
            assert t.tally == tree.Tree(want.entries, want.total_bytes, want.total_files).tally
    assert store.check() == []


def test_trees_held_for_the_next_commit_are_bounded_by_their_entries(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree, "WRITTEN_ITEMS", 50)
    reader = tree.Reader(store)
    rng = random.Random(1)
    trees = {}
    for _ in range(6):
        entries = [_entry(rng, b"n%02d" % i) for i in range(20)]
        payload, nbytes, nfiles = tree.encode_tree(entries)
        trees[store_oid(payload)] = t = tree.Tree(entries, nbytes, nfiles)
        reader.remember(store_oid(payload), t)
        assert reader._written_items == 20 * len(reader._written) <= 50
    assert list(reader._written) == list(trees)[-2:]  # the newest stay
    newest = list(trees)[-1]
    assert reader.tree(newest) is trees[newest]  # taken without the store (never written)
    assert reader._written_items == 20


def test_a_warmed_reader_commits_without_reading_a_tree(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon warms its commit reader after an import: top levels first, never past
    the limit, and the next commit then reads no directory from the store."""
    src = tmp_path / "src"
    for d in ("a/x/deep", "a/y", "b", "big"):
        (src / d).mkdir(parents=True)
    for i in range(300):  # a split directory
        (src / "big" / f"f{i:03d}").write_bytes(b"%d" % i)
    for d in ("a/x/deep", "a/y", "b"):
        (src / d / "f").write_bytes(d.encode())  # no two directories alike
    root = tree.import_dir(store, src).root
    reader = tree.commit_reader(store)
    reads: list[bytes] = []
    payload = reader.payload
    monkeypatch.setattr(reader, "payload", lambda oid: reads.append(oid) or payload(oid))

    def ref(path: str) -> bytes:
        return tree.Reader(store).lookup(root, path).ref

    assert reader.warm(root, 3) == 3
    assert reads == [root, ref("a"), ref("b")]  # top levels first
    assert reader.warm(root, 100) == 7  # and then: big (an index and its parts), x, y, deep
    assert reads[3] == ref("big") and reads[-3:] == [ref("a/x"), ref("a/y"), ref("a/x/deep")]
    assert "entries" not in reader.tree(ref("big")).__dict__  # its parts were walked
    del reads[:]
    upper = tmp_path / "upper"
    (upper / "a" / "x" / "deep").mkdir(parents=True)
    (upper / "big").mkdir()
    (upper / "a" / "x" / "deep" / "f").write_bytes(b"changed")
    (upper / "big" / "f150").write_bytes(b"changed")
    new = commit_upper(store, reader, root, upper)
    assert reads == []
    fresh = tree.Reader(store)
    assert fresh.read_all(fresh.lookup(new, "a/x/deep/f")) == b"changed"
    assert fresh.read_all(fresh.lookup(new, "big/f150")) == b"changed"


def test_an_import_warms_the_daemons_commit_reader(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    for d in ("a/b", "c"):
        (src / d).mkdir(parents=True)
        (src / d / "f").write_bytes(d.encode())
    mnt.mkdir()
    sm = StateManager(store, mnt)
    try:
        snapshot = sm.import_path(str(src))["snapshot"]
        assert sm.reader.tree.cache_info().currsize == 4  # type: ignore[attr-defined]
        assert sm.reader.tree(bytes.fromhex(snapshot)).names == [b"a", b"c"]
        # The snapshot is published before the warm: a tree it cannot read (pruned and
        # swept by then, say) leaves the import's reply as it is.
        sm.reader.tree.cache_clear()  # type: ignore[attr-defined]

        def missing(oid: bytes) -> bytes:
            raise Corrupt(f"object {oid.hex()} is missing from the store")

        monkeypatch.setattr(sm.reader, "payload", missing)
        assert sm.import_path(str(src))["snapshot"] == snapshot
    finally:
        sm.mounter.close()
