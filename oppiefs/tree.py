"""Snapshot model: tree objects, file chunk lists, import, checkout, diff, walk.

A snapshot is a tree of per-directory objects; the snapshot id is the hex blake3 of the
root tree object's payload, so identical trees get identical ids and equal subtrees are one
shared object (diff skips them, commits rewrite only the directories on changed paths).

Tree payload (little endian)::

    b"OPTREE1\\n" u64 subtree_bytes u64 subtree_files u32 n
    n x entry: u8 type, u32 mode, u32 uid, u32 gid, u64 size, i64 mtime_ns, u16 namelen,
               name, then 32-byte ref (FILE/CHUNKED/DIR) or u16 len + target (SYMLINK)

A directory entry's ``size`` is the number of entries below it (so vfs.py can number every
node of a snapshot in pre-order without opening subtrees). Entries are sorted by name bytes.

A directory of more than ``SPLIT_OVER`` entries is stored as an index over parts, so that a
commit changing one entry rewrites one part and the index, not the whole directory::

    b"OPTIDX1\n" u64 subtree_bytes u64 subtree_files u32 entries u32 n
    n x part: 32-byte id, u32 entries

Each part is a tree object (as above; its header counts only its own files) holding a run of
consecutive entries. Parts end after a name whose crc32 has its low bits clear (or at
``PART_MAX`` entries), so the cut is content-defined: a pure function of the sorted names,
unmoved by edits elsewhere in the directory, and equal trees always get equal ids.
Names are raw bytes (not necessarily UTF-8). ``mode`` holds
the permission bits (07777). FILE refs name a single chunk (all zero for an empty file);
CHUNKED refs name a LIST object: b"OPLIST1\\n" then (32-byte chunk id, u32 length) pairs.
The entry type, not the stored object's kind, says how to read a file, so a file whose bytes
happen to equal some tree payload still reads back as itself.

Hard links are imported as independent files (their content is deduplicated anyway).
Devices, FIFOs and sockets cannot be represented: refused, or skipped and reported.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import functools
import itertools
import os
import shutil
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from . import chunker, hostfs
from .errors import (
    AlreadyExists,
    Corrupt,
    InvalidArgument,
    NotFound,
    Unsupported,
    from_oserror,
)
from .store import KIND_CHUNK, KIND_LIST, KIND_TREE, StaleCache, Store, Writer

T_FILE = 1
T_CHUNKED = 2
T_DIR = 3
T_SYMLINK = 4
TYPE_NAMES = {T_FILE: "file", T_CHUNKED: "file", T_DIR: "dir", T_SYMLINK: "symlink"}

TREE_MAGIC = b"OPTREE1\n"
INDEX_MAGIC = b"OPTIDX1\n"
SPLIT_OVER = 128  # directories with more entries are stored in parts
PART_MASK = 31  # a part ends after a name whose crc32 & PART_MASK == 0: ~32 entries
PART_MAX = 128
LIST_MAGIC = b"OPLIST1\n"
ZERO_ID = bytes(32)

_HEAD = struct.Struct("<QQI")
_ENTRY = struct.Struct("<BIIIQqH")
_ENTRY_KIND = struct.Struct("<B28xH")  # an entry's type and name length (see _ENTRY)
_U16 = struct.Struct("<H")
_LIST_ITEM = struct.Struct("<32sI")
_IDX_HEAD = struct.Struct("<QQII")


class Entry(NamedTuple):
    name: bytes
    type: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ref: bytes = ZERO_ID  # chunk / list / tree id
    target: bytes = b""  # symlink target

    @property
    def is_dir(self) -> bool:
        return self.type == T_DIR

    @property
    def is_file(self) -> bool:
        return self.type in (T_FILE, T_CHUNKED)

    @property
    def st_mode(self) -> int:
        kind = {T_DIR: stat.S_IFDIR, T_SYMLINK: stat.S_IFLNK}.get(self.type, stat.S_IFREG)
        return kind | self.mode


@dataclass
class Tree:
    """A decoded directory: entries sorted by name, with subtree totals."""

    entries: list[Entry]
    total_bytes: int
    total_files: int
    parts: list[tuple[bytes, int]] | None = None  # (part id, entries) of a split directory
    _index: dict[bytes, int] | None = field(default=None, repr=False)
    # Its encoded bytes (verified), kept by a commit's reader: the next commit splices them.
    payload: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Entries in this directory."""
        return len(self.entries)

    def index_of(self, name: bytes) -> int | None:
        """Position of ``name`` in ``entries``: a dict built on first use (most trees are
        walked)."""
        if self._index is None:
            self._index = dict(zip(self.names, itertools.count()))
        return self._index.get(name)

    def get(self, name: bytes) -> Entry | None:
        i = self.index_of(name)
        return None if i is None else self.entries[i]

    @functools.cached_property
    def names(self) -> list[bytes]:
        return [e.name for e in self.entries]

    @functools.cached_property
    def offsets(self) -> list[int]:
        """Where each entry's record starts in the encoded tree, then where the last ends
        (of a one-object tree: what ``splice_tree`` copies)."""
        return list(itertools.accumulate(map(_record_size, self.entries),
                                         initial=len(TREE_MAGIC) + _HEAD.size))

    @functools.cached_property
    def tally(self) -> Tally:
        """Totals a commit keeps up to date by difference instead of recounting."""
        tally = Tally.of(self.entries)
        tally.bytes, tally.files = self.total_bytes, self.total_files
        return tally


class SplitTree(Tree):
    """A directory stored in parts, as the trees of its parts.

    A commit changes a few names of a directory that may hold thousands: it looks them up
    in the parts they fall into, replaces those parts and keeps the others' trees as they
    are, so its cost follows the parts it changes. The whole entry list (a mount's
    listing) and the totals are put together from the parts only when asked for.
    """

    def __init__(self, part_trees: list[Tree], parts: list[tuple[bytes, int]], size: int,
                 total_bytes: int, total_files: int, lasts: list[bytes] | None = None) -> None:
        """``size``: its entries; ``lasts``: its parts' last names, if the caller has them
        (a decode checks them, a commit carries them over from the last version)."""
        self.part_trees, self.parts, self._size = part_trees, parts, size
        self.total_bytes, self.total_files = total_bytes, total_files
        self._index, self.payload = None, None
        if lasts is not None:
            self.__dict__["lasts"] = lasts  # the cached property

    @property
    def size(self) -> int:
        return self._size

    @functools.cached_property
    def entries(self) -> list[Entry]:  # type: ignore[override]
        return list(itertools.chain.from_iterable(pt.entries for pt in self.part_trees))

    @functools.cached_property
    def names(self) -> list[bytes]:
        return list(itertools.chain.from_iterable(pt.names for pt in self.part_trees))

    @functools.cached_property
    def starts(self) -> list[int]:
        """Where each part's entries start in ``entries``, then the number of entries."""
        return list(itertools.accumulate((n for _, n in self.parts), initial=0))

    @functools.cached_property
    def lasts(self) -> list[bytes]:
        """Each part's last name: a name after part k-1's last one belongs to part k."""
        return [pt.entries[-1].name for pt in self.part_trees]

    def part_of(self, name: bytes) -> int:
        """The part that holds ``name``, or would."""
        return min(bisect.bisect_left(self.lasts, name), len(self.parts) - 1)

    def index_of(self, name: bytes) -> int | None:
        k = self.part_of(name)
        i = self.part_trees[k].index_of(name)
        return None if i is None else self.starts[k] + i

    def get(self, name: bytes) -> Entry | None:
        return self.part_trees[self.part_of(name)].get(name)

    @functools.cached_property
    def tally(self) -> Tally:
        return Tally.of_parts((pt.tally for pt in self.part_trees), self.total_bytes,
                              self.total_files)


