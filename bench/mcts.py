"""Benchmark: a simulated MCTS loop (fork, edit <= 10 files, commit, drop, prune) on oppiefs
and on the peers a user would otherwise pick, in the same run, on the same trees.

Each system implements the same five operations; one driver runs the same seeded workload
on all of them and records per-operation latencies:

- oppiefs: the Python client over the control file of a real mount (fresh store).
- cp -a: fork = copy a snapshot dir, commit = copy the node dir to a new snapshot dir,
  drop/prune = rm -rf.
- git worktree: fork = ``git worktree add --detach``, commit = ``git add -A && git commit``,
  drop = ``git worktree remove --force``, prune = delete the snapshot's ref.
- OverlayFS on plain dirs (Docker-style layers): fork = mount an overlay over the
  snapshot's layer chain, commit = ``cp -a`` of the upper dir into a new layer, drop =
  unmount + rm, prune = remove the layer once no other snapshot's chain needs it.
- btrfs (when mkfs.btrfs and a loop device work): fork = writable subvolume snapshot,
  commit = read-only snapshot, drop/prune = subvolume delete.

Edits touch random files anywhere in the tree; ``--spread clustered`` picks them around
one random file instead (its directory, then wider), as an agent working on one module
would: a commit then rewrites fewer directories. ``--only linux-sample`` runs a third,
diagnostic tree: 2,000 of the kernel tree's files at their own paths, as small as the
generated tree and as deep as the kernel tree.

Slow peers get fewer iterations on big trees (``--peer-iters``); percentiles say how many
samples they rest on. Goals (oppiefs, both trees): fork P95 <= 10 ms, commit P95 <= 30 ms,
prune P95 <= 10 ms, drop P95 <= 20 ms, kernel-tree / small-tree P95 ratio <= 1.5 per op.

    .venv/bin/python bench/mcts.py                       # both trees, all peers
    .venv/bin/python bench/mcts.py --only generated --iters 100 --peers cp,overlay
    .venv/bin/python bench/mcts.py --only linux --peers none --iters 600 --warmup 600
    .venv/bin/python bench/mcts.py --peers none --iters 1000 --warmup 600 --rounds 4

On a noisy VM the two trees' runs, a minute apart, drift apart by more than the ratio
goal's margin: fork, drop and prune, which cost about the same on both trees, gave ratios of
0.83-2.35 in one evening of single rounds (bench/RESULTS.md). ``--rounds`` repeats the
oppiefs runs with the trees' order alternating, prints each round's ratios and checks the
goals on all rounds' samples pooled. ``--interleave BLOCK`` goes further: it mounts every
tree at once and runs BLOCK iterations of each in turn, so both trees' samples come from the
same minutes (after its block, a mount is left to finish its background work, up to
``--settle`` seconds, so that its sweeping is not timed in the other tree's block):

    .venv/bin/python bench/mcts.py --peers none --iters 1000 --warmup 600 --interleave 100

The table of ratios by round ends with each round's host steal time (`/proc/stat`), the
share of CPU time the host gave this VM's vCPUs to others: a round that runs 2x slower than
the next with steal to match was a busy host, not a slow build.

The first few hundred commits after importing a big tree are slower than the later ones
(bench/RESULTS.md); ``--warmup`` leaves them out to measure a long search's steady state.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import (  # noqa: E402
    WORK,
    generated_tree,
    linux_sample_tree,
    linux_tree,
    machine_note,
    rmtree,
    warm,
)
from oppiefs.client import Client  # noqa: E402

OPS = ("fork", "commit", "drop", "prune")
GOALS_MS = {"fork": 10.0, "commit": 30.0, "prune": 10.0, "drop": 20.0}
POOL = 6  # live snapshots kept; older random ones are pruned


def sh(*argv: str | os.PathLike[str], cwd: Path | None = None) -> str:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


class System:
    name = "?"

    def __init__(self, work: Path) -> None:
        self.work = work

    def setup(self, tree: Path) -> Any: ...
    def fork(self, snap: Any) -> tuple[Any, Path]: ...
    def commit(self, node: Any) -> Any: ...
    def drop(self, node: Any) -> None: ...
    def prune(self, snap: Any) -> None: ...
    def teardown(self) -> None: ...


def cpu_ticks(pid: int) -> int:
    """CPU time (clock ticks) of a process and its descendants that are alive."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += map(int, (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total


