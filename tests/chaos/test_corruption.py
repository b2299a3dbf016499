"""Reliability 3: bytes of stored objects flipped on disk are caught, never served.

The store is imported and corrupted while no daemon runs (so no page cache or chunk cache
holds the good bytes), then mounted fresh. Corrupted: ``OPPIEFS_CORRUPT_OBJECTS`` (default
5) single-chunk files, one chunk in the middle of a multi-chunk file, and one directory's
tree object. Each flip is inside an object's payload, found by a byte run unique to it, so
LMDB's own pages stay valid: exactly the damage only the per-read hash check can see.

Promises: reading a damaged file (or listing a damaged directory) through the mount fails
with EIO and the daemon logs the object id; everything else reads byte-identical;
``oppiefs fsck`` names every corrupted object by id and exits non-zero.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from oppiefs import tree
from oppiefs.store import oid_of
from tests.chaosutil import env_int, flip_payload_byte, record_figures
from tests.cliutil import Cli
from tests.mountutil import Daemon
from tests.treeutil import assert_same_tree, det_bytes, make_odd_tree

N_FILES = env_int("OPPIEFS_CORRUPT_OBJECTS", 5)
BIG = 4 << 20  # multi-chunk file: ~64 chunks


def _eio(fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errno.EIO, info.value


def _read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def test_corrupted_objects_read_eio(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    make_odd_tree(src)
    vdir = src / "victims"
    vdir.mkdir()
    victims = {f"v{i}": det_bytes(8000 + i, f"victim-{i}") for i in range(N_FILES)}
    for name, data in victims.items():
        (vdir / name).write_bytes(data)
    (vdir / "intact-neighbour").write_bytes(det_bytes(8000, "neighbour"))
    big = det_bytes(BIG, "big-victim")
    (vdir / "big").write_bytes(big)
    tag = secrets.token_hex(30)  # in one tree object only: a child's name
    baddir = vdir / "baddir"
    baddir.mkdir()
    (baddir / f"child-{tag}").write_bytes(b"below a corrupt directory\n")
    snap = Cli(store)("import", src).out.strip()

    # Which objects to damage, found through the store before it is touched.
    with tree.open_store(store, create=False) as st:
        reader = tree.Reader(st)
        root = bytes.fromhex(snap)
        fmap = reader.filemap(reader.lookup(root, "victims/big"))
        mid = len(fmap.oids) // 2
        assert mid >= 3, "the big file should span many chunks"
        big_chunk, big_start = fmap.oids[mid], fmap.starts[mid]
        bad_tree = reader.lookup(root, "victims/baddir").ref
        tree_children = set(tree.children_of(*st.get(bad_tree)))
    targets: dict[str, bytes] = {oid_of(d).hex(): d[2000:2064] for d in victims.values()}
    chunk = big[big_start:big_start + 4096]
    targets[big_chunk.hex()] = chunk[1000:1064]
    targets[bad_tree.hex()] = f"child-{tag}".encode()
    for oid, marker in targets.items():
        # >= 1: a copy-on-write page freed by a later transaction may hold an old copy.
        assert flip_payload_byte(store, marker) >= 1, f"object {oid}: marker not found"

    d = Daemon(tmp_path / "mnt", store)
    d.start()
    try:
        snapdir = d.mnt / "snapshots" / snap
        for name in victims:
            _eio(_read, snapdir / "victims" / name)
        # The multi-chunk file: its head still reads, the whole file does not.
        with open(snapdir / "victims" / "big", "rb", buffering=0) as f:
            assert os.pread(f.fileno(), 65536, 0) == big[:65536]
            _eio(os.pread, f.fileno(), 65536, big_start)
        _eio(_read, snapdir / "victims" / "big")
        # A corrupt directory: listed in its parent, but its contents cannot be served.
        assert "baddir" in os.listdir(snapdir / "victims")
        _eio(os.listdir, snapdir / "victims" / "baddir")
        _eio(os.stat, snapdir / "victims" / "baddir" / f"child-{tag}")

        # Everything else: byte-identical.
        assert _read(snapdir / "victims" / "intact-neighbour") == det_bytes(8000, "neighbour")
        for top in sorted(os.listdir(src)):
            if top != "victims" and (src / top).is_dir() and not (src / top).is_symlink():
                assert_same_tree(src / top, snapdir / top)
        log = d.log.read_text(errors="replace")
        for oid in targets:
            assert oid in log, f"daemon log does not name corrupt object {oid}"

        res = Cli(store)("fsck", expect=None)  # while mounted: one read transaction
        assert res.rc != 0
        findings = res.out.strip().splitlines()
        corrupt = {ln.split()[2].rstrip(":") for ln in findings if ln.startswith("corrupt ")}
        assert corrupt == set(targets), findings
        # The only other findings are about the corrupt tree's children, which fsck cannot
        # count any more (their references live inside the damaged bytes).
        others = [ln for ln in findings if not ln.startswith("corrupt ")]
        assert all(any(c.hex() in ln for c in tree_children) for ln in others), others
    finally:
        d.stop()
    res = Cli(store)("fsck", "--json", expect=None)
    assert res.rc == 12 and not res.json()["clean"]
    record_figures("corruption", objects_corrupted=len(targets),
                   single_chunk_files=N_FILES, mid_file_chunks=1, tree_objects=1,
                   fsck_findings=len(findings), fsck_corrupt_named=len(corrupt))
