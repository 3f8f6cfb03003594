"""PyTorch twins of the quantizing copies (`kernels/quant.py`): the CPU production path of the
lossy chunk codecs and the oracle the Triton kernels are compared with, bit for bit.

Kept apart from `reference.py` so the storage tiers can decode without importing Triton (this
file imports torch only; `reference.py` is the twin of the exact copies).

A chunk is token rows `[S, L, T, H, D]` (S = 2: K then V; S = 1: an MLA latent row). Each half
`s` is quantized symmetrically in groups, one fp16 scale per group:

  * "token" mode: groups of `group` consecutive channels of one token row (`group` 0: the whole
    row), scales `[L, T, H, ceil(D / group)]`.
  * "channel" mode (KIVI's K): groups of `group` consecutive tokens of one channel, scales
    `[L, ceil(T / group), H, D]`. Outlier channels of K get their own scale.

The arithmetic is fixed so that a kernel and this twin produce the same bits (IEEE fp32 throughout,
no fused multiply-add, round-to-nearest-even casts):

    amax  = max |x| over the group                  (x: the value widened to fp32, exact)
    scale = fp16(min(amax / QMAX, 65504))           (IEEE division, RNE cast)
    q     = clamp(floor(x / float(scale) + 0.5), -QMAX, QMAX), 0 where scale == 0
    x'    = dtype(float(q) * float(scale))          (RNE cast)

QMAX is 127 (8 bits, one int8 per value) or 7 (4 bits, two values per byte: the even channel in
the low nibble, the odd one in the high nibble, two's complement).

Two forms of the twin, the same bits: `quantize_half_ref` / `dequantize_half_ref` state the
arithmetic on whole tensors (the definition); `quantize_rows_ref` / `dequantize_rows_ref` (the
CPU production path: the disk writer and the prefetcher run them) do the same element-wise
operations in blocks of `BLOCK_ELEMS` values, so their fp32 temporaries stay in a core's L2, and
write straight into the destination: one pass over the destination per half instead of four
(a float32 temporary of the whole half, its scaling, the cast, the copy into `out`), and 4-bit
unpacked with int16 shifts into the interleaved bytes (`_unpack_into`) instead of int32 masks
and a stack.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

assert sys.byteorder == "little", "quant_ref: the 4-bit unpacking reads int16 words as two int8"
QMAX = {8: 127, 4: 7}
BLOCK_ELEMS = 1 << 17  # values per block of the rows twins: 512 KiB of fp32 temporary (L2 1.25 MiB)
FP16_MAX = 65504.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantSpec:
    """How a chunk's halves are quantized.

    Args:
        bits: 8 or 4.
        k_mode: "token" or "channel": the K half's grouping (S = 2 only; V and MLA rows are
            always "token").
        k_group: the K half's group size (tokens in "channel" mode, channels in "token" mode;
            0: the whole row).
        v_group: channels per group of the V half (and of MLA rows); 0: the whole row.
    """

    bits: int
    k_mode: str
    k_group: int
    v_group: int

    def half(self, s: int, num_halves: int) -> tuple[str, int]:
        """(mode, group) of half `s` of a chunk with `num_halves` halves."""
        if num_halves == 2 and s == 0:
            return self.k_mode, self.k_group
        return "token", self.v_group

    def q_cols(self, d: int) -> int:
        """Stored columns per row of `d` values (int8: `d`, packed int4: `d / 2`)."""
        return d if self.bits == 8 else d // 2

    def q_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8


def num_groups(n: int, group: int) -> int:
    """Groups of `group` (0: one group) covering `n` items."""
    return 1 if group <= 0 or n == 0 else -(-n // group)


def scale_shape(mode: str, group: int, num_layers: int, num_tokens: int, num_heads: int, d: int) -> tuple[int, ...]:
    """The scale tensor of one half: `[L, T, H, G]` (token mode) or `[L, G, H, D]` (channel)."""
    if mode == "token":
        return (num_layers, num_tokens, num_heads, num_groups(d, group))
    return (num_layers, num_groups(num_tokens, group), num_heads, d)


def _scales(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(amax / qmax, max=FP16_MAX).to(torch.float16)


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scales to divide by: a zero scale (an all-zero group) becomes +inf, so its values
    quantize to floor(+-0 + 0.5) = 0 with no full-size select (the kernels do the same)."""
    s = scale.to(torch.float32)
    return s.masked_fill_(s == 0, float("inf"))


