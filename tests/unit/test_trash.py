"""Dropped nodes' dirs (the trash) are deleted by ``rm`` in a child process, not in the
daemon, whose commands waited for its GIL while it deleted them; only the trash goes."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from oppiefs import state as state_mod
from oppiefs.state import TRASH_PREFIX, StateManager


def _fill_trash(sm: StateManager) -> tuple[list[Path], Path]:
    """Trash dirs shaped like dropped nodes (odd names inside), and a live node's dir."""
    trash = []
    for name in ("aa11", "-rf", "with space"):
        d = sm.node_root / f"{TRASH_PREFIX}{name}"
        deep = d / "upper" / "a" / "-b" / "c d"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(b"x" * 100)
        (d / "upper" / "a" / os.fsdecode(b"\xff")).write_bytes(b"")  # not UTF-8
        (d / "work").mkdir()
        trash.append(d)
    live = sm.node_root / "bb22"
    (live / "upper").mkdir(parents=True, exist_ok=True)
    (live / "upper" / "keep").write_bytes(b"k")
    for d in trash:
        os.symlink(live, d / "upper" / "live-link")  # rm must not follow it
    return trash, live


def _no_rmtree(*args: object, **kwargs: object) -> None:
    raise AssertionError("the daemon deleted the trash itself")


def test_trash_deleted_by_rm_in_a_child(manager: StateManager,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    trash, live = _fill_trash(manager)
    monkeypatch.setattr(state_mod.shutil, "rmtree", _no_rmtree)
    manager.empty_trash()
    assert not any(d.exists() for d in trash)
    assert (live / "upper" / "keep").read_bytes() == b"k"  # behind a symlink in the trash


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
    caplog.clear()
    _fill_trash(manager)
    with caplog.at_level(logging.WARNING, logger="oppiefs.state"):
        manager.empty_trash()
    assert "cannot run rm" not in caplog.text  # said once, not every second


def test_trash_not_touched_once_stopping(manager: StateManager) -> None:
    trash, _ = _fill_trash(manager)
    stop = threading.Event()
    stop.set()
    manager.empty_trash(stop)
    assert all(d.is_dir() for d in trash)  # left for the next start


def test_stopping_ends_the_child(manager: StateManager, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    """The daemon stops while ``rm`` runs: the child is ended, not left deleting in the
    store after the daemon exits (and not waited for until it is done)."""
    _fill_trash(manager)
    shim = tmp_path / "bin"
    shim.mkdir()
    pidfile = tmp_path / "child.pid"
    (shim / "nice").write_text(  # an rm that takes long, and says which process it is
        f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    (shim / "nice").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    manager.empty_trash(stop)
    assert time.monotonic() - start < 5
    child = Path("/proc") / pidfile.read_text().strip()  # not any `sleep 60` on the machine
    assert not child.exists(), "the deleting child outlived the stop"
