"""Run the ``oppiefs`` CLI as a user would, and probe a store's observable state.

Shared by every tier: the unit tests drive the offline commands with it, mount tests can
use it to import, check out and fsck around a mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oppiefs import tree

_SCRIPT = Path(sys.executable).with_name("oppiefs")
OPPIEFS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oppiefs.cli"]


@dataclass
class Result:
    args: list[str]
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    """Runs ``oppiefs`` as a subprocess against one store, the way a user would.

    Every call checks what all errors promise: no traceback on stderr. ``expect`` is the exit
    code the test wants (``None`` accepts any); a mismatch fails with both output streams.
    """

    def __init__(self, store: Path) -> None:
        self.store = store

    def __call__(self, *args: str | os.PathLike[str], expect: int | None = 0,
                 prefix: Sequence[str] = (), store: Path | None = None) -> Result:
        argv = [*prefix, *OPPIEFS, *map(os.fsdecode, args),
                "--store", str(store or self.store)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPPIEFS_")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=600, check=False)
        res = Result(argv, proc.returncode, proc.stdout.decode(errors="surrogateescape"),
                     proc.stderr.decode(errors="surrogateescape"))
        assert "Traceback" not in res.err, f"traceback from {argv}:\n{res.err}"
        if expect is not None:
            assert res.rc == expect, (f"{argv} exited {res.rc}, expected {expect}\n"
                                      f"stdout: {res.out}\nstderr: {res.err}")
        return res


def data_digest(store_dir: Path) -> str:
    """Digest of the LMDB data file: equal before and after means nothing was written."""
    return hashlib.sha256((store_dir / "data.mdb").read_bytes()).hexdigest()


def store_state(store_dir: Path) -> tuple:
    """What a user can observe of a store: snapshot records, counters, garbage."""
    with tree.open_store(store_dir, create=False) as store:
        recs = sorted((r.id, r.refs, r.pins, r.parent, r.time, r.bytes, r.files)
                      for r in store.snapshots(include_unlisted=True))
        return recs, store.stats(), store.garbage(), store.nodes()
