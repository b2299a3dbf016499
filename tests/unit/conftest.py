"""Fixtures for the unit tier: a tmp store (path and opened), a CLI runner bound to it, a
StateManager on the store without a FUSE mount."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from oppiefs import tree
from oppiefs.state import StateManager
from oppiefs.store import Store
from tests.cliutil import Cli
from tests.mountutil import sweep_mounts


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    with tree.open_store(store_dir) as s:
        yield s


@pytest.fixture
def cli(store_dir: Path) -> Cli:
    return Cli(store_dir)


@pytest.fixture
def manager(store: Store, tmp_path: Path) -> Iterator[StateManager]:
    """A StateManager whose mountpoint is a plain dir (its ``snapshots/`` is not served)."""
    (tmp_path / "mnt").mkdir()
    sm = StateManager(store, tmp_path / "mnt")
    try:
        yield sm
    finally:
        sm.mounter.close()
        sweep_mounts(tmp_path)  # overlays a test mounted
