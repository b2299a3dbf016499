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
