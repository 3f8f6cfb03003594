"""The disk tier's reads: a chunk file opened once (regular files only, known-bad files skipped),
its header checked, its payload read straight into the caller's buffer and verified there; and
the fate of a file that must not be used.

Primitives:
  `DiskReads.open_read(key, expect)`  a `ChunkReader` over `key`'s file (header checked against
                    the tier's and the call's `expect`), or None on a miss.
  `DiskReads.check_file(key)`  `(size, mtime)` of a usable file of ours from its header alone
                    (start-up re-index, discovering files other processes wrote).
  `DiskReads.open_file(key)` / `read_verified(f, hdr, mv)`  the two I/O steps (tests hook them).
  `forget_bad(key)`, `close()`.

Invariants (the tier's, `storage.disk`, in full: docs/disk-tier.md):
  * Only regular files are opened, symlinks never followed (`storage.safe_file`); ENOENT at open
    is a miss.
  * A file is used only if its header, key, `expect`, dtype/shape/size and checksum (or MAC) all
    check out; anything else is a miss, counted `corrupt`, removed (or, if it cannot be,
    remembered by identity: `unremovable`). With a secret, only chunks signed with it are used
    (`unauthenticated`: left in place). A sound file of another shape, codec or configuration is
    a miss and kept.
  * A bad file is not read again until it changes (`bad_files.KnownBad`).
  * A hit restarts the file's LRU order (its mtime, and the tier's index through `on_hit`).
  * Counts and once-only warnings are the tier's (`TierCounters`), its index is the tier's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from io import FileIO
from pathlib import Path

import torch

from lmcache_triton.chunk.codec import CodecPolicy, Encoding
from lmcache_triton.chunk.format import (
    RESERVED_META,
    ChunkAuth,
    ChunkError,
    ChunkHeader,
    ChunkUnverifiable,
    check_expect,
    check_key,
    decode_payload,
    tensor_bytes,
)
from lmcache_triton.threads import enter_background

from .bad_files import BadFileLog, KnownBad
from .counters import TierCounters
from .disk_admin import SUFFIX
from .safe_file import NotRegular, open_regular, read_header, read_payload_verified, unlink_if_same
from .tier import ChunkReader

# The disk tier's logger: these lines were the tier's before its reads had their own module.
logger = logging.getLogger("lmcache_triton.storage.disk")


class _Mismatch(Exception):
    """A sound file whose dtype/shape differ from the caller's `out`: a miss, file kept."""


class _KnownBad(Exception):
    """A file already judged bad and unchanged since: a miss without reading it again."""


class _DiskReader:
    """`ChunkReader` over one open chunk file whose header was checked (`DiskReads.open_read`)."""

    def __init__(self, reads: DiskReads, key: str, f: FileIO, st: os.stat_result, hdr: ChunkHeader) -> None:
        self.dtype: torch.dtype = hdr.dtype
        self.shape: tuple[int, ...] = tuple(hdr.shape)
        self.meta: dict[str, str] = {k: v for k, v in hdr.meta.items() if k not in RESERVED_META}
        self.key, self.file, self.stat, self.header = key, f, st, hdr
        self.path = reads.path / (key + SUFFIX)
        self._reads = reads
        self.encoding: Encoding | None = (
            Encoding(hdr.codec, str(hdr.dtype).removeprefix("torch."), tuple(hdr.shape)) if hdr.parts else None
        )

    def read_into(self, out: torch.Tensor) -> bool:
        return self._reads._read_payload(self, out)

    def read_encoded_into(self, buf: torch.Tensor) -> bool:
        """`EncodedReader`: the verified parts into `buf`, not decoded."""
        return self._reads._read_payload(self, buf, encoded=True)


