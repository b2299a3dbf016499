"""Reading host trees that change meanwhile (``oppiefs.hostfs``): import and commit.

What must hold: a name swapped for a symlink between its lstat() and its open is never
followed (an unprivileged user could otherwise have root copy any file into a snapshot with
their own file's mode), a file or directory that changed while read is read again, so a
snapshot never holds a mixture of two versions, what keeps changing is refused (EBUSY)
naming it, and a tree as deep as a path can be walked.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from oppiefs import errors, hostfs, tree
from oppiefs.store import Store
from tests.treeutil import commit_upper

SECRET = b"root:$y$secret-hash:19000:0:99999:7:::\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    p = tmp_path / "outside" / "shadow"
    p.write_bytes(SECRET)
    p.chmod(0o600)
    return p


def _swap_for_symlink(path: Path, target: Path) -> None:
    """What an attacker's loop does: a symlink renamed over the name, atomically."""
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    if path.is_dir():
        path.rename(path.with_name(path.name + ".was"))  # no renaming over a directory
    os.replace(tmp, path)


def _once_before(monkeypatch: pytest.MonkeyPatch, module: object, fn: str, name: bytes,
                 action) -> list[int]:  # type: ignore[no-untyped-def]
    """Run ``action`` right before the first call of ``module.fn`` for ``name``."""
    real, done = getattr(module, fn), []

    def patched(dir_fd, n, *args):  # type: ignore[no-untyped-def]
        if n == name and not done:
            done.append(1)
            action()
        return real(dir_fd, n, *args)

    monkeypatch.setattr(module, fn, patched)
    return done


def _contents(store: Store, root: bytes) -> dict[bytes, tuple[int, bytes]]:
    reader = tree.Reader(store)
    return {p: (e.type, e.target if e.type == tree.T_SYMLINK else reader.read_all(e))
            for p, e in reader.walk(root) if not e.is_dir}


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"a's own bytes")
    (src / "d" / "x").write_bytes(b"x")
    return src


@pytest.mark.parametrize("name", [b"a", b"d"])
def test_import_never_follows_a_name_swapped_for_a_symlink(
        store: Store, tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch,
        name: bytes) -> None:
    src = _src(tmp_path)
    fn = "open_file" if name == b"a" else "open_dir"
    target = secret if name == b"a" else secret.parent
    done = _once_before(monkeypatch, hostfs, fn, name,
                        lambda: _swap_for_symlink(src / os.fsdecode(name), target))
    root = tree.import_dir(store, src).root
    assert done
    got = _contents(store, root)
    assert got[name] == (tree.T_SYMLINK, os.fsencode(target))  # stored as what it now is
    assert all(SECRET not in data for _, data in got.values())


@pytest.mark.parametrize("name", [b"a", b"d"])
def test_commit_never_follows_a_name_swapped_for_a_symlink(
        store: Store, tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch,
        name: bytes) -> None:
    base = tree.import_dir(store, _src(tmp_path)).root
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "a").write_bytes(b"rewritten in the node")
    (upper / "d" / "y").write_bytes(b"new in the node")
    fn = "open_file" if name == b"a" else "open_dir"
    target = secret if name == b"a" else secret.parent
    done = _once_before(monkeypatch, hostfs, fn, name,
                        lambda: _swap_for_symlink(upper / os.fsdecode(name), target))
    root = commit_upper(store, tree.Reader(store), base, upper)
    assert done
    got = _contents(store, root)
    assert got[name] == (tree.T_SYMLINK, os.fsencode(target))
    assert all(SECRET not in data for _, data in got.values())


def _rewrite_after_first_read(monkeypatch: pytest.MonkeyPatch, path: Path, data: bytes,
                              every: bool = False) -> list[int]:
    real, reads = tree.store_file, []

    def patched(w, fd, size):  # type: ignore[no-untyped-def]
        found = real(w, fd, size)
        if every or not reads:
            path.write_bytes(data + b"%d" % len(reads))  # a write while it was read
        reads.append(1)
        return found

    monkeypatch.setattr(tree, "store_file", patched)
    return reads


def _node_with(store: Store, tmp_path: Path, name: str, data: bytes) -> tuple[bytes, Path]:
    """A base snapshot and an upper dir on it where a node wrote file ``name``."""
    base = tree.import_dir(store, _src(tmp_path)).root
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / name).write_bytes(data)
    return base, upper


