"""Reference counting and GC of the store, without a mount.

The rules under test: counts (applied + logged) always equal the edges that exist; the
sweeper frees exactly what no snapshot, node pin or in-flight session needs; a commit of
a directory touches only its own path, and increments are applied in bulk.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest

from oppiefs import overlay, tree
from oppiefs.errors import Busy, NotFound, Unsupported
from oppiefs.store import FORMAT, KIND_CHUNK, Store, _lock_use, compact
from oppiefs.sweeper import BusyFlag, Sweeper
from tests.treeutil import commit_upper


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_prune_then_sweep_frees_everything(store: Store, tmp_path: Path) -> None:
    src = _tree(tmp_path / "a", {f"d{i}/f{j}": os.urandom(3000) for i in range(5)
                                 for j in range(20)})
    rep = tree.import_dir(store, src)
    assert store.check() == []
    assert store.sweep() == (0, 0)  # everything is referenced
    store.release(rep.root)
    n, nbytes = store.sweep()
    assert n > 100 and nbytes > 300_000
    assert store.stats().objects == 0 and store.stats().stored_bytes == 0
    assert store.check() == []


def test_shared_objects_survive_partial_prune(store: Store, tmp_path: Path) -> None:
    common = {f"c/f{j}": os.urandom(2000) for j in range(30)}
    a = tree.import_dir(store, _tree(tmp_path / "a", {**common, "only-a": b"A" * 5000}))
    b = tree.import_dir(store, _tree(tmp_path / "b", {**common, "only-b": b"B" * 5000}))
    store.release(a.root)
    store.sweep()
    assert store.check() == []
    reader = tree.Reader(store)
    for rel, data in common.items():
        assert reader.read_all(reader.lookup(b.root, rel)) == data
    assert store.snapshot(a.root) is None
    with pytest.raises(NotFound):
        store.resolve(a.root.hex())


def test_in_flight_session_protects_its_objects(store: Store, tmp_path: Path) -> None:
    w = store.writer(batch_bytes=1)  # every put is flushed: a registered session
    oid = w.put(KIND_CHUNK, b"in flight", ())
    w.wait()  # the batch is committed in the background
    assert store.exists(oid)
    assert store.sweep() == (0, 0)  # unreferenced, but the session may still publish it
    w.abort()
    assert store.sweep() == (1, len(b"in flight"))
    assert not store.exists(oid)


def test_node_pin_keeps_pruned_snapshot(store: Store, tmp_path: Path) -> None:
    rep = tree.import_dir(store, _tree(tmp_path / "a", {"x": b"x" * 100}))
    store.add_node("n1", {"base": rep.root.hex()}, rep.root)
    rec = store.release(rep.root)
    assert not rec.listed and rec.pins == 1
    store.sweep()
    assert tree.Reader(store).read_all(tree.Reader(store).lookup(rep.root, "x")) == b"x" * 100
    store.remove_node("n1", rep.root)
    store.sweep()
    assert store.stats().objects == 0
    assert store.check() == []


def test_listed_counts_are_kept_not_recounted(store: Store, tmp_path: Path) -> None:
    """``status`` reads the listed snapshots' count and bytes from meta: publish, release,
    pins and fsck --repair keep them equal to a recount; a store from before them (format
    2) gets them on open, and fsck reports drift."""
    def recount() -> tuple[int, int]:
        recs = store.snapshots()
        return len(recs), sum(r.bytes for r in recs)

    a = tree.import_dir(store, _tree(tmp_path / "a", {"x": b"x" * 100})).root
    b = tree.import_dir(store, _tree(tmp_path / "b", {"y": b"y" * 300})).root
    tree.import_dir(store, tmp_path / "a")  # the same tree again: one more reference
    stats = store.stats()
    assert (stats.snapshots, stats.logical_bytes) == recount() == (2, 400)
    store.add_node("n1", {"base": a.hex()}, a)
    for root in (a, a, b):
        store.release(root)
        stats = store.stats()
        assert (stats.snapshots, stats.logical_bytes) == recount()
    assert recount() == (0, 0)
    store.remove_node("n1", a)
    assert (store.stats().snapshots, store.stats().logical_bytes) == (0, 0)
    c = tree.import_dir(store, tmp_path / "b").root
    assert (store.stats().snapshots, store.stats().logical_bytes) == (1, 300) == recount()
    assert store.check() == []
    store.write(lambda txn: store._set_listed(txn, (7, 7)))
    assert any("snapshot counters drift" in f for f in store.check())
    store.check(repair=True)
    assert store.check() == [] and store.stats().snapshots == 1
    path = store.path
    store.write(lambda txn: (store._set_meta_int(txn, b"format", 2),
                             txn.delete(b"listed", db=store.db["meta"]),
                             txn.delete(b"listed_bytes", db=store.db["meta"])))
    store.close()
    with tree.open_store(path) as s:
        assert (s.stats().snapshots, s.stats().logical_bytes) == (1, 300)
        assert s.check() == [] and s.resolve(c.hex()) == c


def test_commit_logs_increments_and_drain_applies_them(store: Store, tmp_path: Path) -> None:
    files = {f"big/f{j:03d}": f"file {j}".encode() for j in range(300)}
    base = tree.import_dir(store, _tree(tmp_path / "a", files))
    upper = tmp_path / "upper"
    _tree(upper, {"big/f007": b"changed"})
    reader = tree.Reader(store)
    with store.writer() as w:
        built = tree.apply_upper(reader, w, base.root, os.fsencode(upper), overlay.UPPER_DIR)
        store.publish(w, built.oid, parent=base.root.hex(), logical_bytes=built.bytes,
                      files=built.files)
    # Totals by difference equal a full recount.
    t = reader.tree(built.oid)
    walked = [e for _, e in reader.walk(built.oid) if e.is_file]
    assert (t.total_bytes, t.total_files) == (sum(e.size for e in walked), len(walked))
    # big/ is split into parts: only f007's part is new, the others are shared.
    old_parts = reader.tree(reader.lookup(base.root, "big").ref).parts or []
    new_parts = reader.tree(reader.lookup(built.oid, "big").ref).parts or []
    shared = [oid for oid, _ in new_parts if (oid, _) in old_parts]
    assert len(new_parts) > 2 and len(shared) == len(new_parts) - 1
    assert store.refcount(shared[0]) == 2  # both big/ indexes point at it (one logged)
    assert store.check() == []
    store.sweep(keep=0)  # applies the log
    with store.env.begin() as txn:
        assert txn.stat(store.db["pending"])["entries"] == 0
    assert store.refcount(shared[0]) == 2
    assert reader.read_all(reader.lookup(built.oid, "big/f007")) == b"changed"
    assert store.check() == []


def _counts(store: Store) -> dict[bytes, int]:
    return {oid: store.refcount(oid) for oid in _oids(store)}


def test_a_commit_pruned_before_its_references_are_applied_leaves_no_trace(
        store: Store, tmp_path: Path) -> None:
    """The sweep nets a commit's logged references against its deletions: afterwards the
    store is exactly as before the commit (objects, bytes, every count), and a commit made
    on top of the pruned one, which shares its new directories, keeps them."""
    files = {f"a/b/c/f{j}": os.urandom(500) for j in range(40)}
    files.update({f"a/g{j}": os.urandom(300) for j in range(30)})
    base = tree.import_dir(store, _tree(tmp_path / "src", files)).root
    store.sweep()
    before, stats = _counts(store), store.stats()
    reader = tree.Reader(store, keep_payloads=True)
    one = commit_upper(store, reader, base, _tree(tmp_path / "u1", {"a/b/c/f3": b"one"}))
    two = commit_upper(store, reader, one, _tree(tmp_path / "u2", {"a/g1": b"two"}))
    with store.env.begin() as txn:
        assert txn.stat(store.db["pending"])["entries"] == 2  # neither applied yet
    store.release(one)
    n, _ = store.sweep()
    assert n >= 1 and store.check() == []
    fresh = tree.Reader(store)
    assert fresh.read_all(fresh.lookup(two, "a/b/c/f3")) == b"one"  # one's, kept by two
    assert fresh.read_all(fresh.lookup(two, "a/g1")) == b"two"
    store.release(two)
    store.sweep()
    assert store.check() == []
    assert _counts(store) == before
    assert (store.stats().objects, store.stats().stored_bytes) == (stats.objects,
                                                                   stats.stored_bytes)


def test_what_a_deletion_frees_waits_for_a_session_in_flight(
        store: Store, tmp_path: Path) -> None:
    """A commit's root goes at once; the directories only it referenced become
    unreferenced during the sweep, so while another session is in flight (it may be
    reusing them) they are queued, not deleted; they go once it has ended."""
    files = {f"x/y/f{j}": os.urandom(400) for j in range(20)}
    base = tree.import_dir(store, _tree(tmp_path / "src", files)).root
    store.sweep()
    reader = tree.Reader(store, keep_payloads=True)
    one = commit_upper(store, reader, base, _tree(tmp_path / "u1", {"x/y/f1": b"changed"}))
    x_one = reader.lookup(one, "x").ref
    store.release(one)
    w = store.writer(batch_bytes=1)
    w.put(KIND_CHUNK, b"in flight", ())
    w.wait()
    store.sweep()
    assert not store.exists(one) and store.exists(x_one)
    assert store.check() == []
    w.abort()
    store.sweep()
    assert not store.exists(x_one)
    assert store.check() == []


def test_a_store_of_a_newer_format_is_refused_and_an_older_one_marked(tmp_path: Path) -> None:
    """A format this code does not know fails the open, loudly and before anything is read
    or written; a store from before the marker gets it on open."""
    path = tmp_path / "store"
    with tree.open_store(path) as s:
        assert s._meta_int(s.env.begin(), b"format") == FORMAT
        s.write(lambda txn: txn.delete(b"format", db=s.db["meta"]))
    with tree.open_store(path) as s:
        assert s._meta_int(s.env.begin(), b"format") == FORMAT
        s.write(lambda txn: s._set_meta_int(txn, b"format", FORMAT + 1))
        last = s.last_change()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(Unsupported, match=f"format {FORMAT + 1}, from a newer oppiefs"):
        tree.open_store(path)
    assert len(os.listdir("/proc/self/fd")) == fds  # the environment and its lock closed
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        assert env.info()["last_txnid"] == last
    finally:
        env.close()


@pytest.mark.parametrize("layout", ["counts by id", "objects by id"])
def test_store_of_an_older_layout_is_migrated(tmp_path: Path, layout: str) -> None:
    """Stores written before slots (objects and counts keyed by id), or before objects moved
    to slots (counts already by slot), are migrated on open: same objects, same counts."""
    src = _tree(tmp_path / "a", {f"d/f{j}": os.urandom(2000) for j in range(30)})
    with tree.open_store(tmp_path / "store") as s:
        rep = tree.import_dir(s, src)
        s.sweep()
        s.merge_fresh()  # layouts before the fresh index had every id in slots
        before = {oid: s.refcount(oid) for oid in _oids(s)}

        def to_old_layout(txn) -> None:
            for oid, slot in txn.cursor(db=s.db["slots"]):
                txn.put(oid, txn.get(slot, db=s.db["data"]), db=s.db["objects"])
                if layout == "counts by id":
                    txn.put(oid, txn.get(slot, db=s.db["counts"]), db=s.db["refs"])
            txn.drop(s.db["data"], delete=False)
            if layout == "counts by id":
                txn.drop(s.db["slots"], delete=False)
                txn.drop(s.db["counts"], delete=False)
                txn.put(b"slot", (0).to_bytes(8, "little"), db=s.db["meta"])

        s.write(to_old_layout)
    with tree.open_store(tmp_path / "store") as s:
        with s.env.begin() as txn:
            assert txn.stat(s.db["objects"])["entries"] == 0
            assert txn.stat(s.db["refs"])["entries"] == 0
        assert {oid: s.refcount(oid) for oid in _oids(s)} == before
        assert s.check() == []
        reader = tree.Reader(s)
        assert reader.read_all(reader.lookup(rep.root, "d/f3")) == (src / "d/f3").read_bytes()
        s.release(rep.root)
        s.sweep()
        assert s.stats().objects == 0 and s.check() == []


def _oids(s: Store) -> list[bytes]:
    with s.env.begin() as txn:
        return [oid for oid, _ in txn.cursor(db=s.db["slots"])]


def test_fsck_repair_of_lost_data_and_unreachable_data(store: Store, tmp_path: Path) -> None:
    """An id whose data vanished is reported (like a corrupt copy) until a rehashing import
    of its content stores it again; data without an id record is reported and deleted."""
    src = _tree(tmp_path / "a", {"f": b"precious" * 1000, "g": b"other" * 1000})
    rep = tree.import_dir(store, src)
    reader = tree.Reader(store)
    lost = reader.lookup(rep.root, "f").ref
    stray = (10**12).to_bytes(8, "big")

    def damage(txn) -> None:
        txn.delete(store._slot(txn, lost), db=store.db["data"])
        txn.put(stray, KIND_CHUNK + b"junk", db=store.db["data"])

    store.write(damage)
    found = store.check()
    assert any("data is missing" in f and lost.hex() in f for f in found)
    assert any(f.startswith(f"missing object {lost.hex()}") for f in found)
    assert any("no id record" in f for f in found)
    store.check(repair=True)
    assert {f.split(" (")[0] for f in store.check()} == {
        f"object {lost.hex()} is recorded but its data is missing",
        f"missing object {lost.hex()}"}
    tree.import_dir(store, src, use_cache=False)  # import --rehash: stores f's content again
    assert tree.Reader(store).read_all(reader.lookup(rep.root, "f")) == b"precious" * 1000
    assert store.check() == []


def test_compact_returns_freed_space_and_keeps_every_snapshot(store_dir: Path,
                                                              tmp_path: Path, cli) -> None:
    """After a prune and a sweep the file keeps its peak size (LMDB reuses pages but never
    returns them); compact shrinks it to the live data, which reads back unchanged."""
    keep = _tree(tmp_path / "keep", {f"k{i}": os.urandom(20_000) for i in range(20)})
    gone = _tree(tmp_path / "gone", {f"g{i}": os.urandom(400_000) for i in range(40)})
    with tree.open_store(store_dir) as s:
        kept = tree.import_dir(s, keep).root
        s.release(tree.import_dir(s, gone).root)
        s.sweep()
        objects = s.stats().objects
        # In use: another Store (here, this one) holds the store open.
        with pytest.raises(Busy):
            compact(store_dir)
    before = (store_dir / "data.mdb").stat().st_size
    res = cli("compact", "--json").json()
    assert res["bytes_before"] == before and res["bytes_after"] < before // 4
    assert (store_dir / "data.mdb").stat().st_size == res["bytes_after"]
    assert not (store_dir / "compact.tmp").exists()
    with tree.open_store(store_dir) as s:
        assert s.check() == [] and s.stats().objects == objects
        reader = tree.Reader(s)
        for i in range(20):
            got = reader.read_all(reader.lookup(kept, f"k{i}"))
            assert got == (keep / f"k{i}").read_bytes()


def test_store_cannot_open_while_compacting(store_dir: Path) -> None:
    tree.open_store(store_dir).close()
    fd = _lock_use(store_dir, exclusive=True)  # what compact holds while it copies
    try:
        with pytest.raises(Busy, match="being compacted"):
            tree.open_store(store_dir)
    finally:
        os.close(fd)
    tree.open_store(store_dir).close()


def _pending(store: Store) -> list[bytes]:
    with store.read() as txn:
        return [raw for _, raw in txn.cursor(db=store.db["pending"])]


def _applied(store: Store) -> dict[bytes, bytes]:
    with store.read() as txn:
        return dict(txn.cursor(db=store.db["counts"]))


def test_a_sweep_cancels_a_pruned_commits_record_and_keeps_the_newest(
        store: Store, tmp_path: Path) -> None:
    """A commit pruned while its parent record is in the log goes without one count written:
    its deletion strikes its directories from the record (the rest of a record stays). The
    newest ``keep`` records stay unapplied, older ones are applied, and counts (applied +
    logged) stay exact throughout."""
    files = {f"a/b/f{j}": os.urandom(300) for j in range(30)}
    files.update({f"c/g{j}": os.urandom(200) for j in range(20)})
    base = tree.import_dir(store, _tree(tmp_path / "src", files)).root
    store.sweep(keep=0)
    before, stats = _applied(store), store.stats()
    reader = tree.Reader(store, keep_payloads=True)
    one = commit_upper(store, reader, base, _tree(tmp_path / "u1", {"c/g2": b"one"}))
    two = commit_upper(store, reader, one, _tree(tmp_path / "u2", {"a/b/f3": b"two"}))
    three = commit_upper(store, reader, base, _tree(tmp_path / "u3", {"a/b/f4": b"three"}))
    assert len(_pending(store)) == 3
    store.release(one)  # its root goes; its c/ stays, two's root refers to it
    store.sweep(keep=8)
    assert not store.exists(one) and store.check() == []
    assert len(_pending(store)) == 3 and len(_pending(store)[0]) == 1 + 32  # c/ is left
    assert {k: v for k, v in _applied(store).items() if k in before} == before  # no writes
    store.release(two)
    store.sweep(keep=8)
    assert len(_pending(store)) == 1  # one's and two's records cancelled whole
    assert {k: v for k, v in _applied(store).items() if k in before} == before
    assert store.check() == []
    four = commit_upper(store, reader, three, _tree(tmp_path / "u4", {"c/g5": b"four"}))
    store.sweep(keep=1)  # three's record is the older one: applied
    assert _pending(store) == _pending(store)[-1:] and len(_pending(store)) == 1
    assert store.check() == []
    fresh = tree.Reader(store)
    assert fresh.read_all(fresh.lookup(four, "a/b/f4")) == b"three"
    for snap in (three, four):
        store.release(snap)
    store.sweep(keep=0)
    assert _applied(store) == before and _pending(store) == []
    assert (store.stats().objects, store.stats().stored_bytes) == (stats.objects,
                                                                   stats.stored_bytes)
    assert store.check() == []


def test_what_another_process_swept_is_looked_up_again(store: Store, tmp_path: Path) -> None:
    """A sweeper remembers which objects it saw counted (``Store._counted``), and forgets
    it when another process has swept: that one may have deleted an object that is stored
    again since, with no count applied, and trusting the old knowledge would leak it."""
    files = {f"d/f{j}": os.urandom(300) for j in range(10)}
    base = tree.import_dir(store, _tree(tmp_path / "src", files)).root
    store.sweep(keep=0)
    stats = store.stats()
    reader = tree.Reader(store, keep_payloads=True)

    def upper(name: str) -> Path:
        root = _tree(tmp_path / name, {"d/f1": b"same bytes"})
        for p in (root / "d" / "f1", root / "d", root):
            os.utime(p, ns=(1_700_000_000 * 10**9,) * 2)
        return root

    one = commit_upper(store, reader, base, upper("u1"))
    store.sweep(keep=0)  # one's record applied: its new directories and file seen counted
    store.release(one)
    other = ("import sys; from oppiefs import tree; "
             "s = tree.open_store(sys.argv[1], create=False); s.sweep(keep=0); s.close()")
    subprocess.run([sys.executable, "-c", other, str(store.path)], check=True)
    assert not store.exists(one)
    two = commit_upper(store, reader, base, upper("u2"))
    assert two == one  # the same objects, stored again
    store.release(two)
    store.sweep()
    assert (store.stats().objects, store.stats().stored_bytes) == (stats.objects,
                                                                   stats.stored_bytes)
    assert store.check() == []


@pytest.mark.parametrize("seed", range(4))
def test_random_commits_prunes_and_sweeps_keep_counts_exact(
        store: Store, tmp_path: Path, seed: int) -> None:
    """Commits (some equal to an earlier tree, so objects are stored again after a sweep),
    prunes, sessions in flight, and sweeps of every batch size and log window, in this
    process and in another: after every sweep fsck's recount agrees and every live snapshot
    reads back; at the end the store is exactly the import again."""
    rng = random.Random(seed)
    paths = [f"a/b/c/f{j}" for j in range(6)] + [f"a/g{j}" for j in range(4)] + ["top"]
    files = {p: f"base {p}".encode() for p in paths}
    base = tree.import_dir(store, _tree(tmp_path / "src", files)).root
    store.sweep(keep=0)
    before, stats = _applied(store), store.stats()
    reader = tree.Reader(store, keep_payloads=True)
    live: dict[bytes, tuple[int, dict[str, bytes]]] = {base: (1, files)}  # refs, content
    fixed = 1_700_000_000 * 10**9
    other = ("import sys; from oppiefs import tree; "
             "s = tree.open_store(sys.argv[1], create=False); s.sweep(batch=3); s.close()")
    others = 0
    for step in range(60):
        op = rng.random()
        if op < 0.5:
            parent = rng.choice(sorted(live))
            content = dict(live[parent][1])
            upper = tmp_path / f"u{step}"
            for p in rng.sample(paths, rng.randint(1, 3)):
                if p in content and rng.random() < 0.2:
                    (upper / p).parent.mkdir(parents=True, exist_ok=True)
                    os.mknod(upper / p, 0o600 | 0o020000, 0)  # whiteout
                    del content[p]
                else:
                    content[p] = rng.choice([b"x", b"y", f"{p} {step}".encode()])
                    _tree(upper, {p: content[p]})
            for d, _, names in os.walk(upper):
                for name in names:
                    if not os.path.islink(os.path.join(d, name)):
                        os.utime(os.path.join(d, name), ns=(fixed, fixed))
                os.utime(d, ns=(fixed, fixed))
            snap = commit_upper(store, reader, parent, upper)
            refs, _ = live.get(snap, (0, content))
            live[snap] = (refs + 1, content)
        elif op < 0.8 and len(live) > 1:
            snap = rng.choice(sorted(s for s in live if s != base))
            store.release(snap)
            refs, content = live[snap]
            if refs == 1:
                del live[snap]
            else:
                live[snap] = (refs - 1, content)
        else:
            w = store.writer(batch_bytes=1) if rng.random() < 0.3 else None
            if w is not None:
                w.put(KIND_CHUNK, b"in flight %d" % step, ())
                w.wait()
            if others < 2 and rng.random() < 0.2:
                others += 1
                subprocess.run([sys.executable, "-c", other, str(store.path)], check=True)
            else:
                store.sweep(batch=rng.choice([1, 3, 50]), keep=rng.choice([0, 1, 3, 128]))
            if w is not None:
                w.abort()
            assert store.check() == [], f"step {step}"
            fresh = tree.Reader(store)
            for snap, (_, content) in live.items():
                got = {os.fsdecode(path): fresh.read_all(e) for path, e in fresh.walk(snap)
                       if e.is_file}
                assert got == content, f"step {step}: snapshot {snap.hex()[:12]}"
    for snap, (refs, _) in live.items():
        for _ in range(refs - (snap == base)):
            store.release(snap)
    store.sweep(keep=0)
    assert store.check() == []
    assert _applied(store) == before and _pending(store) == []
    assert (store.stats().objects, store.stats().stored_bytes) == (stats.objects,
                                                                   stats.stored_bytes)


def test_the_sweeper_child_sweeps_and_asks_between_transactions(
        store: Store, tmp_path: Path) -> None:
    """sweeper.py's child frees what this process pruned, asking before each transaction
    but the first (with how long the last held the lock), and ends when closed."""
    files = {f"d{i}/f{j}": os.urandom(200) for i in range(4) for j in range(20)}
    store.release(tree.import_dir(store, _tree(tmp_path / "src", files)).root)
    held: list[float] = []
    sweeper = Sweeper(store)
    try:
        n, nbytes = sweeper.sweep(5, held.append, threading.Event())
        assert n == 85 and nbytes > 80 * 200  # 80 files, 4 directories and the root
        assert held and all(0 < h < 10 for h in held)  # one question per transaction
        child = sweeper._proc
        assert child is not None and child.poll() is None
    finally:
        sweeper.close()
    assert child.wait(10) == 0
    assert store.stats().objects == 0 and store.check() == []


@pytest.mark.parametrize("where", ["child", "here"])
def test_a_sweep_yields_to_a_command_after_each_deletion(
        store: Store, tmp_path: Path, where: str) -> None:
    """While the busy flag is set, a sweep transaction (in the child, or in this process
    when the child cannot run) ends after its first deletion, so a command waits for one
    deletion, not a batch; the sweep still frees everything, and the counts stay exact."""
    files = {f"d{i}/f{j}": os.urandom(200) for i in range(4) for j in range(20)}
    store.release(tree.import_dir(store, _tree(tmp_path / "src", files)).root)
    busy = BusyFlag()
    busy.set(True)
    held: list[float] = []
    child = None if where == "child" else [sys.executable, "-c", "raise SystemExit(3)"]
    sweeper = Sweeper(store, busy, child)
    try:
        n, _ = sweeper.sweep(1000, held.append, threading.Event())
    finally:
        sweeper.close()
    assert n == 85 and len(held) == 84  # one question per transaction but the first
    assert store.stats().objects == 0 and store.check() == []
    busy.set(False)
    store.release(tree.import_dir(store, _tree(tmp_path / "src2", files)).root)
    held.clear()
    sweeper = Sweeper(store, busy)
    try:
        assert sweeper.sweep(1000, held.append, threading.Event())[0] == 85
    finally:
        sweeper.close()
    assert held == []  # idle: one transaction


def test_a_sweep_the_child_cannot_do_runs_here(store: Store, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A child that cannot run (here: exits at once) costs an error in the log, not the
    sweep: it runs in this process."""
    store.release(tree.import_dir(store, _tree(tmp_path / "src", {"f": b"x" * 500})).root)
    sweeper = Sweeper(store, child=[sys.executable, "-c", "raise SystemExit(3)"])
    try:
        n, _ = sweeper.sweep(256, lambda held: None, threading.Event())
        assert n == 2  # the file and the root
    finally:
        sweeper.close()
    assert store.stats().objects == 0 and store.check() == []
    assert "sweeping in the daemon this time" in caplog.text