@dataclass(slots=True)
class Tally:
    """Totals of a directory: file bytes and files below it (recursively), its own files'
    bytes and count, and the entries below it."""

    bytes: int = 0
    files: int = 0
    direct_bytes: int = 0
    direct_files: int = 0
    entries: int = 0

    @classmethod
    def of_parts(cls, parts: Iterable[Tally], total_bytes: int, total_files: int) -> Tally:
        """A split directory's totals from those of its parts (each counts its own files)."""
        tally = cls(total_bytes, total_files)
        for t in parts:
            tally.direct_bytes += t.direct_bytes
            tally.direct_files += t.direct_files
            tally.entries += t.entries
        return tally

    @classmethod
    def of(cls, entries: list[Entry], sub_bytes: int = 0, sub_files: int = 0) -> Tally:
        """Count entries whose subdirectories hold ``sub_bytes`` in ``sub_files`` files.

        One pass over the entries: a commit counts every directory on its paths that it
        reads from the store (most of them, on a big tree)."""
        direct = files = below = 0
        for e in entries:
            etype = e[1]  # indexing: faster than the NamedTuple's field descriptors
            if etype <= T_CHUNKED:
                direct += e[5]
                files += 1
                below += 1
            elif etype == T_DIR:
                below += 1 + e[5]
            else:
                below += 1
        return cls(sub_bytes + direct, sub_files + files, direct, files, below)

    def copy(self) -> Tally:
        """A copy: 5x faster than ``dataclasses.replace``, and a commit takes two per dir."""
        return Tally(self.bytes, self.files, self.direct_bytes, self.direct_files, self.entries)

    def count(self, e: Entry, sign: int, sub: tuple[int, int] = (0, 0)) -> None:
        """Add (sign 1) or remove (-1) an entry; ``sub``: a directory's (bytes, files)."""
        etype = e.type
        if etype <= T_CHUNKED:
            self.bytes += sign * e.size
            self.files += sign
            self.direct_bytes += sign * e.size
            self.direct_files += sign
            self.entries += sign
        elif etype == T_DIR:
            self.bytes += sign * sub[0]
            self.files += sign * sub[1]
            self.entries += sign * (1 + e.size)
        else:
            self.entries += sign


# -- codec ----------------------------------------------------------------------------------


class Built(NamedTuple):
    """A tree just written: its id, entries below it and totals of the files below it."""

    oid: bytes
    entries: int
    bytes: int
    files: int


def encode_tree(entries: list[Entry], sub_bytes: int = 0,
                sub_files: int = 0) -> tuple[bytes, int, int]:
    """Encode entries (any order) -> (payload, subtree bytes, subtree files).

    ``sub_bytes``/``sub_files`` are the totals of the subdirectories, which the caller knows.
    """
    entries = sorted(entries, key=lambda e: e.name)
    total_bytes, total_files = sub_bytes, sub_files
    parts: list[bytes] = []
    prev = None
    for e in entries:
        if e.name == prev:
            raise InvalidArgument(f"duplicate name {e.name!r} in directory")
        prev = e.name
        _pack_entry(parts, e)
        if e.is_file:
            total_bytes += e.size
            total_files += 1
    payload = b"".join([TREE_MAGIC, _HEAD.pack(total_bytes, total_files, len(entries)), *parts])
    return payload, total_bytes, total_files


def _pack_entry(out: list[bytes], e: Entry) -> None:
    out.append(_ENTRY.pack(e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, len(e.name)))
    out.append(e.name)
    if e.type == T_SYMLINK:
        out.append(_U16.pack(len(e.target)))
        out.append(e.target)
    else:
        out.append(e.ref)


def _record_size(e: Entry) -> int:
    return _ENTRY.size + len(e.name) + (2 + len(e.target) if e.type == T_SYMLINK else 32)


def splice_tree(payload: bytes, lower: Tree, changes: dict[bytes, Entry | None],
                tally: Tally) -> tuple[bytes, Tree]:
    """``lower`` (a one-object tree encoded as ``payload``) with ``changes`` applied:
    the payload ``encode_tree`` would give, and its decoded tree.

    A commit changes a few names of a directory that may hold a hundred: the unchanged
    entries' bytes are copied in runs and their entries in slices, so the cost follows the
    number of changes, not the size of the directory (encoding every entry again was the
    biggest part of a commit on a tree of big directories). ``tally`` holds the new totals.
    """
    same = _replaced_in_place(payload, lower, changes, tally)
    if same is not None:
        return same
    offsets, old_names = lower.offsets, lower.names
    pieces = [TREE_MAGIC, b""]
    entries: list[Entry] = []
    names: list[bytes] = []
    starts: list[int] = []  # the new tree's offsets, built alongside
    pos = 0  # entries of lower before pos are placed
    shift = 0  # new offset - old offset of the entries placed next
    for name in sorted(changes):
        at = lower.index_of(name)
        end = at if at is not None else bisect.bisect_left(old_names, name)
        pieces.append(payload[offsets[pos]:offsets[end]])
        entries += lower.entries[pos:end]
        names += old_names[pos:end]
        starts += map(shift.__add__, offsets[pos:end])
        here = offsets[end] + shift  # where a new entry for ``name`` starts
        if at is not None:
            shift -= offsets[at + 1] - offsets[at]
        pos = end + 1 if at is not None else end
        e = changes[name]
        if e is not None:
            starts.append(here)
            _pack_entry(pieces, e)
            entries.append(e)
            names.append(name)
            shift += _record_size(e)
    pieces.append(payload[offsets[pos]:offsets[-1]])
    entries += lower.entries[pos:]
    names += old_names[pos:]
    starts += map(shift.__add__, offsets[pos:])  # and where the last entry ends
    pieces[1] = _HEAD.pack(tally.bytes, tally.files, len(entries))
    new = Tree(entries, tally.bytes, tally.files)
    new.__dict__["names"], new.__dict__["offsets"] = names, starts  # the cached properties
    return b"".join(pieces), new


def _replaced_in_place(payload: bytes, lower: Tree, changes: dict[bytes, Entry | None],
                       tally: Tally) -> tuple[bytes, Tree] | None:
    """``splice_tree`` when every change replaces an entry by one of the same record size
    (a directory on a changed path, a file rewritten: the common case), else None.

    Names, positions and offsets are then those of ``lower``: the new tree shares its
    lists and its name index (trees are never changed once built), so this costs one
    list copy and a few slices, and the next commit's first lookup finds the index built.
    """
    offsets, index_of = lower.offsets, lower.index_of
    at: list[tuple[int, Entry]] = []
    for name, e in changes.items():
        i = index_of(name)
        if e is None or i is None or _record_size(e) != offsets[i + 1] - offsets[i]:
            return None
        at.append((i, e))
    if len(at) > 1:
        at.sort()
    entries = lower.entries.copy()
    pieces = [TREE_MAGIC, _HEAD.pack(tally.bytes, tally.files, len(entries))]
    pos = offsets[0]
    for i, e in at:
        pieces.append(payload[pos:offsets[i]])
        _pack_entry(pieces, e)
        entries[i] = e
        pos = offsets[i + 1]
    pieces.append(payload[pos:offsets[-1]])
    new = Tree(entries, tally.bytes, tally.files, _index=lower._index)
    new.__dict__["names"], new.__dict__["offsets"] = lower.names, offsets
    return b"".join(pieces), new


