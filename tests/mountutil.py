"""A real oppiefs daemon for tests: start in the foreground, wait until mounted, clean up.

``Daemon.start`` polls until the mountpoint is a live FUSE mount and fails fast, with the
daemon's log, if the process dies first. ``Daemon.stop`` always leaves no mount behind:
node overlays and the FUSE mount are unmounted (lazily if busy), then the process is
terminated (killed if it lingers). ``sweep_mounts`` lazily unmounts leftovers under a
directory (used at session start and end).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mounts_under(prefix: str | Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of FUSE/overlay mounts at or below ``prefix``, deepest first."""
    prefix = str(prefix).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].encode().decode("unicode_escape")
            fstype = right.split()[0]
            if (fstype.startswith("fuse") or fstype == "overlay") and (
                mp == prefix or mp.startswith(prefix + "/")
            ):
                found.append((mp, fstype))
    return sorted(found, key=lambda m: -len(m[0]))


def overlays_on(mnt: str | Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "overlay" and f"lowerdir={mnt}/" in right:
                out.append(left.split()[4])
    return out


def lazy_umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def sweep_mounts(prefix: str | Path, *, only_dead: bool = False) -> list[str]:
    """Lazily unmount FUSE/overlay mounts at or below ``prefix``.

    ``only_dead``: leave live mounts alone (another test session may be using them) and
    take only FUSE mounts whose daemon is gone plus overlays whose lower is not served.
    """
    gone = []
    for mp, fstype in mounts_under(prefix):
        if only_dead and _alive(mp, fstype):
            continue
        lazy_umount(mp)
        gone.append(mp)
    return gone


def _alive(mp: str, fstype: str) -> bool:
    try:
        if fstype == "overlay":
            os.listdir(mp)  # reads the lower: fails when its FUSE daemon is gone
        else:
            os.statvfs(mp)
    except OSError:
        return False
    return True


def is_live_mount(path: Path) -> bool:
    if not any(mp == str(path) for mp, fs in mounts_under(path) if fs.startswith("fuse")):
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def oppiefs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "oppiefs.cli", *args]


class DaemonDied(RuntimeError):
    pass


class Daemon:
    def __init__(self, mnt: Path, store: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.mnt = Path(mnt)
        self.store = Path(store)
        self.extra = list(extra)
        self.env = env  # the daemon's environment (None: this process's)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.store.parent / f"{self.store.name}-daemon.log"

    def start(self, timeout: float = 30.0) -> Daemon:
        """Start and wait for the daemon's own ready signal (sent once nodes are re-attached)."""
        with contextlib.suppress(OSError):  # a dead mount there answers ENOTCONN: the daemon
            self.mnt.mkdir(parents=True, exist_ok=True)  # itself must clean that up
        r, w = os.pipe()
        logf = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            oppiefs_cmd("mount", "-f", "--notify-fd", str(w), "--store", str(self.store),
                        str(self.mnt), *self.extra),
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=ROOT, pass_fds=(w,),
            env=self.env)
        logf.close()
        os.close(w)
        self.problems = ""
        try:
            deadline = time.monotonic() + timeout
            data = b""
            while time.monotonic() < deadline and not data.endswith(b"\n"):
                ready, _, _ = select.select([r], [], [], 0.1)
                if ready:
                    chunk = os.read(r, 4096)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(r)
        if data.startswith(b"ok") and is_live_mount(self.mnt):
            self.problems = data[2:].decode().strip()
            return self
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # the ready pipe closed: the daemon is on its way out
        died = self.proc.poll() is not None
        self.stop()
        if died:
            raise DaemonDied(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        raise DaemonDied(f"daemon not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def tree_server_pid(self) -> int:
        """The daemon's tree server (trees.py): the process that serves snapshot trees."""
        pid = self.child_pid("oppiefs.trees")
        if pid is None:
            raise AssertionError("the daemon runs no tree server")
        return pid

    def child_pid(self, module: str) -> int | None:
        """The daemon's child process running ``python -m <module>`` (any thread's child)."""
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for pid in map(int, (task / "children").read_text().split()):
                    with contextlib.suppress(OSError):
                        if module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                            return pid
        return None

    def kill(self) -> None:
        """SIGKILL the daemon, leaving its (now dead) mounts in place, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Unmount everything this daemon served and end it; never leaves a mount."""
        try:
            for mp in overlays_on(self.mnt) + overlays_on(self.store / "trees"):
                lazy_umount(mp)
            if any(mp == str(self.mnt) for mp, _ in mounts_under(self.mnt)):
                res = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
                if res.returncode != 0:
                    lazy_umount(str(self.mnt))
            sweep_mounts(self.mnt)
            sweep_mounts(self.store)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            sweep_mounts(self.mnt)
            sweep_mounts(self.store)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
