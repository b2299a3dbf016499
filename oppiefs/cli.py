"""Command-line interface (click).

Offline commands (import, checkout, ls, diff, fsck, stats, gc) open the LMDB store
directly; LMDB allows this while a daemon has the same store mounted. Every command takes
``--json``; errors print one line ``oppiefs: <message>`` and exit with the error class's
code, never a traceback (set OPPIEFS_DEBUG=1 to see one for unexpected errors).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import tree
from .errors import InvalidArgument, NotMounted, OppieError, as_oppie_error
from .store import Store, default_store_dir
from .store import compact as compact_store


def _fail(exc: BaseException, code: int, as_json: bool = False) -> None:
    """One line on stderr; with ``--json`` also the error as a control reply has it, on
    stdout, where a script reads the command's result."""
    click.echo(f"oppiefs: {exc}", err=True)
    if as_json:
        name = exc.errno_name if isinstance(exc, OppieError) else "EIO"
        click.echo(json.dumps({"ok": False, "error": name, "message": str(exc)}))
    sys.exit(code)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OppieError into a one-line message + exit code; hide tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except OppieError as exc:
            _fail(exc, exc.exit_code, as_json)
        except KeyboardInterrupt:
            _fail(Exception("interrupted"), 130, as_json)
        except Exception as exc:  # a host error says what it hit; the rest is a bug
            if os.environ.get("OPPIEFS_DEBUG"):
                raise
            err = as_oppie_error(exc)
            if err is not None:
                _fail(err, err.exit_code, as_json)
            _fail(Exception(f"internal error: {type(exc).__name__}: {exc}"), 1, as_json)

    return wrapper


store_option = click.option(
    "--store", "store_dir", type=click.Path(file_okay=False, readable=False, path_type=Path),
    envvar="OPPIEFS_STORE", default=None,
    help="Store directory (default /var/lib/oppiefs as root, ~/.local/share/oppiefs else).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _open(store_dir: Path | None, *, create: bool = False) -> Store:
    return tree.open_store(store_dir or default_store_dir(), create=create)


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


def _fmt_time(ns_or_s: float) -> str:
    return _dt.datetime.fromtimestamp(ns_or_s).strftime("%Y-%m-%d %H:%M:%S")


class _Main(click.Group):
    """``oppiefs MOUNTPOINT`` is shorthand for ``oppiefs mount MOUNTPOINT``; a script that
    asked for ``--json`` reads click's own usage errors as JSON too."""

    def main(self, args: Any = None, *pos: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv:
            return super().main(argv, *pos, **kwargs)
        try:
            rv = super().main(argv, *pos, **{**kwargs, "standalone_mode": False})
        except click.ClickException as exc:
            exc.show()
            click.echo(json.dumps({"ok": False, "error": "EINVAL",
                                   "message": exc.format_message()}))
            sys.exit(exc.exit_code)
        except click.Abort:
            _fail(Exception("interrupted"), 130, True)
        sys.exit(rv if isinstance(rv, int) else 0)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-") and (
            "/" in args[0] or os.path.isdir(args[0])
        ):
            args = ["mount", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="oppiefs")
def main() -> None:
    """oppiefs: fork / commit / prune whole directory states, served over FUSE."""


@main.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--skip-special", is_flag=True,
              help="Leave out FIFOs, sockets and device nodes (reported) instead of failing.")
@click.option("--rehash", is_flag=True,
              help="Read every file even where the files cache says it is unchanged, and "
                   "rewrite stored copies that fsck finds corrupt.")
@store_option
@click.option("--mount", "mnt", type=click.Path(file_okay=False, path_type=Path),
              help="Import through the running mount at MNT (its daemon reads the tree and "
                   "lists the snapshot at once) instead of into a store directly.")
@json_option
@_guarded
def import_cmd(path: Path, skip_special: bool, rehash: bool, store_dir: Path | None,
               mnt: Path | None, as_json: bool) -> None:
    """Import a host directory as a snapshot and print its id.

    Into ``--store`` (or the default store), which works mounted or not: a running mount
    of that store lists the snapshot within half a minute. With ``--mount``, through that
    mount's control file instead."""
    src = tree.host_path_ok(os.path.abspath(path))  # the same checks as ctl's import
    if mnt is not None:
        # An OPPIEFS_STORE in the environment is no --store given with --mount.
        given = click.get_current_context().get_parameter_source("store_dir")
        if given == click.core.ParameterSource.COMMANDLINE or skip_special or rehash:
            raise InvalidArgument("import --mount takes no --store, --skip-special or "
                                  "--rehash (the daemon's import has no options)")
        _ctl(mnt, as_json, lambda r: str(r["snapshot"]), "import", os.fsdecode(src))
        return
    store_path = Path(store_dir or default_store_dir())
    created = not os.path.exists(store_path / "data.mdb")
    with _open(store_path, create=True) as store:
        if created and not as_json:
            click.echo(f"oppiefs: created a new store at {store_path}", err=True)
        bar = None
        progress = None
        if sys.stderr.isatty() and not as_json:
            from tqdm import tqdm

            bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="import",
                       file=sys.stderr, leave=False)

            def progress(nbytes: int, nfiles: int) -> None:
                bar.update(nbytes)

        try:
            report = tree.import_dir(store, src, skip_special=skip_special, progress=progress,
                                     use_cache=not rehash)
        finally:
            if bar is not None:
                bar.close()
    for item in report.skipped:
        if not as_json:
            click.echo(f"oppiefs: skipped {item}", err=True)
    _emit(as_json, {"snapshot": report.root.hex(), "files": report.files, "bytes": report.bytes,
                    "dirs": report.dirs, "symlinks": report.symlinks,
                    "skipped": report.skipped}, report.root.hex())


