"""The benchmarks behind bench/RESULTS.md still run, a few iterations each on the generated
tree, and write the results they print. Their timings are not checked here: the goals live
in bench/ (timed tests on a noisy VM would only flake)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.mountutil import ROOT, mounts_under


def bench(script: str, work: Path, *args: str) -> dict:
    out = work / f"{script}.json"
    res = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--only", "generated", *args, "--out", str(out)],
        cwd=ROOT, env={**os.environ, "OPPIEFS_BENCH_DIR": str(work / "corpora")},
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert mounts_under(work) == []
    return json.loads(out.read_text())


def test_mcts_benchmark_runs_rounds_and_pools_their_samples(tmp_path: Path) -> None:
    res = bench("mcts", tmp_path, "--peers", "none", "--iters", "7", "--rounds", "2")
    tree = res["trees"]["generated"]
    assert tree["files"] == 2000
    assert [r["commit"]["n"] for r in tree["rounds"]] == [7, 7]
    # Pruning starts once 6 snapshots are live: in iterations 6 and 7 of each round.
    pooled = tree["systems"]["oppiefs"]
    assert {op: s["n"] for op, s in pooled.items()} == {
        "fork": 14, "commit": 14, "drop": 14, "prune": 4}
    assert {g["op"] for g in res["goals"]} == {"fork", "commit", "drop", "prune"}
    # The host's steal time per round, which tells a slow VM minute from a slow build.
    assert len(res["host_steal_by_round"]) == 2
    assert all(0 <= share <= 1 for share in res["host_steal_by_round"])


def test_commit_path_benchmark_counts_publish_writes(tmp_path: Path) -> None:
    res = bench("commit_path", tmp_path, "--iters", "5", "--warmup", "0")
    gen = res["results"]["generated"]
    assert gen["publish_writes"]["p50"] >= 1  # every publish is an fsynced LMDB commit
    assert 0 < gen["apply_cpu"]["p50"] <= gen["total"]["p95"]


def test_mcts_benchmark_interleaves_blocks_after_a_warmup(tmp_path: Path) -> None:
    res = bench("mcts", tmp_path, "--peers", "none", "--iters", "7", "--warmup", "2",
                "--interleave", "3", "--settle", "0")
    pooled = res["trees"]["generated"]["systems"]["oppiefs"]
    # 9 iterations in blocks of 3, the first 2 uncounted; pruning from the 6th on.
    assert {op: s["n"] for op, s in pooled.items()} == {
        "fork": 7, "commit": 7, "drop": 7, "prune": 4}
