"""GB/s of the paged KV copies (bytes read + bytes written) beside a plain contiguous copy of the
same bytes on the same device in the same run (the ceiling).

GPU: Triton launchers and torch twins, timed with `triton.testing.do_bench` (median); plus
GPU -> pinned CPU and back against a plain pinned copy. CPU: the torch twin (the CPU production
path) against memcpy, timed by repeated runs (median), each rep interleaved with a ceiling rep so
a noisy neighbour hurts both alike. The interpreter is not a production path and is not timed.

    PYTHONPATH=. python bench/bench_paged_copy.py [--quick]

Prints a table and appends one CSV row per measurement to bench/results_paged_copy.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from lmcache_triton.kernels import paged_copy, reference
from lmcache_triton.kernels.geometry import allocate_paged_cache, geometry_for_tensor


@dataclass(frozen=True)
class Shape:
    name: str
    L: int
    B: int
    H: int
    N: int
    C: int
    tokens: int
    layout: str = "LBHNC"
    dtype: torch.dtype = torch.bfloat16


SHAPES = [
    Shape("llama3.1-8b", L=32, B=2000, H=8, N=16, C=256, tokens=256),
    Shape("small", L=4, B=256, H=2, N=16, C=128, tokens=64),
]
QUICK_SHAPES = [
    Shape("llama3.1-8b", L=32, B=200, H=8, N=16, C=256, tokens=256),
    Shape("small", L=4, B=64, H=2, N=16, C=128, tokens=64),
]


def _time_cpu_pair(fn, ceiling, reps: int) -> tuple[float, float]:
    fn(), ceiling()  # warm-up: page faults, allocator
    a, b = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ceiling()
        b.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def _time_gpu(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median") / 1e3


def run(shapes: list[Shape], device: str, reps: int, csv_path: Path) -> list[dict]:
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows = [r for s in shapes for r in _bench_shape(s, device, dev_name, reps)]
    _print(rows)
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return rows


def _bench_shape(s: Shape, device: str, dev_name: str, reps: int) -> list[dict]:
    rows = []
    cache5d = allocate_paged_cache(s.layout, s.L, s.B, s.H, s.N, s.C, s.dtype, device)
    flat, geom = geometry_for_tensor(cache5d)
    flat.view(torch.int8).random_(-128, 127)
    K = s.tokens // s.N
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(s.B, generator=g)[:K].to(device)
    slots = (ids[:, None] * s.N + torch.arange(s.N, device=device)[None, :]).reshape(-1)
    chunk = torch.empty(geom.chunk_shape(K), dtype=s.dtype, device=device)
    toks = torch.empty((2, s.L, s.tokens, s.H, s.C // 2), dtype=s.dtype, device=device)
    nbytes = chunk.numel() * chunk.element_size()
    src_plain = torch.empty(nbytes, dtype=torch.int8, device=device).random_(-128, 127)
    dst_plain = torch.empty_like(src_plain)
    ceiling = lambda: dst_plain.copy_(src_plain)

    ops = {
        "page gather": lambda impl: lambda: impl[0](flat, geom, ids, chunk),
        "page scatter": lambda impl: lambda: impl[1](chunk, flat, geom, ids),
        "token gather": lambda impl: lambda: impl[2](flat, geom, slots, toks),
        "token scatter": lambda impl: lambda: impl[3](toks, flat, geom, slots),
    }
    impls = {
        "torch twin": (
            reference.paged_to_chunk_ref,
            reference.chunk_to_paged_ref,
            reference.paged_to_tokens_ref,
            reference.tokens_to_paged_ref,
        )
    }
    if device == "cuda":
        impls["triton"] = (
            paged_copy.paged_to_chunk,
            paged_copy.chunk_to_paged,
            paged_copy.paged_to_tokens,
            paged_copy.tokens_to_paged,
        )
    shape_desc = f"{s.name} L{s.L} B{s.B} H{s.H} N{s.N} C{s.C} {s.layout} {str(s.dtype)[6:]} T{s.tokens}"
    for op, make in ops.items():
        for impl_name, impl in impls.items():
            fn = make(impl)
            if device == "cuda":
                t, tc = _time_gpu(fn), _time_gpu(ceiling)
            else:
                t, tc = _time_cpu_pair(fn, ceiling, reps)
            rows.append(_row(dev_name, shape_desc, op, impl_name, 2 * nbytes / t, 2 * nbytes / tc))
    if device == "cuda":
        # Offload path: gather on the GPU, then to pinned host memory (and back), against a plain
        # pinned copy of the same bytes. Counted as bytes moved over the link, once.
        pinned = torch.empty(chunk.shape, dtype=s.dtype, pin_memory=True)
        d2h = lambda: (
            paged_copy.paged_to_chunk(flat, geom, ids, chunk),
            pinned.copy_(chunk, non_blocking=True),
        )
        h2d = lambda: (
            chunk.copy_(pinned, non_blocking=True),
            paged_copy.chunk_to_paged(chunk, flat, geom, ids),
        )
        plain_d2h = lambda: pinned.copy_(chunk, non_blocking=True)
        plain_h2d = lambda: chunk.copy_(pinned, non_blocking=True)
        for op, fn, ref in (("gather->pinned", d2h, plain_d2h), ("pinned->scatter", h2d, plain_h2d)):
            t, tc = _time_gpu(fn), _time_gpu(ref)
            rows.append(_row(dev_name, shape_desc, op, "triton+copy", nbytes / t, nbytes / tc))
    return rows


def _row(dev: str, shape: str, op: str, impl: str, gbps: float, ceiling_gbps: float) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bench": "paged_copy",
        "shape": shape,
        "op": op,
        "impl": impl,
        "gbps": round(gbps / 1e9, 2),
        "ceiling_gbps": round(ceiling_gbps / 1e9, 2),
        "frac_of_ceiling": round(gbps / ceiling_gbps, 3),
    }


def _print(rows: list[dict]) -> None:
    print(f"{'shape':<60} {'op':<16} {'impl':<12} {'GB/s':>8} {'ceiling':>8} {'frac':>6}")
    for r in rows:
        print(
            f"{r['shape']:<60} {r['op']:<16} {r['impl']:<12} {r['gbps']:>8.2f} {r['ceiling_gbps']:>8.2f}"
            f" {r['frac_of_ceiling']:>6.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small caches, few reps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="CPU reps (default 25, quick 7)")
    p.add_argument("--csv", type=Path, default=Path(__file__).with_name("results_paged_copy.csv"))
    a = p.parse_args()
    reps = a.reps or (7 if a.quick else 25)
    run(QUICK_SHAPES if a.quick else SHAPES, a.device, reps, a.csv)


if __name__ == "__main__":
    main()
