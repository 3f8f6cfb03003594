"""Storage manager: the CPU tier in front of the disk tier.

Primitives:
  `contains_prefix(keys)`  count of leading keys present in any tier (lookup stops at the first
                           miss: keys are prefix-chained, so a later hit cannot be used anyway).
  `get(key)`               CPU first, then disk; a disk hit is promoted into the CPU tier.
  `put(key, tensor, meta)` copy into the CPU tier, and write to disk in the background;
  `put_fill(...)`          the same, the chunk written in place into the pooled buffer.
  `open_chunk(key)`        a context: the CPU tier's own tensor (held, no copy) or a verified
                           disk read (promoted into CPU).
  `stats()`, `close()`.

Invariants:
  * The caller may reuse `tensor` as soon as `put` returns. The disk writer is handed the CPU
    tier's own buffer, held (unevictable) until the write finishes; only when the CPU tier
    cannot take the chunk does the disk tier get a private clone.
  * A chunk on disk is a superset guarantee only for what was written: writes may be dropped
    (queue full, disk full), so disk is a cache, never the source of truth.
  * Every tier may be None (no CPU tier, or no disk tier); with both None nothing is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .cpu import CpuTier
from .disk import RESERVED_META, DiskTier


class StorageManager:
    """CPU and disk tiers behind one get/put/lookup interface.

    Args:
        cpu: the CPU tier, or None.
        disk: the disk tier, or None.
    """

    def __init__(self, cpu: CpuTier | None, disk: DiskTier | None) -> None:
        self.cpu = cpu
        self.disk = disk

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
    ) -> bool:
        """Like `put`, with the chunk written in place by `fill(dst)` (see `CpuTier.put_fill`):
        into a pooled CPU buffer when the CPU tier takes it, else into a fresh tensor for disk."""
        meta = dict(meta or {})
        stored = False
        held = None
        if self.cpu is not None:
            stored = self.cpu.put_fill(key, dtype, shape, fill, meta)
            if stored and self.disk is not None:
                held = self.cpu.hold(key)
        if self.disk is None:
            return stored
        if self.disk.contains(key):
            if held is not None:
                self.cpu.release(key, held)
            return True
        if held is not None:
            cpu = self.cpu

            def release(_ok: bool, _key: str = key, _t: torch.Tensor = held) -> None:
                cpu.release(_key, _t)

            queued = self.disk.put(key, held, meta, on_done=release)
        else:
            own = torch.empty(shape, dtype=dtype)
            fill(own)
            queued = self.disk.put(key, own, meta)
        return stored or queued

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
        }

    def flush(self, timeout: float | None = None) -> bool:
        return True if self.disk is None else self.disk.flush(timeout)

    def close(self) -> None:
        """Finish queued disk writes, stop the writer, drop CPU entries."""
        if self.disk is not None:
            self.disk.close()
        if self.cpu is not None:
            self.cpu.clear()
