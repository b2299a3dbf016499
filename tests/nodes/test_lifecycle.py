"""Node lifecycle: the node path, busy drops, lineage, client errors, prune under a live
node and GC, and nodes outliving an unmount or a ``kill -9`` of the daemon."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from oppiefs import overlay
from oppiefs.client import Client
from oppiefs.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    NotMounted,
    OppieError,
    Unsupported,
)
from tests.cliutil import OPPIEFS, Cli
from tests.mountutil import Daemon, mounts_under
from tests.nodeutil import fsck_clean, node_dirs, wait_for
from tests.treeutil import assert_same_meta, assert_same_tree, det_bytes, tree_meta


def make_src(root: Path, seed: str = "src", big: int = 0) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_text(f"top {seed}\n")
    (root / "sub" / "mid.bin").write_bytes(det_bytes(50_000, seed))
    (root / "sub" / "deeper" / "leaf").write_text("leaf\n")
    os.symlink("sub/mid.bin", root / "link")
    if big:
        (root / "big.bin").write_bytes(det_bytes(big, seed + "-big"))
    return root


def edit(merged: Path, tag: str) -> None:
    """A bit of everything a commit must carry: new, changed, deleted, moved, chmod, link."""
    (merged / f"new-{tag}").write_text(f"new {tag}\n")
    with open(merged / "top.txt", "a") as f:
        f.write(f"appended {tag}\n")
    if (merged / "sub" / "deeper" / "leaf").exists():
        os.unlink(merged / "sub" / "deeper" / "leaf")
    (merged / f"dir-{tag}").mkdir()
    os.symlink("../top.txt", merged / f"dir-{tag}" / "up")
    os.chmod(merged / "sub" / "mid.bin", 0o600)


def stored_bytes(store: Path) -> int:
    return Cli(store)("stats", "--json").json()["stored_bytes"]


@pytest.fixture(scope="module")
def shared(mdaemon, tmp_path_factory: pytest.TempPathFactory):
    src = make_src(tmp_path_factory.mktemp("lifecycle") / "src")
    with Client(mdaemon.mnt) as c:
        yield c, c.import_(src), src


def test_node_path_leads_to_merged_dir(mdaemon, shared):
    c, snap, src = shared
    node = c.fork(snap)
    merged = mdaemon.store / "nodes" / node.id / "merged"
    try:
        assert node.path == str(mdaemon.mnt / "nodes" / node.id)
        assert node.snapshot == snap
        assert os.readlink(node.path) == str(merged)
        assert node.id in os.listdir(mdaemon.mnt / "nodes")
        assert os.path.ismount(merged)
        assert os.path.realpath(node.path) == str(merged)
        assert_same_tree(src, node.path)
        (Path(node.path) / "through-link").write_text("x\n")
        assert (mdaemon.store / "nodes" / node.id / "upper" / "through-link").read_text() == "x\n"
        assert not (mdaemon.mnt / "snapshots" / snap / "through-link").exists()
    finally:
        c.drop(node)
    assert node.id not in os.listdir(mdaemon.mnt / "nodes")
    assert not merged.exists()
    assert node.id not in node_dirs(mdaemon.store)


def test_drop_of_busy_node(mdaemon, shared):
    """EBUSY while a process works inside the node; --force detaches it lazily."""
    c, snap, _ = shared
    node = c.fork(snap)
    before = c.status()["nodes"]
    proc = subprocess.Popen(["sleep", "300"], cwd=node.path)
    try:
        wait_for(lambda: os.readlink(f"/proc/{proc.pid}/cwd").endswith("/merged"),
                 what="sleep to enter the node")
        with pytest.raises(Busy) as exc:
            c.drop(node)
        assert exc.value.errno == errno.EBUSY
        res = subprocess.run([*OPPIEFS, "drop", "--mount", str(mdaemon.mnt), node.id],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == Busy.exit_code, res
        assert "busy" in res.stderr and "Traceback" not in res.stderr
        # The failed drops changed nothing: the node is listed, counted and writable.
        assert c.status()["nodes"] == before
        assert node.id in os.listdir(mdaemon.mnt / "nodes")
        (Path(node.path) / "still-writable").write_text("yes\n")
        c.drop(node, force=True)
        assert c.status()["nodes"] == before - 1
        assert node.id not in os.listdir(mdaemon.mnt / "nodes")
        assert proc.poll() is None  # the process keeps its (detached) working directory
        with pytest.raises(NotFound):
            c.drop(node)
    finally:
        proc.kill()
        proc.wait()
    fsck_clean(mdaemon.store)


def assert_nothing_stored(before: dict, after: dict) -> None:
    """Nothing published and nothing stored between two ``status`` replies. The sweeper
    may free what an earlier test pruned meanwhile, so the counts may only fall."""
    assert (after["snapshots"], after["nodes"]) == (before["snapshots"], before["nodes"])
    assert after["objects"] <= before["objects"], (before, after)
    assert after["stored_bytes"] <= before["stored_bytes"], (before, after)

def test_commit_refuses_special_files_and_leaves_the_node_usable(mdaemon, shared):
    """A FIFO (or socket, device) left in a node cannot be stored: the commit names it, adds
    nothing, and commits once it is gone. Extended attributes are not stored (README)."""
    c, snap, _ = shared
    node = c.fork(snap)
    try:
        merged = Path(node.path)
        (merged / "kept.txt").write_text("kept\n")
        os.setxattr(merged / "kept.txt", "user.agent", b"note")
        os.mkfifo(merged / "sub" / "pipe")
        before = c.status()
        with pytest.raises(OppieError) as exc:
            c.commit(node)
        assert exc.value.errno == errno.EOPNOTSUPP
        # Named as the user sees it (the node's path), not inside the store's upper dir.
        assert f"{node.path}/sub/pipe: cannot commit a FIFO" in exc.value.message
        assert_nothing_stored(before, c.status())
        assert os.getxattr(merged / "kept.txt", "user.agent") == b"note"  # the node as it was
        os.unlink(merged / "sub" / "pipe")
        with socket.socket(socket.AF_UNIX) as sock:  # a server's socket left behind
            sock.bind(str(merged / "sub" / "sock"))
        with pytest.raises(OppieError) as exc:
            c.commit(node)
        assert f"{node.path}/sub/sock: cannot commit a socket" in exc.value.message
        os.unlink(merged / "sub" / "sock")
        child = c.commit(node)
        shown = mdaemon.mnt / "snapshots" / child / "kept.txt"
        assert shown.read_text() == "kept\n"
        assert os.listxattr(shown) == []
        assert_same_tree(merged, mdaemon.mnt / "snapshots" / child)
        c.prune(child)
    finally:
        c.drop(node)
    fsck_clean(mdaemon.store)


def test_cli_import_through_the_mount(mdaemon, tmp_path):
    """``oppiefs import --mount`` goes through the daemon, which lists the snapshot at
    once; options only a store import has are refused with it. A store import that makes
    a new store says so."""
    src = make_src(tmp_path / "src", seed="via-mount")
    env = dict(os.environ, OPPIEFS_STORE=str(tmp_path / "env-store"))  # a default, not given
    res = subprocess.run([*OPPIEFS, "import", str(src), "--mount", str(mdaemon.mnt), "--json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "env-store").exists()
    snap = json.loads(res.stdout)["snapshot"]
    assert snap in os.listdir(mdaemon.mnt / "snapshots")
    assert_same_tree(src, mdaemon.mnt / "snapshots" / snap)
    res = subprocess.run([*OPPIEFS, "import", str(src), "--mount", str(mdaemon.mnt),
                          "--skip-special"], capture_output=True, text=True, timeout=60)
    assert res.returncode == InvalidArgument.exit_code and "--mount" in res.stderr
    with Client(mdaemon.mnt) as c:
        c.prune(snap)
    res = subprocess.run([*OPPIEFS, "import", str(src), "--store", str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "created a new store" in res.stderr, res.stderr
    res = subprocess.run([*OPPIEFS, "import", str(src), "--store", str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "created" not in res.stderr, res.stderr


def test_mtimes_past_2262_are_refused_by_name(mdaemon, shared, tmp_path):
    """An entry keeps its mtime in int64 nanoseconds; ext4 takes dates up to 2446. Such a
    file makes commit and import fail naming it (EOPNOTSUPP, not an internal EIO), with
    nothing stored; the node commits once the date is one a snapshot can keep."""
    c, snap, _ = shared
    far = 10_500_000_000  # 2302
    node = c.fork(snap)
    try:
        merged = Path(node.path)
        (merged / "sub" / "future").write_text("later\n")
        os.utime(merged / "sub" / "future", (far, far))
        before = c.status()
        with pytest.raises(Unsupported, match="sub/future: its mtime"):
            c.commit(node)
        assert_nothing_stored(before, c.status())
        src = tmp_path / "src"
        src.mkdir()
        (src / "future").write_text("later\n")
        os.utime(src / "future", (far, far))
        with pytest.raises(Unsupported, match="src/future: its mtime"):
            c.import_(src)
        assert_nothing_stored(before, c.status())
        os.utime(merged / "sub" / "future", (far // 10, far // 10))
        child = c.commit(node)
        shown = mdaemon.mnt / "snapshots" / child / "sub" / "future"
        assert os.stat(shown).st_mtime_ns == far // 10 * 10**9
        c.prune(child)
    finally:
        c.drop(node)


def test_user_overlay_xattrs_are_a_programs_own(mdaemon, shared):
    """Without ``userxattr`` the kernel ignores ``user.overlay.*``, so the commit must too:
    a dir marked opaque, an empty file marked a whiteout and a file carrying a redirect that
    way are what the node shows them to be, ordinary ones."""
    c, snap, _ = shared
    node = c.fork(snap)
    try:
        merged = Path(node.path)
        os.setxattr(merged / "sub", "user.overlay.opaque", b"y")
        (merged / "empty").write_bytes(b"")
        os.setxattr(merged / "empty", "user.overlay.whiteout", b"y")
        (merged / "moved").write_text("here\n")
        os.setxattr(merged / "moved", "user.overlay.redirect", b"/elsewhere")
        os.setxattr(merged / "moved", "user.overlay.metacopy", b"")
        child = c.commit(node)
        shown = mdaemon.mnt / "snapshots" / child
        assert sorted(os.listdir(shown / "sub")) == sorted(os.listdir(merged / "sub")) != []
        assert (shown / "empty").read_bytes() == b""
        assert_same_tree(merged, shown)
        c.prune(child)
    finally:
        c.drop(node)


def test_log_prints_lineage(mdaemon, shared):
    c, s0, _ = shared
    n1 = c.fork(s0)
    edit(Path(n1.path), "one")
    s1 = c.commit(n1)
    (Path(n1.path) / "more").write_text("more\n")
    s2 = c.commit(n1)
    n2 = c.fork(s2)
    edit(Path(n2.path), "two")
    s3 = c.commit(n2)
    cli = Cli(mdaemon.store)
    try:
        chain = cli("log", s3[:12], "--json").json()
        assert [x["snapshot"] for x in chain] == [s3, s2, s1, s0]
        assert [x["parent"] for x in chain] == [s2, s1, s0, None]
        assert all(x["listed"] for x in chain)
        text = cli("log", s3).out.splitlines()
        assert [line.split()[0] for line in text] == [s3, s2, s1, s0]
        # Given the mount and no store, it reads the store that mount serves.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPPIEFS_")}
        res = subprocess.run([*OPPIEFS, "log", s3, "--json", "--mount", str(mdaemon.mnt)],
                             capture_output=True, text=True, env=env, check=True)
        assert [x["snapshot"] for x in json.loads(res.stdout)] == [s3, s2, s1, s0]
        # A --mount that names no mount is an error, not a reason to read another store.
        res = subprocess.run([*OPPIEFS, "log", s3, "--mount", str(mdaemon.store)],
                             capture_output=True, text=True, env=env)
        assert res.returncode == NotMounted.exit_code and "not an oppiefs mount" in res.stderr
        # Pruned but pinned by n2: still in the chain, marked.
        c.prune(s2)
        chain = cli("log", s3, "--json").json()
        assert [x["snapshot"] for x in chain] == [s3, s2, s1, s0]
        assert chain[1]["listed"] is False
        assert "(pruned)" in cli("log", s3).out.splitlines()[1]
        # ... and there to list and compare, as long as it is pinned.
        assert cli("diff", s2, s3, "--json").json()
        assert {x["path"] for x in cli("ls", f"{s2}:./sub//", "--json").json()} == {
            "sub/mid.bin", "sub/deeper"}
        cli("ls", f"{s2}:top.txt/", expect=InvalidArgument.exit_code)
        # Once nothing holds it, the chain ends there, saying so.
        c.drop(n2)
        chain = cli("log", s3, "--json").json()
        assert chain == [chain[0], {"snapshot": s2, "pruned": True}]
        assert "data freed" in cli("log", s3).out
        res = cli("log", "0" * 64, expect=NotFound.exit_code)
        assert "no snapshot" in res.err
    finally:
        c.drop(n1)
        for s in (s1, s3):
            c.prune(s)


def test_client_raises_typed_errors(mdaemon, shared):
    c, snap, _ = shared
    cases = [
        (lambda: c.fork("0" * 64), NotFound, errno.ENOENT),
        (lambda: c.fork("deadbeef"), NotFound, errno.ENOENT),
        (lambda: c.prune("0" * 64), NotFound, errno.ENOENT),
        (lambda: c.commit("nosuchnode"), NotFound, errno.ENOENT),
        (lambda: c.drop("nosuchnode"), NotFound, errno.ENOENT),
        (lambda: c.import_("/nonexistent/oppiefs"), NotFound, errno.ENOENT),
        (lambda: c.fork("XYZ"), InvalidArgument, errno.EINVAL),
        (lambda: c.fork(snap.upper()), InvalidArgument, errno.EINVAL),
        (lambda: c.commit("../etc"), InvalidArgument, errno.EINVAL),
        (lambda: c.drop("a/b"), InvalidArgument, errno.EINVAL),
        (lambda: c.import_("relative"), InvalidArgument, errno.EINVAL),
        (lambda: c.call("frobnicate"), InvalidArgument, errno.EINVAL),
    ]
    for fn, cls, code in cases:
        with pytest.raises(cls) as exc:
            fn()
        assert isinstance(exc.value, OppieError)
        assert exc.value.errno == code and exc.value.message
    with pytest.raises(OppieError):
        c.call("status\nfork", snap)  # refused before anything is sent
    assert c.status()["snapshots"] >= 1  # the handle is still in step
    with pytest.raises(NotMounted, match="is oppiefs mounted at"):
        Client(mdaemon.mnt / "snapshots").status()


def test_client_checks_words_and_stays_in_step(mdaemon, shared, tmp_path, monkeypatch):
    """What cannot be one command line is refused before anything is sent; a call cut off
    between its write and its read (a timeout, Ctrl-C) does not leave its late reply to be
    read as the next command's; a plain file named ctl is never written to."""
    c, snap, _ = shared
    for fn in (lambda: c.commit("a b"), lambda: c.fork(""), lambda: c.prune(f"{snap} x"),
               lambda: c.import_(os.fsdecode(b"/tmp/\xff")), lambda: c.import_("/a\nstatus")):
        with pytest.raises(InvalidArgument):
            fn()
    real_read = os.read

    def interrupted(fd: int, n: int) -> bytes:
        monkeypatch.setattr(os, "read", real_read)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        c.fork(snap)  # runs; its reply is never read
    assert os.read is real_read
    assert "snapshots" in c.status()  # a new session, in step
    nodes = [n for n in os.listdir(mdaemon.mnt / "nodes")]
    for n in nodes:  # the fork whose reply was lost (and any a failed test left)
        c.drop(n)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "ctl").write_text("keep\n")
    with pytest.raises(NotMounted, match="not an oppiefs mount"):
        Client(plain).status()
    assert (plain / "ctl").read_text() == "keep\n"
    subprocess.run(["mount", "-t", "tmpfs", "qa", str(plain)], check=True)  # a mount, not ours
    try:
        (plain / "ctl").write_text("keep\n")
        with pytest.raises(NotMounted, match="not an oppiefs mount"):
            Client(plain).status()
        assert (plain / "ctl").read_text() == "keep\n"
    finally:
        subprocess.run(["umount", "-l", str(plain)], check=True)
    with pytest.raises(NotFound):  # a bytes path is a path too
        c.import_(os.fsencode(tmp_path / "no-such-dir"))