@main.command()
@click.argument("snapshot")
@click.argument("dest", type=click.Path(path_type=Path))
@store_option
@json_option
@_guarded
def checkout(snapshot: str, dest: Path, store_dir: Path | None, as_json: bool) -> None:
    """Write a snapshot out as a real directory tree at DEST (new or empty)."""
    with _open(store_dir) as store:
        root = store.resolve(snapshot, include_unlisted=True)
        files = tree.checkout(tree.Reader(store), root, dest)
    _emit(as_json, {"snapshot": root.hex(), "dest": str(dest), "files": files},
          f"{root.hex()} -> {dest} ({files} files)")


_C_ESCAPES = {0x07: b"\\a", 0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0B: b"\\v",
              0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}


def _shown(name: bytes) -> str:
    """A name for line-based text output, quoted the way git quotes paths when it holds a
    control character, ``"`` or ``\\`` (a newline in a name would split its line): C escapes
    inside double quotes. Other bytes, invalid UTF-8 too, go out as they are; ``--json``
    gives every name exactly."""
    if not any(b < 0x20 or b == 0x7F or b in _C_ESCAPES for b in name):
        return os.fsdecode(name)
    out = bytearray(b'"')
    for b in name:
        if b in _C_ESCAPES:
            out += _C_ESCAPES[b]
        elif b < 0x20 or b == 0x7F:
            out += b"\\%03o" % b
        else:
            out.append(b)
    out += b'"'
    return os.fsdecode(bytes(out))


def _mode_string(e: tree.Entry) -> str:
    return stat.filemode(e.st_mode)


def _entry_json(path: bytes, e: tree.Entry) -> dict[str, Any]:
    d: dict[str, Any] = {
        "path": os.fsdecode(path), "type": tree.TYPE_NAMES[e.type], "mode": oct(e.mode),
        "uid": e.uid, "gid": e.gid, "size": e.size, "mtime_ns": e.mtime_ns,
    }
    if e.type == tree.T_SYMLINK:
        d["target"] = os.fsdecode(e.target)
    return d


@main.command("ls")
@click.argument("spec", required=False)
@store_option
@json_option
@_guarded
def ls_cmd(spec: str | None, store_dir: Path | None, as_json: bool) -> None:
    """List snapshots, or a directory inside one: ``ls ID[:PATH]``."""
    with _open(store_dir) as store:
        if spec is None:
            recs = sorted(store.snapshots(), key=lambda r: r.time)
            rows = [{"snapshot": r.id, "time": r.time, "files": r.files, "bytes": r.bytes,
                     "parent": r.parent, "refs": r.refs, "pins": r.pins} for r in recs]
            text = "\n".join(f"{r.id}  {_fmt_time(r.time)}  {r.files:>8} files  "
                             f"{r.bytes:>14} bytes" for r in recs)
            _emit(as_json, rows, text)
            return
        ident, _, sub = spec.partition(":")
        root = store.resolve(ident, include_unlisted=True)
        reader = tree.Reader(store)
        entry = reader.lookup(root, sub)
        path = b"/".join(tree.split_path(sub))  # as the snapshot names it: d/e, not ./d//e
        if entry.is_dir:
            prefix = path + b"/" if path else b""
            items = [(prefix + e.name, e) for e in reader.tree(entry.ref).entries]
        elif sub.endswith("/"):
            raise InvalidArgument(f"{sub}: not a directory")
        else:
            items = [(path, entry)]
    lines = []
    for path, e in items:
        link = f" -> {_shown(e.target)}" if e.type == tree.T_SYMLINK else ""
        lines.append(f"{_mode_string(e)} {e.uid:>5} {e.gid:>5} {e.size:>12} "
                     f"{_fmt_time(e.mtime_ns / 1e9)} {_shown(path)}{link}")
    _emit(as_json, [_entry_json(p, e) for p, e in items], "\n".join(lines))


