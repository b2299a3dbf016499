"""The tree helpers must see every difference they claim to compare, or tests built on them
pass vacuously."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.treeutil import (
    MTIME_FUTURE_NS,
    MTIME_PRE_EPOCH_NS,
    NON_UTF8_NAME,
    add_special_files,
    assert_same_tree,
    make_odd_tree,
    make_sized_tree,
    tree_meta,
)


@pytest.fixture(scope="module")
def odd_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pair")
    make_odd_tree(base / "a")
    make_odd_tree(base / "b")
    return base / "a", base / "b"


def test_odd_tree_is_deterministic_and_has_every_case(odd_pair: tuple[Path, Path]) -> None:
    a, b = odd_pair
    assert_same_tree(a, b, owners=True)
    meta = tree_meta(a)
    kinds = {row[0] for row in meta.values()}
    assert kinds == {"file", "dir", "symlink"}
    assert meta[b"files/empty"][2] == 0
    assert meta[b"files/empty"][3] == MTIME_PRE_EPOCH_NS
    assert meta[b"files/one-byte"][3] == MTIME_FUTURE_NS
    assert meta[b"files/random-5MiB"][2] == 5 << 20
    assert meta[b"modes/setuid"][1] == 0o4755
    assert meta[b"modes/private"][1] == 0o600
    assert meta[b"names/" + NON_UTF8_NAME][0] == "file"
    assert meta[b"names/new\nline"][0] == "file"
    assert meta[b"dirs/empty"][0] == "dir"
    assert meta[b"links/dangling"] == ("symlink", 0o777, 14, meta[b"links/dangling"][3],
                                       b"does/not/exist")
    assert meta[b"links/absolute"][4] == b"/etc/passwd"
    assert meta[b"hardlinks/original"] == meta[b"hardlinks/second-name"]
    assert os.stat(a / "hardlinks/original").st_nlink == 3
    assert all(row[3] % 1000 for row in meta.values() if row[0] == "dir")  # sub-microsecond


@pytest.mark.parametrize("change", [
    "mode", "mtime", "content-same-size", "symlink-target", "extra", "missing", "type",
    "owner", "dir-mtime",
])
def test_assert_same_tree_reports_each_difference(tmp_path: Path, change: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_bytes(b"same\n")
        (root / "l").symlink_to("d/f")
        for p in (root / "d" / "f", root / "d", root / "l"):
            os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)
    f = b / "d" / "f"
    if change == "mode":
        f.chmod(0o600)
    elif change == "mtime":
        os.utime(f, ns=(10**18 + 1, 10**18 + 1))
    elif change == "content-same-size":
        f.write_bytes(b"diff\n")
        os.utime(f, ns=(10**18, 10**18))
    elif change == "symlink-target":
        (b / "l").unlink()
        (b / "l").symlink_to("d/g")
        os.utime(b / "l", ns=(10**18, 10**18), follow_symlinks=False)
    elif change == "extra":
        (b / "extra").mkdir()
    elif change == "missing":
        (b / "l").unlink()
    elif change == "type":
        f.unlink()
        f.mkdir()
        os.utime(f, ns=(10**18, 10**18))
    elif change == "owner":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(f, 4321, 4321)
    elif change == "dir-mtime":
        os.utime(b / "d", ns=(10**18 + 7, 10**18 + 7))
    with pytest.raises(AssertionError) as info:
        assert_same_tree(a, b, owners=True)
    assert ("'d/f'" in str(info.value)) or ("'l'" in str(info.value)) or (
        "'extra'" in str(info.value)) or ("'d'" in str(info.value))


def test_meta_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "up").symlink_to("..")
    meta = tree_meta(tmp_path)
    assert set(meta) == {b"loop", b"up"}
    assert meta[b"up"][0] == "symlink"


def test_special_files_are_seen(tmp_path: Path) -> None:
    made = add_special_files(tmp_path)
    kinds = {os.path.basename(p): stat.S_IFMT(os.lstat(p).st_mode) for p in made}
    assert kinds[b"fifo"] == stat.S_IFIFO
    assert kinds[b"socket"] == stat.S_IFSOCK
    assert {row[0] for row in tree_meta(tmp_path).values()} >= {"fifo", "socket"}


def test_sized_tree_hits_its_totals(tmp_path: Path) -> None:
    make_sized_tree(tmp_path / "t", files=300, total_bytes=5 << 20, seed=3)
    meta = tree_meta(tmp_path / "t")
    sizes = [row[2] for row in meta.values() if row[0] == "file"]
    assert len(sizes) == 300
    assert sum(sizes) == 5 << 20
    assert max(sizes) > 256 * 1024  # some files span several chunks
