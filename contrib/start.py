"""Main job of the quick start: mount the embedded default store at /mnt/state (or the
mountpoint given) and import a sample snapshot, so ``ls /mnt/state/snapshots/`` shows
something. The sample is the running Python's standard library (on every machine).
Idempotent: a live mount is reused (re-importing gives the same id), a dead one is
recovered by ``oppiefs mount``.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from oppiefs.client import Client
from oppiefs.errors import OppieError

mnt = Path(sys.argv[1] if len(sys.argv) > 1 else "/mnt/state")
oppiefs = str(Path(sys.executable).with_name("oppiefs"))

try:
    alive = (mnt / "ctl").exists()
except OSError:  # a dead mount: ENOTCONN
    alive = False
if not alive:
    res = subprocess.run([oppiefs, "mount", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr.strip() or f"oppiefs mount failed ({res.returncode})")
    print(res.stdout.strip())
sample = sysconfig.get_path("stdlib")
print(f"importing sample tree {sample} ...", file=sys.stderr)
try:
    with Client(mnt) as client:
        snap = client.import_(sample)
except OppieError as exc:
    sys.exit(f"import failed: {exc}")
print(f"snapshot {snap} at {mnt}/snapshots/{snap}")
print(f"next: ls {mnt}/snapshots/   oppiefs fork {snap[:12]} --mount {mnt}")
