"""The CPU tier's arena allocator: slabs of the bound and a best-fit free list in each.

Primitives:
  `FreeList`         offsets within one slab: best fit, coalescing on free.
  `slab_sizes(...)`  how a bound is cut into slabs (power-of-two digits when pinned: torch's
                     caching host allocator rounds every pinned request up to a power of two).
  `Slab`             one slab: its (lazily allocated) buffer and free list.
  `populate(buf)`    fault a buffer's pages in for writing without changing a byte
                     (`madvise(MADV_POPULATE_WRITE)`, Linux >= 5.14); `touch(buf)` writes one
                     byte per page instead (only for memory nobody else sees yet);
                     `available_memory()` how much may be touched.
  `advise_hugepages(buf)`  ask the kernel for transparent huge pages under a slab
                     (`madvise(MADV_HUGEPAGE)`): a first write then faults 2 MiB at a time.

The arena over them (`storage.cpu_arena.CpuArena`) owns the locking and growth, the tier
(`storage.cpu.CpuTier`) the entries; nothing here takes a lock or allocates memory but
`Slab.buf`, which the arena fills.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import sys
import threading
import time
from collections.abc import Callable

import torch

ALIGN = 512  # entry offsets and reservations; a sector, so O_DIRECT reads could land in place
SLAB_BYTES = 1 << 30  # default slab: 32 chunks of 32 MiB, waste per slab < one chunk


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


class FreeList:
    """Best-fit allocator over the offsets `[0, capacity)`, coalescing freed neighbours.

    Sizes are rounded up to `align` (a zero-byte request reserves `align`, so every block has a
    distinct offset). Free blocks are kept sorted by offset in two parallel lists: allocation
    scans them (a handful in practice: chunks are mostly one size), free is a bisect.

    Args:
        capacity: bytes managed; rounded down to `align`.
        align: granularity of offsets and sizes; default `ALIGN`.
    """

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        if align <= 0 or capacity < 0:
            raise ValueError(f"FreeList: expected capacity >= 0 and align > 0, got {capacity}, {align}")
        self.align = align
        self.capacity = capacity // align * align
        self._starts: list[int] = [0] if self.capacity else []
        self._sizes: list[int] = [self.capacity] if self.capacity else []
        self.free_bytes = self.capacity

    def reserve_size(self, nbytes: int) -> int:
        """Bytes a request of `nbytes` reserves."""
        return max(self.align, round_up(nbytes, self.align))

    def best(self, size: int) -> int:
        """Number of the smallest free block of at least `size` (already rounded) bytes, or -1."""
        best, best_size = -1, self.capacity + 1
        for i, s in enumerate(self._sizes):
            if size <= s < best_size:
                best, best_size = i, s
                if s == size:
                    break
        return best

    def fit(self, nbytes: int) -> int | None:
        """Size of the free block `alloc(nbytes)` would cut from, or None."""
        best = self.best(self.reserve_size(nbytes))
        return None if best < 0 else self._sizes[best]

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a block of `reserve_size(nbytes)` bytes, or None when no free block fits."""
        size = self.reserve_size(nbytes)
        best = self.best(size)
        return None if best < 0 else self.take(best, size)

    def block_size(self, i: int) -> int:
        """Bytes of free block number `i` (as `best` numbers them)."""
        return self._sizes[i]

    def take(self, best: int, size: int) -> int:
        """Cut `size` (already rounded) bytes from free block number `best`."""
        off = self._starts[best]
        if self._sizes[best] == size:
            del self._starts[best], self._sizes[best]
        else:
            self._starts[best] += size
            self._sizes[best] -= size
        self.free_bytes -= size
        return off

    def free(self, off: int, nbytes: int) -> None:
        """Return the block `alloc(nbytes)` gave at `off`; raises on a block that is not wholly
        allocated (a double free or a wrong size would corrupt other entries)."""
        size = self.reserve_size(nbytes)
        starts, sizes = self._starts, self._sizes
        i = bisect.bisect_left(starts, off)
        if (
            off < 0
            or off % self.align
            or off + size > self.capacity
            or (i > 0 and starts[i - 1] + sizes[i - 1] > off)
            or (i < len(starts) and off + size > starts[i])
        ):
            raise ValueError(f"FreeList.free: [{off}, {off + size}) is not an allocated block")
        if i > 0 and starts[i - 1] + sizes[i - 1] == off:  # merge with the block before
            i -= 1
            sizes[i] += size
            if i + 1 < len(starts) and starts[i] + sizes[i] == starts[i + 1]:  # and after
                sizes[i] += sizes[i + 1]
                del starts[i + 1], sizes[i + 1]
        elif i < len(starts) and off + size == starts[i]:  # merge with the block after
            starts[i] = off
            sizes[i] += size
        else:
            starts.insert(i, off)
            sizes.insert(i, size)
        self.free_bytes += size

    def blocks(self) -> list[tuple[int, int]]:
        """Free blocks as (offset, size), by offset."""
        return list(zip(self._starts, self._sizes, strict=True))

    def largest(self) -> int:
        return max(self._sizes, default=0)


def slab_sizes(max_bytes: int, slab_bytes: int, pinned: bool) -> list[int]:
    """The arena's slab sizes, largest first: `max_bytes // slab_bytes` full slabs, then the
    remainder rounded down to `ALIGN`, as one slab or (pinned) as its power-of-two digits."""
    full, rest = divmod(int(max_bytes), slab_bytes)
    sizes = [slab_bytes] * full
    rest = rest // ALIGN * ALIGN
    if not pinned:
        return sizes + ([rest] if rest else [])
    bit = slab_bytes
    while bit >= ALIGN:
        if rest & bit:
            sizes.append(bit)
        bit >>= 1
    return sizes


