"""StateManager: import / fork / commit / drop / prune, node pins, lineage, recovery.

One instance lives in the daemon; its methods are called from worker threads (control
commands), never from the FUSE thread, because fork and drop mount and unmount overlays
whose lowerdir is on our own FUSE mount.

Nodes live under ``<store>/nodes/<node>/`` (``upper``, ``work``, ``merged``); the overlay is
mounted on ``merged`` and ``<mnt>/nodes/<node>`` is a symlink to it, so agents working in a
node touch only the kernel's overlay and the host filesystem, never the daemon. A node's
record (base snapshot, last commit) and the pin on its base change in one LMDB transaction.
Order of effects keeps crashes harmless: fork writes the record while the overlay is being
mounted and replies once both are done (a record without a mount is re-attached on the next
start, a mount without a record dies with the daemon's FUSE mount, its dir is swept on the
next start, and its fork was never acknowledged), drop unmounts, then removes the record,
then moves the directory to a trash the background sweeper thread empties, with ``rm`` in a
child process (a directory without a record, trash included, is swept on the next start).

GC runs in a background thread (``run_gc``) that paces a sweeper process (sweeper.py): it
frees unreferenced objects and settles commits' logged reference increments in short
transactions taken in the gaps between control commands, so a search loop's fork/commit
latency does not carry the sweeping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import overlay, tree
from .errors import InvalidArgument, NotFound, NotMounted, OppieError, from_oserror
from .store import LOG_KEEP, Store
from .sweeper import BusyFlag, Sweeper

log = logging.getLogger("oppiefs.state")

GC_GAP_S = 1.0
GC_IDLE_S = 0.02  # the sweeper works in the gaps between commands ...
GC_MAX_DEFER_S = 2.0  # ... but waits no longer than this for one
STOP_POLL_S = 0.1  # how soon a wait for a pause sees ``stop`` set without a wake()
# Objects one sweeper transaction may delete (each holds up commits while it runs: see
# Store._sweep_batch).
SWEEP_BATCH = 256
# Unapplied commits (log records) at which the sweeper stops waiting for gaps: twice what a
# sweep leaves in the log on purpose.
GC_DEBT = 2 * LOG_KEEP
GC_REST = 6.0  # ... and rests this many times as long as it worked instead
SWEEP_MIN_BATCH = 32  # ... unless a pause fits this many deletions (a batch sized to it)
PAUSE_EWMA = 8  # commands over which the expected pause after each kind is averaged
TRASH_PREFIX = ".trash-"  # dropped node dirs waiting to be deleted (not a valid node id)
TRASH_BATCH = 512  # dirs per rm command (its argument list stays far below ARG_MAX)
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_node_id(node: str) -> str:
    if not isinstance(node, str) or not NODE_RE.match(node) or ".." in node:
        raise InvalidArgument(f"bad node id {node!r}: expected a letter or digit, then "
                              "letters, digits, '_', '-', '.'")
    return node


class StateManager:
    def __init__(self, store: Store, mountpoint: str | os.PathLike[str],
                 trees: str | os.PathLike[str] | None = None) -> None:
        """``trees``: where the snapshot trees are mounted (the tree server's mount;
        default: ``mountpoint`` itself)."""
        self.store = store
        self.reader = tree.commit_reader(store)
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.trees = Path(os.path.abspath(trees)) if trees is not None else self.mountpoint
        self.node_root = store.path / "nodes"
        self.node_root.mkdir(exist_ok=True)
        self._store_dev = self.node_root.stat().st_dev  # a node dir's, unless mounted over
        overlay.spread_subdirs(str(self.node_root))
        self.mounter = overlay.Mounter()  # overlays are mounted from a helper process
        self._lock = threading.Lock()  # guards _node_locks, _links and the command tracking
        self._node_locks: dict[str, threading.Lock] = {}
        self._links: dict[str, str] = {}
        self.gc_wanted = threading.Event()
        # Set once recover() has re-attached the nodes; commands wait for it (control.py).
        self.ready = threading.Event()
        # Commands in progress (control.py marks them with busy()), when the last one ended
        # and what it was, and how long the pause after each kind of command lasts (a moving
        # average): a search loop pauses after a fork (the agent works), not after a commit.
        self._active = 0
        self._last_active = 0.0
        self._last_kind = ""
        self._pause_after: dict[str, float] = {}
        self.busy_flag = BusyFlag()  # _active, for the sweeper's child (it yields to commands)
        self._idle = threading.Condition(self._lock)  # notified when the last command ends
        self._trash_error = ""  # the last failure to empty the trash (logged once)
        # Called with a snapshot id when it leaves the listing (the mount drops its dentry).
        self.on_released: Callable[[str], None] = lambda snapshot_id: None

    # -- helpers ----------------------------------------------------------------------------

    def _dirs(self, node: str) -> tuple[Path, Path, Path, Path]:
        base = self.node_root / node
        return base, base / "upper", base / "work", base / "merged"

    def _check_attached(self, node: str, merged: Path) -> None:
        """Refuse to commit a node whose overlay was unmounted behind our back: what was
        written to the bare dir since is in no layer, and a commit would say all is well.
        One stat: an overlay has a device of its own, the bare dir the store's."""
        try:
            bare = os.stat(merged).st_dev == self._store_dev
        except OSError as exc:
            raise from_oserror(exc, f"node {node!r}: {merged}") from exc
        if bare:
            raise NotMounted(
                f"node {node!r} is not mounted any more: its overlay at {merged} was "
                "unmounted from outside oppiefs, so writes since then went to a plain dir "
                "that no commit reads. Its upper dir keeps what the node held up to then. "
                "Drop the node, or re-attach it: `oppiefs umount` and `oppiefs mount`.")

    def _lower(self, root: bytes) -> str:
        return str(self.trees / "snapshots" / root.hex())

    def _node_lock(self, node: str) -> threading.Lock:
        with self._lock:
            return self._node_locks.setdefault(node, threading.Lock())

    def _record(self, node: str) -> dict[str, Any]:
        rec = self.store.node(check_node_id(node))
        if rec is None:
            raise NotFound(f"no node {node!r}")
        return rec

    def node_paths(self) -> dict[str, str]:
        """Node name -> merged dir, for ``<mnt>/nodes/`` (cheap: called on the FUSE thread)."""
        return self._links

    def _set_link(self, node: str, merged: Path | None) -> None:
        with self._lock:
            links = dict(self._links)
            if merged is None:
                links.pop(node, None)
            else:
                links[node] = str(merged)
            self._links = links

    @contextlib.contextmanager
    def busy(self, kind: str = "") -> Iterator[None]:
        """Mark a command (``kind``: its name) in progress: the sweeper keeps out of its way
        (see run_gc)."""
        with self._lock:
            if not self._active and self._last_kind:
                pause = time.monotonic() - self._last_active
                seen = self._pause_after.get(self._last_kind)
                self._pause_after[self._last_kind] = (
                    pause if seen is None else seen + (pause - seen) / PAUSE_EWMA)
            self._active += 1
            self.busy_flag.set(True)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self.busy_flag.set(self._active > 0)
                self._last_active = time.monotonic()
                self._last_kind = kind
                if not self._active:
                    self._idle.notify_all()

    def wake(self) -> None:
        """Wake the sweeper's wait for a pause (it then finds its ``stop`` set)."""
        with self._idle:
            self._idle.notify_all()

    def _wait_idle(self, stop: threading.Event, rest: float | None = None,
                   need: float | None = None) -> float | None:
        """Wait for a pause in the command stream: ``GC_IDLE_S`` without a command, or
        after ``rest`` seconds the first moment no command is in progress (a busy search
        loop leaves no quiet gaps); at most GC_MAX_DEFER_S, so that the sweeper makes
        progress however busy the commands keep it. With ``need``, also before ``rest``
        a moment no command is in progress in a pause expected (by the kind of command that
        began it) to last ``need`` seconds more: returns how long, then (else None)."""
        start = time.monotonic()
        limit = GC_MAX_DEFER_S if rest is None else min(rest, GC_MAX_DEFER_S)
        with self._idle:
            while not stop.is_set():
                now = time.monotonic()
                quiet = now - self._last_active >= GC_IDLE_S or now - start >= limit
                if now - start >= GC_MAX_DEFER_S or (quiet and not self._active):
                    return None
                if need is not None and not self._active:
                    ahead = self._pause_after.get(self._last_kind, 0.0) - (now - self._last_active)
                    if ahead >= need:
                        return ahead
                # Nothing changes before the next command ends (notified) or a deadline. A
                # poll instead took this process's GIL every 0.5 ms, from the commands too.
                deadline = start + GC_MAX_DEFER_S
                if not self._active:
                    deadline = min(deadline, self._last_active + GC_IDLE_S, start + limit)
                self._idle.wait(min(max(deadline - now, 0.0), STOP_POLL_S))
        return None

    def _paced(self, stop: threading.Event) -> Callable[[float], int | None]:
        """A ``between`` hook for the sweeper, given how long its last transaction held the
        write lock; answers the next transaction's batch. It works in quiet gaps between
        commands, so it holds up none; a busy search loop leaves none, and once the
        sweeper is that far behind (``GC_DEBT`` unapplied commits) it works instead in a
        pause that fits at least ``SWEEP_MIN_BATCH`` deletions, sized to the pause (a
        command that arrives during a transaction waits for its current deletion and its
        commit: ``BusyFlag``), and after resting ``GC_REST`` x as long as it held the lock at the
        first moment no command is in progress: it holds the lock at most 1 / (1 + GC_REST)
        of the time outside such pauses, and the store stays bounded."""
        behind = False
        batch = SWEEP_BATCH  # what the last transaction was asked to delete

        def between(held: float) -> int | None:
            nonlocal behind, batch
            behind = behind or self.store.backlog() >= GC_DEBT
            if not behind:
                self._wait_idle(stop)
                return None
            # Per deletion, the commit's share included: an overestimate (and never zero).
            cost = max(held, 1e-6) / batch
            ahead = self._wait_idle(stop, GC_REST * held, cost * SWEEP_MIN_BATCH)
            batch = SWEEP_BATCH if ahead is None else min(SWEEP_BATCH, int(ahead / cost))
            return batch

        return between

    # -- commands ---------------------------------------------------------------------------

    def import_path(self, path: str) -> dict[str, Any]:
        if "\0" in path:
            raise InvalidArgument("import path contains a NUL byte")
        p = tree.host_path_ok(path)
        if ".." in Path(path).parts:
            raise InvalidArgument(f"import path must be normalized (no '..'): {path!r}")
        for served in (self.mountpoint, self.trees):
            tree.refuse_holding(path, served, "the mount")
        report = tree.import_dir(self.store, p)
        # The first commit through each directory would read and decode it (~70 us; a
        # kernel-tree commit read 1.7 of them): decode them now, while the client waits for
        # a much longer import anyway (~0.4 s for the kernel tree's 5,096).
        try:
            self.reader.warm(report.root, tree.COMMIT_TREES)
        except OppieError as exc:  # only a head start: the import itself has succeeded
            log.warning("warming the commit reader with %s: %s", report.root.hex(), exc)
        return {"snapshot": report.root.hex(), "files": report.files, "bytes": report.bytes}

    def fork(self, snapshot: str) -> dict[str, Any]:
        root = self.store.resolve(snapshot)
        node = secrets.token_hex(6)
        # A clash of 48 random bits is all but impossible; yet a failed fork deletes its
        # node's dir, so it never takes a name whose dir exists.
        while (self.node_root / node).exists():
            node = secrets.token_hex(6)
        base, upper, work, merged = self._dirs(node)
        with self._node_lock(node):
            record = {"base": root.hex(), "head": None, "created": time.time(),
                      "boot": overlay.boot_id()}
            recorded = False
            try:
                # The helper creates the node's dirs and mounts while the record's
                # transaction commits here: its fsync costs the fork nothing more.
                with self.mounter.started(self._lower(root), str(upper), str(work),
                                          str(merged), make_dirs=True) as mounted:
                    self.store.add_node(node, record, root)
                    recorded = True
                    mounted()
            except Exception:  # whatever failed, the fork leaves nothing behind
                if recorded:
                    self.store.remove_node(node, root)
                shutil.rmtree(base, ignore_errors=True)
                raise
            self._set_link(node, merged)
        return {"node": node, "path": str(self.mountpoint / "nodes" / node),
                "snapshot": root.hex(), "dir": str(merged)}

    def commit(self, node: str) -> dict[str, Any]:
        with self._node_lock(check_node_id(node)):
            record = self._record(node)
            root = bytes.fromhex(record["base"])
            _, upper, _, merged = self._dirs(node)
            if not upper.is_dir():
                raise NotFound(f"node {node!r} has lost its upper dir")
            self._check_attached(node, merged)
            parent = record["head"] or record["base"]
            with self.store.writer() as w:
                try:
                    built = tree.apply_upper(self.reader, w, root, os.fsencode(upper),
                                             overlay.UPPER_DIR)
                except OppieError as exc:  # named as the user sees it, not in the upper dir
                    raise _renamed(exc, str(upper), str(self.mountpoint / "nodes" / node)) \
                        from exc
                record["head"] = built.oid.hex()
                rec = self.store.publish(w, built.oid, parent=parent, logical_bytes=built.bytes,
                                         files=built.files, node=(node, record))
        return {"snapshot": rec.id, "parent": parent, "node": node}

    def drop(self, node: str, *, force: bool = False) -> dict[str, Any]:
        with self._node_lock(check_node_id(node)):
            record = self._record(node)
            base, _, _, merged = self._dirs(node)
            overlay.unmount(str(merged), lazy=force)
            self._set_link(node, None)
            root = bytes.fromhex(record["base"])
            self.store.remove_node(node, root)
            if self.store.snapshot(root) is None:
                # That was the last pin of a pruned snapshot: its data is about to be swept,
                # so the kernel must forget the snapshots/<id> entry it may have re-cached.
                self.on_released(root.hex())
            # Deleting a big upper dir can take long: move it aside, the sweeper deletes it
            # (and a restart sweeps it: it has no record).
            try:
                base.rename(self.node_root / f"{TRASH_PREFIX}{node}")
            except OSError:
                shutil.rmtree(base, ignore_errors=True)
        with self._lock:
            self._node_locks.pop(node, None)
        self.gc_wanted.set()
        return {"node": node}

    def prune(self, snapshot: str) -> dict[str, Any]:
        root = self.store.resolve(snapshot)
        rec = self.store.release(root)
        if not rec.listed:
            self.on_released(rec.id)
        self.gc_wanted.set()
        return {"snapshot": root.hex(), "refs": rec.refs, "pins": rec.pins}

    def status(self) -> dict[str, Any]:
        s = self.store.stats()
        return {"snapshots": s.snapshots, "nodes": s.nodes, "objects": s.objects,
                "stored_bytes": s.stored_bytes, "logical_bytes": s.logical_bytes}

    # -- lifecycle ------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Re-attach every recorded node; sweep node dirs that have no record.

        Returns problems found. A node whose upper dir is gone is reported and kept (its
        record pins its base) so nothing is silently deleted.
        """
        problems = []
        records = self.store.nodes()
        # The mount table, read once: per node it cost O(mounts) each, and a store of 5,000
        # nodes took minutes to mount (found by a QA pass).
        mounted = {m.mountpoint for m in overlay.mounts()}
        for node, record in sorted(records.items()):
            _, upper, work, merged = self._dirs(node)
            if not upper.is_dir():
                problems.append(f"node {node}: upper dir {upper} is missing; "
                                "drop it to release its snapshot")
                continue
            if record.get("boot") != overlay.boot_id():
                problems.append(f"node {node}: the machine restarted since it was forked; its "
                                "uncommitted changes may be incomplete (volatile overlay)")
            try:
                if os.path.abspath(merged) in mounted:
                    overlay.unmount(str(merged), lazy=True)  # stacked on a dead lower
                # Scratch space only; a volatile overlay's marker in it blocks a remount.
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                merged.mkdir(exist_ok=True)
                self.mounter.mount(self._lower(bytes.fromhex(record["base"])), str(upper),
                                   str(work), str(merged))
                self._set_link(node, merged)
            except OppieError as exc:
                problems.append(f"node {node}: cannot re-attach: {exc}")
        for d in self.node_root.iterdir():
            if d.name not in records:
                merged = d / "merged"
                if os.path.abspath(merged) in mounted:
                    overlay.unmount(str(merged), lazy=True)
                shutil.rmtree(d, ignore_errors=True)
                log.info("swept stale node dir %s", d)
        for p in problems:
            log.warning("%s", p)
        self.ready.set()
        return problems

    def empty_trash(self, stop: threading.Event | None = None) -> None:
        """Delete dropped nodes' dirs, in a child process (``rm -rf`` at nice 19).

        Deleting them here, about 50 dropped nodes a second in a search loop, held this
        process's GIL in bursts that the commands in progress waited for: every op's P95
        rose 10-25% (bench/RESULTS.md). If ``rm`` cannot run, they are deleted here. Once
        ``stop`` is set (the daemon is stopping), the child is ended and no other started,
        so nothing deletes in the store after the daemon exits; the next start deletes
        what is left (a node dir without a record). A failure is logged when it changes
        (this runs about once a second).
        """
        stop = stop or threading.Event()
        dirs = sorted(str(d) for d in self.node_root.glob(f"{TRASH_PREFIX}*"))
        for i in range(0, len(dirs), TRASH_BATCH):
            if stop.is_set():
                return
            batch = dirs[i:i + TRASH_BATCH]
            try:
                proc = subprocess.Popen(["nice", "-n", "19", "rm", "-rf", "--", *batch],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
            except OSError as exc:
                self._trash_failed(f"cannot run rm ({exc}): deleting dropped node dirs in "
                                   "the daemon")
                for d in batch:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            while True:
                try:
                    _, err = proc.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if stop.is_set():
                        proc.terminate()
            if proc.returncode and not stop.is_set():
                self._trash_failed("deleting dropped node dirs: "
                                   + err.decode(errors="replace").strip())

    def _trash_failed(self, message: str) -> None:
        if message != self._trash_error:
            log.warning("%s", message)
            self._trash_error = message

    def detach_all(self) -> None:
        """Unmount every node overlay (lazily): on shutdown, before the FUSE mount goes."""
        for node in list(self._links):
            _, _, _, merged = self._dirs(node)
            try:
                overlay.unmount(str(merged), lazy=True)
            except OppieError as exc:
                log.warning("cannot detach node %s: %s", node, exc)
            self._set_link(node, None)

    def run_gc(self, stop: threading.Event, interval: float = 10.0,
               gap: float = GC_GAP_S) -> None:
        """Background sweeper: after prunes/drops (at most once per ``gap`` seconds, so a
        busy search loop pays for one sweep per second, not one per operation) and every
        ``interval`` seconds (which also applies commits' logged references). Its
        transactions go in the gaps between commands, paced (``_paced``); the sweeping
        itself runs in a child process (sweeper.py), off this process's GIL."""
        sweeper = Sweeper(self.store, self.busy_flag)
        try:
            while not stop.is_set():
                self.gc_wanted.wait(interval)
                self.gc_wanted.clear()
                if stop.is_set():
                    return
                self._wait_idle(stop)
                self.empty_trash(stop)
                try:
                    n, nbytes = sweeper.sweep(SWEEP_BATCH, self._paced(stop), stop)
                    if n:
                        log.info("gc: freed %d objects, %d bytes", n, nbytes)
                except OppieError as exc:
                    log.error("gc failed: %s", exc)
                except Exception:
                    log.exception("gc crashed")
                stop.wait(gap)
        finally:
            sweeper.close()


def _renamed(exc: OppieError, old: str, new: str) -> OppieError:
    """``exc`` with the paths under ``old`` named under ``new`` instead."""
    renamed = type(exc)(exc.message.replace(old, new))
    renamed.errno_name = exc.errno_name
    return renamed