class Oppiefs(System):
    name = "oppiefs"

    def setup(self, tree: Path) -> Any:
        rmtree(self.work)
        self.mnt, self.store = self.work / "mnt", self.work / "store"
        self.mnt.mkdir(parents=True)
        with open(self.work / "log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oppiefs.cli", "mount", "-f", "--store", str(self.store),
                 str(self.mnt)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not (self.mnt / "ctl").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.work / "log").read_text())
            time.sleep(0.05)
        self.client = Client(self.mnt)
        return self.client.import_(tree)

    def fork(self, snap: str) -> tuple[Any, Path]:
        node = self.client.fork(snap)
        return node.id, Path(node.path)

    def commit(self, node: str) -> str:
        return self.client.commit(node)

    def drop(self, node: str) -> None:
        self.client.drop(node)

    def prune(self, snap: str) -> None:
        self.client.prune(snap)

    def wait_quiet(self, timeout: float, poll: float = 0.25) -> None:
        """Wait until the daemon and its children (the sweeper) use no CPU for a poll."""
        deadline = time.monotonic() + timeout
        last = cpu_ticks(self.proc.pid)
        while time.monotonic() < deadline:
            time.sleep(poll)
            now = cpu_ticks(self.proc.pid)
            if now - last <= 1:
                return
            last = now

    def teardown(self) -> None:
        self.client.close()
        subprocess.run([sys.executable, "-m", "oppiefs.cli", "umount", str(self.mnt)],
                       capture_output=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        for line in Path("/proc/mounts").read_text().splitlines():
            mp = line.split()[1]
            if mp.startswith(str(self.work)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        rmtree(self.work)


class CopyAll(System):
    name = "cp -a"

    def setup(self, tree: Path) -> Any:
        rmtree(self.work)
        self.work.mkdir(parents=True)
        self.n = 0
        base = self.work / "snap-0"
        sh("cp", "-a", tree, base)
        return base

    def _new(self, kind: str) -> Path:
        self.n += 1
        return self.work / f"{kind}-{self.n}"

    def fork(self, snap: Path) -> tuple[Any, Path]:
        node = self._new("node")
        sh("cp", "-a", snap, node)
        return node, node

    def commit(self, node: Path) -> Path:
        snap = self._new("snap")
        sh("cp", "-a", node, snap)
        return snap

    def drop(self, node: Path) -> None:
        shutil.rmtree(node)

    def prune(self, snap: Path) -> None:
        shutil.rmtree(snap)

    def teardown(self) -> None:
        rmtree(self.work)


class GitWorktree(System):
    name = "git worktree"
    ENV: ClassVar[dict[str, str]] = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                                     "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}

    def setup(self, tree: Path) -> Any:
        rmtree(self.work)
        self.work.mkdir(parents=True)
        self.repo = self.work / "repo"
        sh("cp", "-a", tree, self.repo)
        os.environ.update(self.ENV)
        sh("git", "init", "-q", cwd=self.repo)
        # Snapshot everything, ignored files too (the kernel tree ignores dotfiles).
        sh("git", "add", "-A", "--force", cwd=self.repo)
        sh("git", "commit", "-qm", "base", "--no-verify", cwd=self.repo)
        self.n = 0
        return sh("git", "rev-parse", "HEAD", cwd=self.repo)

    def fork(self, snap: str) -> tuple[Any, Path]:
        self.n += 1
        node = self.work / f"wt-{self.n}"
        sh("git", "worktree", "add", "-q", "--detach", node, snap, cwd=self.repo)
        return node, node

    def commit(self, node: Path) -> str:
        sh("git", "add", "-A", "--force", cwd=node)
        sh("git", "commit", "-qm", "step", "--no-verify", "--allow-empty", cwd=node)
        rev = sh("git", "rev-parse", "HEAD", cwd=node)
        sh("git", "update-ref", f"refs/snaps/{rev}", rev, cwd=self.repo)
        return rev

    def drop(self, node: Path) -> None:
        sh("git", "worktree", "remove", "--force", node, cwd=self.repo)

    def prune(self, snap: str) -> None:
        sh("git", "update-ref", "-d", f"refs/snaps/{snap}", cwd=self.repo)

    def teardown(self) -> None:
        rmtree(self.work)


class PlainOverlay(System):
    name = "overlayfs layers"

    def setup(self, tree: Path) -> Any:
        rmtree(self.work)
        (self.work / "layers").mkdir(parents=True)
        sh("cp", "-a", tree, self.work / "layers" / "0")
        self.n = 0
        self.chains: dict[str, list[str]] = {"0": ["0"]}  # snapshot -> layers, top first
        self.nodes: dict[str, tuple[Path, str]] = {}
        return "0"

    def fork(self, snap: str) -> tuple[Any, Path]:
        self.n += 1
        d = self.work / f"node-{self.n}"
        for sub in ("upper", "work", "merged"):
            (d / sub).mkdir(parents=True)
        lower = ":".join(str(self.work / "layers" / x) for x in self.chains[snap])
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={lower},upperdir={d}/upper,workdir={d}/work", d / "merged")
        self.nodes[d.name] = (d, snap)
        return d.name, d / "merged"

    def commit(self, node: str) -> str:
        d, parent = self.nodes[node]
        self.n += 1
        layer = str(self.n)
        sh("cp", "-a", d / "upper", self.work / "layers" / layer)
        self.chains[layer] = [layer, *self.chains[parent]]
        return layer

    def drop(self, node: str) -> None:
        d, _ = self.nodes.pop(node)
        sh("umount", d / "merged")
        shutil.rmtree(d)

    def prune(self, snap: str) -> None:
        del self.chains[snap]
        used = {x for chain in self.chains.values() for x in chain}
        if snap not in used:
            shutil.rmtree(self.work / "layers" / snap)

    def teardown(self) -> None:
        for d, _ in self.nodes.values():
            subprocess.run(["umount", "-l", str(d / "merged")], capture_output=True)
        rmtree(self.work)


class Btrfs(System):
    name = "btrfs snapshots"

    @staticmethod
    def available() -> bool:
        return shutil.which("mkfs.btrfs") is not None and "btrfs" in open(
            "/proc/filesystems").read()

    def setup(self, tree: Path) -> Any:
        rmtree(self.work)
        self.work.mkdir(parents=True)
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and
                   not f.is_symlink())
        img = self.work / "btrfs.img"
        with open(img, "wb") as f:
            f.truncate(max(2 << 30, size * 4))
        sh("mkfs.btrfs", "-q", img)
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()
        sh("mount", "-o", "loop", img, self.mnt)
        sh("btrfs", "subvolume", "create", self.mnt / "base")
        sh("cp", "-a", f"{tree}/.", self.mnt / "base")
        self.n = 0
        sh("btrfs", "subvolume", "snapshot", "-r", self.mnt / "base", self.mnt / "snap-0")
        return self.mnt / "snap-0"

    def fork(self, snap: Path) -> tuple[Any, Path]:
        self.n += 1
        node = self.mnt / f"node-{self.n}"
        sh("btrfs", "subvolume", "snapshot", snap, node)
        return node, node

    def commit(self, node: Path) -> Path:
        self.n += 1
        snap = self.mnt / f"snap-{self.n}"
        sh("btrfs", "subvolume", "snapshot", "-r", node, snap)
        return snap

    def drop(self, node: Path) -> None:
        sh("btrfs", "subvolume", "delete", node)

    def prune(self, snap: Path) -> None:
        sh("btrfs", "subvolume", "delete", snap)

    def teardown(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        rmtree(self.work)


def pick(rng: random.Random, files: list[str], k: int, spread: str) -> list[str]:
    """``k`` files anywhere in the tree ("random"), or around one random file ("clustered":
    its directory first, then its parent's subtree, as an agent fixing one module does)."""
    if spread == "random":
        return rng.sample(files, k)
    chosen = [rng.choice(files)]
    scope = os.path.dirname(chosen[0])
    while len(chosen) < k:
        near = [f for f in files if f.startswith(scope + "/" if scope else "") and f not in chosen]
        if len(near) >= k - len(chosen) or not scope:
            chosen += rng.sample(near, min(k - len(chosen), len(near)))
            break
        scope = os.path.dirname(scope)
    return chosen


def edit(node: Path, rng: random.Random, files: list[str], spread: str = "random") -> None:
    """The agent's step: touch 1-10 files (append/overwrite), sometimes create or delete."""
    for rel in pick(rng, files, rng.randint(1, 10), spread):
        p = node / rel
        if rng.random() < 0.5:
            with open(p, "ab") as f:
                f.write(rng.randbytes(64))
        else:
            with open(p, "wb") as f:
                f.write(rng.randbytes(rng.randint(0, 4096)))
    if rng.random() < 0.2:
        (node / f"new-{rng.getrandbits(32):08x}.txt").write_bytes(rng.randbytes(200))


class Loop:
    """One system's search loop on one tree, an iteration at a time (``step``)."""

    def __init__(self, system: System, tree: Path, seed: int, spread: str = "random") -> None:
        self.system, self.spread = system, spread
        self.rng = random.Random(seed)
        self.files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*")
                            if p.is_file() and not p.is_symlink())
        self.lat: dict[str, list[float]] = {op: [] for op in OPS}
        self.pool = [system.setup(tree)]

    def step(self, counting: bool) -> None:
        def timed(op: str, fn: Callable[..., Any], *args: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args)
            if counting:
                self.lat[op].append(time.perf_counter() - t)
            return out

        system, rng, pool = self.system, self.rng, self.pool
        node, path = timed("fork", system.fork, rng.choice(pool))
        edit(path, rng, self.files, self.spread)
        snap = timed("commit", system.commit, node)
        timed("drop", system.drop, node)
        pool.append(snap)
        if len(pool) > POOL:
            timed("prune", system.prune, pool.pop(rng.randrange(1, len(pool) - 1)))


def run(system: System, tree: Path, iters: int, seed: int,
        spread: str = "random", warmup: int = 0) -> dict[str, list[float]]:
    """Latencies of ``iters`` iterations, after ``warmup`` uncounted ones on the same store."""
    loop = Loop(system, tree, seed, spread)  # a failed setup tears nothing down
    try:
        for i in range(warmup + iters):
            loop.step(i >= warmup)
    finally:
        system.teardown()
    return loop.lat


def interleaved(trees: dict[str, Path], iters: int, seed: int, spread: str, warmup: int,
                block: int, settle: float) -> dict[str, dict[str, list[float]]]:
    """oppiefs on every tree at once (a mount each), ``block`` iterations of one tree, then
    of the next: a slow minute of the VM falls on all trees alike. Before a block, the
    mount that ran the last one is left to finish its background work (sweeps, deleting
    dropped nodes: more of it on the bigger tree), up to ``settle`` seconds, so that it is
    not timed in the next tree's block."""
    loops: dict[str, Loop] = {}
    try:
        for tname, tree in trees.items():
            loops[tname] = Loop(Oppiefs(WORK / f"mcts-interleaved-{tname}"), tree, seed, spread)
        done = dict.fromkeys(trees, 0)
        while min(done.values()) < warmup + iters:
            for tname, loop in loops.items():
                todo = min(block, warmup + iters - done[tname])
                for i in range(done[tname], done[tname] + todo):
                    loop.step(i >= warmup)
                done[tname] += todo
                loop.system.wait_quiet(settle)
    finally:
        for loop in loops.values():
            loop.system.teardown()
    return {tname: loop.lat for tname, loop in loops.items()}


def pct(values: list[float], p: float, scale: float = 1e3) -> float:
    """Percentile ``p`` of ``values`` (seconds, in ms by default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * scale


def summarize(lat: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {op: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99)}
            for op, v in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["generated", "linux", "linux-sample"],
                    help="one tree (linux-sample: 2,000 of the kernel tree's files at their "
                         "paths, a diagnostic run only on request)")
    ap.add_argument("--iters", type=int, default=200, help="oppiefs iterations per tree")
    ap.add_argument("--peer-iters", type=int, default=None,
                    help="iterations for peers (default: 30 on the small tree, 8 on linux)")
    ap.add_argument("--peers", default="cp,git,overlay,btrfs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spread", choices=["random", "clustered"], default="random",
                    help="edited files: anywhere in the tree, or around one random file")
    ap.add_argument("--warmup", type=int, default=0,
                    help="oppiefs iterations run first and not counted: the steady state of "
                         "a long search instead of the first commits after the import")
    ap.add_argument("--rounds", type=int, default=1,
                    help="oppiefs runs per tree, the trees' order alternating (peers run in "
                         "the first round only); the goals are checked on every round's "
                         "samples pooled, and each round's ratio is printed too")
    ap.add_argument("--interleave", type=int, default=0, metavar="BLOCK",
                    help="run oppiefs on all trees at once, BLOCK iterations of each in turn "
                         "(each round: warmup + iters per tree), so that the ratio compares "
                         "the same minutes")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="with --interleave: at most this many seconds for a mount to finish "
                         "its background work after its block")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "mcts.json")
    args = ap.parse_args()

    trees: dict[str, Path | None] = {}
    if args.only in (None, "generated"):
        trees["generated"] = generated_tree()
    if args.only in (None, "linux"):
        trees["linux"] = linux_tree()
    if args.only == "linux-sample":
        trees["linux-sample"] = linux_sample_tree()
    peers: list[type[System]] = []
    for name, cls in [("cp", CopyAll), ("git", GitWorktree), ("overlay", PlainOverlay),
                      ("btrfs", Btrfs)]:
        if name in args.peers.split(","):
            if cls is Btrfs and not Btrfs.available():
                print("skipping btrfs: mkfs.btrfs or kernel support missing", file=sys.stderr)
                continue
            peers.append(cls)

    results: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                               "machine": machine_note(),
                               "command": " ".join(sys.argv), "trees": {}}
    present = {t: p for t, p in trees.items() if p is not None}
    rounds: dict[str, list[dict[str, list[float]]]] = {t: [] for t in present}
    steal = results["host_steal_by_round"] = []
    for r in range(args.rounds):
        steal0 = host_steal()
        # Alternate the trees' order: a slow minute of this VM then falls on each in turn.
        for tname in (list(present) if r % 2 == 0 else list(present)[::-1]):
            tree = present[tname]
            nfiles, nbytes = warm(tree)
            print(f"\n== {tname}: {nfiles} files, {nbytes / 1e6:.0f} MB"
                  + (f", round {r + 1} of {args.rounds}" if args.rounds > 1 else ""),
                  file=sys.stderr)
            res = results["trees"].setdefault(
                tname, {"files": nfiles, "bytes": nbytes, "systems": {"oppiefs": {}}})
            for cls in ([Oppiefs] if not args.interleave else []) + (peers if r == 0 else []):
                n = args.iters if cls is Oppiefs else (
                    args.peer_iters or (8 if tname == "linux" else 30))
                print(f"   {cls.name}: {n} iterations ...", file=sys.stderr)
                lat = run(cls(WORK / f"mcts-{cls.__name__.lower()}"), tree, n, args.seed + r,
                          args.spread, args.warmup if cls is Oppiefs else 0)
                if cls is Oppiefs:
                    rounds[tname].append(lat)
                else:
                    res["systems"][cls.name] = summarize(lat)
        if args.interleave:
            print(f"   oppiefs, all trees at once in blocks of {args.interleave}: "
                  f"{args.iters} iterations each ...", file=sys.stderr)
            order = dict(sorted(present.items(), reverse=r % 2 == 1))
            for tname, lat in interleaved(order, args.iters, args.seed + r, args.spread,
                                          args.warmup, args.interleave, args.settle).items():
                rounds[tname].append(lat)
        steal1 = host_steal()
        steal.append((steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]))
    for tname, runs in rounds.items():
        res = results["trees"][tname]
        res["systems"]["oppiefs"] = summarize(
            {op: [v for lat in runs for v in lat[op]] for op in OPS})
        if args.rounds > 1:
            res["rounds"] = [summarize(lat) for lat in runs]
        print_table(tname, res)
    check_goals(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def print_table(tname: str, res: dict[str, Any]) -> None:
    print(f"\n### {tname} ({res['files']} files, {res['bytes'] / 1e6:.0f} MB), latency in ms")
    print("| system | n | " + " | ".join(f"{op} p50 / p95 / p99" for op in OPS) + " |")
    print("|---|---|" + "---|" * len(OPS))
    for name, s in res["systems"].items():
        cells = [f"{s[op]['p50']:.1f} / {s[op]['p95']:.1f} / {s[op]['p99']:.1f}" for op in OPS]
        print(f"| {name} | {s['fork']['n']} | " + " | ".join(cells) + " |")


def host_steal() -> tuple[int, int]:
    """(steal, all) CPU ticks of this machine so far (/proc/stat). Steal is time the host
    gave this VM's vCPUs to something else while they had work: the slow minutes that make
    one round of this benchmark 2x another."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def check_goals(results: dict[str, Any]) -> None:
    trees = results["trees"]
    print("\n### oppiefs goals")
    print("| tree | op | P95 ms | goal | ok |")
    print("|---|---|---|---|---|")
    checks = results["goals"] = []
    for tname, res in trees.items():
        s = res["systems"]["oppiefs"]
        for op, goal in GOALS_MS.items():
            ok = s[op]["p95"] <= goal
            checks.append({"tree": tname, "op": op, "p95": s[op]["p95"], "goal": goal, "ok": ok})
            verdict = "yes" if ok else "NO"
            print(f"| {tname} | {op} | {s[op]['p95']:.2f} | <= {goal:g} | {verdict} |")
    if "generated" in trees and "linux" in trees:
        big, small = trees["linux"], trees["generated"]
        for op in OPS:
            ratio = big["systems"]["oppiefs"][op]["p95"] / small["systems"]["oppiefs"][op]["p95"]
            ok = ratio <= 1.5
            checks.append({"tree": "linux/generated", "op": op, "ratio": ratio, "ok": ok})
            print(f"| linux / generated | {op} | ratio {ratio:.2f} | <= 1.5 | "
                  f"{'yes' if ok else 'NO'} |")
        if "rounds" in big:
            print("\n### kernel / small P95 ratio by round (rounds alternate the trees' order)")
            print("| op | " + " | ".join(f"round {k + 1}" for k in range(len(big["rounds"])))
                  + " |")
            print("|---|" + "---|" * len(big["rounds"]))
            for op in OPS:
                ratios = [b[op]["p95"] / s[op]["p95"]
                          for b, s in zip(big["rounds"], small["rounds"], strict=True)]
                results.setdefault("round_ratios", {})[op] = ratios
                print(f"| {op} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
            print("| host steal, share of CPU time | "
                  + " | ".join(f"{x:.1%}" for x in results["host_steal_by_round"]) + " |")


if __name__ == "__main__":
    main()
