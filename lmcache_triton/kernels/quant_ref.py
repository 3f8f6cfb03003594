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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = {8: 127, 4: 7}
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
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros(scale_shape(mode, group, L, T, H, D), dtype=torch.float16)
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


def dequantize_half_ref(q: torch.Tensor, scale: torch.Tensor, mode: str, group: int, dtype: torch.dtype) -> torch.Tensor:
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


def quantize_rows_ref(
    rows: torch.Tensor, spec: QuantSpec, q_out: torch.Tensor, scales_out: list[torch.Tensor]
) -> None:
    """Quantize token rows `[S, L, T, H, D]` into `q_out` `[S, L, T, H, spec.q_cols(D)]`
    (`spec.q_dtype()`) and one scale tensor per half (`scale_shape`), all written in place."""
    S = rows.shape[0]
    for s in range(S):
        mode, group = spec.half(s, S)
        q, scale = quantize_half_ref(rows[s], spec.bits, mode, group)
        q_out[s].copy_(q if spec.bits == 8 else pack_int4(q))
        scales_out[s].copy_(scale)


def dequantize_rows_ref(q: torch.Tensor, scales: list[torch.Tensor], spec: QuantSpec, out: torch.Tensor) -> None:
    """Inverse of `quantize_rows_ref` into `out` `[S, L, T, H, D]` (written in place)."""
    S = out.shape[0]
    for s in range(S):
        mode, group = spec.half(s, S)
        qs = q[s] if spec.bits == 8 else unpack_int4(q[s])
        out[s].copy_(dequantize_half_ref(qs, scales[s], mode, group, out.dtype))


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