def test_pruned_snapshot_with_live_node(mdaemon, tmp_path):
    """Prune hides the snapshot at once, the node keeps working, drop lets GC free it."""
    with Client(mdaemon.mnt) as c:
        Cli(mdaemon.store)("gc")
        baseline = stored_bytes(mdaemon.store)
        src = make_src(tmp_path / "src", seed="pruned", big=3 << 20)
        snap = c.import_(src)
        grown = stored_bytes(mdaemon.store)
        assert grown > baseline + (3 << 20)
        node = c.fork(snap)
        c.prune(snap)
        assert snap not in os.listdir(mdaemon.mnt / "snapshots")
        with pytest.raises(NotFound):
            c.fork(snap)
        with pytest.raises(NotFound):
            c.prune(snap)
        # The node still reads every byte and takes writes and commits.
        assert_same_tree(src, node.path)
        edit(Path(node.path), "after-prune")
        meta = tree_meta(node.path)
        child = c.commit(node)
        assert_same_meta(meta, tree_meta(mdaemon.mnt / "snapshots" / child))
        assert Cli(mdaemon.store)("log", child, "--json").json()[1]["snapshot"] == snap
        c.prune(child)
        Cli(mdaemon.store)("gc")
        assert stored_bytes(mdaemon.store) >= grown  # pinned by the node: nothing freed
        assert_same_tree(src, mdaemon.mnt / "snapshots" / snap)  # reachable by full id
        c.drop(node)
        # The daemon's sweeper frees it (the drop asks for a sweep).
        wait_for(lambda: stored_bytes(mdaemon.store) == baseline, timeout=60,
                 what=f"stored bytes back to {baseline}")
        with pytest.raises(FileNotFoundError):
            os.stat(mdaemon.mnt / "snapshots" / snap)
    fsck_clean(mdaemon.store)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_sweeper_is_a_child_that_comes_back_and_dies_with_the_daemon(tmp_path):
    """The background sweeper works in a child process (sweeper.py): one that died is
    started again for the next sweep, and a ``kill -9`` of the daemon takes it along."""
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    try:
        with Client(d.mnt) as c:
            pids = []
            for seed in ("one", "two"):
                c.prune(c.import_(make_src(tmp_path / seed, seed=seed, big=1 << 20)))
                wait_for(lambda: stored_bytes(d.store) == 0, timeout=60,
                         what="the pruned import freed")
                pid = d.child_pid("oppiefs.sweeper")
                assert pid is not None and pid not in pids
                pids.append(pid)
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda pid=pid: _gone(pid), what="the killed sweeper gone")
            snap = c.import_(make_src(tmp_path / "three", seed="three"))
            c.prune(snap)
            wait_for(lambda: stored_bytes(d.store) == 0, timeout=60, what="freed again")
            last = d.child_pid("oppiefs.sweeper")
            assert last is not None
        d.kill()
        wait_for(lambda: _gone(last), what="the sweeper gone with the daemon")
    finally:
        d.stop()
    fsck_clean(tmp_path / "store")