def subtree_entries(entries: list[Entry]) -> int:
    """Entries below a directory with these entries (a DIR entry's size is its own count)."""
    return sum(1 + e.size if e.type == T_DIR else 1 for e in entries)


def put_tree(w: Writer, entries: list[Entry], sub_bytes: int, sub_files: int,
             tally: Tally | None = None, fresh: set[bytes] | None = None) -> Built:
    """Store a directory (split into parts when large). ``tally``: the totals, when the
    caller kept them (spares passes over every entry). ``fresh``: the names of the only
    entries that may reference objects not stored yet (a commit's changes; the others come
    from a pinned tree): the store then counts the references later (``Writer.put``)."""
    if len(entries) <= SPLIT_OVER:
        payload, nbytes, nfiles = encode_tree(entries, sub_bytes, sub_files)
        oid = _put_dir(w, payload, entries, fresh)
        below = tally.entries if tally is not None else subtree_entries(entries)
        return Built(oid, below, nbytes, nfiles)
    entries = sorted(entries, key=_name)
    for a, b in itertools.pairwise(entries):
        if a.name == b.name:
            raise InvalidArgument(f"duplicate name {a.name!r} in directory")
    parts = [_put_part(w, entries[start:end], fresh)[0] for start, end in cut_parts(entries)]
    return _put_index(w, parts, len(entries),
                      tally if tally is not None else Tally.of(entries, sub_bytes, sub_files),
                      None if fresh is None else set(parts))


def _put_dir(w: Writer, payload: bytes, entries: list[Entry], fresh: set[bytes] | None) -> bytes:
    if fresh is None:
        return w.put(KIND_TREE, payload, _entry_refs(entries))
    return w.put(KIND_TREE, payload, _entry_refs([e for e in entries if e.name in fresh]),
                 deferred=True)


def put_changes(w: Writer, lower: Tree | None, changes: dict[bytes, Entry | None],
                tally: Tally, reader: Reader | None = None, base: bytes | None = None,
                n: int | None = None) -> Built:
    """Store ``lower`` with ``changes`` applied (name -> new entry; None: removed).

    ``tally`` holds the new totals. A small directory is spliced (``splice_tree``: given
    the ``reader`` it was read with and its id ``base``), and the new tree handed to the
    reader, which the next commit on top of this one wants. Of a split directory only the
    runs of parts that a changed name falls into are merged and cut again (extended until a
    cut lands on an old part end), so a commit costs O(changed parts), not O(directory
    size), and the result is the tree a fresh build of the same entries gives. A part whose
    changes only replace entries keeps its names, hence its bounds (cuts follow names), and
    is spliced as well. ``n``: the new version's entries, if the caller counted them.
    """
    if n is None:
        n = (lower.size if lower is not None else 0) + sum(
            (e is not None) - (lower is not None and lower.get(name) is not None)
            for name, e in changes.items())
    fresh = set(changes)
    if (lower is not None and lower.parts is None and n <= SPLIT_OVER and reader is not None
            and base is not None):
        payload, new = splice_tree(lower.payload or reader.payload(base), lower, changes, tally)
        oid = _put_dir(w, payload, [e for e in changes.values() if e is not None], fresh)
        new.payload = payload
        reader.remember(oid, new, tally)
        return Built(oid, tally.entries, tally.bytes, tally.files)
    if lower is None or lower.parts is None or n <= SPLIT_OVER:
        merged = {e.name: e for e in lower.entries} if lower is not None else {}
        for name, e in changes.items():
            if e is None:
                merged.pop(name, None)
            else:
                merged[name] = e
        return put_tree(w, list(merged.values()), tally.bytes - tally.direct_bytes,
                        tally.files - tally.direct_files, tally, fresh)
    assert isinstance(lower, SplitTree)
    old, old_trees = lower.parts, lower.part_trees
    touched: dict[int, list[bytes]] = {}
    for name in changes:
        touched.setdefault(lower.part_of(name), []).append(name)

    def merged_run(first: int, last: int) -> list[Entry]:
        by_name = {e.name: e for pt in old_trees[first:last + 1] for e in pt.entries}
        for k in range(first, last + 1):
            for name in touched.get(k, ()):
                e = changes[name]
                if e is None:
                    by_name.pop(name, None)
                else:
                    by_name[name] = e
        return sorted(by_name.values(), key=_name)

    # The new version's parts, their trees and last names: untouched runs of parts are
    # carried over as slices, so the loop's steps follow the touched parts.
    parts: list[tuple[bytes, int]] = []
    trees: list[Tree] = []
    lasts: list[bytes] = []
    old_lasts = lower.lasts
    new_parts: set[tuple[bytes, int]] = set()
    k = 0  # parts before k are placed
    for t in sorted(touched):
        if t < k:
            continue  # taken in by the run of an earlier one
        parts += old[k:t]
        trees += old_trees[k:t]
        lasts += old_lasts[k:t]
        if reader is not None and all(changes[name] is not None and lower.get(name) is not None
                                      for name in touched[t]):
            part, spliced = _splice_part(w, reader, old[t][0], old_trees[t],
                                         {name: changes[name] for name in touched[t]}, fresh)
            parts.append(part)
            trees.append(spliced)
            lasts.append(old_lasts[t])  # the names are unchanged
            new_parts.add(part)
            k = t + 1
            continue
        last = t
        while True:
            while last + 1 < len(old) and last + 1 in touched:
                last += 1
            run = merged_run(t, last)
            cuts = cut_parts(run)
            if last + 1 == len(old) or not run or _closes(run, *cuts[-1]):
                break
            last += 1  # the run's end is no cut any more: take in the next part
        for start, end in cuts:
            part, pt = _put_part(w, run[start:end], fresh)
            parts.append(part)
            trees.append(pt)
            lasts.append(run[end - 1].name)
            new_parts.add(part)
        k = last + 1
    parts += old[k:]
    trees += old_trees[k:]
    lasts += old_lasts[k:]
    built = _put_index(w, parts, n, tally, new_parts)
    if reader is not None:  # a big directory is the costliest one to decode again
        reader.remember(built.oid, SplitTree(trees, parts, n, tally.bytes, tally.files, lasts),
                        tally)
    return built


def _splice_part(w: Writer, reader: Reader, oid: bytes, lower: Tree,
                 changes: dict[bytes, Entry], fresh: set[bytes]) -> tuple[tuple[bytes, int], Tree]:
    """Part ``oid`` (decoded: ``lower``) with entries replaced, names unchanged -> (part,
    its tree); the new part is handed to the reader, where the next commit on top of this
    one splices it. A part's totals are those of its own files; they change by the
    replaced ones."""
    tally = Tally(lower.total_bytes, lower.total_files)
    for name, e in changes.items():
        old = lower.get(name)
        assert old is not None  # the caller passes replacements only
        tally.count(old, -1)
        tally.count(e, 1)
    payload, new = splice_tree(lower.payload or reader.payload(oid), lower, changes, tally)
    new.payload = payload
    new_oid = _put_dir(w, payload, list(changes.values()), fresh)
    reader.remember(new_oid, new)
    return (new_oid, new.size), new


def _put_part(w: Writer, run: list[Entry],
              fresh: set[bytes] | None) -> tuple[tuple[bytes, int], Tree]:
    """Store a part -> ((its id, entries), its tree, which can be spliced)."""
    payload, nbytes, nfiles = encode_tree(run)
    pt = Tree(run, nbytes, nfiles, payload=payload)
    return (_put_dir(w, payload, run, fresh), len(run)), pt


