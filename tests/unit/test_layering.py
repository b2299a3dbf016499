"""The module boundaries of DESIGN.md, held by a test.

Only fs.py, trees.py and mount.py may import pyfuse3 or trio, only store.py lmdb, only chunker.py
pyfastcdc; and dependencies flow one way (cli -> mount -> trees -> fs -> vfs/control ->
state -> sweeper/tree/overlay -> store/chunker/hostfs), so the storage core works without a
mount.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "oppiefs"

ALLOWED_THIRD_PARTY = {
    "pyfuse3": {"fs", "trees", "mount"},
    "trio": {"fs", "trees", "mount"},
    "lmdb": {"store"},
    "pyfastcdc": {"chunker"},
}

# module -> oppiefs modules it must never import (directly), i.e. anything above it.
BELOW = {
    "store": {"errors"},
    "chunker": {"errors"},
    "hostfs": {"errors"},
    "tree": {"errors", "store", "chunker", "hostfs"},
    "overlay": {"errors", "hostfs"},
    "sweeper": {"errors", "store", "tree"},
    "state": {"errors", "store", "tree", "overlay", "sweeper"},
    "control": {"errors", "state"},
    "vfs": {"errors", "store", "tree"},
    "fs": {"errors", "vfs", "control", "tree", "store", "state"},
    "trees": {"errors", "fs", "vfs", "tree", "overlay", "store"},
    "mount": {"errors", "trees", "fs", "vfs", "control", "state", "tree", "overlay", "store"},
    "client": {"errors", "overlay"},  # overlay: the mount table (commands go to ours only)
}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(top-level third-party modules, sibling oppiefs modules) imported by a file."""
    third, own = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                (own if top == "oppiefs" else third).add(
                    alias.name.split(".")[1] if top == "oppiefs" and "." in alias.name else top)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0 or (node.module or "").startswith("oppiefs"):
                mod = (node.module or "").removeprefix("oppiefs").lstrip(".")
                if mod:
                    own.add(mod.split(".")[0])
                else:
                    own.update(alias.name for alias in node.names)
            elif node.module:
                third.add(node.module.split(".")[0])
    return third, own


def test_third_party_imports_stay_in_their_module() -> None:
    for path in sorted(PKG.glob("*.py")):
        third, _ = imports_of(path)
        for lib, allowed in ALLOWED_THIRD_PARTY.items():
            if lib in third:
                assert path.stem in allowed, f"{path.name} imports {lib}"


def test_dependencies_flow_one_way() -> None:
    for path in sorted(PKG.glob("*.py")):
        if path.stem not in BELOW:
            continue
        _, own = imports_of(path)
        extra = own - BELOW[path.stem] - {"__init__"}
        assert not extra, f"{path.name} imports {sorted(extra)} from a layer above it"


def test_core_imports_without_fuse() -> None:
    """The storage core must be importable with no FUSE binding loaded."""
    import subprocess
    import sys

    code = ("import sys; import oppiefs.tree, oppiefs.state, oppiefs.client, oppiefs.control; "
            "assert 'pyfuse3' not in sys.modules and 'trio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
