"""The import files cache: unchanged files are not read again, changed ones always are."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from oppiefs import store as store_mod
from oppiefs import tree
from oppiefs.store import Store


@pytest.fixture
def fast_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust files older than 10 ms instead of 2 s, so tests need not wait."""
    monkeypatch.setattr(tree, "RACY_NS", 10_000_000)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    seen: list[bytes] = []
    real = tree.read_file

    def counting(w, dir_fd, name, st):  # type: ignore[no-untyped-def]
        seen.append(os.fsencode(os.readlink(f"/proc/self/fd/{dir_fd}")) + b"/" + name)
        return real(w, dir_fd, name, st)

    monkeypatch.setattr(tree, "read_file", counting)
    return seen


def _make(root: Path) -> None:
    for i in range(20):
        (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(100 + i * 5000))
    (root / "empty").write_bytes(b"")


def _imported(tmp_path: Path) -> tuple[Path, Store, tree.ImportReport]:
    """A tree older than the (test-shortened) racy window, imported once."""
    src = tmp_path / "src"
    _make(src)
    time.sleep(0.05)
    store = tree.open_store(tmp_path / "store")
    return src, store, tree.import_dir(store, src)


def test_reimport_reads_nothing_unchanged(tmp_path, monkeypatch, fast_trust) -> None:
    src, store, first = _imported(tmp_path)
    reads = _count_reads(monkeypatch)
    again = tree.import_dir(store, src)
    assert again.root == first.root and reads == []
    assert tree.import_dir(store, src, use_cache=False).root == first.root
    assert len(reads) == 21
    assert store.check() == []


def test_changed_file_is_read_even_with_same_size_and_mtime(tmp_path, monkeypatch,
                                                            fast_trust) -> None:
    src, store, _ = _imported(tmp_path)
    victim = src / "d1" / "f5"
    st = victim.stat()
    time.sleep(0.05)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size ...
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... same mtime; ctime moved
    reads = _count_reads(monkeypatch)
    rep = tree.import_dir(store, src)
    assert reads == [os.fsencode(victim)]
    reader = tree.Reader(store)
    assert reader.read_all(reader.lookup(rep.root, "d1/f5")) == bytes(data)


def test_recent_files_are_not_cached(tmp_path, monkeypatch) -> None:
    src = tmp_path / "src"
    _make(src)  # just written: inside the 2 s window, so never trusted
    store = tree.open_store(tmp_path / "store")
    tree.import_dir(store, src)
    reads = _count_reads(monkeypatch)
    tree.import_dir(store, src)
    assert len(reads) == 21


def test_collected_cached_object_falls_back_to_reading(tmp_path, monkeypatch,
                                                       fast_trust) -> None:
    src, store, first = _imported(tmp_path)
    store.release(first.root)
    store.sweep()  # every object is gone; the files cache still names them
    assert store.stats().objects == 0
    rep = tree.import_dir(store, src)
    assert rep.root == first.root
    reader = tree.Reader(store)
    for path, e in reader.walk(rep.root):
        if e.is_file:
            assert reader.read_all(e) == (src / os.fsdecode(path)).read_bytes()
    assert store.check() == []


def test_records_of_deleted_files_are_dropped(tmp_path, fast_trust) -> None:
    """A re-import forgets cache records of files that are gone, and only under its root."""
    src, store, _ = _imported(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"elsewhere")
    time.sleep(0.05)
    tree.import_dir(store, other)
    (src / "d1" / "f5").unlink()
    for f in (src / "d2").iterdir():
        f.unlink()
    (src / "d2").rmdir()

    def keys() -> set[str]:
        with store.env.begin() as txn:
            return {os.fsdecode(k) for k, _ in txn.cursor(db=store.db["files"])}

    assert str(src / "d1" / "f5") in keys()
    tree.import_dir(store, src)
    now = {str(p) for p in src.rglob("*") if p.is_file()}
    assert {k for k in keys() if k.startswith(f"{src}/")} == now
    assert str(other / "x") in keys()


def test_paths_past_the_key_limit_are_cached(tmp_path, monkeypatch, fast_trust) -> None:
    """LMDB keys hold 511 bytes, host paths more (deep trees, long names): such paths are
    cached under a hashed key, found again, and dropped once their file is gone."""
    src = tmp_path / "src"
    deep = src / ("a" * 200) / ("b" * 200) / ("c" * 200)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep")
    (deep / "g").write_bytes(b"gone soon")
    (deep.parent / "near").write_bytes(b"a path just under the limit")
    assert len(os.fsencode(deep / "f")) > store_mod.FILES_KEY_MAX > len(
        os.fsencode(deep.parent / "near"))
    time.sleep(0.05)
    store = tree.open_store(tmp_path / "store")
    first = tree.import_dir(store, src)
    reads = _count_reads(monkeypatch)
    assert tree.import_dir(store, src).root == first.root
    # An import root longer than a key's head: its files' records are the same ones.
    assert len(os.fsencode(deep)) > store_mod.FILES_KEY_HEAD
    tree.import_dir(store, deep)
    assert reads == []
    (deep / "g").unlink()
    tree.import_dir(store, deep)  # cannot place hashed keys under its root: keeps them
    assert store.cached_files([os.fsencode(deep / "g")]) != [None]
    tree.import_dir(store, src)
    assert store.cached_files([os.fsencode(deep / p) for p in ("f", "g")])[1] is None
    assert store.cached_files([os.fsencode(deep / "f")]) != [None]
    assert reads == [] and store.check() == []
