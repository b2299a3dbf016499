"""Benchmark: the cost of one wide directory on a commit's path, without FUSE or disk.

A commit rewrites every directory on its changed paths; a directory of thousands of
entries is stored in parts (tree.py), and a commit should pay for the parts it touches,
not for every entry. This script builds one directory of N files in a store and times, per
N, the two steps a commit takes on it:

- read: the directory decoded as a commit's reader finds it (its parts cached, as they are
  shared with earlier versions), with its totals and one lookup;
- commit step: one entry replaced (``tree.put_changes``), the new version handed to the
  reader, as a search loop does on top of its last commit, and looked up again next time.

Median of the repetitions, in microseconds; CPU-bound, so steadier than bench/mcts.py.

    .venv/bin/python bench/wide_dir.py
    .venv/bin/python bench/wide_dir.py --sizes 100,1000,10000 --reps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import WORK, machine_note, write_result  # noqa: E402
from oppiefs import tree  # noqa: E402


def entry(i: int, mtime: int = 0) -> tree.Entry:
    return tree.Entry(b"file%06d.c" % i, tree.T_FILE, 0o644, 0, 0, 0, mtime)


def measure(n: int, reps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        store = tree.open_store(Path(tmp) / "store")
        try:
            with store.writer() as w:
                built = tree.put_tree(w, [entry(i) for i in range(n)], 0, 0)
                store.publish(w, built.oid, parent=None, logical_bytes=0, files=n)
            reader = tree.commit_reader(store)
            probe = entry(n // 2).name
            read = []
            for _ in range(reps):
                reader.tree.cache_clear()  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                t = reader.tree(built.oid)
                _ = t.tally
                t.get(probe)
                read.append(time.perf_counter() - t0)
            step, cur = [], built.oid
            for k in range(reps):
                name = entry((k * 7919) % n).name
                t0 = time.perf_counter()
                lower = reader.tree(cur)
                low = lower.get(name)
                assert low is not None
                new = low._replace(mtime_ns=low.mtime_ns + 1)
                tally = lower.tally.copy()
                tally.count(low, -1)
                tally.count(new, 1)
                with store.writer() as w:  # aborted: nothing reaches the store
                    cur = tree.put_changes(w, lower, {name: new}, tally, reader, cur).oid
                step.append(time.perf_counter() - t0)
        finally:
            store.close()
    return {"read_us": statistics.median(read) * 1e6, "step_us": statistics.median(step) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500,2000,10000",
                    help="entries of the directory, comma-separated")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "wide_dir.json")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(machine_note())
    print("\n| entries | read us | commit step us |\n|---|---|---|")
    results = {}
    for n in (int(x) for x in args.sizes.split(",")):
        r = results[n] = measure(n, args.reps)
        print(f"| {n} | {r['read_us']:.0f} | {r['step_us']:.0f} |")
    write_result(args, results=results)


if __name__ == "__main__":
    main()
