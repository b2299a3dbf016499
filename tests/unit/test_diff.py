"""``diff_trees`` (``oppiefs diff``): every kind of change, at any depth, and equal subtrees
never opened."""

from __future__ import annotations

import os
from pathlib import Path

from oppiefs import tree
from oppiefs.store import Store
from tests.cliutil import Cli

FIXED = 1_700_000_000 * 10**9


def _build(root: Path, spec: dict[str, bytes | str | None]) -> Path:
    """``spec``: path -> bytes (file), str (symlink target), None (directory)."""
    root.mkdir()
    for rel, what in sorted(spec.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            p.mkdir(exist_ok=True)
        elif isinstance(what, str):
            os.symlink(what, p)
        else:
            p.write_bytes(what)
    for d, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(d, name), ns=(FIXED, FIXED), follow_symlinks=False)
        os.utime(d, ns=(FIXED, FIXED))
    return root


BASE: dict[str, bytes | str | None] = {
    "keep/deep/a": b"a", "keep/deep/b": b"b", "same/x": b"x", "gone": b"g",
    "f2d": b"file", "f2l": b"file", "content": b"old", "mode": b"m", "when": b"w",
    "dirmode/inner": b"i", "dirtime/inner": b"i", "link": "target",
}


def test_every_kind_of_change(store: Store, tmp_path: Path) -> None:
    a = tree.import_dir(store, _build(tmp_path / "a", BASE)).root
    spec = dict(BASE)
    del spec["gone"], spec["f2d"], spec["f2l"]
    spec.update({"keep/deep/new": b"n", "f2d/x": b"x", "f2l": "elsewhere",
                 "content": b"new", "link": "moved", "keep/deep/b": b"B"})
    b_dir = _build(tmp_path / "b", spec)
    os.chmod(b_dir / "mode", 0o600)
    os.chmod(b_dir / "dirmode", 0o700)
    os.utime(b_dir / "when", ns=(FIXED + 1, FIXED + 1))
    os.utime(b_dir / "dirtime", ns=(FIXED + 1, FIXED + 1))  # a dir's own mtime alone
    b = tree.import_dir(store, b_dir).root
    reader = tree.Reader(store)
    got = {(c.status, c.path.decode()) for c in tree.diff_trees(reader, a, b)}
    assert got == {
        ("removed", "gone"), ("added", "keep/deep/new"), ("modified", "keep/deep/b"),
        ("type-changed", "f2d"), ("type-changed", "f2l"), ("modified", "content"),
        ("modified", "link"), ("modified", "mode"), ("modified", "when"),
        ("modified", "dirmode"), ("modified", "dirtime"),
    }
    back = {(c.status, c.path.decode()) for c in tree.diff_trees(reader, b, a)}
    flip = {"added": "removed", "removed": "added"}
    assert back == {(flip.get(s, s), p) for s, p in got}
    assert list(tree.diff_trees(reader, a, a)) == []


def test_equal_subtrees_are_never_opened(store: Store, tmp_path: Path) -> None:
    spec: dict[str, bytes | str | None] = {f"big/d{i}/f": b"%d" % i for i in range(50)}
    a = tree.import_dir(store, _build(tmp_path / "a", {**spec, "top": b"1"})).root
    b = tree.import_dir(store, _build(tmp_path / "b", {**spec, "top": b"2"})).root
    reader = tree.Reader(store)
    opened: list[bytes] = []
    real = reader.tree

    def counting(oid: bytes) -> tree.Tree:
        opened.append(oid)
        return real(oid)

    reader.tree = counting  # type: ignore[method-assign]
    assert [(c.status, c.path) for c in tree.diff_trees(reader, a, b)] == [
        ("modified", b"top")]
    assert sorted(opened) == sorted([a, b])  # the roots only: big/ is one shared subtree


def test_text_output_quotes_names_that_would_break_lines(cli: Cli, tmp_path: Path) -> None:
    """``ls`` and ``diff`` print one path per line: a name with a newline (or another
    control character, a quote, a backslash) is C-quoted as git quotes it, so it cannot pass
    for two entries; other bytes go out as they are, and ``--json`` stays exact."""
    odd = {"new\nline": b"1", 'q"uote\\x': b"2", "tab\there": b"3", "plain name": b"4",
           "caf\u00e9": b"5", "lnk": "tar\nget"}
    a = cli("import", _build(tmp_path / "a", {"x": b"x"})).out.strip()
    b = cli("import", _build(tmp_path / "b", {"x": b"x", **odd})).out.strip()
    lines = cli("ls", b).out.splitlines()
    shown = sorted(line.split(":", 2)[2][3:] for line in lines)  # after the HH:MM:SS
    assert shown == sorted(['"new\\nline"', '"q\\"uote\\\\x"', '"tab\\there"', "plain name",
                            "caf\u00e9", 'lnk -> "tar\\nget"', "x"])
    assert sorted(c.split(None, 1)[1] for c in cli("diff", a, b).out.splitlines()) == sorted(
        ['"new\\nline"', '"q\\"uote\\\\x"', '"tab\\there"', "plain name", "caf\u00e9", "lnk"])
    assert {e["path"] for e in cli("ls", b, "--json").json()} == {*odd, "x"}
