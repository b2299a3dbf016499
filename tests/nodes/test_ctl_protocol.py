"""The control protocol under bad input, on one session: precise errors, no state change.

Everything here goes through ONE open handle of ``<mnt>/ctl`` (a session), because that is
how an engine talks to oppiefs: a malformed line must get one error reply, change nothing,
and leave the session usable for the next command. Error names chosen (DESIGN.md):

* EINVAL: anything that is not a well-formed command: unknown command, wrong number of
  arguments, malformed snapshot id (not 8-64 lowercase hex digits) or node id (``/``,
  ``..``), relative or un-normalized import path, a file where a directory is wanted,
  non-UTF-8 bytes, control characters, an empty line, a line over 4 KiB;
* ENOENT: well-formed names of things that do not exist (snapshot, node, import path).

``import`` takes the rest of the line as the path (paths may contain spaces), so it has no
"too many arguments" case: ``import /a b`` names the directory ``/a b``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cliutil import Cli
from tests.nodeutil import CtlSession, node_dirs

UNKNOWN_SNAP = "0123abcd" * 8  # well-formed, never imported


@pytest.fixture(scope="module")
def env(mdaemon, tmp_path_factory: pytest.TempPathFactory):
    """One session with one imported snapshot and one live node to point commands at."""
    work = tmp_path_factory.mktemp("ctl")
    src = work / "src"
    src.mkdir()
    (src / "f").write_text("content\n")
    (work / "a file").write_text("not a directory\n")
    (work / "dir with space").mkdir()
    with CtlSession(mdaemon.mnt) as s:
        snap = s.call(f"import {src}")["snapshot"]
        node = s.call(f"fork {snap}")["node"]
        try:
            yield s, snap, node, work
        finally:
            s.call(f"drop {node}")


def observable(d, s: CtlSession) -> tuple:
    """Everything a bad line could have changed, as seen from outside."""
    status = s.call("status")
    assert status["ok"], status
    return (status, sorted(os.listdir(d.mnt / "snapshots")), sorted(os.listdir(d.mnt / "nodes")),
            node_dirs(d.store))


def bad_lines(snap: str, node: str, work: Path) -> list[tuple[bytes, str]]:
    s, n = snap.encode(), node.encode()
    lines: list[tuple[bytes, str]] = [
        # unknown commands
        (b"frobnicate", "EINVAL"),
        (b"FORK " + s, "EINVAL"),
        (b"forks " + s, "EINVAL"),
        # wrong arity, for every command
        (b"fork", "EINVAL"),
        (b"fork " + s + b" " + s, "EINVAL"),
        (b"commit", "EINVAL"),
        (b"commit " + n + b" extra", "EINVAL"),
        (b"drop", "EINVAL"),
        (b"drop --force", "EINVAL"),
        (b"drop --force " + n + b" extra", "EINVAL"),
        (b"drop " + n + b" " + n, "EINVAL"),  # first word is not --force
        (b"drop --forse " + n, "EINVAL"),
        (b"prune", "EINVAL"),
        (b"prune " + s + b" " + s, "EINVAL"),
        (b"status now", "EINVAL"),
        (b"help me", "EINVAL"),
        (b"import", "EINVAL"),  # missing path
        (b"import    ", "EINVAL"),
        # malformed snapshot ids
        (b"fork zzzzzzzz", "EINVAL"),
        (b"fork " + s[:8].upper(), "EINVAL"),
        (b"fork " + s.upper(), "EINVAL"),
        (b"fork " + s[:7], "EINVAL"),  # prefixes need 8 digits
        (b"fork " + s + b"0", "EINVAL"),  # 65 digits
        (b"fork " + s[:-1] + b"g", "EINVAL"),
        (b"fork -" + s[:8], "EINVAL"),
        (b"prune " + s[:7], "EINVAL"),
        (b"prune ../" + s, "EINVAL"),
        # unknown but well-formed ids
        (b"fork " + UNKNOWN_SNAP.encode(), "ENOENT"),
        (b"fork " + UNKNOWN_SNAP[:8].encode(), "ENOENT"),
        (b"prune " + UNKNOWN_SNAP.encode(), "ENOENT"),
        (b"commit nosuchnode", "ENOENT"),
        (b"drop nosuchnode", "ENOENT"),
        (b"drop --force nosuchnode", "ENOENT"),
        (b"commit " + s, "ENOENT"),  # a snapshot id is not a node id
        # node ids that are paths
        (b"commit ../" + n, "EINVAL"),
        (b"commit ../../etc", "EINVAL"),
        (b"commit /" + n, "EINVAL"),
        (b"commit " + n + b"/..", "EINVAL"),
        (b"commit " + n + b"/upper", "EINVAL"),
        (b"drop ..", "EINVAL"),
        (b"drop .", "EINVAL"),
        (b"drop /", "EINVAL"),
        (b"drop --force ../" + n, "EINVAL"),
        # import paths
        (b"import relative/path", "EINVAL"),
        (b"import ./src", "EINVAL"),
        (b"import ~/src", "EINVAL"),
        (b"import " + os.fsencode(work) + b"/../" + os.fsencode(work.name), "EINVAL"),
        (b"import " + os.fsencode(work / "a file"), "EINVAL"),  # not a directory
        (b"import " + os.fsencode(work / "no-such-dir"), "ENOENT"),
        (b"import " + os.fsencode(work / "dir with space") + b" x", "ENOENT"),
        (b"import " + os.fsencode(work / "dir with space") + b" ", "ENOENT"),  # verbatim
        (b"import  " + os.fsencode(work / "dir with space"), "EINVAL"),  # " /...": relative
        (b"import /nonexistent/oppiefs/x", "ENOENT"),
        # bytes that are not a command line
        (b"", "EINVAL"),
        (b"   \t ", "EINVAL"),
        (b"\xff\xfe status", "EINVAL"),
        (b"fork " + s[:8] + b"\xc3", "EINVAL"),
        (b"status\x00", "EINVAL"),
        (b"\x00", "EINVAL"),
        (b"status\r", "EINVAL"),
        (b"status\x1b[2J", "EINVAL"),
        (b"x" * 4097, "EINVAL"),
        (b"status" + b" " * 4091, "EINVAL"),  # 4097 bytes, even though it would parse
        (b"fork " + b"a" * 100_000, "EINVAL"),
    ]
    return lines


def test_each_bad_line_on_one_session(mdaemon, env):
    s, snap, node, work = env
    before = observable(mdaemon, s)
    for line, errno_name in bad_lines(snap, node, work):
        reply = s.call(line)
        shown = line[:80]
        assert reply["ok"] is False, (shown, reply)
        assert reply["error"] == errno_name, (shown, reply)
        assert isinstance(reply["message"], str) and reply["message"], (shown, reply)
        assert observable(mdaemon, s) == before, f"{shown!r} changed the state"
    # The session still works for real commands afterwards.
    child = s.call(f"fork {snap[:8]}")
    assert child["ok"] and child["snapshot"] == snap
    assert s.call(f"drop {child['node']}") == {"ok": True, "node": child["node"]}
    assert observable(mdaemon, s) == before


def test_error_messages_name_the_problem(mdaemon, env):
    """A NUL byte is reported as such, not as an overlong line (the sentinel clash)."""
    s = env[0]
    assert "control character" in s.call(b"\x00")["message"]
    assert "longer than 4096" in s.call(b"y" * 5000)["message"]
    assert "UTF-8" in s.call(b"\xff")["message"]
    assert "unknown command" in s.call(b"nope")["message"]
    assert "carriage return" in s.call(b"status\r")["message"]
    assert UNKNOWN_SNAP in s.call(f"prune {UNKNOWN_SNAP}")["message"]


def test_line_limit_is_4096_bytes(mdaemon, env):
    s, _, _, _ = env
    line = b"status" + b" " * (4096 - len("status"))
    assert len(line) == 4096
    assert s.call(line)["ok"] is True
    assert s.call(line + b" ")["error"] == "EINVAL"


def test_overlong_line_over_many_writes(mdaemon, env):
    """Framing survives a line that exceeds the limit across several writes."""
    s, _, _, _ = env
    before = s.call("status")
    for _ in range(5):
        s.send(b"z" * 3000)  # no newline yet: nothing to reply to
    s.send(b"tail\nstatus\n")
    bad, good = s.replies(2)
    assert bad["error"] == "EINVAL" and "longer" in bad["message"]
    assert good == before
    s.send(b"q" * 300_000 + b"\n")  # one write bigger than FUSE's max_write
    assert s.replies(1)[0]["error"] == "EINVAL"
    assert s.call("status") == before


def test_whitespace_is_tolerated(mdaemon, env):
    s, snap, _, work = env
    assert s.call("  status  ")["ok"] is True
    # import takes the rest of the line: a path with a space is one path.
    empty = s.call(f"import {work / 'dir with space'}")
    assert empty["ok"] is True and empty["files"] == 0
    assert s.call(f"prune {empty['snapshot']}")["ok"] is True
    child = s.call(f"fork\t{snap}")
    assert child["ok"] is True
    assert s.call(f"drop   {child['node']} ") == {"ok": True, "node": child["node"]}


def test_import_of_what_holds_the_store_or_mount_is_refused(mdaemon, env, tmp_path):
    """Importing ``/``, or the dir that holds the store, would read the store's own files
    as they change and walk every snapshot through the mount: refused, precisely, and the
    CLI's offline import refuses a tree holding its store too."""
    s = env[0]
    before = observable(mdaemon, s)
    for path in ("/", str(mdaemon.store.parent), str(mdaemon.store), str(mdaemon.mnt.parent)):
        reply = s.call(f"import {path}")
        assert reply["error"] == "EINVAL", (path, reply)
        assert "import" in reply["message"], reply
    assert observable(mdaemon, s) == before
    (tmp_path / "tree" / "store").mkdir(parents=True)
    res = Cli(tmp_path / "tree" / "store")("import", tmp_path / "tree", expect=2)
    assert "it holds the store" in res.err