def _quantize_groups(xg: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    """`clamp(floor(x / s + 0.5), -qmax, qmax)` as int8, `s` broadcast over the groups of `xg`;
    in place on one fp32 temporary (CPU passes are the writer's cost)."""
    y = torch.div(xg, s)
    return y.add_(0.5).floor_().clamp_(-qmax, qmax).to(torch.int8)


def quantize_half_ref(x: torch.Tensor, bits: int, mode: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One half `[L, T, H, D]` (any float dtype) -> `(q [L, T, H, D] int8 in [-QMAX, QMAX],
    scale fp16)`, unpacked; see the module docstring."""
    qmax = QMAX[bits]
    L, T, H, D = x.shape
    if mode not in ("token", "channel"):
        raise ValueError(f"mode: expected 'token' or 'channel', got {mode!r}")
    if T == 0 or D == 0:
        scale = torch.zeros(scale_shape(mode, group, L, T, H, D), dtype=torch.float16)
        return torch.zeros(x.shape, dtype=torch.int8), scale
    xf = x.to(torch.float32)
    if mode == "token":
        g = D if group <= 0 else group
        ng = num_groups(D, group)
        xg = xf if ng * g == D else torch.nn.functional.pad(xf, (0, ng * g - D))
        xg = xg.view(L, T, H, ng, g)
        scale = _scales(xg.abs().amax(dim=4), qmax)  # [L, T, H, G]
        q = _quantize_groups(xg, _divisor(scale)[..., None], qmax).view(L, T, H, ng * g)[..., :D]
    else:
        g = T if group <= 0 else group
        ng = num_groups(T, group)
        xg = xf if ng * g == T else torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, ng * g - T))
        xg = xg.view(L, ng, g, H, D)
        scale = _scales(xg.abs().amax(dim=2), qmax)  # [L, G, H, D]
        q = _quantize_groups(xg, _divisor(scale)[:, :, None], qmax).view(L, ng * g, H, D)[:, :T]
    return q, scale


def dequantize_half_ref(
    q: torch.Tensor, scale: torch.Tensor, mode: str, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize_half_ref`: unpacked `q [L, T, H, D]` and its scales -> `dtype`."""
    L, T, H, D = q.shape
    s = scale.to(torch.float32)
    if mode == "token":
        g = D if group <= 0 else group
        ng = num_groups(D, group)
        qg = q if ng * g == D else torch.nn.functional.pad(q, (0, ng * g - D))
        y = qg.view(L, T, H, ng, g).to(torch.float32).mul_(s[..., None]).view(L, T, H, ng * g)[..., :D]
    else:
        g = T if group <= 0 else group
        ng = num_groups(T, group)
        qg = q if ng * g == T else torch.nn.functional.pad(q, (0, 0, 0, 0, 0, ng * g - T))
        y = qg.view(L, ng, g, H, D).to(torch.float32).mul_(s[:, :, None]).view(L, ng * g, H, D)[:, :T]
    return y.to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """`[..., D]` int8 in [-8, 7] -> `[..., D / 2]` uint8 (even channel low nibble)."""
    lo = q[..., 0::2].to(torch.int32) & 15
    hi = q[..., 1::2].to(torch.int32) & 15
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: `[..., D / 2]` uint8 -> `[..., D]` int8."""
    v = p.to(torch.int32)
    lo = ((v & 15) ^ 8) - 8
    hi = ((v >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def check_rows(spec: QuantSpec, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """ValueError unless `spec` can encode token rows of `shape` and `dtype`."""
    if len(shape) != 5 or shape[0] not in (1, 2):
        raise ValueError(f"rows: expected token rows [S, L, T, H, D] with S in (1, 2), got shape {tuple(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"rows: expected float32/float16/bfloat16, got {dtype}")
    if spec.bits == 4 and shape[4] % 2:
        raise ValueError(f"rows: 4-bit packing needs an even head size, got {shape[4]}")


def _regions(
    mode: str, group: int, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bits: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The views one half `x` `[L, T, H, D]` is processed through: `[(q3, s3, x3)]`, each `x3`
    `[R, A, B]` (rows), `q3` `[R, A, B or B / 2]` (the stored int8 values, packed along B for 4
    bits), `s3` the scales `[R, A, 1]` (token mode: groups of B channels) or `[R, 1, B]` (channel
    mode: one scale per channel over A tokens), so that `x3 = q3 * s3` broadcast. Full groups
    first, then a partial last group (a head size no multiple of the channel group, a token count
    no multiple of the token group)."""
    L, T, H, D = x.shape
    qc = D if bits == 8 else D // 2
    out = []
    if mode == "token":
        R = L * T * H
        g = D if group <= 0 else group
        full = D // g
        gq = g if bits == 8 else g // 2
        qv, xv, sv = q.reshape(R, qc), x.reshape(R, D), scale.reshape(R, num_groups(D, group))
        if full:
            out.append((qv[:, : full * gq].view(R, full, gq), sv[:, :full, None], xv[:, : full * g].view(R, full, g)))
        if full * g < D:
            out.append((qv[:, None, full * gq :], sv[:, full:, None], xv[:, None, full * g :]))
        return out
    g = T if group <= 0 else group
    full = T // g
    for layer in range(L):  # a partial token group keeps the layers of a half from merging
        qv, xv, sv = q[layer].reshape(T, H * qc), x[layer].reshape(T, H * D), scale[layer].reshape(-1, H * D)
        if full:
            out.append((qv[: full * g].view(full, g, H * qc), sv[:full, None], xv[: full * g].view(full, g, H * D)))
        if full * g < T:
            out.append((qv[None, full * g :], sv[full:, None], xv[None, full * g :]))
    return out


def _unpack_into(p: torch.Tensor, dst: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """`unpack_int4` of `p` `[..., C]` (an int8 view of the packed bytes) into `dst` `[..., 2 C]`
    int8 contiguous, through `tmp` (`C`-sized int16, any shape): each byte becomes one int16 word
    of `dst`, whose low byte (the even channel, little-endian) is the low nibble sign-extended and
    whose high byte the high nibble: seven contiguous int16 passes (int8 writes with a stride of
    two, the obvious interleave, are not vectorized and cost 2x)."""
    w = dst.view(torch.int16).view(p.shape)
    w.copy_(p)  # the byte, sign-extended
    lo = tmp.view(p.shape)
    torch.bitwise_left_shift(w, 12, out=lo)  # int16 wraps: the low nibble in the top bits
    lo.bitwise_right_shift_(12).bitwise_and_(0xFF)
    w.bitwise_left_shift_(4).bitwise_and_(-256).bitwise_or_(lo)  # the high nibble's byte, then the low
    return dst


def _block_rows(A: int, B: int) -> int:
    return max(1, BLOCK_ELEMS // max(A * B, 1))


def quantize_rows_ref(
    rows: torch.Tensor, spec: QuantSpec, q_out: torch.Tensor, scales_out: list[torch.Tensor]
) -> None:
    """Quantize token rows `[S, L, T, H, D]` into `q_out` `[S, L, T, H, spec.q_cols(D)]`
    (`spec.q_dtype()`) and one scale tensor per half (`scale_shape`), all written in place:
    `quantize_half_ref`'s arithmetic in blocks (module docstring)."""
    S = rows.shape[0]
    qmax = QMAX[spec.bits]
    for s in range(S):
        mode, group = spec.half(s, S)
        if mode not in ("token", "channel"):
            raise ValueError(f"mode: expected 'token' or 'channel', got {mode!r}")
        if rows.shape[2] == 0 or rows.shape[4] == 0:
            q_out[s].zero_()
            scales_out[s].zero_()
            continue
        for q3, s3, x3 in _regions(mode, group, q_out[s].view(torch.int8), scales_out[s], rows[s], spec.bits):
            R, A, B = x3.shape
            span = 2 if s3.shape[2] == 1 else 1  # the axis a group spans
            n = _block_rows(A, B)
            m = min(n, R) * A * B
            ybuf, abuf = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=rows.dtype)
            ibuf = None if spec.bits == 8 else torch.empty(m, dtype=torch.int8)
            wbuf = None if spec.bits == 8 else torch.empty(m // 2, dtype=torch.int16)
            for i in range(0, R, n):
                xb = x3[i : i + n]
                k = xb.shape[0] * A * B
                # |x| and its max are exact in the rows' own dtype: widened after the reduction.
                amax = torch.abs(xb, out=abuf[:k].view(xb.shape)).amax(dim=span, keepdim=True)
                scale = _scales(amax.to(torch.float32), qmax)
                s3[i : i + n].copy_(scale)
                y = ybuf[:k].view(xb.shape)
                if rows.dtype == torch.float32:
                    torch.div(xb, _divisor(scale), out=y)  # never in place: `xb` is the caller's
                else:
                    y.copy_(xb)  # widened (exact)
                    y.div_(_divisor(scale))
                y.add_(0.5).floor_().clamp_(-qmax, qmax)
                if ibuf is None or wbuf is None:
                    q3[i : i + n].copy_(y)
                else:  # pack pairs as int16 words (even channel in the low byte, little-endian)
                    qi = ibuf[:k].view(xb.shape)
                    qi.copy_(y)
                    w = qi.view(torch.int16)
                    hi = wbuf[: k // 2].view(w.shape)
                    torch.bitwise_right_shift(w, 4, out=hi).bitwise_and_(0xF0)  # odd channel's nibble
                    q3[i : i + n].copy_(hi.bitwise_or_(w.bitwise_and_(0x0F)))  # int16 -> int8: the low byte


def dequantize_rows_ref(q: torch.Tensor, scales: list[torch.Tensor], spec: QuantSpec, out: torch.Tensor) -> None:
    """Inverse of `quantize_rows_ref` into `out` `[S, L, T, H, D]` (written in place):
    `dequantize_half_ref`'s arithmetic in blocks, each value of `out` written once (module
    docstring)."""
    S = out.shape[0]
    direct = out.dtype == torch.float32  # fp32 rows: the destination is the temporary
    if out.shape[2] == 0 or out.shape[4] == 0:
        return
    for s in range(S):
        mode, group = spec.half(s, S)
        scale = scales[s].to(torch.float32)  # 1/64 of the values or fewer: once, not per block
        for q3, s3, x3 in _regions(mode, group, q[s].view(torch.int8), scale, out[s], spec.bits):
            R, A, B = x3.shape
            n = _block_rows(A, B)
            m = min(n, R) * A * B
            tmp = None if direct else torch.empty(m, dtype=torch.float32)
            unpacked = None if spec.bits == 8 else torch.empty(m, dtype=torch.int8)
            words = None if spec.bits == 8 else torch.empty(m // 2, dtype=torch.int16)
            for i in range(0, R, n):
                ob, qb = x3[i : i + n], q3[i : i + n]
                k = ob.shape[0] * A * B
                if unpacked is not None and words is not None:
                    qb = _unpack_into(qb, unpacked[:k].view(ob.shape), words[: k // 2])
                sb = s3[i : i + n]
                if tmp is None:
                    ob.copy_(qb)
                    ob.mul_(sb)
                else:
                    t = tmp[:k].view(ob.shape)
                    t.copy_(qb)
                    ob.copy_(t.mul_(sb))


def _per_layer(flat, geom):
    """`[(layer_flat, layer_geom, layer_slice)]`: a `LayerTable` one layer at a time (a torch
    twin cannot address across allocations), a one-buffer cache whole."""
    from .geometry import LayerTable

    if isinstance(flat, LayerTable):
        return [(t, geom.one_layer(), slice(i, i + 1)) for i, t in enumerate(flat.layers)]
    return [(flat, geom, slice(None))]


def paged_to_quant_ref(flat, geom, slot_mapping: torch.Tensor, spec: QuantSpec, q_out: torch.Tensor,
                       scales_out: list[torch.Tensor]) -> None:  # fmt: skip
    """Twin of `quant.paged_to_quant`: `paged_to_tokens_ref` into zeroed rows (a slot `< 0` reads
    as zeros), then `quantize_rows_ref`."""
    from .reference import paged_to_tokens_ref

    S = q_out.shape[0]
    rows = torch.zeros((S, geom.num_layers, slot_mapping.numel(), geom.num_heads, geom.row_size // S), dtype=geom.dtype)
    for layer_flat, layer_geom, sl in _per_layer(flat, geom):
        paged_to_tokens_ref(layer_flat, layer_geom, slot_mapping, rows[:, sl])
    quantize_rows_ref(rows, spec, q_out, scales_out)


def quant_to_paged_ref(q: torch.Tensor, scales: list[torch.Tensor], spec: QuantSpec, flat, geom,
                       slot_mapping: torch.Tensor) -> None:  # fmt: skip
    """Twin of `quant.quant_to_paged`: `dequantize_rows_ref`, then `tokens_to_paged_ref`."""
    from .reference import tokens_to_paged_ref

    S = q.shape[0]
    rows = torch.empty((S, geom.num_layers, slot_mapping.numel(), geom.num_heads, geom.row_size // S), dtype=geom.dtype)
    dequantize_rows_ref(q, scales, spec, rows)
    for layer_flat, layer_geom, sl in _per_layer(flat, geom):
        tokens_to_paged_ref(rows[:, sl].contiguous(), layer_flat, layer_geom, slot_mapping)
