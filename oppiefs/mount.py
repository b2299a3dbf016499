"""Start and stop the daemon: stale-mount recovery, pyfuse3 + trio, signals, background mode.

The daemon serves ``<mnt>`` (ctl, nodes/, the ``snapshots`` symlink) and runs the tree
server (trees.py) for the snapshot trees on ``<store>/trees``. Startup order matters: a
mountpoint left by a killed daemon still answers ``stat`` of its root from cached
attributes, so liveness is probed with ``statvfs`` (ENOTCONN when dead); every overlay
stacked on a dead mount is detached before the mountpoint is reused. The tree server is
up before the daemon mounts; nodes are re-attached once both serve, from a worker thread.
Shutdown goes the other way: overlays, ``<mnt>``, the tree server. In background mode the
parent returns only when the child reports ready, or exits non-zero with the reason from
the daemon's log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import trio

from . import overlay, tree
from .control import Control
from .errors import (
    Busy,
    InvalidArgument,
    NotFound,
    NotMounted,
    OppieError,
    as_oppie_error,
    error_line,
    from_errno_name,
    from_error_line,
    from_oserror,
)
from .fs import STATS_ENV, Operations, fuse_init, serve_requests, tune_gc, watch_signals
from .state import StateManager
from .store import lock_file
from .trees import DIR_NAME as TREES_DIR
from .trees import FSNAME as TREES_FSNAME
from .trees import TreeServer, mountpoint_of
from .vfs import Vfs

log = logging.getLogger("oppiefs.mount")

FSNAME = "oppiefs"
LOG_NAME = "oppiefs.log"
LOCK_NAME = "mount.lock"


# -- mount table helpers ------------------------------------------------------------------


def is_oppiefs_mount(path: str) -> bool:
    path = os.path.abspath(path)
    return any(m.mountpoint == path and m.fstype.startswith("fuse")
               for m in overlay.mounts())


ANSWER_S = 10.0  # how long a mount's daemon may take to answer a liveness probe


def mount_alive(path: str, timeout: float = ANSWER_S) -> bool:
    """True if a FUSE mount at ``path`` answers (a dead one fails statvfs with ENOTCONN).

    A daemon that is stopped or hung never answers, and a probe asked in this thread
    would wait with it forever: the probe runs in a daemon thread, and no answer within
    ``timeout`` is an error that says how to get out (the thread stays behind, stuck in
    the kernel, until the process exits)."""
    result: list[bool | OSError] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            os.listdir(path)
            result.append(True)
        except OSError as exc:
            result.append(exc)

    t = threading.Thread(target=probe, name="probe", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise Busy(f"the oppiefs daemon serving {path} does not answer (stopped or hung?); "
                   f"`umount -l {path}` detaches the mount")
    if isinstance(result[0], OSError):
        if result[0].errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return False
        raise result[0]
    return True


def prepare_mountpoint(mountpoint: str) -> None:
    if is_oppiefs_mount(mountpoint):
        if mount_alive(mountpoint):
            raise Busy(f"{mountpoint} is already mounted and alive")
        for m in overlay.detach_stale(mountpoint):
            log.warning("detached stale mount %s", m)
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from exc
    if not os.path.isdir(mountpoint):
        raise InvalidArgument(f"mountpoint {mountpoint} is not a directory")


def prepare_trees_mountpoint(path: str, wait_s: float = 5.0) -> None:
    """Make way for our tree server. One left by a daemon that died (we hold the store
    lock, so its daemon is gone) exits on its own within moments; whatever is still
    mounted after ``wait_s`` is detached, with the overlays stacked on it."""
    deadline = time.monotonic() + wait_s
    while is_oppiefs_mount(path) and mount_alive(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_oppiefs_mount(path):
        for m in overlay.detach_stale(path):
            log.warning("detached stale mount %s", m)
    os.makedirs(path, exist_ok=True)


def _lock_store(store_dir: Path) -> int:
    """One daemon per store: node dirs and overlays belong to exactly one mount."""
    return lock_file(store_dir / LOCK_NAME, exclusive=True,
                     busy=f"store {store_dir} is already served by another oppiefs daemon")


# -- the daemon -----------------------------------------------------------------------------


def check_layout(mountpoint: str, store_dir: Path) -> None:
    if os.path.commonpath([mountpoint, store_dir]) == mountpoint:
        raise InvalidArgument(f"store {store_dir} lies inside the mountpoint {mountpoint}, "
                              "which the mount would hide")


class Ready:
    """The pipe a background start waits on: one line, ``ok [problems]`` once serving or
    an ``error_line`` if the start failed (so the caller raises the same error, with its
    exit code, instead of guessing from the log). Sent once; later sends do nothing."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ok(self, problems: list[str]) -> None:
        self._send(" ".join(["ok", *"; ".join(problems).split()]).encode(errors="replace")
                   + b"\n")

    def error(self, exc: OppieError) -> None:
        self._send(error_line(exc))

    def _send(self, line: bytes) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.write(fd, line)
            except OSError:
                pass  # the caller is gone: nobody to tell
            finally:
                os.close(fd)


