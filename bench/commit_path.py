"""Benchmark: the commit path without FUSE (apply an upper dir to a tree, publish it).

bench/mcts.py times commits through a real mount, where the ctl round trip, the overlay and
this VM's drift blur differences of a few hundred microseconds. This script makes the same
edits as bench/mcts.py (1-10 random files overwritten or appended to, sometimes a new file
at the root) as a plain upper dir on the host, and times ``tree.apply_upper`` and
``Store.publish`` on a store of each tree, in wall and CPU time. It also counts the write
syscalls of each publish and their KiB: LMDB writes each run of adjacent dirty pages with
one, and the fsync waits for each run as one request to the disk. The counts repeat from
run to run; this VM's timings drift. Snapshots are forked from a pool of 6 and pruned as in
the MCTS loop; the sweeper runs every 200 commits, untimed. Use it to compare two versions
of the code on the same machine minute; bench/mcts.py has the goals.

    .venv/bin/python bench/commit_path.py                          # both trees
    .venv/bin/python bench/commit_path.py --only linux --iters 400 --warmup 400
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import (  # noqa: E402
    WORK,
    generated_tree,
    linux_sample_tree,
    linux_tree,
    machine_note,
    rmtree,
    write_result,
)
from bench.mcts import POOL, pct, pick  # noqa: E402
from oppiefs import fs, overlay, tree  # noqa: E402

PHASES = ("apply", "publish", "total", "apply_cpu", "publish_cpu")
COUNTS = ("publish_writes", "publish_kib")
IO = Path("/proc/thread-self/io")


def thread_writes() -> tuple[int, int]:
    """(write syscalls, bytes written) of the calling thread so far."""
    fields = dict(line.split(": ") for line in IO.read_text().splitlines())
    return int(fields["syscw"]), int(fields["wchar"])


def upper_edit(upper: Path, src: Path, rng: random.Random, files: list[str]) -> None:
    """bench/mcts.py's edit as overlay would record it: touched files copied up whole."""
    rmtree(upper)
    upper.mkdir(parents=True)
    for rel in pick(rng, files, rng.randint(1, 10), "random"):
        p = upper / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.5:
            shutil.copyfile(src / rel, p)
            with open(p, "ab") as f:
                f.write(rng.randbytes(64))
        else:
            p.write_bytes(rng.randbytes(rng.randint(0, 4096)))
    if rng.random() < 0.2:
        (upper / f"new-{rng.getrandbits(32):08x}.txt").write_bytes(rng.randbytes(200))


def run(src: Path, work: Path, iters: int, warmup: int, seed: int) -> dict[str, list[float]]:
    rmtree(work)
    store = tree.open_store(work / "store")
    try:
        root = tree.import_dir(store, src).root
        reader = tree.commit_reader(store)  # as the daemon's commit reader ...
        reader.warm(root, tree.COMMIT_TREES)  # ... after its import
        files = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                       if p.is_file() and not p.is_symlink())
        rng = random.Random(seed)
        upper = work / "upper"
        pool = [root]
        lat: dict[str, list[float]] = {k: [] for k in PHASES + COUNTS}
        for i in range(warmup + iters):
            base = rng.choice(pool)
            upper_edit(upper, src, rng, files)
            t0, c0 = time.perf_counter(), time.thread_time()
            with store.writer() as w:
                built = tree.apply_upper(reader, w, base, os.fsencode(upper), overlay.UPPER_DIR)
                t1, c1 = time.perf_counter(), time.thread_time()
                w1 = thread_writes()
                store.publish(w, built.oid, parent=base.hex(), logical_bytes=built.bytes,
                              files=built.files)
            t2, c2 = time.perf_counter(), time.thread_time()
            w2 = thread_writes()
            if i >= warmup:
                for k, v in zip(PHASES, (t1 - t0, t2 - t1, t2 - t0, c1 - c0, c2 - c1),
                                strict=True):
                    lat[k].append(v)
                lat["publish_writes"].append(w2[0] - w1[0])
                lat["publish_kib"].append((w2[1] - w1[1]) / 1024)
            pool.append(built.oid)
            if len(pool) > POOL:
                store.release(pool.pop(rng.randrange(1, len(pool) - 1)))
            if i % 200 == 199:
                store.sweep()
        return lat
    finally:
        store.close()
        rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["generated", "linux", "linux-sample"],
                    help="one tree (linux-sample, bench/corpus.py's diagnostic tree, runs "
                         "only on request)")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=400, help="uncounted commits first")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "commit_path.json")
    args = ap.parse_args()
    fs.tune_gc()  # as the daemon does
    trees = {"generated": generated_tree, "linux": linux_tree,
             "linux-sample": linux_sample_tree}
    results = {}
    print(machine_note())
    print("\n| tree | n | " + " | ".join(f"{k} p50 / p95 ms" for k in PHASES)
          + " | " + " | ".join(f"{k} p50 / p95" for k in COUNTS) + " |")
    print("|---|---|" + "---|" * (len(PHASES) + len(COUNTS)))
    for name, make in trees.items():
        if name != args.only and (args.only or name == "linux-sample"):
            continue
        src = make()
        if src is None:
            print(f"| {name} | skipped: corpus not available |")
            continue
        lat = run(src, WORK / f"commit-path-{name}", args.iters, args.warmup, args.seed)
        results[name] = {k: {"p50": pct(v, 50, 1 if k in COUNTS else 1e3),
                             "p95": pct(v, 95, 1 if k in COUNTS else 1e3)}
                         for k, v in lat.items()}
        digits = {k: 1 if k in COUNTS else 2 for k in lat}
        cells = " | ".join(f"{r['p50']:.{digits[k]}f} / {r['p95']:.{digits[k]}f}"
                           for k, r in results[name].items())
        print(f"| {name} | {args.iters} | {cells} |")
    write_result(args, results=results)


if __name__ == "__main__":
    main()
