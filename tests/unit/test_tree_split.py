"""Large directories stored as an index over content-defined parts.

What must hold: a split directory reads back exactly like a flat one; a commit rewrites
only the parts a changed name falls into; the cut is a pure function of the entries (a
tree reached by a commit has the id of the same tree built from scratch); damage to a part
is reported, never papered over; GC and fsck follow the index's edges.
"""

from __future__ import annotations

import os
import random
import shutil
import zlib
from pathlib import Path

import pytest

from oppiefs import overlay, tree
from oppiefs.errors import Corrupt
from oppiefs.store import KIND_TREE, Store
from tests.treeutil import with_changes


def _names(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    odd = [b"with space", b"\xff\xfenot-utf8", b"-dash", b"a\nnewline", b"\xe2\x98\x83"]
    return odd + [f"f{rng.randrange(10**9):09d}.c".encode() for _ in range(n - len(odd))]


def _fill(root: Path, names: list[bytes]) -> None:
    d = os.fsencode(root / "big")
    os.makedirs(d, exist_ok=True)
    for name in names:
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"content of " + name)
    os.makedirs(root / "big" / "sub", exist_ok=True)
    (root / "big" / "sub" / "x").write_bytes(b"x" * 5000)


def _assert_lookups_match(t: tree.Tree, entries: list[tree.Entry]) -> None:
    """A split tree's names, totals and lookups are those of its entries. The reader takes
    them from the parts, and looks names up by binary search: every name must be found,
    and names before, between and after them must not."""
    assert t.entries == entries and t.names == [e.name for e in entries]
    want = tree.Tally.of(entries)
    want.bytes, want.files = t.total_bytes, t.total_files
    assert t.tally == want
    for i, e in enumerate(entries):
        assert t.index_of(e.name) == i and t.get(e.name) == e
        assert t.get(e.name + b"\0") is None
    for absent in (b"", b"\0", b"\xff" * 16):
        assert t.get(absent) is None


def test_split_directory_reads_back_like_the_source(store: Store, tmp_path: Path) -> None:
    names = _names(1000, 1)
    _fill(tmp_path / "src", names)
    rep = tree.import_dir(store, tmp_path / "src")
    reader = tree.Reader(store)
    big = reader.lookup(rep.root, "big")
    t = reader.tree(big.ref)
    assert isinstance(t, tree.SplitTree) and len(t.parts) > 10
    assert all(0 < n <= tree.PART_MAX for _, n in t.parts)
    # Lookups go to the part a name falls into: the whole entry list is put together only
    # for a listing (a commit looks up a few names in each new version of the directory).
    assert all(t.get(name).name == name for name in names)
    assert t.get(b"\xff" * 16) is None and t.size == len(names) + 1
    assert "entries" not in t.__dict__ and "names" not in t.__dict__
    assert [e.name for e in t.entries] == sorted([*names, b"sub"])
    _assert_lookups_match(t, list(t.entries))
    _assert_lookups_match(tree.Reader(store, keep_payloads=True).tree(big.ref), list(t.entries))
    assert big.size == len(t.entries) + 1  # entries below: every name plus sub/x
    assert (t.total_files, t.total_bytes) == (len(names) + 1,
                                              sum(len(b"content of " + n) for n in names) + 5000)
    for name in names[:20]:
        entry = reader.lookup(rep.root, b"big/" + name)
        assert reader.read_all(entry) == b"content of " + name
    assert reader.read_all(reader.lookup(rep.root, "big/sub/x")) == b"x" * 5000
    assert store.check() == []