@main.command()
@click.argument("a")
@click.argument("b")
@store_option
@json_option
@_guarded
def diff(a: str, b: str, store_dir: Path | None, as_json: bool) -> None:
    """Paths added, removed, modified or type-changed from snapshot A to snapshot B."""
    with _open(store_dir) as store:
        # A pruned snapshot that a node still pins is there to compare (``log`` shows it).
        ra, rb = (store.resolve(x, include_unlisted=True) for x in (a, b))
        changes = list(tree.diff_trees(tree.Reader(store), ra, rb))
    _emit(as_json, [{"status": c.status, "path": os.fsdecode(c.path)} for c in changes],
          "\n".join(f"{c.status:<12} {_shown(c.path)}" for c in changes))


@main.command()
@click.option("--repair", is_flag=True, help="Fix reference counts and queue orphans for GC.")
@store_option
@json_option
@_guarded
def fsck(repair: bool, store_dir: Path | None, as_json: bool) -> None:
    """Verify every object's hash and recount references; exit 0 only when clean."""
    with _open(store_dir) as store:
        findings = store.check(repair=repair)
        if repair and findings:
            store.sweep()
    _emit(as_json, {"clean": not findings, "findings": findings, "repaired": repair},
          "\n".join(findings) if findings else "clean")
    if findings and not repair:
        sys.exit(12)


@main.command()
@store_option
@json_option
@_guarded
def stats(store_dir: Path | None, as_json: bool) -> None:
    """Objects, stored bytes, logical bytes and dedup ratio of the store."""
    with _open(store_dir) as store:
        s = store.stats()
        garbage = store.garbage()
    data = {"snapshots": s.snapshots, "nodes": s.nodes, "objects": s.objects,
            "stored_bytes": s.stored_bytes, "logical_bytes": s.logical_bytes,
            "dedup_ratio": round(s.dedup_ratio, 3), "garbage_objects": garbage}
    _emit(as_json, data, "\n".join(f"{k:<16}{v}" for k, v in data.items()))


@main.command()
@store_option
@json_option
@_guarded
def gc(store_dir: Path | None, as_json: bool) -> None:
    """Delete objects no snapshot, node or in-flight commit needs any more."""
    with _open(store_dir) as store:
        n, nbytes = store.sweep(keep=0)  # settle the whole log: nothing left pending
    _emit(as_json, {"objects_freed": n, "bytes_freed": nbytes},
          f"freed {n} objects, {nbytes} bytes")


@main.command()
@store_option
@json_option
@_guarded
def compact(store_dir: Path | None, as_json: bool) -> None:
    """Shrink the store file to its live data (unmount first: needs the store to itself).

    Freed pages are reused but never returned to the file system; run `gc` first so that
    everything collectable is free.
    """
    before, after = compact_store(store_dir or default_store_dir())
    _emit(as_json, {"bytes_before": before, "bytes_after": after},
          f"store file {before} -> {after} bytes")


# -- the mount --------------------------------------------------------------------------------


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@store_option
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (log to stderr).")
@click.option("-o", "options", multiple=True,
              help="FUSE mount options, comma separated (e.g. allow_other).")
@click.option("--debug", is_flag=True, help="Verbose logging.")
@click.option("--notify-fd", type=int, hidden=True)
@json_option
@_guarded
def mount(mountpoint: Path, store_dir: Path | None, foreground: bool, options: tuple[str, ...],
          debug: bool, notify_fd: int | None, as_json: bool) -> None:
    """Mount the store at MOUNTPOINT (``oppiefs MOUNTPOINT`` is the same)."""
    from . import mount as m

    store = Path(os.path.abspath(store_dir or default_store_dir()))
    if foreground:
        m.setup_logging(debug)
        m.serve(str(mountpoint), store, options=list(options), debug=debug,
                notify_fd=notify_fd)
        return
    problems = m.start_background(str(mountpoint), store, options=list(options), debug=debug)
    mnt = os.path.abspath(mountpoint)
    if problems and not as_json:
        click.echo(f"oppiefs: warning: {problems}", err=True)
    _emit(as_json, {"mountpoint": mnt, "store": str(store), "problems": problems},
          f"mounted {mnt} (store {store})")


@main.command()
# Not click.Path: it stats the path, which waits forever on a stopped daemon's mount.
@click.argument("mountpoint", type=Path)
@json_option
@_guarded
def umount(mountpoint: Path, as_json: bool) -> None:
    """Unmount nodes and the filesystem at MOUNTPOINT."""
    from . import mount as m

    m.umount(str(mountpoint))
    _emit(as_json, {"unmounted": os.path.abspath(mountpoint)},
          f"unmounted {os.path.abspath(mountpoint)}")