def _put_index(w: Writer, parts: list[tuple[bytes, int]], n: int, tally: Tally,
               fresh: set[tuple[bytes, int]] | None = None) -> Built:
    """``fresh``: the parts written by this session (see ``put_tree``)."""
    payload = b"".join([INDEX_MAGIC, _IDX_HEAD.pack(tally.bytes, tally.files, n, len(parts)),
                        *[_LIST_ITEM.pack(oid, count) for oid, count in parts]])
    if fresh is None:
        oid = w.put(KIND_TREE, payload, [oid for oid, _ in parts])
    else:
        oid = w.put(KIND_TREE, payload, [oid for oid, _ in fresh], deferred=True)
    return Built(oid, tally.entries, tally.bytes, tally.files)


def _name(e: Entry) -> bytes:
    return e.name


def cut_parts(entries: list[Entry]) -> list[tuple[int, int]]:
    """Content-defined (start, end) runs of a sorted entry list (see the module doc)."""
    runs, start = [], 0
    for i in range(len(entries)):
        if _closes(entries, start, i + 1):
            runs.append((start, i + 1))
            start = i + 1
    if start < len(entries):
        runs.append((start, len(entries)))
    return runs


def _closes(entries: list[Entry], start: int, end: int) -> bool:
    """Whether a part ends after entries[start:end] (its last name, or its length)."""
    return not zlib.crc32(entries[end - 1].name) & PART_MASK or end - start >= PART_MAX


def decode_index(payload: bytes) -> tuple[int, int, int, list[tuple[bytes, int]]]:
    """A split directory's index -> (subtree bytes, subtree files, entries, parts)."""
    try:
        total_bytes, total_files, n, nparts = _IDX_HEAD.unpack_from(payload, 8)
    except struct.error as exc:
        raise Corrupt(f"truncated tree index: {exc}") from exc
    body = payload[8 + _IDX_HEAD.size:]
    if payload[:8] != INDEX_MAGIC or len(body) != nparts * _LIST_ITEM.size:
        raise Corrupt("not a tree index object")
    return total_bytes, total_files, n, list(_LIST_ITEM.iter_unpack(body))


def decode_tree(payload: bytes, *, offsets: bool = False) -> Tree:
    """Decode a one-object tree, its names too (every lookup wants them), and with
    ``offsets`` where each record starts (what a commit splices; a mount would only hold
    them in memory).

    Entries are made with ``tuple.__new__``: a NamedTuple's own constructor is Python code,
    and it was half of decoding a directory, which a commit does for every directory on
    its paths that the cache does not hold.
    """
    if payload[:8] != TREE_MAGIC:
        raise Corrupt("not a tree object")
    try:
        total_bytes, total_files, n = _HEAD.unpack_from(payload, 8)
        pos = 8 + _HEAD.size
        entries: list[Entry] = []
        names: list[bytes] = []
        starts: list[int] | None = [] if offsets else None
        unpack = _ENTRY.unpack_from
        esize = _ENTRY.size
        new = tuple.__new__
        for _ in range(n):
            if starts is not None:
                starts.append(pos)
            etype, mode, uid, gid, size, mtime, nlen = unpack(payload, pos)
            pos += esize
            name = payload[pos:pos + nlen]
            names.append(name)
            pos += nlen
            if etype == T_SYMLINK:
                (tlen,) = _U16.unpack_from(payload, pos)
                pos += 2
                entries.append(new(Entry, (name, etype, mode, uid, gid, size, mtime, ZERO_ID,
                                           payload[pos:pos + tlen])))
                pos += tlen
            else:
                entries.append(new(Entry, (name, etype, mode, uid, gid, size, mtime,
                                           payload[pos:pos + 32], b"")))
                pos += 32
    except struct.error as exc:
        raise Corrupt(f"truncated tree object: {exc}") from exc
    if pos != len(payload):
        raise Corrupt("trailing bytes in tree object")
    tree = Tree(entries, total_bytes, total_files)
    tree.__dict__["names"] = names  # the cached properties
    if starts is not None:
        starts.append(pos)  # where the last record ends
        tree.__dict__["offsets"] = starts
    return tree


def encode_list(chunks: list[tuple[bytes, int]]) -> bytes:
    return LIST_MAGIC + b"".join(_LIST_ITEM.pack(oid, n) for oid, n in chunks)


def decode_list(payload: bytes) -> list[tuple[bytes, int]]:
    if payload[:8] != LIST_MAGIC or (len(payload) - 8) % _LIST_ITEM.size:
        raise Corrupt("not a chunk list object")
    return list(_LIST_ITEM.iter_unpack(payload[8:]))


def children_of(kind: bytes, payload: bytes) -> list[bytes]:
    """Object ids referenced by an object (the store's refcount edges)."""
    if kind == KIND_CHUNK:
        return []
    if kind == KIND_LIST:
        return [oid for oid, _ in decode_list(payload)]
    if kind == KIND_TREE and payload[:8] == INDEX_MAGIC:
        return [oid for oid, _ in decode_index(payload)[3]]
    if kind == KIND_TREE:
        return tree_refs(payload)
    raise Corrupt(f"unknown object kind {kind!r}")


def tree_refs(payload: bytes) -> list[bytes]:
    """The object ids a one-object tree references, read without decoding its entries: the
    sweeper reads every tree a commit adds twice (applying its references, deleting it)."""
    if payload[:8] != TREE_MAGIC:
        raise Corrupt("not a tree object")
    refs = []
    try:
        n = _HEAD.unpack_from(payload, 8)[2]
        pos = 8 + _HEAD.size
        unpack, esize = _ENTRY_KIND.unpack_from, _ENTRY.size
        for _ in range(n):
            etype, nlen = unpack(payload, pos)
            pos += esize + nlen
            if etype == T_SYMLINK:
                pos += 2 + _U16.unpack_from(payload, pos)[0]
                continue
            ref = payload[pos:pos + 32]
            pos += 32
            if _is_ref(etype, ref):
                refs.append(ref)
    except struct.error as exc:
        raise Corrupt(f"truncated tree object: {exc}") from exc
    if pos != len(payload):
        raise Corrupt("trailing bytes in tree object")
    return refs


def _entry_refs(entries: list[Entry]) -> list[bytes]:
    return [e.ref for e in entries if _is_ref(e.type, e.ref)]


def _is_ref(etype: int, ref: bytes) -> bool:
    """Whether an entry references an object (an empty file and a symlink do not)."""
    return etype in (T_CHUNKED, T_DIR) or (etype == T_FILE and ref != ZERO_ID)


def open_store(path: str | os.PathLike[str], *, create: bool = True) -> Store:
    """Open a store that knows the tree codec (what every caller wants)."""
    return Store(path, children_of=children_of, create=create)


# -- reading --------------------------------------------------------------------------------


class FileMap(NamedTuple):
    """Chunk layout of one file: ids and their start offsets, for reads at any offset."""

    oids: list[bytes]
    starts: list[int]
    size: int

    def span(self, offset: int, length: int) -> Iterator[tuple[bytes, int, int]]:
        """Yield (chunk id, start within chunk, end within chunk) covering the range."""
        end = min(offset + length, self.size)
        i = bisect.bisect_right(self.starts, offset) - 1
        while offset < end and i < len(self.oids):
            cstart = self.starts[i]
            cend = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            stop = min(end, cend)
            yield self.oids[i], offset - cstart, stop - cstart
            offset = stop
            i += 1