def serve(mountpoint: str, store_dir: Path, *, options: list[str] | None = None,
          debug: bool = False, notify_fd: int | None = None) -> None:
    """Run the daemon in the foreground until unmounted or signalled.

    The mountpoint is locked (a flock on the directory beneath the mount, held for the
    daemon's life) before it is checked and mounted, so two daemons started at once for
    one mountpoint cannot both pass the check and stack their mounts."""
    mountpoint = os.path.abspath(mountpoint)
    store_dir = Path(os.path.abspath(store_dir))
    ready = Ready(notify_fd)
    try:
        if "ro" in {o for opt in options or [] for o in opt.split(",")}:
            raise InvalidArgument("-o ro: the mount's ctl takes commands, which are writes "
                                  "(snapshots are read-only anyway)")
        check_layout(mountpoint, store_dir)
        prepare_mountpoint(mountpoint)
        mnt_fd = _lock_mountpoint(mountpoint)
        try:
            _serve(mountpoint, store_dir, options or [], ready)
        finally:
            os.close(mnt_fd)
    except BaseException as exc:
        err = as_oppie_error(exc)
        ready.error(err if err is not None
                    else OppieError(f"internal error: {type(exc).__name__}: {exc}"))
        if err is None or err is exc:
            raise
        raise err from exc


def _lock_mountpoint(mountpoint: str) -> int:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"mountpoint {mountpoint}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"{mountpoint} is being mounted by another oppiefs daemon") from None
    if is_oppiefs_mount(mountpoint):  # mounted before we locked: we opened its root
        os.close(fd)
        raise Busy(f"{mountpoint} is already mounted and alive")
    return fd


def _serve(mountpoint: str, store_dir: Path, options: list[str], ready: Ready) -> None:
    store_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock_store(store_dir)
    store = tree.open_store(store_dir)
    trees_mnt = mountpoint_of(store_dir)
    try:
        prepare_trees_mountpoint(str(trees_mnt))
        trees = TreeServer(store_dir, options)
    except OppieError:
        store.close()
        os.close(lock_fd)
        raise
    stats = os.environ.pop(STATS_ENV, None)  # the tree server counts (it serves the trees)
    if stats:
        signal.signal(signal.SIGUSR1, lambda *_: os.kill(trees.pid, signal.SIGUSR1))
    tune_gc()
    state = StateManager(store, mountpoint, trees_mnt)
    ops = Operations(Vfs(state.reader), Control(state), state.node_paths,
                     snapshots_link=os.fsencode(trees_mnt / "snapshots"),
                     after_command=trees.changed)
    state.on_released = trees.released

    opts = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}"}
    try:
        fuse_init(ops, mountpoint, opts, options)
    except OppieError:
        trees.stop()
        store.close()
        os.close(lock_fd)
        raise
    log.info("mounted %s (store %s, trees on %s)", mountpoint, store_dir, trees_mnt)
    stop_gc = threading.Event()
    gc_thread = threading.Thread(target=state.run_gc, args=(stop_gc,), name="gc", daemon=True)
    gc_thread.start()
    clean = False
    try:
        trio.run(_run, state, trees, ready)
        clean = True
    finally:
        stop_gc.set()
        state.gc_wanted.set()
        state.wake()
        state.detach_all()
        state.mounter.close()
        pyfuse3.close(unmount=True)
        trees.stop()
        gc_thread.join(timeout=10)
        store.close()
        os.close(lock_fd)
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


async def _run(state: StateManager, trees: TreeServer, ready: Ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)

        async def fuse_main() -> None:
            await serve_requests()
            nursery.cancel_scope.cancel()  # unmounted from outside

        async def watch_trees() -> None:
            code = await trio.to_thread.run_sync(trees.proc.wait, abandon_on_cancel=True)
            log.error("the tree server exited (%s): shutting down", code)
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_main)
        nursery.start_soon(watch_trees)
        problems = await trio.to_thread.run_sync(state.recover)
        ready.ok(problems)


# -- background start / stop ----------------------------------------------------------------


def start_background(mountpoint: str, store_dir: Path, *, options: list[str],
                     debug: bool, timeout: float = 120.0) -> str:
    """Spawn the daemon detached; return once it serves (or raise with its reason)."""
    store_dir = Path(os.path.abspath(store_dir))
    check_layout(os.path.abspath(mountpoint), store_dir)  # before the store dir is made
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise from_oserror(exc, f"store {store_dir}") from exc
    logfile = store_dir / LOG_NAME
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "oppiefs.cli", "mount", "--foreground", "--notify-fd", str(w),
           "--store", str(store_dir), os.path.abspath(mountpoint)]
    for opt in options:
        cmd += ["-o", opt]
    if debug:
        cmd.append("--debug")
    # The daemon runs in / (a daemon left in the caller's cwd would keep that file system
    # from being unmounted), so it finds this package by path, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True, cwd="/", env=env)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    eof = False
    try:
        while time.monotonic() < deadline and not eof:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                chunk = os.read(r, 4096)
                eof = not chunk or chunk.endswith(b"\n")
                data += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(r)
    if data.startswith(b"ok"):
        return data[2:].decode().strip()
    said = from_error_line(data)
    if said is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise from_errno_name(said.errno_name, f"mount failed: {said.message} (log: {logfile})")
    try:
        proc.wait(timeout=10 if eof else 0.1)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise OppieError(f"daemon did not become ready within {timeout:.0f}s "
                         f"(log: {logfile})") from None
    raise OppieError(f"mount failed: {_last_error(logfile)} (log: {logfile})")


