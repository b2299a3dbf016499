"""Reading a host tree that other processes may change meanwhile: an import's source dir,
a node's upper dir at commit (written by whatever runs in the node, an untrusted agent
maybe, while a root daemon reads it).

A walk by path follows a symlink in any component of the path: a name that was a file or a
directory when lstat() classified it and is a symlink to ``/etc`` when it is opened would
put files nobody may read into a snapshot, with the permissions of the name that was
swapped. So a walk holds a descriptor of each directory and opens every name relative to
it with ``O_NOFOLLOW``, and checks what it opened against the lstat() that classified it.
A file is also checked after it was read: one that changed meanwhile (a write, a swap) is
read again, so a snapshot never holds a mixture of two versions of a file. What keeps
changing is refused (EBUSY), naming it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
from collections.abc import Callable
from typing import TypeVar

from .errors import Busy, NameTooLong, Unsupported, from_oserror

PATH_MAX = 4096  # with its NUL: the longest path the kernel resolves is 4,095 bytes
TRIES = 3  # reads of a name that keeps changing, before it is refused

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the open (it then fails the
# identity check); O_NOCTTY: nor may a terminal become ours.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

T = TypeVar("T")

# A tree can be as deep as a path is long (2,048 levels of one-byte names); walking it
# recurses a few frames a level, past Python's default limit of 1,000. Python-to-Python
# calls use no C stack since 3.11, so there the limit can be what such a tree needs.
DEPTH_MAX = PATH_MAX // 2
if sys.version_info >= (3, 11):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * DEPTH_MAX + 1000))


class Changed(Exception):
    """A name was not what its lstat() said by the time it was read (internal: retried)."""


def check_length(path: bytes) -> None:
    """Refuse a path the kernel could not resolve: a walk by descriptors gets deeper than
    that, but the snapshot's paths must stay usable (a checkout, a node's view)."""
    if len(path) >= PATH_MAX:
        raise NameTooLong(f"{os.fsdecode(path[:120])}...: path too long ({len(path)} bytes; "
                          "the kernel resolves paths of up to 4,096 bytes and names of up "
                          "to 255)")


def _version(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open(dir_fd: int, name: bytes, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        # A symlink now (ELOOP), no directory any more (ENOTDIR), gone (ENOENT), a FIFO
        # without a writer (ENXIO): not what lstat() saw. Look again.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ENXIO):
            raise Changed from exc
        raise


def _opened(dir_fd: int, name: bytes, st: os.stat_result, flags: int) -> int:
    fd = _open(dir_fd, name, flags)
    if _version(os.fstat(fd)) != _version(st):
        os.close(fd)
        raise Changed
    return fd


def open_dir(dir_fd: int, name: bytes, st: os.stat_result) -> int:
    """Open directory ``name`` of ``dir_fd`` as lstat() saw it (``st``), unchanged."""
    return _opened(dir_fd, name, st, _DIR_FLAGS)


def open_file(dir_fd: int, name: bytes, st: os.stat_result) -> int:
    """Open regular file ``name`` of ``dir_fd`` as lstat() saw it (``st``), unchanged."""
    return _opened(dir_fd, name, st, _FILE_FLAGS)


def check_unchanged(fd: int, st: os.stat_result) -> None:
    """After reading a file or a directory opened here: it is still the version ``st``
    describes (a write meanwhile changed a file's mtime and ctime, a truncate its size; a
    name created, removed or renamed those of its directory)."""
    if _version(os.fstat(fd)) != _version(st):
        raise Changed


def special_kind(mode: int) -> str:
    """What to call a file that is neither a regular file, a directory nor a symlink."""
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "special file"


ACL_ACCESS = b"system.posix_acl_access"
_ACL_HEAD = struct.Struct("<I")  # version 2, then entries (linux/posix_acl_xattr.h)
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permission bits, uid/gid
_ACL_GROUP_OBJ = 0x04


def xattr_names(fd: int) -> list[bytes]:
    """Names of the extended attributes of open ``fd`` (none where unsupported)."""
    try:
        return list(map(os.fsencode, os.listxattr(fd)))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return []
        raise


def access_mode(fd: int, st: os.stat_result, names: list[bytes]) -> int:
    """The permission bits (07777) to store for open ``fd``, lstat() ``st``, which carries
    the extended attributes ``names``.

    A snapshot stores no ACLs. Under an ACL with named entries, the mode's group bits are
    the ACL's mask, what named users and groups may get at most, not what the owning group
    has: stored as they are, they would give the owning group the mask's rights when the
    ACL is gone (``r--`` became ``rwx``). So the group bits kept are those the owning group
    really had (its entry, within the mask): dropping an ACL only ever takes rights away.
    """
    mode = stat.S_IMODE(st.st_mode)
    if ACL_ACCESS not in names:
        return mode
    try:
        raw = os.getxattr(fd, ACL_ACCESS)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return mode  # removed meanwhile (a change: the version check sees it)
        raise
    body = raw[_ACL_HEAD.size:]
    if len(raw) < _ACL_HEAD.size or len(body) % _ACL_ENTRY.size:
        return mode & ~0o077  # unreadable: the owner's bits only, never more than it had
    for tag, perm, _ in _ACL_ENTRY.iter_unpack(body):
        if tag == _ACL_GROUP_OBJ:
            return (mode & ~0o070) | (mode & ((perm & 0o7) << 3))
    return mode


def lstat(dir_fd: int, name: bytes, path: bytes) -> os.stat_result:
    """lstat() of ``name`` in ``dir_fd``; one that is gone since the directory was listed
    means the directory changed (``Changed``: it is read again)."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Changed from None
    except OSError as exc:
        raise from_oserror(exc, os.fsdecode(path)) from exc


def _busy(path: bytes) -> Busy:
    return Busy(f"{os.fsdecode(path)}: changed while being read, {TRIES} times; let what "
                "writes to it finish, then try again")


def retrying(dir_fd: int, name: bytes, path: bytes, st: os.stat_result,
             read: Callable[[os.stat_result], T], tries: int = TRIES) -> T:
    """``read(st)`` of the object ``name`` of ``dir_fd``, again with a fresh lstat() while
    it finds the object changed (``Changed``, raised by the object or by anything below
    it), up to ``tries`` times (those left, to a caller that tried once): then EBUSY
    naming it. An object gone meanwhile is a change of ``dir_fd`` (``Changed`` again, for
    its caller)."""
    for attempt in range(tries):
        if attempt:
            st = lstat(dir_fd, name, path)
        try:
            return read(st)
        except Changed:
            continue
    raise _busy(path)


def at_root(path: bytes, walk: Callable[[int, os.stat_result], T], *, follow: bool) -> T:
    """``walk(fd, st)`` of directory ``path`` (``follow``: also through a symlink, as a
    user names a tree to import), again while it finds the tree changed, as ``retrying``."""
    for _ in range(TRIES):
        try:
            fd = os.open(path, _DIR_FLAGS & ~(os.O_NOFOLLOW if follow else 0))
        except OSError as exc:
            raise from_oserror(exc, os.fsdecode(path)) from exc
        try:
            return walk(fd, os.fstat(fd))
        except Changed:
            continue
        except RecursionError:  # Python 3.10 (see DEPTH_MAX)
            raise Unsupported(f"{os.fsdecode(path)}: nested too deep to walk on Python "
                              f"{sys.version_info.major}.{sys.version_info.minor}") from None
        finally:
            os.close(fd)
    raise _busy(path)
