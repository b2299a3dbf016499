"""A fork writes its node's record while the mount helper creates the node's dirs and
mounts its overlay (so the record's fsync and the mount overlap): whichever side fails,
the other is undone, and a failed fork leaves no mount, no record, no pin and no dir."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from oppiefs import overlay, tree
from oppiefs.errors import InvalidArgument, OppieError
from oppiefs.state import StateManager
from oppiefs.store import Store


@pytest.fixture
def root(store: Store, tmp_path: Path, manager: StateManager,
         monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A snapshot, and the manager's lower for it: a plain copy (no FUSE mount here)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello")
    monkeypatch.setattr(manager, "_lower", lambda root: str(src))
    return tree.import_dir(store, src).root


def _left_behind(sm: StateManager, store: Store, root: bytes) -> dict[str, Any]:
    rec = store.snapshot(root)
    assert rec is not None
    return {"dirs": sorted(p.name for p in sm.node_root.iterdir()),
            "records": store.nodes(), "pins": rec.pins,
            "overlays": [m for m in overlay.mounts() if m.fstype == "overlay"
                         and m.mountpoint.startswith(str(sm.node_root))]}


NOTHING = {"dirs": [], "records": {}, "pins": 0, "overlays": []}


def test_fork_mounts_and_records(manager: StateManager, store: Store, root: bytes) -> None:
    reply = manager.fork(root.hex())
    merged = Path(reply["dir"])
    assert overlay.is_mounted(str(merged))
    assert (merged / "d" / "f").read_bytes() == b"hello"
    assert store.nodes()[reply["node"]]["base"] == root.hex()
    assert store.snapshot(root).pins == 1  # type: ignore[union-attr]
    manager.drop(reply["node"])
    manager.empty_trash()
    assert _left_behind(manager, store, root) == NOTHING


@pytest.mark.parametrize("error", [InvalidArgument("record refused"), RuntimeError("bug")])
def test_failed_record_undoes_the_mount(manager: StateManager, store: Store, root: bytes,
                                        monkeypatch: pytest.MonkeyPatch,
                                        error: Exception) -> None:
    """The record fails after the helper has mounted: the mount is undone."""
    real_add_node = store.add_node
    failing = [True]

    def add_node(name: str, record: dict[str, Any], base: bytes) -> None:
        if not failing:
            return real_add_node(name, record, base)
        merged = str(manager.node_root / name / "merged")
        deadline = time.monotonic() + 10
        while not overlay.is_mounted(merged):  # fail only once the mount has happened
            assert time.monotonic() < deadline, "the helper never mounted"
            time.sleep(0.005)
        raise error

    monkeypatch.setattr(store, "add_node", add_node)
    with pytest.raises(type(error), match=str(error)):
        manager.fork(root.hex())
    assert _left_behind(manager, store, root) == NOTHING
    failing.clear()  # the next fork works
    manager.drop(manager.fork(root.hex())["node"])


def test_failed_mount_undoes_the_record(manager: StateManager, store: Store, root: bytes,
                                        tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount fails (its lower is gone) after the record: the record and pin go."""
    monkeypatch.setattr(manager, "_lower", lambda root: str(tmp_path / "gone"))
    with pytest.raises(OppieError, match="mount overlay at"):
        manager.fork(root.hex())
    assert _left_behind(manager, store, root) == NOTHING


def test_failed_dirs_undo_the_record(manager: StateManager, store: Store, root: bytes,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper cannot create the node's dirs (here: their parent is a file)."""
    manager.node_root.rmdir()
    manager.node_root.write_bytes(b"")
    try:
        with pytest.raises(OppieError, match="create "):
            manager.fork(root.hex())
        assert store.nodes() == {}
        assert store.snapshot(root).pins == 0  # type: ignore[union-attr]
    finally:
        manager.node_root.unlink()
        manager.node_root.mkdir()


def test_recover_reads_the_mount_table_once(manager, store, tmp_path, monkeypatch) -> None:
    """Re-attaching nodes on mount reads /proc/self/mountinfo once, not once per node: at
    5,000 nodes (5,000 overlays mounted) that was minutes, past the mount's ready timeout."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    root = tree.import_dir(store, src).root
    for i in range(30):
        node = f"{i:012x}"
        store.add_node(node, {"base": root.hex(), "head": None, "boot": overlay.boot_id()},
                       root)
        (manager.node_root / node / "upper").mkdir(parents=True)
    real, reads = overlay.mounts, []
    monkeypatch.setattr(overlay, "mounts", lambda: reads.append(1) or real())
    manager.recover()  # the lower is not served here: each re-attach fails, reported
    assert len(reads) == 1
