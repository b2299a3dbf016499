"""Reliability 2: fuzz the control file of a live daemon with random and mutated lines.

Lines go through the REAL ``<mnt>/ctl`` of a mounted daemon, many per write (and writes cut
at random points), on a few sessions. Hypothesis draws batches of lines: mutations of a seed
corpus of valid commands that name real snapshot ids and node names (byte flips, truncation,
inserted NUL / newline / CR / high bytes, deletions, overlong lines, extra or missing words,
random unicode), plus raw random bytes and random unicode. Hypothesis favours small, simple
values and repeats them, so most lines of a batch come from a ``random.Random`` seeded with
``OPPIEFS_FUZZ_SEED`` (random and printed by default); 10-20 per batch are drawn by
hypothesis itself, which is good at the edge cases (empty, minimal, boundary sizes).
The promises checked:

* the daemon never dies and the mount stays live;
* every line (as the daemon frames it: inserted newlines make more lines) gets exactly one
  reply: a JSON object with a boolean ``ok`` and, when false, an errno name in ``error``;
* state (``status``, the snapshot listing, the node listing and node dirs) is unchanged.

A mutation can produce a valid state-changing command (truncating ``import /some/dir`` to
``import /``, keeping a real node name intact...). Such lines are never sent: ``_changes_state``
parses each framed line with the daemon's own parser and refuses any fork/prune/commit/drop
that names something real and any import of an existing path; they are counted as filtered.
Valid read-only commands (``status``, ``help``) are sent and may answer ``ok: true``.

Size: ``OPPIEFS_FUZZ_LINES`` (default 20000) lines must be sent; ``OPPIEFS_FUZZ_SECONDS``
(default 240) bounds the run.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from oppiefs.control import Control
from oppiefs.errors import OppieError
from tests.chaosutil import env_int, record_figures
from tests.mountutil import Daemon, is_live_mount
from tests.nodeutil import CtlSession, node_dirs

FUZZ_LINES = env_int("OPPIEFS_FUZZ_LINES", 20000)
FUZZ_SECONDS = env_int("OPPIEFS_FUZZ_SECONDS", 240)
# The PRNG part of every batch; printed, so a failing run can be repeated.
FUZZ_SEED = env_int("OPPIEFS_FUZZ_SEED", int.from_bytes(os.urandom(4), "little"))
BATCH = (30, 60)  # PRNG lines per example, besides 10-20 drawn by hypothesis
SESSIONS = 3
MAX_FRAMED = 8  # lines kept from one generated unit
MAX_UNIT = 100_000  # bytes of one generated unit: far past the 4 KiB line limit, still cheap

INSERTS = [b"\0", b"\n", b"\r", b"\t", b"\x0b", b"\x1b", b"\x7f", b"\x80", b"\xc3", b"\xff",
           b"\xfe\xff", b"\xe2\x80\xa8", b"\xf0\x9f\x92\xa9", b"\xed\xa0\x80", b" ", b"\n\n",
           b"\r\n", b"--force", b"..", b"/", b"%s", b"\\", b"\""]

# Lines fuzzing once answered with an internal error (EIO and a traceback in the log).
REGRESSIONS = [
    (b"import /" + b"x" * 300, "ENAMETOOLONG"),  # a name over NAME_MAX
    (b"import /tmp/" + b"y" * 256 + b"/z", "ENAMETOOLONG"),
]


# -- the generator -----------------------------------------------------------------------------


def _apply(line: bytes, op: tuple[Any, ...]) -> bytes:
    """One mutation; positions are drawn wide and taken modulo the current length."""
    kind = op[0]
    n = len(line)
    if kind == "flip":
        if not n:
            return line
        i = op[1] % n
        return line[:i] + bytes([line[i] ^ (1 << op[2])]) + line[i + 1:]
    if kind == "truncate":
        return line[: op[1] % (n + 1)]
    if kind == "insert":
        i = op[1] % (n + 1)
        return line[:i] + op[2] + line[i:]
    if kind == "delete":
        i = op[1] % (n + 1)
        return line[:i] + line[i + op[2]:]
    if kind == "overlong":
        return line + b" " + b"x" * op[1]
    if kind == "repeat":
        return (line + b" ") * op[1]
    if kind == "add-word":
        return line + b" " + op[1]
    if kind == "drop-word":
        return b" ".join(line.split(b" ")[:-1])
    if kind == "replace-word":
        words = line.split(b" ")
        words[op[1] % len(words)] = op[2]
        return b" ".join(words)
    if kind == "case":
        return line.swapcase()
    if kind == "join":
        return line + op[1] + op[2]
    raise AssertionError(kind)


def _random_op(rnd: random.Random, seeds: list[bytes], words: list[bytes]) -> tuple[Any, ...]:
    """A mutation with uniformly random parameters (hypothesis prefers small ones)."""
    pos = rnd.randrange(1 << 16)
    kind = rnd.choice(["flip", "flip", "truncate", "insert", "insert", "insert", "delete",
                       "overlong", "repeat", "add-word", "drop-word", "replace-word", "case",
                       "join"])
    if kind == "flip":
        return kind, pos, rnd.randrange(8)
    if kind in ("truncate",):
        return kind, pos
    if kind == "insert":
        pick = rnd.random()
        if pick < 0.4:
            ins = rnd.choice(INSERTS)
        elif pick < 0.7:
            ins = rnd.randbytes(rnd.randint(1, 8))
        else:  # a random code point: BMP, astral, controls, specials
            ins = chr(rnd.choice([rnd.randrange(0x20, 0x7F), rnd.randrange(0x80, 0x800),
                                  rnd.randrange(0x800, 0xD800), rnd.randrange(0xE000, 0x10000),
                                  rnd.randrange(0x10000, 0x110000), rnd.randrange(0, 0x20)])
                      ).encode("utf-8")
        return kind, pos, ins
    if kind == "delete":
        return kind, pos, rnd.randint(1, 20)
    if kind == "overlong":
        return kind, rnd.randint(4000, 70_000)
    if kind == "repeat":
        return kind, rnd.randint(2, 50)
    if kind == "add-word":
        return kind, rnd.choice(words) if rnd.random() < 0.6 else rnd.randbytes(rnd.randint(1, 9))
    if kind == "replace-word":
        return kind, pos, rnd.choice(words) if rnd.random() < 0.5 else rnd.randbytes(
            rnd.randint(0, 9))
    if kind == "join":
        return kind, rnd.choice([b"\n", b" ", b"\0", b"\r", b""]), rnd.choice(seeds)
    return (kind,)


def random_unit(rnd: random.Random, seeds: list[bytes], words: list[bytes]) -> bytes:
    """One line from a plain PRNG. Hypothesis repeats values on purpose (within lists and
    by mutating earlier examples), so the bulk of each batch comes from here for variety."""
    pick = rnd.random()
    if pick < 0.75:
        line = rnd.choice(seeds)
        for _ in range(rnd.randint(1, 5)):
            line = _apply(line, _random_op(rnd, seeds, words))[:MAX_UNIT]
        return line
    if pick < 0.85:
        return rnd.randbytes(rnd.randint(0, 300))
    if pick < 0.95:
        cps = [rnd.choice([rnd.randrange(0x20, 0x7F), rnd.randrange(0xA0, 0xD800),
                           rnd.randrange(0xE000, 0x110000)]) for _ in range(rnd.randint(1, 60))]
        return "".join(map(chr, cps)).encode("utf-8")
    cmd = rnd.choice([b"import", b"fork", b"commit", b"drop", b"prune", b"status", b"help"])
    return b" ".join([cmd, *(rnd.choice(words) for _ in range(rnd.randint(0, 3)))])


def line_strategy(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    pos = st.integers(0, 1 << 16)
    words = st.sampled_from(sorted({w for s in seeds for w in s.split(b" ")}))
    text = st.text(max_size=40).map(lambda t: t.encode("utf-8"))
    mutation = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.sampled_from(INSERTS) | st.binary(min_size=1,
                                                                                 max_size=6)),
        st.tuples(st.just("delete"), pos, st.integers(1, 12)),
        st.tuples(st.just("overlong"), st.integers(4000, 70_000)),
        st.tuples(st.just("repeat"), st.integers(2, 400)),
        st.tuples(st.just("add-word"), words | text),
        st.tuples(st.just("drop-word")),
        st.tuples(st.just("replace-word"), pos, words | text | st.binary(max_size=10)),
        st.tuples(st.just("case")),
        st.tuples(st.just("join"), st.sampled_from([b"\n", b" ", b"\0", b"\r", b""]),
                  st.sampled_from(seeds)),
    )

    def mutate(args: tuple[bytes, list[tuple[Any, ...]]]) -> bytes:
        line, ops = args
        for op in ops:
            line = _apply(line, op)[:MAX_UNIT]  # "repeat" of "overlong" would explode
        return line

    mutated = st.tuples(st.sampled_from(seeds), st.lists(mutation, min_size=1, max_size=4))
    commands = [b"import", b"fork", b"commit", b"drop", b"prune", b"status", b"help"]
    return st.one_of(
        mutated.map(mutate),
        mutated.map(mutate),
        st.binary(max_size=300),
        st.text(max_size=120).map(lambda t: t.encode("utf-8")),
        st.tuples(st.sampled_from(commands), st.lists(text, max_size=3)).map(
            lambda t: b" ".join([t[0], *t[1]])),
        st.sampled_from(seeds),  # unmutated: filtered if it would change state
    )


class Guard:
    """Refuses lines that would change state; knows every real snapshot id and node name."""

    def __init__(self, snapshots: list[str], nodes: list[str]) -> None:
        self.snapshots = snapshots
        self.nodes = set(nodes)
        self.parser = Control(None)  # type: ignore[arg-type]  # parse() never touches state

    def changes_state(self, line: bytes) -> bool:
        try:
            self.parser.parse(line)
        except OppieError:
            return False  # the daemon rejects it before dispatch
        words = line.decode("utf-8").split()
        name, args = words[0], words[1:]
        if name in ("status", "help"):
            return False
        if name in ("fork", "prune"):
            return any(s.startswith(args[0]) for s in self.snapshots)
        if name in ("commit", "drop"):
            return any(a in self.nodes for a in args)
        if name == "import":
            path = line.decode("utf-8").split(None, 1)[1].strip()
            return os.path.isabs(path) and os.path.lexists(path)
        return True  # a command this test does not know: never send it


def check_reply(reply: Any, line: bytes) -> bool:
    shown = line[:120]
    assert isinstance(reply, dict), (shown, reply)
    assert isinstance(reply.get("ok"), bool), (shown, reply)
    if not reply["ok"]:
        name = reply.get("error")
        assert isinstance(name, str) and name.startswith("E") and hasattr(errno, name), (
            shown, reply)
        assert isinstance(reply.get("message"), str), (shown, reply)
    return reply["ok"]


# -- the test ----------------------------------------------------------------------------------


def _setup(s: CtlSession, work: Path) -> tuple[list[str], list[str], list[bytes]]:
    """Real state to aim at: three snapshots (one a commit) and two live nodes."""
    src, src2 = work / "src", work / "src2"
    for d, text in ((src, "alpha\n"), (src2, "beta\n")):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text(text)
    (work / "a file").write_text("not a directory\n")
    (work / "dir with space").mkdir()
    a = s.call(f"import {src}")["snapshot"]
    b = s.call(f"import {src2}")["snapshot"]
    n1 = s.call(f"fork {a}")
    Path(n1["path"], "new").write_text("committed\n")
    c = s.call(f"commit {n1['node']}")["snapshot"]
    n2 = s.call(f"fork {b}")
    snaps, nodes = [a, b, c], [n1["node"], n2["node"]]
    seeds = [b"status", b"help", b"drop --force", b"import"]
    for p in (src, src2, work / "a file", work / "dir with space", work):
        seeds.append(b"import " + os.fsencode(p))
    for sid in snaps:
        for cmd in ("fork", "prune"):
            seeds += [f"{cmd} {sid}".encode(), f"{cmd} {sid[:8]}".encode(),
                      f"{cmd} {sid[:13]}".encode()]
    for node in nodes:
        for cmd in ("commit", "drop", "drop --force"):
            seeds.append(f"{cmd} {node}".encode())
    return snaps, nodes, seeds


def _observable(d: Daemon, s: CtlSession) -> tuple:
    status = s.call("status")
    assert status["ok"], status
    return (status, sorted(os.listdir(d.mnt / "snapshots")),
            sorted(os.listdir(d.mnt / "nodes")), node_dirs(d.store))


def _settled(d: Daemon, s: CtlSession, timeout: float = 20.0) -> tuple:
    """The baseline, once the background sweeper has applied the setup's references."""
    deadline = time.monotonic() + timeout
    prev = _observable(d, s)
    while time.monotonic() < deadline:
        time.sleep(0.7)
        cur = _observable(d, s)
        if cur == prev:
            return cur
        prev = cur
    raise AssertionError("state did not settle before fuzzing")


