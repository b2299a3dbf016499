"""Content-defined chunking of files and streams (FastCDC via pyfastcdc).

Parameters: min 16 KiB, average 64 KiB, max 256 KiB. Small enough that an edit to a large
file only rewrites ~64-128 KiB and source files (nearly all < 16 KiB) are one chunk each;
large enough that a multi-GiB file stays at a few tens of thousands of objects and FUSE
reads (128 KiB requests) touch at most two chunks. Files up to ``WHOLE_MAX`` are read in
one call and cut in memory: the stream chunker's 512 KiB window, allocated and refilled per
file, made a kernel-tree import ~7% slower (bench/RESULTS.md). Larger files are streamed in
fixed windows, so memory stays bounded whatever the file size. Both ways cut the same
bytes at the same offsets (tests/unit/test_dedup.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

MIN_SIZE = 16 * 1024
AVG_SIZE = 48 * 1024  # pyfastcdc's effective average is avg_size + min_size = 64 KiB
MAX_SIZE = 256 * 1024
WHOLE_MAX = 4 * 1024 * 1024  # files up to this size are read whole

_local = threading.local()


def _cdc() -> FastCDC:
    """One chunker per thread: pyfastcdc documents its objects as not concurrency-safe."""
    cdc = getattr(_local, "cdc", None)
    if cdc is None:
        cdc = _local.cdc = FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)
    return cdc


def chunk_stream(stream: BinaryIO) -> Iterator[bytes]:
    """Yield the chunks of a binary stream; each is a fresh ``bytes`` the caller may keep."""
    for chunk in _cdc().cut_stream(stream):
        yield bytes(chunk.data)


def chunk_bytes(data: bytes | memoryview) -> Iterator[bytes]:
    for chunk in _cdc().cut_buf(data):
        yield bytes(chunk.data)


def chunk_file(path: bytes | str) -> Iterator[bytes]:
    """Chunk the file at ``path`` (see ``chunk_fd``)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield from chunk_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def chunk_fd(fd: int, size: int) -> Iterator[bytes]:
    """Chunk an open file of ``size`` bytes (as last seen) from its start: up to
    ``WHOLE_MAX`` one read (a small file is one chunk), larger ones (or one that holds more
    than its size says, a file still growing) streamed. The caller keeps ``fd``."""
    with open(fd, "rb", buffering=0, closefd=False) as f:
        if size <= WHOLE_MAX:
            data = f.read(size + 1)
            if len(data) <= size:  # all of it
                if len(data) > MIN_SIZE:
                    yield from chunk_bytes(data)
                elif data:
                    yield data
                return
            f.seek(0)
        yield from chunk_stream(f)
