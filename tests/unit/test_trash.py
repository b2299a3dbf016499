"""Dropped nodes' dirs (the trash) are deleted by ``rm`` in a child process, not in the
daemon, whose commands waited for its GIL while it deleted them; only the trash goes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from oppiefs import state as state_mod
from oppiefs.state import TRASH_PREFIX, StateManager
from oppiefs.store import Store


@pytest.fixture
def manager(store: Store, tmp_path: Path) -> Iterator[StateManager]:
    (tmp_path / "mnt").mkdir()
    sm = StateManager(store, tmp_path / "mnt")
    try:
        yield sm
    finally:
        sm.mounter.close()


def _fill_trash(sm: StateManager) -> tuple[list[Path], Path]:
    """Trash dirs shaped like dropped nodes (odd names inside), and a live node's dir."""
    trash = []
    for name in ("aa11", "-rf", "with space"):
        d = sm.node_root / f"{TRASH_PREFIX}{name}"
        deep = d / "upper" / "a" / "-b" / "c d"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(b"x" * 100)
        (d / "upper" / "a" / os.fsdecode(b"\xff")).write_bytes(b"")  # not UTF-8
        os.symlink("/", d / "upper" / "root-link")  # rm must not follow it
        (d / "work").mkdir()
        trash.append(d)
    live = sm.node_root / "bb22"
    (live / "upper").mkdir(parents=True)
    (live / "upper" / "keep").write_bytes(b"k")
    return trash, live


def _no_rmtree(*args: object, **kwargs: object) -> None:
    raise AssertionError("the daemon deleted the trash itself")


def test_trash_deleted_by_rm_in_a_child(manager: StateManager,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    trash, live = _fill_trash(manager)
    monkeypatch.setattr(state_mod.shutil, "rmtree", _no_rmtree)
    manager.empty_trash()
    assert not any(d.exists() for d in trash)
    assert (live / "upper" / "keep").read_bytes() == b"k"
    assert Path("/").is_dir() and os.listdir("/")  # the symlinked root is untouched


def test_trash_in_batches(manager: StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "TRASH_BATCH", 2)
    trash, live = _fill_trash(manager)
    manager.empty_trash()
    assert not any(d.exists() for d in trash)
    assert live.is_dir()


def test_trash_without_rm_is_deleted_here(manager: StateManager, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """No ``nice``/``rm`` on PATH: the daemon deletes the trash itself, and says so."""
    trash, live = _fill_trash(manager)
    monkeypatch.setenv("PATH", str(manager.node_root / "empty-path"))
    with caplog.at_level(logging.WARNING, logger="oppiefs.state"):
        manager.empty_trash()
    assert not any(d.exists() for d in trash)
    assert live.is_dir()
    assert "cannot run rm" in caplog.text