def _last_error(logfile: Path) -> str:
    try:
        lines = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "daemon exited"
    return lines[-1].split("oppiefs: ", 1)[-1] if lines else "daemon exited"


def umount(mountpoint: str, *, timeout: float = 30.0) -> None:
    """Unmount the FUSE mount and with it every node; wait for the daemon to let go.

    All or nothing: a node or ``ctl`` still in use (a shell's cwd, an open file, a client's
    handle) is found before anything is unmounted, and the answer is EBUSY with everything
    still served. Unmounting the nodes one by one first left the mount half torn down when
    one of them was busy: nodes that looked empty, and writes into them hidden. The daemon
    detaches the nodes itself when ``<mnt>`` goes (lazily: a process that got in meanwhile
    keeps its view, and its writes land in the upper dir, which the next mount attaches).
    """
    mountpoint = os.path.abspath(mountpoint)
    if not is_oppiefs_mount(mountpoint):
        raise NotFound(f"{mountpoint} is not an oppiefs mount")
    if not mount_alive(mountpoint):
        detach_dead(mountpoint)
        return
    try:  # node overlays sit on the tree server's mount, which snapshots/ leads to
        trees_mnt = os.path.dirname(os.readlink(os.path.join(mountpoint, "snapshots")))
    except OSError:
        trees_mnt = mountpoint
    busy = [m for m in overlay.overlays_on(trees_mnt) if overlay.in_use(m)]
    if busy:
        raise Busy(f"cannot unmount {mountpoint}: a process still uses "
                   f"{_listed([os.path.basename(os.path.dirname(m)) for m in busy], 'node')}"
                   " (its cwd or an open file); nothing was unmounted")
    if overlay.in_use(mountpoint):
        raise Busy(f"cannot unmount {mountpoint}: a process still uses it (an open ctl "
                   "handle, a Client, a cwd); nothing was unmounted")
    if trees_mnt != mountpoint and overlay.in_use(trees_mnt):  # overlays hold clones of it
        raise Busy(f"cannot unmount {mountpoint}: a process still reads a snapshot (its cwd "
                   f"or an open file under {mountpoint}/snapshots); nothing was unmounted")
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip() or f"fusermount3 exited {res.returncode}"
        if "busy" in msg.lower():
            raise Busy(f"{mountpoint} is busy: {msg}")
        raise NotMounted(msg)
    # The daemon takes its tree server down last, then closes the store: only then may the
    # next mount of the same store or mountpoint start (it would find them locked).
    deadline = time.monotonic() + timeout
    while (is_oppiefs_mount(mountpoint) or is_oppiefs_mount(trees_mnt)
           or _locked(Path(trees_mnt).parent / LOCK_NAME) or _locked(Path(mountpoint))):
        if time.monotonic() > deadline:
            raise Busy(f"{mountpoint} is unmounted, but its daemon has not let go of its "
                       f"store within {timeout:.0f} s (stopped or hung?); see "
                       f"{Path(trees_mnt).parent / LOG_NAME}")
        time.sleep(0.02)


def _locked(path: Path) -> bool:
    """Whether a daemon still holds its flock on ``path`` (asked without creating it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _listed(names: list[str], what: str, most: int = 5) -> str:
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                       else "")
    return f"{what}{'s' if len(names) > 1 else ''} {shown}"


def detach_dead(mountpoint: str) -> list[str]:
    """Clean up after a daemon that died: its mount, every tree server mount that no
    longer answers, and every node overlay whose lower is not served any more. A dead
    ``<mnt>`` cannot say which store it served; but a tree server exits with its daemon
    (its mount dead, or gone, with the overlays still on it), so those are stale whichever
    store they belong to, and a live daemon's nodes always sit on a live tree server.
    Returns what went."""
    gone = overlay.detach_stale(mountpoint)
    live = set()
    for m in overlay.mounts():
        if m.fstype.startswith("fuse") and m.source == TREES_FSNAME:
            if _answers(m.mountpoint):
                live.add(m.mountpoint)
            else:
                gone += overlay.detach_stale(m.mountpoint)
    for merged, lower in overlay.overlay_lowers():
        trees, sep, _ = lower.rpartition(f"/{TREES_DIR}/snapshots/")
        if sep and trees + f"/{TREES_DIR}" not in live:
            overlay.unmount(merged, lazy=True)
            gone.append(merged)
    for m in gone:
        log.warning("detached stale mount %s", m)
    return gone


def _answers(path: str) -> bool:
    try:
        return mount_alive(path)
    except (OSError, OppieError):
        return True  # not ours to judge (another error; or alive, though hung)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
