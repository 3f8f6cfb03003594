"""CacheBlend token selection: per-token KV deviation (Triton) and top-ratio selection (torch).

CacheBlend (EuroSys 2025) reuses the KV of non-prefix segments and recomputes only the tokens
whose reused KV deviates most from what a full prefill would produce. On a check layer the
engine computes fresh K and V for all tokens and scores each token by

    dev[t] = sum_{s, h, d} (fresh[s, t, h, d] - cached[s, t, h, d]) ** 2    (fp32 accumulation)

the squared L2 distance across all heads of whatever is stacked on `s`: the caller chooses.
`blend.blender.blend_prefill` stacks K and V (`deviation_on="kv"`, the default), or passes K
alone (`"k"`, what LMCache v1's blender scores) or V alone (`"v"`, the paper's and older
LMCache's choice). Squaring keeps the ranking of the L2 norm and saves a sqrt. The `ceil(ratio *
T)` highest-scoring tokens are recomputed in the later layers.

Why K+V by default: measured on a model trained here on a cross-document task
(bench/bench_blend_quality.py, through vLLM; see bench/RESULTS.md), at ratio 0.15 with check
layer 1, K+V kept the most accuracy, K alone a little less and V alone clearly less (the token
that must be recomputed is marked in its layer-1 key -- what the question's query matches -- more
than in its value). Scoring both costs one more read of V at one layer, i.e. nothing measurable.

Tensor parallelism: each rank sees only its own heads, so ranks must all-reduce `dev` (a `[T]`
fp32 sum: exact up to fp32 reassociation) before `select_tokens`, or their selections differ.

Kernel modules import torch and triton only (plus their twins in `kernels/reference.py`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import _check_deviation_args, select_tokens_ref, token_deviation_ref

# Read once, like `@triton.jit` itself: the interpreter is chosen at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["T"])  # one compile serves every prompt length
def _token_deviation_kernel(
    cached_ptr,  # [S, T, H, D] viewed through strides
    fresh_ptr,  # [S, T, H, D] viewed through strides
    out_ptr,  # [T] fp32, contiguous
    S,
    T,
    H,
    D,
    c_ss,
    c_st,
    c_sh,
    c_sd,
    f_ss,
    f_st,
    f_sh,
    f_sd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (t < T)[:, None] & (d < D)[None, :]
    c_tile = t[:, None] * c_st + d[None, :] * c_sd  # [BLOCK_T, BLOCK_D] int64 offsets
    f_tile = t[:, None] * f_st + d[None, :] * f_sd
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # Advance base pointers (64-bit) instead of multiplying the loop counters (int32).
    c_s = cached_ptr
    f_s = fresh_ptr
    for _s in range(0, S):
        c_h = c_s
        f_h = f_s
        for _h in range(0, H):
            x = tl.load(c_h + c_tile, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(f_h + f_tile, mask=mask, other=0.0).to(tl.float32)
            diff = y - x
            acc += diff * diff
            c_h += c_sh
            f_h += f_sh
        c_s += c_ss
        f_s += f_ss
    tl.store(out_ptr + t, tl.sum(acc, axis=1), mask=t < T)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def token_deviation(cached: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 deviation between the cached and the fresh KV of one check layer.

    `dev[t] = sum_{s, h, d} (fresh[s, t, h, d] - cached[s, t, h, d]) ** 2`, accumulated in fp32.
    Any strides are accepted (no copies on CUDA); inputs may differ in dtype.

    Args:
        cached: `[T, H, D]` (K only) or `[S, T, H, D]` (S = 2: K and V stacked, summed over S);
            fp32, fp16 or bf16 (fp64 runs the torch twin in fp64).
        fresh: same shape and device as `cached`.

    Returns:
        `[T]` fp32 deviation, on the inputs' device.
    """
    _check_deviation_args(cached, fresh)
    use_kernel = (cached.is_cuda or _INTERPRET) and all(x.dtype in _KERNEL_DTYPES for x in (cached, fresh))
    if not use_kernel:
        return token_deviation_ref(cached, fresh)
    if _INTERPRET and not cached.is_cuda:
        # The interpreter has no bf16 arithmetic: upcast (exact) on this test-only path.
        cached, fresh = (x.float() if x.dtype == torch.bfloat16 else x for x in (cached, fresh))
    c4, f4 = _as_4d(cached), _as_4d(fresh)
    s, t, h, d = c4.shape
    out = torch.empty(t, dtype=torch.float32, device=cached.device)
    if t == 0:
        return out
    block_d = triton.next_power_of_2(d)
    if _INTERPRET:
        # Interpreter cost is per program, not per element: few, large tiles.
        block_t = min(triton.next_power_of_2(t), 64)
    else:
        # ~1024 elements a tile (8 fp16 per thread at 4 warps: 16-byte loads) and T/8 programs at
        # head size 128 -- 512 CTAs at 4k tokens fill 132 SMs several times over. Reasoned, not
        # measured: this task had no GPU. Revisit with bench/bench_blend_kernels.py on one.
        # Not sized to T (masked): one compile for every prompt length.
        block_t = max(1, 1024 // block_d)
    grid = (triton.cdiv(t, block_t),)
    _token_deviation_kernel[grid](
        c4,
        f4,
        out,
        s,
        t,
        h,
        d,
        *c4.stride(),
        *f4.stride(),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def select_tokens(
    deviation: torch.Tensor, ratio: float, *, min_tokens: int = 1, always_last: bool = True
) -> torch.Tensor:
    """Sorted int64 indices of the `ceil(ratio * T)` most deviating tokens.

    The count is `ceil(ratio * T)`, raised to `min_tokens` when `ratio > 0`, to 1 when
    `always_last`, capped at T: ratio 0 selects nothing (only `T - 1` with `always_last`),
    ratio 1 selects all. Ties go to the lower index; NaN ranks highest. `always_last` forces
    `T - 1` in (its query produces the next token) within the same budget.

    Why torch and no fused Triton top-k: selection reads a `[T]` fp32 vector (16 KiB at 4k tokens)
    while the deviation kernel reads `2 * S * T * H * D` elements (32 MiB in bf16 at 4k tokens,
    8 KV heads, head 128, K and V), so selection is ~0.05% of the bytes; a fused single-program
    top-k would either cap T at one block's sort size or need a multi-pass radix select -- a lot
    of kernel to save one small launch. Measured on CPU (bench/bench_blend_kernels.py, 4k
    tokens, 2 EPYC vCPUs): stable sort 0.09 ms, torch.topk 0.026 ms, the deviation twin 3.7 to
    90 ms (a noisy VM), so selection is at most ~2% of deviation + selection. On GPU a sort of 4k
    floats is a few launches of microseconds against a 32 MiB read (reasoned, not measured: no
    GPU in this task). A stable sort rather than the faster `torch.topk` because topk's tie
    order is unspecified and the selection must be reproducible across runs and ranks.

    Args:
        deviation: `[T]` from `token_deviation`.
        ratio: fraction of tokens to recompute, in `[0, 1]` (CacheBlend uses ~0.15).
        min_tokens: lower bound on the count when `ratio > 0`; default 1.
        always_last: force the last token into the selection; default True.

    Returns:
        `[k]` int64 indices, ascending, on `deviation.device`.
    """
    return select_tokens_ref(deviation, ratio, min_tokens=min_tokens, always_last=always_last)
