"""pyfuse3 Operations: a protocol adapter only.

Inodes and attributes come from vfs.py, bytes from tree.Reader, commands from control.py;
this module turns them into FUSE replies and every OppieError into ``FUSEError(errno)`` in
one place (``_fuse``). Anything unexpected is logged and answered with EIO.

Performance notes (measured on this kernel): every lookup through OverlayFS also asks for
``security.selinux`` and ``system.posix_acl_*`` xattrs, so getxattr answers ENODATA without
touching anything. A snapshot file's handle *is* its inode number (trees are immutable and
the kernel keeps the inode referenced while a file is open), so ``open`` allocates nothing.
Snapshot trees get day-long entry/attr timeouts and ``keep_cache``; the mount's own
directories short ones, and ``ctl`` is ``direct_io`` so every read reaches the daemon.

Directory listings: with a pyfuse3 built with contrib/pyfuse3-ino-without-open.patch,
``opendir`` answers ENOSYS, which puts the kernel in no-opendir mode: it sends no
OPENDIR/RELEASEDIR and caches every listing (warm ``find -ls`` over the kernel tree: 2.8x
-> 1.0x native). Snapshot trees never change; ``snapshots/`` and ``nodes/`` do, so their
mtime follows the store's last transaction (the kernel drops a cached listing whose
directory's mtime moved) and every control command invalidates them at once.

Files: on the tree server's connection (trees.py, no ctl) ``open`` answers ENOSYS too: in
no-open mode the kernel sends no OPEN or RELEASE and keeps each file's page cache, so a
warm ``tar`` sends no request at all (2.7-3x -> 1.1x native; an OPEN is a round trip whose
cost is mostly waking the caller's vCPU). The daemon's own connection keeps OPEN: ``ctl``
needs its per-handle sessions and ``direct_io``.

A trivial pyfuse3 server spends most of a request in its trio loop, not in the handler, so
``serve_requests`` runs pyfuse3's loop with a fast path: while requests are already queued,
a worker takes the next one without a round through trio's scheduler and epoll (yielding
every ``BURST`` requests so other tasks still run), and it busy-waits ``SPIN_S`` (50 us;
OPPIEFS_SPIN_US) for the next request before sleeping: a tool walking a tree sends it within
microseconds, and a sleep/wake-up cycle costs more than the request (warm kernel-tree tar
7.0 -> 4.8 s). pyfuse3's read lock is replaced by a barging one (``_FastLock``): with its
fair lock, two workers traded the lock on every request, a scheduler pass each (tar 4.8 ->
3.4 s). Hot handlers translate errors inline (``_error``) rather than through a wrapping
coroutine, ``open``/``opendir`` resolve nothing (the kernel only sends them for inodes it
looked up, of the right kind), and reads return zero-copy views of cached chunks. When the
kernel forgets most of the inode table, the table is rebuilt, caches are dropped,
``malloc_trim`` hands the freed heap back to the OS and the store's mapped pages are let go
(so RSS and drop_caches see them as plain page cache).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import gc
import json
import logging
import os
import select
import signal
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pyfuse3
import trio

from . import vfs as V
from .control import Control, Session, read_only
from .errors import Corrupt, InvalidArgument, OppieError
from .tree import T_DIR, T_SYMLINK, Entry

log = logging.getLogger("oppiefs.fs")

TREE_TIMEOUT = 86400.0  # immutable snapshot content
DYNAMIC_TIMEOUT = 1.0  # root, snapshots/, nodes/: change with the state
STALL_STATFS_S = float(os.environ.get("OPPIEFS_TEST_STALL_STATFS", "0"))
# Kernel-cached listings (see the module doc); OPPIEFS_NO_OPENDIR=0 turns them off.
NO_OPENDIR = (getattr(pyfuse3, "READDIR_INO_WITHOUT_OPENDIR", False)
              and os.environ.get("OPPIEFS_NO_OPENDIR", "1") != "0")
# Files opened without an OPEN on the tree server's connection (trees.py, which has no
# ctl); OPPIEFS_NO_OPEN=0 turns it off.
NO_OPEN = (getattr(pyfuse3, "READ_INO_WITHOUT_OPEN", False)
           and os.environ.get("OPPIEFS_NO_OPEN", "1") != "0")
CHUNK_CACHE = 512  # ~32 MiB of recently read chunks
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
STATS_ENV = "OPPIEFS_REQUEST_STATS"  # path: count requests per handler, dump on SIGUSR1/exit
HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
            "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
            "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
            "getxattr", "listxattr", "removexattr", "access", "create")

BURST = 64  # requests a worker may take back to back before yielding to trio
SPIN_S = float(os.environ.get("OPPIEFS_SPIN_US", "50")) / 1e6  # busy-wait before sleeping
_KIND = {T_DIR: stat.S_IFDIR, T_SYMLINK: stat.S_IFLNK}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _error(exc: Exception, where: str) -> pyfuse3.FUSEError:
    """The one place errors are translated: OppieError -> its errno; others -> logged EIO."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, Corrupt):
        log.error("%s: %s", where, exc)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, OppieError):
        return pyfuse3.FUSEError(exc.errno)
    log.error("unexpected error in %s", where, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def _fuse(fn: F) -> F:
    """Translate errors for handlers off the hot path (hot ones call ``_error`` inline)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            raise _error(exc, fn.__name__) from None

    return wrapper  # type: ignore[return-value]


# -- request loop -----------------------------------------------------------------------------


class _FastLowlevel:
    """``trio.lowlevel`` as pyfuse3's loop sees it, with a non-blocking ``wait_readable``."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.budget = burst
        self.polls: dict[int, select.poll] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        """Return at once if a request is queued (within the budget), else wait in trio."""
        poller = self.polls.get(fd)
        if poller is None:
            poller = self.polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if self.budget > 0:
            # Spin briefly before sleeping: a tool walking a tree sends its next request
            # within microseconds, and a sleep/wake-up costs more than the request itself.
            deadline = time.perf_counter() + SPIN_S
            while True:
                if poller.poll(0):
                    self.budget -= 1
                    return
                if time.perf_counter() > deadline:
                    break
        self.budget = self.burst
        await trio.lowlevel.wait_readable(fd)


class _FastLock:
    """pyfuse3's read lock (who waits on /dev/fuse), made barging.

    pyfuse3 runs two or more worker tasks; with a fair lock, each request handed the lock
    to the other worker, one trio scheduler pass (and epoll call) per request. Here a
    release hands nothing over: the worker that just took a request comes straight back for
    the next one. A parked worker takes over when the holder is about to wait elsewhere
    (``handoff``, called before a handler awaits) and, as a safety net, re-checks every
    ``RECHECK_S`` (so a missed hand-off delays requests, never deadlocks, and workers
    still drain at unmount).
    """

    RECHECK_S = 0.05
    current: _FastLock | None = None  # the lock of the running loop, for ``handoff``

    def __init__(self) -> None:
        self.held = False
        self.lot = trio.lowlevel.ParkingLot()
        _FastLock.current = self

    async def __aenter__(self) -> None:
        while self.held:
            with trio.move_on_after(self.RECHECK_S):
                await self.lot.park()
        self.held = True

    async def __aexit__(self, *exc: object) -> None:
        self.held = False
        if exc[0] is not None:  # shutting down: let the others see it
            self.lot.unpark_all()

    def handoff(self) -> None:
        if not self.held:
            self.lot.unpark()


def handoff_requests() -> None:
    """Call before a handler awaits: another worker serves FUSE requests meanwhile."""
    lock = _FastLock.current
    if lock is not None:
        lock.handoff()


class _FastTrio:
    """What pyfuse3 sees as its ``trio`` module (the hook its asyncio mode uses too)."""

    Lock = _FastLock

    def __init__(self, burst: int) -> None:
        self.lowlevel = _FastLowlevel(burst)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


# Python's cyclic GC collects after every 700 net new tracked objects by default, and the
# daemons' caches of decoded trees are made of them (~130k after 1,000 kernel-tree commits):
# in bench/commit_path.py a collection fell into 11 of the 20 slowest of 400 kernel-tree
# commits, 2.5-150 ms each. At 50,000, a commit (which leaves ~50 objects of cyclic garbage)
# meets a collection about once in a thousand, and what waits to be collected stays small.
GC_THRESHOLD = (50_000, 10, 10)


def fuse_init(ops: pyfuse3.Operations, mountpoint: str, opts: set[str],
              user_options: list[str] | None = None) -> None:
    """``pyfuse3.init`` with the user's ``-o`` options (comma lists) added to ``opts``. A
    refusal raises an OppieError that says why: libfuse tells that on stderr only."""
    for opt in user_options or []:
        opts = opts | {o for o in opt.split(",") if o}
    try:
        with _stderr_kept() as said:
            pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as exc:
        why = " ".join(said().split())
        cls = InvalidArgument if "unknown option" in why else OppieError
        raise cls(f"cannot mount {mountpoint}: {exc}" + (f" ({why})" if why else "")) from exc


@contextlib.contextmanager
def _stderr_kept() -> Iterator[Callable[[], str]]:
    """Copy what is written to fd 2 meanwhile (by C code too), to be read after the block;
    it still reaches the real stderr, the daemon's log. Best effort: without a temporary
    file the block runs as it is."""
    said: list[bytes] = []
    try:
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 (entered below, once it exists)
    except OSError:
        yield lambda: ""
        return
    saved = os.dup(2)
    with tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: b"".join(said).decode(errors="replace")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said.append(tmp.read())
            with contextlib.suppress(OSError):
                os.write(2, said[0])


def tune_gc() -> None:
    """Set this process's GC thresholds (the daemon and the tree server serve requests)."""
    gc.set_threshold(*GC_THRESHOLD)


async def serve_requests(burst: int = BURST) -> None:
    """Run ``pyfuse3.main()`` with the fast path (``burst=0``: pyfuse3's plain loop)."""
    saved = getattr(pyfuse3, "trio", None)
    if saved is None:  # a pyfuse3 without the hook: its plain loop
        await pyfuse3.main()
        return
    if burst > 0:
        pyfuse3.trio = _FastTrio(burst)  # type: ignore[attr-defined]
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.trio = saved  # type: ignore[attr-defined]


async def watch_signals(scope: trio.CancelScope) -> None:
    """End the serving loop (``scope``) on SIGTERM, SIGINT or SIGHUP."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: shutting down", sig)
            scope.cancel()
            return


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after big frees otherwise)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _erofs(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


async def _erofs_async(self: Any, *args: Any) -> Any:
    _erofs()


def _piece(data: bytes, start: int, end: int) -> bytes | memoryview:
    """A range of a cached chunk without copying it (pyfuse3 replies from any buffer)."""
    if start == 0 and end == len(data):
        return data
    return memoryview(data)[start:end]


class _CtlHandle:
    """One open ``ctl`` handle: its session (framing, replies) and the commands it queued.

    A write queues the lines it completes and returns at once; a task of the handle runs
    them in order, and a read waits for the next reply. The kernel holds the ctl inode's
    lock for as long as a write is answered, so a write that ran its command held up every
    other client's command behind it: a 15 s commit of a big node stalled every ``status``
    and fork of the other sessions (found by a QA pass).
    """

    def __init__(self) -> None:
        self.session = Session()
        self.queue: collections.deque[bytes] = collections.deque()
        self.running = False
        self.changed = trio.Event()  # set (and replaced) when a reply is in, or all ran

    def done(self) -> bool:
        return not self.running and not self.queue

    def signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: V.Vfs, control: Control | None = None,
                 node_paths: Callable[[], dict[str, str]] | None = None, *,
                 snapshots_link: bytes | None = None,
                 after_command: Callable[[], None] = lambda: None) -> None:
        """``control`` None: a read-only tree server (trees.py). ``snapshots_link``: serve
        ``snapshots`` as a symlink to it (the tree server's); ``after_command`` runs after
        every control command that may have changed snapshots or nodes."""
        super().__init__()
        self.vfs = vfs
        self.reader = vfs.reader
        self.control = control
        self.node_paths = node_paths or (lambda: {})
        self.snapshots_link = snapshots_link
        self.after_command = after_command
        # Listings of this connection that commands change (snapshots/ may be a symlink).
        self._listings = (V.NODES_INO,) if snapshots_link is not None else (
            V.SNAPSHOTS_INO, V.NODES_INO)
        # The kernel's no-open mode is connection-wide: only where no ctl needs its OPEN.
        self.no_open = NO_OPEN and control is None
        self.sessions: dict[int, _CtlHandle] = {}
        self._next_fh = 16  # ctl handles stay below FIRST_SNAPSHOT, file handles are inodes
        self._chunk = functools.lru_cache(maxsize=CHUNK_CACHE)(self.reader.chunk)
        self._node_links: dict[int, bytes] = {}  # inode -> target, live nodes only
        self._node_inos: dict[bytes, int] = {}
        self._next_node_ino = V.FIRST_NODE_LINK
        stats_path = os.environ.get(STATS_ENV)
        if stats_path:
            self.count_requests(stats_path)

    # -- request statistics (benchmarks) --------------------------------------------------

    def count_requests(self, path: str) -> dict[str, int]:
        """Count requests per handler, written as JSON to ``path`` on SIGUSR1 and at exit.

        Opt-in through an environment variable so the normal request path carries no
        counting at all: each handler is shadowed by an instance attribute that counts, then
        awaits the class method. Counts are of requests, so one batch forget counts once.
        """
        counts = dict.fromkeys(HANDLERS, 0)

        def counted(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
            async def handler(*args: Any) -> Any:
                counts[name] += 1
                return await fn(*args)
            return handler

        for name in HANDLERS:
            setattr(self, name, counted(name, getattr(self, name)))

        def dump(*_: Any) -> None:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "inodes": len(self.vfs), **counts}, f)
            os.replace(tmp, path)

        signal.signal(signal.SIGUSR1, dump)
        atexit.register(dump)
        return counts

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, ino: int, e: Entry, timeout: float = TREE_TIMEOUT) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = _KIND.get(e.type, stat.S_IFREG) | e.mode
        a.st_nlink = 1
        a.st_uid = e.uid
        a.st_gid = e.gid
        size = 0 if e.type == T_DIR else e.size
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) >> 9
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = e.mtime_ns
        a.entry_timeout = a.attr_timeout = timeout
        return a

    def _static(self, ino: int) -> pyfuse3.EntryAttributes:
        v = self.vfs
        if ino == V.CTL_INO:
            e = Entry(V.CTL_NAME, 1, 0o600, v.uid, v.gid, 0, v.mounted_at)
        elif ino == V.SNAPSHOTS_INO and self.snapshots_link is not None:
            link = self.snapshots_link
            e = Entry(V.SNAPSHOTS_DIR, T_SYMLINK, 0o777, v.uid, v.gid, len(link),
                      v.mounted_at, target=link)
        else:
            # snapshots/ and nodes/ change with the store: a new mtime tells the kernel
            # that its cached listing is stale (also after a CLI import to the store).
            changed = v.store.last_change() if ino != V.ROOT_INO else 0
            e = Entry(b"", 3, 0o755, v.uid, v.gid, 0, v.mounted_at + changed)
        return self._attr(ino, e, DYNAMIC_TIMEOUT)

    def _node_link(self, name: bytes) -> tuple[int, Entry]:
        """``nodes/<node>``: a symlink to the node's overlay, with an inode of its own.

        Numbers come from a counter (never reused for another name during the mount) and
        are forgotten when the node is gone, so the table follows the live nodes.
        """
        target = self.node_paths().get(os.fsdecode(name))
        if target is None:
            ino = self._node_inos.pop(name, None)
            self._node_links.pop(ino, None)  # type: ignore[arg-type]
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._node_inos.get(name)
        if ino is None:
            ino = self._node_inos[name] = self._next_node_ino
            self._next_node_ino += 1
        raw = os.fsencode(target)
        self._node_links[ino] = raw
        return ino, Entry(name, T_SYMLINK, 0o777, self.vfs.uid, self.vfs.gid, len(raw),
                          self.vfs.mounted_at, target=raw)

    def _prune_node_links(self) -> None:
        live = {os.fsencode(n) for n in self.node_paths()}
        for name in [n for n in self._node_inos if n not in live]:
            self._node_links.pop(self._node_inos.pop(name), None)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            if inode >= V.FIRST_SNAPSHOT:
                return self._attr(inode, self.vfs.entry(inode))
            if inode >= V.FIRST_NODE_LINK:
                raw = self._node_links.get(inode)
                if raw is None:  # the node was dropped
                    raise pyfuse3.FUSEError(errno.ENOENT)
                e = Entry(b"", T_SYMLINK, 0o777, self.vfs.uid, self.vfs.gid, len(raw),
                          self.vfs.mounted_at, target=raw)
                return self._attr(inode, e, DYNAMIC_TIMEOUT)
            return self._static(inode)
        except Exception as exc:
            raise _error(exc, "getattr") from None

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            if parent_inode >= V.FIRST_SNAPSHOT:
                ino, e = self.vfs.child(parent_inode, name)
                self.vfs.remember(ino)
                return self._attr(ino, e)
            return self._lookup_fixed(parent_inode, name)
        except Exception as exc:
            raise _error(exc, "lookup") from None

    def _lookup_fixed(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent_inode == V.ROOT_INO:
            fixed = {V.SNAPSHOTS_DIR: V.SNAPSHOTS_INO, V.NODES_DIR: V.NODES_INO}
            if self.control is not None:
                fixed[V.CTL_NAME] = V.CTL_INO
            if name not in fixed:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._static(fixed[name])
        if parent_inode == V.SNAPSHOTS_INO:
            ino, e = self.vfs.snapshot_root(name)
            self.vfs.remember(ino)
            return self._attr(ino, e)
        if parent_inode == V.NODES_INO:
            ino, e = self._node_link(name)
            return self._attr(ino, e, DYNAMIC_TIMEOUT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        forget = self.vfs.forget
        for ino, n in inode_list:
            if ino >= V.FIRST_SNAPSHOT:
                forget(ino, n)
        if self.vfs.forgotten():
            self._chunk.cache_clear()
            trim_heap()
            self.vfs.store.unmap_cached()

    # -- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if NO_OPENDIR:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # readdir gets the inode as fh then
        return inode  # the kernel sends OPENDIR only for directories it looked up

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            if fh >= V.FIRST_SNAPSHOT:
                reply, attr, remember = pyfuse3.readdir_reply, self._attr, self.vfs.remember
                for nxt, ino, e in self.vfs.children(fh, start_id):
                    if not reply(token, e.name, attr(ino, e), nxt):
                        return
                    remember(ino)
                return
            self._readdir_fixed(fh, start_id, token)
        except Exception as exc:
            raise _error(exc, "readdir") from None

    def _readdir_fixed(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        items: list[tuple[bytes, pyfuse3.EntryAttributes, Entry | None]] = []
        if fh == V.ROOT_INO:
            items = [(V.NODES_DIR, self._static(V.NODES_INO), None),
                     (V.SNAPSHOTS_DIR, self._static(V.SNAPSHOTS_INO), None)]
            if self.control is not None:
                items.insert(0, (V.CTL_NAME, self._static(V.CTL_INO), None))
        elif fh == V.SNAPSHOTS_INO:
            items = [(e.name, self._attr(ino, e), e) for ino, e in self.vfs.snapshot_roots()]
        elif fh == V.NODES_INO:
            self._prune_node_links()
            for name in sorted(self.node_paths()):
                ino, e = self._node_link(os.fsencode(name))
                items.append((e.name, self._attr(ino, e, DYNAMIC_TIMEOUT), None))
        for i in range(start_id, len(items)):
            name, attr, e = items[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            if e is not None:
                self.vfs.remember(attr.st_ino)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        """A snapshot file's handle is its inode: nothing to resolve or allocate.

        The kernel sends OPEN only for non-directories it looked up (directories get
        OPENDIR, symlinks are followed), so the entry is not needed until a read misses the
        page cache.
        """
        if inode >= V.FIRST_SNAPSHOT:
            if self.no_open:  # from now on the kernel opens files without asking (and the
                raise pyfuse3.FUSEError(errno.ENOSYS)  # mount is read-only: no writes)
            if flags & WRITE_FLAGS:
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)
        if inode == V.CTL_INO and self.control is not None:
            fh = self._next_fh
            self._next_fh += 1
            self.sessions[fh] = _CtlHandle()
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        try:
            if fh < V.FIRST_SNAPSHOT:
                handle = self.sessions.get(fh)
                if handle is None:
                    raise pyfuse3.FUSEError(errno.EBADF)
                while not handle.session.pending() and not handle.done():
                    handoff_requests()  # another worker serves FUSE requests meanwhile
                    await handle.changed.wait()
                return handle.session.read(size)
            e = self.vfs.entry(fh)
            if e.type == T_DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            chunk = self._chunk
            parts = [_piece(chunk(oid), start, end)
                     for oid, start, end in self.reader.filemap(e).span(off, size)]
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except Exception as exc:
            raise _error(exc, "read") from None

    @_fuse
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.sessions.get(fh)
        if handle is None or self.control is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        lines = handle.session.feed(buf)
        if lines:
            handle.queue.extend(lines)
            if not handle.running:
                handle.running = True
                trio.lowlevel.spawn_system_task(self._run_commands, handle)
        return len(buf)

    async def _run_commands(self, handle: _CtlHandle) -> None:
        """Run a handle's queued commands in order (in worker threads: they block, and may
        mount an overlay that looks this mount up)."""
        try:
            while handle.queue:
                line = handle.queue.popleft()
                try:
                    reply = await trio.to_thread.run_sync(self._execute, line)
                except Exception as exc:  # _execute answers every error: this is a bug
                    log.exception("running ctl command %r", line[:200])
                    reply = {"ok": False, "error": "EIO", "message": f"internal error: {exc}"}
                handle.session.reply(reply)
                handle.signal()
        finally:
            handle.running = False
            handle.signal()

    @_fuse
    async def flush(self, fh: int) -> None:
        """``close()`` of a ctl handle returns once its commands ran: ``echo drop N > ctl``
        has dropped the node when echo exits, as when writes ran their commands. Where
        there is no ctl (the tree server), ENOSYS: the kernel then sends no FLUSH at all."""
        if self.control is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        handle = self.sessions.get(fh) if fh < V.FIRST_SNAPSHOT else None
        while handle is not None and not handle.done():
            handoff_requests()
            await handle.changed.wait()

    def _execute(self, line: bytes) -> dict[str, Any]:
        """Run a control command (in a worker thread); then make the kernel re-read the
        listings it may have changed. Invalidation can wait on a listing being filled by
        the FUSE thread, hence here and not there."""
        assert self.control is not None
        reply = self.control.execute(line)
        if not read_only(line):
            if NO_OPENDIR:
                for ino in self._listings:
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_inode(ino)
            self.after_command()
        return reply

    async def release(self, fh: int) -> None:
        if fh < V.FIRST_SNAPSHOT:
            self.sessions.pop(fh, None)

    @_fuse
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        if inode == V.SNAPSHOTS_INO and self.snapshots_link is not None:
            return self.snapshots_link
        if V.FIRST_NODE_LINK <= inode < V.FIRST_SNAPSHOT:
            if inode not in self._node_links:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._node_links[inode]
        e = self.vfs.entry(inode)
        if e.type != T_SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return e.target

    @_fuse
    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        if mode & os.W_OK and inode != V.CTL_INO:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # -- filesystem-wide ------------------------------------------------------------------

    @_fuse
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        if STALL_STATFS_S:  # tests: a request the daemon has read but not yet answered
            await trio.sleep(STALL_STATFS_S)
        st = os.statvfs(self.vfs.store.path)
        d = pyfuse3.StatvfsData()
        d.f_bsize = st.f_bsize
        d.f_frsize = st.f_frsize
        d.f_blocks = st.f_blocks
        d.f_bfree = 0
        d.f_bavail = 0
        d.f_files = st.f_files
        d.f_ffree = 0
        d.f_favail = 0
        d.f_namemax = 255
        return d

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return []

    # Everything that would change a snapshot: read-only filesystem.
    setattr = mkdir = mknod = create = symlink = link = unlink = rmdir = rename = _erofs_async
    setxattr = removexattr = _erofs_async

