"""Fixtures for the nodes tier (fork / commit / drop / prune over a live mount).

Starting a daemon costs ~0.5 s, so modules whose tests do not restart or kill it share one
(``mdaemon``); every test still forks its own nodes and drops them, so tests stay
independent. Tests that stop, kill or remount use the per-test ``daemon`` fixture instead.
"""

from __future__ import annotations

import pytest

from tests.mountutil import Daemon


@pytest.fixture(scope="module")
def mdaemon(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("nodes")
    d = Daemon(base / "mnt", base / "store").start()
    try:
        yield d
    finally:
        d.stop()
