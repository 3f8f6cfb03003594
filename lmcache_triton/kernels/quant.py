"""Quantizing copies between vLLM's paged KV cache and encoded chunks: gather + quantize on store,
dequantize + scatter on load, every layer in one launch per K/V half.

Primitives (each a launcher with a torch twin of the same signature in `quant_ref.py`):

- `paged_to_quant(flat, geom, slot_mapping, spec, q_out, scales_out)`: the token rows of
  `slot_mapping` (as `paged_copy.paged_to_tokens` would gather them; a slot `< 0` reads as a row
  of zeros) quantized into `q_out` `[S, L, T, H, D or D/2]` and one fp16 scale tensor per half.
  On a GPU the compression happens before the device-to-host copy: PCIe and pinned bytes shrink.
- `quant_to_paged(q, scales, spec, flat, geom, slot_mapping)`: the inverse, scattered by slot
  (`< 0` skipped).
- `quantize_rows(rows, spec, q_out, scales_out)` / `dequantize_rows(q, scales, spec, out)`: the
  same kernels over a contiguous `[S, L, T, H, D]` chunk (seen as a one-block cache).
- `launch_class(spec, shape)`: chunk lengths with equal classes share every compiled kernel (the
  engine's warm-up).

The arithmetic (and why it is bit-identical to the twins): `quant_ref`'s module docstring. IEEE
division is `tl.div_rn` (a plain `/` may lower to an approximate divide on a GPU); bf16 is moved
as int16 bits and widened / rounded (RNE) by integer ops, which the interpreter supports.

Dispatch as in `paged_copy`: CUDA tensors run the kernels; CPU tensors run them through the
interpreter when `TRITON_INTERPRET=1` was set before import, else the torch twin.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .geometry import Cache, LayerTable, PagedKVGeometry
from .quant_ref import (
    QMAX,
    QuantSpec,
    check_rows,
    dequantize_rows_ref,
    num_groups,
    paged_to_quant_ref,
    quant_to_paged_ref,
    quantize_rows_ref,
    scale_shape,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NUM_WARPS = 4
_TILE_ELEMS = 4096  # values per program in token mode (BLOCK_T * BLOCK_D)

# Element kinds the kernels read and write: 0 fp32, 1 fp16, 2 bf16 (moved as int16 bits).
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _widen(v, KIND: tl.constexpr):
    if KIND == 2:  # bf16 bits -> fp32
        x = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = v.to(tl.float32)
    return x


@triton.jit
def _narrow(y, KIND: tl.constexpr):
    # One return: the compiler types a helper by all of its returns, constexpr branches included.
    if KIND == 2:  # fp32 -> bf16 bits, round to nearest even
        u = y.to(tl.uint32, bitcast=True)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    elif KIND == 1:
        out = y.to(tl.float16)
    else:
        out = y
    return out


@triton.jit
def _quantize(x, s, QM: tl.constexpr):
    q = tl.minimum(tl.maximum(tl.floor(tl.div_rn(x, s) + 0.5), -QM), QM)
    return tl.where(s > 0, q, 0.0).to(tl.int32)


@triton.jit
def _scale(amax, QM: tl.constexpr):
    return tl.minimum(tl.div_rn(amax, QM * 1.0), 65504.0).to(tl.float16)


@triton.jit
def _cache_rows(slot_ptr, layer_off_ptr, toks, num_tokens, layer, head, offset, stride_l, stride_b,
                stride_h, stride_n, half_off, block_size, PER_LAYER: tl.constexpr):  # fmt: skip
    """(row base offsets [BLOCK_T] in the cache, valid [BLOCK_T]) of token rows `toks`."""
    slots = tl.load(slot_ptr + toks, mask=toks < num_tokens, other=-1).to(tl.int64)
    valid = slots >= 0
    slots = tl.where(valid, slots, 0)
    block = slots // block_size
    pos = slots - block * block_size
    if PER_LAYER:
        layer_base = tl.load(layer_off_ptr + layer)
    else:
        layer_base = offset + layer * stride_l
    return layer_base + head * stride_h + half_off + block * stride_b + pos * stride_n, valid


@triton.jit(do_not_specialize=["num_tokens"])
def _token_mode_kernel(
    cache_ptr,  # [*] flat backing storage (fp32 / fp16 / bf16 as int16); row (l, b, h, n) at
    #              offset + l*stride_l + b*stride_b + h*stride_h + n*stride_n + half_off (+ d)
    q_ptr,  # [L, T, H, QC] contiguous: int8 (BITS 8) or packed uint8 (BITS 4), QC = D or D / 2
    scale_ptr,  # [L, T, H, G] contiguous fp16
    slot_ptr,  # [T] int64, < 0 = padding
    layer_off_ptr,  # [L] int64 per-layer origins (PER_LAYER only)
    offset, stride_l, stride_b, stride_h, stride_n, half_off,
    num_tokens, block_size, H, D, G,
    KIND: tl.constexpr, BITS: tl.constexpr, QUANT: tl.constexpr, PER_LAYER: tl.constexpr,
    GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_T token rows of one (layer, head); NG groups of GROUP channels each
    # (BLOCK_D = NG * GROUP covers D; the padding reads as 0, which no amax notices).
    BLOCK_D: tl.constexpr = NG * GROUP
    QM: tl.constexpr = 127 if BITS == 8 else 7
    pid = tl.program_id(0).to(tl.int64)
    num_tiles = tl.cdiv(num_tokens, BLOCK_T)
    tile = pid % num_tiles
    lh = pid // num_tiles
    head = lh % H
    layer = lh // H
    toks = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = toks < num_tokens
    rows, valid = _cache_rows(slot_ptr, layer_off_ptr, toks, num_tokens, layer, head, offset, stride_l,
                              stride_b, stride_h, stride_n, half_off, block_size, PER_LAYER)  # fmt: skip
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    row_id = (layer * num_tokens + toks) * H + head  # [BLOCK_T] row of [L, T, H]
    grp = tl.arange(0, NG)
    s_offs = row_id[:, None] * G + grp[None, :]
    s_mask = in_t[:, None] & (grp[None, :] < G)
    if QUANT:
        x = _widen(tl.load(cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None] & in_d[None, :], other=0), KIND)
        amax = tl.max(tl.abs(tl.reshape(x, [BLOCK_T, NG, GROUP])), axis=2)
        scale = _scale(amax, QM)
        tl.store(scale_ptr + s_offs, scale, mask=s_mask)
        s = scale.to(tl.float32)
        q = tl.reshape(_quantize(tl.reshape(x, [BLOCK_T, NG, GROUP]), s[:, :, None], QM), [BLOCK_T, BLOCK_D])
        if BITS == 8:
            tl.store(q_ptr + row_id[:, None] * D + d[None, :], q.to(tl.int8), mask=in_t[:, None] & in_d[None, :])
        else:
            lo, hi = tl.split(tl.reshape(q, [BLOCK_T, BLOCK_D // 2, 2]))
            packed = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            c = tl.arange(0, BLOCK_D // 2)
            c_in = in_t[:, None] & (c[None, :] < D // 2)
            tl.store(q_ptr + row_id[:, None] * (D // 2) + c[None, :], packed, mask=c_in)
    else:
        s = tl.load(scale_ptr + s_offs, mask=s_mask, other=0).to(tl.float32)
        if BITS == 8:
            q = tl.load(q_ptr + row_id[:, None] * D + d[None, :], mask=in_t[:, None] & in_d[None, :], other=0)
            q = q.to(tl.int32)
        else:
            c = tl.arange(0, BLOCK_D // 2)
            c_in = in_t[:, None] & (c[None, :] < D // 2)
            p = tl.load(q_ptr + row_id[:, None] * (D // 2) + c[None, :], mask=c_in, other=0)
            p = p.to(tl.int32)
            q = tl.reshape(tl.join(((p & 15) ^ 8) - 8, ((p >> 4) ^ 8) - 8), [BLOCK_T, BLOCK_D])
        y = tl.reshape(tl.reshape(q.to(tl.float32), [BLOCK_T, NG, GROUP]) * s[:, :, None], [BLOCK_T, BLOCK_D])
        tl.store(cache_ptr + rows[:, None] + d[None, :], _narrow(y, KIND), mask=valid[:, None] & in_d[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _channel_mode_kernel(
    cache_ptr,  # [*] flat backing storage, as in `_token_mode_kernel`
    q_ptr,  # [L, T, H, QC] contiguous
    scale_ptr,  # [L, G, H, D] contiguous fp16, G = ceil(T / GROUP_T)
    slot_ptr,  # [T] int64, < 0 = padding
    layer_off_ptr,  # [L] int64 (PER_LAYER only)
    offset, stride_l, stride_b, stride_h, stride_n, half_off,
    num_tokens, block_size, H, D, G,
    KIND: tl.constexpr, BITS: tl.constexpr, QUANT: tl.constexpr, PER_LAYER: tl.constexpr,
    GROUP_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: one group of GROUP_T tokens of one (layer, head), every channel; each channel
    # its own scale over the group (KIVI's per-channel K).
    QM: tl.constexpr = 127 if BITS == 8 else 7
    pid = tl.program_id(0).to(tl.int64)
    g = pid % G
    lh = pid // G
    head = lh % H
    layer = lh // H
    toks = g * GROUP_T + tl.arange(0, GROUP_T)
    in_t = toks < num_tokens
    rows, valid = _cache_rows(slot_ptr, layer_off_ptr, toks, num_tokens, layer, head, offset, stride_l,
                              stride_b, stride_h, stride_n, half_off, block_size, PER_LAYER)  # fmt: skip
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    row_id = (layer * num_tokens + toks) * H + head
    s_offs = ((layer * G + g) * H + head) * D + d
    if QUANT:
        x = _widen(tl.load(cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None] & in_d[None, :], other=0), KIND)
        scale = _scale(tl.max(tl.abs(x), axis=0), QM)
        tl.store(scale_ptr + s_offs, scale, mask=in_d)
        q = _quantize(x, scale.to(tl.float32)[None, :], QM)
        if BITS == 8:
            tl.store(q_ptr + row_id[:, None] * D + d[None, :], q.to(tl.int8), mask=in_t[:, None] & in_d[None, :])
        else:
            lo, hi = tl.split(tl.reshape(q, [GROUP_T, BLOCK_D // 2, 2]))
            packed = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            c = tl.arange(0, BLOCK_D // 2)
            c_in = in_t[:, None] & (c[None, :] < D // 2)
            tl.store(q_ptr + row_id[:, None] * (D // 2) + c[None, :], packed, mask=c_in)
    else:
        s = tl.load(scale_ptr + s_offs, mask=in_d, other=0).to(tl.float32)
        if BITS == 8:
            q = tl.load(q_ptr + row_id[:, None] * D + d[None, :], mask=in_t[:, None] & in_d[None, :], other=0)
            q = q.to(tl.int32)
        else:
            c = tl.arange(0, BLOCK_D // 2)
            c_in = in_t[:, None] & (c[None, :] < D // 2)
            p = tl.load(q_ptr + row_id[:, None] * (D // 2) + c[None, :], mask=c_in, other=0)
            p = p.to(tl.int32)
            q = tl.reshape(tl.join(((p & 15) ^ 8) - 8, ((p >> 4) ^ 8) - 8), [GROUP_T, BLOCK_D])
        y = q.to(tl.float32) * s[None, :]
        tl.store(cache_ptr + rows[:, None] + d[None, :], _narrow(y, KIND), mask=valid[:, None] & in_d[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _use_triton(t: Cache) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and _INTERPRET)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _check_args(
    spec: QuantSpec, shape: tuple[int, ...], dtype: torch.dtype, q: torch.Tensor, scales: list[torch.Tensor], device
) -> None:
    check_rows(spec, shape, dtype)
    S, L, T, H, D = shape
    want_q = (S, L, T, H, spec.q_cols(D))
    if tuple(q.shape) != want_q or q.dtype != spec.q_dtype() or not q.is_contiguous() or q.device != device:
        raise ValueError(
            f"q: expected contiguous {spec.q_dtype()} {want_q} on {device}, got {q.dtype} {tuple(q.shape)}"
        )
    if len(scales) != S:
        raise ValueError(f"scales: expected one tensor per half ({S}), got {len(scales)}")
    for s, t in enumerate(scales):
        mode, group = spec.half(s, S)
        want = scale_shape(mode, group, L, T, H, D)
        if tuple(t.shape) != want or t.dtype != torch.float16 or not t.is_contiguous() or t.device != device:
            raise ValueError(
                f"scales[{s}]: expected contiguous float16 {want} on {device}, got {t.dtype} {tuple(t.shape)}"
            )
    if spec.bits not in QMAX:
        raise ValueError(f"spec.bits: expected 8 or 4, got {spec.bits}")
    if spec.k_mode == "channel" and (spec.k_group <= 0 or spec.k_group & (spec.k_group - 1)):
        raise ValueError(f"spec.k_group: channel mode needs a power-of-2 token group, got {spec.k_group}")
    bad_k = spec.k_mode == "token" and spec.k_group & (spec.k_group - 1)
    if spec.v_group < 0 or spec.v_group & (spec.v_group - 1) or bad_k:
        raise ValueError("spec: token-mode groups must be 0 (the whole row) or a power of 2")


def _launch(
    quant: bool, base: torch.Tensor, table: torch.Tensor, per_layer: bool, where: tuple[int, int, int, int, int],
    half_offs: list[int], block_size: int, slots: torch.Tensor, spec: QuantSpec,
    q: torch.Tensor, scales: list[torch.Tensor], num_layers: int, num_heads: int, D: int, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Both halves of a chunk, one launch each (`where`: offset, stride_l, stride_b, stride_h,
    stride_n of the cache `base`; `half_offs`: each half's element offset within a row)."""
    T = slots.numel()
    if T == 0 or num_layers == 0:
        return
    kind = _KIND[dtype]
    cache = base.view(torch.int16) if kind == 2 else base
    S = q.shape[0]
    for s in range(S):
        mode, group = spec.half(s, S)
        common = dict(KIND=kind, BITS=spec.bits, QUANT=quant, PER_LAYER=per_layer, num_warps=_NUM_WARPS)
        if mode == "token":
            gsize = _pow2(D) if group <= 0 else group
            ng = _pow2(num_groups(D, group))
            block_t = max(1, min(_pow2(T), _TILE_ELEMS // (ng * gsize)))
            G = num_groups(D, group)
            grid = (num_layers * num_heads * triton.cdiv(T, block_t),)
            _token_mode_kernel[grid](
                cache, q[s], scales[s], slots, table, *where, half_offs[s], T, block_size, num_heads, D, G,
                GROUP=gsize, NG=ng, BLOCK_T=block_t, **common,
            )  # fmt: skip
        else:
            G = num_groups(T, group)
            grid = (num_layers * num_heads * G,)
            _channel_mode_kernel[grid](
                cache, q[s], scales[s], slots, table, *where, half_offs[s], T, block_size, num_heads, D, G,
                GROUP_T=group, BLOCK_D=_pow2(D), **common,
            )  # fmt: skip


def launch_class(spec: QuantSpec, shape: tuple[int, ...]) -> tuple:
    """What Triton specialises a launch over rows `shape` `[S, L, T, H, D]` on that depends on
    the token count `T` (the count itself is not specialised): each half's tile (`BLOCK_T`) or
    group count (`== 1`, a multiple of 16), and the 16-byte alignment of each part's offset when
    q and the scales are packed in order in one buffer (`chunk.codec.Encoding`). Chunk lengths of
    one class share every compiled kernel: the engine's warm-up launches one length per class."""
    S, L, T, H, D = shape
    out: list[object] = []
    at = S * L * T * H * spec.q_cols(D)  # q first, one byte per stored column
    for s in range(S):
        mode, group = spec.half(s, S)
        out.append(at % 16 == 0)
        if mode == "token":
            gsize = _pow2(D) if group <= 0 else group
            out.append(max(1, min(_pow2(T), _TILE_ELEMS // (_pow2(num_groups(D, group)) * gsize))))
        else:
            g = num_groups(T, group)
            out.append((g == 1, g % 16 == 0))
        n = 2
        for d in scale_shape(mode, group, L, T, H, D):
            n *= d
        at += n
    return tuple(out)


def _check_cache(flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor, kv_split: int) -> None:
    from .paged_copy import _check_flat, _check_index, _check_slots

    _check_flat(flat, geom)
    _check_index("slot_mapping", slot_mapping, flat)
    _check_slots(slot_mapping, geom)
    if kv_split not in (1, 2) or geom.row_size % kv_split:
        raise ValueError(f"q: leading dim must be 2 (K, V) or 1 (MLA) dividing C={geom.row_size}, got {kv_split}")


def _cache_launch(quant: bool, flat: Cache, geom: PagedKVGeometry, slot_mapping, spec, q, scales) -> None:
    S = q.shape[0]
    D = geom.row_size // S
    if isinstance(flat, LayerTable):
        base, table, per_layer = flat.layers[0], flat.element_offsets(), True
    else:
        base, table, per_layer = flat, slot_mapping, False
    where = (geom.offset, geom.stride_l, geom.stride_b, geom.stride_h, geom.stride_n)
    _launch(quant, base, table, per_layer, where, [s * D for s in range(S)], geom.block_size, slot_mapping,
            spec, q, scales, geom.num_layers, geom.num_heads, D, geom.dtype)  # fmt: skip


def paged_to_quant(
    flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor, spec: QuantSpec,
    q_out: torch.Tensor, scales_out: list[torch.Tensor],
) -> None:  # fmt: skip
    """Gather the token rows of `slot_mapping`, every layer, and quantize them (one launch per half).

    Args:
        flat: `[*]` the flat tensor over the cache storage, or a `LayerTable`.
        geom: where each layer's `[B, H, N, C]` lives in `flat` (fp32, fp16 or bf16).
        slot_mapping: `[T]` int64 slots; `< 0` reads as a row of zeros.
        spec: the quantization (`quant_ref.QuantSpec`).
        q_out: `[S, L, T, H, spec.q_cols(C / S)]` contiguous `spec.q_dtype()`, written in place.
        scales_out: per half, the fp16 scales (`quant_ref.scale_shape`), written in place.
    """
    S = q_out.shape[0] if q_out.dim() == 5 else -1
    _check_cache(flat, geom, slot_mapping, S)
    shape = (S, geom.num_layers, slot_mapping.numel(), geom.num_heads, geom.row_size // S)
    _check_args(spec, shape, geom.dtype, q_out, scales_out, flat.device)
    if not _use_triton(flat):
        paged_to_quant_ref(flat, geom, slot_mapping, spec, q_out, scales_out)
        return
    _cache_launch(True, flat, geom, slot_mapping, spec, q_out, scales_out)


def quant_to_paged(
    q: torch.Tensor, scales: list[torch.Tensor], spec: QuantSpec,
    flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """Dequantize an encoded chunk and scatter its token rows into the cache by slot (one launch
    per half); rows of slots `< 0` are skipped, nothing else in the cache is written.

    Args:
        q, scales, spec: as `paged_to_quant` produced them.
        flat: `[*]` the flat tensor over the cache storage, or a `LayerTable`; written in place.
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        slot_mapping: `[T]` int64 destination slots.
    """
    S = q.shape[0] if q.dim() == 5 else -1
    _check_cache(flat, geom, slot_mapping, S)
    shape = (S, geom.num_layers, slot_mapping.numel(), geom.num_heads, geom.row_size // S)
    _check_args(spec, shape, geom.dtype, q, scales, flat.device)
    if not _use_triton(flat):
        quant_to_paged_ref(q, scales, spec, flat, geom, slot_mapping)
        return
    _cache_launch(False, flat, geom, slot_mapping, spec, q, scales)


def _rows_launch(quant: bool, rows: torch.Tensor, spec, q, scales) -> None:
    S, L, T, H, D = rows.shape
    slots = torch.arange(T, dtype=torch.int64, device=rows.device)
    # A contiguous chunk is a one-block cache: half s of row (l, t, h) at s*L*T*H*D + l*T*H*D + t*H*D + h*D.
    where = (0, T * H * D, 0, D, H * D)
    _launch(quant, rows.view(-1), slots, False, where, [s * L * T * H * D for s in range(S)], max(T, 1), slots,
            spec, q, scales, L, H, D, rows.dtype)  # fmt: skip


def quantize_rows(rows: torch.Tensor, spec: QuantSpec, q_out: torch.Tensor, scales_out: list[torch.Tensor]) -> None:
    """Quantize a contiguous token-row chunk `[S, L, T, H, D]` (twin: `quantize_rows_ref`)."""
    if not rows.is_contiguous():
        raise ValueError("rows: must be contiguous")
    _check_args(spec, tuple(rows.shape), rows.dtype, q_out, scales_out, rows.device)
    if not _use_triton(rows):
        quantize_rows_ref(rows, spec, q_out, scales_out)
        return
    _rows_launch(True, rows, spec, q_out, scales_out)


def dequantize_rows(q: torch.Tensor, scales: list[torch.Tensor], spec: QuantSpec, out: torch.Tensor) -> None:
    """Dequantize into a contiguous token-row chunk `out` (twin: `dequantize_rows_ref`)."""
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    _check_args(spec, tuple(out.shape), out.dtype, q, scales, out.device)
    if not _use_triton(out):
        dequantize_rows_ref(q, scales, spec, out)
        return
    _rows_launch(False, out, spec, q, scales)
