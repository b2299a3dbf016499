"""Snapshot trees served over a real FUSE mount: content, metadata, overlay, errors."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sysconfig
from pathlib import Path

import blake3
import pytest

from oppiefs import tree
from oppiefs.client import Client
from tests.mountutil import Daemon, DaemonDied, is_live_mount, mounts_under, oppiefs_cmd
from tests.treeutil import assert_same_tree, make_odd_tree

BIG_MB = int(os.environ.get("OPPIEFS_BIG_FILE_MB", "2048"))


def det_stream(path: Path, size: int, seed: bytes = b"oppiefs-big") -> str:
    """Write ``size`` pseudo-random bytes (blake3 XOF: fast, not compressible), return sha256."""
    h = hashlib.sha256()
    xof = blake3.blake3(seed)
    step = 8 << 20
    with open(path, "wb") as f:
        for off in range(0, size, step):
            block = xof.digest(length=min(step, size - off), seek=off)
            h.update(block)
            f.write(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One store with the odd tree, a big file and the stdlib, mounted for the module."""
    base = tmp_path_factory.mktemp("served")
    src = base / "odd"
    make_odd_tree(src)
    big = base / "big"
    big.mkdir()
    big_sha = det_stream(big / "blob.bin", BIG_MB << 20)
    multi = base / "multi"
    multi.mkdir()
    (multi / "m.bin").write_bytes(os.urandom(3 << 20) + b"tail")
    wide = base / "wide"
    wide.mkdir()
    for i in range(50_000):
        (wide / f"entry-{i:05d}").touch()
    stdlib = Path(sysconfig.get_path("stdlib"))
    store = tree.open_store(base / "store")
    ids = {}
    for name, path in [("odd", src), ("big", big), ("multi", multi), ("wide", wide),
                       ("stdlib", stdlib)]:
        ids[name] = tree.import_dir(store, path, skip_special=True).root.hex()
    store.close()
    d = Daemon(base / "mnt", base / "store").start()
    try:
        yield d, ids, {"odd": src, "big": big, "multi": multi, "wide": wide,
                       "stdlib": stdlib, "big_sha": big_sha}
    finally:
        d.stop()


def snap(d: Daemon, ident: str) -> Path:
    return d.mnt / "snapshots" / ident


def test_layout(served):
    d, ids, _ = served
    assert sorted(os.listdir(d.mnt)) == ["ctl", "nodes", "snapshots"]
    assert sorted(os.listdir(d.mnt / "snapshots")) == sorted(ids.values())
    # The trees are served by the tree server, on a read-only mount outside <mnt>.
    assert os.readlink(d.mnt / "snapshots") == str(d.store / "trees" / "snapshots")
    assert (str(d.store / "trees"), "fuse.oppiefs") in mounts_under(d.store)
    st = os.stat(d.mnt / "ctl")
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()


def test_odd_tree_identical(served):
    d, ids, src = served
    assert_same_tree(src["odd"], snap(d, ids["odd"]))
    res = subprocess.run(["diff", "-r", "--no-dereference", str(src["odd"]),
                          str(snap(d, ids["odd"]))], capture_output=True)
    assert res.returncode == 0, res.stdout.decode(errors="replace")


def test_stdlib_identical(served):
    d, ids, src = served
    assert_same_tree(src["stdlib"], snap(d, ids["stdlib"]))


