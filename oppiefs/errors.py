"""Error types shared by every layer.

Storage code raises these; each surface translates them in exactly one place: fs.py into
``FUSEError(errno)``, control.py into ``{"ok": false, "error": NAME}`` replies, the CLI into
a one-line message and the class's exit code. Anything else that escapes is a bug and is
reported as EIO.
"""

from __future__ import annotations

import errno as _errno
import os


class OppieError(Exception):
    """Base class: carries the errno name a client sees and the CLI exit code."""

    errno_name = "EIO"
    exit_code = 1

    @property
    def errno(self) -> int:
        return getattr(_errno, self.errno_name)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.errno_name


class InvalidArgument(OppieError):
    errno_name = "EINVAL"
    exit_code = 2


class NameTooLong(InvalidArgument):
    """A host path longer than the kernel resolves (PATH_MAX: 4,096 bytes), or a name over
    255 bytes: such a tree can be neither read for a commit nor imported."""

    errno_name = "ENAMETOOLONG"


class NotFound(OppieError):
    errno_name = "ENOENT"
    exit_code = 3


class AlreadyExists(OppieError):
    errno_name = "EEXIST"
    exit_code = 4


class Busy(OppieError):
    errno_name = "EBUSY"
    exit_code = 5


class NoSpace(OppieError):
    errno_name = "ENOSPC"
    exit_code = 6


class PermissionDenied(OppieError):
    errno_name = "EACCES"
    exit_code = 7


class Unsupported(OppieError):
    """Something the snapshot model cannot represent (device nodes, redirect xattrs...)."""

    errno_name = "EOPNOTSUPP"
    exit_code = 8


class ReadOnly(OppieError):
    errno_name = "EROFS"
    exit_code = 9


class Corrupt(OppieError):
    """A stored object does not hash to its id, or is missing: never return wrong bytes."""

    errno_name = "EIO"
    exit_code = 10


class NotMounted(OppieError):
    errno_name = "ENOTCONN"
    exit_code = 11


BY_NAME: dict[str, type[OppieError]] = {
    cls.errno_name: cls
    for cls in (
        InvalidArgument,
        NameTooLong,
        NotFound,
        AlreadyExists,
        Busy,
        NoSpace,
        PermissionDenied,
        Unsupported,
        ReadOnly,
        NotMounted,
    )
}


def from_errno_name(name: str, message: str) -> OppieError:
    """Rebuild the right subclass from a control reply (used by the client)."""
    cls = BY_NAME.get(name)
    if cls is None:
        err = OppieError(message)
        err.errno_name = name if hasattr(_errno, name) else "EIO"
        return err
    return cls(message)


def from_oserror(exc: OSError, what: str) -> OppieError:
    """Map an OSError from host I/O to the matching OppieError with a precise message."""
    text = f"{_shortened(what)}: {exc.strerror or exc}" if what else str(exc.strerror or exc)
    if exc.errno == _errno.ENAMETOOLONG:
        name = exc.filename
        size = f"{len(os.fsencode(name))} bytes; " if isinstance(name, str | bytes) else ""
        text += f" ({size}the kernel resolves paths of up to 4,096 bytes and names of up to 255)"
    mapping: dict[int, type[OppieError]] = {
        _errno.ENOENT: NotFound,
        _errno.ENOTDIR: InvalidArgument,
        _errno.ENAMETOOLONG: NameTooLong,
        _errno.EACCES: PermissionDenied,
        _errno.EPERM: PermissionDenied,
        _errno.ENOSPC: NoSpace,
        _errno.EDQUOT: NoSpace,
        _errno.EROFS: ReadOnly,
        _errno.EBUSY: Busy,
        _errno.EEXIST: AlreadyExists,
    }
    return mapping.get(exc.errno or 0, OppieError)(text)


def as_oppie_error(exc: BaseException) -> OppieError | None:
    """The OppieError ``exc`` stands for: itself, an OSError's typed equivalent, or the one
    error inside an exception group (trio's nursery wraps what its tasks raise; the
    builtin group, or on Python 3.10 the backport trio uses, hence no isinstance)."""
    while len(getattr(exc, "exceptions", ())) == 1:
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, OppieError):
        return exc
    if isinstance(exc, OSError):
        return from_oserror(exc, os.fsdecode(exc.filename) if exc.filename else "")
    return None


def error_line(exc: OppieError) -> bytes:
    """``exc`` as the one line a child process sends its parent to say why it did not
    start (the daemon to ``oppiefs mount``, the tree server to the daemon), read back by
    ``from_error_line`` as the same class."""
    words = ["error", exc.errno_name, *exc.message.split()]  # one line, whatever it says
    return " ".join(words).encode(errors="replace") + b"\n"


def from_error_line(line: bytes) -> OppieError | None:
    """The error an ``error_line`` carries; None for any other line."""
    if not line.startswith(b"error "):
        return None
    name, _, message = line[6:].decode(errors="replace").strip().partition(" ")
    return from_errno_name(name, message)


def _shortened(what: str, keep: int = 240) -> str:
    """``what`` (a path, mostly) cut in the middle when long: a reply line stays readable,
    and its head and tail still say where."""
    if len(what) <= keep:
        return what
    return f"{what[:keep // 2]}...({len(what) - keep} characters)...{what[-keep // 2:]}"
