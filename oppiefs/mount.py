"""Start and stop the daemon: stale-mount recovery, pyfuse3 + trio, signals, background mode.

Startup order matters: a mountpoint left by a killed daemon still answers ``stat`` of its
root from cached attributes, so liveness is probed with ``statvfs`` (ENOTCONN when dead);
every overlay stacked on a dead mount is detached before the mountpoint is reused. Nodes are
re-attached only once the FUSE loop is serving, from a worker thread (the overlay mount
looks up its lowerdir on our own mount). In background mode the parent returns only when
the child reports ready, or exits non-zero with the reason from the daemon's log.
"""

from __future__ import annotations

import errno
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
from .errors import Busy, InvalidArgument, NotFound, NotMounted, OppieError
from .fs import Operations, serve_requests
from .state import StateManager
from .store import lock_file
from .vfs import SNAPSHOTS_INO, Vfs

log = logging.getLogger("oppiefs.mount")

FSNAME = "oppiefs"
LOG_NAME = "oppiefs.log"
LOCK_NAME = "mount.lock"
READAHEAD_KB = 1024


# -- mount table helpers ------------------------------------------------------------------


def is_oppiefs_mount(path: str) -> bool:
    path = os.path.abspath(path)
    return any(m.mountpoint == path and m.fstype.startswith("fuse")
               for m in overlay.mounts())


def mount_alive(path: str) -> bool:
    """True if a FUSE mount at ``path`` answers (a dead one fails statvfs with ENOTCONN)."""
    try:
        os.statvfs(path)
        os.listdir(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return False
        raise
    return True


def detach_stale(mountpoint: str) -> list[str]:
    """Lazily unmount a dead FUSE mount and every overlay stacked on it; returns what went."""
    gone = []
    for m in overlay.overlays_on(mountpoint):
        overlay.unmount(m, lazy=True)
        gone.append(m)
    overlay.unmount(mountpoint, lazy=True)
    gone.append(mountpoint)
    return gone


def prepare_mountpoint(mountpoint: str) -> None:
    if is_oppiefs_mount(mountpoint):
        if mount_alive(mountpoint):
            raise Busy(f"{mountpoint} is already mounted and alive")
        for m in detach_stale(mountpoint):
            log.warning("detached stale mount %s", m)
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from exc
    if not os.path.isdir(mountpoint):
        raise InvalidArgument(f"mountpoint {mountpoint} is not a directory")


def _lock_store(store_dir: Path) -> int:
    """One daemon per store: node dirs and overlays belong to exactly one mount."""
    return lock_file(store_dir / LOCK_NAME, exclusive=True,
                     busy=f"store {store_dir} is already served by another oppiefs daemon")


# -- the daemon -----------------------------------------------------------------------------


def serve(mountpoint: str, store_dir: Path, *, options: list[str] | None = None,
          debug: bool = False, notify_fd: int | None = None) -> None:
    """Run the daemon in the foreground until unmounted or signalled."""
    mountpoint = os.path.abspath(mountpoint)
    store_dir = Path(os.path.abspath(store_dir))
    store_dir.mkdir(parents=True, exist_ok=True)
    prepare_mountpoint(mountpoint)
    lock_fd = _lock_store(store_dir)
    store = tree.open_store(store_dir)
    state = StateManager(store, mountpoint)
    fs_vfs = Vfs(state.reader)  # one cache: commits find the trees FUSE lookups decoded
    ops = Operations(fs_vfs, Control(state), state.node_paths)
    state.on_released = lambda root: pyfuse3.invalidate_entry_async(
        SNAPSHOTS_INO, root.encode(), ignore_enoent=True)

    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={FSNAME}", f"subtype={FSNAME}"}
    for opt in options or []:
        opts |= {o for o in opt.split(",") if o}
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as exc:
        store.close()
        raise OppieError(f"cannot mount {mountpoint}: {exc}") from exc
    log.info("mounted %s (store %s)", mountpoint, store_dir)
    _set_readahead(mountpoint)
    stop_gc = threading.Event()
    gc_thread = threading.Thread(target=state.run_gc, args=(stop_gc,), name="gc", daemon=True)
    gc_thread.start()
    clean = False
    try:
        trio.run(_run, state, notify_fd)
        clean = True
    finally:
        stop_gc.set()
        state.gc_wanted.set()
        state.detach_all()
        state.mounter.close()
        pyfuse3.close(unmount=True)
        gc_thread.join(timeout=10)
        store.close()
        os.close(lock_fd)
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


def _set_readahead(mountpoint: str) -> None:
    """Read ahead 1 MiB on our mount (the kernel gives FUSE 128 KiB): sequential reads of
    large files need half the round trips. Found via mountinfo, never by touching the
    mountpoint (its requests are not being served yet)."""
    for m in reversed(overlay.mounts()):  # the newest mount there is ours
        if m.mountpoint == mountpoint and m.fstype.startswith("fuse") and m.device:
            try:
                Path(f"/sys/class/bdi/{m.device}/read_ahead_kb").write_text(f"{READAHEAD_KB}\n")
            except OSError as exc:
                log.info("cannot raise readahead of %s: %s", mountpoint, exc.strerror)
            return


async def _run(state: StateManager, notify_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery.cancel_scope)

        async def fuse_main() -> None:
            await serve_requests()
            nursery.cancel_scope.cancel()  # unmounted from outside

        nursery.start_soon(fuse_main)
        problems = await trio.to_thread.run_sync(state.recover)
        if notify_fd is not None:
            msg = "ok\n" if not problems else "ok " + "; ".join(problems) + "\n"
            os.write(notify_fd, msg.encode())
            os.close(notify_fd)


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: shutting down", sig)
            scope.cancel()
            return


# -- background start / stop ----------------------------------------------------------------


def start_background(mountpoint: str, store_dir: Path, *, options: list[str],
                     debug: bool, timeout: float = 120.0) -> str:
    """Spawn the daemon detached; return once it serves (or raise with its reason)."""
    store_dir = Path(os.path.abspath(store_dir))
    store_dir.mkdir(parents=True, exist_ok=True)
    logfile = store_dir / LOG_NAME
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "oppiefs.cli", "mount", "--foreground", "--notify-fd", str(w),
           "--store", str(store_dir), os.path.abspath(mountpoint)]
    for opt in options:
        cmd += ["-o", opt]
    if debug:
        cmd.append("--debug")
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True)
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
    """Unmount nodes, then the FUSE mount; wait for the daemon to let go."""
    mountpoint = os.path.abspath(mountpoint)
    if not is_oppiefs_mount(mountpoint):
        raise NotFound(f"{mountpoint} is not an oppiefs mount")
    if not mount_alive(mountpoint):
        detach_stale(mountpoint)
        return
    for m in overlay.overlays_on(mountpoint):
        overlay.unmount(m)  # Busy if an agent still works inside a node
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip() or f"fusermount3 exited {res.returncode}"
        if "busy" in msg.lower():
            raise Busy(f"{mountpoint} is busy: {msg}")
        raise NotMounted(msg)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_oppiefs_mount(mountpoint):
        time.sleep(0.05)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