BIG_ITEMS = 1024  # a decoded object with more items (entries, chunks) counts as large
BIG_BUDGET = 512 * 1024  # items of large objects decoded before the caches start over
WRITTEN_MAX = 1024  # trees a Reader keeps from commits until they are looked up ...
WRITTEN_ITEMS = 128 * 1024  # ... and their entries in all (split directories are big)


class Reader:
    """Decoded trees and chunk lists with LRU caches (immutable, so caching is always safe).

    The caches are bounded by count (functools' C LRU: no Python code on a hit, which the
    FUSE hot path needs), and a count says nothing about size: a split directory decodes to
    all its entries, a big file's list to all its chunks. So misses keep a tally of the
    items of large objects they decoded, and after ``big_budget`` of them every cache
    starts over (``clear``; mounts register theirs with ``also_clear``). Memory stays
    bounded by the budget plus count x small size; hot objects are decoded again at most
    once per budget.
    """

    def __init__(self, store: Store, trees: int = 4096, lists: int = 1024,
                 big_budget: int = BIG_BUDGET, *, keep_payloads: bool = False) -> None:
        self.store = store
        # A commit's reader keeps the encoded bytes of one-object trees for splicing (a
        # store read per directory less), with their record offsets; a mount's would only
        # grow by them.
        self.keep_payloads = keep_payloads
        self.tree: Callable[[bytes], Tree] = functools.lru_cache(maxsize=trees)(self._tree)
        # Parts of split directories on their own too: a new version of a big directory
        # shares all but a few parts with the last one, so decoding it is mostly lookups,
        # and a commit splices a part as it splices a small directory.
        self.part: Callable[[bytes], Tree] = functools.lru_cache(maxsize=trees)(self._part_tree)
        self._filemap = functools.lru_cache(maxsize=lists)(self._list)
        self.big_budget = big_budget
        # See remember(). Commits in several threads share a Reader: hence the lock.
        self._written: collections.OrderedDict[bytes, Tree] = collections.OrderedDict()
        self._written_items = 0
        self._written_lock = threading.Lock()
        self.big_decoded = 0  # items of large objects decoded since the last clear
        self._clears: list[Callable[[], None]] = [
            self.tree.cache_clear, self.part.cache_clear,  # type: ignore[attr-defined]
            self._filemap.cache_clear]

    def also_clear(self, cache_clear: Callable[[], None]) -> None:
        """Clear another cache of decoded objects (or parts of them) along with ours."""
        self._clears.append(cache_clear)

    def clear(self) -> None:
        self.big_decoded = 0
        for fn in self._clears:
            fn()

    def _decoded(self, items: int) -> None:
        """Called on a miss (safe inside functools' LRU: it re-checks after the call)."""
        if items > BIG_ITEMS:
            self.big_decoded += items
            if self.big_decoded > self.big_budget:
                self.clear()

    def _tree(self, oid: bytes) -> Tree:
        written = self._take_written(oid)
        if written is not None:
            return written
        payload = self.payload(oid)
        if payload[:8] != INDEX_MAGIC:
            return self._decode(payload)
        total_bytes, total_files, n, parts = decode_index(payload)
        part_trees = [self.part(part) for part, _ in parts]
        lasts: list[bytes] = []  # the parts' last names, which lookups bisect
        for (part, count), pt in zip(parts, part_trees, strict=True):
            if len(pt.entries) != count or not count or (lasts and
                                                        lasts[-1] >= pt.entries[0].name):
                raise Corrupt(f"part {part.hex()} does not fit tree index {oid.hex()}")
            lasts.append(pt.entries[-1].name)
        if sum(count for _, count in parts) != n:
            raise Corrupt(f"tree index {oid.hex()} miscounts its entries")
        self._decoded(n)
        return SplitTree(part_trees, parts, n, total_bytes, total_files, lasts)

    def _part_tree(self, oid: bytes) -> Tree:
        written = self._take_written(oid)
        return written if written is not None else self._decode(self.payload(oid))

    def _take_written(self, oid: bytes) -> Tree | None:
        with self._written_lock:
            written = self._written.pop(oid, None)
            if written is not None:
                self._written_items -= written.size
        if written is not None:
            self._decoded(written.size)  # held from now on, as if decoded
        return written

    def _decode(self, payload: bytes) -> Tree:
        decoded = decode_tree(payload, offsets=self.keep_payloads)
        if self.keep_payloads:
            decoded.payload = payload
        return decoded

    def remember(self, oid: bytes, tree: Tree, tally: Tally | None = None) -> None:
        """A tree just written (and not decoded from the store): the next ``tree(oid)``
        takes it instead of decoding it. Bounded; the oldest are forgotten first.

        ``tally``: its totals, which the commit kept by difference (spares the next commit
        a pass over every entry); the tree keeps it, so the caller must not change it.
        """
        if tally is not None:
            tree.__dict__["tally"] = tally  # the cached property
        written = self._written
        with self._written_lock:
            old = written.pop(oid, None)
            written[oid] = tree
            self._written_items += tree.size - (old.size if old else 0)
            while len(written) > WRITTEN_MAX or self._written_items > WRITTEN_ITEMS:
                self._written_items -= written.popitem(last=False)[1].size

    def payload(self, oid: bytes) -> bytes:
        """A tree object's encoded bytes (verified)."""
        kind, payload = self.store.get(oid)
        if kind != KIND_TREE:
            raise Corrupt(f"object {oid.hex()} is not a tree")
        return payload

    def _list(self, oid: bytes) -> FileMap:
        kind, payload = self.store.get(oid)
        if kind != KIND_LIST:
            raise Corrupt(f"object {oid.hex()} is not a chunk list")
        oids, starts, pos = [], [], 0
        for chunk, n in decode_list(payload):
            oids.append(chunk)
            starts.append(pos)
            pos += n
        self._decoded(len(oids))
        return FileMap(oids, starts, pos)

    def filemap(self, entry: Entry) -> FileMap:
        if entry.type == T_CHUNKED:
            fmap = self._filemap(entry.ref)
            if fmap.size != entry.size:
                raise Corrupt(f"chunk list {entry.ref.hex()} does not match the file size")
            return fmap
        if entry.size == 0:
            return FileMap([], [], 0)
        return FileMap([entry.ref], [0], entry.size)

    def chunk(self, oid: bytes) -> bytes:
        return self.store.get_payload(oid)

    def iter_content(self, entry: Entry) -> Iterator[bytes]:
        for oid in self.filemap(entry).oids:
            yield self.chunk(oid)

    def read_all(self, entry: Entry) -> bytes:
        return b"".join(self.iter_content(entry))

    def lookup(self, root: bytes, path: bytes | str) -> Entry:
        """Entry at ``path`` (relative, '/'-separated) inside the snapshot ``root``."""
        entry = root_entry(root)
        for part in split_path(path):
            if not entry.is_dir:
                raise NotFound(f"{os.fsdecode(path)}: not a directory on the way")
            child = self.tree(entry.ref).get(part)
            if child is None:
                raise NotFound(f"no such path {os.fsdecode(path)!r} in snapshot")
            entry = child
        return entry

    def warm(self, root: bytes, limit: int) -> int:
        """Decode the directories of snapshot ``root``, top levels first, until ``limit``
        are held; returns how many. Stopping at the cache's size keeps the top levels, the
        ones most commits pass through, from being the first evicted."""
        queue, held = collections.deque([root]), 0
        while queue and held < limit:
            t = self.tree(queue.popleft())
            held += 1
            # A split directory's parts, not its whole entry list (kept with it once built).
            for part in t.part_trees if isinstance(t, SplitTree) else (t,):
                queue.extend(e.ref for e in part.entries if e.type == T_DIR)
        return held

    def walk(self, tree_oid: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
        """Pre-order walk: (relative path, entry) for everything below a tree."""
        for e in self.tree(tree_oid).entries:
            path = prefix + e.name
            yield path, e
            if e.is_dir:
                yield from self.walk(e.ref, path + b"/")


COMMIT_TREES = 8192  # decoded trees a commit reader keeps (4,096 by default)


def commit_reader(store: Store) -> Reader:
    """The reader commits share: it keeps the encoded trees it splices, and twice a mount
    reader's trees. The kernel tree has 5,096 directories (and parts of big ones), and a
    search loop touching files all over it missed the 4,096-tree cache 0.5 times a commit
    besides the first reads (a decoded directory there holds ~16 entries: some 40 MB for
    all of them)."""
    return Reader(store, trees=COMMIT_TREES, keep_payloads=True)


def root_entry(root: bytes) -> Entry:
    return Entry(b"", T_DIR, 0o755, 0, 0, 0, 0, root)


def split_path(path: bytes | str) -> list[bytes]:
    raw = os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise InvalidArgument(f"path {os.fsdecode(raw)!r} may not contain '..'")
    return parts


# -- import ---------------------------------------------------------------------------------


@dataclass
class ImportReport:
    root: bytes = ZERO_ID
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    skipped: list[str] = field(default_factory=list)


ProgressFn = Callable[[int, int], None]  # (bytes added, files added)


def store_file(w: Writer, fd: int, size: int) -> tuple[int, bytes, int]:
    """Chunk and store the content of open file ``fd`` (``size`` bytes as last seen) ->
    (entry type, ref, size actually read)."""
    chunks: list[tuple[bytes, int]] = []
    for data in chunker.chunk_fd(fd, size):
        chunks.append((w.put(KIND_CHUNK, data, ()), len(data)))
    size = sum(n for _, n in chunks)
    if not chunks:
        return T_FILE, ZERO_ID, 0
    if len(chunks) == 1:
        return T_FILE, chunks[0][0], size
    return T_CHUNKED, w.put(KIND_LIST, encode_list(chunks), [c for c, _ in chunks]), size


def read_link(dir_fd: int, name: bytes, path: bytes) -> bytes:
    """The target of symlink ``name`` (one swapped for another kind of file since its
    lstat(): ``hostfs.Changed``)."""
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            raise hostfs.Changed from exc
        raise
    if len(target) > 0xFFFF:
        raise Unsupported(f"{os.fsdecode(path)}: symlink target too long")
    return target


def read_file(w: Writer, dir_fd: int, name: bytes,
              st: os.stat_result) -> tuple[int, bytes, int, int]:
    """Store regular file ``name`` of ``dir_fd``, the version lstat() saw as ``st`` and no
    other (``hostfs.Changed`` if it is not, or changed while read) -> (entry type, ref,
    size, permission bits: ``hostfs.access_mode``)."""
    fd = hostfs.open_file(dir_fd, name, st)
    try:
        mode = hostfs.access_mode(fd, st, hostfs.xattr_names(fd))
        found = store_file(w, fd, st.st_size)
        hostfs.check_unchanged(fd, st)
    finally:
        os.close(fd)
    return (*found, mode)


MTIME_MIN, MTIME_MAX = -(1 << 63), (1 << 63) - 1  # what an entry stores: int64 ns


def entry_from_stat(path: bytes, name: bytes, st: os.stat_result, etype: int,
                    ref: bytes = ZERO_ID, size: int = 0, target: bytes = b"",
                    mode: int | None = None) -> Entry:
    """The entry for ``name`` (at host ``path``, which errors name).

    An mtime past int64 nanoseconds (after 2262-04-11: ext4 and ``touch`` take dates up to
    2446) is refused, naming the file, rather than changed: a snapshot keeps what it was
    given or says it cannot."""
    if not MTIME_MIN <= st.st_mtime_ns <= MTIME_MAX:
        raise Unsupported(f"{os.fsdecode(path)}: its mtime ({st.st_mtime:.0f} s since 1970) "
                          "lies outside what a snapshot stores (1677-09-21 to 2262-04-11); "
                          "set another with touch")
    return Entry(name, etype, stat.S_IMODE(st.st_mode) if mode is None else mode, st.st_uid,
                 st.st_gid, size, st.st_mtime_ns, ref, target)


# dev, ino, size, mtime_ns, ctime_ns, type, ref, permission bits (as read: access_mode).
# Records of the older layout without the bits are misses (the file is read once more).
_CACHE = struct.Struct("<QQQqqB32sI")
RACY_NS = 2_000_000_000


class Importer:
    """Walks a host directory bottom-up and writes its objects through one Writer.

    Files cache (as in git's index or borg's files cache): for each regular file read, the
    store remembers (device, inode, size, mtime, ctime) -> content id under its absolute
    path. A re-import takes a file whose stat still matches without reading it. ctime cannot
    be set by users and changes on every write; files changed less than two seconds before
    the import began are never cached, so a write in the same clock tick as our read cannot
    hide. ``use_cache=False`` (``import --rehash``) reads everything.
    """

    def __init__(self, w: Writer, *, skip_special: bool = False,
                 progress: ProgressFn | None = None, use_cache: bool = True) -> None:
        self.w = w
        self.skip_special = skip_special
        self.progress = progress
        self.use_cache = use_cache
        self.report = ImportReport()
        self._sub: list[tuple[int, int]] = []  # totals of the subtrees of the current dir
        self._cached: dict[bytes, bytes] = {}  # this directory's files-cache records
        self.seen: set[bytes] = set()  # regular files walked (the rest of the cache is stale)
        self._trust_before = time.time_ns() - RACY_NS

    def _file(self, dir_fd: int, name: bytes, path: bytes,
              st: os.stat_result) -> tuple[int, bytes, int, int]:
        self.seen.add(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        raw = self._cached.get(path)
        if raw is not None and len(raw) == _CACHE.size:
            *seen, etype, ref, mode = _CACHE.unpack(raw)
            if tuple(seen) == key:
                if ref != ZERO_ID:
                    self.w.reuse(ref)
                return etype, ref, st.st_size, mode
        etype, ref, size, mode = read_file(self.w, dir_fd, name, st)
        if (self.use_cache and size == st.st_size
                and max(st.st_mtime_ns, st.st_ctime_ns) < self._trust_before):
            self.w.cache_file(path, _CACHE.pack(*key, etype, ref, mode))
        return etype, ref, size, mode

    def entry(self, dir_fd: int, name: bytes, path: bytes, st: os.stat_result) -> Entry | None:
        """Store the object ``name`` of ``dir_fd`` (at host ``path``) as lstat() saw it;
        None when it is a skipped special file."""
        mode = st.st_mode
        try:
            if stat.S_ISREG(mode):
                etype, ref, size, bits = self._file(dir_fd, name, path, st)
                self.report.files += 1
                self.report.bytes += size
                if self.progress:
                    self.progress(size, 1)
                return entry_from_stat(path, name, st, etype, ref, size, mode=bits)
            if stat.S_ISDIR(mode):
                fd = hostfs.open_dir(dir_fd, name, st)
                try:
                    bits = hostfs.access_mode(fd, st, hostfs.xattr_names(fd))
                    built = self.tree(fd, path, st)
                finally:
                    os.close(fd)
                self._sub.append((built.bytes, built.files))
                return entry_from_stat(path, name, st, T_DIR, built.oid, built.entries,
                                       mode=bits)
            if stat.S_ISLNK(mode):
                target = read_link(dir_fd, name, path)
                self.report.symlinks += 1
                return entry_from_stat(path, name, st, T_SYMLINK, size=len(target),
                                       target=target)
        except OSError as exc:
            raise from_oserror(exc, os.fsdecode(path)) from exc
        kind = hostfs.special_kind(mode)
        if self.skip_special:
            self.report.skipped.append(f"{os.fsdecode(path)} ({kind})")
            return None
        raise Unsupported(f"{os.fsdecode(path)}: cannot store a {kind} "
                          "(use --skip-special to leave it out)")

    def tree(self, fd: int, path: bytes, st: os.stat_result) -> Built:
        """Store open directory ``fd`` (at host ``path``, lstat() ``st``) and everything
        below it; ``hostfs.Changed`` when it changed meanwhile (it is then read again)."""
        try:
            # In name order: objects get their slots in the order a snapshot is listed (and
            # read back), and the files cache's keys (host paths) arrive nearly sorted, so
            # each batch appends to that table instead of rewriting leaves all over it.
            names = sorted(map(os.fsencode, os.listdir(fd)))
        except OSError as exc:
            raise from_oserror(exc, os.fsdecode(path)) from exc
        prefix = path.rstrip(b"/") + b"/"
        outer, outer_cached = self._sub, self._cached
        counted = (self.report.files, self.report.bytes, self.report.dirs,
                   self.report.symlinks, len(self.report.skipped))
        self._sub = []
        try:
            if self.use_cache:
                paths = [prefix + name for name in names]
                found = self.w.store.cached_files(paths)
                self._cached = {p: r for p, r in zip(paths, found, strict=True) if r is not None}
            entries = []
            for name in names:
                child = prefix + name
                hostfs.check_length(child)
                e = hostfs.retrying(
                    fd, name, child, hostfs.lstat(fd, name, child),
                    lambda st, name=name, child=child: self.entry(fd, name, child, st))
                if e is not None:
                    entries.append(e)
            hostfs.check_unchanged(fd, st)
            sub = self._sub
        except hostfs.Changed:  # read again: count it once
            r = self.report
            r.files, r.bytes, r.dirs, r.symlinks = counted[:4]
            del r.skipped[counted[4]:]
            raise
        finally:
            self._sub, self._cached = outer, outer_cached
        self.report.dirs += 1
        return put_tree(self.w, entries, sum(b for b, _ in sub), sum(f for _, f in sub))


def import_dir(store: Store, path: str | os.PathLike[str], *, skip_special: bool = False,
               progress: ProgressFn | None = None, parent: str | None = None,
               use_cache: bool = True) -> ImportReport:
    """Import a host directory as a snapshot (published atomically at the end)."""
    raw = os.fsencode(os.path.abspath(path))
    try:
        st = os.stat(raw)
    except OSError as exc:
        raise from_oserror(exc, os.fsdecode(raw)) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{os.fsdecode(raw)}: not a directory")
    refuse_holding(os.fsdecode(raw), store.path.resolve(), "the store")
    try:
        return _import(store, raw, skip_special, progress, parent, use_cache)
    except StaleCache:  # GC took a cached object meanwhile: read everything
        return _import(store, raw, skip_special, progress, parent, False)


def _import(store: Store, raw: bytes, skip_special: bool, progress: ProgressFn | None,
            parent: str | None, use_cache: bool) -> ImportReport:
    # Without the cache every file is read anyway: also verify (and heal) stored copies.
    with store.writer(heal=not use_cache) as w:
        imp = Importer(w, skip_special=skip_special, progress=progress, use_cache=use_cache)
        root = hostfs.at_root(raw, lambda fd, st: imp.tree(fd, raw, st).oid, follow=True)
        rec = store.publish(w, root, parent=parent, logical_bytes=imp.report.bytes,
                            files=imp.report.files)
    store.forget_files(raw.rstrip(b"/") + b"/", imp.seen)
    imp.report.root = rec.root
    return imp.report


# -- checkout -------------------------------------------------------------------------------


def checkout(reader: Reader, root: bytes, dest: str | os.PathLike[str]) -> int:
    """Rebuild a snapshot eagerly on disk at ``dest`` (new or empty dir); returns files."""
    out = os.fsencode(os.path.abspath(dest))
    try:
        made = not os.path.lexists(out)
        if made:
            os.mkdir(out, 0o755)  # as a snapshot's root is shown (the umask applies)
        elif os.path.islink(out) or not os.path.isdir(out):
            raise AlreadyExists(f"{os.fsdecode(out)}: destination exists and is not a "
                                "directory")
        elif os.listdir(out):
            raise AlreadyExists(f"{os.fsdecode(out)}: destination is not an empty directory")
    except OSError as exc:
        raise from_oserror(exc, f"checkout to {os.fsdecode(out)}") from exc
    try:
        # The root directory's own attributes are not stored (a snapshot is its contents).
        return _checkout_tree(reader, root, out)
    except BaseException as exc:
        # Leave the destination as it was (a retry then finds it empty, or not there).
        for name in os.listdir(out):
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        if isinstance(exc, OSError):
            raise from_oserror(exc, f"checkout to {os.fsdecode(out)}") from exc
        raise


def _checkout_tree(reader: Reader, tree_oid: bytes, dest: bytes) -> int:
    count = 0
    chown = os.geteuid() == 0
    for e in reader.tree(tree_oid).entries:
        path = dest + b"/" + e.name
        if e.is_dir:
            os.mkdir(path, 0o700)
            count += _checkout_tree(reader, e.ref, path)
        elif e.type == T_SYMLINK:
            os.symlink(e.target, path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_content(fd, reader.iter_content(e), e.size)
            finally:
                os.close(fd)
            count += 1
        if chown:
            os.lchown(path, e.uid, e.gid)
        if e.type != T_SYMLINK:
            os.chmod(path, e.mode)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    return count


HOLE_MIN = 4096  # a zero chunk at least this long is left a hole (a block or more)


def _write_content(fd: int, chunks: Iterable[bytes], size: int) -> None:
    """Write a file's chunks, leaving chunks of zeros as holes (as ``cp --sparse=auto``
    does): a sparse file checked out stays sparse. A zero run is stored as a chunk or two
    that dedup, so its cost shows only here."""
    sparse = False
    for data in chunks:
        if len(data) >= HOLE_MIN and data.count(0) == len(data):
            os.lseek(fd, len(data), os.SEEK_CUR)
            sparse = True
        else:
            _write_all(fd, data)
    if sparse:
        os.ftruncate(fd, size)  # a hole at the end


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- diff -----------------------------------------------------------------------------------


class Change(NamedTuple):
    status: str  # added | removed | modified | type-changed
    path: bytes


def _kind(e: Entry) -> str:
    return TYPE_NAMES[e.type]


def diff_trees(reader: Reader, a: bytes, b: bytes, prefix: bytes = b"") -> Iterator[Change]:
    """Changes from tree ``a`` to tree ``b``; subtrees with equal ids are never opened.

    A directory is reported ``modified`` for its own mode/owner changes, and for an mtime
    change only when nothing below it changed (an mtime follows the contents: the changes
    below say more; but two snapshots that differ must never diff as equal). Everything
    else compares all stored attributes.
    """
    if a == b:
        return
    ta, tb = reader.tree(a).entries, reader.tree(b).entries
    i = j = 0
    while i < len(ta) or j < len(tb):
        ea = ta[i] if i < len(ta) else None
        eb = tb[j] if j < len(tb) else None
        if eb is None or (ea is not None and ea.name < eb.name):
            yield Change("removed", prefix + ea.name)  # type: ignore[union-attr]
            i += 1
        elif ea is None or eb.name < ea.name:
            yield Change("added", prefix + eb.name)
            j += 1
        else:
            path = prefix + ea.name
            if _kind(ea) != _kind(eb):
                yield Change("type-changed", path)
            elif ea.is_dir:
                below = list(diff_trees(reader, ea.ref, eb.ref, path + b"/"))
                if (ea.mode, ea.uid, ea.gid) != (eb.mode, eb.uid, eb.gid) or (
                        not below and ea.mtime_ns != eb.mtime_ns):
                    yield Change("modified", path)
                yield from below
            elif ea[1:] != eb[1:]:
                yield Change("modified", path)
            i += 1
            j += 1


# -- helpers for callers ----------------------------------------------------------------------


def refuse_holding(path: str, served: Path, what: str) -> None:
    """Refuse to import ``path`` when it is ``served`` (the store, a mount of it), lies in
    it, or holds it: the walk would read the store's own files while they change (and a
    mount's snapshots, all of them)."""
    here = Path(path).resolve()
    if here == served or served in here.parents:
        raise InvalidArgument(f"cannot import from inside {what} itself: {path}")
    if here in served.parents:
        raise InvalidArgument(f"cannot import {path}: it holds {what} ({served}); import "
                              "a directory beside it")


def host_path_ok(path: str) -> Path:
    """Validate an import path given by a user: absolute, existing directory."""
    if not path or not os.path.isabs(path):
        raise InvalidArgument(f"import path must be absolute: {path!r}")
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:  # a name longer than NAME_MAX, a parent we may not search...
        raise from_oserror(exc, f"import path {path!r}") from exc
    if not exists:
        raise NotFound(f"{path}: no such directory")
    if not is_dir:
        raise InvalidArgument(f"{path}: not a directory")
    return p



# -- commit: apply an overlay upper dir ------------------------------------------------------


class UpperEntry(Protocol):
    """What the differ needs from overlay.py's classification of an upper-dir entry."""

    name: bytes
    path: bytes
    st: os.stat_result
    kind: str  # whiteout | dir | file | symlink (by its mode: see UpperLayer.marks)


class UpperLayer(Protocol):
    """How overlayfs records changes in an upper dir (overlay.py knows; this module reads)."""

    def scan(self, fd: int, path: bytes) -> Iterable[UpperEntry]:
        """The entries of open upper directory ``fd`` (at ``path``), classified by mode."""

    def item(self, name: bytes, path: bytes, st: os.stat_result) -> UpperEntry:
        """Entry ``name`` classified by mode again, after it changed (a fresh lstat)."""

    def marks(self, fd: int, item: UpperEntry, xattrs: list[bytes]) -> str:
        """The kind of an opened dir or file given overlayfs' marks on it (among its
        extended attributes ``xattrs``): opaque-dir, whiteout (a file that is one), else
        ``item.kind``."""


def apply_upper(reader: Reader, w: Writer, base: bytes | None, upper: bytes,
                layer: UpperLayer) -> Built:
    """New tree = tree ``base`` (None: empty) with the changes recorded in ``upper`` applied.

    A pure function of (parent tree, upper dir): unchanged entries are reused as they are
    (their objects are pinned by the node's base snapshot), only directories on changed
    paths are re-encoded (of a large directory, only the parts holding a changed name), and
    totals are kept by difference (the cost of a commit follows the size of the change,
    never the size of the tree). The caller keeps ``base`` pinned while ``w`` is open (a
    node pins its base snapshot), so the entries it carries over are vouched for. The
    upper dir is read by descriptors (``hostfs``): what runs in the node cannot make the
    commit follow a symlink out of it, nor store a file it is rewriting meanwhile.
    """
    return hostfs.at_root(upper, lambda fd, st: _apply(reader, w, base, fd, upper, st, layer),
                          follow=False)


def _apply(reader: Reader, w: Writer, base: bytes | None, fd: int, path: bytes,
           st: os.stat_result, layer: UpperLayer) -> Built:
    lower = reader.tree(base) if base is not None else None
    tally = lower.tally.copy() if lower is not None else Tally()
    count = tally.count
    changes: dict[bytes, Entry | None] = {}
    n = lower.size if lower is not None else 0  # entries of the new version
    for item in layer.scan(fd, path):
        name = item.name
        low = lower.get(name) if lower is not None else None
        if low is not None:
            n -= 1
            if low.type == T_DIR:
                t = reader.tree(low.ref)
                count(low, -1, (t.total_bytes, t.total_files))
            else:
                count(low, -1)
        try:
            e, below = _upper_entry(reader, w, low, fd, item, layer)
        except hostfs.Changed:  # looked at again (a fresh lstat), a few times at most
            e, below = hostfs.retrying(
                fd, name, item.path, hostfs.lstat(fd, name, item.path),
                lambda st, item=item, low=low: _upper_entry(  # type: ignore[misc]
                    reader, w, low, fd, layer.item(item.name, item.path, st), layer),
                tries=hostfs.TRIES - 1)
        changes[name] = e
        if e is not None:
            n += 1
            count(e, 1, below)
    hostfs.check_unchanged(fd, st)  # no name created, removed or renamed meanwhile
    return put_changes(w, lower, changes, tally, reader, base, n)


def _upper_entry(reader: Reader, w: Writer, low: Entry | None, fd: int, item: UpperEntry,
                 layer: UpperLayer) -> tuple[Entry | None, tuple[int, int]]:
    """The new entry for one upper-dir name (None: a whiteout) and the totals below it."""
    name, path, st, kind = item.name, item.path, item.st, item.kind
    try:
        if kind == "whiteout":
            return None, (0, 0)
        if kind == "symlink":
            target = read_link(fd, name, path)
            return entry_from_stat(path, name, st, T_SYMLINK, size=len(target),
                                   target=target), (0, 0)
        if kind == "dir":
            sub = hostfs.open_dir(fd, name, st)
            try:
                xattrs = hostfs.xattr_names(sub)  # most carry none: no further test
                opaque = bool(xattrs) and layer.marks(sub, item, xattrs) == "opaque-dir"
                mode = hostfs.access_mode(sub, st, xattrs) if xattrs else None
                below = low.ref if not opaque and low is not None and low.type == T_DIR else None
                built = _apply(reader, w, below, sub, path, st, layer)
            finally:
                os.close(sub)
            return (entry_from_stat(path, name, st, T_DIR, built.oid, built.entries, mode=mode),
                    (built.bytes, built.files))
        if kind == "file":
            f = hostfs.open_file(fd, name, st)
            try:
                xattrs = hostfs.xattr_names(f)
                if xattrs and layer.marks(f, item, xattrs) == "whiteout":
                    return None, (0, 0)
                mode = hostfs.access_mode(f, st, xattrs) if xattrs else None
                etype, ref, size = store_file(w, f, st.st_size)
                hostfs.check_unchanged(f, st)
            finally:
                os.close(f)
            return entry_from_stat(path, name, st, etype, ref, size, mode=mode), (0, 0)
    except OSError as exc:
        raise from_oserror(exc, os.fsdecode(path)) from exc
    raise Unsupported(f"{os.fsdecode(path)}: unknown upper entry {kind}")
