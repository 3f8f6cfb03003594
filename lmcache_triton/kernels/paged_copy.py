"""Copies between vLLM's paged KV cache and contiguous chunks, all layers in one launch.

Primitives (each a launcher with a torch twin of the same signature in `reference.py`):

- `paged_to_chunk` / `chunk_to_paged`: whole (layer, block, head) pages of `block_ids` <->
  a contiguous `[L, K, H, N, C]` chunk. Pages are opaque, so this also serves the CPU backend,
  whose pages hold K and V in a kernel-specific packing.
- `paged_to_tokens` / `tokens_to_paged`: token rows by slot (`block_id * N + offset`; negative
  slots are padding and skipped) <-> canonical `[2, L, T, H, D]` (K then V) or, for MLA-like
  caches, `[1, L, T, H, C]`.

Every layer is reached by an integer offset from ONE flat base (see `geometry.py`): no pointer
tables, which the Triton interpreter cannot load. A cache whose layers are separate tensors
(vLLM 0.34's extensible KV cache: a `LayerTable`) is still moved in one launch: the kernels read
each layer's origin from a table of 64-bit element offsets relative to layer 0 (`PER_LAYER`, a
constexpr, so the one-buffer specialisation is unchanged); the torch twins, which cannot address
across allocations, move it one layer at a time. Index math is 64-bit; copies are bit-exact
because the launchers view floating types (bf16, fp16, fp8, fp32) as same-width integers.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them through the interpreter when
`TRITON_INTERPRET=1` was set before import, and otherwise run the torch twin (the CPU
production path).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .geometry import Cache, LayerTable, PagedKVGeometry
from .reference import chunk_to_paged_ref, paged_to_chunk_ref, paged_to_tokens_ref, tokens_to_paged_ref

# Read at import, like `@triton.jit` itself: a kernel defined without the interpreter cannot run
# on CPU tensors later, whatever the environment says by then.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per program tile are sized in bytes so fp8 and fp32 move the same amount per program.
_TILE_BYTES = 16384
_NUM_WARPS = 8

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _page_tile_copy(
    cache_ptr,  # [*] flat backing storage; row r of unit (l, b, a) at
    #              offset + l*stride_l + b*stride_b + a*stride_a + r*stride_r (+ w, contiguous)
    chunk_ptr,  # [L, K, A, R, W] contiguous
    ids_ptr,  # [K] int64 block ids
    layer_off_ptr,  # [L] int64 per-layer origins in elements from cache_ptr (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_a,
    stride_r,
    num_ids,
    A,
    R,
    W,
    TO_CHUNK: tl.constexpr,
    PER_LAYER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # Axis 0: (layer, chunk block, outer unit, row tile); axis 1: tiles along the contiguous run.
    pid = tl.program_id(0).to(tl.int64)
    pid_w = tl.program_id(1).to(tl.int64)
    num_row_tiles = tl.cdiv(R, BLOCK_R)
    row_tile = pid % num_row_tiles
    unit = pid // num_row_tiles  # (l * K + i) * A + a
    a = unit % A
    li = unit // A
    i = li % num_ids
    layer = li // num_ids
    block = tl.load(ids_ptr + i).to(tl.int64)

    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < R) & (cols[None, :] < W)
    if PER_LAYER:  # layers in separate allocations: a table of 64-bit element offsets
        layer_base = tl.load(layer_off_ptr + layer)
    else:
        layer_base = offset + layer * stride_l
    cache_offs = (layer_base + block * stride_b + a * stride_a) + (
        rows[:, None] * stride_r + cols[None, :]
    )
    chunk_offs = unit * R * W + rows[:, None] * W + cols[None, :]
    if TO_CHUNK:
        vals = tl.load(cache_ptr + cache_offs, mask=mask)
        tl.store(chunk_ptr + chunk_offs, vals, mask=mask)
    else:
        vals = tl.load(chunk_ptr + chunk_offs, mask=mask)
        tl.store(cache_ptr + cache_offs, vals, mask=mask)


@triton.jit(do_not_specialize=["num_ids"])  # one compile serves every chunk length
def _paged_to_chunk_kernel(
    cache_ptr,  # [*] flat backing storage, integer view
    chunk_ptr,  # [L, K, A, R, W] contiguous (the [L, K, H, N, C] chunk with runs merged)
    ids_ptr,  # [K] int64
    layer_off_ptr,  # [L] int64 (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_a,
    stride_r,
    num_ids,
    A,
    R,
    W,
    PER_LAYER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    _page_tile_copy(
        cache_ptr, chunk_ptr, ids_ptr, layer_off_ptr, offset, stride_l, stride_b, stride_a, stride_r,
        num_ids, A, R, W, True, PER_LAYER, BLOCK_R, BLOCK_W,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_ids"])  # one compile serves every chunk length
def _chunk_to_paged_kernel(
    cache_ptr,  # [*] flat backing storage, integer view
    chunk_ptr,  # [L, K, A, R, W] contiguous
    ids_ptr,  # [K] int64
    layer_off_ptr,  # [L] int64 (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_a,
    stride_r,
    num_ids,
    A,
    R,
    W,
    PER_LAYER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    _page_tile_copy(
        cache_ptr, chunk_ptr, ids_ptr, layer_off_ptr, offset, stride_l, stride_b, stride_a, stride_r,
        num_ids, A, R, W, False, PER_LAYER, BLOCK_R, BLOCK_W,
    )  # fmt: skip


@triton.jit
def _token_tile_copy(
    cache_ptr,  # [*] flat backing storage; row (l, b, h, n) at
    #              offset + l*stride_l + b*stride_b + h*stride_h + n*stride_n (+ c, contiguous)
    tok_ptr,  # [S, L, T, H, D] contiguous, S * D == C
    slot_ptr,  # [T] int64, < 0 = padding
    layer_off_ptr,  # [L] int64 per-layer origins in elements from cache_ptr (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_h,
    stride_n,
    tok_stride_s,
    tok_stride_l,
    tok_stride_t,
    tok_stride_h,
    num_tokens,
    block_size,
    H,
    C,
    D,
    TO_TOKENS: tl.constexpr,
    PER_LAYER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Axis 0: (layer, head, token tile); axis 1: tiles along the row (usually one).
    pid = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    num_tok_tiles = tl.cdiv(num_tokens, BLOCK_T)
    tok_tile = pid % num_tok_tiles
    lh = pid // num_tok_tiles
    head = lh % H
    layer = lh // H

    toks = tok_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + toks, mask=toks < num_tokens, other=-1).to(tl.int64)
    valid = slots >= 0
    slots = tl.where(valid, slots, 0)
    block = slots // block_size
    pos = slots - block * block_size

    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    half = cols // D  # 0 = K, 1 = V (always 0 when S == 1)
    d = cols - half * D
    mask = valid[:, None] & (cols[None, :] < C)
    if PER_LAYER:
        layer_base = tl.load(layer_off_ptr + layer)
    else:
        layer_base = offset + layer * stride_l
    cache_offs = (layer_base + head * stride_h) + (
        block[:, None] * stride_b + pos[:, None] * stride_n + cols[None, :]
    )
    tok_offs = (layer * tok_stride_l + head * tok_stride_h) + (
        toks[:, None] * tok_stride_t + half[None, :] * tok_stride_s + d[None, :]
    )
    if TO_TOKENS:
        vals = tl.load(cache_ptr + cache_offs, mask=mask)
        tl.store(tok_ptr + tok_offs, vals, mask=mask)
    else:
        vals = tl.load(tok_ptr + tok_offs, mask=mask)
        tl.store(cache_ptr + cache_offs, vals, mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _paged_to_tokens_kernel(
    cache_ptr,  # [*] flat backing storage, integer view
    tok_ptr,  # [S, L, T, H, D] contiguous
    slot_ptr,  # [T] int64
    layer_off_ptr,  # [L] int64 (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_h,
    stride_n,
    tok_stride_s,
    tok_stride_l,
    tok_stride_t,
    tok_stride_h,
    num_tokens,
    block_size,
    H,
    C,
    D,
    PER_LAYER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _token_tile_copy(
        cache_ptr, tok_ptr, slot_ptr, layer_off_ptr, offset, stride_l, stride_b, stride_h, stride_n,
        tok_stride_s, tok_stride_l, tok_stride_t, tok_stride_h,
        num_tokens, block_size, H, C, D, True, PER_LAYER, BLOCK_T, BLOCK_C,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def _tokens_to_paged_kernel(
    cache_ptr,  # [*] flat backing storage, integer view
    tok_ptr,  # [S, L, T, H, D] contiguous
    slot_ptr,  # [T] int64
    layer_off_ptr,  # [L] int64 (PER_LAYER only)
    offset,
    stride_l,
    stride_b,
    stride_h,
    stride_n,
    tok_stride_s,
    tok_stride_l,
    tok_stride_t,
    tok_stride_h,
    num_tokens,
    block_size,
    H,
    C,
    D,
    PER_LAYER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _token_tile_copy(
        cache_ptr, tok_ptr, slot_ptr, layer_off_ptr, offset, stride_l, stride_b, stride_h, stride_n,
        tok_stride_s, tok_stride_l, tok_stride_t, tok_stride_h,
        num_tokens, block_size, H, C, D, False, PER_LAYER, BLOCK_T, BLOCK_C,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Launcher helpers
# ---------------------------------------------------------------------------


def _use_triton(t: Cache) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and _INTERPRET)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a same-width integer tensor (bit-exact copies; no bf16/fp8 arithmetic)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.uint8:
        return t.view(_INT_OF_WIDTH[t.element_size()])
    return t


def _check_flat(flat: Cache, geom: PagedKVGeometry) -> None:
    if isinstance(flat, LayerTable) or geom.per_layer:
        if not (isinstance(flat, LayerTable) and geom.per_layer and len(flat) == geom.num_layers):
            raise ValueError(f"flat: {flat!r} does not match a geometry with per_layer={geom.per_layer}")
        for i, layer in enumerate(flat.layers):
            if layer.dtype != geom.dtype:
                raise ValueError(f"flat.layers[{i}]: dtype {layer.dtype} != geometry dtype {geom.dtype}")
            if layer.numel() < geom.extent():
                raise ValueError(f"flat.layers[{i}]: {layer.numel()} elements, geometry reaches {geom.extent()}")
        return
    if flat.dim() != 1 or flat.stride(0) != 1:
        raise ValueError(f"flat: expected a contiguous 1-D tensor, got shape {tuple(flat.shape)}")
    if flat.dtype != geom.dtype:
        raise ValueError(f"flat: dtype {flat.dtype} != geometry dtype {geom.dtype}")
    if flat.numel() < geom.extent():
        raise ValueError(f"flat: {flat.numel()} elements, geometry reaches {geom.extent()}")


def _check_index(name: str, idx: torch.Tensor, flat: Cache) -> None:
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"{name}: expected a 1-D int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.device != flat.device:
        raise ValueError(f"{name}: on {idx.device}, cache on {flat.device}")
    if idx.stride(0) != 1 and idx.numel() > 1:
        raise ValueError(f"{name}: must be contiguous")


def _check_dense(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (strides {t.stride()})")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, cache on {device}")


def _check_block_ids(block_ids: torch.Tensor, geom: PagedKVGeometry) -> None:
    # A range check costs a device sync on CUDA; only the CPU paths pay for it.
    if block_ids.device.type == "cpu" and block_ids.numel():
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= geom.num_blocks:
            raise ValueError(f"block_ids: values must lie in [0, {geom.num_blocks}), got [{lo}, {hi}]")


def _check_slots(slot_mapping: torch.Tensor, geom: PagedKVGeometry) -> None:
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():
        hi = int(slot_mapping.max())
        if hi >= geom.num_slots:
            raise ValueError(f"slot_mapping: slot {hi} >= {geom.num_slots} (num_blocks * block_size)")


def _page_runs(geom: PagedKVGeometry) -> tuple[int, int, int, int, int]:
    """(A, stride_a, R, stride_r, W): a block's [H, N, C] as A x R rows of W contiguous elements.

    Merges N into the run when token rows are adjacent (stride_n == C), then H when heads are
    (stride_h == N * C): LBHNC/BLHNC blocks become one run of H*N*C, so a program streams wide
    vectorised tiles instead of C-element rows.
    """
    H, N, C = geom.num_heads, geom.block_size, geom.row_size
    if N == 1 or geom.stride_n == C:
        if H == 1 or geom.stride_h == N * C:
            return 1, 0, 1, 0, H * N * C
        return 1, 0, H, geom.stride_h, N * C
    return H, geom.stride_h, N, geom.stride_n, C


def _tile(rows: int, width: int, itemsize: int) -> tuple[int, int]:
    tile = _TILE_BYTES // itemsize
    block_w = min(triton.next_power_of_2(max(width, 1)), tile)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_w))
    return block_r, block_w


def _token_tile(row_size: int, itemsize: int) -> tuple[int, int]:
    """`(BLOCK_T, BLOCK_C)` of the token kernels: a function of the row and the dtype only, never
    of the token count, so a full chunk, every partial tail and the warm-up at register launch
    one specialisation (rows past the count are masked). A tile sized to the count compiled a
    new kernel for each power of two a tail rounds to, in the serving path (0.3-1.2 s each)."""
    tile = _TILE_BYTES // itemsize
    block_c = min(triton.next_power_of_2(max(row_size, 1)), tile)
    return max(1, tile // block_c), block_c


def token_copy_lengths(geom: PagedKVGeometry, kv_split: int, max_tokens: int) -> list[int]:
    """Token counts in `[1, max_tokens]`, one for each specialisation the token launchers
    (`paged_to_tokens` / `tokens_to_paged` on a contiguous `[S, L, T, H, C / S]` tensor) compile
    for counts in that range; `max_tokens` itself first. Warming these (the engine does at
    register) compiles every variant serving launches.

    The tile does not follow the count (`_token_tile`) and the count is not specialised
    (`do_not_specialize`); what still follows it are the token tensor's layer and K/V strides
    (`T * H * D`, `L * T * H * D`), which Triton specialises on divisibility by 16 and on being
    1. With `H * D` a multiple of 16 (every real model) that is one class.
    """
    hd = geom.num_heads * (geom.row_size // kv_split)

    def cls(t: int) -> tuple[object, ...]:
        strides = tuple((v == 1, v % 16 == 0, v >= 2**31) for v in (t * hd, geom.num_layers * t * hd))
        return (*strides, t >= 2**31)  # the count: only its integer width

    out: dict[tuple, int] = {cls(max_tokens): max_tokens} if max_tokens >= 1 else {}
    for t in range(1, max_tokens):
        out.setdefault(cls(t), t)
    return list(out.values())


def _base_and_table(flat, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The kernels' cache base, per-layer offset table and PER_LAYER flag: a one-buffer cache
    passes its flat tensor (the table argument is a dummy, never read); a `LayerTable` passes
    layer 0 and the int64 element offsets of every layer from it."""
    if isinstance(flat, LayerTable):
        return flat.layers[0], flat.element_offsets(), True
    return flat, index, False