def test_import_path_is_taken_verbatim(mdaemon, env):
    """Blanks at either end of a path are part of it: stripping them once imported the
    neighbouring directory without a word."""
    s, _, _, work = env
    for name, text in (("trail ", "with the blank\n"), ("trail", "without\n")):
        (work / name).mkdir()
        (work / name / "f").write_text(text)
    got = s.call(f"import {work / 'trail '}")
    assert got["ok"] is True, got
    assert (mdaemon.mnt / "snapshots" / got["snapshot"] / "f").read_text() == "with the blank\n"
    assert s.call(f"prune {got['snapshot']}")["ok"] is True


def test_pipelined_commands_reply_in_order(mdaemon, env):
    s, snap, _, _ = env
    n0 = s.call("status")["nodes"]
    s.send(f"fork {snap}\nstatus\nbogus\nfork {snap[:10]}\nstatus\nprune {UNKNOWN_SNAP}\n"
           "help\n".encode())
    r = s.replies(7)
    assert r[0]["ok"] and r[0]["snapshot"] == snap
    assert r[1]["ok"] and r[1]["nodes"] == n0 + 1
    assert r[2]["error"] == "EINVAL"
    assert r[3]["ok"] and r[3]["snapshot"] == snap and r[3]["node"] != r[0]["node"]
    assert r[4]["nodes"] == n0 + 2
    assert r[5]["error"] == "ENOENT"
    assert r[6]["ok"] and len(r[6]["commands"]) >= 6
    # A command split over writes, and a write ending mid-command.
    s.send(f"drop {r[0]['node']}\nsta".encode())
    assert s.replies(1)[0] == {"ok": True, "node": r[0]["node"]}
    s.send(b"tus\n")
    assert s.replies(1)[0]["nodes"] == n0 + 1
    s.send(b"".join(b"status\n" for _ in range(50)) + f"drop {r[3]['node']}\n".encode())
    replies = s.replies(51)
    assert all(x["nodes"] == n0 + 1 for x in replies[:50])
    assert replies[50] == {"ok": True, "node": r[3]["node"]}
    assert s.call("status")["nodes"] == n0


def test_sessions_are_independent(mdaemon, env):
    """Replies go to the handle that asked; a second handle sees nothing of the first's."""
    s = env[0]
    with CtlSession(mdaemon.mnt) as other:
        other.send(b"status\nbogus\n")
        assert s.f.read(65536) == b""  # nothing queued on the first session
        a, b = other.replies(2)
        assert a["ok"] and b["error"] == "EINVAL"
        assert s.call("status") == a
