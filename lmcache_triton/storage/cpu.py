"""CPU-memory tier: a byte-bounded LRU of KV chunks held in pooled (pinned when CUDA) buffers.

Primitives:
  `put(key, tensor, meta)`   copy a chunk in; False when it cannot fit even after eviction.
  `get(key, out=None)`       copy a chunk out (into `out` if given); touches LRU.
  `acquire(key)`             context manager yielding the pooled tensor itself, zero-copy;
                             `hold(key)` / `release(key)` are the same as two calls.
  `contains`, `meta`, `remove`, `clear`, `keys`, `stats`.

Invariants:
  * Pool: a buffer is a uint8 tensor of exactly an entry's nbytes, recycled through a free list
    per size (size class = nbytes). With uniform chunk shapes (the normal case) the hot path
    allocates nothing after warm-up: an evicted entry's buffer is reused by the next put.
    Pinned allocation costs milliseconds per buffer, which is why it is pooled.
  * Bytes of all buffers, in use or free, never exceed `max_bytes`. Free buffers of other sizes
    are dropped before any entry is evicted.
  * An entry with a positive hold count is never evicted and its buffer is never reused; a
    `remove`/`clear` of a held entry unlinks it at once and recycles its buffer on last release.
  * Keys are content addresses: a put of a present key only refreshes recency.
  * Every public method takes one lock; copies run under it (they are memcpy-bound and the
    engine has one writer thread, so finer locking would buy nothing measurable).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    buf: torch.Tensor  # [nbytes] uint8 pooled buffer
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict[str, str]
    refs: int = 0
    dead: bool = False  # removed from the index while held; recycled on last release
    _view: torch.Tensor | None = None

    def view(self) -> torch.Tensor:
        # Cached: two view ops cost ~2 us, a third of a 256 KiB copy.
        if self._view is None:
            self._view = self.buf.view(self.dtype).view(self.shape)
        return self._view


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # puts that could not fit
    errors: int = 0


class CpuTier:
    """Byte-bounded LRU of chunk tensors in CPU memory.

    Args:
        max_bytes: bound on bytes of all pooled buffers (in use and free).
        pin_memory: allocate page-locked buffers for fast host->device copies; default True
            when CUDA is available.
    """

    def __init__(self, max_bytes: int, pin_memory: bool | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._free: dict[int, list[torch.Tensor]] = {}
        self._allocated = 0  # bytes of every buffer we own, used or free
        self._used = 0  # bytes of buffers backing entries (live or dead-but-held)
        self._s = _Stats()
        # Entries removed while held: key -> entries, recycled on their last release.
        self._dead: dict[str, list[_Entry]] = {}
        # Keys dropped by eviction, remove or clear, oldest first, while a caller wants them
        # (`track_removals()`): the vLLM connector reports them to the scheduler's index.
        self._removed: list[str] | None = None

    # ---------------------------------------------------------------- pool

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def _recycle(self, buf: torch.Tensor) -> None:
        self._used -= buf.numel()
        self._free.setdefault(buf.numel(), []).append(buf)

    def _drop_free_other_than(self, nbytes: int, need: int) -> None:
        for size in list(self._free):
            if size == nbytes:
                continue
            bufs = self._free[size]
            while bufs and self._allocated + need > self.max_bytes:
                bufs.pop()
                self._allocated -= size
            if not bufs:
                del self._free[size]
            if self._allocated + need <= self.max_bytes:
                return

    def _take_buffer(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of `nbytes`: free list, new allocation, or by evicting LRU entries."""
        while True:
            free = self._free.get(nbytes)
            if free:
                buf = free.pop()
                self._used += nbytes
                return buf
            if self._allocated + nbytes > self.max_bytes:
                self._drop_free_other_than(nbytes, nbytes)
            if self._allocated + nbytes <= self.max_bytes:
                buf = self._alloc(nbytes)
                self._allocated += nbytes
                self._used += nbytes
                return buf
            if not self._evict_one():
                return None

    def _evict_one(self) -> bool:
        for key, entry in self._entries.items():  # oldest first
            if entry.refs == 0:
                del self._entries[key]
                self._recycle(entry.buf)
                self._s.evictions += 1
                if self._removed is not None:
                    self._removed.append(key)
                return True
        return False

    # ---------------------------------------------------------------- API

    def put(self, key: str, tensor: torch.Tensor, meta: dict[str, str] | None = None) -> bool:
        """Copy `tensor` in under `key`.

        Args:
            key: chunk key (`CacheKey.hex`).
            tensor: the chunk, any shape/dtype/strides, on any device.
            meta: string metadata kept beside the chunk; default none.

        Returns:
            True when stored (or already present), False when it cannot fit even after evicting
            every unheld entry.
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
        """Store a chunk written in place: `fill(dst)` writes a pooled, contiguous `dst` of
        `shape` and `dtype` (e.g. a gather kernel straight out of the paged cache: one copy, no
        allocation). Same return as `put`; if `fill` returns False or raises, nothing is stored
        (a raise counts as an error and propagates)."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return True
            if nbytes > self.max_bytes:
                self._s.rejected += 1
                return False
            buf = self._take_buffer(nbytes)
            if buf is None:
                self._s.rejected += 1
                return False
            entry = _Entry(buf, dtype, tuple(shape), dict(meta or {}))
            try:
                filled = fill(entry.view())
            except Exception:
                self._recycle(buf)
                self._s.errors += 1
                raise
            if filled is False:  # the source had nothing after all (e.g. a damaged disk file)
                self._recycle(buf)
                return False
            self._entries[key] = entry
            return True

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """A copy of the chunk (into `out` when given), or None; touches LRU.

        Args:
            key: chunk key.
            out: destination of the chunk's shape and dtype (any device); default None
                allocates a new CPU tensor.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._s.misses += 1
                return None
            self._entries.move_to_end(key)
            self._s.hits += 1
            src = entry.view()
            if out is None:
                return src.clone()
            if tuple(out.shape) != entry.shape or out.dtype != entry.dtype:
                raise ValueError(
                    f"out: expected shape {entry.shape} dtype {entry.dtype}, "
                    f"got {tuple(out.shape)} {out.dtype}"
                )
            out.copy_(src)
            return out

    def hold(self, key: str, count: bool = False) -> torch.Tensor | None:
        """The pooled tensor itself, protected from eviction until `release(key)`; touches LRU.

        Args:
            key: chunk key.
            count: count the lookup in hits/misses (`acquire` does); default False, for
                internal holds such as the manager's hand-over to the disk writer.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._s.misses += count
                return None
            self._entries.move_to_end(key)
            self._s.hits += count
            entry.refs += 1
            return entry.view()

    def release(self, key: str, tensor: torch.Tensor | None = None) -> None:
        """Drop one hold taken by `hold(key)`.

        Args:
            key: the held key.
            tensor: the tensor `hold` returned; default None. Only needed to tell two holds
                apart when the key was removed and re-put while held.
        """
        with self._lock:
            entry = self._held_entry(key, tensor)
            if entry is None:
                raise KeyError(f"release: {key!r} is not held")
            entry.refs -= 1
            if entry.dead and entry.refs == 0:
                dead = self._dead[key]
                dead.remove(entry)
                if not dead:
                    del self._dead[key]
                self._recycle(entry.buf)

    def _held_entry(self, key: str, tensor: torch.Tensor | None) -> _Entry | None:
        ptr = None if tensor is None else tensor.data_ptr()
        candidates = [self._entries[key]] if key in self._entries else []
        candidates += self._dead.get(key, [])
        for entry in candidates:
            if entry.refs > 0 and (ptr is None or entry.buf.data_ptr() == ptr):
                return entry
        return None

    @contextmanager
    def acquire(self, key: str) -> Iterator[torch.Tensor | None]:
        """Context manager: the pooled tensor (or None on a miss), unevictable inside the block.

        The tensor is valid only inside the block: afterwards its buffer may hold another chunk.
        """
        t = self.hold(key, count=True)
        try:
            yield t
        finally:
            if t is not None:
                self.release(key, t)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def meta(self, key: str) -> dict[str, str] | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else dict(entry.meta)

    def remove(self, key: str) -> bool:
        """Drop `key`; a held entry's buffer is recycled on its last release. True if present."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._retire(key, entry)
            return True

    def clear(self) -> None:
        """Drop every entry and every free buffer (held buffers go on their last release)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                self._retire(key, entry)
            self._entries.clear()
            for size, bufs in self._free.items():
                self._allocated -= size * len(bufs)
            self._free.clear()

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self._s.hits,
                "misses": self._s.misses,
                "entries": len(self._entries),
                "bytes": self._used,
                "pool_bytes": self._allocated,
                "evictions": self._s.evictions,
                "rejected": self._s.rejected,
                "errors": self._s.errors,
                "held": sum(e.refs > 0 for e in self._entries.values()) + sum(map(len, self._dead.values())),
            }

    def track_removals(self) -> None:
        """Start recording the keys that leave the tier (see `take_removed`)."""
        with self._lock:
            if self._removed is None:
                self._removed = []

    def take_removed(self) -> list[str]:
        """Keys that left the tier since the last call (empty unless `track_removals()`)."""
        with self._lock:
            if not self._removed:
                return []
            out, self._removed = self._removed, []
            return out

    def _retire(self, key: str, entry: _Entry) -> None:
        if self._removed is not None:
            self._removed.append(key)
        if entry.refs > 0:
            entry.dead = True
            self._dead.setdefault(key, []).append(entry)
        else:
            self._recycle(entry.buf)
