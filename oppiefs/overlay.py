"""OverlayFS nodes: mount/unmount, mount-table queries, and reading an upper dir.

Mounts use mount(2)/umount2(2) through ctypes: a fork or drop is one syscall, not a
fork/exec of mount(8) (that alone costs milliseconds). These calls look up the lowerdir,
which lives on our own FUSE mount, so callers must never run them on the thread that
serves FUSE requests.

Overlay options: ``index=off,redirect_dir=off,metacopy=off`` keep the upper dir a plain
description of the changes (full copies on copy-up, renamed directories copied rather than
redirected), which the differ can read without consulting the lower. ``xino=off`` is
deliberate: snapshot inode numbers use all 64 bits (vfs.py), so overlay could not fold a
layer index into them; with xino off it reports the real layer inode numbers and a
per-layer device number, which tools handle. ``nosuid,nodev`` because a node's contents
are untrusted.

``volatile``: without it, every unmount (drop) and every fsync inside a node syncs the
*whole* upper filesystem, so a drop would wait for unrelated writeback on the store's disk.
A node's uncommitted changes are scratch by design; what must be durable is a commit,
which reads the upper dir and fsyncs the store itself. The price: after a machine crash an
overlay refuses to remount until its work dir is reset, which state.py does (and says so).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from . import hostfs
from .errors import Busy, OppieError, Unsupported, from_oserror

log = logging.getLogger(__name__)

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
MNT_EXPIRE = 4
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000

OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off,xino=off,volatile"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


def _escaped(path: str) -> str:
    """A path as overlay's options take it: ',' ends an option and ':' a lower layer, so
    both are escaped with a backslash (and so is the backslash). /proc/self/mountinfo
    shows them so too (``overlays_on``)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(lower: str, upper: str, work: str, merged: str) -> None:
    opts = (f"lowerdir={_escaped(lower)},upperdir={_escaped(upper)},"
            f"workdir={_escaped(work)},{OVERLAY_OPTIONS}")
    try:
        _check(_libc.mount(b"oppiefs-node", os.fsencode(merged), b"overlay",
                           MS_NOSUID | MS_NODEV, os.fsencode(opts)), merged)
    except OSError as exc:
        raise from_oserror(exc, f"mount overlay at {merged}") from exc


