"""Helpers to build and compare directory trees, shared by every test tier.

The unit tests compare an imported-then-checked-out tree with its source; the FUSE tests
compare a mounted snapshot with its source. Both need the same notion of "the same tree":
equal names (raw bytes), types, permission bits, sizes, mtimes to the nanosecond, symlink
targets (never followed) and file bytes. Directory sizes are left out (they depend on the
filesystem, not on the tree) and so is the root directory's own metadata (a snapshot is
its contents). Hard-link counts and inode numbers are left out too: hard links are stored
as independent files.

Everything works on ``bytes`` paths so that names which are not UTF-8 survive unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

from oppiefs import overlay, tree
from oppiefs.store import Store
from oppiefs.tree import Entry

# (type, mode, size, mtime_ns, symlink target or sha256 of content; b"" for directories)
Meta = tuple[str, int, int, int, bytes]

MIB = 1 << 20
_READ = 1 << 20

# Odd but legal mtimes: nanosecond precision, pre-epoch, past 2038 (needs 64-bit time).
MTIME_NS = 1_234_567_890_123_456_789
MTIME_PRE_EPOCH_NS = -1_000_000_007
MTIME_FUTURE_NS = 4_102_444_800_999_999_999  # 2100-01-01


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return "other"


def file_sha256(path: bytes | str | os.PathLike[str]) -> bytes:
    """Digest of a file's bytes, read in big unbuffered blocks (mounts serve those fastest)."""
    h = hashlib.sha256()
    buf = bytearray(_READ)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return h.digest()


def walk(root: bytes | str | os.PathLike[str]) -> Iterator[tuple[bytes, os.stat_result]]:
    """Yield (path relative to root, lstat) for everything below root, never following
    symlinks; directories come before their contents, siblings in name order."""
    base = os.fsencode(root)
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(base + b"/" + rel if rel else base) as it:
            names = sorted(d.name for d in it)
        subdirs = []
        for name in names:
            child = rel + b"/" + name if rel else name
            st = os.lstat(base + b"/" + child)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(child)
        stack.extend(reversed(subdirs))


def tree_meta(root: Path | str | bytes, *, owners: bool = False) -> dict[bytes, tuple]:
    """Relative path -> (type, mode, size, mtime_ns, target-or-sha256) for everything below
    ``root`` (``owners=True`` appends (uid, gid)). The root's own attributes are excluded."""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for rel, st in walk(base):
        mode = st.st_mode
        kind = _kind(mode)
        if kind == "file":
            extra = file_sha256(base + b"/" + rel)
            size = st.st_size
        elif kind == "symlink":
            extra = os.readlink(base + b"/" + rel)
            size = st.st_size
        else:
            extra = b""
            size = 0  # a directory's st_size is the filesystem's business
        row: tuple = (kind, stat.S_IMODE(mode), size, st.st_mtime_ns, extra)
        if owners:
            row += (st.st_uid, st.st_gid)
        out[rel] = row
    return out


_FIELDS = ("type", "mode", "size", "mtime_ns", "target/sha256", "uid", "gid")


