"""The worker's store/load path on CUDA, end to end, on a vLLM-shaped cache (no vLLM needed).

The cache is built the way vLLM 0.32 builds one: ONE raw byte buffer, viewed as bf16 in the
physical order L, B, N, H, C (`LBNHC`), handed over as per-layer `[B, H, N, C]` views. The
engine (`KVCacheEngine`) stores 256-token chunks into a pinned CPU tier and loads them back,
exactly as the connector's worker does (`store` in wait_for_save, `load` in start_load_kv).

Reported (GB/s = bytes of KV moved across PCIe, one direction):
* offload: `engine.store` of N chunks, first call to last byte in pinned memory;
  - against a plain pinned `copy_` of the same bytes (one contiguous device->host copy), and
  - against per-block copies the way vLLM's native CPU offloading moves KV (one
    cudaMemcpyAsync per (layer, 16-token block), replayed from a CUDA graph so Python
    overhead does not count against it);
* load: `engine.load` of the same chunks into other blocks, checked bit-exact;
* compute slow-down: a bf16 matmul loop on the compute stream, alone and with `--step-chunks`
  chunks stored after every step's matmuls (the stores of step k overlap step k+1's compute);
  with more chunks per step than store staging buffers (`--staging-slots`), a step's last
  gathers wait for earlier copy-outs and the compute stream inherits that wait;
* host time per `store` call (no host synchronisation in the step path);
* JIT compiles of the copy kernels after `register` (its warm-up must have compiled all: 0).

`--cpu-codec int8|int4` (issue 20): the engine stores with a lossy `cpu_codec` (fused gather +
quantize on the gather stream, the encoded bytes over PCIe and in pinned memory) and loads with
the fused dequantize + scatter; GB/s are then effective: the decoded KV bytes per second (the
plain copies still move the decoded size), and the load is checked against the codec's own
decode of the source rows instead of bit-exact.

    PYTHONPATH=. python bench/bench_transfers_gpu.py [--chunks 64] [--step-chunks 32]
        [--staging-slots 4] [--cpu-codec exact] [--csv PATH]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, device_name  # noqa: E402

from lmcache_triton.engine import KVCacheEngine  # noqa: E402
from lmcache_triton.kernels.geometry import LAYOUTS  # noqa: E402
from lmcache_triton.storage.cpu import CpuTier  # noqa: E402
from lmcache_triton.storage.hierarchy import StorageHierarchy  # noqa: E402

L, H, N, D = 32, 8, 16, 128  # Llama-3.1-8B: 32 layers, 8 KV heads, head 128; 16-token blocks
C = 2 * D  # a token row of one head: K then V
CHUNK_TOKENS = 256
BLOCKS_PER_CHUNK = CHUNK_TOKENS // N
DTYPE = torch.bfloat16


def vllm_like_cache(num_blocks: int, layout: str = "LBNHC") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One int8 buffer, typed and permuted into per-layer `[B, H, N, C]` views."""
    order = LAYOUTS[layout]
    logical = (L, num_blocks, H, N, C)
    physical_shape = [logical[a] for a in order]
    nbytes = torch.Size(physical_shape).numel() * DTYPE.itemsize
    raw = torch.empty(nbytes, dtype=torch.int8, device="cuda")
    c5 = raw.view(DTYPE).view(physical_shape).permute([order.index(a) for a in range(5)])
    c5.view(torch.int16).random_(-32768, 32767)  # any bit pattern: copies must be bit-exact
    return c5, [c5[i] for i in range(L)]


