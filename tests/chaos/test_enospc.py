"""Reliability 4: a full store device fails one command cleanly, then the store goes on.

The store (and with it every node's upper dir, under ``<store>/nodes/``) lives on a tmpfs of
``OPPIEFS_ENOSPC_FS_MB`` MiB (default 64). A node gets a random file of ~70% of the free
space: it fits in the upper dir, but the commit must store it again and cannot. Then an
``import`` (through ctl) of a host directory bigger than what is left. Promises: the reply is
``{"ok": false, "error": "ENOSPC"}``; no partial snapshot appears; fsck is clean; once space
is freed (the big file deleted in the node) the next commit succeeds, and after the failed
import the store still imports and, once a filler file on the device is deleted, forks,
commits and drops.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.chaosutil import env_int, free_bytes, record_figures, small_fs
from tests.mountutil import Daemon
from tests.nodeutil import CtlSession, fsck_clean

FS_MB = env_int("OPPIEFS_ENOSPC_FS_MB", 64)
MIB = 1 << 20


def _random_file(path: Path, size: int) -> None:
    """Incompressible, dedup-proof bytes, written in pieces (never whole in memory)."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def _listing(d: Daemon) -> list[str]:
    return sorted(os.listdir(d.mnt / "snapshots"))


def _assert_enospc(reply: dict) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"] == "ENOSPC", reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply


def test_enospc_commit_and_import(tmp_path: Path) -> None:
    small = tmp_path / "small"  # the store dir is the tmpfs itself; the log stays outside
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("base content\n")
    figures: dict[str, int] = {"fs_mb": FS_MB}
    with small_fs(small, FS_MB):
        d = Daemon(tmp_path / "mnt", small)
        try:
            d.start()
            with CtlSession(d.mnt) as s:
                filler = small / "filler"  # freed after the failed import
                _random_file(filler, 8 * MIB)
                base = s.call(f"import {src}")["snapshot"]
                fork = s.call(f"fork {base}")
                node, ndir = fork["node"], Path(fork["path"])
                (ndir / "keep.txt").write_text("kept across the failure\n")
                assert s.call(f"commit {node}")["ok"]
                listing, status = _listing(d), s.call("status")

                # -- commit that cannot be stored --------------------------------------------
                big = int(free_bytes(small) * 0.7)
                _random_file(ndir / "big.bin", big)
                figures["commit_file_mb"] = big // MIB
                _assert_enospc(s.call(f"commit {node}"))
                figures["free_after_failed_commit_kb"] = free_bytes(small) // 1024
                assert _listing(d) == listing, "a failed commit left a snapshot behind"
                after = s.call("status")
                assert (after["snapshots"], after["nodes"]) == (
                    status["snapshots"], status["nodes"])
                fsck_clean(small)  # works on a full device, finds nothing half-written

                # Free the space inside the node: the next commit goes through.
                (ndir / "big.bin").unlink()
                (ndir / "after.txt").write_text("after the space came back\n")
                ok = s.call(f"commit {node}")
                assert ok["ok"], ok
                snapdir = d.mnt / "snapshots" / ok["snapshot"]
                assert sorted(os.listdir(snapdir)) == ["after.txt", "keep.txt", "sub"]
                assert (snapdir / "keep.txt").read_text() == "kept across the failure\n"
                fsck_clean(small)

                # -- import bigger than the device ---------------------------------------------
                listing = _listing(d)
                big_src = tmp_path / "big-src"
                big_src.mkdir()
                # Bigger than one write batch of the importer (64 MiB) as well, so the failure
                # can land in a batch written before the publishing transaction.
                need = max(int(free_bytes(small) * 1.3) + 8 * MIB, 80 * MIB)
                for i in range(4):
                    _random_file(big_src / f"part{i}", need // 4)
                figures["import_mb"] = need // MIB
                _assert_enospc(s.call(f"import {big_src}"))
                assert _listing(d) == listing, "a failed import left a snapshot behind"
                fsck_clean(small)

                # The store keeps working: a small import fits in LMDB's own free pages even
                # on the full device; with the filler gone, nodes can be written again.
                small_src = tmp_path / "small-src"
                small_src.mkdir()
                (small_src / "x").write_text("still works\n")
                again = s.call(f"import {small_src}")
                assert again["ok"], again
                filler.unlink()
                child = s.call(f"fork {again['snapshot']}")
                assert child["ok"], child
                (Path(child["path"]) / "y").write_text("y\n")
                c = s.call(f"commit {child['node']}")
                assert c["ok"], c
                assert sorted(os.listdir(d.mnt / "snapshots" / c["snapshot"])) == ["x", "y"]
                for n in (child["node"], node):
                    assert s.call(f"drop {n}")["ok"]
                fsck_clean(small)
                assert d.proc is not None and d.proc.poll() is None
        finally:
            d.stop()
    record_figures("enospc", **figures)
