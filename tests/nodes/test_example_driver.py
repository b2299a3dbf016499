"""contrib/mcts_example.py finds the fixing edits and leaves only root + winner behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from oppiefs.client import Client
from tests.mountutil import ROOT

EDITS = [
    {"file": "calc.py", "old": "return a - b", "new": "return a + b"},
    {"file": "calc.py", "old": "return a + b\n\ndef mul", "new": "return a * b\n\ndef mul"},
    {"file": "calc.py", "old": "def mul(a, b):\n    return a + b",
     "new": "def mul(a, b):\n    return a * b"},
]


def test_example_driver(tmp_path: Path, daemon) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "calc.py").write_text("def add(a, b):\n    return a - b\n\n"
                                  "def mul(a, b):\n    return a + b\n")
    (proj / "check.py").write_text("from calc import add, mul\n"
                                   "assert add(2, 3) == 5\nassert mul(2, 3) == 6\n")
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))
    res = subprocess.run(
        [sys.executable, str(ROOT / "contrib" / "mcts_example.py"), "--mount", str(daemon.mnt),
         "--src", str(proj), "--edits", str(edits), "--score", f"{sys.executable} check.py",
         "--iterations", "12"], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(res.stdout)
    assert out["score"] == 1.0 and sorted(out["edits"]) == [0, 2]
    with Client(daemon.mnt) as c:
        assert c.status()["snapshots"] == 2 and c.status()["nodes"] == 0
    assert "return a * b" in (daemon.mnt / "snapshots" / out["best"] / "calc.py").read_text()