def test_commit_rewrites_only_touched_parts_and_matches_a_fresh_build(
        store: Store, tmp_path: Path) -> None:
    names = _names(2000, 2)
    _fill(tmp_path / "src", names)
    base = tree.import_dir(store, tmp_path / "src")
    reader = tree.Reader(store)
    old = reader.tree(reader.lookup(base.root, "big").ref)
    rng = random.Random(3)
    # Cut ends (part boundaries) are the risky names: delete one, change one, add some.
    ends, pos = [], 0
    for _, n in old.parts or []:
        pos += n
        ends.append(old.entries[pos - 1].name)
    deleted, changed = ends[3], rng.choice(names)
    upper = os.fsencode(tmp_path / "upper" / "big")
    os.makedirs(upper)
    os.mknod(os.path.join(upper, deleted), 0o600 | 0o020000, 0)  # whiteout
    with open(os.path.join(upper, changed), "wb") as f:
        f.write(b"new content")
    for i in range(3):
        with open(os.path.join(upper, b"added-%d" % i), "wb") as f:
            f.write(b"added")
    with store.writer() as w:
        built = tree.apply_upper(reader, w, base.root, os.fsencode(tmp_path / "upper"),
                                 overlay.UPPER_DIR)
        store.publish(w, built.oid, parent=None, logical_bytes=built.bytes, files=built.files)
    new = reader.tree(reader.lookup(built.oid, "big").ref)
    fresh_parts = [p for p in new.parts or [] if p not in (old.parts or [])]
    assert len(fresh_parts) <= 6  # delete (merges two parts), change, three adds
    # Totals kept by difference equal a recount.
    assert reader.lookup(built.oid, "big").size == tree.subtree_entries(new.entries)
    walked = [e for _, e in reader.walk(built.oid) if e.is_file]
    top = reader.tree(built.oid)
    assert (top.total_bytes, top.total_files) == (sum(e.size for e in walked), len(walked))
    got = {e.name for e in new.entries}
    assert deleted not in got and {b"added-0", b"added-1", b"added-2"} <= got
    assert reader.read_all(reader.lookup(built.oid, b"big/" + changed)) == b"new content"
    # The same entries built from scratch, with nothing to reuse, get the same id.
    with store.writer() as w:
        again = tree.put_tree(w, list(new.entries), reader.tree(
            reader.lookup(built.oid, "big/sub").ref).total_bytes, 1)
    assert again.oid == reader.lookup(built.oid, "big").ref
    # And a fresh import of the same content gets the committed snapshot's id.
    src = os.fsencode(tmp_path / "src" / "big")
    os.unlink(os.path.join(src, deleted))
    for name in os.listdir(upper):
        if name != deleted:
            shutil.copy2(os.path.join(upper, name), os.path.join(src, name))
    st = os.stat(upper)
    os.chmod(src, st.st_mode & 0o7777)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree.import_dir(store, tmp_path / "src").root == built.oid
    assert store.check() == []


def test_cut_is_content_defined(store: Store) -> None:
    entries = [tree.Entry(n, tree.T_FILE, 0o644, 0, 0, 1, 0, bytes([1]) * 32)
               for n in sorted(_names(3000, 4))]
    runs = tree.cut_parts(entries)
    assert runs[0][0] == 0 and runs[-1][1] == len(entries)
    # Inserting a name moves no cut outside the run it lands in.
    extra = tree.Entry(b"f5", tree.T_FILE, 0o644, 0, 0, 1, 0, bytes([2]) * 32)
    grown = sorted([*entries, extra], key=lambda e: e.name)
    ends = {entries[e - 1].name for _, e in runs}
    ends_after = {grown[e - 1].name for _, e in tree.cut_parts(grown)}
    assert len(ends ^ ends_after) <= 2


