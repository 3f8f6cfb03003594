"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model and the torch thread count (what a CSV row records)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{threads} threads"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{threads} threads"


def work_dir(prefix: str) -> Path:
    """A fresh temporary folder for one benchmark run (engines' temp and cache folders, chunk
    files: often gigabytes), removed when the process exits; `LMCT_BENCH_KEEP=1` keeps it (its
    path is printed then)."""
    import atexit
    import os
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("LMCT_BENCH_KEEP") == "1":
        print(f"work folder kept: {work}")
    else:
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path`, writing the header when the file is new."""
    import csv

    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")



def resident_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of the file `path` in the page cache: mmap(2) + mincore(2), Linux."""
    import ctypes
    import mmap
    import os

    size = path.stat().st_size
    page = os.sysconf("SC_PAGE_SIZE")
    n = (size + page - 1) // page
    if n == 0:
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in vec), n
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def evict_from_page_cache(paths: list[Path]) -> float:
    """Write `paths` back and drop them from the page cache (fsync, then POSIX_FADV_DONTNEED: no
    root needed), so the next read comes from the device. Returns the fraction of their pages
    still resident afterwards (mincore), for the caller to report: 0.0 means fully cold."""
    import os

    resident = total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        r, t = resident_pages(p)
        resident, total = resident + r, total + t
    return resident / total if total else 0.0
