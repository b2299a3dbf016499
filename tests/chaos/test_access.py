"""Reliability 5: what a non-root user can and cannot do with a root-mounted oppiefs.

A throw-away system user (``useradd``, removed afterwards) probes the mount with the system
Python (the venv may live where the user cannot reach it), through ``setpriv`` with the
user's uid/gid and no supplementary groups. Everything lives in a 0755 directory under
/var/tmp, because pytest's temp dirs are 0700 and the user could not even traverse them.

Promises:
* without ``allow_other`` the user gets nothing: not the ctl file, not the snapshots;
* with ``-o allow_other`` the user reads snapshot files, but still cannot open ``ctl``
  (mode 0600, owner root) for writing or even reading, and cannot write into a snapshot:
  EACCES where permissions forbid it, EROFS where they would allow it (a file and a
  directory owned by the user in the snapshot);
* a setuid-root binary inside a node does not run setuid (nodes are mounted nosuid); as a
  control, the same binary outside the node does, so the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.chaosutil import as_user, record_figures, shared_dir, temp_user
from tests.mountutil import Daemon
from tests.nodeutil import CtlSession

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(map(shutil.which, ("useradd", "userdel", "setpriv"))),
    reason="needs root, useradd/userdel and setpriv")

USER = "oppiefs-chaos"
SYS_PYTHON = "/usr/bin/python3"

# Runs as the user: each probe -> "ok" / a value, or the errno name it failed with.
PROBE = r"""
import errno, json, os, subprocess, sys
out = []
for kind, path in json.loads(sys.argv[1]):
    try:
        if kind == "open-w":
            os.close(os.open(path, os.O_WRONLY))
            res = "ok"
        elif kind == "open-r":
            os.close(os.open(path, os.O_RDONLY))
            res = "ok"
        elif kind == "open-rw":
            os.close(os.open(path, os.O_RDWR))
            res = "ok"
        elif kind == "read":
            with open(path, "rb") as f:
                res = f.read().decode()
        elif kind == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            res = "ok"
        elif kind == "mkdir":
            os.mkdir(path)
            res = "ok"
        elif kind == "listdir":
            res = sorted(os.listdir(path))
        elif kind == "euid":
            res = subprocess.run([path, "-u"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        else:
            res = "unknown probe"
    except OSError as exc:
        res = errno.errorcode.get(exc.errno, str(exc.errno))
    except subprocess.CalledProcessError as exc:
        res = f"exit {exc.returncode}: {exc.stderr.strip()}"
    out.append(res)
print(json.dumps(out))
"""


def probe(user: Any, *checks: tuple[str, Path]) -> list[Any]:
    res = as_user(user, [SYS_PYTHON, "-c", PROBE,
                         json.dumps([(k, str(p)) for k, p in checks])])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_non_root_user(tmp_path: Path) -> None:
    if not os.access(SYS_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYS_PYTHON} to probe as another user")
    checks = 0
    with shared_dir("oppiefs-access-") as base, temp_user(USER) as user:
        src = base / "src"
        (src / "dir").mkdir(parents=True)
        (src / "dir" / "file").write_text("readable by all\n")
        (src / "users-file").write_text("owned by the user\n")
        (src / "users-dir").mkdir()
        os.chown(src / "users-file", user.pw_uid, user.pw_gid)
        os.chown(src / "users-dir", user.pw_uid, user.pw_gid)
        for p in (src, src / "dir", src / "users-dir"):
            p.chmod(0o755)
        mnt, store = base / "mnt", base / "store"

        # -- without allow_other: the mount is closed to everyone but root ------------------
        d = Daemon(mnt, store)
        try:
            d.start()
            with CtlSession(mnt) as s:
                snap = s.call(f"import {src}")["snapshot"]
            sdir = mnt / "snapshots" / snap
            assert (sdir / "dir" / "file").read_text() == "readable by all\n"
            got = probe(user, ("open-w", mnt / "ctl"), ("open-r", mnt / "ctl"),
                        ("read", sdir / "dir" / "file"), ("listdir", mnt))
            assert got == ["EACCES"] * 4, got
            checks += len(got)
        finally:
            d.stop()

        # -- with allow_other ---------------------------------------------------------------
        d = Daemon(mnt, store, "-o", "allow_other")
        try:
            d.start()
            assert oct((mnt / "ctl").stat().st_mode & 0o7777) == "0o600"
            got = probe(
                user,
                ("read", sdir / "dir" / "file"),
                ("listdir", sdir),
                ("open-w", mnt / "ctl"),
                ("open-rw", mnt / "ctl"),
                ("open-r", mnt / "ctl"),
                # Snapshot trees are a read-only mount: the kernel says EROFS before it
                # looks at permissions, for the root's files and the user's own alike.
                ("open-w", sdir / "dir" / "file"),
                ("create", sdir / "dir" / "new"),
                ("mkdir", sdir / "newdir"),
                ("open-w", sdir / "users-file"),
                ("create", sdir / "users-dir" / "new"),
                ("mkdir", sdir / "users-dir" / "sub"),
            )
            checks += len(got)
            assert got[0] == "readable by all\n", got
            assert got[1] == ["dir", "users-dir", "users-file"], got
            assert got[2:5] == ["EACCES"] * 3, got
            assert got[5:] == ["EROFS"] * 6, got

            # -- a setuid-root binary in a node ------------------------------------------------
            with CtlSession(mnt) as s:
                fork = s.call(f"fork {snap}")
                assert fork["ok"], fork
                node = Path(fork["path"])
                for where in (node / "id-setuid", base / "id-setuid"):
                    shutil.copy2("/usr/bin/id", where)
                    os.chown(where, 0, 0)
                    os.chmod(where, 0o4755)
                    assert where.stat().st_mode & 0o4000, where
                node_euid, control_euid = probe(user, ("euid", node / "id-setuid"),
                                                ("euid", base / "id-setuid"))
                checks += 2
                assert node_euid == str(user.pw_uid), node_euid  # nosuid: no privileges
                nosuid_base = "nosuid" in subprocess.run(
                    ["findmnt", "-no", "OPTIONS", "--target", str(base)],
                    capture_output=True, text=True).stdout
                if not nosuid_base:
                    assert control_euid == "0", (
                        f"control: setuid binary outside the node ran as {control_euid}")
                assert s.call(f"drop {fork['node']}")["ok"]
        finally:
            d.stop()
    record_figures("access", user_checks=checks, setuid_control_effective=not nosuid_base)