# -- surviving the daemon -------------------------------------------------------------------


def _prepare_nodes(d: Daemon, src: Path) -> tuple[list[str], dict[str, dict], str, str]:
    """Two edited nodes, one of them on a pruned snapshot, and one acknowledged commit."""
    with Client(d.mnt) as c:
        s0 = c.import_(src)
        other = c.import_(make_src(src.parent / "other", seed="other"))
        a = c.fork(s0)
        edit(Path(a.path), "a")
        committed = c.commit(a)
        (Path(a.path) / "after-commit").write_bytes(det_bytes(200_000, "after"))
        b = c.fork(other)
        edit(Path(b.path), "b")
        shutil.rmtree(Path(b.path) / "sub")  # a whole lower dir gone: whiteout in upper
        (Path(b.path) / "sub").mkdir()  # and back, opaque
        c.prune(other)
        metas = {n.id: tree_meta(n.path, owners=True) for n in (a, b)}
        return [a.id, b.id], metas, committed, other


def _check_nodes(d: Daemon, nodes: list[str], metas: dict[str, dict], committed: str,
                 committed_meta: dict) -> None:
    assert sorted(os.listdir(d.mnt / "nodes")) == sorted(nodes)
    assert sorted(os.listdir(d.store / "nodes")) == sorted(nodes)
    with Client(d.mnt) as c:
        assert c.status()["nodes"] == len(nodes)
        for n in nodes:
            path = d.mnt / "nodes" / n
            assert_same_meta(metas[n], tree_meta(path, owners=True), f"node {n} re-attached")
            (path / "written-after-restart").write_text("ok\n")
            s = c.commit(n)
            assert (d.mnt / "snapshots" / s / "written-after-restart").read_text() == "ok\n"
            c.prune(s)
        assert_same_meta(committed_meta, tree_meta(d.mnt / "snapshots" / committed, owners=True),
                         "acknowledged commit")
        for n in nodes:
            c.drop(n)
    assert node_dirs(d.store) == []
    fsck_clean(d.store)