def test_fuzz_control_file(daemon: Daemon, tmp_path: Path) -> None:
    probe = CtlSession(daemon.mnt)
    sessions = [CtlSession(daemon.mnt) for _ in range(SESSIONS)]
    counts = {"sent": 0, "filtered": 0, "ok_replies": 0, "error_replies": 0, "writes": 0,
              "bytes": 0, "batches": 0}
    errors_seen: dict[str, int] = {}
    distinct: set[int] = set()
    try:
        snaps, nodes, seeds = _setup(probe, tmp_path)
        guard = Guard(snaps, nodes)
        before = _settled(daemon, probe)
        for line, name in REGRESSIONS:  # what earlier runs found, checked every time
            reply = probe.call(line)
            assert reply.get("error") == name, (line[:80], reply)
        started = time.monotonic()

        words = sorted({w for seed in seeds for w in seed.split(b" ")})
        rnd = random.Random(FUZZ_SEED)
        print(f"fuzz seed {FUZZ_SEED} (OPPIEFS_FUZZ_SEED)")
        strategy = given(
            units=st.lists(line_strategy(seeds), min_size=10, max_size=20),
            n_random=st.integers(BATCH[0], BATCH[1]),
            cuts=st.lists(st.integers(0, 1 << 20), max_size=3))

        def batch(units: list[bytes], n_random: int, cuts: list[int]) -> None:
            if counts["sent"] >= FUZZ_LINES or time.monotonic() - started > FUZZ_SECONDS:
                return  # done (a unit can frame into hundreds of lines): no-op examples
            units = units + [random_unit(rnd, seeds, words) for _ in range(n_random)]
            rnd.shuffle(units)
            lines: list[bytes] = []
            for unit in units:
                # How the daemon will frame it (plus our newline); a repeated join can hold
                # hundreds of copies of one line, so keep a few to keep the lines varied.
                framed = unit.split(b"\n")[:MAX_FRAMED]
                if any(guard.changes_state(f) for f in framed):
                    counts["filtered"] += 1
                    continue
                lines += framed
                distinct.update(hash(f) for f in framed)
            if not lines:
                return
            stream = b"".join(line + b"\n" for line in lines)
            s = sessions[counts["batches"] % SESSIONS]
            counts["batches"] += 1
            points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
            for lo, hi in itertools.pairwise(points):
                s.send(stream[lo:hi])
                counts["writes"] += 1
            counts["bytes"] += len(stream)
            for line, reply in zip(lines, s.replies(len(lines)), strict=True):
                if check_reply(reply, line):
                    counts["ok_replies"] += 1
                else:
                    counts["error_replies"] += 1
                    errors_seen[reply["error"]] = errors_seen.get(reply["error"], 0) + 1
            counts["sent"] += len(lines)
            assert daemon.proc is not None and daemon.proc.poll() is None, "daemon died"
            assert _observable(daemon, probe) == before, "a fuzzed line changed the state"

        while counts["sent"] < FUZZ_LINES and time.monotonic() - started <= FUZZ_SECONDS:
            # Examples per round: enough for the lines still owed, if few are filtered.
            examples = math.ceil((FUZZ_LINES - counts["sent"]) / (sum(BATCH) / 2 + 10)) + 1
            settings(max_examples=examples, deadline=None, database=None,
                     phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
                strategy(batch))()
        elapsed = time.monotonic() - started

        assert counts["sent"] >= FUZZ_LINES, (
            f"only {counts['sent']} lines in {FUZZ_SECONDS}s (OPPIEFS_FUZZ_SECONDS)")
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert is_live_mount(daemon.mnt)
        for s in sessions:  # every session still answers, with nothing left queued
            assert s.f.read(65536) == b""
            assert s.call("status") == before[0]
        assert _observable(daemon, probe) == before
        record_figures("fuzz_ctl", lines_sent=counts["sent"], distinct_lines=len(distinct),
                       seed=FUZZ_SEED,
                       lines_filtered_as_state_changing=counts["filtered"],
                       ok_replies=counts["ok_replies"], error_replies=counts["error_replies"],
                       error_names=errors_seen, writes=counts["writes"],
                       bytes_sent=counts["bytes"], sessions=SESSIONS,
                       seconds=round(elapsed, 1),
                       lines_per_second=round(counts["sent"] / elapsed))
        assert "Traceback" not in daemon.log.read_text(errors="replace")
        for node in nodes:
            assert probe.call(f"drop {node}")["ok"]
    finally:
        for s in [probe, *sessions]:
            s.close()
        print(json.dumps(counts))
