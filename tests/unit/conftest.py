"""Fixtures for the unit tier: a tmp store and a CLI runner bound to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cliutil import Cli


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path) -> Cli:
    return Cli(store_dir)