def test_damaged_part_is_reported(store: Store, tmp_path: Path) -> None:
    _fill(tmp_path / "src", _names(600, 5))
    rep = tree.import_dir(store, tmp_path / "src")
    reader = tree.Reader(store)
    parts = reader.tree(reader.lookup(rep.root, "big").ref).parts or []
    victim = parts[len(parts) // 2][0]

    def flip(txn) -> None:
        slot = store._slot(txn, victim)
        raw = bytearray(txn.get(slot, db=store.db["data"]))
        raw[-1] ^= 0xFF
        txn.put(slot, bytes(raw), db=store.db["data"])

    store.write(flip)
    with pytest.raises(Corrupt):
        tree.Reader(store).lookup(rep.root, "big/sub")
    assert any(victim.hex() in p for p in store.check())


def test_index_edges_drive_gc(store: Store, tmp_path: Path) -> None:
    _fill(tmp_path / "src", _names(700, 6))
    rep = tree.import_dir(store, tmp_path / "src")
    index = tree.Reader(store).lookup(rep.root, "big").ref
    kind, payload = store.get(index)
    assert kind == KIND_TREE and payload.startswith(tree.INDEX_MAGIC)
    assert len(tree.children_of(kind, payload)) == len(
        tree.Reader(store).tree(index).parts or [])
    store.release(rep.root)
    store.sweep()
    assert store.stats().objects == 0
    assert store.check() == []


def _no_cut_names(n: int, seed: int) -> list[bytes]:
    """Names none of which ends a part by content, so runs of them end at PART_MAX."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        name = b"m%08d" % rng.randrange(10**8)
        if zlib.crc32(name) & tree.PART_MASK:
            out.append(name)
    return out


@pytest.mark.parametrize("spliced", [False, True], ids=["recut", "recut+splice"])
def test_incremental_recut_equals_a_fresh_build(store: Store, spliced: bool) -> None:
    """put_changes (re-cutting only touched runs of parts) gives the id a full build gives,
    for random inserts, deletes and changes, including next to part ends and inside long
    runs whose cuts are forced by PART_MAX (there an edit moves every later forced cut).
    Given the reader, a part whose entries are only replaced is spliced instead."""
    def entry(name: bytes, mtime: int = 0) -> tree.Entry:
        return tree.Entry(name, tree.T_FILE, 0o644, 0, 0, mtime % 5 * 100, mtime)

    names = sorted(set(_names(900, 7) + _no_cut_names(400, 8)))
    base = [entry(n) for n in names]
    with store.writer() as w:
        built = tree.put_tree(w, base, 0, 0)
        store.publish(w, built.oid, parent=None, logical_bytes=0, files=len(base))
    reader = tree.Reader(store)
    lower = reader.tree(built.oid)
    assert lower.parts is not None
    assert max(n for _, n in lower.parts) == tree.PART_MAX
    rng = random.Random(9)
    pool = _names(300, 10) + _no_cut_names(100, 11)
    for round_ in range(150):
        changes: dict[bytes, tree.Entry | None] = {}
        for _ in range(rng.choice([1, 2, 5, 40])):
            pick = rng.random()
            if pick < 0.35:
                changes[rng.choice(names)] = None
            elif pick < 0.7:
                changes[rng.choice(names)] = entry(rng.choice(names), round_ + 1)
            else:
                new = rng.choice(pool)
                changes[new] = entry(new, round_ + 1)
        for name, e in list(changes.items()):  # a change keeps its own name
            if e is not None and e.name != name:
                changes[name] = e._replace(name=name)
        want_entries = with_changes(base, changes)
        tally = tree.Tally.of(want_entries)
        with store.writer() as w:
            got = (tree.put_changes(w, lower, changes, tally, reader, built.oid) if spliced
                   else tree.put_changes(w, lower, changes, tally))
            want = tree.put_tree(w, want_entries, 0, 0)
        assert got == want, f"round {round_}: {len(changes)} changes"
        if spliced:  # handed to the reader (the writer stored nothing: it was aborted)
            _assert_lookups_match(reader.tree(got.oid), want_entries)


def test_large_decoded_trees_do_not_pile_up_in_the_caches(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches are bounded by count; decoded split directories are bounded by a budget.

    Thousands of snapshots, each with its own version of a big directory, would otherwise
    keep 4096 whole copies of it decoded. After ``big_budget`` items of large objects the
    caches start over, and everything still reads back the same.
    """
    monkeypatch.setattr(tree, "BIG_ITEMS", 100)
    roots = []
    for k in range(4):  # four versions of one 302-entry (split) directory
        _fill(tmp_path / f"src{k}", [*_names(300, 7), f"version-{k}".encode()])
        roots.append(tree.import_dir(store, tmp_path / f"src{k}").root)
    reader = tree.Reader(store, big_budget=700)
    other = []
    reader.also_clear(other.clear)
    bigs = [reader.lookup(root, "big").ref for root in roots]
    decoded = [reader.tree(oid) for oid in bigs[:2]]  # 604 items: within the budget
    assert reader.big_decoded == 604 and reader.tree.cache_info().currsize >= 2
    other.append("still cached")
    third = reader.tree(bigs[2])  # 906 > 700: every cache starts over, this one kept
    assert reader.big_decoded == 0 and other == []
    assert reader.tree.cache_info().currsize == 1 and reader.tree(bigs[2]) is third
    for k, oid in enumerate(bigs):
        names = [e.name for e in reader.tree(oid).entries]
        assert f"version-{k}".encode() in names and len(names) == 302
    assert [e.name for e in decoded[0].entries] == [e.name for e in reader.tree(bigs[0]).entries]


def test_a_new_version_of_a_split_directory_decodes_only_its_new_parts(
        store: Store, tmp_path: Path) -> None:
    """Each commit makes a new version of the big directories on its paths; their parts are
    mostly the old ones, cached on their own, so a commit's decode follows its change."""
    names = _names(2000, 4)
    _fill(tmp_path / "src", names)
    v1 = tree.import_dir(store, tmp_path / "src").root
    (tmp_path / "src" / "big" / os.fsdecode(names[100])).write_bytes(b"changed")
    v2 = tree.import_dir(store, tmp_path / "src").root
    reader = tree.Reader(store, keep_payloads=True)  # as a commit's
    one = reader.tree(reader.lookup(v1, "big").ref)
    misses = reader.part.cache_info().misses  # type: ignore[attr-defined]
    two = reader.tree(reader.lookup(v2, "big").ref)
    assert one.parts is not None and two.parts is not None and len(one.parts) > 20
    new_parts = len(set(two.parts) - set(one.parts))
    assert new_parts == 1
    assert reader.part.cache_info().misses - misses == new_parts  # type: ignore[attr-defined]
    assert [e.name for e in two.entries] == [e.name for e in one.entries]
    _assert_lookups_match(two, list(two.entries))


def test_tree_refs_reads_the_references_a_decode_gives() -> None:
    """The sweeper's reader of a tree's references skips decoding its entries: it must name
    exactly the references of the decoded tree, and refuse a cut or padded payload."""
    rng = random.Random(7)
    kinds = [tree.T_FILE, tree.T_CHUNKED, tree.T_DIR, tree.T_SYMLINK]
    for _ in range(300):
        entries = []
        for i in range(rng.randint(0, 40)):
            etype = rng.choice(kinds)
            empty = etype == tree.T_SYMLINK or (etype == tree.T_FILE and rng.random() < 0.3)
            entries.append(tree.Entry(
                f"n{i}{'x' * rng.randint(0, 30)}".encode(), etype, 0o644, 0, 0, rng.randint(0, 99),
                5, tree.ZERO_ID if empty else rng.randbytes(32),
                rng.randbytes(rng.randint(1, 50)) if etype == tree.T_SYMLINK else b""))
        payload, _, _ = tree.encode_tree(entries)
        want = [e.ref for e in tree.decode_tree(payload).entries
                if e.type in (tree.T_CHUNKED, tree.T_DIR)
                or (e.type == tree.T_FILE and e.ref != tree.ZERO_ID)]
        assert tree.tree_refs(payload) == want
        for bad in (payload[:-1], payload + b"\0", payload[:30]):
            if entries:
                with pytest.raises(Corrupt):
                    tree.tree_refs(bad)