def test_nodes_survive_unmount_and_remount(tmp_path):
    src = make_src(tmp_path / "src")
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    d2: Daemon | None = None
    try:
        nodes, metas, committed, _ = _prepare_nodes(d, src)
        committed_meta = tree_meta(d.mnt / "snapshots" / committed, owners=True)
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert d.proc is not None and d.proc.wait(30) == 0
        assert mounts_under(tmp_path) == []
        for n in nodes:  # the upper dirs stay on disk while nothing is mounted
            assert os.listdir(d.store / "nodes" / n / "upper")
        d2 = Daemon(d.mnt, d.store).start()  # returns once the daemon reports nodes re-attached
        _check_nodes(d2, nodes, metas, committed, committed_meta)
    finally:
        if d2 is not None:
            d2.stop()
        d.stop()
    assert mounts_under(tmp_path) == []


def test_umount_is_all_or_nothing(tmp_path):
    """A node or ctl in use makes ``oppiefs umount`` answer EBUSY with everything still
    served: no node half detached, no write into one hidden. Once free, one umount takes
    it all down, and the next mount brings the uncommitted work back."""
    src = make_src(tmp_path / "src")
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    d2: Daemon | None = None
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        with Client(d.mnt) as c:
            snap = c.import_(src)
            a, b = c.fork(snap), c.fork(snap)
        (Path(a.path) / "work.txt").write_text("uncommitted\n")
        sleeper = subprocess.Popen(["sleep", "60"], cwd=b.path)
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == Busy.exit_code, res.stderr
        assert f"node {b.id}" in res.stderr and "nothing was unmounted" in res.stderr
        sleeper.kill()
        sleeper.wait()
        sleeper = subprocess.Popen(["sleep", "60"], cwd=d.mnt / "snapshots" / snap / "sub")
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == Busy.exit_code and "reads a snapshot" in res.stderr, res.stderr
        sleeper.kill()
        sleeper.wait()
        ctl = os.open(d.mnt / "ctl", os.O_RDWR)  # what a Client holds between calls
        try:
            res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True,
                                 text=True, timeout=60)
        finally:
            os.close(ctl)
        assert res.returncode == Busy.exit_code and "ctl" in res.stderr, res.stderr
        for n in (a, b):  # still attached, and writable
            assert (Path(n.path) / "top.txt").read_text() == "top src\n"
        (Path(a.path) / "later.txt").write_text("after the refusals\n")
        with Client(d.mnt) as c:
            c.commit(b.id)
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert d.proc is not None and d.proc.wait(30) == 0
        assert mounts_under(tmp_path) == []
        d2 = Daemon(d.mnt, d.store).start()
        assert (Path(a.path) / "work.txt").read_text() == "uncommitted\n"
        assert (Path(a.path) / "later.txt").read_text() == "after the refusals\n"
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        if d2 is not None:
            d2.stop()
        d.stop()
    assert mounts_under(tmp_path) == []


