"""Acceptance 2: content is stored once; an edit costs only the chunks it touched."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from oppiefs import chunker, tree
from oppiefs.store import oid_of
from tests.cliutil import Cli
from tests.treeutil import MIB, det_bytes, make_odd_tree

N_FILES = 100  # x 1 MiB = the 100 MB set


def _chunk_ids(data: bytes) -> list[bytes]:
    return [oid_of(c) for c in chunker.chunk_bytes(data)]


def test_one_changed_file_adds_only_its_new_chunks(cli: Cli, store_dir: Path,
                                                   tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
    for i in range(N_FILES):
        (src / f"d{i % 4}" / f"f{i:03d}").write_bytes(det_bytes(MIB, i))
    first = cli("import", src).out.strip()
    s1 = cli("stats", "--json").json()
    assert s1["logical_bytes"] == N_FILES * MIB

    victim = src / "d2" / "f050"
    old = victim.read_bytes()
    new = bytearray(old)
    new[500_000:500_100] = det_bytes(100, "edit")
    victim.write_bytes(bytes(new))
    second = cli("import", src).out.strip()
    assert second != first
    s2 = cli("stats", "--json").json()

    old_ids, new_chunks = set(_chunk_ids(old)), list(chunker.chunk_bytes(bytes(new)))
    fresh = {oid_of(c): len(c) for c in new_chunks if oid_of(c) not in old_ids}
    assert 1 <= len(fresh) <= 2
    with tree.open_store(store_dir, create=False) as store:
        reader = tree.Reader(store)
        entry = reader.lookup(bytes.fromhex(second), "d2/f050")
        assert entry.type == tree.T_CHUNKED
        assert reader.filemap(entry).oids == [oid_of(c) for c in new_chunks]
        # What the second import may add: the fresh chunks, the file's new chunk list, and
        # the two directories on its path (d2 and the root). Nothing else.
        added = {**fresh, entry.ref: len(store.get_payload(entry.ref))}
        for oid in (bytes.fromhex(second), reader.lookup(bytes.fromhex(second), "d2").ref):
            added[oid] = len(store.get_payload(oid))
    assert s2["objects"] - s1["objects"] == len(added)
    assert s2["stored_bytes"] - s1["stored_bytes"] == sum(added.values())
    assert s2["stored_bytes"] - s1["stored_bytes"] < 2 * chunker.MAX_SIZE + 64 * 1024
    assert s2["logical_bytes"] == 2 * N_FILES * MIB
    assert s2["snapshots"] == 2
    assert cli("fsck").out.strip() == "clean"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_one_byte_insertion_changes_at_most_two_chunks(seed: int, where: float) -> None:
    data = det_bytes(4 * MIB, f"insert-{seed}")
    pos = int(len(data) * where)
    edited = data[:pos] + b"\x00" + data[pos:]
    a, b = _chunk_ids(data), _chunk_ids(edited)
    assert len(a) > 30  # really multi-chunk
    new = set(b) - set(a)
    assert 1 <= len(new) <= 2, f"{len(new)} new chunks of {len(b)}"
    assert len(set(a) - set(b)) <= 2


@pytest.mark.parametrize("size", [
    chunker.MIN_SIZE + 1, chunker.MAX_SIZE, chunker.MAX_SIZE + 1, 3 * chunker.MAX_SIZE + 7,
    chunker.WHOLE_MAX, chunker.WHOLE_MAX + 1, 2 * chunker.WHOLE_MAX + 3])
def test_whole_and_streamed_files_are_cut_alike(tmp_path: Path, size: int) -> None:
    """chunk_file reads files up to WHOLE_MAX whole and streams larger ones: both must give
    the cuts of the other (a file's id, and dedup, depend on them), for random data and for
    data without cut points (max-size chunks)."""
    rng = random.Random(size)
    for kind, data in (("random", rng.randbytes(size)), ("zeros", bytes(size))):
        streamed = list(chunker.chunk_stream(io.BytesIO(data)))
        assert list(chunker.chunk_bytes(data)) == streamed, kind
        (tmp_path / kind).write_bytes(data)
        assert list(chunker.chunk_file(tmp_path / kind)) == streamed, kind
        assert b"".join(streamed) == data


def test_stored_chunks_match_in_memory_chunking(store_dir: Path, tmp_path: Path) -> None:
    """Import streams files through the chunker; the cuts must equal chunk_bytes' cuts,
    and the 1-byte-insertion copy in the odd tree shares all but ~1-2 stored chunks."""
    src = tmp_path / "src"
    make_odd_tree(src)
    with tree.open_store(store_dir) as store:
        root = tree.import_dir(store, src).root
        reader = tree.Reader(store)
        maps = {}
        for name in ("random-5MiB", "random-5MiB-plus-1-byte", "zeros-2MiB"):
            entry = reader.lookup(root, f"files/{name}")
            maps[name] = reader.filemap(entry).oids
            assert maps[name] == _chunk_ids((src / "files" / name).read_bytes()), name
        orig, edited = maps["random-5MiB"], maps["random-5MiB-plus-1-byte"]
        assert len(set(edited) - set(orig)) <= 2
        assert len(set(orig) & set(edited)) >= len(orig) - 2
        # A run of zeros is one max-size chunk repeated: stored once.
        assert len(set(maps["zeros-2MiB"])) == 1
        assert len(maps["zeros-2MiB"]) == 2 * MIB // chunker.MAX_SIZE
        # Duplicate files are one object.
        t1 = reader.lookup(root, "files/text.txt")
        t2 = reader.lookup(root, "files/copy-of-text.txt")
        assert t1.ref == t2.ref
        assert store.refcount(t1.ref) == 2


def test_identical_trees_share_everything(cli: Cli, tmp_path: Path) -> None:
    make_odd_tree(tmp_path / "a")
    make_odd_tree(tmp_path / "b")
    snap = cli("import", tmp_path / "a").out.strip()
    s1 = cli("stats", "--json").json()
    assert cli("import", tmp_path / "b").out.strip() == snap
    s2 = cli("stats", "--json").json()
    assert (s2["objects"], s2["stored_bytes"]) == (s1["objects"], s1["stored_bytes"])
    os.utime(tmp_path / "b" / "files" / "text.txt", ns=(1, 1))
    changed = cli("import", tmp_path / "b").out.strip()
    s3 = cli("stats", "--json").json()
    assert changed != snap
    assert s3["objects"] - s2["objects"] == 2  # the files/ tree and the root, no content
