"""Chaos: SIGKILL the daemon at random moments under a mixed MCTS load, many times.

A worker thread runs fork / edit / commit / drop / prune / gc against the real mount and
records what was *acknowledged*. The main thread kills the daemon after a random delay,
restarts it on the same store and mountpoint, and checks the promise:

- every acknowledged, not-pruned snapshot is listed and reads back byte-identical;
- every listed snapshot (acknowledged or not) reads back completely: nothing half-visible;
- every acknowledged, not-dropped node is re-attached with its content;
- fsck is clean, a GC pass frees nothing that is still needed, and no stale mount remains.

Operations cut short by a kill may or may not have taken effect; the model records them as
uncertain instead of guessing. Kills: OPPIEFS_CHAOS_KILLS, default 20 (50 with
OPPIEFS_CHAOS=full).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from oppiefs.client import Client
from oppiefs.errors import NotFound, OppieError
from tests.chaosutil import record_figures
from tests.mountutil import Daemon, mounts_under, oppiefs_cmd

KILLS = int(os.environ.get("OPPIEFS_CHAOS_KILLS",
                           "50" if os.environ.get("OPPIEFS_CHAOS") == "full" else "20"))
Content = dict[str, bytes]


def read_tree(root: Path) -> Content:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@dataclass
class Model:
    """What the workload knows for sure, and what a kill left uncertain."""

    refs: Counter[str] = field(default_factory=Counter)  # acked publishes - acked prunes
    # Prunes cut short by a kill: each may or may not have taken effect, so the store holds
    # between refs - maybe_pruned and refs references. The uncertainty outlives later
    # acknowledged prunes of the same id (a commit can publish the same tree again).
    maybe_pruned: Counter[str] = field(default_factory=Counter)
    content: dict[str, Content] = field(default_factory=dict)
    nodes: dict[str, Content] = field(default_factory=dict)
    uncertain_nodes: set[str] = field(default_factory=set)  # content: an edit was cut short
    maybe_dropped: set[str] = field(default_factory=set)  # a drop was cut short
    acked_commits: int = 0

    def live(self) -> list[str]:
        """Snapshots certainly still listed."""
        return sorted(s for s, n in self.refs.items() if n - self.maybe_pruned[s] > 0)

    def learn_unlisted(self, snap: str) -> None:
        """The store shows ``snap`` has no references left: the uncertain prunes happened."""
        self.refs[snap] = self.maybe_pruned[snap] = 0


class Workload(threading.Thread):
    def __init__(self, mnt: Path, store: Path, model: Model, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.mnt, self.store, self.model, self.rng = mnt, store, model, rng
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Client(self.mnt)
        try:
            while not self.stop.is_set():
                self.step(client)
        except (OppieError, OSError):
            pass  # the daemon died under us: expected
        except BaseException as exc:  # a real failure of the test or the product
            self.error = exc
        finally:
            client.close()

    def step(self, c: Client) -> None:
        m, rng = self.model, self.rng
        op = rng.choices(["fork", "edit", "commit", "drop", "prune", "gc"],
                         [3, 6, 4, 2, 2, 1])[0]
        live = m.live()
        if op == "fork" and live and len(m.nodes) < 6:
            snap = rng.choice(live)
            node = c.fork(snap)
            m.nodes[node.id] = dict(m.content[snap])
        elif op == "edit" and m.nodes:
            nid = rng.choice(sorted(m.nodes))
            self.edit(nid, Path(self.mnt / "nodes" / nid))
        elif op == "commit" and m.nodes:
            nid = rng.choice(sorted(m.nodes))
            expected = dict(m.nodes[nid])
            snap = c.commit(nid)
            m.refs[snap] += 1
            m.content[snap] = expected
            m.acked_commits += 1
        elif op == "drop" and m.nodes:
            nid = rng.choice(sorted(m.nodes))
            m.maybe_dropped.add(nid)
            c.drop(nid)
            del m.nodes[nid]
            m.maybe_dropped.discard(nid)
        elif op == "prune" and len(live) > 1:
            snap = rng.choice(live)
            m.maybe_pruned[snap] += 1
            try:
                c.prune(snap)
            except NotFound:
                raise AssertionError(f"acknowledged snapshot {snap} vanished") from None
            m.refs[snap] -= 1
            m.maybe_pruned[snap] -= 1
        elif op == "gc":
            subprocess.run(oppiefs_cmd("gc", "--store", str(self.store)), check=True,
                           capture_output=True, timeout=60)

    def edit(self, nid: str, path: Path) -> None:
        m, rng = self.model, self.rng
        m.uncertain_nodes.add(nid)  # until the edit is complete
        content = m.nodes[nid]
        for _ in range(rng.randint(1, 4)):
            name = rng.choice([*content, f"new-{rng.randrange(100)}.txt"] if content
                              else ["first.txt"])
            if rng.random() < 0.15 and name in content:
                (path / name).unlink()
                del content[name]
            else:
                data = rng.randbytes(rng.choice([0, 10, 5000, 70_000]))
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
                content[name] = data
        m.uncertain_nodes.discard(nid)


def verify(d: Daemon, model: Model) -> None:
    listed = set(os.listdir(d.mnt / "snapshots"))
    for snap in model.live():
        assert snap in listed, (f"acknowledged snapshot {snap} is missing "
                                f"(refs {model.refs[snap]}, maybe pruned "
                                f"{model.maybe_pruned[snap]}, relisted: "
                                f"{snap in os.listdir(d.mnt / 'snapshots')})")
    for snap in [s for s, n in model.refs.items() if n > 0 and s not in listed]:
        model.learn_unlisted(snap)
    for snap in listed:  # acknowledged or not: complete, never half-visible
        got = read_tree(d.mnt / "snapshots" / snap)
        if snap in model.content and model.refs[snap] > 0:
            assert got == model.content[snap], f"snapshot {snap} differs from what was committed"
    nodes = set(os.listdir(d.mnt / "nodes"))
    for nid, content in list(model.nodes.items()):
        if nid in model.maybe_dropped:
            if nid not in nodes:
                del model.nodes[nid]  # the drop did happen
            model.maybe_dropped.discard(nid)
            continue
        assert nid in nodes, f"acknowledged node {nid} was lost"
        if nid not in model.uncertain_nodes:
            assert read_tree(d.mnt / "nodes" / nid) == content, f"node {nid} lost changes"
    fsck = subprocess.run(oppiefs_cmd("fsck", "--json", "--store", str(d.store)),
                          capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    overlays = [mp for mp, fs in mounts_under(d.store) if fs == "overlay"]
    assert len(overlays) == len(nodes), (overlays, nodes)


def test_kill_9_chaos(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("OPPIEFS_CHAOS_SEED", "20261125")))
    src = tmp_path / "src"
    for i in range(12):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.bin").write_bytes(rng.randbytes(rng.choice([0, 300, 90_000])))
    d = Daemon(tmp_path / "mnt", tmp_path / "store")
    model = Model()
    stats = Counter()
    try:
        d.start()
        with Client(d.mnt) as c:
            base = c.import_(src)
        model.refs[base] += 1
        model.content[base] = {k.replace(os.sep, "/"): v for k, v in read_tree(src).items()}
        for _ in range(KILLS):
            work = Workload(d.mnt, d.store, model, random.Random(rng.random()))
            work.start()
            time.sleep(rng.uniform(0.05, 0.8))
            d.kill()
            work.stop.set()
            work.join(60)
            assert not work.is_alive(), "workload hung after the daemon died"
            if work.error:
                raise work.error
            d.start()
            stats["kills"] += 1
            assert d.problems == "" or "restarted" not in d.problems, d.problems
            verify(d, model)
            # A GC pass right after recovery must not free anything still needed.
            subprocess.run(oppiefs_cmd("gc", "--store", str(d.store)), check=True,
                           capture_output=True, timeout=120)
            verify(d, model)
    finally:
        d.stop()
    assert not mounts_under(tmp_path), "stale mounts after chaos"
    assert stats["kills"] == KILLS
    # Reached only when every check after every kill passed: nothing acknowledged was lost.
    record_figures("kill9_chaos", kills=stats["kills"], acked_commits=model.acked_commits,
                   live_snapshots=len(model.live()), lost_acked_commits=0)
