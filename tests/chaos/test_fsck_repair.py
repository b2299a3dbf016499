"""``oppiefs fsck --repair``: damaged reference state is found, fixed, and orphans freed.

The damage is what a bug or a crash in an older version could leave, made with the Store's
internals in one write transaction each: a reference count bumped (an object GC could then
never free), a snapshot pin that no node holds, and an unreferenced object missing from the
sweeper's work list (an orphan GC would never find). fsck must name each by id and exit
non-zero; repair must make a second fsck clean without touching any snapshot's content.

Two rounds, because repair has two users: ``Store.check(repair=True)`` only fixes the
counts (then ``oppiefs gc`` must free the orphan), and ``oppiefs fsck --repair`` also sweeps.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from oppiefs import tree
from oppiefs.store import KIND_CHUNK, SnapshotRecord, oid_of
from tests.chaosutil import record_figures
from tests.cliutil import Cli
from tests.treeutil import assert_same_tree, det_bytes, make_odd_tree

U64 = struct.Struct("<Q")


def _damage(store_dir: Path, snap: str, seed: str) -> tuple[bytes, bytes]:
    """Bump one chunk's count, add a phantom pin, plant an unqueued orphan; returns
    (bumped chunk id, orphan id)."""
    with tree.open_store(store_dir, create=False) as st:
        st.sweep()  # apply logged increments, so ``counts`` holds the real counts
        root = bytes.fromhex(snap)
        reader = tree.Reader(st)
        victim = reader.filemap(reader.lookup(root, "files/text.txt")).oids[0]
        payload = det_bytes(5000, seed)
        orphan = oid_of(payload)

        def fn(txn: Any) -> None:  # an lmdb transaction
            slot = st._slot(txn, victim)
            raw = txn.get(slot, db=st.db["counts"])
            txn.put(slot, U64.pack(U64.unpack(raw)[0] + 1), db=st.db["counts"])
            rec = SnapshotRecord.decode(root, txn.get(root, db=st.db["snapshots"]))
            rec.pins += 1
            txn.put(root, rec.encode(), db=st.db["snapshots"])
            slot = st._new_slot(txn, orphan, 0)  # count 0, but not in ``zero``
            txn.put(slot, KIND_CHUNK + payload, db=st.db["data"])

        st.write(fn, "test damage")
    return victim, orphan


def _present(store_dir: Path, oid: bytes) -> bool:
    with tree.open_store(store_dir, create=False) as st, st.env.begin() as txn:
        slot = st._slot(txn, oid)
        return slot is not None and txn.get(slot, db=st.db["data"]) is not None


def _expect_findings(cli: Cli, snap: str, victim: bytes, orphan: bytes) -> list[str]:
    res = cli("fsck", expect=12)
    findings = res.out.strip().splitlines()
    assert any(f"refcount drift on {victim.hex()}" in ln for ln in findings), findings
    assert any(f"orphan object {orphan.hex()}" in ln for ln in findings), findings
    assert any(f"snapshot {snap}" in ln and "pins" in ln for ln in findings), findings
    return findings


def test_fsck_repair(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli = Cli(store)
    src = tmp_path / "src"
    make_odd_tree(src)
    snap = cli("import", src).out.strip()
    cli("fsck")
    counts = {}

    # Round 1: the Store API repairs the counts; ``oppiefs gc`` frees the orphan.
    victim, orphan = _damage(store, snap, "orphan-1")
    counts["round1_findings"] = len(_expect_findings(cli, snap, victim, orphan))
    with tree.open_store(store, create=False) as st:
        assert st.check(repair=True)
        assert st.check() == []
    assert cli("fsck").out.strip() == "clean"
    assert _present(store, orphan), "repair alone must not delete anything"
    freed = json.loads(cli("gc", "--json").out)
    assert freed["objects_freed"] == 1, freed
    assert not _present(store, orphan)

    # Round 2: ``oppiefs fsck --repair`` fixes and sweeps in one go.
    victim, orphan = _damage(store, snap, "orphan-2")
    counts["round2_findings"] = len(_expect_findings(cli, snap, victim, orphan))
    res = cli("fsck", "--repair", "--json")
    assert res.json()["repaired"] is True and res.json()["findings"], res.out
    assert cli("fsck").out.strip() == "clean"
    assert json.loads(cli("gc", "--json").out)["objects_freed"] == 0
    assert not _present(store, orphan)

    # Nothing that a snapshot needs was lost, and the repaired counts hold up under GC.
    cli("checkout", snap, tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    with tree.open_store(store, create=False) as st:
        assert st.refcount(victim) == 2  # text.txt and its copy share the chunk
    record_figures("fsck_repair", **counts)
