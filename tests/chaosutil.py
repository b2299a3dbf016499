"""Helpers for the chaos tier: figures for bench/RESULTS.md, small filesystems, other users.

Chaos tests break things on purpose (corrupt bytes, fill the disk, act as another user), so
each helper here owns the cleanup of what it breaks: context managers undo mounts and users
even when the test fails half-way.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FIGURES_ENV = "OPPIEFS_CHAOS_FIGURES"  # path of a JSON-lines file collecting test figures


def env_int(name: str, default: int) -> int:
    """Sizes come from the environment so CI can run small and a soak run can run big."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def record_figures(test: str, **figures: Any) -> None:
    """Print a test's figures and, if ``$OPPIEFS_CHAOS_FIGURES`` is set, append them there.

    The lead publishes these in bench/RESULTS.md (``bench/chaos_figures.py`` runs the tier
    and prints the table), so a test reports what it actually did, not what it was asked.
    """
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# -- corrupting stored objects ---------------------------------------------------------------


def flip_payload_byte(store_dir: Path, marker: bytes) -> int:
    """Flip one bit inside every stored copy of ``marker`` in data.mdb; return the copies.

    ``marker`` is a run of one object's payload random enough to occur nowhere else, so only
    that object's bytes change and LMDB's own page structure stays intact (the damage that
    fsck and the hash check must catch, not one that makes LMDB itself refuse the file).
    """
    data_file = store_dir / "data.mdb"
    raw = data_file.read_bytes()
    hits = []
    pos = raw.find(marker)
    while pos >= 0:
        hits.append(pos)
        pos = raw.find(marker, pos + 1)
    with open(data_file, "r+b") as f:
        for hit in hits:
            at = hit + len(marker) // 2
            f.seek(at)
            f.write(bytes([raw[at] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())
    return len(hits)


# -- a small filesystem ------------------------------------------------------------------------


@contextmanager
def small_fs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB at ``path``, unmounted (lazily if busy) on exit.

    tmpfs rather than a loop ext4 image: no mkfs, no loop device to leak, and it supports
    what node upper dirs need (xattrs, whiteout device nodes). ENOSPC is the same errno.
    """
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                    "oppiefs-chaos", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        res = subprocess.run(["umount", str(path)], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- another user ------------------------------------------------------------------------------


@contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A 0755 directory under /var/tmp that a non-root user can traverse (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def temp_user(name: str) -> Iterator[pwd.struct_passwd]:
    """A throw-away system user with no home and no login shell, removed on exit."""
    subprocess.run(["userdel", name], capture_output=True)  # a leftover of a killed run
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: pwd.struct_passwd, argv: list[str], *,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with the user's uid/gid and no supplementary groups (no capabilities)."""
    cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
           "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