def cuda_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def jit_entries() -> int:
    """Compiled variants of the copy kernels in Triton's JIT cache (every device)."""
    from lmcache_triton.kernels import paged_copy

    names = ("_paged_to_tokens_kernel", "_tokens_to_paged_kernel", "_paged_to_chunk_kernel", "_chunk_to_paged_kernel")
    return sum(len(c[0]) for n in names for c in getattr(paged_copy, n).device_caches.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=64, help="chunks per measurement (32 MiB each)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--step-chunks", type=int, default=1, help="chunks stored per compute step")
    ap.add_argument("--staging-slots", type=int, default=4, help="the engine's store staging buffers")
    ap.add_argument("--cpu-codec", default="exact", choices=["exact", "int8", "int4"],
                    help="the engine's cpu_codec (lossy: fused quantize on store, dequantize on load)")
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_name("results_transfers_gpu.csv"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_transfers_gpu.py needs a CUDA device")
    n = args.chunks
    num_blocks = 2 * n * BLOCKS_PER_CHUNK + 64
    c5, views = vllm_like_cache(num_blocks)
    if args.cpu_codec != "exact":
        # Finite values: a lossy round trip is compared, not the bits of NaNs (the chunk, 256
        # tokens, is a multiple of int4's 64-token K groups: the 4-chunk reference groups alike).
        c5.normal_()
    chunk_bytes = L * BLOCKS_PER_CHUNK * H * N * C * DTYPE.itemsize
    total = n * chunk_bytes
    perm = torch.randperm(num_blocks).tolist()
    src_ids = [perm[i * BLOCKS_PER_CHUNK : (i + 1) * BLOCKS_PER_CHUNK] for i in range(n)]
    dst_ids = [perm[(n + i) * BLOCKS_PER_CHUNK : (n + i + 1) * BLOCKS_PER_CHUNK] for i in range(n)]
    digests = [f"{i:064x}" for i in range(n)]

    tier = CpuTier(total + (64 << 20), pin_memory=True)
    # Watermarks 0: `retire()` gives up every held chunk (the reset between reps).
    eng = KVCacheEngine(StorageHierarchy(tier), "ab" * 16, {"model": "bench"}, retire_high=0.0, retire_low=0.0,
                        staging_slots=args.staging_slots, cpu_codec=args.cpu_codec)
    eng.register(views, block_size=N, staging_tokens=CHUNK_TOKENS)  # as the worker does
    compiled_at_register = jit_entries()

    def store_all():
        for d, ids in zip(digests, src_ids, strict=True):
            assert eng.store(d, ids, CHUNK_TOKENS)
        eng.synchronize()

    def reset():
        eng.synchronize()
        eng.poll()
        eng.ack_retired(eng.retire())

    store_all()  # warm-up: kernel compile, pinned buffers
    reset()
    t_store = []
    for _ in range(args.reps):
        t_store.append(cuda_time(store_all))
        reset()

    # Host cost of one store call (no sync inside): time the submission loop alone.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for d, ids in zip(digests, src_ids, strict=True):
        eng.store(d, ids, CHUNK_TOKENS)
    host_per_store = (time.perf_counter() - t0) / n
    eng.synchronize()

    # Loads (the chunks are held now) into other blocks, then a bit-exact check.
    def load_all():
        for d, ids in zip(digests, dst_ids, strict=True):
            assert eng.load(d, ids)
        eng.synchronize()

    load_all()
    t_load = [cuda_time(load_all) for _ in range(args.reps)]
    flat_src = torch.cat([c5[:, ids] for ids in src_ids[:4]], dim=1)
    flat_dst = torch.cat([c5[:, ids] for ids in dst_ids[:4]], dim=1)
    if args.cpu_codec != "exact":  # lossy: what the codec's own round trip of the rows gives
        from lmcache_triton.chunk.codec import get_codec

        codec = get_codec(args.cpu_codec)
        rows = flat_src.permute(0, 1, 3, 2, 4).reshape(L, -1, H, 2, C // 2).permute(3, 0, 1, 2, 4).contiguous()
        back = torch.empty_like(rows)
        codec.decode(dict(codec.encode(rows)), back)
        flat_src = back.permute(1, 2, 3, 0, 4).reshape(L, -1, N, H, C).permute(0, 1, 3, 2, 4)
    exact = torch.equal(flat_src.view(torch.int16), flat_dst.view(torch.int16))

    # Ceiling 1: one plain device->pinned copy of the same bytes.
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(dev, non_blocking=True)
    t_plain = [cuda_time(lambda: pinned.copy_(dev, non_blocking=True)) for _ in range(args.reps)]
    t_plain_h2d = [cuda_time(lambda: dev.copy_(pinned, non_blocking=True)) for _ in range(args.reps)]

    # Peer: one cudaMemcpyAsync per (layer, block), as vLLM's native CPU offloading does,
    # captured once per chunk in a CUDA graph and replayed for every chunk.
    blk = pinned[: chunk_bytes].view(DTYPE).view(L, BLOCKS_PER_CHUNK, N, H, C)
    phys = c5.permute(0, 1, 3, 2, 4)  # back to physical L, B, N, H, C: one block = one run
    def copy_blocks():
        for layer in range(L):
            for j, b in enumerate(src_ids[0]):
                blk[layer, j].copy_(phys[layer, b], non_blocking=True)

    peer = "per-block cudaMemcpyAsync (graph)"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            copy_blocks()

        def per_block():
            for _ in range(n):
                graph.replay()

        per_block()
    except Exception as e:  # capture of host copies refused: time the plain loop instead
        print(f"CUDA graph capture failed ({e}); timing a Python loop of per-block copies")
        peer = "per-block copy_ (python loop)"

        def per_block():
            for _ in range(n):
                copy_blocks()

        per_block()
    t_block = [cuda_time(per_block) for _ in range(args.reps)]

    # Compute slow-down: matmuls alone vs with one chunk stored after each step's compute.
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    out = torch.empty_like(a)
    per_step = 2

    k = max(1, args.step_chunks)

    def compute(stores: bool) -> float:
        """Seconds on the compute stream from the first step's matmuls to the end of the last
        step's (its own stores excluded: only what the stores make later steps wait for)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(0, n, k):  # a step: its matmuls, then its chunks' stores (wait_for_save)
            for _ in range(per_step * min(k, n - i)):
                torch.mm(a, b, out=out)
            if i + k >= n:
                end.record()
            if stores:
                for d, ids in zip(digests[i : i + k], src_ids[i : i + k], strict=True):
                    eng.store(d, ids, CHUNK_TOKENS)
        torch.cuda.synchronize()
        eng.synchronize()
        return start.elapsed_time(end) / 1e3

    reset()
    compute(False)
    slow = []
    for _ in range(args.reps):
        t_a = compute(False)
        t_b = compute(True)
        reset()
        slow.append(t_b / t_a - 1.0)
    t_mm = compute(False)

    gbs = lambda t: total / statistics.median(t) / 1e9
    rows = [
        ("offload: engine.store (gather + D2H on side stream)", gbs(t_store)),
        ("offload ceiling: plain pinned copy_ D2H", gbs(t_plain)),
        (f"offload peer: {peer}", gbs(t_block)),
        ("load: engine.load (H2D + scatter on side stream)", gbs(t_load)),
        ("load ceiling: plain pinned copy_ H2D", gbs(t_plain_h2d)),
    ]
    name = device_name("cuda")
    if args.cpu_codec != "exact":
        rows = [(f"{m} [{args.cpu_codec}, effective]", v) if m.split(":")[0] in ("offload", "load") else (m, v)
                for m, v in rows]
    print(f"{name} | torch {torch.__version__} | {n} chunks x {chunk_bytes / 2**20:.0f} MiB, LBNHC bf16"
          f" | cpu_codec {args.cpu_codec}")
    for label, v in rows:
        print(f"{label:58s} {v:8.2f} GB/s")
    print(f"{'offload / plain pinned copy':58s} {rows[0][1] / rows[1][1]:8.2f}")
    print(f"{'offload / per-block copies':58s} {rows[0][1] / rows[2][1]:8.2f}")
    print(f"{'load / plain pinned copy':58s} {rows[3][1] / rows[4][1]:8.2f}")
    print(f"{'load bit-exact' if args.cpu_codec == 'exact' else 'load == the codec round trip':58s} {exact}")
    print(f"{'host time per store call (us)':58s} {host_per_store * 1e6:8.1f}")
    label = f"matmul loop alone (ms, {n * per_step} x 8192^3 bf16)"
    print(f"{label:58s} {t_mm * 1e3:8.1f}")
    label = f"compute slow-down, {k} stores/step, {args.staging_slots} staging (median)"
    print(f"{label:58s} {statistics.median(slow) * 100:7.2f}%")
    new_compiles = jit_entries() - compiled_at_register
    print(f"{'copy-kernel JIT compiles after register':58s} {new_compiles:8d}")
    stamp = datetime.date.today().isoformat()
    fields = ["date", "device", "torch", "measure", "value", "unit"]
    csv_rows = [dict(date=stamp, device=name, torch=torch.__version__, measure=m, value=f"{v:.3f}", unit="GB/s")
                for m, v in rows]
    csv_rows += [
        dict(date=stamp, device=name, torch=torch.__version__, measure="host us per store",
             value=f"{host_per_store * 1e6:.1f}", unit="us"),
        dict(date=stamp, device=name, torch=torch.__version__,
             measure=f"compute slow-down with stores ({k}/step, {args.staging_slots} staging)",
             value=f"{statistics.median(slow) * 100:.2f}", unit="%"),
        dict(date=stamp, device=name, torch=torch.__version__, measure="JIT compiles after register",
             value=str(new_compiles), unit=""),
        dict(date=stamp, device=name, torch=torch.__version__, measure="load bit-exact", value=str(exact), unit=""),
    ]
    append_csv(args.csv, fields, csv_rows)
    if not exact:
        sys.exit("load was not bit-exact")
    if new_compiles:
        sys.exit(f"{new_compiles} copy kernel(s) compiled after register")


if __name__ == "__main__":
    main()
