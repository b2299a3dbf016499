"""Content-addressed object store on one LMDB environment.

Why LMDB: one file, crash-safe copy-on-write transactions, readers never block, many
processes (daemon + offline CLI) can share it. Every durable fact lives here, and every
fact that must change together changes in one write transaction.

Named databases:
  slots      oid -> 8-byte big-endian slot, given in creation order
  fresh      u64 sequence -> first slot + the oids of a commit's new objects (their slots
             follow in that order): the ones not yet in ``slots`` (see below)
  data       slot -> kind byte + payload; oid = blake3(payload), verified on every read
  counts     slot -> u64 count of references from other objects and snapshot records
  zero       oid -> u64 generation at which the object became (or was found) unreferenced;
             the sweeper's work list, so GC never scans the whole store
  pending    u64 sequence -> reference increments logged by the transaction that wrote
             their parents, applied in bulk by the sweeper: concatenated child oids (+1
             each), or b"P" + concatenated parent oids (+1 for every child of each)
  snapshots  root oid -> JSON record {refs, pins, parent, time, bytes, files}
  nodes      node name -> JSON record (owned by state.py, stored here for atomicity)
  files      host path -> what an import last read there (tree.py's files cache)
  sessions   u64 session id -> JSON {pid, gen}: in-flight imports/commits
  meta       counters: gen, objects, stored_bytes, slot, pseq, fseq, sweeps; the layout's format

GC safety: a new object starts at count 0 and is listed in ``zero`` with the current
generation. The sweeper deletes a zero-count object only if it became unreferenced before
the oldest in-flight session began, so objects an unpublished commit has written (or found
and reused) are never swept. Publishing a snapshot and ending its session happen in the
same transaction as the last object writes. Sessions of dead processes are discarded.

Why the increment log: re-encoding a directory of N entries adds N edges, and bumping N
counts spread over random B-tree pages made every commit write megabytes. The publishing
transaction instead appends the increments to ``pending`` (sequential pages); the
reference state is ``counts`` + ``pending``, changed atomically, and a sweep decides every
deletion on that sum (the sweeper keeps the log summed in memory: ``_LogSum``). It applies
only older records: a commit pruned while its record is logged is cancelled against it,
without a count written (``_sweep_batch``), and in a search loop that is most commits. A commit
logs its new directories themselves (a parent record, 32 bytes per directory) rather than
their children (32 bytes per entry): on a tree of big directories the children made the
log the biggest write of a commit, and listing them its biggest loop; the sweeper decodes
the parents when it applies the record.

Why data and counts are keyed by slot, not by id: ids are random, so every new object
landed on its own B-tree page and the counts of one directory's children sat on as many
pages as there are children; in a large store a commit, drain or sweep wrote a page per
object or count. Slots follow creation order: a commit's new objects are appended to the
last pages, and objects created together (a directory's files, an import's subtree) are
referenced together, so a drain rewrites a few pages of ``counts``, not hundreds. Only
``slots`` is random (one page per new object); reads pay one extra B-tree lookup.

Why the fresh index: ids are random, so each new object's ``slots`` record lands on a
leaf page of its own, and on a large store those pages were most of what a commit wrote
(a kernel-tree commit: ~29 objects dirtied ~40 of its ~60 pages, each a scattered write
the fsync waits for). A small batch (a commit) appends its ids as one ``fresh`` record
instead, and the sweeper merges the records into ``slots`` in bulk, where many share a leaf.
A lookup tries ``slots``, then the fresh records, which every process keeps decoded
(``_FreshIndex``). A sweep deletes a fresh object where it is (its data and count); an
entry whose count is gone is dead, lookups pass over it and the merge leaves it out. In a
search loop most commits are pruned soon after, so most of their ids are never inserted
into ``slots`` at all (a sweep leaves the newest records unmerged). A large import's
batches are indexed so too, and merged in one pass when it publishes: random inserts batch
after batch rewrote most of ``slots`` each time, and the scattered pages that freed made
every later commit's writes scattered too.

Children of TREE and LIST objects are needed to adjust counts; the codec lives in tree.py
and is injected as ``children_of`` so this module knows nothing about tree layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import lmdb

from .errors import (
    Busy,
    Corrupt,
    InvalidArgument,
    NoSpace,
    NotFound,
    OppieError,
    PermissionDenied,
    Unsupported,
)

KIND_CHUNK = b"C"
KIND_LIST = b"L"
KIND_TREE = b"T"
KINDS = (KIND_CHUNK, KIND_LIST, KIND_TREE)

log = logging.getLogger("oppiefs.store")

ChildrenOf = Callable[[bytes, bytes], Iterable[bytes]]
# oid -> kind, payload, refs, deferred: ``refs`` are the object's children (None: decode
# them), or when ``deferred`` only those that may be new (the drain counts all of them).
Batch = dict[bytes, tuple[bytes, bytes, "Iterable[bytes] | None", bool]]
_PARENTS = b"P"  # starts a ``pending`` record of parent oids (one of child oids is 32 * n)

_U64 = struct.Struct("<Q")
# The layout this code reads and writes, kept in meta ``format`` (absent: older layouts,
# which open() migrates). 1: objects keyed by slot; 2: and the fresh records; 3: and the
# listed snapshots' count and bytes kept in meta (``status`` read every record before).
FORMAT = 3
# A published batch with more new objects than this indexes them in ``slots`` at once (the
# last of an import; the earlier ones wait in fresh records: see Writer). Fresh records are
# for the few objects of a commit, and every process holds them decoded.
FRESH_BATCH_MAX = 256
FRESH_MERGE = 256  # fresh records at which a sweep merges them (a few seconds of commits)
# Fresh records a sweep leaves unmerged, newest first. Most of a search loop's commits are
# pruned within a few iterations: their ids then go from their record, never having been
# inserted into ``slots`` (a random leaf each on a large store) and deleted from it again.
# Those leaf writes were most of what a kernel-tree sweep wrote, and the pages they freed,
# scattered over the whole file, were where every later commit's pages went: a separate
# write for the fsync to wait for, each (see bench/RESULTS.md).
FRESH_KEEP = 128
FRESH_MAX = 1024  # fresh records a commit may find before it merges some itself
# Ids a writer's batches may leave in fresh records until it publishes (see Writer): an
# import's whole index merged in one sorted pass, with every process holding the ids
# decoded meanwhile (~220 B each).
FRESH_DEFER_MAX = 1 << 17
# Records merged per transaction: a merge holds the write lock, and a commit waiting for it
# waits for every random insert it makes (256 records at once stalled a commit 180 ms).
FRESH_MERGE_CHUNK = 16
# Logged increments applied per transaction, by a drain of a log longer than SWEEP_LOG_MAX
# or by a sweep applying its older records (summed per object first; about two kernel-tree
# commits): either holds up a commit for a few milliseconds at most. Under sustained load
# the daemon paces the sweeper (state.py), so the log cannot grow without bound.
DRAIN_LIMIT = 4096
# Parent records a sweep leaves in the log, newest first: a commit pruned while its record
# is there costs no count writes (its deletion cancels the record: see _sweep_batch), and in
# a search loop most commits are pruned within a few iterations. Older records are applied.
LOG_KEEP = 128
# A log longer than this (the sweeper was held up) is drained in bounded transactions
# before a sweep: it bounds what the sweeper holds summed in memory (``_LogSum``).
SWEEP_LOG_MAX = 1024
# Children the sweeper keeps read ahead, at most (~70 B each): the first queued objects and
# the parents of a log of LOG_KEEP kernel-tree commits (~1,800 each) fit.
REFS_ITEMS = 1 << 19
COUNTED_MAX = 1 << 19  # objects the sweeper remembers as counted, at most (~30 B each)
_INITIAL_MAP = 1 << 40  # address space only: LMDB files grow with use, not with map size
_DBS = ("slots", "fresh", "data", "counts", "zero", "pending", "snapshots", "nodes",
        "sessions", "files", "meta",
        "objects", "refs")  # oid -> object and oid -> count: older layouts, migrated on open


_WILLNEED_MIN = 16 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
except (OSError, AttributeError):  # pragma: no cover - not glibc/CPython: no hint
    _madvise = None


def _willneed(view: memoryview) -> None:
    """Ask the kernel to read a mapped range in one go (a hint: errors are ignored)."""
    if _madvise is None:
        return
    pb = _PyBuffer()
    if _get_buffer(view, ctypes.byref(pb), 0) != 0:
        return
    try:
        start = pb.buf & ~(_PAGE - 1)
        _madvise(start, pb.buf + pb.len - start, _MADV_WILLNEED)
    finally:
        _release_buffer(ctypes.byref(pb))


def oid_of(payload: bytes | memoryview) -> bytes:
    return blake3.blake3(payload).digest()


FILES_KEY_MAX = 511  # LMDB's key size limit, which host paths may exceed
FILES_KEY_HEAD = FILES_KEY_MAX - 1 - 32  # bytes of a longer path kept at its key's front


def files_key(path: bytes) -> bytes:
    """The files-cache key of a host path: the path itself up to LMDB's key limit; past it
    (deep trees, long names), the path's first ``FILES_KEY_HEAD`` bytes, a NUL (which no
    path holds) and the blake3 hash of the whole path. Keys stay sorted by path head, so
    ``forget_files`` still finds them under an import's root."""
    if len(path) <= FILES_KEY_MAX:
        return path
    return path[:FILES_KEY_HEAD] + b"\0" + oid_of(path)