def _launch_page_copy(kernel, flat, geom, block_ids, chunk) -> None:
    num_ids = block_ids.numel()
    if num_ids == 0 or geom.num_layers == 0:
        return
    base, table, per_layer = _base_and_table(flat, block_ids)
    A, stride_a, R, stride_r, W = _page_runs(geom)
    block_r, block_w = _tile(R, W, flat.element_size())
    grid = (geom.num_layers * num_ids * A * triton.cdiv(R, block_r), triton.cdiv(W, block_w))
    kernel[grid](
        _as_int(base), _as_int(chunk), block_ids, table,
        geom.offset, geom.stride_l, geom.stride_b, stride_a, stride_r,
        num_ids, A, R, W,
        PER_LAYER=per_layer, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _launch_token_copy(kernel, flat, geom, slot_mapping, tokens) -> None:
    num_tokens = slot_mapping.numel()
    if num_tokens == 0 or geom.num_layers == 0:
        return
    C = geom.row_size
    D = C // tokens.shape[0]
    block_t, block_c = _token_tile(C, flat.element_size())
    grid = (geom.num_layers * geom.num_heads * triton.cdiv(num_tokens, block_t), triton.cdiv(C, block_c))
    ts = tokens.stride()
    base, table, per_layer = _base_and_table(flat, slot_mapping)
    kernel[grid](
        _as_int(base), _as_int(tokens), slot_mapping, table,
        geom.offset, geom.stride_l, geom.stride_b, geom.stride_h, geom.stride_n,
        ts[0], ts[1], ts[2], ts[3],
        num_tokens, geom.block_size, geom.num_heads, C, D,
        PER_LAYER=per_layer, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _token_shape(name: str, geom: PagedKVGeometry, kv_split: int, num_tokens: int) -> tuple[int, ...]:
    if kv_split not in (1, 2) or geom.row_size % kv_split:
        raise ValueError(
            f"{name}: leading dim must be 2 (K, V) or 1 (MLA latent row) dividing C={geom.row_size}, "
            f"got {kv_split}"
        )
    return (kv_split, geom.num_layers, num_tokens, geom.num_heads, geom.row_size // kv_split)


# ---------------------------------------------------------------------------
# Public launchers
# ---------------------------------------------------------------------------


def paged_to_chunk(
    flat: Cache, geom: PagedKVGeometry, block_ids: torch.Tensor, chunk: torch.Tensor
) -> None:
    """Gather whole pages of `block_ids`, every layer, into a contiguous chunk (one launch).

    Args:
        flat: `[*]` the flat tensor over the cache storage, or a `LayerTable` of per-layer
            tensors (both from `geometry_from_layer_views`).
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        block_ids: `[K]` int64 block ids, any order, repeats allowed.
        chunk: `[L, K, H, N, C]` contiguous destination, `geom.dtype`, on `flat`'s device;
            written in place.
    """
    _check_flat(flat, geom)
    _check_index("block_ids", block_ids, flat)
    _check_dense("chunk", chunk, geom.chunk_shape(block_ids.numel()), geom.dtype, flat.device)
    _check_block_ids(block_ids, geom)
    if not _use_triton(flat):
        if isinstance(flat, LayerTable):  # torch twins: one layer at a time
            for layer, layer_flat in enumerate(flat.layers):
                paged_to_chunk(layer_flat, geom.one_layer(), block_ids, chunk[layer : layer + 1])
        else:
            paged_to_chunk_ref(flat, geom, block_ids, chunk)
        return
    _launch_page_copy(_paged_to_chunk_kernel, flat, geom, block_ids, chunk)


def chunk_to_paged(
    chunk: torch.Tensor, flat: Cache, geom: PagedKVGeometry, block_ids: torch.Tensor
) -> None:
    """Scatter a contiguous chunk back into the pages of `block_ids`, every layer (one launch).

    Only the pages of `block_ids` are written. With repeated ids, which copy lands is unspecified.

    Args:
        chunk: `[L, K, H, N, C]` contiguous source, `geom.dtype`.
        flat: `[*]` the flat tensor over the cache storage; written in place.
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        block_ids: `[K]` int64 destination block ids.
    """
    _check_flat(flat, geom)
    _check_index("block_ids", block_ids, flat)
    _check_dense("chunk", chunk, geom.chunk_shape(block_ids.numel()), geom.dtype, flat.device)
    _check_block_ids(block_ids, geom)
    if not _use_triton(flat):
        if isinstance(flat, LayerTable):
            for layer, layer_flat in enumerate(flat.layers):
                chunk_to_paged(chunk[layer : layer + 1], layer_flat, geom.one_layer(), block_ids)
        else:
            chunk_to_paged_ref(chunk, flat, geom, block_ids)
        return
    _launch_page_copy(_chunk_to_paged_kernel, flat, geom, block_ids, chunk)


def paged_to_tokens(
    flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor, out: torch.Tensor
) -> None:
    """Gather token rows by slot, every layer, into canonical K/V layout (one launch).

    Needs token-addressable pages (not the CPU backend's packed pages: use `paged_to_chunk`).

    Args:
        flat: `[*]` the flat tensor over the cache storage.
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        slot_mapping: `[T]` int64, slot = `block_id * N + offset`; `< 0` is padding, whose
            destination rows are left untouched.
        out: `[2, L, T, H, C // 2]` (K then V) or `[1, L, T, H, C]` (MLA-like) contiguous,
            `geom.dtype`; written in place. Its leading dim picks the split.
    """
    _check_flat(flat, geom)
    _check_index("slot_mapping", slot_mapping, flat)
    kv_split = out.shape[0] if out.dim() == 5 else -1
    _check_dense(
        "out", out, _token_shape("out", geom, kv_split, slot_mapping.numel()), geom.dtype, flat.device
    )
    _check_slots(slot_mapping, geom)
    if isinstance(flat, LayerTable) and not _use_triton(flat):
        for layer, layer_flat in enumerate(flat.layers):
            _paged_to_tokens(layer_flat, geom.one_layer(), slot_mapping, out[:, layer : layer + 1])
        return
    _paged_to_tokens(flat, geom, slot_mapping, out)


def _paged_to_tokens(
    flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor, out: torch.Tensor
) -> None:
    # `out` may be one layer's slice `[S, 1, T, H, D]` of a contiguous chunk: the kernel takes
    # its strides, the twin writes through the view. A LayerTable reaches here only for Triton.
    if not isinstance(flat, LayerTable) and not _use_triton(flat):
        paged_to_tokens_ref(flat, geom, slot_mapping, out)
        return
    _launch_token_copy(_paged_to_tokens_kernel, flat, geom, slot_mapping, out)


def tokens_to_paged(
    src: torch.Tensor, flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor
) -> None:
    """Scatter canonical K/V token rows into the cache by slot, every layer (one launch).

    Only the rows of non-negative slots are written. With repeated slots, which copy lands is
    unspecified.

    Args:
        src: `[2, L, T, H, C // 2]` or `[1, L, T, H, C]` contiguous, `geom.dtype`.
        flat: `[*]` the flat tensor over the cache storage; written in place.
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        slot_mapping: `[T]` int64 destination slots; `< 0` is padding, skipped.
    """
    _check_flat(flat, geom)
    _check_index("slot_mapping", slot_mapping, flat)
    kv_split = src.shape[0] if src.dim() == 5 else -1
    _check_dense(
        "src", src, _token_shape("src", geom, kv_split, slot_mapping.numel()), geom.dtype, flat.device
    )
    _check_slots(slot_mapping, geom)
    if isinstance(flat, LayerTable) and not _use_triton(flat):
        for layer, layer_flat in enumerate(flat.layers):
            _tokens_to_paged(src[:, layer : layer + 1], layer_flat, geom.one_layer(), slot_mapping)
        return
    _tokens_to_paged(src, flat, geom, slot_mapping)


def _tokens_to_paged(
    src: torch.Tensor, flat: Cache, geom: PagedKVGeometry, slot_mapping: torch.Tensor
) -> None:
    if not isinstance(flat, LayerTable) and not _use_triton(flat):
        tokens_to_paged_ref(src, flat, geom, slot_mapping)
        return
    _launch_token_copy(_tokens_to_paged_kernel, flat, geom, slot_mapping, src)