def test_umount_after_kill_9_cleans_every_mount(tmp_path):
    """``oppiefs umount`` of a mount whose daemon died takes down its tree server's dead
    mount and the node overlays on it too, not only ``<mnt>``; the next mount re-attaches
    the nodes."""
    src = make_src(tmp_path / "src")
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    d2: Daemon | None = None
    try:
        with Client(d.mnt) as c:
            node = c.fork(c.import_(src))
        (Path(node.path) / "work.txt").write_text("uncommitted\n")
        d.kill()
        wait_for(lambda: not any(fs == "fuse.oppiefs" and mp.endswith("/trees")
                                 and _dead(mp) is False for mp, fs in mounts_under(tmp_path)),
                 what="the tree server to exit")
        assert any(fs == "overlay" for _, fs in mounts_under(tmp_path))
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert mounts_under(tmp_path) == []
        d2 = Daemon(d.mnt, d.store).start()
        assert (Path(node.path) / "work.txt").read_text() == "uncommitted\n"
    finally:
        if d2 is not None:
            d2.stop()
        d.stop()
    assert mounts_under(tmp_path) == []


def test_umount_of_a_stopped_daemon_says_so(tmp_path):
    """A daemon that is stopped (or hung) never answers: ``oppiefs umount`` gives up after
    a while with EBUSY and the way out, instead of waiting forever."""
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    assert d.proc is not None
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == Busy.exit_code, res.stderr
        assert "does not answer" in res.stderr and "umount -l" in res.stderr
        assert time.monotonic() - t0 < 30
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        d.stop()
    assert mounts_under(tmp_path) == []