# -- talking to a mount -----------------------------------------------------------------------

mount_option = click.option(
    "--mount", "mnt", type=click.Path(file_okay=False, path_type=Path),
    envvar="OPPIEFS_MOUNT", default="/mnt/state", show_default=True,
    help="Mountpoint of the running daemon (or OPPIEFS_MOUNT).")


def _ctl(mnt: Path, as_json: bool, text: Callable[[dict[str, Any]], str], *words: str) -> None:
    """Send one control command to the mount and print its reply."""
    from .client import Client

    with Client(mnt) as client:
        reply = client.call(*words)
    reply.pop("ok")
    _emit(as_json, reply, text(reply))


@main.command()
@click.argument("snapshot")
@mount_option
@json_option
@_guarded
def fork(snapshot: str, mnt: Path, as_json: bool) -> None:
    """Fork SNAPSHOT into a new writable node; print its id and path."""
    _ctl(mnt, as_json, lambda r: f"{r['node']} {r['path']}", "fork", snapshot)


@main.command()
@click.argument("node")
@mount_option
@json_option
@_guarded
def commit(node: str, mnt: Path, as_json: bool) -> None:
    """Capture NODE's current state as a snapshot; print its id."""
    _ctl(mnt, as_json, lambda r: r["snapshot"], "commit", node)


@main.command()
@click.argument("node")
@click.option("--force", is_flag=True, help="Detach lazily even if processes use the node.")
@mount_option
@json_option
@_guarded
def drop(node: str, force: bool, mnt: Path, as_json: bool) -> None:
    """Unmount NODE and discard its changes."""
    words = ("drop", "--force", node) if force else ("drop", node)
    _ctl(mnt, as_json, lambda r: f"dropped {node}", *words)


@main.command()
@click.argument("snapshot")
@mount_option
@json_option
@_guarded
def prune(snapshot: str, mnt: Path, as_json: bool) -> None:
    """Release SNAPSHOT; its data is freed once no node needs it."""
    _ctl(mnt, as_json, lambda r: f"pruned {r['snapshot']}", "prune", snapshot)


@main.command()
@mount_option
@json_option
@_guarded
def status(mnt: Path, as_json: bool) -> None:
    """Counts of snapshots, nodes, objects and bytes of a running mount."""
    _ctl(mnt, as_json, lambda r: "\n".join(f"{k:<14}{v}" for k, v in r.items()), "status")


def _store_of_mount(mnt: Path) -> Path | None:
    """The store a running mount serves, or None if ``mnt`` is no oppiefs mount: its
    ``snapshots`` links to the tree server's mount under the store (``<store>/trees``)."""
    from .trees import DIR_NAME

    try:
        link = Path(os.readlink(mnt / "snapshots"))
        is_mount = (mnt / "ctl").is_file()
    except OSError:
        return None
    if not is_mount or link.name != "snapshots" or link.parent.name != DIR_NAME:
        return None
    return link.parent.parent


@main.command("log")
@click.argument("snapshot")
@store_option
@mount_option
@json_option
@_guarded
def log_cmd(snapshot: str, store_dir: Path | None, mnt: Path, as_json: bool) -> None:
    """Lineage of SNAPSHOT: itself, its parent, its parent's parent...

    Read from ``--store`` if given, else from the store of the mount at ``--mount`` if
    one runs there, else from the default store (a ``--mount`` or OPPIEFS_MOUNT that was
    given but names no mount is an error, not a reason to read another store).
    """
    if store_dir is None:
        store_dir = _store_of_mount(mnt)
        source = click.get_current_context().get_parameter_source("mnt")
        if store_dir is None and source is not click.core.ParameterSource.DEFAULT:
            raise NotMounted(f"{mnt} is not an oppiefs mount (give --store DIR to read a "
                             "store directly)")
    chain: list[dict[str, Any]] = []
    with _open(store_dir) as store:
        root: bytes | None = store.resolve(snapshot, include_unlisted=True)
        seen: set[bytes] = set()
        while root is not None and root not in seen:
            seen.add(root)
            rec = store.snapshot(root)
            if rec is None:
                chain.append({"snapshot": root.hex(), "pruned": True})
                break
            chain.append({"snapshot": rec.id, "time": rec.time, "parent": rec.parent,
                          "listed": rec.listed, "files": rec.files, "bytes": rec.bytes})
            root = bytes.fromhex(rec.parent) if rec.parent else None
    lines = []
    for c in chain:
        if c.get("pruned"):
            lines.append(f"{c['snapshot']}  (pruned, data freed)")
        else:
            flag = "" if c["listed"] else "  (pruned)"
            lines.append(f"{c['snapshot']}  {_fmt_time(c['time'])}  {c['files']} files{flag}")
    _emit(as_json, chain, "\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
