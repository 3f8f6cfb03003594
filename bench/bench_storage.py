"""Storage benchmark: CPU tier vs memcpy, disk tier vs raw file I/O, chunk hashing tokens/s.

GB/s count bytes read plus bytes written (a 32 MiB copy moves 64 MiB). Each ceiling is measured
in the same run on the same buffers: `dst.copy_(src)` for the CPU tier; open/write/fsync/close
and open/readinto of the same bytes in the same directory for the disk tier. Cold reads drop the
file's pages first (`/proc/sys/vm/drop_caches` when writable, else `posix_fadvise(DONTNEED)` on
the file, which needs no privilege). Medians of repeated runs.

Disk rows come twice: unsigned chunks (xxh3_64 checksum) and authenticated chunks (`chunk_secret`:
keyed BLAKE3 MAC), each against the same raw-file ceiling.

Usage: python bench/bench_storage.py [--dir DIR] [--reps N] [--only disk] [--csv bench/results_storage.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np
import safetensors
import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_triton.hashing import chunk_hashes  # noqa: E402
from lmcache_triton.storage import CpuTier, DiskTier, StorageHierarchy  # noqa: E402

# Llama-3-8B-like chunk: 32 layers x K/V x 16 pages of 16 tokens x 8 KV heads x 128 dims, bf16
# = 256 tokens = 32 MiB. The brief writes it as 32 x 16 x 8 x 16 x 256 (K and V folded into 256).
SHAPES = {
    "llama8b-256tok (32 MiB)": (32, 16, 8, 16, 256),
    "tiny-256tok (256 KiB)": (2, 16, 2, 16, 128),
}


def median_s(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved_s(ceiling_fn, fns: dict, reps: int, warmup: int = 2) -> tuple[float, dict]:
    """Medians with the ceiling timed between the ops, rep by rep: this sandbox's host is shared
    and its bandwidth drifts 2-3x within seconds, so a ceiling timed once up front is unfair."""
    for _ in range(warmup):
        ceiling_fn()
        for fn in fns.values():
            fn()
    ceil, res = [], {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            ceiling_fn()
            ceil.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn()
            res[k].append(time.perf_counter() - t0)
    return statistics.median(ceil), {k: statistics.median(v) for k, v in res.items()}


def drop_caches(paths) -> str:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass
    return "fadvise"


def bench_cpu(shape, reps, rows):
    src = torch.randn(shape).to(torch.bfloat16)
    n = src.numel() * src.element_size()
    dst = torch.empty_like(src)
    tier = CpuTier(4 * n, pin_memory=torch.cuda.is_available())
    counter = iter(range(10**9))

    def put():  # steady state: the tier is full, each put evicts one entry and reuses its buffer
        assert tier.put(f"{next(counter):064x}", src)

    for _ in range(5):
        put()
    last = tier.keys()[-1]
    memcpy, t = interleaved_s(
        lambda: dst.copy_(src),
        {
            "clone": lambda: src.clone(),
            "put": put,
            "get_out": lambda: tier.get(last, out=dst),
            "get_new": lambda: tier.get(last),
        },
        reps,
    )
    alloc_copy, put_s, get_out, get_new = t["clone"], t["put"], t["get_out"], t["get_new"]
    gbs = lambda s: 2 * n / s / 1e9
    ceil = gbs(memcpy)
    rows.append(("cpu", "memcpy (ceiling)", gbs(memcpy), "GB/s", ceil))
    rows.append(("cpu", "clone (alloc+copy, baseline)", gbs(alloc_copy), "GB/s", ceil))
    rows.append(("cpu", "CpuTier.put (evict+reuse)", gbs(put_s), "GB/s", ceil))
    rows.append(("cpu", "CpuTier.get(out=)", gbs(get_out), "GB/s", ceil))
    rows.append(("cpu", "CpuTier.get() (new tensor)", gbs(get_new), "GB/s", ceil))

    # Mixed sizes: full chunks and partial ones (a prompt's last chunk) churn through the full
    # tier, so a put may evict several entries before a block fits. Ceiling: the same copies.
    g = torch.Generator().manual_seed(0)
    flat, flat_dst = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    sizes = [n if i % 2 else int(torch.randint(n // 16, n, (), generator=g)) for i in range(8)]

    def put_mixed():
        for m in sizes:
            assert tier.put(f"{next(counter):064x}", flat[:m])

    def copy_mixed():
        for m in sizes:
            flat_dst[:m].copy_(flat[:m])

    memcpy_m, t = interleaved_s(copy_mixed, {"put": put_mixed}, reps)
    mixed = 2 * sum(sizes) / 1e9
    rows.append(("cpu", "CpuTier.put mixed sizes (evict until fit)", mixed / t["put"], "GB/s", mixed / memcpy_m))


def bench_disk(shape, reps, rows, root: Path):
    src = torch.randn(shape).to(torch.bfloat16)
    n = src.numel() * src.element_size()
    payload = memoryview(src.view(torch.uint8).reshape(-1).numpy())
    raw_dir = root / "raw"
    raw_dir.mkdir()
    tier_dir = root / "tier"
    tier = DiskTier(tier_dir, 1 << 40, queue_size=4)
    auth_dir = root / "auth"
    atier = DiskTier(auth_dir, 1 << 40, queue_size=4, secret="bench secret, 16+ characters")
    counter = iter(range(10**9))

    def raw_write():
        p = raw_dir / f"{next(counter)}.bin"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        mv = payload
        while mv:
            mv = mv[os.write(fd, mv) :]
        os.fsync(fd)
        os.close(fd)

    def writer(t):
        def write():
            t.put(f"{next(counter):064x}", src, {"model": "bench", "layout": "llama8b"})
            t.flush()

        return write

    raw_w, t = interleaved_s(raw_write, {"tier": writer(tier), "auth": writer(atier)}, reps, warmup=1)
    tier_w, auth_w = t["tier"], t["auth"]
    raw_files = sorted(raw_dir.iterdir())
    tier_keys = tier.keys()
    auth_keys = atier.keys()
    buf = torch.empty(n, dtype=torch.uint8)
    bmv = memoryview(buf.numpy())

    def raw_read(p):
        with open(p, "rb", buffering=0) as f:
            mv = bmv
            while mv:
                mv = mv[f.readinto(mv) :]

    def raw_read_pieces(p):  # 2 MiB reads, as the tier does: faster than one big read when cold
        with open(p, "rb", buffering=0) as f:
            for start in range(0, n, 2 << 20):
                mv = bmv[start : start + (2 << 20)]
                while mv:
                    mv = mv[f.readinto(mv) :]

    def timed_reads(fns: dict, cold: bool) -> tuple[dict, str]:
        """Median seconds per read for each `name: (fn, items, dir)`, interleaved item by item so
        the host's drift hits every op alike (as `interleaved_s` does for writes)."""
        ts: dict = {name: [] for name in fns}
        how = "warm"
        for i in range(min(len(items) for _, items, _ in fns.values())):
            for name, (fn, items, where) in fns.items():
                it = items[i]
                if cold:
                    how = drop_caches([it if isinstance(it, Path) else where / f"{it}.safetensors"])
                t0 = time.perf_counter()
                fn(it)
                ts[name].append(time.perf_counter() - t0)
        return {name: statistics.median(v) for name, v in ts.items()}, how

    out = torch.empty_like(src)

    def tier_read(k):  # into a reused buffer, as the manager/engine would (and as raw_read does)
        assert tier.get(k, expect={"layout": "llama8b"}, out=out) is not None

    def tier_read_alloc(k):
        assert tier.get(k, expect={"layout": "llama8b"}) is not None

    def auth_read(k):
        assert atier.get(k, expect={"layout": "llama8b"}, out=out) is not None

    # The engine's prefetch: a disk hit read once, straight into a reserved CPU-arena block.
    arena = CpuTier(2 * n + (1 << 20), pin_memory=False)
    hierarchy = StorageHierarchy(arena, [tier])

    def prefetch(k):
        arena.remove(k)
        assert hierarchy.prefetch(k, expect={"layout": "llama8b"})

    # file write = bytes read from memory + bytes written to the file; same for reads
    gbs = lambda s: 2 * n / s / 1e9
    rows.append(("disk", "raw write+fsync (ceiling)", gbs(raw_w), "GB/s", gbs(raw_w)))
    rows.append(("disk", "DiskTier write (checksum, fsync, rename)", gbs(tier_w), "GB/s", gbs(raw_w)))
    rows.append(("disk", "DiskTier write, authenticated (BLAKE3 MAC)", gbs(auth_w), "GB/s", gbs(raw_w)))
    for cold in (False, True):
        m, how = timed_reads(
            {
                "raw": (raw_read, raw_files, raw_dir),
                "raw_pieces": (raw_read_pieces, raw_files, raw_dir),
                "tier": (tier_read, tier_keys, tier_dir),
                "alloc": (tier_read_alloc, tier_keys, tier_dir),
                "auth": (auth_read, auth_keys, auth_dir),
                "prefetch": (prefetch, tier_keys, tier_dir),
            },
            cold,
        )
        raw_r = min(m["raw"], m["raw_pieces"])  # the ceiling: the faster raw read
        rows.append(("disk", f"raw read, one readinto ({how})", gbs(m["raw"]), "GB/s", gbs(raw_r)))
        rows.append(("disk", f"raw read, 2 MiB pieces ({how})", gbs(m["raw_pieces"]), "GB/s", gbs(raw_r)))
        rows.append(("disk", f"DiskTier.get(out=) verified ({how})", gbs(m["tier"]), "GB/s", gbs(raw_r)))
        rows.append(("disk", f"DiskTier.get() new tensor ({how})", gbs(m["alloc"]), "GB/s", gbs(raw_r)))
        rows.append(("disk", f"DiskTier.get(out=) authenticated ({how})", gbs(m["auth"]), "GB/s", gbs(raw_r)))
        rows.append(("disk", f"StorageHierarchy.prefetch -> CPU ({how})", gbs(m["prefetch"]), "GB/s", gbs(raw_r)))
    tier.close()
    atier.close()