def _dead(path: str) -> bool:
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


@pytest.mark.parametrize("store_name", ["store", "st,o:re\\ x"], ids=["plain", "separators"])
def test_nodes_survive_kill_9(tmp_path, store_name):
    """After a crash, ``oppiefs mount`` (background) returns only once nodes are back.

    Also with a store path holding what overlay's options separate with (',' and ':'),
    their escape character and a space: node overlays are mounted, found again after the
    crash (mountinfo shows those paths escaped) and unmounted by ``oppiefs umount``."""
    src = make_src(tmp_path / "src")
    d = Daemon(tmp_path / "mnt", tmp_path / store_name).start()
    remounted = False
    try:
        nodes, metas, committed, _ = _prepare_nodes(d, src)
        committed_meta = tree_meta(d.mnt / "snapshots" / committed, owners=True)
        d.kill()
        with pytest.raises(OSError) as exc:
            os.listdir(d.mnt)
        assert exc.value.errno == errno.ENOTCONN
        res = subprocess.run([*OPPIEFS, "mount", str(d.mnt), "--store", str(d.store)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        remounted = True
        # Stale overlays on the dead mount were replaced, not stacked.
        overlays = [mp for mp, fs in mounts_under(tmp_path) if fs == "overlay"]
        assert sorted(overlays) == sorted(str(d.store / "nodes" / n / "merged") for n in nodes)
        assert sorted(overlay.overlays_on(str(d.store / "trees"))) == sorted(overlays)
        _check_nodes(d, nodes, metas, committed, committed_meta)
        res = subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        remounted = False
        assert mounts_under(tmp_path) == []
    finally:
        if remounted:
            subprocess.run([*OPPIEFS, "umount", str(d.mnt)], capture_output=True, timeout=60)
        d.stop()
    assert mounts_under(tmp_path) == []


def test_node_links_have_distinct_inodes_and_vanish_on_drop(tmp_path):
    """Every live node's link has its own inode; a dropped node's link is gone."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with Daemon(tmp_path / "mnt", tmp_path / "store") as d, Client(d.mnt) as c:
        snap = c.import_(src)
        nodes = [c.fork(snap) for _ in range(40)]
        inos = {os.lstat(d.mnt / "nodes" / n.id).st_ino for n in nodes}
        assert len(inos) == len(nodes)
        for n in nodes:
            assert os.readlink(d.mnt / "nodes" / n.id).endswith(f"/nodes/{n.id}/merged")
        gone = nodes.pop()
        c.drop(gone.id)
        assert gone.id not in os.listdir(d.mnt / "nodes")
        for n in nodes:
            c.drop(n.id)
        assert os.listdir(d.mnt / "nodes") == []


def test_stale_node_dirs_are_swept_on_mount(tmp_path):
    """A node dir without a record (a drop cut short after its record went) is removed."""
    stale = tmp_path / "store" / "nodes" / "0123456789ab"
    for sub in ("upper", "work", "merged"):
        (stale / sub).mkdir(parents=True)
    (stale / "upper" / "leftover").write_text("x")
    with Daemon(tmp_path / "mnt", tmp_path / "store") as d:
        assert not stale.exists()
        assert os.listdir(d.mnt / "nodes") == []


def test_node_dirs_spread_over_block_groups(tmp_path):
    """On ext2/3/4 the node root carries the Orlov top-dir flag (``chattr +T``), so each
    node's inodes come from its own block group: a journal-less ext4 otherwise scans all
    recently deleted inodes of one group on every fork (5-10 ms of CPU each after minutes
    of fork/drop churn)."""
    lsattr = shutil.which("lsattr")
    if lsattr is None:
        pytest.skip("lsattr (e2fsprogs) not installed")
    with Daemon(tmp_path / "mnt", tmp_path / "store"):
        res = subprocess.run([lsattr, "-d", str(tmp_path / "store" / "nodes")],
                             capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"not an ext2/3/4 file system: {res.stderr.strip()}")
    assert "T" in res.stdout.split()[0]


def test_compact_refuses_a_mounted_store(tmp_path):
    with Daemon(tmp_path / "mnt", tmp_path / "store"):
        res = Cli(tmp_path / "store")("compact", expect=Busy.exit_code)
        assert "in use" in res.err
    Cli(tmp_path / "store")("compact")  # unmounted: it runs


def test_kill_during_a_fork_leaves_nothing_hanging(tmp_path):
    """``kill -9`` while a fork's overlay mount waits for an answer the daemon had read
    (here: a statfs it is made to sit on). The daemon must still die, its mount abort, the
    forking client get an error instead of hanging, and a restart just work. Overlays are
    mounted from a helper process for exactly this: a daemon thread stuck in mount(2) on
    its own FUSE mount would keep the dying daemon, and every client, waiting forever."""
    src = make_src(tmp_path / "src")
    env = {**os.environ, "OPPIEFS_TEST_STALL_STATFS": "3"}
    d = Daemon(tmp_path / "mnt", tmp_path / "store", env=env).start()
    try:
        with Client(d.mnt) as c:
            snap = c.import_(src)
        outcome: list[BaseException | str] = []

        def fork() -> None:
            try:
                with Client(d.mnt) as c:
                    outcome.append(c.fork(snap).id)
            except BaseException as exc:  # recorded for the assertion
                outcome.append(exc)

        worker = threading.Thread(target=fork, daemon=True)
        worker.start()
        time.sleep(1.0)  # the overlay mount now waits on the stalled statfs
        d.kill()  # raises if the daemon cannot die within 10 s
        worker.join(10)
        assert not worker.is_alive(), "the forking client hangs on a dead daemon"
        assert outcome and isinstance(outcome[0], OSError | OppieError), outcome
        d.env = None
        d.start()
        with Client(d.mnt) as c:
            node = c.fork(snap)
            assert (Path(node.path) / "top.txt").read_text() == "top src\n"
            c.drop(node.id)
    finally:
        d.stop()
    assert mounts_under(tmp_path) == []


def test_commit_refuses_a_node_unmounted_from_outside(mdaemon, tmp_path):
    """An overlay unmounted behind the daemon's back leaves a plain dir where the node was:
    writes there reach no layer, so commit says so instead of succeeding, and drop still
    works."""
    c = Client(mdaemon.mnt)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    snap = c.import_(src)
    node = c.fork(snap)
    (Path(node.path) / "b").write_text("before")
    first = c.commit(node)
    merged = os.path.realpath(node.path)
    subprocess.run(["umount", merged], check=True)
    (Path(merged) / "lost").write_text("after")
    with pytest.raises(NotMounted, match="unmounted from outside oppiefs"):
        c.commit(node)
    c.drop(node)
    assert first in os.listdir(mdaemon.mnt / "snapshots")
    fsck_clean(mdaemon.store)