def _fmt(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return oct(value)
    if field == "target/sha256" and isinstance(value, bytes):
        return value.hex()[:16] if len(value) == 32 else repr(value)
    return repr(value)


def diff_meta(a: dict[bytes, tuple], b: dict[bytes, tuple], limit: int = 40) -> list[str]:
    """Human-readable differences between two ``tree_meta`` results (empty when equal).

    A 32-byte "target/sha256" is shown as a digest prefix; that is ambiguous only for a
    symlink whose target is exactly 32 bytes, and only in the message.
    """
    lines: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        shown = os.fsdecode(path)
        if path not in b:
            lines.append(f"only in first:  {shown!r} {a[path][0]}")
        elif path not in a:
            lines.append(f"only in second: {shown!r} {b[path][0]}")
        elif a[path] != b[path]:
            diffs = [f"{f} {_fmt(f, x)} != {_fmt(f, y)}"
                     for f, x, y in itertools.zip_longest(_FIELDS, a[path], b[path])
                     if x != y]
            lines.append(f"differs:        {shown!r}: " + ", ".join(diffs))
        if len(lines) >= limit:
            lines.append("... (more differences not shown)")
            break
    return lines


def assert_same_meta(a: dict[bytes, tuple], b: dict[bytes, tuple], what: str = "trees") -> None:
    lines = diff_meta(a, b)
    if lines:
        raise AssertionError(f"{what} differ ({len(a)} vs {len(b)} entries):\n  "
                             + "\n  ".join(lines))


def assert_same_tree(a: Path | str | bytes, b: Path | str | bytes, *,
                     owners: bool = False) -> None:
    """Fail with a readable per-path diff unless both trees have equal metadata and bytes."""
    assert_same_meta(tree_meta(a, owners=owners), tree_meta(b, owners=owners),
                     f"trees {os.fsdecode(a)!r} and {os.fsdecode(b)!r}")


# -- building trees ---------------------------------------------------------------------------


def det_bytes(n: int, seed: int | str) -> bytes:
    """``n`` pseudo-random bytes, the same for the same seed on every machine."""
    return random.Random(seed).randbytes(n)


def _write(path: bytes, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


NON_UTF8_NAME = b"latin1-caf\xe9-\xff\xfe"
ODD_NAMES = (
    b"with space",
    b" leading and trailing ",
    b"new\nline",
    b"tab\there",
    NON_UTF8_NAME,
    "unicode-\u00e9\u4e2d\U0001f600".encode(),
    b"-starts-with-dash",
    b".hidden",
    b"back\\slash",
    b"quote'\"",
    b"x" * 255,  # longest name Linux allows
)


def make_odd_tree(root: Path | str | bytes) -> None:
    """Fill ``root`` (created if missing) with every case a snapshot must reproduce.

    Deterministic (fixed seeds, fixed mtimes) so two calls give equal trees and the same
    snapshot id. About 9 MiB. Ownership other than root's is set only when run as root.
    Holds no FIFOs, sockets or devices: those cannot be stored (see ``add_special_files``).
    """
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)

    def p(*parts: bytes) -> bytes:
        return b"/".join((r, *parts))

    # Regular files: empty, tiny, chunker boundaries, multi-chunk, duplicates.
    os.mkdir(p(b"files"))
    _write(p(b"files", b"empty"), b"")
    _write(p(b"files", b"one-byte"), b"x")
    _write(p(b"files", b"text.txt"), b"hello, world\n" * 100)
    _write(p(b"files", b"exactly-16KiB"), det_bytes(16 * 1024, "16k"))
    _write(p(b"files", b"16KiB-plus-1"), det_bytes(16 * 1024 + 1, "16k1"))
    _write(p(b"files", b"random-5MiB"), det_bytes(5 * MIB, "big"))
    _write(p(b"files", b"zeros-2MiB"), bytes(2 * MIB))  # one chunk id repeated in the list
    _write(p(b"files", b"copy-of-text.txt"), b"hello, world\n" * 100)
    big_edited = bytearray(det_bytes(5 * MIB, "big"))
    big_edited[len(big_edited) // 2:len(big_edited) // 2] = b"!"
    _write(p(b"files", b"random-5MiB-plus-1-byte"), bytes(big_edited))

    # Modes.
    os.mkdir(p(b"modes"))
    for name, mode in ((b"exec", 0o755), (b"private", 0o600), (b"setuid", 0o4755),
                       (b"setgid", 0o2755), (b"no-perms", 0o000), (b"group-write", 0o664),
                       (b"read-only", 0o444)):
        _write(p(b"modes", name), b"#!/bin/sh\necho " + name + b"\n", mode)
    os.mkdir(p(b"modes", b"sticky-dir"))
    os.chmod(p(b"modes", b"sticky-dir"), 0o1777)
    os.mkdir(p(b"modes", b"private-dir"))
    _write(p(b"modes", b"private-dir", b"inside"), b"inside\n")
    os.chmod(p(b"modes", b"private-dir"), 0o700)
    os.mkdir(p(b"modes", b"read-only-dir"))
    _write(p(b"modes", b"read-only-dir", b"inside"), b"inside\n", 0o444)
    os.chmod(p(b"modes", b"read-only-dir"), 0o555)

    # Names.
    os.mkdir(p(b"names"))
    for i, name in enumerate(ODD_NAMES):
        _write(p(b"names", name), b"name %d\n" % i)
    os.mkdir(p(b"names", NON_UTF8_NAME + b"-dir"))
    _write(p(b"names", NON_UTF8_NAME + b"-dir", b"new\nline inside"), b"nested\n")

    # Directories: empty, nested empty, deep, wide.
    os.makedirs(p(b"dirs", b"empty"))
    os.makedirs(p(b"dirs", b"nested", b"empty", b"inside"))
    deep = p(b"dirs", b"deep", *[b"d%02d" % i for i in range(30)])
    os.makedirs(deep)
    _write(deep + b"/leaf", b"deep leaf\n")
    os.mkdir(p(b"dirs", b"wide"))
    for i in range(300):
        _write(p(b"dirs", b"wide", b"f%03d" % i), b"%d\n" % i)

    # Symlinks: stored as links, never followed.
    os.mkdir(p(b"links"))
    links = {
        b"to-file": b"../files/text.txt",
        b"to-dir": b"../dirs/deep",
        b"dangling": b"does/not/exist",
        b"absolute": b"/etc/passwd",
        b"absolute-dangling": b"/nonexistent/oppiefs/target",
        b"self-loop": b"self-loop",
        b"non-utf8-target": b"../names/" + NON_UTF8_NAME,
        b"with space": b"target with space\nand newline",
        b"long-target": b"a/" * 1000 + b"end",
    }
    for name, target in links.items():
        os.symlink(target, p(b"links", name))
    os.symlink(b"files", p(b"link-to-dir-at-top"))

    # Hard links: independent files in a snapshot.
    os.mkdir(p(b"hardlinks"))
    _write(p(b"hardlinks", b"original"), b"linked content\n" * 50)
    os.link(p(b"hardlinks", b"original"), p(b"hardlinks", b"second-name"))
    os.link(p(b"hardlinks", b"original"), p(b"names", b"hardlink elsewhere"))

    if os.geteuid() == 0:
        os.lchown(p(b"files", b"text.txt"), 1234, 5678)
        os.lchown(p(b"links", b"to-file"), 4321, 8765)
        os.lchown(p(b"dirs", b"empty"), 65534, 65534)
        os.chmod(p(b"modes", b"setuid"), 0o4755)  # chown clears set-id bits
        os.chmod(p(b"modes", b"setgid"), 0o2755)

    # Mtimes last, deepest first, so creating children does not bump them again.
    for i, (rel, _st) in enumerate(sorted(walk(r), key=lambda x: -x[0].count(b"/"))):
        ns = MTIME_NS + i * 1_000_000_001 + i  # distinct, sub-second
        if rel == b"files/empty":
            ns = MTIME_PRE_EPOCH_NS
        elif rel == b"files/one-byte":
            ns = MTIME_FUTURE_NS
        os.utime(r + b"/" + rel, ns=(ns, ns), follow_symlinks=False)


def add_special_files(root: Path | str | bytes) -> list[bytes]:
    """Create a FIFO, a socket and (as root) a character device; returns their paths."""
    r = os.fsencode(root)
    made = [r + b"/fifo", r + b"/socket"]
    os.mkfifo(made[0])
    os.mknod(made[1], stat.S_IFSOCK | 0o644)
    if os.geteuid() == 0:
        made.append(r + b"/null-device")
        os.mknod(made[2], stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return made


def make_sized_tree(root: Path | str | bytes, *, files: int, total_bytes: int,
                    seed: int = 0, dirs: int = 20) -> None:
    """A reproducible tree of mixed file sizes (many small, a few large), like a source tree.

    Sizes are log-uniform between 128 B and 128 KiB, with one file in fifty between 1 and
    8 MiB (multi-chunk), scaled so they add up to ``total_bytes``; contents are
    pseudo-random (incompressible, no accidental dedup between files).
    """
    rng = random.Random(seed)
    r = os.fsencode(root)
    weights = [2 ** (rng.uniform(20, 23) if i % 50 == 25 else rng.uniform(7, 17))
               for i in range(files)]
    scale = total_bytes / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[-1] += total_bytes - sum(sizes)
    for d in range(dirs):
        os.makedirs(r + b"/d%02d/sub" % d, exist_ok=True)
    stream = random.Random(seed + 1)
    for i, size in enumerate(sizes):
        sub = b"/sub" if i % 3 == 0 else b""
        path = r + b"/d%02d%s/f%05d.dat" % (i % dirs, sub, i)
        with open(path, "wb") as f:
            f.write(stream.randbytes(size))


def with_changes(entries: list[Entry], changes: dict[bytes, Entry | None]) -> list[Entry]:
    """``entries`` with ``changes`` applied (name -> new entry; None: removed), sorted by
    name: the model a committed directory is checked against."""
    merged = {e.name: e for e in entries}
    for name, e in changes.items():
        if e is None:
            merged.pop(name, None)
        else:
            merged[name] = e
    return sorted(merged.values(), key=lambda e: e.name)


def commit_upper(store: Store, reader: tree.Reader, base: bytes, upper: Path) -> bytes:
    """Commit a plain directory laid out as an overlay upper dir on top of ``base`` (what
    the daemon's commit does, without a mount); returns the new snapshot's root."""
    with store.writer() as w:
        built = tree.apply_upper(reader, w, base, os.fsencode(upper), overlay.UPPER_DIR)
        store.publish(w, built.oid, parent=base.hex(), logical_bytes=built.bytes,
                      files=built.files)
    return built.oid
