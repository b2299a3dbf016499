"""Run the chaos tier and print the figures its tests report, as a Markdown table.

Each chaos test calls ``tests.chaosutil.record_figures``, which appends one JSON line to the
file named by ``$OPPIEFS_CHAOS_FIGURES``; this script points that at a temp file, runs
pytest on tests/chaos (extra arguments are passed on, e.g. ``-k fuzz``), and prints what the
tests actually did (lines fuzzed, objects corrupted...) for bench/RESULTS.md. Sizes come
from the tests' own env vars (OPPIEFS_FUZZ_LINES, OPPIEFS_CORRUPT_OBJECTS,
OPPIEFS_ENOSPC_FS_MB), which pass through.

    .venv/bin/python bench/chaos_figures.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        env = {**os.environ, "OPPIEFS_CHAOS_FIGURES": out.name}
        rc = subprocess.run([sys.executable, "-m", "pytest", "tests/chaos", "-q", *argv],
                            cwd=ROOT, env=env).returncode
        rows = [json.loads(line) for line in out.read().splitlines() if line.strip()]
    print("\n| test | figures |\n|---|---|")
    for row in rows:
        test = row.pop("test")
        print(f"| {test} | " + ", ".join(f"{k}={v}" for k, v in sorted(row.items())) + " |")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
