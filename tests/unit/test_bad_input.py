"""Acceptance 3: bad input gets a precise one-line error, a non-zero exit, no traceback,
and leaves the store as it was; fsck names corrupted objects by id."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from oppiefs import errors, tree
from oppiefs.store import KIND_TREE, oid_of
from tests.chaosutil import flip_payload_byte
from tests.cliutil import Cli, data_digest, store_state
from tests.treeutil import det_bytes, make_odd_tree


def _one_line_error(res_err: str, *needles: str) -> None:
    lines = res_err.strip().splitlines()
    assert len(lines) == 1, res_err
    assert lines[0].startswith("oppiefs: "), res_err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def populated(cli: Cli, tmp_path: Path) -> str:
    """A store holding one snapshot of a small tree; returns its id."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content\n")
    return cli("import", src).out.strip()


def _unchanged(cli: Cli) -> tuple:
    """The store's observable state and its data file's digest: take before, compare after."""
    return store_state(cli.store), data_digest(cli.store)


def test_import_nonexistent_path(cli: Cli, tmp_path: Path, populated: str) -> None:
    before = _unchanged(cli)
    missing = tmp_path / "no such dir"
    res = cli("import", missing, expect=errors.NotFound.exit_code)
    _one_line_error(res.err, str(missing), "no such directory")
    assert res.out == ""
    assert _unchanged(cli) == before


def test_import_nonexistent_path_creates_no_store(cli: Cli, tmp_path: Path) -> None:
    cli("import", tmp_path / "missing", expect=errors.NotFound.exit_code)
    assert not cli.store.exists()


def test_import_a_file(cli: Cli, tmp_path: Path, populated: str) -> None:
    before = _unchanged(cli)
    f = tmp_path / "plain file"
    f.write_bytes(b"x")
    res = cli("import", f, expect=errors.InvalidArgument.exit_code)
    _one_line_error(res.err, str(f), "not a directory")
    assert _unchanged(cli) == before