def test_a_file_changed_while_imported_is_read_again(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    _rewrite_after_first_read(monkeypatch, src / "a", b"the new version")
    root = tree.import_dir(store, src).root
    assert _contents(store, root)[b"a"] == (tree.T_FILE, b"the new version0")
    assert store.check() == []


def test_a_file_changed_while_committed_is_read_again(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, upper = _node_with(store, tmp_path, "a", b"first")
    _rewrite_after_first_read(monkeypatch, upper / "a", b"second")
    root = commit_upper(store, tree.Reader(store), base, upper)
    assert _contents(store, root)[b"a"] == (tree.T_FILE, b"second0")


def test_what_keeps_changing_is_busy_and_named(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _src(tmp_path)
    reads = _rewrite_after_first_read(monkeypatch, src / "a", b"again", every=True)
    with pytest.raises(errors.Busy) as info:
        tree.import_dir(store, src)
    assert len(reads) == hostfs.TRIES
    assert info.value.errno_name == "EBUSY" and str(src / "a") in info.value.message
    assert store.snapshots() == []


def test_a_name_renamed_during_a_commit_reads_the_directory_again(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name gone between the listing and its lstat(): the directory changed, and is
    listed again; the snapshot holds the name it was renamed to, never neither."""
    base = tree.import_dir(store, _src(tmp_path)).root
    upper = tmp_path / "upper"
    (upper / "r").mkdir(parents=True)
    (upper / "r" / "A").write_bytes(b"moving")
    _once_before(monkeypatch, hostfs, "lstat", b"A",
                 lambda: (upper / "r" / "A").rename(upper / "r" / "B"))
    root = commit_upper(store, tree.Reader(store), base, upper)
    got = _contents(store, root)
    assert got[b"r/B"] == (tree.T_FILE, b"moving") and b"r/A" not in got


def test_a_tree_changing_under_import_never_leaks_nor_mixes(
        store: Store, tmp_path: Path, secret: Path) -> None:
    """The race itself, as the attack runs it: names flipped between a file and a symlink
    to a file the importer may read, while the importer walks. An import either stores a
    state the tree had, or is refused because the tree kept changing."""
    src = tmp_path / "src"
    src.mkdir()
    names = [f"f{i:03d}" for i in range(200)]
    for n in names:
        (src / n).write_bytes(b"plain " + n.encode())
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            if i % 20 == 0:
                stop.wait(0.002)  # quiet moments, so that some imports get through
            p = src / names[i % len(names)]
            tmp = src / ".tmp"
            if p.is_symlink():
                tmp.write_bytes(b"plain " + p.name.encode())
            else:
                os.symlink(secret, tmp)
            os.replace(tmp, p)
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    roots = []
    try:
        for _ in range(15):
            with contextlib.suppress(errors.Busy):  # it kept changing: refused, not stored
                roots.append(tree.import_dir(store, src, use_cache=False).root)
    finally:
        stop.set()
        flipper.join()
    for root in roots:  # what kept changing was refused (EBUSY): safe, if not stored
        for path, (etype, data) in _contents(store, root).items():
            assert SECRET not in data
            if etype == tree.T_SYMLINK:
                assert data == os.fsencode(secret)
            elif path != b".tmp":
                assert data == b"plain " + path
    assert store.check() == []


def test_a_tree_as_deep_as_a_path_can_be(store: Store, tmp_path: Path) -> None:
    """1,500 levels: import, checkout, diff, fsck and a commit on top walk it all."""
    src = tmp_path / "src"
    src.mkdir()
    depth = min(1500, (hostfs.PATH_MAX - len(os.fsencode(tmp_path)) - 40) // 2)
    deep = os.fsencode(src) + b"/d" * depth
    os.makedirs(deep)
    with open(deep + b"/leaf", "wb") as f:
        f.write(b"at the bottom")
    root = tree.import_dir(store, src).root
    reader = tree.Reader(store)
    rel = b"/".join([b"d"] * depth) + b"/leaf"
    assert reader.read_all(reader.lookup(root, rel)) == b"at the bottom"
    out = tmp_path / "out"
    assert tree.checkout(reader, root, out) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    changes = list(tree.diff_trees(reader, tree.import_dir(store, empty).root, root))
    assert [c.path for c in changes] == [b"d"]
    upper = tmp_path / "upper"
    os.makedirs(os.fsencode(upper) + b"/d" * depth)
    with open(os.fsencode(upper) + b"/d" * depth + b"/new", "wb") as f:
        f.write(b"committed")
    top = commit_upper(store, reader, root, upper)
    assert reader.read_all(reader.lookup(top, rel[:-4] + b"new")) == b"committed"
    assert store.check() == []


def _set_acl(path: Path, group_obj: int, mask: int) -> None:
    """An access ACL with a named user (what ``setfacl -m u:1234:rwx`` makes), the owner's
    and others' bits as they were, set as the kernel's xattr: the mode's group bits then
    show ``mask``."""
    mode = stat.S_IMODE(path.stat().st_mode)
    entries = [(0x01, mode >> 6 & 7, 0xFFFFFFFF), (0x02, 0o7, 1234),
               (0x04, group_obj, 0xFFFFFFFF), (0x10, mask, 0xFFFFFFFF),
               (0x20, mode & 7, 0xFFFFFFFF)]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {path}: {exc}")
    assert stat.S_IMODE(path.stat().st_mode) & 0o070 == mask << 3


def test_a_dropped_acl_never_widens_the_owning_groups_rights(
        store: Store, tmp_path: Path) -> None:
    """ACLs are not stored; the group bits kept are the owning group's own (r--), not the
    ACL mask the mode shows (rwx), on import (also from the files cache) and on commit."""
    src = _src(tmp_path)
    (src / "a").chmod(0o640)
    _set_acl(src / "a", group_obj=0o4, mask=0o7)
    (src / "d").chmod(0o750)
    _set_acl(src / "d", group_obj=0o5, mask=0o7)
    reader = tree.Reader(store)
    for _ in range(2):  # read, then taken from the files cache
        root = tree.import_dir(store, src).root
        assert reader.lookup(root, "a").mode == 0o640
        assert reader.lookup(root, "d").mode == 0o750
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "n").write_bytes(b"new in the node")
    (upper / "n").chmod(0o600)
    _set_acl(upper / "n", group_obj=0o0, mask=0o6)
    top = commit_upper(store, reader, root, upper)
    assert reader.lookup(top, "n").mode == 0o600


def test_what_keeps_changing_in_a_node_is_busy_and_named(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, upper = _node_with(store, tmp_path, "log", b"first")
    reads = _rewrite_after_first_read(monkeypatch, upper / "log", b"more", every=True)
    with pytest.raises(errors.Busy) as info:
        commit_upper(store, tree.Reader(store), base, upper)
    assert len(reads) == hostfs.TRIES and str(upper / "log") in info.value.message