def default_store_dir() -> Path:
    env = os.environ.get("OPPIEFS_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/oppiefs")
    return Path.home() / ".local/share/oppiefs"


def _no_children(kind: bytes, payload: bytes) -> Iterable[bytes]:
    if kind != KIND_CHUNK:
        raise Corrupt(f"no codec for object kind {kind!r}")
    return ()


@dataclass
class SnapshotRecord:
    """One published snapshot: listed while refs > 0, kept alive while refs or pins > 0."""

    root: bytes
    refs: int
    pins: int
    parent: str | None
    time: float
    bytes: int
    files: int

    @property
    def id(self) -> str:
        return self.root.hex()

    @property
    def listed(self) -> bool:
        return self.refs > 0

    def encode(self) -> bytes:
        d = {k: v for k, v in self.__dict__.items() if k != "root"}
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, root: bytes, raw: bytes) -> SnapshotRecord:
        return cls(root=root, **json.loads(raw))


@dataclass
class StoreStats:
    objects: int
    stored_bytes: int
    snapshots: int
    logical_bytes: int
    nodes: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _lmdb_error(exc: lmdb.Error, what: str) -> OppieError:
    text = str(exc)
    if "No space left" in text or "MDB_MAP_FULL" in text:
        return NoSpace(f"{what}: no space left on the store's device")
    if "Permission denied" in text:
        return PermissionDenied(f"{what}: permission denied")
    if "MDB_CORRUPTED" in text or "MDB_PAGE_NOTFOUND" in text or "MDB_INVALID" in text:
        return Corrupt(f"{what}: LMDB reports corruption ({text})")
    return OppieError(f"{what}: {text}")


class StaleCache(OppieError):
    """An object named by the files cache was collected meanwhile: read the file again."""


USE_LOCK = "store.lock"  # flock: shared while a Store is open, exclusive while compacting


