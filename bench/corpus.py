"""Benchmark corpora shared by every bench script: a generated tree and the kernel tree.

Both live under one work dir (default /var/tmp/oppiefs-bench, or OPPIEFS_BENCH_DIR) and are
made once: the generated tree (2,000 files, 50 MB, fixed seed) from tests.treeutil, the
kernel tree unpacked from Debian's linux-source-6.1 tarball (None when it is not installed),
and a sample of the kernel tree (2,000 of its files at their own paths): a small tree as
deep as the kernel tree, to tell what a commit's cost follows, the depth of the changed
paths or the size of the tree.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.treeutil import make_sized_tree  # noqa: E402

LINUX_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
WORK = Path(os.environ.get("OPPIEFS_BENCH_DIR", "/var/tmp/oppiefs-bench"))


HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def machine_note() -> str:
    """The machine a result was measured on, with what moves FUSE round trips most.

    In a KVM guest with cpuidle-haltpoll, ``guest_halt_poll_ns`` 0 (a boot parameter on
    some VMs) makes every wake-up of an idle vCPU an exit to the host: each FUSE request
    that a sleeping client waits for then costs ~20 us instead of ~8 (see RESULTS.md).
    """
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = subprocess.run(["df", "--output=fstype,source", str(WORK.parent)], text=True,
                        capture_output=True, check=False).stdout.split()[-2:]
    note = (f"{platform.node()}: {os.cpu_count()} CPU ({cpu}), {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"work dir on {' '.join(fs)}, load {os.getloadavg()[0]:.1f} at start")
    if HALT_POLL.exists():
        note += f", guest_halt_poll_ns {HALT_POLL.read_text().strip()}"
    return note


@contextlib.contextmanager
def guest_halt_poll(ns: int | None) -> Iterator[None]:
    """Set ``guest_halt_poll_ns`` for a run (None: leave it) and restore it afterwards."""
    if ns is None:
        yield
        return
    if not HALT_POLL.exists():
        raise SystemExit(f"--guest-halt-poll-ns: no {HALT_POLL} (not a haltpoll KVM guest)")
    saved = HALT_POLL.read_text().strip()
    HALT_POLL.write_text(str(ns))
    try:
        yield
    finally:
        HALT_POLL.write_text(saved)


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def generated_tree(work: Path = WORK, files: int = 2000, total_bytes: int = 50_000_000,
                   seed: int = 0) -> Path:
    name = f"generated-{files}x{total_bytes // 1_000_000}MB-seed{seed}"
    root, stamp = work / name, work / f"{name}.done"
    if not stamp.exists():
        rmtree(root)
        make_sized_tree(root, files=files, total_bytes=total_bytes, seed=seed)
        stamp.touch()
    return root


def linux_tree(work: Path = WORK) -> Path | None:
    root = work / "linux-source-6.1"
    if root.is_dir():
        return root
    if not LINUX_TARBALL.exists():
        print(f"skipping the kernel tree: {LINUX_TARBALL} is not installed "
              "(apt-get install linux-source-6.1)", file=sys.stderr)
        return None
    print(f"unpacking {LINUX_TARBALL} into {work} (once) ...", file=sys.stderr)
    tmp = work / ".unpack"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    subprocess.run(["tar", "-xJf", str(LINUX_TARBALL), "-C", str(tmp)], check=True)
    (tmp / "linux-source-6.1").rename(root)
    tmp.rmdir()
    return root


def linux_sample_tree(work: Path = WORK, files: int = 2000, seed: int = 0) -> Path | None:
    """``files`` regular files of the kernel tree drawn at random, copied to the same
    relative paths: the kernel tree's depths at the generated tree's size (its directories
    hold fewer entries than the kernel's, as a small tree's do)."""
    src = linux_tree(work)
    if src is None:
        return None
    name = f"linux-sample-{files}-seed{seed}"
    root, stamp = work / name, work / f"{name}.done"
    if not stamp.exists():
        rmtree(root)
        rels = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                      if p.is_file() and not p.is_symlink())
        for rel in random.Random(seed).sample(rels, files):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, root / rel)
        stamp.touch()
    return root


def write_result(args: argparse.Namespace, **result: object) -> None:
    """Write a run's JSON to ``args.out``: when, on what machine, with which arguments."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": dt.datetime.now().isoformat(timespec="seconds"),
                                    "machine": machine_note(),
                                    "args": vars(args) | {"out": str(args.out)}, **result},
                                   indent=1))
    print(f"\nwrote {args.out}")


def warm(root: Path) -> tuple[int, int]:
    """Read every file once so timed steps start with the same (warm) page cache."""
    files = nbytes = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    nbytes += len(chunk)
            files += 1
    return files, nbytes
