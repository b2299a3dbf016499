"""Benchmark: reading snapshots through the mount against the same tree on the native disk.

What it measures, each snapshot figure next to the native one from the same run:

* ``tar -cf - . | wc -c`` and ``find . -ls | wc -l`` in the tree root, cold (after
  ``sync; echo 3 > /proc/sys/vm/drop_caches``) and warm (median of the following runs, native
  and snapshot interleaved so background load hits both alike). Outputs must match byte for
  byte count / line count, which also checks that the snapshot is the same tree.
* sequential read of one large file (``--big-mb``, default 256 MiB), cold and warm.
* FUSE requests per file / directory: a second daemon runs with ``OPPIEFS_REQUEST_STATS``
  (per handler counters, dumped on SIGUSR1) and the counts of one warm ``tar`` and one warm
  ``find -ls`` are divided by the tree's files / directories. Counting is off in the timed
  daemon.
* daemon memory: 10 distinct snapshots of the tree (the import plus 9 fork/append/commit
  variants, each changing one file), each walked with ``find -ls``; the daemon's VmRSS,
  RssAnon (its own heap) and RssFile (clean LMDB map pages, reclaimable page cache) after
  every walk against the inodes it holds; then ``echo 2 > drop_caches`` to make the kernel
  forget them and the same figures again.

Goals (the "Mount" issue): warm tar <= 2.5x native on the kernel tree, warm large-file read
<= 1.1x, warm find -ls <= 2x, <= 300 bytes of daemon memory per cached inode, memory returned
when the kernel forgets.

Trees: a generated one (2,000 files, 50 MB, fixed seed) and Debian's linux-source-6.1, both
made once under --work by bench/corpus.py (the kernel tree is unpacked from /usr/src, and
skipped with a message if the tarball is absent). Needs root (drop_caches, FUSE).

    .venv/bin/python bench/read.py                    # both trees; bench/out/read.json
    .venv/bin/python bench/read.py --only generated --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import (  # noqa: E402
    WORK,
    generated_tree,
    guest_halt_poll,
    linux_tree,
    machine_note,
)
from oppiefs.client import Client  # noqa: E402
from tests.mountutil import Daemon as FixtureDaemon  # noqa: E402

PY = sys.executable
TAR = "tar -cf - . | wc -c"
FIND = "find . -ls | wc -l"
GOALS = {"tar": 2.5, "find": 2.0, "big": 1.1, "bytes_per_inode": 300}


# -- trees ------------------------------------------------------------------------------------


def big_file_dir(work: Path, mb: int) -> Path:
    """A directory holding one incompressible file of ``mb`` MiB (blake3 XOF, cached)."""
    import blake3

    root = work / f"read-big-{mb}M"
    path = root / "big.bin"
    if not (path.exists() and path.stat().st_size == mb << 20):
        root.mkdir(parents=True, exist_ok=True)
        xof = blake3.blake3(b"oppiefs-read-bench")
        with open(path, "wb") as f:
            for off in range(0, mb << 20, 8 << 20):
                f.write(xof.digest(length=8 << 20, seek=off))
    return root


# -- the daemon -------------------------------------------------------------------------------


class Daemon(FixtureDaemon):
    """The test fixture's daemon (ready signal, no mount or process left behind), plus what
    the benchmark reads off it: memory, and request counts when started with ``stats``."""

    def __init__(self, store: Path, mnt: Path, stats: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OPPIEFS_REQUEST_STATS"}
        if stats:
            env["OPPIEFS_REQUEST_STATS"] = str(stats)
        super().__init__(mnt, store, env=env)
        self.stats = stats

    @property
    def pid(self) -> int:
        """The tree server's: it serves the snapshots and holds their inodes (the daemon
        itself serves only ctl and nodes/)."""
        return self.tree_server_pid()

    def memory(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def counts(self) -> dict[str, int]:
        """Per-handler request counts so far (and the inode table size), via SIGUSR1."""
        assert self.stats is not None
        before = self.stats.stat().st_mtime_ns if self.stats.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(200):
            if self.stats.exists() and self.stats.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.stats.read_text())
                except ValueError:
                    pass  # replaced while reading
            time.sleep(0.01)
        raise SystemExit("daemon did not write its request counts")


# -- measurements -----------------------------------------------------------------------------


def drop_caches(level: int = 3) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")


def run(cmd: str, cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd!r} in {cwd} failed: {proc.stderr.strip()}")
    return elapsed, proc.stdout.strip()


def read_file(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def compare(name: str, cmd: str, native: Path, snap: Path, runs: int) -> dict:
    """Cold (both after drop_caches) then warm (interleaved, median) for one command."""
    out: dict = {"command": cmd}
    drop_caches()
    t_n, o_n = run(cmd, native)
    drop_caches()
    t_s, o_s = run(cmd, snap)
    if o_n != o_s:
        raise SystemExit(f"{name}: snapshot output {o_s} != native {o_n}")
    out["cold"] = {"native": round(t_n, 3), "snapshot": round(t_s, 3)}
    warm_n, warm_s = [], []
    for _ in range(runs + 1):  # the first pass only warms both
        warm_n.append(run(cmd, native)[0])
        warm_s.append(run(cmd, snap)[0])
    out["warm_samples"] = {"native": [round(t, 3) for t in warm_n[1:]],
                           "snapshot": [round(t, 3) for t in warm_s[1:]]}
    m_n, m_s = statistics.median(warm_n[1:]), statistics.median(warm_s[1:])
    out["warm"] = {"native": round(m_n, 3), "snapshot": round(m_s, 3)}
    out["ratio"] = {"cold": round(t_s / t_n, 2), "warm": round(m_s / m_n, 2)}
    out["output"] = o_n
    print(f"  {name}: cold {t_n:.2f}s native / {t_s:.2f}s snapshot, warm {m_n:.2f}s / "
          f"{m_s:.2f}s ({m_s / m_n:.2f}x)", file=sys.stderr)
    return out


def big_read(native: Path, snap: Path, runs: int) -> dict:
    mb = native.stat().st_size / 2**20
    drop_caches()
    c_n = read_file(native)
    drop_caches()
    c_s = read_file(snap)
    warm_n, warm_s = [], []
    for _ in range(runs + 1):
        warm_n.append(read_file(native))
        warm_s.append(read_file(snap))
    m_n, m_s = statistics.median(warm_n[1:]), statistics.median(warm_s[1:])
    print(f"  big file {mb:.0f} MiB: cold {mb / c_n:.0f} / {mb / c_s:.0f} MiB/s, warm "
          f"{mb / m_n:.0f} / {mb / m_s:.0f} MiB/s ({m_s / m_n:.2f}x)", file=sys.stderr)
    return {"mib": mb,
            "cold_s": {"native": round(c_n, 3), "snapshot": round(c_s, 3)},
            "warm_s": {"native": round(m_n, 3), "snapshot": round(m_s, 3)},
            "cold_mib_s": {"native": round(mb / c_n), "snapshot": round(mb / c_s)},
            "warm_mib_s": {"native": round(mb / m_n), "snapshot": round(mb / m_s)},
            "ratio": {"cold": round(c_s / c_n, 2), "warm": round(m_s / m_n, 2)}}


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a.get(k, 0) for k in b if k not in ("pid", "inodes") and b[k] != a.get(k)}


def requests(d: Daemon, snap: Path, files: int, dirs: int) -> dict:
    """Requests of one warm tar and one warm find -ls, per file opened / directory listed."""
    run(TAR, snap)
    run(FIND, snap)  # both warm now
    out = {}
    for name, cmd in (("tar", TAR), ("find", FIND)):
        before = d.counts()
        run(cmd, snap)
        ops = delta(before, d.counts())
        total = sum(ops.values())
        out[name] = {"requests": ops, "total": total}
        # Per file and per directory of the tree: with kernel-cached listings no OPENDIR
        # arrives at all, so the requests' own counts cannot be the denominators.
        if name == "tar":
            out[name]["files_opened"] = ops.get("open", 0)
            out[name]["per_open"] = round(total / max(files, 1), 2)
        else:
            out[name]["dirs_listed"] = ops.get("opendir", 0)
            out[name]["per_dir"] = round(total / max(dirs, 1), 2)
    print(f"  requests: warm tar {out['tar']['per_open']}/open {out['tar']['requests']}; "
          f"warm find {out['find']['per_dir']}/dir {out['find']['requests']}",
          file=sys.stderr)
    return out


def settle(d: Daemon, timeout: float = 60.0) -> dict[str, int]:
    """Counts once the inode table stops shrinking (forgets arrive in batches)."""
    last, deadline = d.counts(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = d.counts()
        if now["inodes"] == last["inodes"]:
            return now
        last = now
    return last


def memory(d: Daemon, snap_id: str, variants: int = 9) -> dict:
    """Walk 10 distinct snapshots; RSS against inodes held; then let the kernel forget."""
    client = Client(d.mnt)
    ids = [snap_id]
    try:
        for i in range(variants):
            node = client.fork(ids[-1])
            victim = next(p for p in sorted(Path(node.path).rglob("*"))
                          if p.is_file() and not p.is_symlink())
            with open(victim, "a") as f:
                f.write(f"\nread bench variant {i + 1}\n")
            ids.append(client.commit(node))
            client.drop(node)
    finally:
        client.close()
    if len(set(ids)) != len(ids):
        raise SystemExit("variants did not give distinct snapshots")
    drop_caches(2)
    settle(d)
    base = {**d.memory(), "inodes": d.counts()["inodes"]}
    walks = []
    for ident in ids:
        run(FIND, d.mnt / "snapshots" / ident)
        walks.append({**d.memory(), "inodes": d.counts()["inodes"]})
    drop_caches(2)
    after = {**d.memory(), "inodes": settle(d)["inodes"]}
    peak = walks[-1]
    held = peak["inodes"] - base["inodes"]
    incr = peak["inodes"] - walks[0]["inodes"]
    out = {
        "snapshots": len(ids), "before": base, "walks": walks, "after_forget": after,
        "bytes_per_inode": {
            "anon": round((peak["RssAnon"] - base["RssAnon"]) / held),
            "rss": round((peak["VmRSS"] - base["VmRSS"]) / held),
            "anon_after_first_walk": round((peak["RssAnon"] - walks[0]["RssAnon"]) / incr),
        },
        "anon_returned": round((peak["RssAnon"] - after["RssAnon"])
                               / max(peak["RssAnon"] - base["RssAnon"], 1), 2),
    }
    mib = 2**20
    print(f"  memory: {held} inodes over {len(ids)} snapshots: RssAnon "
          f"{base['RssAnon'] / mib:.0f} -> {peak['RssAnon'] / mib:.0f} MiB "
          f"({out['bytes_per_inode']['anon']} B/inode), VmRSS {base['VmRSS'] / mib:.0f} -> "
          f"{peak['VmRSS'] / mib:.0f} MiB; after drop_caches: {after['inodes']} inodes, "
          f"RssAnon {after['RssAnon'] / mib:.0f} MiB, VmRSS {after['VmRSS'] / mib:.0f} MiB",
          file=sys.stderr)
    return out


def import_tree(store: Path, src: Path) -> str:
    res = subprocess.run([PY, "-m", "oppiefs.cli", "import", "--store", str(store), str(src)],
                         capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"import of {src} failed: {res.stderr.strip()}")
    return res.stdout.split()[0]


def count_tree(root: Path) -> tuple[int, int]:
    files = dirs = 0
    for _, dnames, fnames in os.walk(root):
        dirs += len(dnames)
        files += sum(1 for n in fnames)
    return files, dirs + 1


# -- report -----------------------------------------------------------------------------------


def table(doc: dict) -> str:
    rows = ["| tree | measure | native | snapshot | ratio | goal |",
            "|---|---|---|---|---|---|"]
    for r in doc["trees"]:
        for what in ("tar", "find"):
            m = r[what]
            for phase in ("cold", "warm"):
                goal = f"<= {GOALS[what]}x" if phase == "warm" and r["tree"].startswith(
                    "linux") else ""
                cmd = m["command"].replace("|", "\\|")
                rows.append(f"| {r['tree']} | {phase} `{cmd}` | "
                            f"{m[phase]['native']:.2f} s | {m[phase]['snapshot']:.2f} s | "
                            f"{m['ratio'][phase]:.2f}x | {goal} |")
        q = r["requests"]
        rows.append(f"| {r['tree']} | FUSE requests per file (warm tar) | | "
                    f"{q['tar']['per_open']} | | |")
        rows.append(f"| {r['tree']} | FUSE requests per directory (warm find -ls) | | "
                    f"{q['find']['per_dir']} | | |")
        mem = r["memory"]
        mib = 2**20
        peak, after = mem["walks"][-1], mem["after_forget"]
        rows.append(f"| {r['tree']} | daemon after walking {mem['snapshots']} snapshots "
                    f"({peak['inodes']} inodes) | | RssAnon {peak['RssAnon'] / mib:.0f} MiB, "
                    f"VmRSS {peak['VmRSS'] / mib:.0f} MiB | "
                    f"{mem['bytes_per_inode']['anon']} B/inode (VmRSS "
                    f"{mem['bytes_per_inode']['rss']}) | <= 300 B |")
        rows.append(f"| {r['tree']} | after `echo 2 > drop_caches` ({after['inodes']} inodes) "
                    f"| | RssAnon {after['RssAnon'] / mib:.0f} MiB, VmRSS "
                    f"{after['VmRSS'] / mib:.0f} MiB | {mem['anon_returned']:.0%} of the "
                    f"growth returned | returned |")
    b = doc.get("big")
    if b:
        for phase in ("cold", "warm"):
            goal = "<= 1.1x" if phase == "warm" else ""
            rows.append(f"| {b['mib']:.0f} MiB file | {phase} sequential read | "
                        f"{b[f'{phase}_mib_s']['native']} MiB/s | "
                        f"{b[f'{phase}_mib_s']['snapshot']} MiB/s | "
                        f"{b['ratio'][phase]:.2f}x time | {goal} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=WORK,
                    help="cache and scratch dir (source trees, store and mounts)")
    ap.add_argument("--runs", type=int, default=5, help="warm runs per measure (median)")
    ap.add_argument("--big-mb", type=int, default=256)
    ap.add_argument("--only", choices=["generated", "linux"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--guest-halt-poll-ns", type=int, metavar="NS",
                    help="run with this guest_halt_poll_ns (KVM guests; restored afterwards)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: drop_caches and FUSE/overlay mounts")
    with guest_halt_poll(args.guest_halt_poll_ns):
        run_all(args)


def run_all(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    trees: list[tuple[str, Path]] = []
    if args.only in (None, "generated"):
        trees.append(("generated-2000x50MB", generated_tree(args.work)))
    if args.only in (None, "linux"):
        linux = linux_tree(args.work)
        if linux is not None:
            trees.append(("linux-source-6.1", linux))
    big = big_file_dir(args.work, args.big_mb)

    scratch = args.work / "read-run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    store = scratch / "store"
    doc: dict = {"benchmark": "read", "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "machine": machine_note(), "command": " ".join([Path(PY).name, *sys.argv]),
                 "goals": GOALS, "trees": []}
    timed = Daemon(store, scratch / "mnt")
    counted = Daemon(store, scratch / "mnt-stats", stats=scratch / "stats.json")
    try:
        ids = {name: import_tree(store, src) for name, src in trees}
        big_id = import_tree(store, big)
        timed.start()
        for name, src in trees:
            files, dirs = count_tree(src)
            print(f"{name}: {files} files, {dirs} directories", file=sys.stderr)
            snap = timed.mnt / "snapshots" / ids[name]
            doc["trees"].append({
                "tree": name, "path": str(src), "files": files, "dirs": dirs,
                "snapshot": ids[name],
                "tar": compare("tar", TAR, src, snap, args.runs),
                "find": compare("find -ls", FIND, src, snap, args.runs),
            })
        doc["big"] = big_read(big / "big.bin", timed.mnt / "snapshots" / big_id / "big.bin",
                              args.runs)
        timed.stop()
        counted.start()
        for r in doc["trees"]:
            print(f"{r['tree']}: request counts and memory", file=sys.stderr)
            snap = counted.mnt / "snapshots" / r["snapshot"]
            r["requests"] = requests(counted, snap, r["files"], r["dirs"])
            r["memory"] = memory(counted, r["snapshot"])
        counted.stop()
    finally:
        timed.stop()
        counted.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    (args.out / "read.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{doc['date']}  {doc['machine']}\n$ {doc['command']}\n")
    print(table(doc))
    print(f"\nwrote {args.out / 'read.json'}")


if __name__ == "__main__":
    main()
