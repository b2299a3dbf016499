"""What the store looks like as a filesystem: the inode table. The only place that knows
inode numbers.

Numbering: snapshot trees are immutable, so every node gets a deterministic number:
``(snapshot index << 40) | pre-order position``. The snapshot index is handed out the first
time the mount meets a snapshot id; positions come from the tree itself (a directory
entry's size is its subtree entry count, so a child's position is the parent's plus the
sizes of the siblings before it, without opening any subtree). Numbers are therefore stable
for the life of the mount even after the kernel forgets a node and looks it up again, and
the table holds only what the kernel currently references: ``forget`` bounds it.

Memory per cached inode: one dict slot mapping the number to the shared, already-decoded
``tree.Entry`` (the same object the tree cache holds) and, only while the kernel holds more
than one reference, a lookup count. Fixed inodes below ``FIRST_SNAPSHOT`` are the mount's
own directories and control file.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator

from . import tree
from .errors import InvalidArgument, NotFound
from .tree import Entry, Reader

ROOT_INO = 1
SNAPSHOTS_INO = 2
NODES_INO = 3
CTL_INO = 4
SNAP_SHIFT = 40
FIRST_SNAPSHOT = 1 << SNAP_SHIFT

SNAPSHOTS_DIR = b"snapshots"
NODES_DIR = b"nodes"
CTL_NAME = b"ctl"


class Vfs:
    """Inode table over the snapshots of one store."""

    def __init__(self, reader: Reader, *, uid: int | None = None, gid: int | None = None,
                 offsets_cache: int = 4096) -> None:
        self.reader = reader
        self.store = reader.store
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mounted_at = time.time_ns()
        self._entries: dict[int, Entry] = {}
        self._extra_lookups: dict[int, int] = {}  # count - 1, only where count > 1
        self._snap_index: dict[bytes, int] = {}
        self._offsets = functools.lru_cache(maxsize=offsets_cache)(
            lambda oid: _child_offsets(self.reader.tree(oid)))

    # -- snapshots ------------------------------------------------------------------------

    def snapshot_ino(self, root: bytes) -> int:
        index = self._snap_index.get(root)
        if index is None:
            index = self._snap_index[root] = len(self._snap_index) + 1
            if index >= 1 << (64 - SNAP_SHIFT):
                raise InvalidArgument("inode space exhausted: remount to serve more snapshots")
        return index << SNAP_SHIFT

    def snapshot_root(self, name: bytes) -> tuple[int, Entry]:
        """Resolve ``snapshots/<name>``: full lowercase hex ids only.

        A pruned snapshot that live nodes still stand on stays reachable by its full id (their
        overlays name it as lowerdir and must re-attach after a remount) but is not listed.
        """
        try:
            text = name.decode("ascii")
            root = bytes.fromhex(text)
        except (UnicodeDecodeError, ValueError):
            raise NotFound(f"no snapshot {name!r}") from None
        if len(root) != 32 or text != root.hex():
            raise NotFound(f"no snapshot {name!r}")
        rec = self.store.snapshot(root)
        if rec is None or not (rec.listed or rec.pins):
            raise NotFound(f"no snapshot {text}")
        entry = Entry(name, tree.T_DIR, 0o755, self.uid, self.gid, 0, int(rec.time * 1e9), root)
        return self.snapshot_ino(root), entry

    def snapshot_roots(self) -> list[tuple[int, Entry]]:
        out = []
        for rec in self.store.snapshots():
            name = rec.id.encode()
            entry = Entry(name, tree.T_DIR, 0o755, self.uid, self.gid, 0,
                          int(rec.time * 1e9), rec.root)
            out.append((self.snapshot_ino(rec.root), entry))
        out.sort(key=lambda item: item[1].name)
        return out

    # -- tree nodes -----------------------------------------------------------------------

    def entry(self, ino: int) -> Entry:
        try:
            return self._entries[ino]
        except KeyError:
            raise NotFound(f"stale inode {ino}") from None

    def child(self, parent: int, name: bytes) -> tuple[int, Entry]:
        d = self.entry(parent)
        if not d.is_dir:
            raise NotFound(f"inode {parent} is not a directory")
        t = self.reader.tree(d.ref)
        i = t.index_of(name)
        if i is None:
            raise NotFound(f"no entry {name!r}")
        return parent + self._offsets(d.ref)[i], t.entries[i]

    def children(self, parent: int, start: int = 0) -> Iterator[tuple[int, int, Entry]]:
        """(next offset, ino, entry) for entries from position ``start`` on (readdir)."""
        d = self.entry(parent)
        if not d.is_dir:
            raise NotFound(f"inode {parent} is not a directory")
        t = self.reader.tree(d.ref)
        offsets = self._offsets(d.ref)
        for i in range(start, len(t.entries)):
            yield i + 1, parent + offsets[i], t.entries[i]

    # -- lookup counts --------------------------------------------------------------------

    def remember(self, ino: int, entry: Entry) -> None:
        """The kernel took one more reference (lookup, readdirplus entry, create)."""
        if ino in self._entries:
            self._extra_lookups[ino] = self._extra_lookups.get(ino, 0) + 1
        else:
            self._entries[ino] = entry

    def forget(self, ino: int, n: int) -> None:
        extra = self._extra_lookups.pop(ino, 0) - n
        if extra >= 0:
            if extra:
                self._extra_lookups[ino] = extra
            return
        self._entries.pop(ino, None)

    def __len__(self) -> int:
        return len(self._entries)


def _child_offsets(t: tree.Tree) -> list[int]:
    """Pre-order offset of each entry relative to its directory's own position."""
    offsets = []
    pos = 1
    for e in t.entries:
        offsets.append(pos)
        pos += 1 + e.size if e.is_dir else 1
    return offsets