def test_big_file_sha256(served):
    d, ids, src = served
    h = hashlib.sha256()
    with open(snap(d, ids["big"]) / "blob.bin", "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    assert h.hexdigest() == src["big_sha"]


@pytest.mark.parametrize("name,file", [("big", "blob.bin"), ("multi", "m.bin")])
def test_random_offset_reads(served, name, file):
    d, ids, src = served
    rng = random.Random(7)
    size = os.path.getsize(src[name] / file)
    with open(src[name] / file, "rb") as a, open(snap(d, ids[name]) / file, "rb") as b:
        for _ in range(300):
            n = rng.choice([1, 2, 4095, 4096, 4097, 65536, 131072, rng.randint(1, 1 << 20)])
            off = rng.randint(0, size)  # includes reads at and past EOF
            assert os.pread(b.fileno(), n, off) == os.pread(a.fileno(), n, off), (off, n)


def test_wide_directory(served):
    d, ids, src = served
    names = os.listdir(snap(d, ids["wide"]))
    assert len(names) == 50_000
    assert sorted(names) == sorted(os.listdir(src["wide"]))
    st = os.lstat(snap(d, ids["wide"]) / "entry-49999")
    assert st.st_size == 0


def test_inode_numbers_stable(served):
    d, ids, _ = served
    p = snap(d, ids["stdlib"]) / "json" / "decoder.py"
    first = os.stat(p).st_ino
    inos = {os.stat(q).st_ino for q in snap(d, ids["odd"]).rglob("*") if not q.is_symlink()}
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    assert os.stat(p).st_ino == first
    assert len(inos) == len([q for q in snap(d, ids["odd"]).rglob("*") if not q.is_symlink()])


def test_tar_and_find(served):
    d, ids, src = served
    # Hard links are stored as independent files, so archive the source dereferenced.
    for tool in (["tar", "--hard-dereference", "-cf", "-", "."],
                 ["find", ".", "-printf", r"%y\t%m\t%T@\t%l\t%s\t%P\0"]):
        a = subprocess.run(tool, cwd=src["odd"], capture_output=True, check=True).stdout
        b = subprocess.run(tool, cwd=snap(d, ids["odd"]), capture_output=True, check=True).stdout
        if tool[0] == "find":
            # A snapshot reports directory sizes as 0 (they are filesystem-specific).
            assert _find_records(a) == _find_records(b)
        else:
            listing = ["tar", "-tvf", "-", "--full-time"]
            la = subprocess.run(listing, input=a, capture_output=True, check=True).stdout
            lb = subprocess.run(listing, input=b, capture_output=True, check=True).stdout
            # Order follows readdir (hash order on ext4, name order here); the root
            # directory's own attributes are not part of a snapshot.
            assert _sorted_without_root(la) == _sorted_without_root(lb)


def _sorted_without_root(listing: bytes) -> list[bytes]:
    return sorted(ln for ln in listing.splitlines() if not ln.endswith(b" ./"))


def _find_records(out: bytes) -> list[list[bytes]]:
    """find -printf records without the root and with directory sizes blanked."""
    records = []
    for rec in out.split(b"\0"):
        fields = rec.split(b"\t", 5)
        if len(fields) < 6 or not fields[5]:
            continue
        if fields[0] == b"d":
            fields[4] = b"-"
        records.append(fields)
    return sorted(records, key=lambda f: f[5])


def test_git_status_clean(tmp_path, daemon):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("hello\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True)
    ident = _import(daemon, repo)
    out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"],
                         cwd=snap(daemon, ident), capture_output=True, text=True,
                         env={**env, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
                              "GIT_CONFIG_VALUE_0": "*"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def _import(d: Daemon, path: Path) -> str:
    from oppiefs.client import Client

    with Client(d.mnt) as c:
        return c.import_(path)


def test_overlay_on_snapshot(served, tmp_path):
    d, ids, src = served
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for p in (upper, work, merged):
        p.mkdir()
    opts = f"lowerdir={snap(d, ids['odd'])},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        assert_same_tree(src["odd"], merged)
        first = next(p for p in (merged / "files").iterdir()
                     if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK))
        (merged / "written-through-overlay").write_text("new\n")
        with open(first, "ab") as f:
            f.write(b"appended")
        assert (upper / "written-through-overlay").read_text() == "new\n"
        assert (upper / "files" / first.name).read_bytes().endswith(b"appended")
        assert_same_tree(src["odd"], snap(d, ids["odd"]))  # the lower is untouched
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


@pytest.mark.parametrize("op", ["create", "write", "mkdir", "unlink", "rename", "chmod",
                                "truncate", "setxattr", "symlink", "rmdir", "utime"])
def test_snapshot_is_read_only(served, op):
    d, ids, _ = served
    root = snap(d, ids["odd"])
    f = next(p for p in (root / "files").iterdir() if p.is_file() and not p.is_symlink())
    sub = next(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    actions = {
        "create": lambda: os.open(root / "new-file", os.O_CREAT | os.O_WRONLY),
        "write": lambda: os.open(f, os.O_RDWR),
        "mkdir": lambda: os.mkdir(root / "newdir"),
        "unlink": lambda: os.unlink(f),
        "rename": lambda: os.rename(f, root / "renamed"),
        "chmod": lambda: os.chmod(f, 0o777),
        "truncate": lambda: os.truncate(f, 0),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "symlink": lambda: os.symlink("x", root / "newlink"),
        "rmdir": lambda: os.rmdir(sub),
        "utime": lambda: os.utime(f, (0, 0)),
    }
    with pytest.raises(OSError) as exc:
        actions[op]()
    assert exc.value.errno == errno.EROFS, exc.value


@pytest.mark.parametrize("name", ["abc", "0" * 64, "zz" * 32, "A" * 64, "snapshot", "x" * 300])
def test_unknown_snapshot_enoent(served, name):
    d, _, _ = served
    with pytest.raises(FileNotFoundError):
        os.listdir(d.mnt / "snapshots" / name)


def test_prefix_is_not_a_path(served):
    d, ids, _ = served
    with pytest.raises(FileNotFoundError):
        os.listdir(d.mnt / "snapshots" / ids["odd"][:8])


def test_getxattr_enodata(served):
    d, ids, _ = served
    f = snap(d, ids["odd"])
    assert os.listxattr(f) == []
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "security.selinux")
    assert exc.value.errno == errno.ENODATA


def test_killed_daemon_remounts_cleanly(tmp_path):
    src = tmp_path / "src"
    make_odd_tree(src)
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    try:
        ident = _import(d, src)
        d.kill()
        with pytest.raises(OSError) as exc:
            os.listdir(d.mnt)
        assert exc.value.errno == errno.ENOTCONN
        res = subprocess.run(oppiefs_cmd(str(d.mnt), "--store", str(d.store)),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert is_live_mount(d.mnt)
        assert_same_tree(src, d.mnt / "snapshots" / ident)
        res = subprocess.run(oppiefs_cmd("umount", str(d.mnt)), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert not mounts_under(tmp_path)  # the tree server's mount went with it
    finally:
        d.stop()


def test_second_mount_refused(daemon, tmp_path):
    res = subprocess.run(oppiefs_cmd("mount", str(daemon.mnt), "--store", str(daemon.store)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "already" in res.stderr and "Traceback" not in res.stderr


def test_background_mount_errors_keep_their_class(tmp_path):
    """A background mount's refusal comes back from the daemon with its errno, so the
    exit code is the one a foreground mount gives, and the message is the daemon's own
    (not whatever line its log ends with)."""
    with Daemon(tmp_path / "mnt", tmp_path / "store") as d:
        res = subprocess.run(oppiefs_cmd("mount", str(d.mnt), "--store", str(tmp_path / "b")),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 5, res.stderr  # Busy
        assert "already mounted" in res.stderr and "Traceback" not in res.stderr
        res = subprocess.run(oppiefs_cmd("mount", str(tmp_path / "m2"), "--store", str(d.store)),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 5 and "already served" in res.stderr, res.stderr
    inside = tmp_path / "m3"
    res = subprocess.run(oppiefs_cmd("mount", str(inside), "--store", str(inside / "store")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "inside the mountpoint" in res.stderr, res.stderr
    res = subprocess.run(oppiefs_cmd("mount", str(tmp_path / "m5"), "--store",
                                     str(tmp_path / "s5"), "-o", "allow_other,ro"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "-o ro" in res.stderr, res.stderr
    (tmp_path / "file").write_text("")
    res = subprocess.run(oppiefs_cmd("mount", str(tmp_path / "m4"), "--store",
                                     str(tmp_path / "file" / "store")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Not a directory" in res.stderr, res.stderr
    assert "internal error" not in res.stderr
    assert not mounts_under(tmp_path)


def test_mounts_at_once_on_one_mountpoint(tmp_path):
    """Two daemons started together for one mountpoint (other stores): one serves, the
    other is refused; never two mounts stacked. Then umount returns only once the daemon
    has let go, so mounting again at once works."""
    mnt = tmp_path / "mnt"
    procs = [subprocess.Popen(oppiefs_cmd("mount", str(mnt), "--store", str(tmp_path / s)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in ("a", "b")]
    try:
        codes = sorted(p.wait(60) for p in procs)
        assert codes == [0, 5], [p.stderr.read() for p in procs if p.stderr]
        assert [fs for mp, fs in mounts_under(mnt) if mp == str(mnt)] == ["fuse.oppiefs"]
        served = next(s for s in ("a", "b") if (tmp_path / s / "mount.lock").exists()
                      and is_live_mount(tmp_path / s / "trees"))
        for _ in range(3):
            res = subprocess.run(oppiefs_cmd("umount", str(mnt)), capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            res = subprocess.run(oppiefs_cmd("mount", str(mnt), "--store",
                                             str(tmp_path / served)),
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
    finally:
        subprocess.run(oppiefs_cmd("umount", str(mnt)), capture_output=True, timeout=60)
        for mp, _ in mounts_under(tmp_path):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    assert not mounts_under(tmp_path)


def test_bad_fuse_option_says_why(tmp_path):
    """libfuse names a refused option on stderr only: the mount command passes it on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(oppiefs_cmd("mount", str(mnt), "--store", str(tmp_path / "store"),
                                     "-o", "no_such_option"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr  # InvalidArgument
    assert "unknown option" in res.stderr and "no_such_option" in res.stderr
    assert not mounts_under(tmp_path)


def test_fixture_failure_path(tmp_path):
    """A daemon that cannot start makes the fixture fail fast with the reason, no mount left."""
    bad_store = tmp_path / "store"
    bad_store.write_text("not a directory")
    d = Daemon(tmp_path / "mnt", bad_store)
    with pytest.raises(DaemonDied) as exc:
        d.start(timeout=20)
    assert "store" in str(exc.value) and "exited" in str(exc.value)
    d.stop()
    assert not mounts_under(tmp_path)


def test_umount_plain_fusermount(tmp_path):
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    try:
        server = d.tree_server_pid()
        subprocess.run(["fusermount3", "-u", str(d.mnt)], check=True)
        assert d.proc is not None
        assert d.proc.wait(20) == 0
        assert not mounts_under(tmp_path)  # the tree server unmounted and exited too
        assert not Path(f"/proc/{server}").exists()
    finally:
        d.stop()


def test_tree_server_death_takes_the_mount_down_cleanly(tmp_path):
    """Snapshots unreachable is no state to keep serving in: the daemon shuts down, taking
    its mount, the dead tree server's mount and the node overlays on it along."""
    src = tmp_path / "src"
    make_odd_tree(src)
    d = Daemon(tmp_path / "mnt", tmp_path / "store").start()
    try:
        with Client(d.mnt) as c:
            c.fork(c.import_(src))
        os.kill(d.tree_server_pid(), signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(30)
        assert not mounts_under(tmp_path)
        assert "the tree server exited" in d.log_text()
    finally:
        d.stop()
