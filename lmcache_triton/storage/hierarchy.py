"""The storage hierarchy: the CPU tier in front of an ordered list of slow tiers.

The hierarchy knows the slow tiers only through the `SlowTier` protocol (`storage.tier`): it
asks them in order (fastest first), writes every one of them from the CPU tier's own buffer,
and has no branch for any tier by name. `storage.builder` makes the list from the config.

Primitives:
  Memory (the CPU tier; the engine's holds go through here):
    `hold(key)` / `release(key, t)` / `acquire(key)`  the arena view itself, never evicted while
                                held; `in_memory`, `remove`, `memory_keys`, `memory_bound`,
                                `memory_rejected`, `take_removed_cpu`.
  Stores:
    `put(key, tensor, meta)`    copy into the CPU tier, then write every slow tier behind.
    `put_fill(key, dtype, shape, fill, meta, write_back=True)`  the same, written in place.
    `put_fill_held(...)`        the same, and the CPU tier's view held from the same lock.
    `write_back(key)`           queue the slow-tier writes of a chunk now complete in memory.
  Loads:
    `prefetch(key, expect, lock, on_stored, keep_encoded)`  the first slow tier that has a
                                usable copy reads it once, straight into a reserved CPU-arena
                                block, verified there; the CPU tier's lock is not held during
                                the read. An encoded chunk is decoded into token rows there,
                                or, with `keep_encoded` (a CUDA engine: it dequantizes on the
                                device), kept encoded as the tier holds it (`encoding(key, t)`).
  `contains(key)` (memory or a local slow tier), `tier(name)`, `store_errors()`, `stats()`,
  `flush(timeout)`, `close()`.

Invariants:
  * An encoded CPU-tier entry (a lossy `cpu_codec`) is written to a slow tier as it is, and only
    to one that writes that key with the same codec (`EncodedWriter.put_encoded`); elsewhere the
    write does not happen (counted): a lossy chunk is never decoded and stored as exact.
  * The caller may reuse `tensor` as soon as `put` returns. Every chunk passes through the CPU
    tier; the slow tiers' writers are handed the tier's own buffer, held (unevictable) until the
    last writer is done. When the CPU tier has no free buffer the chunk is dropped, never copied
    aside, so the memory held by pending writes is bounded by the CPU tier's size.
  * `keep_in_cpu=False` (`local_cpu: false`): the CPU tier only stages -- a stored chunk leaves
    it once written to the slow tiers; prefetched chunks stay until the engine releases them.
  * `write_slow_tiers=False`: this rank is a KV replica (MLA, or more TP ranks than KV heads:
    another rank holds the same KV under the same key). It writes NO slow tier -- neither disk
    nor remote: the first replica writes the shared key (LMCache's save_only_first_rank). It
    still reads every tier.
  * A slow tier is a cache, never the source of truth: writes may be dropped (queue full, disk
    full, server down); each write that did not happen counts once in `store_errors()`.
  * Without a CPU tier nothing is stored or loaded.
  * A local tier (`locality == "LOCAL"`: a stat) is asked before it is written and by
    `contains`; a remote one is written blindly (asking costs the round trip the write does)
    and asked only by the scheduler's prefix index.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from lmcache_triton.chunk.codec import EXACT, Encoding

from .cpu import CpuTier
from .tier import EncodedReader, EncodedWriter, EncodingTier, SlowTier

# Fault injection for tests and benchmarks: seconds added to every prefetch read, as a slow or
# remote disk would (read at each prefetch).
FAULT_READ_DELAY_ENV = "LMCACHE_TRITON_FAULT_READ_DELAY"


class StorageHierarchy:
    """The CPU tier in front of the slow tiers, behind one interface.

    Args:
        cpu: the CPU tier, or None (then nothing is stored).
        tiers: the slow tiers, fastest first (default none).
        keep_in_cpu: keep stored chunks in memory (`local_cpu`); default True. False: the CPU
            tier only stages chunks on their way to or from the slow tiers.
        write_slow_tiers: write the slow tiers (default True); False on a KV replica rank
            (see the module docstring): then no slow tier is written, disk and remote alike.
    """

    def __init__(
        self,
        cpu: CpuTier | None,
        tiers: Sequence[SlowTier] = (),
        *,
        keep_in_cpu: bool = True,
        write_slow_tiers: bool = True,
    ) -> None:
        self.cpu = cpu
        self.tiers: tuple[SlowTier, ...] = tuple(tiers)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers: names must be unique, got {names}")
        self.keep_in_cpu = keep_in_cpu
        self.write_slow_tiers = write_slow_tiers
        self.dropped_writes = 0  # chunks not stored because no CPU buffer was free
        self._failed_writes = 0  # slow-tier writes that did not happen (on_done(False))
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        cpu = "none" if self.cpu is None else f"{self.cpu.max_bytes >> 20} MiB"
        return f"StorageHierarchy(cpu={cpu}, tiers={[t.name for t in self.tiers]}, keep_in_cpu={self.keep_in_cpu})"

    def tier(self, name: str) -> SlowTier | None:
        """The slow tier called `name`, or None."""
        return next((t for t in self.tiers if t.name == name), None)

    def _local(self) -> list[SlowTier]:
        return [t for t in self.tiers if t.locality == "LOCAL"]

    # ------------------------------------------------------------------ memory (CPU tier)

    @property
    def memory_bound(self) -> int:
        """Bytes the CPU tier may hold (0 without one)."""
        return 0 if self.cpu is None else self.cpu.max_bytes

    def in_memory(self, key: str) -> bool:
        return self.cpu is not None and self.cpu.contains(key)

    def memory_keys(self) -> list[str]:
        """Keys in the CPU tier, least recently used first."""
        return [] if self.cpu is None else self.cpu.keys()

    def memory_rejected(self) -> int:
        """Puts the CPU tier refused for want of room so far (`CpuTier.stats["rejected"]`)."""
        return 0 if self.cpu is None else self.cpu.stats["rejected"]

    def grow_ahead(self, headroom: int | None = None) -> None:
        """Allocate the CPU tier's arena ahead of the puts (`CpuTier.grow_ahead`)."""
        if self.cpu is not None:
            self.cpu.grow_ahead(headroom)

    def hold(self, key: str, count: bool = False) -> torch.Tensor | None:
        """The CPU tier's own tensor, unevictable until `release` (see `CpuTier.hold`)."""
        return None if self.cpu is None else self.cpu.hold(key, count)

    def release(self, key: str, tensor: torch.Tensor | None = None) -> None:
        if self.cpu is None:
            raise KeyError(f"release: {key!r} is not held (no CPU tier)")
        self.cpu.release(key, tensor)

    def acquire(self, key: str) -> AbstractContextManager[torch.Tensor | None]:
        """Context manager: the CPU tier's tensor (or None), unevictable inside the block."""
        if self.cpu is None:
            return contextlib.nullcontext(None)
        return self.cpu.acquire(key)

    def encoding(self, key: str, tensor: torch.Tensor | None = None) -> Encoding | None:
        """How the CPU tier's entry of `key` (the view `tensor` that `hold` returned) is encoded,
        or None for token rows (`CpuTier.encoding`)."""
        return None if self.cpu is None else self.cpu.encoding(key, tensor)

    def lossy_codecs(self) -> list[str]:
        """The lossy codecs some slow tier writes (and so may serve: `CodecPolicy.readable`) for
        some namespace: what an engine holding encoded chunks may be handed."""
        out: list[str] = []
        for t in self.tiers:
            if isinstance(t, EncodingTier):
                out += [n for n in t.codecs.names() if n != EXACT and n not in out]
        return out

    def remove(self, key: str) -> bool:
        """Drop `key` from memory (a held entry goes on its last release)."""
        return self.cpu is not None and self.cpu.remove(key)

    def take_removed_cpu(self) -> list[str]:
        """Keys that left the CPU tier since the last call (see `CpuTier.track_removals`)."""
        return [] if self.cpu is None else self.cpu.take_removed()

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str) -> bool:
        """In memory or in a local slow tier (a remote one is the scheduler's question)."""
        return self.in_memory(key) or any(t.contains_many([key])[0] for t in self._local())

    # ------------------------------------------------------------------ stores

    def put(self, key: str, tensor: torch.Tensor, meta: dict[str, str] | None = None) -> bool:
        """Store a chunk in the CPU tier and queue it for the slow tiers.

        Returns:
            True when the CPU tier took it (or it is in a local tier already with
            `keep_in_cpu` off).
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
        `CpuTier.put_fill`). When no buffer is free the chunk is dropped (a future miss, counted
        in `dropped_writes`), never copied aside.

        Args:
            write_back: queue the slow-tier writes now; default True. False when `fill` only
                starts an asynchronous copy: call `write_back(key)` once it is done.

        Raises:
            ValueError: a key, meta or dtype a slow tier refuses, before anything is taken.
        """
        ok, held = self.put_fill_held(key, dtype, shape, fill, meta, write_back)
        if held is not None and self.cpu is not None:
            self.cpu.release(key, held)
        return ok

    def put_fill_held(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        fill: Callable[[torch.Tensor], object],
        meta: dict[str, str] | None = None,
        write_back: bool = True,
        encoding: Encoding | None = None,
    ) -> tuple[bool, torch.Tensor | None]:
        """`put_fill`, and the CPU tier's view held from the same lock (`CpuTier.put_fill_held`:
        no eviction between the put and the hold); `release(key, view)` drops it.

        Args:
            encoding: the chunk is encoded (`dtype` uint8, `shape` `(encoding.nbytes,)`: a lossy
                `cpu_codec`'s parts); the slow tiers write it as it is (`EncodedWriter`).

        Returns:
            (what `put_fill` returns, the held view or None when the chunk is not in the CPU tier).
        """
        meta = dict(meta or {})
        rows_dtype = dtype if encoding is None else getattr(torch, encoding.dtype)
        for tier in self.tiers:
            tier.check_put(key, rows_dtype, meta)
        if self.cpu is None:
            return False, None
        if not self.keep_in_cpu and any(t.contains_many([key])[0] for t in self._local()):
            return True, None
        held = self.cpu.put_fill_held(key, dtype, shape, fill, meta, encoding=encoding)
        if held is None:
            self.dropped_writes += 1
            return False, None
        if write_back:
            self.write_back(key)
        return True, held

    def write_back(self, key: str) -> bool:
        """Queue the slow-tier writes of a chunk now complete in the CPU tier. The writers read
        the tier's own buffer, held until the last one is done; with `keep_in_cpu` off the chunk
        then leaves memory. False when there is no slow tier, this rank is a replica
        (`write_slow_tiers` off), or no write was queued."""
        if self.cpu is None or not self.tiers or not self.write_slow_tiers:
            return False
        targets = [t for t in self.tiers if t.locality != "LOCAL" or not t.contains_many([key])[0]]
        if not targets:  # in every (local) tier already
            if not self.keep_in_cpu:
                self.cpu.remove(key)
            return True
        held = self.cpu.hold(key)
        if held is None:
            return False
        enc = self.cpu.encoding(key, held)
        meta = self.cpu.meta(key) or {}
        cpu, keep = self.cpu, self.keep_in_cpu
        left = [len(targets)]
        left_lock = threading.Lock()

        def drop(_key: str = key, _t: torch.Tensor = held) -> None:
            with left_lock:
                left[0] -= 1
                if left[0]:
                    return
            cpu.release(_key, _t)
            if not keep:
                cpu.remove(_key)

        def done(ok: bool) -> None:
            if not ok:
                with self._count_lock:
                    self._failed_writes += 1
            drop()

        queued = False
        for i, tier in enumerate(targets):
            try:
                if enc is None:
                    queued = tier.put(key, held, meta, on_done=done) or queued
                elif isinstance(tier, EncodedWriter):  # as it is: no re-encode
                    queued = tier.put_encoded(key, held, enc, meta, on_done=done) or queued
                else:  # never decoded and stored as exact
                    done(False)
            except BaseException:
                for _ in targets[i:]:  # on_done is not called when put raises
                    drop()
                raise
        return queued

    def store_errors(self) -> int:
        """Slow-tier writes that did not happen so far (dropped, refused, failed): each write a
        tier reported with `on_done(False)`, counted once."""
        return self._failed_writes

    # ------------------------------------------------------------------ loads

    def prefetch(
        self,
        key: str,
        expect: dict[str, str] | None = None,
        lock: AbstractContextManager[object] | None = None,
        on_stored: Callable[[str], object] | None = None,
        keep_encoded: bool = False,
    ) -> bool:
        """Read a chunk from the first slow tier that has a usable copy into the CPU tier,
        verified (checksum and `expect`ed header fields).

        The chunk is read once, straight into a CPU-arena block reserved for it (no scratch
        copy), and the CPU tier's lock is not held during the read: the block is reserved under
        it, filled outside, and published under `lock` with `on_stored`.

        Args:
            key: chunk key.
            expect: header fields the chunk must carry; a chunk that disagrees is a miss.
            lock: taken around the publish and `on_stored` (the engine's bookkeeping lock).
            on_stored: called under `lock` right after the chunk is in the CPU tier, with the
                name of the tier that served it.
            keep_encoded: an encoded chunk from a tier whose reader can hand it over as is
                (`EncodedReader`) stays encoded in the CPU tier (half or a quarter of the bytes,
                no CPU decode); default False: decoded into token rows.

        Returns:
            True when the chunk is in the CPU tier now; False on a miss in every tier (absent,
            damaged, unreadable) or when the CPU tier has no room.
        """
        if self.cpu is None or not self.tiers:
            return False
        delay = float(os.environ.get(FAULT_READ_DELAY_ENV) or 0)
        if delay > 0:  # fault injection: a slow disk (tests, benchmarks)
            time.sleep(delay)
        for tier in self.tiers:
            got = self._prefetch_from(tier, key, expect, lock, on_stored, keep_encoded)
            if got is not None:
                return got
        return False

    def _prefetch_from(
        self,
        tier: SlowTier,
        key: str,
        expect: dict[str, str] | None,
        lock: AbstractContextManager[object] | None,
        on_stored: Callable[[str], object] | None,
        keep_encoded: bool = False,
    ) -> bool | None:
        """True/False: decided by this tier (stored / no room in memory); None: ask the next."""
        cpu = self.cpu
        assert cpu is not None
        with tier.open_read(key, expect) as reader:
            if reader is None:
                return None
            enc = reader.encoding if keep_encoded and isinstance(reader, EncodedReader) else None
            dtype, shape = (torch.uint8, (enc.nbytes,)) if enc is not None else (reader.dtype, reader.shape)
            if math.prod(shape) * dtype.itemsize > cpu.max_bytes:
                return None
            res = cpu.reserve(key, dtype, shape, encoding=enc)
            if res is None:
                if not cpu.contains(key):
                    return False  # no room
                ok = True  # put meanwhile (a store of the same chunk): served from memory
            else:
                try:
                    # The read: outside every lock.
                    if enc is not None:
                        assert isinstance(reader, EncodedReader)
                        ok = reader.read_encoded_into(res.out)
                    else:
                        ok = reader.read_into(res.out)
                except BaseException:
                    cpu.abort(res)
                    raise
                if not ok:
                    cpu.abort(res)
                    return None
            with lock if lock is not None else contextlib.nullcontext():
                if res is not None:
                    cpu.publish(res, reader.meta)  # False: put meanwhile, that copy is kept
                if on_stored is not None:
                    on_stored(tier.name)
            return True

    # ------------------------------------------------------------------ upkeep

    def stats(self) -> dict[str, dict[str, int] | None]:
        """`{"cpu": ..., <tier name>: ...}`: each tier's own counters."""
        out: dict[str, dict[str, int] | None] = {"cpu": None if self.cpu is None else self.cpu.stats}
        for t in self.tiers:
            out[t.name] = t.stats
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued slow-tier writes (all tiers within `timeout` together)."""
        t0 = time.monotonic()
        ok = True
        for t in self.tiers:
            left = None if timeout is None else max(timeout - (time.monotonic() - t0), 0.0)
            ok = t.flush(left) and ok
        return ok

    def close(self) -> None:
        """Finish queued writes, stop the writers, drop CPU entries."""
        for t in self.tiers:
            t.close()
        if self.cpu is not None:
            self.cpu.clear()