def bench_hash(reps, rows):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 128_256, 4096).tolist()
    s = median_s(lambda: chunk_hashes(toks, 256), max(reps, 200), warmup=20)
    op = "chunk_hashes 4k-token list (incl. list->bytes)"
    rows.append(("hash", op, len(toks) / s / 1e6, "M tok/s", 20.0))
    arr = np.asarray(toks, dtype=np.int64)
    s = median_s(lambda: chunk_hashes(arr, 256), max(reps, 200), warmup=20)
    rows.append(("hash", "chunk_hashes 4k-token int64 ndarray", len(toks) / s / 1e6, "M tok/s", 20.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="directory for disk files (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--only", choices=["disk"], default=None, help="run only the disk-tier rows")
    ap.add_argument("--csv", default=str(Path(__file__).with_name("results_storage.csv")))
    args = ap.parse_args()

    device = f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU)"
    versions = (
        f"python {platform.python_version()}; torch {torch.__version__}; "
        f"safetensors {safetensors.__version__}; xxhash {xxhash.VERSION}; blake3 {blake3.__version__}"
    )
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    root = Path(tempfile.mkdtemp(prefix="bench_storage_", dir=args.dir))
    try:
        for name, shape in SHAPES.items():
            rows = []
            if args.only is None:
                bench_cpu(shape, args.reps, rows)
            sub = root / name.split()[0]
            sub.mkdir()
            bench_disk(shape, args.reps, rows, sub)
            shutil.rmtree(sub)
            results += [(f"{b} {name}", *r) for b, *r in rows]
        if args.only is None:
            rows = []
            bench_hash(args.reps, rows)
            results += [(b, *r) for b, *r in rows]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"device: {device}\nversions: {versions}\ndate: {date}\n")
    print(f"{'bench':<34} {'op':<46} {'value':>9} {'unit':<8} {'ceiling':>9} {'fraction':>8}")
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["device", "versions", "date", "bench", "op", "value", "unit", "ceiling", "fraction"])
        for bench, op, value, unit, ceiling in results:
            frac = value / ceiling
            print(f"{bench:<34} {op:<46} {value:>9.2f} {unit:<8} {ceiling:>9.2f} {frac:>8.2f}")
            nums = [f"{value:.3f}", unit, f"{ceiling:.3f}", f"{frac:.3f}"]
            w.writerow([device, versions, date, f"bench_storage {bench}", op, *nums])


if __name__ == "__main__":
    main()
