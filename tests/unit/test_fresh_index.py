"""The fresh index: a commit's new ids go into one appended record, merged into ``slots``
later; a sweep deletes a fresh object in place. What must hold: every lookup, in any
process and any transaction, finds exactly the objects its transaction holds (a wrong
"exists" would make a commit skip storing data); merges and sweeps keep fsck clean; a
rolled-back write leaves no trace in any cache.
"""

from __future__ import annotations

import copy

import pytest

from oppiefs import store as store_mod
from oppiefs.store import KIND_CHUNK, KIND_LIST, Store, oid_of
from oppiefs.tree import encode_list


def _elsewhere(store: Store) -> Store:
    """The same store as another process sees it: its own copy of the fresh records (LMDB
    opens a file once per process, so it shares the environment; it only reads)."""
    other = copy.copy(store)
    other._fresh = store_mod._FreshIndex()
    return other


def _publish(store: Store, *payloads: bytes) -> list[bytes]:
    """Store chunks as one small batch, published as the snapshot of the first."""
    w = store.writer()
    oids = [w.put(KIND_CHUNK, p, ()) for p in payloads]
    store.publish(w, oids[0], parent=None, logical_bytes=0, files=0)
    return oids


def _fresh_records(store: Store) -> int:
    with store.read() as txn:
        return txn.stat(store.db["fresh"])["entries"]


def _in_slots(store: Store, oid: bytes) -> bool:
    with store.read() as txn:
        return txn.get(oid, db=store.db["slots"]) is not None


def _payload_at(store: Store, txn, oid: bytes) -> bytes | None:
    slot = store._slot(txn, oid)
    raw = None if slot is None else txn.get(slot, db=store.db["data"])
    return None if raw is None else bytes(raw[1:])


def test_a_small_batch_is_indexed_fresh_swept_in_place_and_merged(store: Store) -> None:
    a, b = _publish(store, b"alpha", b"beta")
    assert _fresh_records(store) == 1 and not _in_slots(store, a)
    assert store.get(a) == (KIND_CHUNK, b"alpha") and store.exists(b)
    assert store.refcount(a) == 1
    assert store.check() == []
    store.sweep()  # b is unreferenced: it goes, from its fresh record
    assert _fresh_records(store) == 1 and not store.exists(b)
    assert store.get(a) == (KIND_CHUNK, b"alpha")
    assert store.check() == []
    assert store.merge_fresh() == 1  # a moves to slots, b's dead entry is left out
    assert _fresh_records(store) == 0 and _in_slots(store, a) and not _in_slots(store, b)
    assert store.get(a) == (KIND_CHUNK, b"alpha") and not store.exists(b)
    assert store.check() == []