class Mounter:
    """Mounts overlays from a helper process, for a daemon whose lowers are its own mount.

    mount(2) looks the lower up on our FUSE mount and waits for the answers. Had a thread
    of the daemon made the call, a ``kill -9`` arriving after the FUSE thread had read such
    a request would leave the daemon unable to die: that thread waits, uninterruptibly, for
    an answer only its own process could give, and the FUSE connection (closed only when
    the process is gone) never aborts, so every client of the mount hangs too. A helper
    process holds no /dev/fuse descriptor: the daemon always dies, the connection aborts,
    and the helper's pending mount fails with ENOTCONN. One request at a time, as a line
    of JSON each way (~50 us).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._helper()  # now: the first fork should not pay for its start-up

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "oppiefs.overlay"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, close_fds=True)
        return self._proc

    def mount(self, lower: str, upper: str, work: str, merged: str) -> None:
        with self.started(lower, upper, work, merged) as mounted:
            mounted()

    @contextlib.contextmanager
    def started(self, lower: str, upper: str, work: str, merged: str, *,
                make_dirs: bool = False) -> Iterator[Callable[[], None]]:
        """Ask the helper to mount (``make_dirs``: creating upper, work and merged first),
        and let the caller work meanwhile: a fork records its node while the helper mounts,
        so the record's fsync and the mount overlap. The block gets ``mounted``, which waits
        for the outcome (raising the mount's error); a block that ends without having called
        it, by an exception, still waits for it, and undoes the mount if it took place.
        Requests go one at a time: other callers wait until the block ends."""
        request = json.dumps([lower, upper, work, merged, make_dirs]).encode() + b"\n"
        with self._lock:
            proc = self._helper()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except OSError:
                pass  # the helper died: the reply's read says so
            waited = False

            def mounted() -> None:
                nonlocal waited
                if not waited:
                    waited = True
                    _raise_for(proc, merged)

            try:
                yield mounted
            except BaseException:
                if not waited:
                    try:
                        mounted()
                    except OppieError:
                        pass  # not mounted: nothing to undo
                    else:  # nobody has been told of it
                        try:
                            unmount(merged, lazy=True)
                        except OppieError as exc:  # the block's own error matters more
                            log.warning("undoing the mount at %s: %s", merged, exc)
                raise
            mounted()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(10)
            self._proc = None


def _raise_for(proc: subprocess.Popen[bytes], merged: str) -> None:
    """Read the helper's reply to a mount request; raise its error."""
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
    except OSError:
        line = b""
    if not line:
        raise OppieError(f"mount overlay at {merged}: the mount helper died")
    reply = json.loads(line)
    if reply.get("errno"):
        exc = OSError(reply["errno"], os.strerror(reply["errno"]), merged)
        raise from_oserror(exc, reply.get("what") or f"mount overlay at {merged}") from None
    if reply.get("error"):
        raise Unsupported(reply["error"])


def _serve_mounts() -> None:
    """The helper's loop (``python -m oppiefs.overlay``): stdin requests, stdout replies.
    It ends when the daemon closes the pipe (or dies); Ctrl-C is the daemon's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin.buffer:
        reply = _serve_one(*json.loads(line))
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()


def _serve_one(lower: str, upper: str, work: str, merged: str,
               make_dirs: bool) -> dict[str, object]:
    """One request: the reply names a failure by errno and by the step that failed."""
    d = ""
    try:
        if make_dirs:
            for d in (upper, work, merged):
                os.makedirs(d)
        mount_overlay(lower, upper, work, merged)
    except Unsupported as exc:
        return {"error": str(exc)}
    except OppieError as exc:
        cause = exc.__cause__
        return {"errno": cause.errno if isinstance(cause, OSError) and cause.errno
                else errno.EIO}
    except OSError as exc:
        return {"errno": exc.errno or errno.EIO, "what": f"create {d}"}
    return {"ok": True}


def spread_subdirs(path: str) -> None:
    """Mark ``path`` as the top of directory hierarchies (``chattr +T``), so that ext2/3/4
    place each new node dir in its own block group (Orlov allocator). Best effort: other
    filesystems lack the flag and do not need it.

    Why: an ext4 without a journal allocates no inode deleted in the last 60-360 s and
    scans past every such inode of the group each time it allocates one. Every fork
    creates and every drop deletes a few inodes (node dirs, overlay's work dir and probe
    files, copy-ups), so in one group a busy search loop made each fork burn 5-10 ms of
    CPU in that scan within minutes. Spread over all groups, the scan stays short.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & FS_TOPDIR_FL:
            flags[0] |= FS_TOPDIR_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    except OSError:
        pass  # ENOTTY/EOPNOTSUPP: not ext*, nothing to tune
    finally:
        os.close(fd)


def boot_id() -> str:
    """Identifies this boot: a node forked in an earlier boot may have lost unsynced data."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def unmount(path: str, *, lazy: bool = False) -> None:
    """Unmount; EBUSY becomes Busy, an already-gone mount is not an error."""
    try:
        _check(_libc.umount2(path.encode(), MNT_DETACH if lazy else 0), path)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        if exc.errno == errno.EBUSY:
            raise Busy(f"{path} is busy: a process still uses it") from exc
        raise from_oserror(exc, f"unmount {path}") from exc


def in_use(path: str) -> bool:
    """Whether a process uses the mount at ``path`` (cwd, open file, a mount on top), which
    ``unmount`` would refuse with EBUSY, asked without unmounting anything.

    ``umount2(MNT_EXPIRE)`` answers EBUSY for a mount in use and EAGAIN for an idle one,
    which it only marks expired; a second such call would unmount it, so the mark is
    cleared at once by a lookup that crosses into the mount (verified on this kernel).
    """
    if _libc.umount2(path.encode(), MNT_EXPIRE) == 0:
        return False  # idle and marked already (by whom? nothing here leaves a mark): gone
    err = ctypes.get_errno()
    if err == errno.EAGAIN:
        with contextlib.suppress(OSError):
            os.stat(path)
        return False
    if err == errno.EBUSY:
        return True
    if err in (errno.EINVAL, errno.ENOENT):
        return False  # not mounted (any more)
    raise from_oserror(OSError(err, os.strerror(err)), f"probe mount {path}")


# -- the mount table ----------------------------------------------------------------------


class MountInfo(NamedTuple):
    mountpoint: str
    fstype: str
    source: str
    options: str  # super options (lowerdir=... for overlays)
    device: str = ""  # major:minor, names the mount's /sys/class/bdi entry


_OVL_UNESCAPE = re.compile(r"\\(.)")  # undoes ``_escaped``


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def mounts() -> list[MountInfo]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            out.append(MountInfo(_unescape(fields[4]), rfields[0], _unescape(rfields[1]),
                                 rfields[2], fields[2]))
    return out


def is_mounted(path: str) -> bool:
    path = os.path.abspath(path)
    return any(m.mountpoint == path for m in mounts())


def detach_stale(mountpoint: str) -> list[str]:
    """Lazily unmount a (dead) FUSE mount and every overlay stacked on it; returns what
    went."""
    gone = []
    for m in overlays_on(mountpoint):
        unmount(m, lazy=True)
        gone.append(m)
    unmount(mountpoint, lazy=True)
    gone.append(mountpoint)
    return gone


def overlays_on(lower_prefix: str) -> list[str]:
    """Mountpoints of overlays whose lowerdir lies under ``lower_prefix``."""
    prefix = lower_prefix.rstrip("/") + "/"
    return [mp for mp, lower in overlay_lowers() if lower.startswith(prefix)]


def overlay_lowers() -> list[tuple[str, str]]:
    """(mountpoint, lowerdir) of every overlay mounted."""
    found = []
    for m in mounts():
        if m.fstype != "overlay":
            continue
        for opt in m.options.split(","):  # a ',' in a value is shown as \054
            if opt.startswith("lowerdir="):
                found.append((m.mountpoint, _OVL_UNESCAPE.sub(r"\1", _unescape(opt[9:]))))
    return found


# -- reading an upper dir -------------------------------------------------------------------

# Nodes are mounted without ``userxattr``, so overlayfs keeps its own marks in
# ``trusted.overlay.*`` only: a ``user.overlay.*`` xattr is one a program in the node set (a
# tar of a rootless container layer, say), meaningless to the kernel's view of the node,
# and reading it as a mark would commit a tree the node never showed.
OPAQUE_XATTRS = (b"trusted.overlay.opaque",)
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout",)
REFUSED_XATTRS = (b"trusted.overlay.redirect", b"trusted.overlay.metacopy")


class UpperItem(NamedTuple):
    """One name in an upper dir, classified by its mode (``UpperDir.marks`` refines it)."""

    name: bytes
    path: bytes
    st: os.stat_result
    kind: str  # whiteout | dir | file | symlink


def _has(names: list[bytes], wanted: tuple[bytes, ...]) -> bytes | None:
    for n in wanted:
        if n in names:
            return n
    return None


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}


class UpperDir:
    """The differ's reading of an upper dir (``tree.UpperLayer``), by descriptors.

    Refuses redirect/metacopy xattrs: those describe data that lives in another layer, which
    this differ does not follow yet (a later fast read path needs them). A commit scans
    every directory on its changed paths; names are classified by mode, and the dirs and
    files it opens anyway are checked for marks on their descriptors: most carry no xattrs
    at all and take one ``flistxattr`` and no further test.
    """

    def scan(self, fd: int, path: bytes) -> list[UpperItem]:
        try:
            names = os.listdir(fd)
        except OSError as exc:
            raise from_oserror(exc, os.fsdecode(path)) from exc
        items = []
        for name in map(os.fsencode, names):
            p = path + b"/" + name
            hostfs.check_length(p)
            items.append(self.item(name, p, hostfs.lstat(fd, name, p)))
        return items

    def item(self, name: bytes, path: bytes, st: os.stat_result) -> UpperItem:
        mode = st.st_mode
        kind = _KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            if not (stat.S_ISCHR(mode) and st.st_rdev == 0):
                raise Unsupported(f"{os.fsdecode(path)}: cannot commit a "
                                  f"{hostfs.special_kind(mode)}")
            kind = "whiteout"
        return UpperItem(name, path, st, kind)

    def marks(self, fd: int, item: UpperItem, xattrs: list[bytes]) -> str:
        try:
            if not xattrs:
                return item.kind
            refused = _has(xattrs, REFUSED_XATTRS)
            if refused:
                raise Unsupported(f"{os.fsdecode(item.path)}: carries {refused.decode()}, "
                                  "which commit cannot represent yet (mount nodes with "
                                  "redirect_dir=off, metacopy=off)")
            if item.kind == "dir":
                opaque = _has(xattrs, OPAQUE_XATTRS)
                return ("opaque-dir" if opaque is not None and os.getxattr(fd, opaque) == b"y"
                        else "dir")
            if item.st.st_size == 0 and _has(xattrs, WHITEOUT_XATTRS):
                return "whiteout"
            return item.kind
        except OSError as exc:
            raise from_oserror(exc, os.fsdecode(item.path)) from exc


UPPER_DIR = UpperDir()


if __name__ == "__main__":
    _serve_mounts()
