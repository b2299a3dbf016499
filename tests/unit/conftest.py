"""Fixtures for the unit tier: a tmp store (path and opened), a CLI runner bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from oppiefs import tree
from oppiefs.store import Store
from tests.cliutil import Cli


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
