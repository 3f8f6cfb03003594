"""Throughput of the CacheBlend kernels: token deviation + selection, and RoPE re-rotation.

GB/s counts bytes read plus bytes written. Each op is reported beside a plain device copy that
moves the same number of bytes in the same run (the ceiling), and on GPU beside the torch twin
run eagerly on the GPU (what a user would otherwise write). On GPU timings are medians from
`triton.testing.do_bench`; on CPU the production path is the torch twin, timed as the median
of repeated runs.

Shapes: 4096 tokens, 8 KV heads, head size 128, bf16 (one layer of a Llama-3-8B-like model);
deviation scores K and V stacked.

    PYTHONPATH=. python bench/bench_blend_kernels.py [--tokens 4096] [--reps 20]

Appends rows (device, versions, date, op, impl, value) to bench/results_blend_kernels.csv, value in GB/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from lmcache_triton.kernels.blend import select_tokens, token_deviation
from lmcache_triton.kernels.reference import (
    rerotate_k_ref,
    select_tokens_ref,
    token_deviation_ref,
)
from lmcache_triton.kernels.rope import rerotate_k, rope_inv_freq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, device_name  # noqa: E402

RESULTS_CSV = Path(__file__).with_name("results_blend_kernels.csv")
CSV_FIELDS = ["device", "versions", "date", "op", "impl", "value"]


def _time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=20, help="CPU repetitions (GPU: do_bench decides)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    t, h, d = args.tokens, args.heads, args.head_size
    torch.manual_seed(0)
    cached = torch.randn(2, t, h, d, device=device).to(dtype)
    fresh = (cached.float() + 0.05 * torch.randn(2, t, h, d, device=device)).to(dtype)
    k = cached[0].clone()
    src = torch.randint(0, 32768, (t,), device=device)
    dst = torch.randint(0, 32768, (t,), device=device)
    inv = rope_inv_freq(d, 500000.0).to(device)
    rope_out = torch.empty_like(k)
    dev = token_deviation(cached, fresh)
    n_sel = select_tokens(dev, args.ratio).numel()
    elt = cached.element_size()

    dev_bytes = 2 * cached.numel() * elt + t * 4  # read cached and fresh, write [T] fp32
    sel_bytes = t * 4 + n_sel * 8  # read [T] fp32, write k int64
    rope_bytes = 2 * k.numel() * elt + 2 * t * 8 + inv.numel() * 4
    copy_dev_src, copy_dev_dst = cached.clone(), torch.empty_like(cached)  # moves 2 * X bytes
    copy_rope_dst = torch.empty_like(k)

    main_impl = "triton" if device == "cuda" else "torch-twin"
    cases = [
        # (op, impl, fn, bytes)
        (
            "deviation+select",
            main_impl,
            lambda: select_tokens(token_deviation(cached, fresh), args.ratio),
            dev_bytes + sel_bytes,
        ),
        ("token_deviation", main_impl, lambda: token_deviation(cached, fresh), dev_bytes),
        ("token_deviation", "copy-same-bytes", lambda: copy_dev_dst.copy_(copy_dev_src), dev_bytes),
        ("select_tokens", "torch-sort-stable", lambda: select_tokens_ref(dev, args.ratio), sel_bytes),
        ("select_tokens", "torch-topk", lambda: torch.sort(torch.topk(dev, n_sel).indices), sel_bytes),
        ("rerotate_k", main_impl, lambda: rerotate_k(k, src, dst, inv_freq=inv, out=rope_out), rope_bytes),
        ("rerotate_k", "copy-same-bytes", lambda: copy_rope_dst.copy_(k), rope_bytes),
    ]
    if device == "cuda":
        cases += [
            ("token_deviation", "torch-eager", lambda: token_deviation_ref(cached, fresh), dev_bytes),
            (
                "rerotate_k",
                "torch-eager",
                lambda: rerotate_k_ref(k, src, dst, inv_freq=inv, out=rope_out),
                rope_bytes,
            ),
        ]

    name = device_name(device)
    versions = f"torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}"
    date = dt.date.today().isoformat()
    print(f"{name} | {versions} | {date}")
    print(
        f"T={t} H={h} D={d} {str(dtype).removeprefix('torch.')}, K+V stacked for deviation, "
        f"ratio {args.ratio} -> {n_sel} tokens"
    )
    print(f"{'op':<18} {'impl':<18} {'ms':>9} {'MB moved':>9} {'GB/s':>8}")
    rows = []
    for op, impl, fn, nbytes in cases:
        ms = _time_ms(fn, device, args.reps)
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"{op:<18} {impl:<18} {ms:9.3f} {nbytes / 1e6:9.2f} {gbs:8.2f}")
        rows.append(dict(device=name, versions=versions, date=date, op=op, impl=impl, value=f"{gbs:.3f}"))

    if not args.no_csv:
        append_csv(RESULTS_CSV, CSV_FIELDS, rows)


if __name__ == "__main__":
    main()
