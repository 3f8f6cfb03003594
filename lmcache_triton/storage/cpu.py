"""CPU-memory tier: a byte-bounded LRU of KV chunks held in one arena (pinned when CUDA).

Primitives:
  `put(key, tensor, meta)`   copy a chunk in; False when it cannot fit even after eviction.
  `put_fill(key, dtype, shape, fill, meta)`  the same, written in place by `fill(dst)`.
  `get(key, out=None)`       copy a chunk out (into `out` if given); touches LRU.
  `acquire(key)`             context manager yielding the arena view itself, zero-copy;
                             `hold(key)` / `release(key)` are the same as two calls.
  `reserve(key, dtype, shape)` -> `Reservation`  a block taken under the lock and filled by the
                             caller outside it (a disk read); `publish(r, meta)` makes it an
                             entry, `abort(r)` gives the block back.
  `pretouch()`               allocate the whole bound and fault its pages in on a duty-cycled
                             background thread (unpinned tiers; `wait_pretouch`, `pretouched_bytes`).
  `hugepage_bytes`           slabs backed by transparent huge pages (unpinned, `hugepages=True`).
  `contains`, `meta`, `remove`, `clear`, `keys`, `stats`, `track_removals` / `take_removed`.
  `encoding(key, tensor)`    how a held entry is encoded (`chunk.codec.Encoding`), or None for
                             exact rows. An encoded entry is one `[nbytes]` uint8 buffer holding
                             the codec's parts (`put_fill*`/`reserve` with `encoding=`).
  The arena (slabs, their growth, pre-touch, huge pages) is `storage.cpu_arena.CpuArena`, its
  allocator (`FreeList`, `Slab`) `storage.arena`.

Invariants:
  * The arena's (in full: `storage.cpu_arena`): the bound is cut into slabs allocated lazily as
    the tier fills (or ahead of it, `grow_ahead`; or all at once, `pretouch`), outside the tier's
    lock; bytes of all slabs (`pool_bytes`) never exceed `max_bytes`, and memory is reused in
    place, never handed back to malloc between puts.
  * Entries are views into a slab at offsets aligned to `ALIGN` (512 B). A chunk must fit in one
    slab: a chunk larger than the largest slab is rejected (counted), as is one larger than the
    bound. With uniform chunk shapes (the normal case) the hot path allocates nothing: an evicted
    entry's block is the next put's exact fit.
  * With `grow_ahead()` on (the engine calls it at `register`), a put short of room evicts
    rather than grows.
  * A put that finds no free block grows the arena by a slab that fits it if the bound allows,
    else evicts least recently used unheld entries (freed neighbours coalesce) until a block
    fits. When no run of free and unheld blocks in any slab could ever fit it, nothing is
    evicted and the put is rejected (counted in `rejected`).
  * An entry with a positive hold count is never evicted and its block is never reused; a
    `remove`/`clear` of a held entry unlinks it at once and frees its block on last release.
  * `clear` frees the slabs it leaves empty (slabs with held blocks stay until reused) and stops
    a running `pretouch`.
  * Keys are content addresses: a put of a present key only refreshes recency.
  * Every public method takes one lock (the arena's state is under it too); copies run under it
    (they are memcpy-bound and the engine has one writer thread, so finer locking would buy
    nothing measurable). Slab allocation runs outside it, under a second lock that serializes
    growth.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmcache_triton.chunk.codec import Encoding

from .arena import ALIGN, SLAB_BYTES, round_up
from .cpu_arena import CpuArena


@dataclass
class _Entry:
    buf: torch.Tensor  # [nbytes] uint8 view into a slab
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict[str, str]
    slab: int = 0
    off: int = 0
    size: int = 0  # bytes reserved in the slab: nbytes rounded up to ALIGN
    refs: int = 0
    dead: bool = False  # removed from the index while held; freed on last release
    encoding: Encoding | None = None  # an encoded chunk: `buf` holds its parts (`Encoding`)
    _view: torch.Tensor | None = None

    def view(self) -> torch.Tensor:
        # Cached: two view ops cost ~2 us, a third of a 256 KiB copy.
        if self._view is None:
            self._view = self.buf.view(self.dtype).view(self.shape)
        return self._view


@dataclass
class Reservation:
    """A block of the arena reserved for one chunk, filled by the caller outside the tier's
    lock: never evicted, never reused, not visible to `contains`/`get` until `publish`."""

    key: str
    out: torch.Tensor  # contiguous `[shape]` view of `dtype` into the block: fill this
    _entry: _Entry


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # puts that could not fit
    errors: int = 0


class CpuTier:
    """Byte-bounded LRU of chunk tensors in CPU memory, sub-allocated from one lazily grown arena.

    Args:
        max_bytes: bound on bytes of the arena (all slabs, in use and free); never exceeded.
        pin_memory: allocate page-locked slabs for fast host->device copies; default True
            when CUDA is available.
        slab_bytes: slab size, a power of two >= `ALIGN`; default `SLAB_BYTES` (1 GiB). A chunk
            larger than the largest slab cannot be stored.
        hugepages: advise unpinned slabs `MADV_HUGEPAGE` as they are allocated (see the
            invariants); default False.
    """

    def __init__(
        self, max_bytes: int, pin_memory: bool | None = None, slab_bytes: int = SLAB_BYTES, hugepages: bool = False
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        if slab_bytes < ALIGN or slab_bytes & (slab_bytes - 1):
            raise ValueError(f"slab_bytes: expected a power of two >= {ALIGN}, got {slab_bytes}")
        pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        # Unpinned slabs ask for transparent huge pages (`arena.advise_hugepages`); pinned ones
        # are resident from their allocation, so it would buy nothing there.
        self._arena = CpuArena(int(max_bytes), int(slab_bytes), pin, bool(hugepages) and not pin, self._lock)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._used = 0  # bytes of entries (live or dead-but-held), unrounded
        self._s = _Stats()
        # Entries removed while held: key -> entries, freed on their last release.
        self._dead: dict[str, list[_Entry]] = {}
        # Keys dropped by eviction, remove or clear, oldest first, while a caller wants them
        # (`track_removals()`): the vLLM connector reports them to the scheduler's index.
        self._removed: list[str] | None = None

    # ---------------------------------------------------------------- arena

    # The arena's settings, read by it at each use (`max_bytes`, `pin_memory`, `slab_bytes`,
    # `hugepages`): the tier's attributes are the arena's.

    @property
    def max_bytes(self) -> int:
        """Bound on bytes of the arena (all slabs, in use and free)."""
        return self._arena.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._arena.max_bytes = value

    @property
    def pin_memory(self) -> bool:
        """Slabs are page-locked."""
        return self._arena.pin_memory

    @pin_memory.setter
    def pin_memory(self, value: bool) -> None:
        self._arena.pin_memory = value

    @property
    def slab_bytes(self) -> int:
        """Slab size (a power of two)."""
        return self._arena.slab_bytes

    @slab_bytes.setter
    def slab_bytes(self, value: int) -> None:
        self._arena.slab_bytes = value

    @property
    def hugepages(self) -> bool:
        """Unpinned slabs are advised `MADV_HUGEPAGE` as they are allocated."""
        return self._arena.hugepages

    @hugepages.setter
    def hugepages(self, value: bool) -> None:
        self._arena.hugepages = value

    def _free_block(self, entry: _Entry) -> None:
        self._arena.free(entry.slab, entry.off, entry.size)
        self._used -= entry.buf.numel()

    def pretouch(self, limit: int | None = None) -> bool:
        """Allocate the slabs of the bound and fault their pages in on a background thread, so
        that the first chunks written into the arena take no page faults (`CpuArena.pretouch`:
        its costs, and when it declines). `clear` (and so `StorageHierarchy.close`) stops it.

        Args:
            limit: only the first `limit` bytes (the first ones puts fill); default None: the
                whole bound.

        Returns:
            True when the thread was started.
        """
        return self._arena.pretouch(limit)

    def wait_pretouch(self, timeout: float | None = None) -> bool:
        """Wait for `pretouch`'s thread (tests, benchmarks); True when it is not running."""
        return self._arena.wait_pretouch(timeout)

    def slab_buffers(self) -> list[torch.Tensor]:
        """The allocated slabs' `[size]` uint8 buffers, largest first (diagnostics, tests)."""
        return self._arena.slab_buffers()

    @property
    def hugepage_bytes(self) -> int:
        """Bytes of slabs allocated with the huge-page advice taken (`hugepages`; slabs freed by
        `clear` stay counted)."""
        return self._arena.hugepage_bytes

    @property
    def pretouched_bytes(self) -> int:
        """Bytes of slabs `pretouch` has faulted in (slabs freed by `clear` stay counted)."""
        return self._arena.pretouched_bytes

    def _could_fit(self, size: int) -> bool:
        """Whether some slab has a run of free blocks and unheld entries of `size` bytes."""
        taken = [(e.slab, e.off, e.size, e.refs == 0) for e in self._entries.values()]
        taken += [(e.slab, e.off, 0, False) for dead in self._dead.values() for e in dead]
        return self._arena.could_fit(size, taken)

    def _alloc_evicting(self, size: int) -> tuple[int, int] | None:
        """A block of `size` (rounded) after evicting LRU unheld entries (the caller found no free
        block); None, with nothing evicted, when no slab could fit it even with every unheld
        entry gone."""
        checked = False
        while True:
            for key, entry in self._entries.items():  # noqa: B007 - used after the break; oldest first
                if entry.refs == 0:
                    break
            else:
                return None
            # Evicting a block at least as large surely makes room (the steady state with uniform
            # chunks): only otherwise check, once, that evicting can succeed at all, so a put
            # that cannot fit evicts nothing. Holds cannot change while we hold the lock.
            if not checked and entry.size < size:
                if not self._could_fit(size):
                    return None
                checked = True
            del self._entries[key]
            self._free_block(entry)
            self._s.evictions += 1
            if self._removed is not None:
                self._removed.append(key)
            got = self._arena.alloc(size)
            if got is not None:
                return got

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
        """Store a chunk written in place: `fill(dst)` writes a contiguous arena view `dst` of
        `shape` and `dtype` (e.g. a gather kernel straight out of the paged cache: one copy, no
        allocation). Same return as `put`; if `fill` returns False or raises, nothing is stored
        (a raise counts as an error and propagates)."""
        return self._put_fill(key, dtype, shape, fill, meta, hold=False) is not None

    def put_fill_held(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        fill: Callable[[torch.Tensor], object],
        meta: dict[str, str] | None = None,
        encoding: Encoding | None = None,
    ) -> torch.Tensor | None:
        """`put_fill`, and a hold on the entry taken under the same lock: the arena view, held
        until `release(key, view)` (no other thread can evict it between the put and the hold),
        or None when nothing was stored. A present key is held as it is.

        Args:
            encoding: the chunk is encoded (`dtype` uint8, `shape` `(encoding.nbytes,)`);
                default None: token rows as they are.
        """
        return self._put_fill(key, dtype, shape, fill, meta, hold=True, encoding=encoding)

    def _put_fill(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        fill: Callable[[torch.Tensor], object],
        meta: dict[str, str] | None,
        hold: bool,
        encoding: Encoding | None = None,
    ) -> torch.Tensor | None:
        """The stored entry's view (held when `hold`), or None."""
        _check_encoded(dtype, shape, encoding)
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(ALIGN, round_up(nbytes, ALIGN))
        while True:
            with self._lock:
                got = self._place(key, nbytes, size)
                if isinstance(got, tuple):
                    entry = self._fill(key, got, nbytes, size, dtype, shape, fill, meta, encoding)
                elif isinstance(got, bool):
                    entry = self._entries[key] if got else None
                else:
                    entry = None
                if not isinstance(got, int) or isinstance(got, bool):  # placed, present or refused
                    if entry is None:
                        return None
                    entry.refs += hold
                    return entry.view()
            self._arena.grow(got)  # outside the lock; then retry (another thread may have raced us)

    def _place(self, key: str, nbytes: int, size: int) -> tuple[int, int] | bool | int:
        """Where a chunk of `size` reserved bytes for `key` goes (caller holds `_lock`):
        `(slab, offset)` of a block taken for it; True when `key` is present (its recency
        refreshed); False when it cannot fit (counted); an int: the slab to grow first (outside
        the lock), then ask again. (A plain method, not a context manager: that cost 4 us a put,
        25% of a 256 KiB put.)"""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        if nbytes > self.max_bytes or size > self._arena.largest:
            self._s.rejected += 1
            return False
        arena = self._arena
        got = arena.alloc(size)
        if got is not None:
            arena.grow_behind()
            return got
        grow = arena.slab_to_grow(size)
        if grow is not None and arena.headroom:
            # Growing ahead: the caller (a store in vLLM's step, under the engine's lock) never
            # pins a slab itself while the background grow runs: it evicts, else is refused.
            arena.grow_behind()
            got = self._alloc_evicting(size)
            if got is not None:
                return got
            if arena.growing:
                self._s.rejected += 1
                return False
        if grow is not None:
            return grow
        got = self._alloc_evicting(size)
        if got is None:
            self._s.rejected += 1
            return False
        return got

    def grow_ahead(self, headroom: int | None = None) -> None:
        """Keep `headroom` bytes of allocated free arena ahead of the puts (`CpuArena.grow_ahead`),
        so that a put never allocates (pins) a slab in its own thread while the tier can make
        room otherwise: a put that finds no free block then evicts; when nothing unheld could
        make room it is refused (a future miss, counted) while the background grow runs; it
        grows the arena itself only when no background grow could be started (free bytes above
        the headroom but fragmented).

        Args:
            headroom: bytes; default None: `slab_bytes`; 0 turns growing ahead off.
        """
        self._arena.grow_ahead(headroom)

    def wait_growth(self, timeout: float | None = None) -> bool:
        """Wait for the background grows (tests, shutdown); True when none is running."""
        return self._arena.wait_growth(timeout)

    def reserve(
        self, key: str, dtype: torch.dtype, shape: tuple[int, ...], encoding: Encoding | None = None
    ) -> Reservation | None:
        """Take a block for a chunk the caller fills outside the tier's lock (a disk read of
        milliseconds must not stall the loads and stores of other threads).

        Args:
            encoding: the chunk is encoded (`dtype` uint8, `shape` `(encoding.nbytes,)`: its
                parts as a slow tier holds them); default None: token rows.

        Returns:
            A `Reservation` (fill `r.out`, then `publish(r, meta)` or `abort(r)`), or None when
            the key is present already or the chunk cannot fit (counted in `rejected`).
        """
        _check_encoded(dtype, shape, encoding)
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(ALIGN, round_up(nbytes, ALIGN))
        while True:
            with self._lock:
                got = self._place(key, nbytes, size)
                if isinstance(got, tuple):
                    slab, off = got
                    self._used += nbytes
                    entry = _Entry(self._arena.view(slab, off, nbytes), dtype, tuple(shape), {}, slab, off, size)
                    entry.encoding = encoding
                    return Reservation(key, entry.view(), entry)
                if isinstance(got, bool):
                    return None
            self._arena.grow(got)

    def publish(self, r: Reservation, meta: dict[str, str] | None = None) -> bool:
        """Make a filled reservation an entry (most recently used). False, with the block given
        back, when the key was put meanwhile by another thread (that copy is kept)."""
        with self._lock:
            if r.key in self._entries:
                self._free_block(r._entry)
                return False
            r._entry.meta = dict(meta or {})
            self._entries[r.key] = r._entry
            return True

    def abort(self, r: Reservation) -> None:
        """Give back a reservation's block (the fill failed: nothing is stored)."""
        with self._lock:
            self._free_block(r._entry)

    def _fill(
        self, key: str, got: tuple[int, int], nbytes: int, size: int, dtype: torch.dtype,
        shape: tuple[int, ...], fill: Callable[[torch.Tensor], object], meta: dict[str, str] | None,
        encoding: Encoding | None = None,
    ) -> _Entry | None:
        slab, off = got
        buf = self._arena.view(slab, off, nbytes)  # `_place` hands out blocks of allocated slabs only
        self._used += nbytes
        entry = _Entry(buf, dtype, tuple(shape), dict(meta or {}), slab, off, size, encoding=encoding)
        try:
            filled = fill(entry.view())
        except Exception:
            self._free_block(entry)
            self._s.errors += 1
            raise
        if filled is False:  # the source had nothing after all (e.g. a damaged disk file)
            self._free_block(entry)
            return None
        self._entries[key] = entry
        return entry

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
        """The arena view itself, protected from eviction until `release(key)`; touches LRU.

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
                self._free_block(entry)

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
        """Context manager: the arena view (or None on a miss), unevictable inside the block.

        The tensor is valid only inside the block: afterwards its memory may hold another chunk.
        """
        t = self.hold(key, count=True)
        try:
            yield t
        finally:
            if t is not None:
                self.release(key, t)

    def encoding(self, key: str, tensor: torch.Tensor | None = None) -> Encoding | None:
        """How the entry of `key` is encoded, or None (exact rows, or no such entry).

        Args:
            tensor: the view `hold` returned; default None (the live entry). Tells a held entry
                apart from one put again under the same key after a `remove`.
        """
        with self._lock:
            if tensor is None:
                entry = self._entries.get(key)
            else:
                entry = self._held_entry(key, tensor)
            return None if entry is None else entry.encoding

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def meta(self, key: str) -> dict[str, str] | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else dict(entry.meta)

    def remove(self, key: str) -> bool:
        """Drop `key`; a held entry's block is freed on its last release. True if present."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._retire(key, entry)
            return True

    def clear(self) -> None:
        """Drop every entry and free the slabs left empty (held blocks go on their last release);
        stops a running `pretouch`."""
        self._arena.stop_pretouch()
        with self._lock:
            for key, entry in list(self._entries.items()):
                self._retire(key, entry)
            self._entries.clear()
            self._arena.release_empty()
            self._arena.grow_behind()

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
                "pool_bytes": self._arena.allocated,
                "evictions": self._s.evictions,
                "rejected": self._s.rejected,
                "errors": self._s.errors + self._arena.errors,
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
            self._free_block(entry)


def _check_encoded(dtype: torch.dtype, shape: tuple[int, ...], encoding: Encoding | None) -> None:
    if encoding is not None and (dtype != torch.uint8 or tuple(shape) != (encoding.nbytes,)):
        raise ValueError(f"encoding: an encoded entry is uint8 ({encoding.nbytes},), got {dtype} {tuple(shape)}")
