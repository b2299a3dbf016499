"""Main job of the quick start: import a sample tree into the embedded default store.

The sample is the running Python's standard library (present on every machine).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

oppiefs = str(Path(sys.executable).with_name("oppiefs"))
sample = sysconfig.get_path("stdlib")
print(f"importing sample tree {sample} ...", file=sys.stderr)
snap = subprocess.run([oppiefs, "import", sample], check=True, capture_output=True,
                      text=True).stdout.strip()
print(snap)
