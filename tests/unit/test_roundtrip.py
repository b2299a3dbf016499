"""Acceptance 1: import -> checkout reproduces a tree exactly; ids are stable; fsck is clean.

Checked on a generated tree holding every odd case (tests.treeutil.make_odd_tree) and on a
real tree every machine has: the running Python's standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
import sysconfig
import time
from pathlib import Path

import pytest

from oppiefs import tree
from oppiefs.errors import Unsupported
from tests.cliutil import Cli, store_state
from tests.treeutil import (
    NON_UTF8_NAME,
    add_special_files,
    assert_same_meta,
    assert_same_tree,
    diff_meta,
    make_odd_tree,
    tree_meta,
)

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def odd(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_odd_tree(src)
    return src


def test_odd_tree_round_trip_cli(cli: Cli, odd: Path, tmp_path: Path) -> None:
    snap = cli("import", odd).out.strip()
    assert len(snap) == 64
    out = tmp_path / "out"
    res = cli("checkout", snap[:8], out)
    assert snap in res.out
    assert_same_tree(odd, out, owners=AS_ROOT)
    # Hard links come back as independent files.
    assert os.stat(out / "hardlinks/original").st_nlink == 1
    assert os.stat(out / "hardlinks/second-name").st_nlink == 1
    # Same content -> same id, from the source again and from the checkout.
    assert cli("import", odd).out.strip() == snap
    assert cli("import", out).out.strip() == snap
    assert cli("ls", "--json").json()[0]["snapshot"] == snap
    assert len(cli("ls", "--json").json()) == 1
    assert cli("fsck").out.strip() == "clean"
    assert cli("fsck", "--json").json()["clean"] is True


def test_odd_tree_round_trip_api(store_dir: Path, odd: Path, tmp_path: Path) -> None:
    with tree.open_store(store_dir) as store:
        rep = tree.import_dir(store, odd)
        meta = tree_meta(odd)
        assert rep.files == sum(row[0] == "file" for row in meta.values())
        assert rep.symlinks == sum(row[0] == "symlink" for row in meta.values())
        assert rep.dirs == 1 + sum(row[0] == "dir" for row in meta.values())
        assert rep.bytes == sum(row[2] for row in meta.values() if row[0] == "file")
        assert rep.skipped == []
        reader = tree.Reader(store)
        # Names and targets are raw bytes, symlinks are stored, not followed.
        entry = reader.lookup(rep.root, b"names/" + NON_UTF8_NAME)
        assert entry.is_file and reader.read_all(entry) == (odd / "names").joinpath(
            os.fsdecode(NON_UTF8_NAME)).read_bytes()
        link = reader.lookup(rep.root, "links/absolute-dangling")
        assert link.type == tree.T_SYMLINK and link.target == b"/nonexistent/oppiefs/target"
        assert reader.lookup(rep.root, "link-to-dir-at-top").type == tree.T_SYMLINK
        assert reader.lookup(rep.root, "files/random-5MiB").type == tree.T_CHUNKED
        assert reader.lookup(rep.root, "files/empty").ref == tree.ZERO_ID
        out = tmp_path / "out"
        assert tree.checkout(reader, rep.root, out) == rep.files
        assert store.check() == []
    assert_same_tree(odd, out, owners=AS_ROOT)


def test_sparse_file_checks_out_sparse(cli: Cli, tmp_path: Path) -> None:
    """Runs of zeros come back as holes (a 64 MiB image with 3 small extents writes ~3
    extents, not 64 MiB), a hole at the end too, and the bytes are the same."""
    src = tmp_path / "src"
    src.mkdir()
    img = src / "disk.img"
    with open(img, "wb") as f:
        for at in (0, 20 << 20, 40 << 20):
            f.seek(at)
            f.write(os.urandom(100_000))
        f.truncate(64 << 20)
    (src / "zeros").write_bytes(bytes(3000))  # too short to be a hole: written
    snap = cli("import", src).out.strip()
    out = tmp_path / "out"
    cli("checkout", snap, out)
    assert (out / "disk.img").read_bytes() == img.read_bytes()
    st = os.stat(out / "disk.img")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 8 << 20, st
    assert (out / "zeros").read_bytes() == bytes(3000)


def test_mode_bits_survive_checkout_as_set(cli: Cli, odd: Path, tmp_path: Path) -> None:
    """Spot-check the bits chown would clear and the umask would hide."""
    snap = cli("import", odd).out.strip()
    out = tmp_path / "out"
    cli("checkout", snap, out)
    assert stat.S_IMODE(os.stat(out / "modes/setuid").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(out / "modes/setgid").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(out / "modes/sticky-dir").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(out / "modes/no-perms").st_mode) == 0
    assert os.readlink(out / "links/self-loop") == "self-loop"


@pytest.mark.parametrize("flag", [False, True])
def test_special_files(cli: Cli, tmp_path: Path, flag: bool) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "keep").write_bytes(b"kept\n")
    special = add_special_files(src / "sub")
    cli("import", tmp_path / "src", "--skip-special", expect=None)  # create the store
    before = store_state(cli.store)
    if not flag:
        res = cli("import", src, expect=Unsupported.exit_code)
        assert res.err.startswith("oppiefs: ")
        assert len(res.err.strip().splitlines()) == 1
        assert "--skip-special" in res.err
        # The message names the offending path (the first one met).
        assert any(os.fsdecode(p) in res.err for p in special), res.err
        assert store_state(cli.store) == before
        return
    res = cli("import", src, "--skip-special", "--json")
    report = res.json()
    assert sorted(report["skipped"]) == sorted(
        f"{os.fsdecode(p)} ({kind})" for p, kind in zip(
            special, ["FIFO", "socket", "device node"], strict=False))
    assert report["files"] == 1
    text = cli("import", src, "--skip-special")
    for p in special:
        assert f"oppiefs: skipped {os.fsdecode(p)}" in text.err
    out = tmp_path / "out"
    cli("checkout", report["snapshot"], out)
    assert sorted(os.listdir(out / "sub")) == ["keep"]


def test_stdlib_round_trip(cli: Cli, tmp_path: Path) -> None:
    """A real tree of ~1 GB: byte-identical checkout, same id on re-import, fsck clean."""
    src = Path(sysconfig.get_path("stdlib"))
    t0 = time.monotonic()
    before = tree_meta(src, owners=AS_ROOT)
    t1 = time.monotonic()
    report = cli("import", src, "--json").json()
    t2 = time.monotonic()
    out = tmp_path / "out"
    cli("checkout", report["snapshot"], out)
    t3 = time.monotonic()
    got = tree_meta(out, owners=AS_ROOT)
    t4 = time.monotonic()
    shutil.rmtree(out)  # ~1 GB; pytest would keep it around for three sessions
    problems = diff_meta(before, got)
    if problems and tree_meta(src, owners=AS_ROOT) != before:
        pytest.fail(f"{src} changed while the test ran; cannot judge the round trip:\n"
                    + "\n".join(problems))
    assert_same_meta(before, got, f"{src} and its checkout")
    assert report["files"] == sum(row[0] == "file" for row in before.values())
    again = cli("import", src).out.strip()
    t5 = time.monotonic()
    assert again == report["snapshot"]
    assert cli("fsck").out.strip() == "clean"
    t6 = time.monotonic()
    print(f"stdlib: {report['files']} files {report['bytes'] / 1e6:.0f} MB; meta {t1 - t0:.1f}s "
          f"import {t2 - t1:.1f}s checkout {t3 - t2:.1f}s meta {t4 - t3:.1f}s "
          f"reimport {t5 - t4:.1f}s fsck {t6 - t5:.1f}s")