def test_import_api_rejects_a_file(store_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with tree.open_store(store_dir) as store:
        with pytest.raises(errors.InvalidArgument, match="not a directory"):
            tree.import_dir(store, f)
        with pytest.raises(errors.NotFound):
            tree.import_dir(store, tmp_path / "missing")
        assert store.snapshots() == []


@pytest.mark.parametrize("ident,code,needle", [
    ("0123456789abcdef", errors.NotFound.exit_code, "no snapshot '0123456789abcdef'"),
    ("0" * 64, errors.NotFound.exit_code, "no snapshot"),
    ("abc", errors.InvalidArgument.exit_code, "expected 8 to 64 lowercase hex digits"),
    ("ABCDEF12", errors.InvalidArgument.exit_code, "bad snapshot id 'ABCDEF12'"),
    ("zzzzzzzz", errors.InvalidArgument.exit_code, "bad snapshot id"),
    ("0" * 65, errors.InvalidArgument.exit_code, "bad snapshot id"),
])
def test_unknown_or_malformed_id(cli: Cli, tmp_path: Path, populated: str, ident: str,
                                 code: int, needle: str) -> None:
    if ident.startswith(populated[:8]):
        pytest.skip("the random id happens to match")
    before = _unchanged(cli)
    for args in (("checkout", ident, tmp_path / "out"), ("ls", ident), ("diff", ident, ident)):
        res = cli(*args, expect=code)
        _one_line_error(res.err, needle)
    assert not (tmp_path / "out").exists()
    assert _unchanged(cli) == before


def _fabricate_twin(store_dir: Path, real: bytes) -> bytes:
    """Publish a root whose id shares its first 8 hex digits with ``real``.

    Finding two genuine trees with a common 32-bit id prefix would take ~2^16 imports, so the
    twin is an (empty) tree object stored under a made-up id. Its 9th and 10th hex digits
    differ from ``real``'s, so a 9-digit prefix is unique again.
    """
    twin = real[:4] + bytes([real[4] ^ 0xFF]) + bytes(27)
    payload, _, _ = tree.encode_tree([])
    with tree.open_store(store_dir, create=False) as store:
        batch = {twin: (KIND_TREE, payload, None, False)}
        store.write(lambda txn: store._write_batch(txn, batch, 0))
        store.publish(store.writer(), twin, parent=None, logical_bytes=0, files=0)
        assert sorted(store.snapshot_ids()) == sorted([real.hex(), twin.hex()])
    return twin


def test_ambiguous_prefix(cli: Cli, store_dir: Path, tmp_path: Path, populated: str) -> None:
    twin = _fabricate_twin(store_dir, bytes.fromhex(populated))
    before = _unchanged(cli)
    prefix = populated[:8]
    for args in (("checkout", prefix, tmp_path / "out"), ("ls", prefix),
                 ("diff", prefix, populated)):
        res = cli(*args, expect=errors.InvalidArgument.exit_code)
        _one_line_error(res.err, f"snapshot id prefix {prefix!r} is ambiguous")
    assert not (tmp_path / "out").exists()
    assert _unchanged(cli) == before
    # One more digit (odd length) and the full ids resolve.
    cli("checkout", populated[:9], tmp_path / "out")
    assert (tmp_path / "out" / "d" / "f").read_bytes() == b"content\n"
    # The twin's own prefix resolves too; reading it then fails the hash check, as it must.
    res = cli("ls", twin.hex()[:9], expect=errors.Corrupt.exit_code)
    _one_line_error(res.err, f"object {twin.hex()} is corrupt")
    with tree.open_store(store_dir, create=False) as store:
        assert store.resolve(populated[:9]).hex() == populated
        assert store.resolve(twin.hex()) == twin
        with pytest.raises(errors.InvalidArgument, match="ambiguous"):
            store.resolve(prefix)
    # The made-up id is, rightly, a corrupt object to fsck.
    res = cli("fsck", expect=None)
    assert res.rc != 0 and twin.hex() in res.out


def test_checkout_into_nonempty_dir(cli: Cli, tmp_path: Path, populated: str) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep").write_bytes(b"mine")
    before = _unchanged(cli)
    res = cli("checkout", populated, dest, expect=errors.AlreadyExists.exit_code)
    _one_line_error(res.err, str(dest), "not an empty directory")
    assert os.listdir(dest) == ["keep"]
    assert _unchanged(cli) == before
    (tmp_path / "plain").write_bytes(b"")
    res = cli("checkout", populated, tmp_path / "plain", expect=errors.AlreadyExists.exit_code)
    _one_line_error(res.err, "exists and is not a directory")
    cli("checkout", populated, tmp_path / "new")  # a new root shows as a snapshot's does
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o755 & ~_umask()


def test_a_failed_checkout_leaves_the_destination_as_it_was(
        store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout that fails halfway (here: the disk fills at the third file) removes what
    it wrote: a retry finds an empty dir, or none, not "not an empty directory"."""
    src = tmp_path / "src"
    make_odd_tree(src)
    with tree.open_store(store_dir) as store:
        root = tree.import_dir(store, src).root
        real, written = tree._write_content, []

        def filling(fd, chunks, size):  # type: ignore[no-untyped-def]
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(1)
            return real(fd, chunks, size)

        monkeypatch.setattr(tree, "_write_content", filling)
        given = tmp_path / "given"
        given.mkdir()
        for dest in (given, tmp_path / "new"):
            written.clear()
            with pytest.raises(errors.NoSpace):
                tree.checkout(tree.Reader(store), root, dest)
        assert os.listdir(given) == [] and not (tmp_path / "new").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_commands_on_a_missing_store(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "nostore")
    for args in (("ls",), ("stats",), ("fsck",), ("checkout", "0" * 8, tmp_path / "o")):
        res = cli(*args, expect=errors.NotFound.exit_code)
        _one_line_error(res.err, "no store at", str(tmp_path / "nostore"))
    res = cli("stats", "--json", expect=errors.NotFound.exit_code)  # the error as JSON too
    reply = json.loads(res.out)
    assert reply["ok"] is False and reply["error"] == "ENOENT" and "no store at" in reply["message"]
    assert not (tmp_path / "nostore").exists()



def test_usage_errors_as_json(tmp_path: Path) -> None:
    """click's own errors (a missing argument, an unknown option) reach a script that asked
    for ``--json`` as JSON too; without ``--json`` they stay click's usage text."""
    cli = Cli(tmp_path / "nostore")
    for args in (("checkout", "--json"), ("ls", "--json", "--bogus"), ("log", "a", "b", "--json")):
        res = cli(*args, expect=2)
        reply = json.loads(res.out)
        assert reply["ok"] is False and reply["error"] == "EINVAL" and reply["message"]
        assert "Usage:" in res.err
    res = cli("ls", "--bogus", expect=2)
    assert res.out == "" and "No such option" in res.err
    assert cli("ls", "--help", "--json").out.startswith("Usage:")
    assert not (tmp_path / "nostore").exists()

# -- permissions ----------------------------------------------------------------------------

# Drops root's power to override file permissions, so a store dir owned by someone else with
# mode 0700 is closed to the CLI. (Running as ``nobody`` is not portable: the venv's
# interpreter often lives under /root, which ``nobody`` cannot even execute.)
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
          "--inh-caps=-all", "--"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to build a store the CLI may not open")
@pytest.mark.parametrize("args", [
    ("stats",), ("ls",), ("fsck",), ("gc",), ("import", "{src}"),
    ("checkout", "{snap}", "{out}"),
])
def test_store_without_permission(cli: Cli, tmp_path: Path, populated: str,
                                  args: tuple[str, ...]) -> None:
    for path in [cli.store, *cli.store.iterdir()]:
        os.chown(path, 65534, 65534)  # nobody
    cli.store.chmod(0o700)
    before = _unchanged(cli)
    argv = [a.format(src=tmp_path / "src", snap=populated, out=tmp_path / "out") for a in args]
    res = cli(*argv, prefix=NO_DAC, expect=errors.PermissionDenied.exit_code)
    _one_line_error(res.err, str(cli.store), "permission denied")
    assert not (tmp_path / "out").exists()
    assert _unchanged(cli) == before


# -- corruption -----------------------------------------------------------------------------


def test_corrupted_object(cli: Cli, store_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_odd_tree(src)
    victim = det_bytes(8000, "victim")  # one chunk; big enough for its own LMDB pages
    (src / "victim").write_bytes(victim)
    snap = cli("import", src).out.strip()
    oid = oid_of(victim).hex()
    assert flip_payload_byte(store_dir, victim[3000:3064]) >= 1
    before = _unchanged(cli)

    # Reading the object fails precisely (never wrong bytes) ...
    res = cli("checkout", snap, tmp_path / "out", expect=errors.Corrupt.exit_code)
    _one_line_error(res.err, f"object {oid} is corrupt")
    # The failed checkout leaves nothing behind, so no file holds wrong (or no) bytes.
    assert not (tmp_path / "out").exists()
    with tree.open_store(store_dir, create=False) as store:
        entry = tree.Reader(store).lookup(bytes.fromhex(snap), "victim")
        with pytest.raises(errors.Corrupt, match=oid):
            tree.Reader(store).read_all(entry)
    # ... and fsck names it, exits non-zero, and changes nothing.
    res = cli("fsck", expect=None)
    assert res.rc != 0
    assert res.out.strip().splitlines() == [
        f"corrupt object {oid}: content does not match its id"]
    assert cli("fsck", "--json", expect=None).json()["clean"] is False
    # Metadata commands still work; listing does not touch file content.
    assert "victim" in cli("ls", f"{snap}:").out
    assert _unchanged(cli) == before


def test_rehash_import_heals_a_corrupt_object(cli: Cli, store_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    victim = det_bytes(8000, "heal-me")
    (src / "victim").write_bytes(victim)
    (src / "other").write_bytes(det_bytes(3000, "other"))
    snap = cli("import", src).out.strip()
    assert flip_payload_byte(store_dir, victim[3000:3064]) >= 1
    assert cli("fsck", expect=None).rc != 0
    assert cli("import", src).out.strip() == snap  # the files cache does not read it
    assert cli("fsck", expect=None).rc != 0
    assert cli("import", "--rehash", src).out.strip() == snap
    assert cli("fsck").out.strip() == "clean"
    cli("checkout", snap, tmp_path / "out")
    assert (tmp_path / "out" / "victim").read_bytes() == victim


def test_repair_keeps_children_of_a_corrupt_tree(cli: Cli, store_dir: Path,
                                                 tmp_path: Path) -> None:
    """fsck --repair cannot count what a damaged tree references: it must free none of it."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    marker = det_bytes(40, "name-in-tree").hex().encode()[:60]
    (src / "sub" / os.fsdecode(marker)).write_bytes(det_bytes(5000, "child"))
    snap = cli("import", src).out.strip()
    before = cli("stats", "--json").json()["objects"]
    assert flip_payload_byte(store_dir, marker) >= 1  # inside the sub/ tree object
    cli("fsck", "--repair", expect=None)
    assert cli("stats", "--json").json()["objects"] == before
    with tree.open_store(store_dir, create=False) as store:
        reader = tree.Reader(store)
        top = reader.tree(bytes.fromhex(snap))
        assert top.get(b"sub") is not None


def test_path_past_path_max_is_enametoolong(tmp_path: Path) -> None:
    """A tree deeper than the kernel resolves (PATH_MAX) can be built with relative paths,
    but not imported: the error names it, short enough to read, and nothing is stored."""
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(24):  # 24 x 201 bytes: past 4,096
            os.mkdir("d" * 200, dir_fd=fd)
            sub = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("deep", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)
    store = tree.open_store(tmp_path / "store")
    try:
        with pytest.raises(errors.NameTooLong) as info:
            tree.import_dir(store, src)
        assert info.value.errno_name == "ENAMETOOLONG"
        assert len(info.value.message) < 500 and "4,096" in info.value.message
        assert store.snapshots() == []
    finally:
        store.close()
        shutil.rmtree(src)  # rmtree works by dir fds
