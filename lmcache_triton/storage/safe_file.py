"""Opening, reading, writing and removing chunk files without trusting the directory.

Torch-free (the disk tools `inspect`, `verify`, `clear` import it without torch).

Invariants:
  * Nothing but a regular file is ever opened: `lstat` first, then `O_NOFOLLOW | O_NONBLOCK`
    and an `fstat` check (a FIFO, socket, device or directory named like a chunk never blocks a
    read; a symlink is never followed).
  * A file is removed by name only if it is still the file that was judged (same inode):
    another process may have replaced it since.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import Executor
from io import FileIO
from pathlib import Path

from lmcache_triton.chunk.format import (
    MAX_HEADER,
    ChunkAuth,
    ChunkError,
    ChunkHeader,
    header_length,
    load_json,
    parse_header,
)

logger = logging.getLogger(__name__)

OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

# Reads hash each piece right after reading it, while it is still in cache: a whole-payload read
# then a separate hash pass ran at 0.56 of a page-cache read for 32 MiB chunks (bench_storage).
READ_PIECE = 2 << 20

# From this payload size on, pieces are hashed on a helper thread while the next piece is read
# (hashing releases the GIL): the MAC (BLAKE3, ~8 GB/s) then overlaps the disk instead of adding
# to it. Below it a thread hand-off per piece costs more than it saves.
PIPELINE_MIN = 8 << 20


class NotRegular(Exception):
    """Not a regular file (FIFO, socket, device, directory, symlink): never opened."""

    def __init__(self, st: os.stat_result) -> None:
        super().__init__("not a regular file" + (" (symlink)" if stat.S_ISLNK(st.st_mode) else ""))
        self.st = st


def write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def readinto_all(f: FileIO, mv: memoryview) -> None:
    """Fill `mv` from `f`; ChunkError when the file ends first."""
    while mv:
        n = f.readinto(mv)
        if not n:
            raise ChunkError("truncated payload")
        mv = mv[n:]


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file from its replacement: (dev, inode, size, mtime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: Path, lst: os.stat_result | None = None) -> tuple[FileIO, os.stat_result]:
    """`(file, fstat)` of `path` opened read-only, only if it is a regular file: lstat first (a
    FIFO would block open), then O_NOFOLLOW|O_NONBLOCK and fstat (the name may be swapped
    between the two). Raises FileNotFoundError, NotRegular, or OSError."""
    if lst is None:
        lst = os.lstat(path)
    if not stat.S_ISREG(lst.st_mode):
        raise NotRegular(lst)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise NotRegular(os.lstat(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(st)
        f = os.fdopen(fd, "rb", buffering=0)
        assert isinstance(f, FileIO)
        return f, st
    except BaseException:
        os.close(fd)
        raise


def read_header(f: FileIO, file_size: int, key: str, auth: ChunkAuth | None = None) -> ChunkHeader:
    """The checked header of an open chunk file; raises ChunkError / ChunkUnverifiable."""
    hlen = header_length(f.read(8), file_size)
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise ChunkError("truncated header")
    return parse_header(raw, key, file_size, auth)


def read_payload_verified(
    f: FileIO, hdr: ChunkHeader, mv: memoryview, auth: ChunkAuth, hasher: Callable[[], Executor]
) -> None:
    """Read the payload after the header into `mv`, hashing each piece as it lands; raise
    ChunkError when the checksum (or MAC) does not match `hdr`.

    Args:
        f: the chunk file, positioned just past its header (`read_header`).
        hdr: that header.
        mv: destination, `hdr`'s payload size in bytes.
        auth: the tier's `ChunkAuth`.
        hasher: the caller's single-worker executor (made on first use), for signed payloads of
            at least `PIPELINE_MIN` bytes; one worker keeps the pieces hashed in order.
    """
    h = auth.start(hdr.meta)
    if len(mv) < PIPELINE_MIN or not auth.signed:
        for start in range(0, len(mv), READ_PIECE):
            piece = mv[start : start + READ_PIECE]
            readinto_all(f, piece)
            h.update(piece)
    else:
        pool = hasher()
        last = None
        try:
            for start in range(0, len(mv), READ_PIECE):
                piece = mv[start : start + READ_PIECE]
                readinto_all(f, piece)
                last = pool.submit(h.update, piece)
        finally:
            if last is not None:
                last.result()
    if auth.seal(h) != hdr.meta["checksum"]:
        raise ChunkError("MAC mismatch" if auth.signed else "checksum mismatch")


def header_is_ours(f: FileIO, file_size: int, key: str, fmt: str) -> None:
    """Raise ChunkError unless the header says this format wrote the file for `key` (format and
    key), even if the rest is damaged (truncated payload, bad checksum): what `clear` removes."""
    head = f.read(8)
    if len(head) < 8:
        raise ChunkError("shorter than a safetensors header")
    hlen = int.from_bytes(head, "little")
    if hlen <= 0 or hlen > min(MAX_HEADER, file_size - 8):
        raise ChunkError(f"bad header length {hlen}")
    header = load_json(f.read(hlen))
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or md.get("format") != fmt or md.get("key") != key:
        raise ChunkError(f"not a {fmt} chunk for this key")


def unlink_if_same(path: Path, st: os.stat_result | None) -> bool:
    """Remove `path` (the name itself, never a symlink's target) unless it was replaced since
    `st` (another process rewrote it). True when it is gone."""
    try:
        if st is not None:
            now = os.lstat(path)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                return True  # not the file we judged: leave it
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        logger.debug("cannot remove %s: %s", path, e)
        return False
