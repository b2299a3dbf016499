"""Benchmark: ``oppiefs import`` (fresh store, then a re-import) against ``cp -a``.

Why ``cp -a``: importing a tree is, to the user, "make a safe copy of this directory"; the
cheapest way to do that without oppiefs is ``cp -a`` to the same disk. Goals: import no
slower than ``cp -a`` (ratio <= 1.0), re-import (everything already stored) <= 0.3x.

Fairness: every tree is read once before timing so all steps start with a warm page cache;
``sync`` runs before each timed step so earlier writeback does not slow it down. Copies
are removed only at the end (see ``bench_tree``), and the script should not be started
within ~5 minutes of deleting a big tree on the same ext4 filesystem. oppiefs
fsyncs its store before ``import`` returns while ``cp -a`` leaves dirty pages behind, so
each step is timed twice: the command alone, and the command plus the ``sync`` that makes
its result durable. Ratios are reported for both; the "+sync" figures are like for like.

Trees: a generated one (2,000 files, 50 MB, mixed sizes, fixed seed) and Debian's
linux-source-6.1 (unpacked once from /usr/src into the work dir; skipped if absent).

    .venv/bin/python bench/import.py                 # both trees, table + bench/out/import.json
    .venv/bin/python bench/import.py --only generated --runs 3
    .venv/bin/python bench/import.py --only linux --profile   # also cProfile one import
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corpus import generated_tree, linux_tree, machine_note, rmtree, warm  # noqa: E402

_SCRIPT = Path(sys.executable).with_name("oppiefs")
OPPIEFS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oppiefs.cli"]


def sync() -> None:
    os.sync()


def timed(argv: list[str]) -> tuple[float, float, str]:
    """Run a command -> (seconds for the command, seconds including a following sync, out)."""
    sync()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return t1 - t0, t2 - t0, proc.stdout.strip()


def bench_tree(name: str, src: Path, work: Path, runs: int) -> dict:
    files, nbytes = warm(src)
    print(f"{name}: {files} files, {nbytes / 1e6:.0f} MB, {runs} run(s)", file=sys.stderr)
    run_dir, store = work / "run", work / "run" / "store"
    samples: dict[str, list[tuple[float, float]]] = {"cp": [], "import": [], "reimport": []}
    ids = set()
    for i in range(runs):
        # Each copy goes to a new place and is deleted only at the very end: on ext4 (seen
        # here without a journal) creating files soon after deleting many walks the
        # recently deleted inodes, which made later ``cp -a`` runs up to 7x slower.
        dst = run_dir / f"cp-dst-{i}"
        rmtree(store)
        run_dir.mkdir(parents=True, exist_ok=True)
        cp, cp_sync, _ = timed(["cp", "-a", str(src), str(dst)])
        samples["cp"].append((cp, cp_sync))
        imp, imp_sync, snap = timed([*OPPIEFS, "import", "--store", str(store), str(src)])
        samples["import"].append((imp, imp_sync))
        re, re_sync, snap2 = timed([*OPPIEFS, "import", "--store", str(store), str(src)])
        samples["reimport"].append((re, re_sync))
        if snap != snap2:
            raise SystemExit(f"re-import gave a different id: {snap} vs {snap2}")
        ids.add(snap)
        print(f"  run {i + 1}: cp -a {cp:.2f}s (+sync {cp_sync:.2f}s), import {imp:.2f}s "
              f"(+sync {imp_sync:.2f}s), re-import {re:.2f}s", file=sys.stderr)
    store_bytes = (store / "data.mdb").stat().st_size
    rmtree(store)
    if len(ids) != 1:
        raise SystemExit(f"imports of the same tree gave different ids: {ids}")
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
           for k, v in samples.items()}
    best = {k: (min(a for a, _ in v), min(b for _, b in v)) for k, v in samples.items()}
    return {
        "tree": name, "path": str(src), "files": files, "bytes": nbytes, "runs": runs,
        "snapshot": ids.pop(), "store_file_bytes": store_bytes,
        "median_s": {k: {"cmd": round(a, 3), "cmd_sync": round(b, 3)} for k, (a, b) in
                     med.items()},
        "samples_s": {k: [[round(a, 3), round(b, 3)] for a, b in v] for k, v in
                      samples.items()},
        "best_s": {k: {"cmd": round(a, 3), "cmd_sync": round(b, 3)} for k, (a, b) in
                   best.items()},
        "ratio": _ratios(med),
        "ratio_best": _ratios(best),
    }


def _ratios(t: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {
        "import/cp": round(t["import"][0] / t["cp"][0], 3),
        "reimport/cp": round(t["reimport"][0] / t["cp"][0], 3),
        "import/cp (+sync)": round(t["import"][1] / t["cp"][1], 3),
        "reimport/cp (+sync)": round(t["reimport"][1] / t["cp"][1], 3),
    }


def profile_import(name: str, src: Path, work: Path, out: Path) -> None:
    """cProfile a fresh import and a re-import (in subprocesses, like the real CLI)."""
    store = work / "run" / "profile-store"
    rmtree(store)
    for step in ("import", "reimport"):
        prof = out / f"{step}-{name}.prof"
        sync()
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m",
                        "oppiefs.cli", "import", "--store", str(store), str(src)], check=True,
                       capture_output=True)
        print(f"\nprofile of one {step} of {name} ({prof}), by own time:")
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(20)
    rmtree(store)


def cooldown(work: Path, quiet_s: float = 300.0) -> None:
    """Wait until our own last mass delete is ``quiet_s`` old (ext4 skips recently deleted
    inodes only after scanning them, which slows ``cp -a`` for minutes after an ``rm -rf``)."""
    stamp = work / "last-cleanup"
    if stamp.exists():
        left = quiet_s - (time.time() - stamp.stat().st_mtime)
        if left > 0:
            print(f"waiting {left:.0f}s for the last run's deletions to age", file=sys.stderr)
            time.sleep(left)


def table(results: list[dict]) -> str:
    head = (f"| {'tree':<20} | {'files':>6} | {'MB':>6} | {'cp -a':>13} | {'import':>13} | "
            f"{'re-import':>13} | {'import/cp':>13} | {'reimport/cp':>13} |")
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    rows = [head, sep]
    for r in results:
        m, q = r["median_s"], r["ratio"]

        cp, imp, re = (f"{m[k]['cmd']:.2f} / {m[k]['cmd_sync']:.2f}"
                       for k in ("cp", "import", "reimport"))
        rows.append(
            f"| {r['tree']:<20} | {r['files']:>6} | {r['bytes'] / 1e6:>6.0f} | "
            f"{cp:>13} | {imp:>13} | {re:>13} | "
            f"{q['import/cp']:>5.2f} / {q['import/cp (+sync)']:<5.2f} | "
            f"{q['reimport/cp']:>5.2f} / {q['reimport/cp (+sync)']:<5.2f} |")
    notes = ["", "seconds (median of the runs): command / command + sync; "
             "ratios: bare / with sync"]
    for r in results:
        b = r["ratio_best"]
        notes.append(f"best-of-{r['runs']} ratios for {r['tree']}: import/cp "
                     f"{b['import/cp']:.2f} / {b['import/cp (+sync)']:.2f}, reimport/cp "
                     f"{b['reimport/cp']:.2f} / {b['reimport/cp (+sync)']:.2f}")
    return "\n".join(rows + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/oppiefs-bench"),
                    help="cache and scratch dir (same filesystem for source, copy and store)")
    ap.add_argument("--runs", type=int, default=5, help="runs for the generated tree")
    ap.add_argument("--linux-runs", type=int, default=3, help="runs for the kernel tree")
    ap.add_argument("--only", choices=["generated", "linux"])
    ap.add_argument("--profile", action="store_true", help="also cProfile one import per tree")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    trees: list[tuple[str, Path, int]] = []
    if args.only in (None, "generated"):
        trees.append(("generated-2000x50MB", generated_tree(args.work), args.runs))
    if args.only in (None, "linux"):
        linux = linux_tree(args.work)
        if linux is not None:
            trees.append(("linux-source-6.1", linux, args.linux_runs))
    cooldown(args.work)
    results = []
    try:
        for name, src, runs in trees:
            results.append(bench_tree(name, src, args.work, runs))
            if args.profile:
                profile_import(name, src, args.work, args.out)
    finally:
        rmtree(args.work / "run")
        (args.work / "last-cleanup").touch()
    startup = statistics.median(timed([*OPPIEFS, "--version"])[0] for _ in range(5))
    doc = {"benchmark": "import", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_note(), "command": " ".join(sys.argv),
           "cli_startup_s": round(startup, 3), "results": results}
    (args.out / "import.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{doc['machine']}\n")
    print(table(results))
    print(f"(each oppiefs run includes {startup:.2f}s of CLI start-up: `oppiefs --version`)")
    print(f"\nwrote {args.out / 'import.json'}")


if __name__ == "__main__":
    main()