PAGE = mmap.PAGESIZE
# Bytes faulted in per madvise call. MADV_POPULATE_WRITE holds the process's mm lock (for reading)
# for the whole call, and every mmap/munmap of any thread (torch's large tensors in vLLM's forward,
# our own buffers, Python's arenas) waits for it to end: about 1 ms per 4 MiB here (the kernel
# zeroing the pages), so no other thread waits longer than that.
PREFAULT_PIECE = 4 << 20
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux >= 5.14
_madvise_fn: Callable[[int, int, int], int] | None = None
_populate_ok: bool | None = None  # None: not probed yet
_probe_lock = threading.Lock()


def _madvise() -> Callable[[int, int, int], int]:
    global _madvise_fn
    if _madvise_fn is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise_fn = fn
    return _madvise_fn


def whole_pages(addr: int, nbytes: int) -> tuple[int, int]:
    """`[start, end)` of the whole pages inside `[addr, addr + nbytes)` (madvise takes pages)."""
    return round_up(addr, PAGE), (addr + nbytes) // PAGE * PAGE


def _populate_range(addr: int, nbytes: int) -> bool:
    """madvise(MADV_POPULATE_WRITE) over the whole pages inside `[addr, addr + nbytes)`."""
    start, end = whole_pages(addr, nbytes)
    if end <= start:
        return True
    if _madvise()(start, end - start, _MADV_POPULATE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # an older kernel: not supported
        return False
    raise OSError(err, f"madvise(MADV_POPULATE_WRITE): {errno.errorcode.get(err, err)}")


def can_populate() -> bool:
    """Whether `populate` works here (probed once, on a buffer of our own)."""
    global _populate_ok
    with _probe_lock:
        if _populate_ok is None:
            if not sys.platform.startswith("linux"):
                _populate_ok = False
            else:
                probe = torch.empty(4 * PAGE, dtype=torch.uint8)
                try:
                    _populate_ok = _populate_range(probe.data_ptr(), probe.numel())
                except OSError:
                    _populate_ok = False
        return _populate_ok


def populate(buf: torch.Tensor, stop: threading.Event | None = None, duty: float = 1.0) -> bool:
    """Fault in the pages of the contiguous CPU `buf` for writing, `PREFAULT_PIECE` bytes at a
    time, without changing a byte: safe while other threads read and write it. A later write
    then takes no page fault (a first write to a fresh page costs the fault and the kernel's
    zeroing of the page: 2.6x the copy itself, bench/RESULTS.md).

    Args:
        buf: `[n]` uint8, contiguous, on the CPU.
        stop: set it to stop between pieces; default None.
        duty: the share of wall time spent faulting: after each piece the caller sleeps
            `(1 / duty - 1)` times the piece's time (0.5: half of one core at most); default 1.0
            (no sleep).

    Returns:
        False when not done: unsupported here (`can_populate()`), or stopped.
    """
    if not can_populate():
        return False
    addr, n = buf.data_ptr(), buf.numel() * buf.element_size()
    # Pieces on page boundaries: each call populates whole pages only, so an unaligned piece
    # boundary would leave the page across it to a fault.
    start, end = whole_pages(addr, n)
    rest = max(1.0 / duty - 1.0, 0.0) if duty > 0 else 0.0
    for at in range(start, end, PREFAULT_PIECE):
        if stop is not None and stop.is_set():
            return False
        t0 = time.perf_counter()
        _populate_range(at, min(PREFAULT_PIECE, end - at))
        if rest:
            pause = (time.perf_counter() - t0) * rest
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
    return True


_MADV_HUGEPAGE = 14  # <linux/mman.h>


def advise_hugepages(buf: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) over the whole pages of the contiguous CPU `buf`: where the
    kernel's transparent huge pages are "madvise" (the common default) or "always", its 2 MiB
    aligned parts are then backed by huge pages on their first write. A first write into a fresh
    4 KiB page costs a fault per page plus the zeroing (2.6x the copy itself); with huge pages
    one fault per 2 MiB: a 288 MiB first-touch copy took 227-256 ms in 4 KiB pages and 53 ms in
    huge pages on the 2-core VM, against 45 ms into resident memory (bench/RESULTS.md). Changes
    no byte and faults nothing in; call it before the first write.

    Returns:
        True when the kernel took the advice; False where it cannot (no THP in the kernel, not
        Linux, THP "never": the pages stay 4 KiB, nothing else changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    addr, n = buf.data_ptr(), buf.numel() * buf.element_size()
    start, end = whole_pages(addr, n)
    if end <= start:
        return False
    return _madvise()(start, end - start, _MADV_HUGEPAGE) == 0


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what can be touched without swapping or the OOM
    killer), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def touch(buf: torch.Tensor) -> None:
    """Write a zero into every page of the contiguous CPU `buf` (one thread, numpy: torch would
    fault the pages on its intra-op pool, at normal priority). Changes bytes: only for a buffer
    no other thread can see yet."""
    a = buf.view(torch.uint8).view(-1).numpy()
    if a.size:
        a[::PAGE] = 0
        a[-1] = 0  # the last page, when `buf` does not start on a page


class Slab:
    __slots__ = ("size", "buf", "free", "used", "failed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf: torch.Tensor | None = None  # [size] uint8, None until allocated
        self.free = FreeList(size)
        self.used = 0  # blocks handed out (live or held-dead entries)
        self.failed = False  # its allocation failed once: never retried
