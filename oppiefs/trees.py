"""The tree server: snapshot trees on a FUSE connection of their own, in no-open mode.

Opening a file on FUSE is a round trip to the daemon, and on a VM that round trip is
mostly the wake-up of the waiting program's vCPU: a warm ``tar`` of a snapshot ran at
2.7-3x native for its OPEN per file alone. The kernel's no-open mode (OPEN answered
ENOSYS) removes OPEN and RELEASE and keeps every file's page cache (warm tar 1.0-1.2x),
but it holds for a whole connection, and ``ctl`` needs its OPEN (per-handle sessions,
``direct_io``). So the daemon serves ``<mnt>`` (ctl, nodes/) itself and runs this server,
a child process (pyfuse3 serves one connection per process), for the trees: mounted
read-only on ``<store>/trees``, with ``<mnt>/snapshots`` a symlink to its ``snapshots``.
It lives outside ``<mnt>`` as node overlays do, so a plain ``fusermount3 -u <mnt>`` works.

When a command may have changed the snapshot listing, the daemon tells the kernel itself,
before it replies (so no reply races its listing): the server hands it a copy of its
``/dev/fuse`` descriptor at start, and the daemon writes the invalidation notices there
(two ``writev``s, no round trip through the server). A socket pair ties the two
lifetimes: the server exits when the daemon closes its end or dies (parent death signal),
unmounting itself; a daemon restart cleans up a server that could not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from . import overlay, tree
from .errors import OppieError, error_line, from_error_line
from .fs import Operations, fuse_init, serve_requests, tune_gc, watch_signals
from .vfs import SNAPSHOTS_INO, Vfs

log = logging.getLogger("oppiefs.trees")

DIR_NAME = "trees"  # the mountpoint, under the store dir
FSNAME = "oppiefs-trees"
READY_TIMEOUT_S = 60.0
READAHEAD_KB = 1024
_PR_SET_PDEATHSIG = 1
# Kernel notices written to /dev/fuse (linux/fuse.h): header (len, code, unique 0), body.
_NOTIFY_HEADER = struct.Struct("<IiQ")
_NOTIFY_INVAL_INODE, _INVAL_INODE = 2, struct.Struct("<Qqq")  # ino, offset, length
_NOTIFY_INVAL_ENTRY, _INVAL_ENTRY = 3, struct.Struct("<QII")  # parent, namelen, flags


def mountpoint_of(store_dir: Path) -> Path:
    return store_dir / DIR_NAME


class TreeServer:
    """The daemon's handle on its tree server process."""

    def __init__(self, store_dir: Path, options: list[str]) -> None:
        self.mountpoint = mountpoint_of(store_dir)  # made ready by the daemon
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "oppiefs.trees", "--store", str(store_dir),
               "--ipc-fd", str(theirs.fileno()), str(self.mountpoint)]
        for opt in options:
            cmd += ["-o", opt]
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.fuse_fd: int | None = None  # the server's /dev/fuse, for invalidation notices
        self.sock = ours
        self.sock.settimeout(READY_TIMEOUT_S)
        try:
            ready, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        except OSError:
            ready, fds = b"", []
        if ready != b"ready\n" or len(fds) != 1:
            self.stop()
            said = from_error_line(ready)
            if said is not None:
                raise said
            raise OppieError(f"the tree server did not start (it said {ready!r}; see the log)")
        self.fuse_fd = fds[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _notify(self, code: int, body: bytes) -> None:
        """One notice to the kernel about the server's connection (done when this returns).
        Failures are logged, not raised: the command has already taken effect, and the
        kernel re-reads the listing within its attribute timeout anyway."""
        if self.fuse_fd is None:
            return
        header = _NOTIFY_HEADER.pack(_NOTIFY_HEADER.size + len(body), code, 0)
        try:
            os.writev(self.fuse_fd, [header, body])
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel had nothing cached
                log.error("cannot invalidate a snapshot listing: %s", exc.strerror)

    def changed(self) -> None:
        """The snapshot listing may have changed: the kernel must re-read it."""
        self._notify(_NOTIFY_INVAL_INODE, _INVAL_INODE.pack(SNAPSHOTS_INO, 0, 0))

    def released(self, snapshot_id: str) -> None:
        """``snapshot_id`` left the listing: the kernel must forget its cached entry."""
        name = snapshot_id.encode()
        self._notify(_NOTIFY_INVAL_ENTRY,
                     _INVAL_ENTRY.pack(SNAPSHOTS_INO, len(name), 0) + name + b"\0")

    def stop(self, timeout: float = 30.0) -> None:
        """Close our end (the server unmounts and exits); kill it if it does not, and
        detach a mount it could not take down (it died, or overlays still held it)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.fuse_fd is not None:
            os.close(self.fuse_fd)
            self.fuse_fd = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if overlay.is_mounted(str(self.mountpoint)):
            overlay.detach_stale(str(self.mountpoint))


# -- the server process ---------------------------------------------------------------------


def serve_trees(store_dir: Path, mountpoint: str, ipc: socket.socket,
                options: list[str]) -> None:
    """Serve every snapshot read-only at ``mountpoint`` until the daemon lets go."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the daemon died: unmount and go
    if os.getppid() == 1:
        return  # it died before we asked
    tune_gc()
    store = tree.open_store(store_dir, create=False)
    ops = Operations(Vfs(tree.Reader(store)))
    opts = set(pyfuse3.default_options) | {f"fsname={FSNAME}", "subtype=oppiefs", "ro"}
    try:
        fuse_init(ops, mountpoint, opts, options)
    except OppieError:
        store.close()
        raise
    set_readahead(mountpoint)
    try:
        trio.run(_run, ipc)
    finally:
        pyfuse3.close(unmount=True)
        store.close()


async def _run(ipc: socket.socket) -> None:
    async with trio.open_nursery() as nursery:
        async def fuse_main() -> None:
            await serve_requests()
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_main)
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        socket.send_fds(ipc, [b"ready\n"], [_fuse_fd()])
        sock = trio.socket.from_stdlib_socket(ipc)
        while await sock.recv(4096):
            pass
        nursery.cancel_scope.cancel()  # the daemon closed its end, or died


def _fuse_fd() -> int:
    """This process's /dev/fuse descriptor (pyfuse3 keeps it to itself; there is one)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    raise OppieError("no /dev/fuse descriptor in the tree server")


def set_readahead(mountpoint: str) -> None:
    """Read ahead 1 MiB on the mount (the kernel gives FUSE 128 KiB): sequential reads of
    large files need half the round trips. Found via mountinfo, never by touching the
    mountpoint (its requests are not being served yet)."""
    for m in reversed(overlay.mounts()):  # the newest mount there is ours
        if m.mountpoint == mountpoint and m.fstype.startswith("fuse") and m.device:
            try:
                Path(f"/sys/class/bdi/{m.device}/read_ahead_kb").write_text(f"{READAHEAD_KB}\n")
            except OSError as exc:
                log.info("cannot raise readahead of %s: %s", mountpoint, exc.strerror)
            return


def main() -> None:
    ap = argparse.ArgumentParser(description="oppiefs tree server (started by the daemon)")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--ipc-fd", type=int, required=True)
    ap.add_argument("-o", dest="options", action="append", default=[])
    ap.add_argument("mountpoint")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ipc = socket.socket(fileno=args.ipc_fd)
    try:
        serve_trees(args.store, args.mountpoint, ipc, args.options)
    except OppieError as exc:
        log.error("%s", exc)
        with contextlib.suppress(OSError):
            ipc.sendall(error_line(exc))  # the mount command says why
        sys.exit(1)


if __name__ == "__main__":
    main()