def lock_file(path: Path, *, exclusive: bool, busy: str) -> int:
    """Take a flock on ``path`` (created if needed) without waiting; Busy(``busy``) if
    another holder conflicts. Returns the descriptor: closing it releases the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(busy) from None
    return fd


def _lock_use(path: Path, *, exclusive: bool) -> int:
    if exclusive:
        busy = f"store {path} is in use (a mounted daemon or another oppiefs command has it open)"
    else:
        busy = f"store {path} is being compacted; try again when that ends"
    return lock_file(path / USE_LOCK, exclusive=exclusive, busy=busy)


def compact(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Rewrite the store file without its free pages; returns (bytes before, after).

    LMDB reuses the pages GC frees but never gives them back to the file system, so after
    a large prune the file stays at its peak size. This copies the live pages into a new
    file (``mdb_env_copy2`` with compaction) and renames it over the old one, so a crash
    leaves one of the two whole. It needs the store to itself: every Store holds a shared
    lock, so a mounted daemon or a running command makes this fail with Busy.
    """
    path = Path(path)
    data = path / "data.mdb"
    if not data.exists():
        raise NotFound(f"no store at {path}")
    tmp = path / "compact.tmp"
    try:
        fd = _lock_use(path, exclusive=True)
    except PermissionError as exc:
        raise PermissionDenied(f"store {path}: permission denied") from exc
    try:
        before = data.stat().st_size
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        env = lmdb.open(str(path), map_size=_INITIAL_MAP, max_dbs=len(_DBS), create=False)
        try:
            env.copy(str(tmp), compact=True)
        finally:
            env.close()
        copy_fd = os.open(tmp / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(copy_fd)
        finally:
            os.close(copy_fd)
        os.replace(tmp / "data.mdb", data)
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return before, data.stat().st_size
    except lmdb.Error as exc:
        raise _lmdb_error(exc, f"compact {path}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"compact {path}: no space left for the copy") from exc
        raise OppieError(f"compact {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


class _FreshIndex:
    """This process's decoded copy of the ``fresh`` records: oid -> (slot, record key).

    A record does not change from the append that makes it to the merge that deletes it,
    and keys are never reused, so a copy loaded in one transaction holds for every other
    that still has the record. A transaction sees a contiguous run of records [first,
    last]; the copy is extended to cover it (only with committed records: a write
    transaction's own appends may still be rolled back), and then a hit is trusted when its
    record lies in that run. The map keeps each id's newest record; when that is newer than
    the transaction (an old reader, after a merge, a sweep and the id stored again), the
    transaction's own records are read instead. Whether the object is still alive is for
    the caller to check.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lo, self.hi = 0, -1  # keys of the records held (none when hi < lo)
        self.records: dict[int, list[bytes]] = {}
        self.map: dict[bytes, tuple[bytes, int]] = {}

    def lookup(self, txn: lmdb.Transaction, db: Any, first: int, last: int,
               oid: bytes) -> bytes | None:
        """Slot of ``oid`` among records first..last of ``txn`` (all committed)."""
        with self.lock:
            if last < self.lo or first > self.hi:
                self.records.clear()
                self.map.clear()
                self.lo, self.hi = first, first - 1
            elif first > self.lo:
                self._forget_below(first)
            if first < self.lo:
                self._load(txn, db, first, self.lo - 1)
                self.lo = first
            if last > self.hi:
                self._load(txn, db, self.hi + 1, last)
                self.hi = last
            hit = self.map.get(oid)
        if hit is None or hit[1] < first:
            return None
        if hit[1] <= last:
            return hit[0]
        found = None
        for o, s in _fresh_pairs(txn, db, first, last):
            if o == oid:
                found = s  # the newest copy is the only one that may be alive
        return found

    def _forget_below(self, first: int) -> None:
        """Drop records merged away (a reader that still has them loads them again)."""
        for key in range(self.lo, first):
            for oid in self.records.pop(key, ()):
                if self.map.get(oid, (b"", -1))[1] == key:
                    del self.map[oid]
        self.lo = first

    def _load(self, txn: lmdb.Transaction, db: Any, start: int, end: int) -> None:
        for key, slot0, oids in _fresh_records(txn, db, start, end):
            self.records[key] = oids
            for j, oid in enumerate(oids):
                if self.map.get(oid, (b"", -1))[1] < key:
                    self.map[oid] = ((slot0 + j).to_bytes(8, "big"), key)


def _fresh_records(txn: lmdb.Transaction, db: Any, start: int,
                   end: int) -> Iterator[tuple[int, int, list[bytes]]]:
    """(key, first slot, oids) of the fresh records start..end (inclusive)."""
    cur = txn.cursor(db=db)
    if not cur.set_range(start.to_bytes(8, "big")):
        return
    for raw_key, raw in cur:
        key = int.from_bytes(raw_key, "big")
        if key > end:
            return
        raw = bytes(raw)  # a buffer in a ``buffers=True`` transaction: ids outlive it
        if len(raw) < 40 or (len(raw) - 8) % 32:
            raise Corrupt(f"unreadable fresh index record {key}")
        yield key, int.from_bytes(raw[:8], "big"), [raw[i:i + 32] for i in range(8, len(raw), 32)]


def _fresh_pairs(txn: lmdb.Transaction, db: Any, start: int = 0,
                 end: int = 1 << 64) -> Iterator[tuple[bytes, bytes]]:
    """(oid, slot) of every object in the fresh records start..end."""
    for _, slot0, oids in _fresh_records(txn, db, start, end):
        for j, oid in enumerate(oids):
            yield oid, (slot0 + j).to_bytes(8, "big")


class _LogSum:
    """The increment log summed per child, kept from one sweep transaction to the next.

    A sweep decides deletions on true counts (applied count + logged increments), so it
    needs the whole log summed, and a kernel-tree commit logs ~1,800 increments: summing the
    log again in every transaction cost more than the sweeping. The sum changes only in
    ``sync``, which brings it up to date from the records themselves (new, rewritten and
    vanished ones), so a record another process applied or cancelled is noticed, and a
    transaction that rolls back leaves nothing to undo.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # key -> (raw record, its parents (none: a record of child ids), each one's refs)
        self.records: dict[bytes, tuple[bytes, list[bytes], list[list[bytes]]]] = {}
        self.delta: dict[bytes, int] = {}  # child -> increments logged for it
        # A logged parent -> its record's key and its children.
        self.parent_of: dict[bytes, tuple[bytes, list[bytes]]] = {}

    def sync(self, store: Store, txn: lmdb.Transaction) -> None:
        seen = set()
        for key, raw in txn.cursor(db=store.db["pending"]):
            seen.add(key)
            held = self.records.get(key)
            if held is not None and held[0] == raw:
                continue
            if held is not None:
                self._drop(key)
            parents, refs = store._record_refs(txn, key, raw)
            self.records[key] = (raw, parents, refs)
            if parents:
                for parent, children in zip(parents, refs, strict=True):
                    self.parent_of[parent] = (key, children)
            for children in refs:
                for child in children:
                    self.delta[child] = self.delta.get(child, 0) + 1
        for key in [key for key in self.records if key not in seen]:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        _, parents, refs = self.records.pop(key)
        for parent in parents:
            if self.parent_of.get(parent, (None,))[0] == key:
                del self.parent_of[parent]
        delta = self.delta
        for children in refs:
            for child in children:
                left = delta[child] - 1
                if left:
                    delta[child] = left
                else:
                    del delta[child]


class Store:
    """The object store. Thread-safe: LMDB serializes writers, readers use short txns."""

    def __init__(self, path: str | os.PathLike[str], *, children_of: ChildrenOf = _no_children,
                 create: bool = True) -> None:
        self.path = Path(path)
        self.children_of = children_of
        self._grow_lock = threading.Lock()
        self._use_fd: int | None = None
        self._fresh = _FreshIndex()
        # Children of objects the sweeper will count or delete (see _parent_refs).
        self._refs: dict[bytes, list[bytes]] = {}
        self._refs_items = 0
        self._logsum = _LogSum()
        # How long the last write transaction held the write lock, its commit included
        # (what kept every other writer waiting: the sweeper's pacing rests in proportion).
        self.held_s = 0.0
        # Objects this process's sweeper saw counted (applied count >= 1), so that it need
        # not look up every child of what it deletes: see _sweep_locked.
        self._counted: set[bytes] = set()
        self._counted_epoch = -1  # meta ``sweeps`` when it was last right
        # The write transaction in progress (LMDB allows one per environment) and the
        # fresh records it appended: they are not committed, so never in ``_fresh``.
        self._wtxn: lmdb.Transaction | None = None
        self._own: dict[bytes, bytes] = {}
        self._own_from: int | None = None
        try:
            if create:
                self.path.mkdir(parents=True, exist_ok=True)
            elif not (self.path / "data.mdb").exists():
                raise NotFound(f"no store at {self.path}")
            self._use_fd = _lock_use(self.path, exclusive=False)
            self.env = lmdb.open(
                str(self.path), map_size=_INITIAL_MAP, max_dbs=len(_DBS), max_readers=1024,
                readahead=True, sync=True, metasync=True, create=create,
            )
        except (OSError, lmdb.Error) as exc:
            if self._use_fd is not None:
                os.close(self._use_fd)
            if isinstance(exc, PermissionError):
                raise PermissionDenied(f"store {self.path}: permission denied") from exc
            if isinstance(exc, FileNotFoundError):
                raise NotFound(f"no store at {self.path}") from exc
            if isinstance(exc, lmdb.Error):
                raise _lmdb_error(exc, f"store {self.path}") from exc
            raise OppieError(f"store {self.path}: {exc.strerror or exc}") from exc
        self.db = {name: self.env.open_db(name.encode()) for name in _DBS}
        try:
            self._check_format()
        except BaseException:
            self.close()
            raise

    def _check_format(self) -> None:
        """Refuse a store of a newer format (an older oppiefs would misread it: one that
        knows no fresh records reads a commit's objects as missing); bring an older one up
        to date and mark it."""
        with self.env.begin() as txn:
            found = self._meta_int(txn, b"format")
        if found > FORMAT:
            raise Unsupported(f"store {self.path} has format {found}, from a newer oppiefs; "
                              f"this one reads formats up to {FORMAT}: upgrade oppiefs")
        self._migrate()
        if found < FORMAT:
            def mark(txn: lmdb.Transaction) -> None:
                if found < 3:
                    self._set_listed(txn, self._count_listed(txn))
                self._set_meta_int(txn, b"format", FORMAT)

            self.write(mark, "mark format")

    def _migrate(self) -> None:
        """Move a store of an older layout (objects keyed by id; counts keyed by id) to
        slots, in one transaction."""
        with self.env.begin() as txn:
            if not txn.stat(self.db["objects"])["entries"]:
                return

        def fn(txn: lmdb.Transaction) -> None:
            old_counts = self.db["refs"]
            for oid, raw in txn.cursor(db=self.db["objects"]):
                slot = txn.get(oid, db=self.db["slots"])
                if slot is None:
                    count = txn.get(oid, db=old_counts)
                    slot = self._new_slot(txn, oid, _U64.unpack(count)[0] if count else 0)
                txn.put(slot, raw, db=self.db["data"])
            txn.drop(self.db["objects"], delete=False)
            txn.drop(old_counts, delete=False)

        log.info("migrating store %s to slot-keyed objects", self.path)
        self.write(fn, "migrate store layout")

    def close(self) -> None:
        self.env.close()
        if self._use_fd is not None:
            os.close(self._use_fd)
            self._use_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------

    def write(self, fn: Callable[[lmdb.Transaction], Any], what: str = "store write") -> Any:
        """Run ``fn`` in one write transaction; grows the map and retries when it is full.

        ``fn`` must have no side effects outside the transaction, since it may run twice.
        """
        while True:
            try:
                return self._write_once(fn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                if "Input/output error" in str(exc) and self._device_full():
                    # LMDB turns a write cut short by a full disk into EIO ("short write").
                    raise NoSpace(f"{what}: no space left on the store's device") from exc
                raise _lmdb_error(exc, what) from exc
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"{what}: no space left on the store's device") from exc
                raise

    def _write_once(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        start = 0.0
        try:
            with self.env.begin(write=True) as txn:
                start = time.perf_counter()
                self._wtxn, self._own, self._own_from = txn, {}, None
                try:
                    return fn(txn)
                finally:
                    self._wtxn, self._own, self._own_from = None, {}, None
        finally:
            if start:
                self.held_s = time.perf_counter() - start

    def _device_full(self) -> bool:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < (1 << 20)

    def read(self) -> lmdb.Transaction:
        return self.env.begin(buffers=False)

    def _grow(self) -> None:
        with self._grow_lock:
            self.env.set_mapsize(self.env.info()["map_size"] * 2)

    # -- objects ------------------------------------------------------------------------

    def get(self, oid: bytes) -> tuple[bytes, bytes]:
        """Return (kind, payload), verified against the id; Corrupt if missing or bad.

        The value is copied once, straight out of the map. The map keeps the kernel's
        readahead: objects sit in creation order, so a snapshot's files lie together and a
        cold ``tar`` of the kernel tree takes 1.4x native instead of 4.1x (a cold 256 MiB
        read 436 instead of 67 MiB/s); the kernel stops reading around faults that keep
        missing, so random lookups do not pay for it. A large value is also announced with
        MADV_WILLNEED, which reads it in one request.
        """
        with self.env.begin(buffers=True) as txn:
            slot = self._slot(txn, oid)
            view = None if slot is None else txn.get(slot, db=self.db["data"])
            if view is None:
                raise Corrupt(f"object {oid.hex()} is missing from the store")
            if len(view) >= _WILLNEED_MIN:
                _willneed(view)
            kind, payload = bytes(view[:1]), bytes(view[1:])
        if oid_of(payload) != oid or kind not in KINDS:
            raise Corrupt(f"object {oid.hex()} is corrupt (hash mismatch)")
        return kind, payload

    def get_payload(self, oid: bytes) -> bytes:
        return self.get(oid)[1]

    def unmap_cached(self) -> None:
        """Drop this process's mappings of the store file (the data stays in page cache).

        Pages read through the map stay mapped, so they count in the process's RSS and
        ``drop_caches`` cannot evict them; after the kernel forgot most of what it read, the
        daemon lets go of them too. Safe under live readers: the map is read-only, a later
        access faults the page back in.
        """
        if _madvise is None:
            return
        target = str(self.path.resolve() / "data.mdb")
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    _madvise(lo, hi - lo, _MADV_DONTNEED)

    def cached_files(self, paths: list[bytes]) -> list[bytes | None]:
        """Files-cache records for these host paths (one short read transaction)."""
        with self.env.begin() as txn:
            return [txn.get(files_key(p), db=self.db["files"]) for p in paths]

    def forget_files(self, prefix: bytes, keep: Collection[bytes]) -> int:
        """Drop files-cache records under ``prefix`` (a directory path ending in '/') except
        ``keep``: an import calls it with the files it saw, so records of deleted files do
        not pile up. Returns how many went."""
        files = self.db["files"]
        kept_long = {files_key(p) for p in keep if len(p) > FILES_KEY_MAX}
        # A key made from a long path holds only its head: under a prefix longer than that
        # head such a key cannot be placed, and is left (a stale record costs a lookup).
        head = prefix[:FILES_KEY_HEAD]
        with self.env.begin() as txn:
            cur = txn.cursor(db=files)
            stale = []
            if cur.set_range(head):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(head):
                        break
                    if b"\0" in key:  # a long path's
                        if len(prefix) <= FILES_KEY_HEAD and key not in kept_long:
                            stale.append(key)
                    elif key.startswith(prefix) and key not in keep:
                        stale.append(key)
        if stale:
            self.write(lambda txn: [txn.delete(k, db=files) for k in stale],
                       "prune files cache")
        return len(stale)

    def last_change(self) -> int:
        """Id of the last committed transaction: moves whenever anything was written."""
        return self.env.info()["last_txnid"]

    def exists(self, oid: bytes) -> bool:
        with self.env.begin() as txn:
            return self._slot(txn, oid) is not None

    def refcount(self, oid: bytes) -> int:
        """Current count, including increments logged but not yet applied."""
        with self.env.begin() as txn:
            slot = self._slot(txn, oid)
            count = self._count_at(txn, slot) if slot is not None else 0
            logged = sum(child == oid for _, children in self._logged(txn)
                         for child in children)
        return count + logged

    # -- the id index: ``slots`` and the fresh records ---------------------------------------

    def _slot(self, txn: lmdb.Transaction, oid: bytes) -> bytes | None:
        """The slot of a stored object, or None."""
        slot = txn.get(oid, db=self.db["slots"])
        if slot is not None:
            return slot
        slot = self._fresh_slot(txn, oid)
        if slot is None or txn.get(slot, db=self.db["counts"]) is None:
            return None  # not fresh, or swept (a dead entry)
        return slot

    def _fresh_slot(self, txn: lmdb.Transaction, oid: bytes) -> bytes | None:
        if txn is self._wtxn and oid in self._own:
            return self._own[oid]
        cur = txn.cursor(db=self.db["fresh"])
        if not cur.first():
            return None
        first = int.from_bytes(cur.key(), "big")
        if txn is self._wtxn and self._own_from is not None:
            last = self._own_from - 1  # the rest are this transaction's own
            if last < first:
                return None
        else:
            cur.last()
            last = int.from_bytes(cur.key(), "big")
        return self._fresh.lookup(txn, self.db["fresh"], first, last, oid)

    def _append_fresh(self, txn: lmdb.Transaction, first_slot: int, oids: list[bytes]) -> int:
        """Index a batch's new objects (slots ``first_slot``... in order) as one record;
        returns its key."""
        seq = self._append_seq(txn, "fresh", b"fseq",
                               first_slot.to_bytes(8, "big") + b"".join(oids))
        if self._own_from is None:
            self._own_from = seq
        for j, oid in enumerate(oids):
            self._own[oid] = (first_slot + j).to_bytes(8, "big")
        return seq

    def _merge_fresh(self, txn: lmdb.Transaction, records: int | None = None,
                     keys: Collection[int] = ()) -> int:
        """Move the live entries of the oldest ``records`` fresh records (None: all), or of
        the records ``keys`` (a writer's own), into ``slots``, in id order (neighbours
        share leaves); returns how many moved. An id has at most one live entry (it is
        stored again only once swept), so records can go in any number, and in any order:
        a lookup tries ``slots`` first, and a record merged from between others leaves a
        gap that readers pass over."""
        fresh, counts, slots = self.db["fresh"], self.db["counts"], self.db["slots"]
        if keys:
            spans = [(key, key) for key in sorted(keys)]
        else:
            cur = txn.cursor(db=fresh)
            if not cur.first():
                return 0
            first = int.from_bytes(cur.key(), "big")
            spans = [(first, first + records - 1 if records is not None else 1 << 64)]
        live = sorted((oid, slot) for start, end in spans
                      for oid, slot in _fresh_pairs(txn, fresh, start, end)
                      if txn.get(slot, db=counts) is not None)
        for oid, slot in live:
            txn.put(oid, slot, db=slots)
        if records is None and not keys:
            txn.drop(fresh, delete=False)
            self._own.clear()
            self._own_from = None
        else:
            for start, end in spans:
                for key in range(start, end + 1):  # a gap's delete finds nothing
                    txn.delete(key.to_bytes(8, "big"), db=fresh)
        return len(live)

    def fresh_records(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.db["fresh"])["entries"])

    def merge_fresh(self, at_least: int = 1,
                    between: Callable[[], object] | None = None, keep: int = 0) -> int:
        """Merge the fresh records there are now, but for the newest ``keep``, into
        ``slots`` if there are ``at_least`` of them, in transactions of
        ``FRESH_MERGE_CHUNK`` records (``between`` runs between two); returns how many ids
        moved."""
        todo = self.fresh_records()
        if todo < max(at_least, 1):
            return 0
        todo -= keep
        moved = 0
        while todo > 0:
            chunk = min(todo, FRESH_MERGE_CHUNK)
            moved += self.write(functools.partial(self._merge_fresh, records=chunk),
                                "merge fresh index")
            todo -= chunk
            if todo > 0 and between:
                between()
        return moved

    # -- reference counting (inside a caller's write txn) ------------------------------

    def _meta_int(self, txn: lmdb.Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self.db["meta"])
        return _U64.unpack(raw)[0] if raw else 0

    def _set_meta_int(self, txn: lmdb.Transaction, key: bytes, value: int) -> None:
        txn.put(key, _U64.pack(value), db=self.db["meta"])

    def _count_at(self, txn: lmdb.Transaction, slot: bytes) -> int:
        raw = txn.get(slot, db=self.db["counts"])
        if raw is None:
            raise Corrupt(f"reference count of slot {slot.hex()} is missing")
        return int(_U64.unpack(raw)[0])

    def _reserve_slots(self, txn: lmdb.Transaction, k: int) -> int:
        """Reserve ``k`` consecutive slots; returns the first."""
        n = self._meta_int(txn, b"slot")
        self._set_meta_int(txn, b"slot", n + k)
        return n + 1

    def _new_slot(self, txn: lmdb.Transaction, oid: bytes, count: int,
                  n: int | None = None, *, index: bool = True) -> bytes:
        """Give a new object slot ``n`` (default: the next), with its count (appended);
        ``index=False``: the caller records the id in a fresh record instead."""
        if n is None:
            n = self._reserve_slots(txn, 1)
        slot = n.to_bytes(8, "big")
        if index:
            txn.put(oid, slot, db=self.db["slots"])
        if not txn.put(slot, _U64.pack(count), db=self.db["counts"], append=True):
            raise Corrupt("reference count slots out of order")
        return slot

    def _incref(self, txn: lmdb.Transaction, oid: bytes, by: int = 1) -> None:
        slot = self._slot(txn, oid)
        if slot is None:
            raise Corrupt(f"reference to missing object {oid.hex()}")
        count = self._count_at(txn, slot)
        if count == 0:
            txn.delete(oid, db=self.db["zero"])
        txn.put(slot, _U64.pack(count + by), db=self.db["counts"])

    def _log_increments(self, txn: lmdb.Transaction, children: list[bytes]) -> None:
        """Record +1 for each child (applied by ``_drain``); children must exist."""
        if not children:
            return
        for child in children:
            if self._slot(txn, child) is None:
                raise Corrupt(f"reference to missing object {child.hex()}")
        self._append_log(txn, b"".join(children))

    def _log_parents(self, txn: lmdb.Transaction, parents: list[bytes]) -> None:
        """Record +1 for every child of each of ``parents`` (stored objects), applied by
        ``_drain``, which decodes them: 32 bytes per parent instead of per child."""
        if parents:
            self._append_log(txn, _PARENTS + b"".join(parents))

    def _append_log(self, txn: lmdb.Transaction, record: bytes) -> None:
        self._append_seq(txn, "pending", b"pseq", record)

    def _append_seq(self, txn: lmdb.Transaction, name: str, counter: bytes,
                    record: bytes) -> int:
        """Append ``record`` to db ``name`` under the next number of meta ``counter``."""
        seq = self._meta_int(txn, counter) + 1
        self._set_meta_int(txn, counter, seq)
        # Big-endian keys sort in sequence order, so appends stay on the last page.
        if not txn.put(seq.to_bytes(8, "big"), record, db=self.db[name], append=True):
            raise Corrupt(f"{name} records out of order")
        return seq

    def _logged(self, txn: lmdb.Transaction, *, cached: bool = True
                ) -> Iterator[tuple[bytes, list[bytes]]]:
        """(key, child oids to count +1) of each record of the increment log, oldest first.
        A parent record's parents are decoded: they stay stored as long as it lists them.
        ``cached=False`` (fsck) reads every parent again instead of trusting ``_refs``."""
        for key, raw in txn.cursor(db=self.db["pending"]):
            _, refs = self._record_refs(txn, key, raw, cached)
            yield key, [child for children in refs for child in children]

    def _record_refs(self, txn: lmdb.Transaction, key: bytes, raw: bytes, cached: bool = True
                     ) -> tuple[list[bytes], list[list[bytes]]]:
        """A log record -> (its parents, the children of each); a record of child oids
        -> ([], [those children])."""
        if len(raw) % 32 == 0:  # child oids (a parent record has one byte more)
            return [], [[raw[i:i + 32] for i in range(0, len(raw), 32)]]
        if raw[:1] != _PARENTS or len(raw) % 32 != 1:
            raise Corrupt(f"unreadable reference log record {key.hex()}")
        parents = [raw[i:i + 32] for i in range(1, len(raw), 32)]
        return parents, [self._parent_refs(txn, parent, cached) for parent in parents]

    def _parent_refs(self, txn: lmdb.Transaction, parent: bytes,
                     cached: bool = True) -> list[bytes]:
        """The children of a logged parent, read and verified once: objects never change,
        so the sweeper reads them outside its write transactions (``_prefetch``)."""
        refs = self._refs.get(parent) if cached else None
        if refs is not None:
            return refs
        slot = self._slot(txn, parent)
        stored = txn.get(slot, db=self.db["data"]) if slot is not None else None
        if stored is None:
            raise Corrupt(f"logged parent {parent.hex()} is missing")
        if oid_of(stored[1:]) != parent:  # never count a damaged object's references
            raise Corrupt(f"logged parent {parent.hex()} is corrupt (hash mismatch)")
        refs = list(self.children_of(stored[:1], stored[1:]))
        if cached:
            self._remember_refs(parent, refs)
        return refs

    def _remember_refs(self, oid: bytes, refs: list[bytes]) -> None:
        if self._refs_items > REFS_ITEMS:
            self._refs.clear()
            self._refs_items = 0
        self._refs[oid] = refs
        self._refs_items += len(refs) + 1

    def _prefetch(self, batch: int) -> None:
        """Read the children of what the next sweep transaction needs (the logged parents,
        the first ``batch`` queued objects) in a read transaction, so that the write
        transaction, which holds up every commit, mostly just counts."""
        with self.env.begin() as txn, self._logsum.lock:
            self._logsum.sync(self, txn)
            for n, oid in enumerate(txn.cursor(db=self.db["zero"]).iternext(values=False)):
                if n >= batch:
                    break
                if oid in self._refs:
                    continue
                slot = self._slot(txn, oid)
                raw = txn.get(slot, db=self.db["data"]) if slot is not None else None
                if raw is not None and raw[:1] != KIND_CHUNK and oid_of(raw[1:]) == oid:
                    self._remember_refs(oid, list(self.children_of(raw[:1], raw[1:])))

    def _drain(self, txn: lmdb.Transaction, limit: int | None = None) -> bool:
        """Apply logged increments, oldest first (all, or about ``limit``); True if some left.

        Increments to the same object are summed first: successive commits mostly re-add
        edges to the same siblings near the root, so a drain writes each count once.
        """
        pending = self.db["pending"]
        counts: dict[bytes, int] = {}
        done = []
        n = 0
        for key, children in self._logged(txn):
            for oid in children:
                counts[oid] = counts.get(oid, 0) + 1
            done.append(key)
            n += len(children)
            if limit is not None and n >= limit:
                break
        for oid, by in counts.items():
            self._incref(txn, oid, by)
        for key in done:
            txn.delete(key, db=pending)
        return limit is not None and n >= limit and txn.stat(pending)["entries"] > 0

    def backlog(self) -> int:
        """Records of the increment log: commits whose references the sweeper has not
        applied yet (a measure of how far behind it is)."""
        with self.env.begin() as txn:
            return int(txn.stat(self.db["pending"])["entries"])

    def _drain_backlog(self, txn: lmdb.Transaction) -> bool:
        """Apply the oldest logged increments while the log holds more than
        ``SWEEP_LOG_MAX`` records (the sweeper was held up): a sweep holds what is left
        summed in memory (``_LogSum``). True while there is more to apply."""
        pending = self.db["pending"]
        if txn.stat(pending)["entries"] <= SWEEP_LOG_MAX:
            return False
        self._drain(txn, limit=DRAIN_LIMIT)
        return txn.stat(pending)["entries"] > SWEEP_LOG_MAX

    def _decref(self, txn: lmdb.Transaction, oid: bytes) -> None:
        slot = self._slot(txn, oid)
        count = self._count_at(txn, slot) if slot is not None else 0
        if slot is None or count == 0:
            raise Corrupt(f"reference count underflow on object {oid.hex()}")
        txn.put(slot, _U64.pack(count - 1), db=self.db["counts"])
        if count == 1:
            txn.put(oid, _U64.pack(self._meta_int(txn, b"gen")), db=self.db["zero"])

    def _write_batch(self, txn: lmdb.Transaction, batch: Batch, gen: int,
                     reused: Iterable[bytes] = (), files: dict[bytes, bytes] | None = None,
                     heal: bool = False, *, defer: bool = False) -> tuple[int, int] | None:
        """Store a batch of objects (touching existing unreferenced ones so GC spares them);
        returns (key, ids) of the fresh record it appended, if it did.

        Ids of a batch of more than ``FRESH_BATCH_MAX`` new objects go straight into
        ``slots`` unless ``defer``: then into a fresh record too, which the writer merges
        when it publishes (``Writer``).

        References between objects new in this batch are counted directly (an imported file's
        chunks and its directory arrive together); only references to objects stored before
        go through the increment log. A deferred object's references all go through it, as
        one parent record; its new children are kept off the sweeper's work list meanwhile.
        Existence is checked on the id's slot record, so a dedup hit never faults in object
        data.
        """
        zero = self.db["zero"]
        for oid in reused:  # taken from the files cache, without their bytes
            if self._slot(txn, oid) is None:
                raise StaleCache(f"cached object {oid.hex()} has been collected")
            if txn.get(oid, db=zero) is not None:
                txn.put(oid, _U64.pack(gen), db=zero)
        for key, value in (files or {}).items():
            txn.put(key, value, db=self.db["files"])
        new: Batch = {}
        for oid, item in batch.items():
            if self._slot(txn, oid) is None:
                new[oid] = item
                continue
            if txn.get(oid, db=zero) is not None:
                txn.put(oid, _U64.pack(gen), db=zero)
            if heal:
                self._heal(txn, oid, item[0], item[1])
        inside: dict[bytes, int] = {}
        outside: list[bytes] = []
        parents: list[bytes] = []
        logged: set[bytes] = set()  # new objects a parent record will count
        for oid, (kind, payload, children, deferred) in new.items():
            if deferred:
                parents.append(oid)
                for child in children or ():
                    if child in new:
                        logged.add(child)
                    elif self._slot(txn, child) is None:
                        raise Corrupt(f"reference to missing object {child.hex()}")
                continue
            for child in self.children_of(kind, payload) if children is None else children:
                if child in new:
                    inside[child] = inside.get(child, 0) + 1
                else:
                    outside.append(child)
        nbytes = 0
        data = self.db["data"]
        first = self._reserve_slots(txn, len(new)) if new else 0
        index = not defer and len(new) > FRESH_BATCH_MAX
        for n, (oid, (kind, payload, _, _)) in enumerate(new.items(), first):
            count = inside.get(oid, 0)
            slot = self._new_slot(txn, oid, count, n, index=index)
            if not txn.put(slot, kind + payload, db=data, append=True):
                raise Corrupt("object slots out of order")
            if not count and oid not in logged:
                txn.put(oid, _U64.pack(gen), db=zero)
            nbytes += len(payload)
        record = None
        if new and not index:
            record = self._append_fresh(txn, first, list(new)), len(new)
            if txn.stat(self.db["fresh"])["entries"] > FRESH_MAX:  # the sweeper is behind
                self._merge_fresh(txn, FRESH_MERGE_CHUNK)
        self._log_increments(txn, outside)
        self._log_parents(txn, parents)
        if new:
            self._set_meta_int(txn, b"objects", self._meta_int(txn, b"objects") + len(new))
            self._set_meta_int(txn, b"stored_bytes",
                               self._meta_int(txn, b"stored_bytes") + nbytes)
        return record

    def _heal(self, txn: lmdb.Transaction, oid: bytes, kind: bytes, payload: bytes) -> None:
        """Rewrite a stored copy that no longer matches its id with the good bytes at hand."""
        slot = self._slot(txn, oid)
        stored = txn.get(slot, db=self.db["data"])
        if stored is not None and stored[:1] == kind and oid_of(stored[1:]) == oid:
            return
        txn.put(slot, kind + payload, db=self.db["data"])
        if stored is None:  # lost, not damaged
            self._set_meta_int(txn, b"objects", self._meta_int(txn, b"objects") + 1)
        delta = len(payload) - (len(stored) - 1 if stored is not None else 0)
        self._set_meta_int(txn, b"stored_bytes", self._meta_int(txn, b"stored_bytes") + delta)
        log.warning("healed corrupt object %s", oid.hex())

    # -- sessions -------------------------------------------------------------------------

    def writer(self, batch_bytes: int = 64 << 20, *, heal: bool = False) -> Writer:
        return Writer(self, batch_bytes, heal)

    def _begin_session(self) -> int:
        def fn(txn: lmdb.Transaction) -> int:
            gen = self._meta_int(txn, b"gen") + 1
            self._set_meta_int(txn, b"gen", gen)
            rec = json.dumps({"pid": os.getpid(), "gen": gen}).encode()
            txn.put(_U64.pack(gen), rec, db=self.db["sessions"])
            return gen

        return self.write(fn, "begin write session")

    def _end_session(self, txn: lmdb.Transaction, sid: int) -> None:
        txn.delete(_U64.pack(sid), db=self.db["sessions"])

    def _oldest_live_session(self, txn: lmdb.Transaction) -> int | None:
        """Generation of the oldest live session; forgets sessions of dead processes."""
        oldest = None
        dead = []
        for key, raw in txn.cursor(db=self.db["sessions"]):
            rec = json.loads(raw)
            if not _pid_alive(rec["pid"]):
                dead.append(key)
                continue
            oldest = rec["gen"] if oldest is None else min(oldest, rec["gen"])
        for key in dead:
            txn.delete(key, db=self.db["sessions"])
        return oldest

    # -- snapshots ----------------------------------------------------------------------

    def _get_snapshot(self, txn: lmdb.Transaction, root: bytes) -> SnapshotRecord | None:
        raw = txn.get(root, db=self.db["snapshots"])
        return SnapshotRecord.decode(root, raw) if raw else None

    def _put_snapshot(self, txn: lmdb.Transaction, rec: SnapshotRecord,
                      was_listed: bool) -> None:
        """Write (or, with no refs and no pins left, delete) a snapshot record, keeping the
        listed snapshots' count and bytes in meta up to date: every record change goes
        through here, told whether the record was listed before (a record's bytes never
        change, so that is all the counts need)."""
        if rec.refs == 0 and rec.pins == 0:
            txn.delete(rec.root, db=self.db["snapshots"])
            self._decref(txn, rec.root)
        else:
            txn.put(rec.root, rec.encode(), db=self.db["snapshots"])
        if rec.listed != was_listed:
            sign = 1 if rec.listed else -1
            n, nbytes = self._listed(txn)
            self._set_listed(txn, (n + sign, nbytes + sign * rec.bytes))

    def _listed(self, txn: lmdb.Transaction) -> tuple[int, int]:
        return self._meta_int(txn, b"listed"), self._meta_int(txn, b"listed_bytes")

    def _set_listed(self, txn: lmdb.Transaction, counts: tuple[int, int]) -> None:
        self._set_meta_int(txn, b"listed", counts[0])
        self._set_meta_int(txn, b"listed_bytes", counts[1])

    def _count_listed(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """The listed snapshots' count and bytes, from every record (fsck, migration)."""
        recs = [SnapshotRecord.decode(k, v) for k, v in txn.cursor(db=self.db["snapshots"])]
        return sum(r.listed for r in recs), sum(r.bytes for r in recs if r.listed)

    def snapshot(self, root: bytes) -> SnapshotRecord | None:
        with self.env.begin() as txn:
            return self._get_snapshot(txn, root)

    def snapshots(self, *, include_unlisted: bool = False) -> list[SnapshotRecord]:
        with self.env.begin() as txn:
            recs = [SnapshotRecord.decode(k, v) for k, v in txn.cursor(db=self.db["snapshots"])]
        return recs if include_unlisted else [r for r in recs if r.listed]

    def snapshot_ids(self) -> list[str]:
        """Hex ids of listed snapshots, sorted (what ``snapshots/`` shows)."""
        with self.env.begin() as txn:
            return [k.hex() for k, v in txn.cursor(db=self.db["snapshots"])
                    if SnapshotRecord.decode(k, v).listed]

    def resolve(self, ident: str, *, include_unlisted: bool = False) -> bytes:
        """Turn a full id or a unique prefix of >= 8 lowercase hex digits into a root oid."""
        if not isinstance(ident, str) or not 8 <= len(ident) <= 64 or any(
            c not in "0123456789abcdef" for c in ident
        ):
            raise InvalidArgument(
                f"bad snapshot id {ident!r}: expected 8 to 64 lowercase hex digits")
        start = bytes.fromhex(ident[: len(ident) // 2 * 2])
        found: list[bytes] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["snapshots"])
            if cur.set_range(start):
                for key, raw in cur:
                    if not key.hex().startswith(ident):
                        if key[: len(start)] != start:
                            break
                        continue
                    if include_unlisted or SnapshotRecord.decode(key, raw).listed:
                        found.append(key)
                    if len(found) > 1:
                        break
        if not found:
            raise NotFound(f"no snapshot {ident!r}")
        if len(found) > 1:
            raise InvalidArgument(f"snapshot id prefix {ident!r} is ambiguous")
        return found[0]

    def publish(self, writer: Writer, root: bytes, *, parent: str | None, logical_bytes: int,
                files: int, node: tuple[str, dict[str, Any]] | None = None) -> SnapshotRecord:
        """Flush the writer and publish ``root`` as a snapshot, atomically.

        ``node`` = (name, record) also rewrites that node's record (its last commit) in the
        same transaction. A small commit is therefore exactly one LMDB commit (one fsync).
        """

        writer.wait()

        def fn(txn: lmdb.Transaction) -> SnapshotRecord:
            writer._flush_in(txn)
            if node is not None:
                key = node[0].encode()
                if txn.get(key, db=self.db["nodes"]) is None:
                    raise NotFound(f"no node {node[0]!r}")
                txn.put(key, json.dumps(node[1]).encode(), db=self.db["nodes"])
            rec = self._get_snapshot(txn, root)
            if rec is None:
                if self._slot(txn, root) is None:
                    raise Corrupt(f"cannot publish missing tree {root.hex()}")
                rec = SnapshotRecord(root, 0, 0, parent, time.time(), logical_bytes, files)
                self._incref(txn, root)
            was_listed = rec.listed
            rec.refs += 1
            self._put_snapshot(txn, rec, was_listed)
            if writer.sid is not None:
                self._end_session(txn, writer.sid)
            return rec

        rec = self.write(fn, "publish snapshot")
        writer._after_flush()
        writer.closed = True
        return rec

    def release(self, root: bytes) -> SnapshotRecord:
        """Drop one published reference (prune). The id leaves the listing at zero refs."""

        def fn(txn: lmdb.Transaction) -> SnapshotRecord:
            rec = self._get_snapshot(txn, root)
            if rec is None or not rec.listed:
                raise NotFound(f"no snapshot {root.hex()}")
            rec.refs -= 1
            self._put_snapshot(txn, rec, True)
            return rec

        return self.write(fn, "prune snapshot")

    # -- nodes (records owned by state.py; pins change with them, atomically) -------------

    def add_node(self, name: str, record: dict[str, Any], base: bytes) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            key = name.encode()
            if txn.get(key, db=self.db["nodes"]) is not None:
                raise InvalidArgument(f"node {name!r} already exists")
            rec = self._get_snapshot(txn, base)
            if rec is None or not rec.listed:
                raise NotFound(f"no snapshot {base.hex()}")
            rec.pins += 1
            self._put_snapshot(txn, rec, True)
            txn.put(key, json.dumps(record).encode(), db=self.db["nodes"])

        self.write(fn, "add node")

    def remove_node(self, name: str, base: bytes) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            key = name.encode()
            if not txn.delete(key, db=self.db["nodes"]):
                raise NotFound(f"no node {name!r}")
            rec = self._get_snapshot(txn, base)
            if rec is None or rec.pins == 0:
                raise Corrupt(f"node {name!r} had no pin on {base.hex()}")
            rec.pins -= 1
            self._put_snapshot(txn, rec, rec.listed)

        self.write(fn, "remove node")

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.env.begin() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self.db["nodes"])}

    def node(self, name: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(name.encode(), db=self.db["nodes"])
        return json.loads(raw) if raw else None

    # -- garbage collection ---------------------------------------------------------------

    def sweep(self, batch: int = 2000, between: Callable[[], int | None] | None = None,
              keep: int = LOG_KEEP, yield_to: Callable[[], bool] | None = None
              ) -> tuple[int, int]:
        """Delete unreferenced objects no in-flight session can need; returns (n, bytes).

        Works in transactions of up to ``batch`` deletions (``_sweep_batch``), which leave
        the newest ``keep`` parent records of the increment log unapplied (0: apply it all,
        as an explicit ``gc`` does); a background sweeper passes a ``between`` hook (which
        paces it between commands, and may answer the next transaction's batch) so commits
        never wait long for the write lock, and may pass ``yield_to``, true while a command
        waits: a transaction then ends after its current deletion. Then, once
        ``FRESH_MERGE`` fresh records have piled up, it merges them into ``slots`` (after
        the deletions: the dead entries need no merging), but for the newest
        ``FRESH_KEEP``, whose entries mostly die where they are.
        """
        while self.write(self._drain_backlog, "apply references"):
            if between:
                batch = between() or batch
        total_n = total_bytes = 0
        while True:
            self._prefetch(batch)
            n, nbytes, more = self.write(
                functools.partial(self._sweep_batch, batch=batch, keep=keep,
                                  yield_to=yield_to), "gc sweep")
            total_n += n
            total_bytes += nbytes
            if not more:
                break
            if between:
                batch = between() or batch
            if self.fresh_records() >= FRESH_MAX // 2:
                # Under a busy loop a sweep may not end for long, and at FRESH_MAX every
                # commit would merge records itself: merge the oldest ones on the way.
                self.write(lambda txn: self._merge_fresh(txn, FRESH_MERGE_CHUNK),
                           "merge fresh index")
                if between:
                    batch = between() or batch
        if self.fresh_records() >= FRESH_MERGE:
            if between:
                between()
            self.merge_fresh(FRESH_MERGE, between, keep=FRESH_KEEP)
        return total_n, total_bytes

    def _sweep_batch(self, txn: lmdb.Transaction, batch: int, keep: int = LOG_KEEP,
                     yield_to: Callable[[], bool] | None = None) -> tuple[int, int, bool]:
        """Delete up to ``batch`` unreferenced objects (fewer once ``yield_to`` turns true),
        settling the increment log with them; returns (objects gone, bytes freed, more to
        do).

        An object's true count is its applied count plus its logged increments (``_LogSum``).
        Deleting an object takes one from each of its children, and a child left at zero
        goes in the same transaction (queued instead while a session is in flight: it may be
        reusing it). A deleted object that a parent record still lists is struck from it:
        the record's increments for its children and the deletion's decrements cancel, so
        nothing is written for them. So the log is not applied as it comes: the newest
        ``keep`` parent records stay, and in a search loop most commits are pruned while
        theirs is there, so their objects go without one count of their directories'
        unchanged entries being written (applying those edges and undoing them later had
        cost more than the search itself, and the sweeper fell behind under load). Older
        parent records, and records of child ids (imports), are applied; counts are written
        once, at the end, and only where they changed.
        """
        with self._logsum.lock:
            return self._sweep_locked(txn, batch, keep, yield_to)

    def _sweep_locked(self, txn: lmdb.Transaction, batch: int, keep: int,
                      yield_to: Callable[[], bool] | None) -> tuple[int, int, bool]:
        """``_sweep_batch``, holding the log's sum.

        Whether a child of a deleted object is left at zero needs its applied count, and
        looking up every child (~1,800 per kernel-tree commit) was most of a sweep. A child
        still counted by the log is not at zero; nor is one whose applied count is known to
        be >= 1 when the deletion took nothing from it beyond what the log gave (``_counted``).
        That knowledge can only go stale by a count reaching zero elsewhere, and whatever
        brings a count to zero queues the object (``_decref``, the sweep itself), so a stale
        entry delays nothing; it is forgotten when this sweeper reads or writes a zero, when
        the object goes, and entirely when another process has swept or repaired the store
        (meta ``sweeps``), since it may have deleted objects that are stored again since.
        """
        zero, pending, counts = self.db["zero"], self.db["pending"], self.db["counts"]
        logsum = self._logsum
        logsum.sync(self, txn)
        logged = logsum.delta
        epoch = self._meta_int(txn, b"sweeps")
        if epoch != self._counted_epoch or len(self._counted) > COUNTED_MAX:
            self._counted.clear()
        # Until this transaction has done all it does (it may raise, and roll back what
        # ``_counted`` learns from it), the next one must start afresh.
        self._counted_epoch = -1
        counted = self._counted
        local: dict[bytes, int] = {}  # decrements by this transaction's deletions
        written: dict[bytes, int] = {}  # changes to applied counts, written at the end
        struck: dict[bytes, set[bytes]] = {}  # record key -> its parents deleted here
        at_zero: set[bytes] = set()  # children this transaction left unreferenced
        applied: dict[bytes, tuple[bytes, int]] = {}  # oid -> (slot, applied count)

        def count(oid: bytes) -> tuple[bytes, int]:
            got = applied.get(oid)
            if got is None:
                slot = self._slot(txn, oid)
                if slot is None:
                    raise Corrupt(f"reference to missing object {oid.hex()}")
                got = applied[oid] = (slot, self._count_at(txn, slot))
                if got[1]:
                    counted.add(oid)
                else:
                    counted.discard(oid)
            return got

        # Records of child ids are applied now, so a deletion below finds all references of
        # an object that no parent record lists counted (or being counted) in ``written``.
        settle = [key for key, (_, parents, _) in logsum.records.items() if not parents]
        for key in settle:
            for child in logsum.records[key][2][0]:
                written[child] = written.get(child, 0) + 1
        oldest = self._oldest_live_session(txn)
        stack = []
        for oid, raw in txn.cursor(db=zero):
            if oldest is None or _U64.unpack(raw)[0] < oldest:
                stack.append(oid)
                if len(stack) >= batch:
                    break
        more = len(stack) >= batch
        stack.reverse()  # popped in key order
        gone: set[bytes] = set()
        nbytes = freed = 0
        while stack and len(gone) < batch:
            if yield_to is not None and gone and yield_to():
                more = True  # what is left goes in a later transaction
                break
            oid = stack.pop()
            if oid in gone:
                continue
            slot = self._slot(txn, oid)
            if slot is None:  # queued, but its record is gone: forget it
                txn.delete(oid, db=zero)
                gone.add(oid)
                continue
            if count(oid)[1] + logged.get(oid, 0) + local.get(oid, 0):
                txn.delete(oid, db=zero)  # referenced after all
                continue
            gone.add(oid)
            raw = txn.get(slot, db=self.db["data"])
            txn.delete(oid, db=zero)
            txn.delete(oid, db=self.db["slots"])  # a fresh entry is dead once its count goes
            txn.delete(slot, db=counts)
            if raw is None:
                continue
            txn.delete(slot, db=self.db["data"])
            freed += 1
            nbytes += len(raw) - 1
            kind, payload = raw[:1], raw[1:]
            if kind == KIND_CHUNK:
                continue
            refs = self._refs.pop(oid, None)
            record, refs = logsum.parent_of.get(oid, (None, refs))
            if record is not None:
                struck.setdefault(record, set()).add(oid)
            for child in self.children_of(kind, payload) if refs is None else refs:
                extra = local[child] = local.get(child, 0) - 1
                if record is None:  # its references were applied: take them back
                    written[child] = written.get(child, 0) - 1
                extra += logged.get(child, 0)
                if extra > 0 or (not extra and child in counted):
                    continue  # still counted: by the log, or by its applied count
                left = count(child)[1] + extra
                if left < 0:
                    raise Corrupt(f"reference count underflow on object {child.hex()}")
                if left == 0:
                    at_zero.add(child)
                    if oldest is None:
                        stack.append(child)
        more = more or bool(stack)
        # Parent records beyond the newest ``keep`` are applied (what their deleted parents
        # counted excepted), about DRAIN_LIMIT increments per transaction, once nothing is
        # left to delete: while there is, many of them are a pruned commit's, which a later
        # transaction of this sweep cancels for much less.
        kept = sorted(key for key, (_, parents, _) in logsum.records.items()
                      if parents and len(struck.get(key, ())) < len(parents))
        budget = DRAIN_LIMIT
        for key in kept[:max(0, len(kept) - keep) if not more else 0]:
            if budget <= 0:
                more = True
                break
            _, parents, refs = logsum.records[key]
            out = struck.pop(key, ())
            for parent, children in zip(parents, refs, strict=True):
                if parent in out:
                    continue
                budget -= len(children)
                for child in children:
                    written[child] = written.get(child, 0) + 1
            settle.append(key)
        for key in settle:
            txn.delete(key, db=pending)
        for key, out in struck.items():
            left_parents = [p for p in logsum.records[key][1] if p not in out]
            if left_parents:
                txn.put(key, _PARENTS + b"".join(left_parents), db=pending)
            else:
                txn.delete(key, db=pending)
        gen = self._meta_int(txn, b"gen")
        for oid, d in written.items():
            if not d or oid in gone:
                continue
            slot, have = count(oid)
            if have + d < 0:
                raise Corrupt(f"reference count underflow on object {oid.hex()}")
            txn.put(slot, _U64.pack(have + d), db=counts)
            if have + d:
                counted.add(oid)
            else:
                counted.discard(oid)
            if have == 0:
                txn.delete(oid, db=zero)  # counted now (if it was queued)
        for oid in at_zero - gone:
            if txn.get(oid, db=zero) is None:
                txn.put(oid, _U64.pack(gen), db=zero)
        counted.difference_update(gone)
        if gone:
            self._set_meta_int(txn, b"objects", self._meta_int(txn, b"objects") - freed)
            self._set_meta_int(txn, b"stored_bytes",
                               self._meta_int(txn, b"stored_bytes") - nbytes)
        # Should the commit fail, the next transaction finds ``sweeps`` unchanged and starts
        # ``_counted`` afresh.
        self._set_meta_int(txn, b"sweeps", epoch + 1)
        self._counted_epoch = epoch + 1
        return len(gone), nbytes, more

    def garbage(self) -> int:
        """Unreferenced objects waiting for the sweeper (logged increments counted in)."""
        with self.env.begin() as txn:
            incoming = {child for _, children in self._logged(txn) for child in children}
            return sum(1 for oid, _ in txn.cursor(db=self.db["zero"]) if oid not in incoming)

    # -- statistics -----------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self.env.begin() as txn:
            snapshots, logical_bytes = self._listed(txn)
            return StoreStats(
                objects=self._meta_int(txn, b"objects"),
                stored_bytes=self._meta_int(txn, b"stored_bytes"),
                snapshots=snapshots,
                logical_bytes=logical_bytes,
                nodes=txn.stat(self.db["nodes"])["entries"],
            )

    # -- fsck -----------------------------------------------------------------------------

    def check(self, *, repair: bool = False) -> list[str]:
        """Verify hashes and recount references from objects and snapshot records.

        Returns human-readable findings (empty when clean). Runs in one transaction, so a
        live daemon's concurrent commits cannot make it see drift that is not there. With
        ``repair`` (in a write transaction) it rewrites counts, pins and the sweeper's work
        list to match what exists; orphans are then freed by the next sweep. Corrupt
        objects stay (and stay reported) until ``import --rehash`` of a tree holding their
        content rewrites them.
        """
        if repair:
            return self.write(lambda txn: self._check_in(txn, repair=True), "fsck repair")
        with self.env.begin() as txn:
            return self._check_in(txn, repair=False)

    def _check_in(self, txn: lmdb.Transaction, *, repair: bool) -> list[str]:
        findings: list[str] = []
        expected: dict[bytes, int] = {}
        present: set[bytes] = set()
        nbytes = 0
        slots: dict[bytes, bytes] = dict(txn.cursor(db=self.db["slots"]))  # oid -> slot
        try:
            for oid, slot in _fresh_pairs(txn, self.db["fresh"]):  # read here, not cached
                if txn.get(slot, db=self.db["counts"]) is None:
                    continue  # swept
                if oid in slots:
                    findings.append(f"object {oid.hex()} is indexed twice")
                slots.setdefault(oid, slot)
        except Corrupt as exc:
            findings.append(f"fresh index: {exc}")
        for oid, slot in slots.items():
            raw = txn.get(slot, db=self.db["data"])
            if raw is None:
                findings.append(f"object {oid.hex()} is recorded but its data is missing")
                continue
            kind, payload = raw[:1], raw[1:]
            present.add(oid)
            nbytes += len(payload)
            if kind not in KINDS or oid_of(payload) != oid:
                findings.append(f"corrupt object {oid.hex()}: content does not match its id")
                continue
            try:
                for child in self.children_of(kind, payload):
                    expected[child] = expected.get(child, 0) + 1
            except OppieError:
                findings.append(f"corrupt object {oid.hex()}: undecodable {kind.decode()}")
        snaps = [SnapshotRecord.decode(k, v) for k, v in txn.cursor(db=self.db["snapshots"])]
        for rec in snaps:
            expected[rec.root] = expected.get(rec.root, 0) + 1
        for oid in expected.keys() - present:
            findings.append(f"missing object {oid.hex()} (referenced {expected[oid]} times)")
        counts = {k: _U64.unpack(v)[0] for k, v in txn.cursor(db=self.db["counts"])}
        actual = {oid: counts.pop(slot, 0) for oid, slot in slots.items()}
        if counts:
            findings.append(f"reference count table drift: {len(counts)} counts without an "
                            "object")
        stray = set(txn.cursor(db=self.db["data"]).iternext(keys=True, values=False))
        stray -= set(slots.values())
        if stray:
            findings.append(f"{len(stray)} stored objects have no id record (unreachable)")
        try:
            for _, children in self._logged(txn, cached=False):  # logged, not yet applied
                for child in children:
                    actual[child] = actual.get(child, 0) + 1
        except OppieError as exc:
            findings.append(f"reference log unreadable: {exc}")
        queued = {k for k, _ in txn.cursor(db=self.db["zero"])}
        for oid in present:
            want, have = expected.get(oid, 0), actual.get(oid, 0)
            if want != have:
                findings.append(f"refcount drift on {oid.hex()}: stored {have}, counted {want}")
            if want == 0 and oid not in queued:
                findings.append(f"orphan object {oid.hex()}: unreferenced, not queued for GC")
            if want and oid in queued and have == 0:
                findings.append(f"object {oid.hex()} is referenced {want} times but queued "
                                "for GC")
        meta = (self._meta_int(txn, b"objects"), self._meta_int(txn, b"stored_bytes"))
        if meta != (len(present), nbytes):
            findings.append(f"store counters drift: objects {meta[0]} vs {len(present)}, "
                            f"bytes {meta[1]} vs {nbytes}")
        listed, kept = self._count_listed(txn), self._listed(txn)
        if listed != kept:
            findings.append(f"snapshot counters drift: listed {kept[0]} vs {listed[0]}, "
                            f"bytes {kept[1]} vs {listed[1]}")
        pins: dict[str, int] = {}
        for _, v in txn.cursor(db=self.db["nodes"]):
            base = json.loads(v).get("base")
            pins[base] = pins.get(base, 0) + 1
        for rec in snaps:
            if rec.pins != pins.get(rec.id, 0):
                findings.append(f"snapshot {rec.id}: {rec.pins} pins recorded, "
                                f"{pins.get(rec.id, 0)} live nodes")
        if repair and findings:
            # A corrupt object's references are unknown: lower no count then, or repair
            # would free the intact children of a damaged tree.
            if any(f.startswith("corrupt object") for f in findings):
                for oid, have in actual.items():
                    expected[oid] = max(expected.get(oid, 0), have)
            self._repair(txn, expected, present, nbytes, pins, snaps, slots, stray)
        return findings

    def _repair(self, txn: lmdb.Transaction, expected: dict[bytes, int], present: set[bytes],
                nbytes: int, pins: dict[str, int], snaps: list[SnapshotRecord],
                slots: dict[bytes, bytes], stray: set[bytes]) -> None:
        """Rewrite counts, pins and the work lists from the recount. Slots stay (the data
        is keyed by them), also of an id whose data is gone: like a corrupt copy, it stays
        reported until ``import --rehash`` of its content stores it again. Unreachable data
        is deleted."""
        gen = self._meta_int(txn, b"gen")
        self._set_meta_int(txn, b"sweeps", self._meta_int(txn, b"sweeps") + 1)  # see _counted
        for rec in snaps:
            rec.pins = pins.get(rec.id, 0)
            if rec.refs == 0 and rec.pins == 0:
                txn.delete(rec.root, db=self.db["snapshots"])
                expected[rec.root] -= 1
            else:
                txn.put(rec.root, rec.encode(), db=self.db["snapshots"])
        self._set_listed(txn, self._count_listed(txn))
        for name in ("counts", "zero", "pending"):
            txn.drop(self.db[name], delete=False)
        for oid, slot in slots.items():
            count = expected.get(oid, 0)
            txn.put(slot, _U64.pack(count), db=self.db["counts"])
            if count == 0:
                txn.put(oid, _U64.pack(gen), db=self.db["zero"])
        for slot in stray:
            txn.delete(slot, db=self.db["data"])
        self._set_meta_int(txn, b"objects", len(present))
        self._set_meta_int(txn, b"stored_bytes", nbytes)


class Writer:
    """Buffers new objects of one import/commit session and writes them in big batches.

    Batching keeps the number of LMDB commits (each an fsync) small during a large import,
    and a full batch is committed by a background thread while the caller goes on reading
    and hashing the next one (at most two batches are held in memory).

    The GC session is registered only when a batch is written before publishing: objects
    that reach the store in the publishing transaction itself need no protection, so a
    small commit costs one transaction.

    The ids of the batches written before publishing go into fresh records, which the
    publishing transaction merges into ``slots`` in one sorted pass (every
    ``FRESH_DEFER_MAX`` ids on the way). Indexed batch by batch, an import rewrote most
    leaves of ``slots`` (random keys) in every batch, and the pages it freed, scattered
    over the whole file, were where every later commit's pages went, each a separate
    write for the fsync to wait for: twice as many as on a store compacted after the
    import (bench/RESULTS.md).
    """

    def __init__(self, store: Store, batch_bytes: int, heal: bool = False) -> None:
        self.store = store
        self.batch_bytes = batch_bytes
        self.heal = heal  # verify stored copies of what is written again; fix bad ones
        self.sid: int | None = None
        self.pending: Batch = {}
        self.pending_bytes = 0
        self.reused: list[bytes] = []
        self.files: dict[bytes, bytes] = {}
        self.deferred: list[int] = []  # keys of the fresh records of its batches so far
        self.deferred_ids = 0
        self.closed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def put(self, kind: bytes, payload: bytes, children: Iterable[bytes] | None = None,
            *, deferred: bool = False) -> bytes:
        """Queue an object; ``children`` (its references) spares decoding it again.

        ``deferred``: its children are counted later, by the sweeper (which decodes it), and
        ``children`` needs to hold only those that may not be stored yet: the others must be
        known to stay stored for the whole session (entries carried over from a tree the
        caller keeps pinned). A commit's directories are mostly such entries, and listing
        them was most of a commit's work and of its log.
        """
        oid = oid_of(payload)
        if oid not in self.pending:
            self.pending[oid] = (kind, bytes(payload), children, deferred)
            self.pending_bytes += len(payload)
            if self.pending_bytes >= self.batch_bytes:
                self.flush()
        return oid

    def reuse(self, oid: bytes) -> None:
        """Reference a stored object without its bytes; the batch checks it still exists."""
        self.reused.append(oid)

    def cache_file(self, path: bytes, record: bytes) -> None:
        self.files[files_key(path)] = record

    def flush(self) -> None:
        """Hand the pending batch to the background committer (after the previous one)."""
        if not self.pending:
            return
        if self.sid is None:
            self.sid = self.store._begin_session()
        self.wait()
        batch, sid, reused, files = self.pending, self.sid, self.reused, self.files
        self.pending, self.pending_bytes, self.reused, self.files = {}, 0, [], {}

        def write(txn: lmdb.Transaction) -> tuple[list[int], int]:
            keys, ids = list(self.deferred), self.deferred_ids
            record = self.store._write_batch(txn, batch, sid, reused, files, self.heal,
                                             defer=True)
            if record is not None:
                keys.append(record[0])
                ids += record[1]
            if ids > FRESH_DEFER_MAX:  # every process would hold them all decoded
                self.store._merge_fresh(txn, keys=keys)
                return [], 0
            return keys, ids

        def commit() -> None:
            try:
                self.deferred, self.deferred_ids = self.store.write(write, "write objects")
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=commit, name="oppiefs-batch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Wait for the background batch; re-raise its error here, in the caller."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _flush_in(self, txn: lmdb.Transaction) -> None:
        gen = self.sid if self.sid is not None else self.store._meta_int(txn, b"gen")
        self.store._write_batch(txn, self.pending, gen, self.reused, self.files, self.heal)
        if self.deferred:
            self.store._merge_fresh(txn, keys=self.deferred)

    def _after_flush(self) -> None:
        self.pending.clear()
        self.pending_bytes = 0
        self.deferred, self.deferred_ids = [], 0
        self.reused, self.files = [], {}

    def abort(self) -> None:
        """End the session without publishing; what it wrote is left for the sweeper."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        with contextlib.suppress(BaseException):
            self.wait()
        sid = self.sid
        if sid is not None:
            self.store.write(lambda txn: self.store._end_session(txn, sid), "abort session")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
