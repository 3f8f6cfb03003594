"""Storage manager: the CPU tier in front of the disk tier and the remote (Valkey/Redis) tier.

Primitives:
  `contains_prefix(keys)`  count of leading keys present in any tier (lookup stops at the first
                           miss: keys are prefix-chained, so a later hit cannot be used anyway).
  `get(key)`               CPU first, then disk; a disk hit is promoted into the CPU tier.
  `put(key, tensor, meta)` copy into the CPU tier, and write to disk in the background;
  `put_fill(...)`          the same, the chunk written in place into the tier's buffer;
                           `write_back(key)` queues the disk write of a chunk filled asynchronously.
  `prefetch(key, expect)`  a verified disk read into the CPU tier, the tier's lock not held
                           during the read (the engine's background prefetcher); when the disk
                           has no usable file, a verified GET from the remote tier.
  `open_chunk(key)`        a context: the CPU tier's own tensor (held, no copy) or a verified
                           disk read (promoted into CPU).
  `stats()`, `close()`.

Invariants:
  * The caller may reuse `tensor` as soon as `put` returns. Every chunk passes through the CPU
    tier; the disk writer is handed the tier's own buffer, held (unevictable) until the write
    finishes. When the tier has no free buffer the chunk is dropped, never copied aside, so the
    memory held by pending writes is bounded by the CPU tier's size.
  * `keep_in_cpu=False` (`local_cpu: false`): the CPU tier only stages -- a stored chunk leaves it
    once written to disk; prefetched chunks stay until the engine releases them.
  * A chunk on disk is a superset guarantee only for what was written: writes may be dropped
    (queue full, disk full), so disk is a cache, never the source of truth.
  * Either tier may be None; without a CPU tier nothing is stored.
  * The remote tier is written like the disk (in the background, from the held CPU-tier buffer,
    released when the last writer is done) and read only by `prefetch`; lookups of it are the
    scheduler's (`PrefixIndex.on_remote`), never in `contains`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmcache_triton.chunk.format import RESERVED_META

from .cpu import CpuTier
from .disk import DiskTier
from .remote import RemoteTier, copy_payload

# Fault injection for tests and benchmarks: seconds added to every prefetch read, as a slow or
# remote disk would (read at each prefetch).
FAULT_READ_DELAY_ENV = "LMCACHE_TRITON_FAULT_READ_DELAY"


class StorageManager:
    """CPU and disk tiers behind one get/put/lookup interface.

    Args:
        cpu: the CPU tier, or None.
        disk: the disk tier, or None.
    """

    def __init__(
        self, cpu: CpuTier | None, disk: DiskTier | None, keep_in_cpu: bool = True, remote: RemoteTier | None = None
    ) -> None:
        self.cpu = cpu
        self.disk = disk
        self.remote = remote
        # False (`local_cpu: false`): the CPU tier only stages chunks -- stores on their way to
        # disk (dropped from memory once written) and prefetched chunks on their way to a load.
        self.keep_in_cpu = keep_in_cpu
        self.dropped_writes = 0  # chunks not stored because no CPU buffer was free
        # False on a rank whose KV another rank also holds (MLA, or more TP ranks than KV heads):
        # the first replica writes the shared file, the others only read it (LMCache's
        # save_only_first_rank, automatic here).
        self.write_disk = True
        self._scratch: torch.Tensor | None = None

    def contains(self, key: str) -> bool:
        return (self.cpu is not None and self.cpu.contains(key)) or (
            self.disk is not None and self.disk.contains(key)
        )

    def contains_prefix(self, keys: list[str]) -> int:
        """Number of leading `keys` present in the CPU or disk tier."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The chunk, from CPU, else from disk (then promoted into CPU); None on a miss.

        Args:
            key: chunk key.
            out: optional destination for a CPU-tier hit (see `CpuTier.get`); default None.
        """
        if self.cpu is not None:
            t = self.cpu.get(key, out)
            if t is not None:
                return t
        got = self._from_disk(key, None)
        if got is None:
            return None
        tensor = got[0]
        if out is not None:
            if out.shape != tensor.shape or out.dtype != tensor.dtype:  # copy_ would broadcast
                raise ValueError(
                    f"out: expected shape {tuple(tensor.shape)} dtype {tensor.dtype}, "
                    f"got {tuple(out.shape)} {out.dtype}"
                )
            out.copy_(tensor)
            return out
        return tensor

    def get_with_tier(
        self, key: str, expect: dict[str, str] | None = None
    ) -> tuple[torch.Tensor, str] | None:
        """Like `get`, also naming the tier that served it ("cpu" or "disk").

        Args:
            key: chunk key.
            expect: header fields a disk file must carry (a file that disagrees is a miss and is
                removed); CPU entries were put by this process and are trusted.
        """
        if self.cpu is not None:
            t = self.cpu.get(key)
            if t is not None:
                return t, "cpu"
        return self._from_disk(key, expect)

    def _from_disk(self, key: str, expect: dict[str, str] | None) -> tuple[torch.Tensor, str] | None:
        if self.disk is None:
            return None
        got = self.disk.get_with_meta(key, expect=expect)
        if got is None:
            return None
        tensor, meta = got
        if self.cpu is not None:
            self.cpu.put(key, tensor, {k: v for k, v in meta.items() if k not in RESERVED_META})
        return tensor, "disk"

    def take_removed_cpu(self) -> list[str]:
        """Keys that left the CPU tier since the last call (see `CpuTier.track_removals`)."""
        return [] if self.cpu is None else self.cpu.take_removed()

    def put(self, key: str, tensor: torch.Tensor, meta: dict[str, str] | None = None) -> bool:
        """Store a chunk in the CPU tier and queue it for disk.

        Returns:
            True when at least one tier took it (CPU stored it, or the disk write was queued).
        """
        return self.put_fill(key, tensor.dtype, tuple(tensor.shape), lambda dst: dst.copy_(tensor), meta)

    def put_fill(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        fill: Callable[[torch.Tensor], object],
        meta: dict[str, str] | None = None,
        write_back: bool = True,
    ) -> bool:
        """Like `put`, with the chunk written in place by `fill(dst)` into a CPU-tier buffer (see
        `CpuTier.put_fill`).

        Every chunk passes through the CPU tier, so the memory held by pending disk writes is
        bounded by the tier: when no buffer is free the chunk is dropped (a future miss,
        counted in `dropped_writes`), never copied aside.

        Args:
            write_back: queue the disk write now; default True. False when `fill` only starts
                an asynchronous copy: call `write_back(key)` once it is done.

        Raises:
            ValueError: a key, meta or dtype the disk tier refuses, before anything is taken.
        """
        meta = dict(meta or {})
        if self.disk is not None:
            self.disk.check_put(key, dtype, meta)
        if self.remote is not None:
            self.remote.check_put(key, dtype, meta)
        if self.cpu is None:
            return False
        if self.disk is not None and not self.keep_in_cpu and self.disk.contains(key):
            return True
        if not self.cpu.put_fill(key, dtype, shape, fill, meta):
            self.dropped_writes += 1
            return False
        if write_back:
            self.write_back(key)
        return True

    def write_back(self, key: str) -> bool:
        """Queue the disk and remote writes of a chunk now complete in the CPU tier. The writers
        read the tier's own buffer, held until the last one is done; with `keep_in_cpu` off the
        chunk then leaves memory. False when there is no slower tier, this rank is a replica
        (`write_disk` off: the first replica writes the shared key), or no write was queued."""
        if self.cpu is None or (self.disk is None and self.remote is None) or not self.write_disk:
            return False
        targets: list[Any] = [] if self.disk is None or self.disk.contains(key) else [self.disk]
        if self.remote is not None:
            targets.append(self.remote)
        if not targets:  # on disk already, no remote tier
            if not self.keep_in_cpu:
                self.cpu.remove(key)
            return True
        held = self.cpu.hold(key)
        if held is None:
            return False
        meta = self.cpu.meta(key) or {}
        cpu, keep = self.cpu, self.keep_in_cpu
        left = [len(targets)]
        left_lock = threading.Lock()

        def release(_ok: bool, _key: str = key, _t: torch.Tensor = held) -> None:
            with left_lock:
                left[0] -= 1
                if left[0]:
                    return
            cpu.release(_key, _t)
            if not keep:
                cpu.remove(_key)

        queued = False
        for i, tier in enumerate(targets):
            try:
                queued = tier.put(key, held, meta, on_done=release) or queued
            except BaseException:
                for _ in targets[i:]:  # on_done is not called when put raises
                    release(False)
                raise
        return queued

    def prefetch(
        self,
        key: str,
        expect: dict[str, str] | None = None,
        lock: Any = None,
        on_stored: Callable[[], object] | None = None,
    ) -> bool:
        """Read a chunk from disk into the CPU tier, verified (checksum and `expect`ed header
        fields), without holding the tier's lock during the read: the read goes into a scratch
        buffer reused across calls, then one memory copy puts it into the tier.

        Args:
            key: chunk key.
            expect: header fields the file must carry; a file that disagrees is a miss.
            lock: taken around the put and `on_stored` (the engine's bookkeeping lock).
            on_stored: called under `lock` right after the put succeeded, with the tier that served
                the chunk ("disk" or "remote").

        Returns:
            True when the chunk is in the CPU tier now; False on a miss (no file, damaged,
            unreadable, not on the remote server, or no room).
        """
        if self.cpu is None or (self.disk is None and self.remote is None):
            return False
        delay = float(os.environ.get(FAULT_READ_DELAY_ENV) or 0)
        if delay > 0:  # fault injection: a slow disk (tests, benchmarks)
            time.sleep(delay)
        if self.disk is not None and self._prefetch_disk(key, expect, lock, on_stored):
            return True
        return self.remote is not None and self._prefetch_remote(key, expect, lock, on_stored)

    def _prefetch_remote(self, key, expect, lock, on_stored) -> bool:
        got = self.remote.fetch(key, expect)  # GET + verify, outside every lock
        if got is None:
            return False
        dtype, shape, meta, payload = got
        if math.prod(shape) * dtype.itemsize > self.cpu.max_bytes:
            return False
        meta = {k: v for k, v in meta.items() if k not in RESERVED_META}
        with lock if lock is not None else contextlib.nullcontext():
            if not self.cpu.put_fill(key, dtype, shape, lambda dst: copy_payload(payload, dst), meta):
                return False
            if on_stored is not None:
                on_stored("remote")
        return True

    def _prefetch_disk(self, key, expect, lock, on_stored) -> bool:
        info = self.disk.describe(key)
        if info is None:
            return False
        dtype, shape = info
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.cpu.max_bytes:
            return False
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        buf = self._scratch[:nbytes].view(dtype).view(shape)
        got = self.disk.get_with_meta(key, expect=expect, out=buf)
        if got is None:
            return False
        meta = {k: v for k, v in got[1].items() if k not in RESERVED_META}
        with lock if lock is not None else contextlib.nullcontext():
            if not self.cpu.put(key, buf, meta):
                return False
            if on_stored is not None:
                on_stored("disk")
        return True

    @contextmanager
    def open_chunk(self, key: str, expect: dict[str, str] | None = None) -> Iterator[tuple[torch.Tensor, str] | None]:
        """Context manager: `(chunk, tier)` or None. A CPU hit is the pooled tensor itself, held
        (unevictable) inside the block and valid only there: no copy on the load path. A disk
        hit is verified against `expect` and promoted into the CPU tier."""
        if self.cpu is not None:
            with self.cpu.acquire(key) as t:
                if t is not None:
                    yield t, "cpu"
                    return
            if self._promote(key, expect):
                with self.cpu.acquire(key) as t:
                    if t is not None:
                        yield t, "disk"
                        return
        yield self._from_disk(key, expect)

    def _promote(self, key: str, expect: dict[str, str] | None) -> bool:
        """Read a disk chunk straight into a pooled CPU buffer (verified there; one copy, no
        fresh allocation: a new 100 MB tensor costs page faults worth ~3 copies). False when
        there is no such file, it is damaged (then removed), or the CPU tier cannot take it."""
        if self.disk is None or self.cpu is None:
            return False
        info = self.disk.describe(key)
        if info is None:
            return False
        dtype, shape = info

        def fill(dst: torch.Tensor) -> bool:
            return self.disk.get_with_meta(key, expect=expect, out=dst) is not None

        return self.cpu.put_fill(key, dtype, shape, fill)

    def stats(self) -> dict[str, Any]:
        return {
            "cpu": None if self.cpu is None else self.cpu.stats,
            "disk": None if self.disk is None else self.disk.stats,
            "remote": None if self.remote is None else self.remote.stats,
        }

    def flush(self, timeout: float | None = None) -> bool:
        t0 = time.monotonic()
        ok = True if self.disk is None else self.disk.flush(timeout)
        if self.remote is not None:
            left = None if timeout is None else max(timeout - (time.monotonic() - t0), 0.0)
            ok = self.remote.flush(left) and ok
        return ok

    def close(self) -> None:
        """Finish queued disk and remote writes, stop the writers, drop CPU entries."""
        if self.disk is not None:
            self.disk.close()
        if self.remote is not None:
            self.remote.close()
        if self.cpu is not None:
            self.cpu.clear()
