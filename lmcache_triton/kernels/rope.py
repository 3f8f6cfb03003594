"""RoPE re-rotation of cached keys for CacheBlend: move K from the positions it was computed at to
the positions it is reused at.

A cached segment's K was RoPE'd at `src_pos`; reused after a different prefix it must look RoPE'd
at `dst_pos`. Rotations compose, `R(dst) R(src)^-1 = R(dst - src)`, so each pair is rotated by
`delta * inv_freq` with `delta = dst - src` (V carries no position and is reused as is).

Precision: the angle `delta * inv_freq` is formed in fp32 like vLLM's own cos/sin cache
(`pos * inv_freq` in fp32), so its rounding error is at most |angle| * 2^-24 -- 2.4e-4 rad at a
delta of 4096 on the fastest pair, below fp16/bf16 storage precision. `delta` is exact in fp32
for |delta| < 2^24. Delta 0 is the identity bit for bit (cos 0 = 1, sin 0 = 0).

Supports NeoX (pairs `(i, i + rotary_dim/2)`) and GPT-J (pairs `(2i, 2i+1)`) layouts, partial
rotary (`rotary_dim < D`: dims `[rotary_dim, D)` copied bit-exactly), and the default, linear and
llama3 frequency schedules through `rope_inv_freq`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import _check_rerotate_args, rerotate_k_ref, rope_inv_freq

__all__ = ["rerotate_k", "rope_inv_freq"]

# Read once, like `@triton.jit` itself: the interpreter is chosen at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["T"])  # one compile serves every segment length
def _rerotate_k_kernel(
    k_ptr,  # [T, H, D] viewed through strides
    out_ptr,  # [T, H, D] viewed through strides; k_ptr itself when in place
    src_ptr,  # [T] int32/int64 positions K was RoPE'd at, viewed through src_st
    dst_ptr,  # [T] int32/int64 positions K is reused at, viewed through dst_st
    inv_freq_ptr,  # [HALF] fp32, contiguous
    T,
    H,
    D,
    k_st,
    k_sh,
    k_sd,
    o_st,
    o_sh,
    o_sd,
    src_st,
    dst_st,
    HALF: tl.constexpr,  # rotary_dim // 2
    IS_NEOX: tl.constexpr,
    COPY_TAIL: tl.constexpr,  # out-of-place with rotary_dim < D: copy dims [2 * HALF, D)
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next_power_of_2(HALF)
    BLOCK_TAIL: tl.constexpr,  # next_power_of_2(D - 2 * HALF), >= 1
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < T
    src = tl.load(src_ptr + t * src_st, mask=t_mask, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + t * dst_st, mask=t_mask, other=0).to(tl.int64)
    delta = (dst - src).to(tl.float32)

    i = tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = i < HALF
    inv = tl.load(inv_freq_ptr + i, mask=r_mask, other=0.0)
    # cos/sin once per token block, reused for every head.
    ang = delta[:, None] * inv[None, :]  # [BLOCK_T, BLOCK_R] fp32
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    if IS_NEOX:
        d1 = i
        d2 = i + HALF
    else:
        d1 = 2 * i
        d2 = 2 * i + 1
    mask = t_mask[:, None] & r_mask[None, :]
    k_off1 = t[:, None] * k_st + d1[None, :] * k_sd
    k_off2 = t[:, None] * k_st + d2[None, :] * k_sd
    o_off1 = t[:, None] * o_st + d1[None, :] * o_sd
    o_off2 = t[:, None] * o_st + d2[None, :] * o_sd
    if COPY_TAIL:
        dt = 2 * HALF + tl.arange(0, BLOCK_TAIL).to(tl.int64)
        tail_mask = t_mask[:, None] & (dt < D)[None, :]
        k_tail = t[:, None] * k_st + dt[None, :] * k_sd
        o_tail = t[:, None] * o_st + dt[None, :] * o_sd

    # Advance base pointers (64-bit) instead of multiplying the int32 loop counter.
    k_h = k_ptr
    o_h = out_ptr
    for _h in range(0, H):
        # Both halves are loaded before either is stored: in place is safe, and each program
        # owns its tokens, so programs never race.
        x1 = tl.load(k_h + k_off1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_h + k_off2, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        tl.store(o_h + o_off1, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_h + o_off2, y2.to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            tl.store(o_h + o_tail, tl.load(k_h + k_tail, mask=tail_mask), mask=tail_mask)
        k_h += k_sh
        o_h += o_sh


def rerotate_k(
    k: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    is_neox: bool = True,
    inv_freq: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-rotate RoPE'd keys from `src_pos` to `dst_pos` (rotate each pair by `dst - src`).

    Args:
        k: `[T, H, D]` keys RoPE'd at `src_pos`; fp32, fp16 or bf16 (fp64 runs the torch twin in
            fp64); any strides.
        src_pos: `[T]` int32/int64 positions the keys were computed at, on `k.device`.
        dst_pos: `[T]` int32/int64 positions they are reused at (may be smaller: negative deltas).
        rotary_dim: rotated dims per head, even, `<= D`; default None = D. Dims `[rotary_dim, D)`
            are copied unchanged.
        is_neox: NeoX pairs `(i, i + rotary_dim/2)` if True (default), GPT-J pairs `(2i, 2i+1)`.
        inv_freq: `[rotary_dim // 2]` fp32 from `rope_inv_freq`, on `k.device` (required).
        out: `[T, H, D]` destination of k's dtype; pass `k` itself for in place. It must be `k`
            or not overlap it. Validated, never coerced. Default None: a new tensor.

    Returns:
        `out` (or the new tensor) with the keys RoPE'd at `dst_pos`.
    """
    rot = _check_rerotate_args(k, src_pos, dst_pos, rotary_dim, inv_freq, out)
    if not ((k.is_cuda or _INTERPRET) and k.dtype in _KERNEL_DTYPES):
        return rerotate_k_ref(
            k, src_pos, dst_pos, rotary_dim=rot, is_neox=is_neox, inv_freq=inv_freq, out=out
        )
    if out is None:
        out = torch.empty_like(k)
    if _INTERPRET and not k.is_cuda and k.dtype == torch.bfloat16:
        # The interpreter has no bf16 arithmetic: run in fp32 (bf16 -> fp32 is exact, the result
        # is rounded to bf16 once, as on GPU) and copy back. Test-only path.
        tmp = rerotate_k(k.float(), src_pos, dst_pos, rotary_dim=rot, is_neox=is_neox, inv_freq=inv_freq)
        return out.copy_(tmp)
    in_place = out.data_ptr() == k.data_ptr() and out.stride() == k.stride()
    t, h, d = k.shape
    if t == 0 or h == 0:
        return out
    half = rot // 2
    block_r = triton.next_power_of_2(half)
    if _INTERPRET:
        block_t = min(triton.next_power_of_2(t), 64)  # interpreter cost is per program
    else:
        # ~1024 pair lanes a tile at head size 128 -> T/16 programs (256 at 4k tokens); each
        # loops over heads reusing its cos/sin. Reasoned, not measured: no GPU in this task.
        # Not sized to T (masked): a tile following the length compiled a kernel per power of
        # two a short segment rounds to, in a request's step.
        block_t = max(1, 1024 // block_r)
    inv = inv_freq if inv_freq.dtype == torch.float32 else inv_freq.float()
    grid = (triton.cdiv(t, block_t),)
    _rerotate_k_kernel[grid](
        k,
        out,
        src_pos,
        dst_pos,
        inv.contiguous(),
        t,
        h,
        d,
        *k.stride(),
        *out.stride(),
        src_pos.stride(0),
        dst_pos.stride(0),
        HALF=half,
        IS_NEOX=is_neox,
        COPY_TAIL=(not in_place) and rot < d,
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        BLOCK_TAIL=triton.next_power_of_2(max(d - rot, 1)),
    )
    return out
