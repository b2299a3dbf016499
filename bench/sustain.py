"""Benchmark: does the background GC keep up with a search loop that never pauses?

bench/mcts.py times single operations; this one runs the same loop (fork a live snapshot,
edit 1-10 files, commit, drop, prune an older one once 6 are live) back to back through a
real mount for ``--iters`` iterations and samples the store (`status`) as it goes. Only 6
snapshots are ever live, so a sweeper that keeps up holds the store near its size after
the import; one that never gets a gap lets it grow by every commit's new objects. It also
counts dropped nodes' dirs not yet deleted (the trash). After the loop it waits ``--idle``
seconds and samples once more (the catch-up).

    .venv/bin/python bench/sustain.py                           # generated tree
    .venv/bin/python bench/sustain.py --only linux --iters 3000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import WORK, generated_tree, linux_tree, machine_note, write_result  # noqa: E402
from bench.mcts import POOL, Oppiefs, edit  # noqa: E402
from oppiefs.state import TRASH_PREFIX  # noqa: E402


def run(src: Path, iters: int, every: int, idle: float, seed: int) -> list[dict[str, float]]:
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                   if p.is_file() and not p.is_symlink())
    system = Oppiefs(WORK / "sustain")
    rng = random.Random(seed)
    samples = []

    def sample(i: int, t0: float) -> None:
        st = system.client.status()
        trash = sum(n.startswith(TRASH_PREFIX) for n in os.listdir(system.store / "nodes"))
        samples.append({"iters": i, "seconds": time.monotonic() - t0, "objects": st["objects"],
                        "stored_mb": st["stored_bytes"] / 1e6, "trash": trash})

    root = system.setup(src)
    try:
        pool = [root]
        t0 = time.monotonic()
        sample(0, t0)
        for i in range(1, iters + 1):
            node, path = system.fork(rng.choice(pool))
            edit(path, rng, files)
            pool.append(system.commit(node))
            system.drop(node)
            if len(pool) > POOL:
                system.prune(pool.pop(rng.randrange(1, len(pool) - 1)))
            if i % every == 0:
                sample(i, t0)
        time.sleep(idle)
        sample(-1, t0)  # after the idle wait
    finally:
        system.teardown()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["generated", "linux"], default="generated")
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500, help="sample the store this often")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds to wait at the end")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "sustain.json")
    args = ap.parse_args()
    src = {"generated": generated_tree, "linux": linux_tree}[args.only]()
    if src is None:
        sys.exit(f"{args.only}: corpus not available")
    print(machine_note())
    samples = run(src, args.iters, args.every, args.idle, args.seed)
    print(f"\n| {args.only}: iterations | seconds | objects | stored MB | trash dirs |\n"
          "|---|---|---|---|---|")
    for s in samples:
        label = f"idle {args.idle:g} s" if s["iters"] < 0 else str(s["iters"])
        print(f"| {label} | {s['seconds']:.0f} | {s['objects']:.0f} | {s['stored_mb']:.1f} | "
              f"{s['trash']} |")
    write_result(args, samples=samples)


if __name__ == "__main__":
    main()
