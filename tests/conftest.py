"""Shared pytest setup for every tier.

Makes the ``tests`` package importable (``from tests.treeutil import ...``) however pytest is
started, without an ``__init__.py`` that would change how pytest names test modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.mountutil import Daemon, sweep_mounts  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_stale_mounts(tmp_path_factory: pytest.TempPathFactory):
    """Lazily unmount FUSE/overlay leftovers: dead ones under pytest's temp base before the
    session (live ones may belong to a concurrent session), all of this session's after."""
    sweep_mounts(tmp_path_factory.getbasetemp().parent, only_dead=True)
    yield
    sweep_mounts(tmp_path_factory.getbasetemp())


@pytest.fixture
def daemon(tmp_path: Path):
    """A live mount of a fresh store: ``daemon.mnt``, ``daemon.store``; always cleaned up."""
    d = Daemon(tmp_path / "mnt", tmp_path / "store")
    d.start()
    try:
        yield d
    finally:
        d.stop()
