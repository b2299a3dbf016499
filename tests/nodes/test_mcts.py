"""The MCTS flow an engine drives: fork -> edit -> commit -> prune, with live nodes left on
pruned snapshots, checked against a model of what every node and snapshot must contain.

After the run everything is dropped and all snapshots but one are pruned; GC must bring the
store's stored bytes to within 5% of a fresh import of that one snapshot into a new store
(any leaked chunk or tree of the 200 iterations would show), and fsck must be clean.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from pathlib import Path

from oppiefs import tree
from oppiefs.client import Client, Node
from tests.cliutil import Cli
from tests.nodeutil import fsck_clean, node_dirs

ITERATIONS = 200
MAX_LIVE_NODES = 8

# path -> ("f", bytes) | ("d",) | ("l", target); the root itself is not in the model.
Model = dict[str, tuple]


def build_source(root: Path, rng: random.Random) -> Model:
    model: Model = {}
    for d in ("src", "src/pkg", "src/pkg/sub", "docs", "data", "empty"):
        (root / d).mkdir(parents=True)
        model[d] = ("d",)
    for i in range(40):
        d = rng.choice(["src", "src/pkg", "src/pkg/sub", "docs", "data"])
        size = rng.choice([rng.randint(0, 2000)] * 3 + [rng.randint(20_000, 120_000)])
        path = f"{d}/f{i:02d}"
        data = rng.randbytes(size)
        (root / path).write_bytes(data)
        model[path] = ("f", data)
    os.symlink("src/pkg", root / "pkg-link")
    model["pkg-link"] = ("l", b"src/pkg")
    return model


def read_model(root: str | Path) -> Model:
    """What a directory actually holds, in the model's terms."""
    out: Model = {}
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(base))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.fsencode(os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d",)
            else:
                out[rel] = ("f", p.read_bytes())
    return out


def assert_model(expected: Model, root: str | Path, what: str) -> None:
    actual = read_model(root)
    if actual != expected:
        missing = sorted(expected.keys() - actual.keys())[:10]
        extra = sorted(actual.keys() - expected.keys())[:10]
        changed = sorted(k for k in expected.keys() & actual.keys()
                         if expected[k] != actual[k])[:10]
        raise AssertionError(f"{what}: missing {missing}, unexpected {extra}, "
                             f"different {changed}")


def random_edit(merged: Path, model: Model, rng: random.Random) -> None:
    """One edit an agent might make, applied to the node and to its model."""
    files = sorted(k for k, v in model.items() if v[0] == "f")
    dirs = sorted(k for k, v in model.items() if v[0] == "d")
    op = rng.choice(["overwrite", "overwrite", "append", "create", "create", "delete",
                     "rename", "mkdir", "rmtree"])
    if op in ("overwrite", "append", "delete", "rename") and not files:
        op = "create"
    if op == "overwrite":
        path = rng.choice(files)
        data = rng.randbytes(rng.choice([rng.randint(1, 3000), rng.randint(20_000, 80_000)]))
        (merged / path).write_bytes(data)
        model[path] = ("f", data)
    elif op == "append":
        path = rng.choice(files)
        extra = rng.randbytes(rng.randint(1, 5000))
        with open(merged / path, "ab") as f:
            f.write(extra)
        model[path] = ("f", model[path][1] + extra)
    elif op == "create":
        d = rng.choice(dirs)
        path = f"{d}/n{rng.randrange(10**9)}"
        data = rng.randbytes(rng.randint(0, 40_000))
        (merged / path).write_bytes(data)
        model[path] = ("f", data)
    elif op == "delete":
        path = rng.choice(files)
        os.unlink(merged / path)
        del model[path]
    elif op == "rename":
        path = rng.choice(files)
        new = f"{rng.choice(dirs)}/r{rng.randrange(10**9)}"
        os.rename(merged / path, merged / new)
        model[new] = model.pop(path)
    elif op == "mkdir":
        path = f"{rng.choice(dirs)}/d{rng.randrange(10**9)}"
        (merged / path).mkdir()
        model[path] = ("d",)
    elif op == "rmtree":
        victims = [d for d in dirs if d not in ("src", "docs", "data")]
        if victims:
            path = rng.choice(victims)
            shutil.rmtree(merged / path)  # pkg-link may dangle afterwards, as on disk
            for k in [k for k in model if k == path or k.startswith(path + "/")]:
                del model[k]


def test_mcts_flow(mdaemon, tmp_path):
    rng = random.Random(20240611)
    src = tmp_path / "src"
    model0 = build_source(src, rng)
    snaps: dict[str, Model] = {}  # listed snapshots -> expected content
    refs: dict[str, int] = {}  # references this test holds on each listed snapshot
    live: dict[str, tuple[Node, Model]] = {}
    pruned_under_live = 0
    with Client(mdaemon.mnt) as c:
        root = c.import_(src)
        snaps[root], refs[root] = model0, 1
        for it in range(ITERATIONS):
            # Expand: fork a listed snapshot (or continue a live node), edit, commit.
            if live and rng.random() < 0.25:
                node, model = live[rng.choice(sorted(live))]
            else:
                parent = rng.choice(sorted(snaps))
                node = c.fork(parent)
                model = dict(snaps[parent])
                live[node.id] = (node, model)
            for _ in range(rng.randint(1, 4)):
                random_edit(Path(node.path), model, rng)
            s = c.commit(node)
            snaps[s] = dict(model)
            refs[s] = refs.get(s, 0) + 1
            if rng.random() < 0.2:
                assert_model(snaps[s], mdaemon.mnt / "snapshots" / s, f"snapshot {s[:12]}")
            # Keep some nodes alive; drop the rest (oldest first beyond the cap).
            if rng.random() < 0.6 or len(live) > MAX_LIVE_NODES:
                victim = node.id if rng.random() < 0.7 else sorted(live)[0]
                c.drop(live.pop(victim)[0])
            # Prune random earlier snapshots, including ones that live nodes stand on.
            for _ in range(rng.choice([0, 1, 1, 2])):
                candidates = sorted(set(snaps) - {s})
                if len(candidates) < 3:
                    break
                victim_snap = rng.choice(candidates)
                c.prune(victim_snap)
                refs[victim_snap] -= 1
                if refs[victim_snap] == 0:
                    del snaps[victim_snap], refs[victim_snap]
                    pruned_under_live += any(n.snapshot == victim_snap for n, _ in live.values())
            # Every live node keeps reading what it should.
            for nid in rng.sample(sorted(live), min(2, len(live))):
                assert_model(live[nid][1], live[nid][0].path, f"iteration {it}: node {nid}")
            if it % 50 == 49:
                for nid, (n, m) in live.items():
                    assert_model(m, n.path, f"iteration {it}: node {nid}")
                assert sorted(os.listdir(mdaemon.mnt / "snapshots")) == sorted(snaps)
        assert pruned_under_live > 0, "the run never pruned a snapshot under a live node"
        for nid, (n, m) in live.items():
            assert_model(m, n.path, f"final: node {nid}")
            c.drop(n)
        # Keep the biggest: the 5% margin then stands for the most bytes.
        keep = max(sorted(snaps), key=lambda k: sum(len(v[1]) for v in snaps[k].values()
                                                   if v[0] == "f"))
        for sid, count in refs.items():
            for _ in range(count - (sid == keep)):
                c.prune(sid)
        status = c.status()
        assert (status["snapshots"], status["nodes"]) == (1, 0)
        assert os.listdir(mdaemon.mnt / "snapshots") == [keep]
        assert node_dirs(mdaemon.store) == []
        assert_model(snaps[keep], mdaemon.mnt / "snapshots" / keep, "kept snapshot")

        Cli(mdaemon.store)("gc")
        after_gc = c.status()
        fresh = tree.open_store(tmp_path / "fresh")
        try:
            report = tree.import_dir(fresh, mdaemon.mnt / "snapshots" / keep)
            fresh_stats = fresh.stats()
        finally:
            fresh.close()
        # A snapshot's id is its content: re-importing it as served gives the same id.
        assert report.root.hex() == keep
        assert fresh_stats.stored_bytes > 300_000
        ratio = after_gc["stored_bytes"] / fresh_stats.stored_bytes
        assert abs(ratio - 1) <= 0.05, (after_gc, fresh_stats)
    fsck_clean(mdaemon.store)