class DiskReads:
    """The read path of one `DiskTier` (see the module docstring).

    Args:
        path: the tier's directory.
        auth: checksum or MAC (`chunk_secret`) files are verified with.
        expect: metadata every file must carry (the tier's; a call's `expect` adds to it).
        codecs: the tier's codec policy (a lossy chunk is served only where it would be written).
        counts: the tier, whose counters and warnings the reads use.
        bound: the tier's `max_bytes`, read at each open (a larger file was never ours).
        forget: drops a key from the tier's index (its file is gone or bad).
        on_hit: `(key, file bytes)` of a verified read, for the tier's index and hit count.
    """

    def __init__(
        self,
        path: Path,
        auth: ChunkAuth,
        expect: dict[str, str],
        codecs: CodecPolicy,
        counts: TierCounters,
        bound: Callable[[], int],
        forget: Callable[[str], None],
        on_hit: Callable[[str, int], None],
    ) -> None:
        self.path = path
        self.auth = auth
        self.expect = expect
        self.codecs = codecs
        self._counts = counts
        self._bound = bound
        self._forget = forget
        self._on_hit = on_hit
        self._lock = threading.Lock()  # the hash pool's creation
        self._known_bad = KnownBad()  # bad files not read again until they change
        self._warn_bad = BadFileLog(logger, "lmcache_triton disk tier")
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._scratch = threading.local()  # per reading thread: `_scratch_bytes`

    def file(self, key: str) -> Path:
        """The path of `key`'s file; ValueError for a key that is not lower-case hex."""
        return self.path / (check_key(key) + SUFFIX)

    def forget_bad(self, key: str) -> None:
        """`key`'s file was just written by this tier: no longer remembered as bad."""
        self._known_bad.forget(key)

    def close(self) -> None:
        """Stop the hash thread (the tier's `close`)."""
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=False)

    def open_file(self, key: str) -> tuple[FileIO, os.stat_result]:
        """`(file, fstat)` of the chunk file; raises FileNotFoundError, NotRegular, _KnownBad
        (remembered as bad and unchanged), OSError."""
        path = self.file(key)
        lst = os.lstat(path)
        if self._known_bad.is_known(key, lst):
            raise _KnownBad
        return open_regular(path, lst)

    def _reject(self, key: str, reason: str, exc: BaseException, st: os.stat_result | None) -> None:
        """Handle a file that must not be used: corrupt files are removed (a symlink: the link
        only) or, when that fails, remembered; unverifiable and non-regular files are left in
        place and remembered."""
        path = self.file(key)
        self._forget(key)
        if isinstance(exc, ChunkUnverifiable):
            self._counts.count("unauthenticated")
            self._counts.warn_once(
                "unauth", "lmcache_triton disk tier: %s is a miss (%s); left in place", path.name, reason
            )
            if st is not None:
                self._known_bad.remember(key, st)
            return
        self._counts.count_each("corrupt", "errors")
        removable = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
        if removable:
            self._warn_bad("lmcache_triton disk tier: removing bad file %s (%s)", path.name, reason)
            if unlink_if_same(path, st):
                return
        else:
            self._warn_bad("lmcache_triton disk tier: ignoring %s (%s)", path.name, reason)
        self._counts.count("unremovable")
        if st is not None:
            self._known_bad.remember(key, st)

    def check_file(self, key: str) -> tuple[int, float] | None:
        """`(size, mtime)` when the file's header is ours and usable (header read only), else
        None; a bad file is handled as a bad file."""
        got = self._header(key, count_errors=True)
        return None if got is None else (got[1].st_size, got[1].st_mtime)

    def _header(self, key: str, count_errors: bool = False) -> tuple[ChunkHeader, os.stat_result] | None:
        """`(header, stat)` of `key`'s file, reading the header alone; None when the file is
        missing, known bad, not a regular file or damaged (the last two handled by `_reject`), or
        unreadable (counted in `errors` when `count_errors`)."""
        st = None
        try:
            f, st = self.open_file(key)
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
                self._counts.count("errors")
                logger.debug("skip %s: %s", key, e)
            return None

    @contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        """Context manager: a `ChunkReader` over `key`'s file (opened once, header checked
        against the tier's and this call's `expect`), or None on a miss. A bad file is handled
        as in `get` (removed or remembered). The file is closed when the block ends."""
        path = self.file(key)
        want = {**self.expect, **(expect or {})}
        st = None
        reader = None
        try:
            f, st = self.open_file(key)
        except (FileNotFoundError, _KnownBad, NotRegular, OSError) as e:
            self._miss(key, path, e, None)
            yield None
            return
        with f:
            try:
                hdr = read_header(f, st.st_size, key, self.auth)
                check_expect(hdr.meta, want)
                if not self.codecs.readable(key, hdr.codec):
                    self._counts.warn_once(
                        "codec", "lmcache_triton disk tier: %s chunks not served here (this model is exact here); "
                        "a miss, the files are kept (warned once)", hdr.codec,
                    )
                    raise _Mismatch
                if st.st_size > self._bound():  # never written by this tier: do not allocate for it
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
            self._counts.count("errors")
            self._counts.warn_once("read", "lmcache_triton disk tier: read of %s failed (%s)", path.name, e)
        self._counts.count("misses")

    def _read_payload(self, r: _DiskReader, out: torch.Tensor, encoded: bool = False) -> bool:
        """`_DiskReader.read_into`: the payload into `out`, verified there (`encoded`: the
        parts of an encoded chunk, as they are, `read_encoded_into`)."""
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("out: expected a contiguous CPU tensor")
        if encoded:
            if r.encoding is None or out.dtype != torch.uint8 or tuple(out.shape) != (r.header.nbytes,):
                raise ValueError(f"out: expected a [{r.header.nbytes}] uint8 tensor for an encoded chunk")
        elif out.dtype != r.dtype or tuple(out.shape) != r.shape:
            self._counts.count("misses")  # a sound file of another shape: a miss, kept
            return False
        try:
            if encoded:
                self.read_verified(r.file, r.header, tensor_bytes(out))
            elif r.header.parts:  # encoded: verified in a scratch buffer, then decoded into `out`
                buf = self._scratch_bytes(r.header.nbytes)
                self.read_verified(r.file, r.header, tensor_bytes(buf))
                decode_payload(r.header, buf, out)
            else:
                self.read_verified(r.file, r.header, tensor_bytes(out))
        except Exception as e:
            self._miss(r.key, r.path, e, r.stat)
            return False
        self._on_hit(r.key, r.stat.st_size)
        with contextlib.suppress(OSError):  # restart LRU order; best effort
            os.utime(r.path, follow_symlinks=False)
        return True

    def _scratch_bytes(self, nbytes: int) -> torch.Tensor:
        """A `[nbytes]` uint8 buffer of the calling thread's, reused by its next encoded read: a
        fresh allocation of each encoded payload (MiBs) cost page faults and an mmap/munmap pair
        per chunk, and those wait on the process's mm lock behind any other thread's mapping
        work. Bounded by one encoded chunk per reading thread (the prefetchers)."""
        buf: torch.Tensor | None = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def read_verified(self, f: FileIO, hdr: ChunkHeader, mv: memoryview) -> None:
        read_payload_verified(f, hdr, mv, self.auth, self._hasher)

    def _hasher(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="lmcache-disk-hash", initializer=enter_background
                )
            return self._hash_pool