def test_the_sweeper_merges_once_records_pile_up_but_the_newest(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest ``FRESH_KEEP`` records stay: a search loop prunes most commits soon, and
    their ids then go from their record without ever touching ``slots``."""
    monkeypatch.setattr(store_mod, "FRESH_MERGE", 4)
    monkeypatch.setattr(store_mod, "FRESH_KEEP", 2)
    oids = [_publish(store, b"c%d" % i)[0] for i in range(3)]
    store.sweep()
    assert _fresh_records(store) == 3
    oids += [_publish(store, b"c%d" % i)[0] for i in range(3, 5)]
    store.release(oids[4])  # the newest commit is pruned: it goes from its record
    store.sweep()
    assert _fresh_records(store) == 2
    assert [_in_slots(store, oid) for oid in oids] == [True, True, True, False, False]
    assert [store.exists(oid) for oid in oids] == [True, True, True, True, False]
    assert store.get(oids[3]) == (KIND_CHUNK, b"c3")
    assert store.check() == []


def test_a_large_batch_goes_to_slots_at_once(store: Store) -> None:
    oids = _publish(store, *(b"chunk %d" % i for i in range(store_mod.FRESH_BATCH_MAX + 1)))
    assert _fresh_records(store) == 0 and all(_in_slots(store, oid) for oid in oids)
    assert store.check() == []


def test_a_swept_fresh_object_is_gone_for_every_reader(store: Store) -> None:
    (keep,) = _publish(store, b"keep")
    (gone,) = _publish(store, b"gone")
    other = _elsewhere(store)
    assert other.exists(gone)  # in its copy of the records
    store.release(gone)
    store.sweep()
    assert not store.exists(gone) and not other.exists(gone)
    assert other.get(keep) == (KIND_CHUNK, b"keep")
    assert store.check() == []
    (again,) = _publish(store, b"gone")  # stored again: a new copy in a new record
    assert again == gone and other.get(gone) == (KIND_CHUNK, b"gone")
    assert store.check() == []


def test_commits_merge_the_index_themselves_when_the_sweeper_is_behind(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "FRESH_MAX", 3)
    oids = [_publish(store, b"c%d" % i)[0] for i in range(10)]
    assert _fresh_records(store) <= 3
    assert all(store.get(oid)[1] == b"c%d" % i for i, oid in enumerate(oids))
    assert store.check() == []


def test_another_process_sees_records_come_and_go(store: Store) -> None:
    """A second Store on the same file (as the tree server or the CLI) keeps its own copy:
    it finds new records, lets merged ones go, and a transaction older than a merge still
    finds the objects it holds."""
    other = _elsewhere(store)
    (a,) = _publish(store, b"one")
    assert other.get(a) == (KIND_CHUNK, b"one")
    old = other.read()  # sees a in the fresh records
    store.merge_fresh()
    (b,) = _publish(store, b"two")
    assert other.get(b) == (KIND_CHUNK, b"two")  # a newer transaction: a's record goes
    assert other.get(a) == (KIND_CHUNK, b"one")  # now found in slots
    assert _payload_at(other, old, a) == b"one"  # the old one reads its record again
    assert other._slot(old, b) is None  # not stored yet as far as it knows
    old.abort()


def test_an_id_stored_again_after_a_sweep_is_found_in_each_transactions_view(
        store: Store) -> None:
    other = _elsewhere(store)
    (keep,) = _publish(store, b"keep")
    (x,) = _publish(store, b"x")
    assert other.exists(x)
    with store.read() as txn:
        first_slot = store._slot(txn, x)
    old = other.read()
    store.release(x)
    store.sweep()  # merged, then x deleted
    assert not other.exists(x)
    _publish(store, b"x")  # the same id again, at a new slot, in a new record
    with other.read() as txn:
        assert other._slot(txn, x) not in (None, first_slot)
        assert _payload_at(other, txn, x) == b"x"
    assert other._slot(old, x) == first_slot  # that view still holds the old copy
    assert _payload_at(other, old, x) == b"x"
    old.abort()
    assert store.check() == [] and other.get(keep) == (KIND_CHUNK, b"keep")


def test_a_rolled_back_write_leaves_nothing_in_any_cache(store: Store) -> None:
    (a,) = _publish(store, b"committed")

    class Rollback(Exception):
        pass

    w = store.writer()
    ghost = w.put(KIND_CHUNK, b"rolled back", ())

    def write_then_fail(txn) -> None:
        w._flush_in(txn)
        assert store._slot(txn, ghost) is not None  # its own record, inside the txn
        assert store._slot(txn, a) is not None  # and the committed ones
        raise Rollback

    with pytest.raises(Rollback):
        store.write(write_then_fail)
    w.abort()
    assert not store.exists(ghost)
    (b,) = _publish(store, b"next")  # takes the rolled-back record's key and slot
    assert not store.exists(ghost)
    assert store.get(b) == (KIND_CHUNK, b"next") and store.get(a)[1] == b"committed"
    assert oid_of(b"next") == b
    assert store.check() == []


def test_a_merge_goes_in_chunks_and_readers_follow_each(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "FRESH_MERGE_CHUNK", 2)
    other = _elsewhere(store)
    oids = [_publish(store, b"c%d" % i)[0] for i in range(5)]
    assert all(other.exists(oid) for oid in oids)
    seen = []

    def between() -> None:  # half merged: every object still found, here and elsewhere
        seen.append((_fresh_records(store), all(other.exists(oid) for oid in oids)))
        assert store.check() == []

    assert store.merge_fresh(between=between) == 5
    assert seen == [(3, True), (1, True)] and _fresh_records(store) == 0
    assert [other.get(oid)[1] for oid in oids] == [b"c%d" % i for i in range(5)]
    assert store.check() == []


def test_a_writers_batches_are_indexed_fresh_and_merged_when_it_publishes(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import's batches (written before it publishes) go into fresh records, and the
    publishing transaction merges exactly those into ``slots`` in one pass: indexed batch
    by batch, each batch rewrote leaves all over ``slots``."""
    (other,) = _publish(store, b"a commit's chunk")  # someone else's record: it stays
    big = store_mod.FRESH_BATCH_MAX + 44  # ids per batch: too many for a fresh record
    w = store.writer(batch_bytes=6 * big)
    oids = [w.put(KIND_CHUNK, b"%06d" % i, ()) for i in range(3 * big + 10)]
    w.wait()
    written = [oid for oid in oids if store.exists(oid)]  # found in the records meanwhile
    assert len(written) == 3 * big  # all but the batch not written yet
    assert _fresh_records(store) == 4 and not any(_in_slots(store, oid) for oid in oids)
    root = w.put(KIND_LIST, encode_list([(oid, 6) for oid in oids]), oids)
    store.publish(w, root, parent=None, logical_bytes=0, files=0)
    assert all(_in_slots(store, oid) for oid in oids)
    assert _fresh_records(store) == 1 and not _in_slots(store, other) and store.exists(other)
    assert store.check() == []


def test_a_writer_merges_on_the_way_past_its_bound(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "FRESH_DEFER_MAX", 50)
    w = store.writer(batch_bytes=2000)
    oids = [w.put(KIND_CHUNK, b"%04d" % i * 100, ()) for i in range(200)]
    w.wait()
    assert sum(_in_slots(store, oid) for oid in oids) >= 50  # merged before publishing
    assert _fresh_records(store) <= 50 // 5 + 1  # batches of 5 ids: 40 records unmerged
    w.abort()
    assert store.check() == []
