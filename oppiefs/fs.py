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
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from . import vfs as V
from .control import Control, Session
from .errors import Corrupt, OppieError
from .tree import T_SYMLINK, Entry

log = logging.getLogger("oppiefs.fs")

TREE_TIMEOUT = 86400.0  # immutable snapshot content
DYNAMIC_TIMEOUT = 1.0  # root, snapshots/, nodes/: change with the state
CHUNK_CACHE = 512  # ~32 MiB of recently read chunks
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse(fn: F) -> F:
    """Translate errors: OppieError -> its errno; anything else -> logged EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Corrupt as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OppieError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _erofs(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


async def _erofs_async(self: Any, *args: Any) -> Any:
    _erofs()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: V.Vfs, control: Control | None = None,
                 node_paths: Callable[[], dict[str, str]] | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.reader = vfs.reader
        self.control = control
        self.node_paths = node_paths or (lambda: {})
        self.sessions: dict[int, Session] = {}
        self._next_fh = 1 << 62  # ctl handles, far from snapshot inode numbers
        self._chunk = functools.lru_cache(maxsize=CHUNK_CACHE)(self.reader.chunk)
        self._node_links: dict[int, bytes] = {}

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, ino: int, e: Entry, timeout: float = TREE_TIMEOUT) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = e.st_mode
        a.st_nlink = 1
        a.st_uid = e.uid
        a.st_gid = e.gid
        a.st_size = 0 if e.is_dir else e.size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = e.mtime_ns
        a.entry_timeout = a.attr_timeout = timeout
        return a

    def _static(self, ino: int) -> pyfuse3.EntryAttributes:
        v = self.vfs
        if ino == V.CTL_INO:
            e = Entry(V.CTL_NAME, 1, 0o600, v.uid, v.gid, 0, v.mounted_at)
        else:
            e = Entry(b"", 3, 0o755, v.uid, v.gid, 0, v.mounted_at)
        return self._attr(ino, e, DYNAMIC_TIMEOUT)

    def _node_link(self, name: bytes) -> tuple[int, Entry]:
        target = self.node_paths().get(os.fsdecode(name))
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = V.CTL_INO + 1 + (hash(name) & 0xFFFFFFF)
        raw = os.fsencode(target)
        self._node_links[ino] = raw
        return ino, Entry(name, T_SYMLINK, 0o777, self.vfs.uid, self.vfs.gid, len(raw),
                          self.vfs.mounted_at, target=raw)

    @_fuse
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode < V.FIRST_SNAPSHOT:
            if inode in self._node_links:
                raw = self._node_links[inode]
                e = Entry(b"", T_SYMLINK, 0o777, self.vfs.uid, self.vfs.gid, len(raw),
                          self.vfs.mounted_at, target=raw)
                return self._attr(inode, e, DYNAMIC_TIMEOUT)
            return self._static(inode)
        return self._attr(inode, self.vfs.entry(inode))

    @_fuse
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode >= V.FIRST_SNAPSHOT:
            ino, e = self.vfs.child(parent_inode, name)
            self.vfs.remember(ino, e)
            return self._attr(ino, e)
        if parent_inode == V.ROOT_INO:
            fixed = {V.SNAPSHOTS_DIR: V.SNAPSHOTS_INO, V.NODES_DIR: V.NODES_INO}
            if self.control is not None:
                fixed[V.CTL_NAME] = V.CTL_INO
            if name not in fixed:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._static(fixed[name])
        if parent_inode == V.SNAPSHOTS_INO:
            ino, e = self.vfs.snapshot_root(name)
            self.vfs.remember(ino, e)
            return self._attr(ino, e)
        if parent_inode == V.NODES_INO:
            ino, e = self._node_link(name)
            return self._attr(ino, e, DYNAMIC_TIMEOUT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            if ino >= V.FIRST_SNAPSHOT:
                self.vfs.forget(ino, n)

    # -- directories ----------------------------------------------------------------------

    @_fuse
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if inode >= V.FIRST_SNAPSHOT and not self.vfs.entry(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh >= V.FIRST_SNAPSHOT:
            for nxt, ino, e in self.vfs.children(fh, start_id):
                if not pyfuse3.readdir_reply(token, e.name, self._attr(ino, e), nxt):
                    return
                self.vfs.remember(ino, e)
            return
        items: list[tuple[bytes, pyfuse3.EntryAttributes, Entry | None]] = []
        if fh == V.ROOT_INO:
            items = [(V.NODES_DIR, self._static(V.NODES_INO), None),
                     (V.SNAPSHOTS_DIR, self._static(V.SNAPSHOTS_INO), None)]
            if self.control is not None:
                items.insert(0, (V.CTL_NAME, self._static(V.CTL_INO), None))
        elif fh == V.SNAPSHOTS_INO:
            items = [(e.name, self._attr(ino, e), e) for ino, e in self.vfs.snapshot_roots()]
        elif fh == V.NODES_INO:
            for name in sorted(self.node_paths()):
                ino, e = self._node_link(os.fsencode(name))
                items.append((e.name, self._attr(ino, e, DYNAMIC_TIMEOUT), None))
        for i in range(start_id, len(items)):
            name, attr, e = items[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            if e is not None:
                self.vfs.remember(attr.st_ino, e)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ----------------------------------------------------------------------------

    @_fuse
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if inode == V.CTL_INO and self.control is not None:
            fh = self._next_fh
            self._next_fh += 1
            self.sessions[fh] = Session()
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode < V.FIRST_SNAPSHOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        e = self.vfs.entry(inode)
        if e.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_fuse
    async def read(self, fh: int, off: int, size: int) -> bytes:
        session = self.sessions.get(fh)
        if session is not None:
            return session.read(size)
        e = self.vfs.entry(fh)
        parts = [self._chunk(oid)[start:end]
                 for oid, start, end in self.reader.filemap(e).span(off, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @_fuse
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        session = self.sessions.get(fh)
        if session is None or self.control is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        for line in session.feed(buf):
            reply = await trio.to_thread.run_sync(self.control.execute, line)
            session.reply(reply)
        return len(buf)

    async def release(self, fh: int) -> None:
        self.sessions.pop(fh, None)

    @_fuse
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        if inode in self._node_links:
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


def is_dir_mode(mode: int) -> bool:
    return stat.S_ISDIR(mode)
