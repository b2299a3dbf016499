"""What the store looks like as a filesystem: the inode table. The only place that knows
inode numbers.

Numbering: snapshot trees are immutable, so every node gets a deterministic number:
``(snapshot index << 40) | pre-order position``. The snapshot index is handed out the first
time the mount meets a snapshot id; positions come from the tree itself (a directory
entry's size is its subtree entry count, so a child's position is the parent's plus the
sizes of the siblings before it, without opening any subtree). Numbers are therefore stable
for the life of the mount even after the kernel forgets a node and looks it up again.

Because a number *is* a path through the tree, the table stores no entry per inode: ``entry``
walks down from the snapshot root, at each level bisecting the (cached) child positions of
one directory, so a lookup costs O(depth) cache hits. Per cached inode the daemon holds only
the kernel's lookup count, one ``dict[int, int]`` slot (~100 bytes with its key), and the
decoded trees are shared by all snapshots that contain them and bounded by an LRU, so
memory does not grow with the number of snapshots walked. Python dicts never shrink on
delete, so after the kernel forgets most of the table it is rebuilt at its new size, the
tree caches are dropped with it (their objects pin the small-object arenas the freed keys
lived in), and the caller is told, so it can hand the freed heap back to the OS. Fixed inodes below
``FIRST_SNAPSHOT`` are the mount's own directories and control file.
"""

from __future__ import annotations

import bisect
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
FIRST_NODE_LINK = 1 << 20  # nodes/<node> symlinks: [FIRST_NODE_LINK, FIRST_SNAPSHOT)
SNAP_SHIFT = 40
FIRST_SNAPSHOT = 1 << SNAP_SHIFT
POS_MASK = FIRST_SNAPSHOT - 1

SNAPSHOTS_DIR = b"snapshots"
NODES_DIR = b"nodes"
CTL_NAME = b"ctl"

SHRINK_MIN = 4096  # tables smaller than this are never rebuilt
SHRINK_FACTOR = 4  # rebuild once the table is this many times smaller than its peak


class Vfs:
    """Inode table over the snapshots of one store."""

    def __init__(self, reader: Reader, *, uid: int | None = None, gid: int | None = None,
                 offsets_cache: int = 4096) -> None:
        self.reader = reader
        self.store = reader.store
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mounted_at = time.time_ns()
        self._lookups: dict[int, int] = {}  # kernel lookup count of every snapshot inode
        self._peak = 0  # size the table's dict was last built for
        self._snap_index: dict[bytes, int] = {}
        self._roots: dict[int, Entry] = {}  # snapshot index -> root entry
        self._dir = functools.lru_cache(maxsize=offsets_cache)(self._load_dir)
        reader.also_clear(self._dir.cache_clear)  # it holds decoded entry lists too

    # -- snapshots ------------------------------------------------------------------------

    def snapshot_ino(self, root: bytes) -> int:
        index = self._snap_index.get(root)
        if index is None:
            index = len(self._snap_index) + 1
            if index >= 1 << (64 - SNAP_SHIFT):
                raise InvalidArgument("inode space exhausted: remount to serve more snapshots")
            self._snap_index[root] = index
        return index << SNAP_SHIFT

    def _root(self, name: bytes, root: bytes, time_s: float) -> tuple[int, Entry]:
        ino = self.snapshot_ino(root)
        entry = Entry(name, tree.T_DIR, 0o755, self.uid, self.gid, 0, int(time_s * 1e9), root)
        self._roots.setdefault(ino >> SNAP_SHIFT, entry)
        return ino, entry

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
        return self._root(name, root, rec.time)

    def snapshot_roots(self) -> list[tuple[int, Entry]]:
        out = [self._root(rec.id.encode(), rec.root, rec.time)
               for rec in self.store.snapshots()]
        out.sort(key=lambda item: item[1].name)
        return out

    # -- tree nodes -----------------------------------------------------------------------

    def _load_dir(self, oid: bytes) -> tuple[list[int], list[Entry]]:
        """A directory's entries and the pre-order offset of each relative to the directory."""
        entries = self.reader.tree(oid).entries
        return _child_offsets(entries), entries

    def entry(self, ino: int) -> Entry:
        """The entry numbered ``ino``: walk down from its snapshot's root by position."""
        e = self._roots.get(ino >> SNAP_SHIFT)
        if e is None:
            raise NotFound(f"stale inode {ino}")
        pos = ino & POS_MASK
        load = self._dir
        while pos:
            if e.type != tree.T_DIR:
                raise NotFound(f"stale inode {ino}")
            offsets, entries = load(e.ref)
            i = bisect.bisect_right(offsets, pos) - 1
            if i < 0:
                raise NotFound(f"stale inode {ino}")
            e = entries[i]
            pos -= offsets[i]
        return e

    def child(self, parent: int, name: bytes) -> tuple[int, Entry]:
        d = self.entry(parent)
        if not d.is_dir:
            raise NotFound(f"inode {parent} is not a directory")
        i = self.reader.tree(d.ref).index_of(name)
        if i is None:
            raise NotFound(f"no entry {name!r}")
        offsets, entries = self._dir(d.ref)
        return parent + offsets[i], entries[i]

    def children(self, parent: int, start: int = 0) -> Iterator[tuple[int, int, Entry]]:
        """(next offset, ino, entry) for entries from position ``start`` on (readdir)."""
        d = self.entry(parent)
        if not d.is_dir:
            raise NotFound(f"inode {parent} is not a directory")
        offsets, entries = self._dir(d.ref)
        for i in range(start, len(entries)):
            yield i + 1, parent + offsets[i], entries[i]

    # -- lookup counts --------------------------------------------------------------------

    def remember(self, ino: int) -> None:
        """The kernel took one more reference (lookup, readdirplus entry, create)."""
        lookups = self._lookups
        lookups[ino] = lookups.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.pop(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left

    def forgotten(self) -> bool:
        """End of a forget batch: rebuild the table if it shrank a lot (dicts never shrink).

        Returns True when it was rebuilt, i.e. when a large block of memory was just freed.
        """
        size = len(self._lookups)
        if size > self._peak:
            self._peak = size
        elif self._peak >= SHRINK_MIN and size * SHRINK_FACTOR <= self._peak:
            self._lookups = dict(self._lookups)
            self._peak = size
            # The kernel let go of most of what it walked; decoded trees interleave with the
            # freed keys in Python's small-object arenas, which are returned only when empty.
            self.reader.clear()
            return True
        return False

    def known(self, ino: int) -> bool:
        return ino in self._lookups

    def __len__(self) -> int:
        return len(self._lookups)


def _child_offsets(entries: list[Entry]) -> list[int]:
    """Pre-order offset of each entry relative to its directory's own position."""
    offsets = []
    pos = 1
    for e in entries:
        offsets.append(pos)
        pos += 1 + e.size if e.type == tree.T_DIR else 1
    return offsets
