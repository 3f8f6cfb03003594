"""PyTorch twins of the Triton kernels: the CPU production path and the test oracles.

Each `<name>_ref` has the same signature as the public launcher `<name>` in its kernel module.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------
# Paged <-> chunk copies (twins of kernels/paged_copy.py)
# ---------------------------------------------------------------------------

# (paged copy twins go here)

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

from .geometry import PagedKVGeometry  # noqa: E402  (imported here: this file's sections have owners)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a same-width integer tensor: index ops lack fp8 kernels, and copies must be
    bit-exact (NaN payloads included)."""
    if t.dtype.is_floating_point:
        return t.view(_INT_OF_WIDTH[t.element_size()])
    return t


# Per-block `copy_` beat one vectorised gather on this 2-core CPU for a Llama-8B-like chunk
# (32 layers, 16 blocks of 64 KiB pages): ~40 GB/s vs ~20 GB/s for index_select/index_put_, and
# index_select over a layout with non-contiguous heads (LHBNC) fell to 0.04 GB/s. Past this many
# blocks the Python loop costs more than it saves, so advanced indexing takes over.
_MAX_LOOPED_BLOCKS = 64


def paged_to_chunk_ref(
    flat: torch.Tensor, geom: PagedKVGeometry, block_ids: torch.Tensor, chunk: torch.Tensor
) -> None:
    """Twin of `paged_copy.paged_to_chunk`: gather the pages of `block_ids` into `chunk`.

    Args:
        flat: `[*]` flat tensor over the cache storage.
        geom: `PagedKVGeometry` of the cache in `flat`.
        block_ids: `[K]` int64 block ids, any order, repeats allowed.
        chunk: `[L, K, H, N, C]` contiguous destination, written in place.
    """
    flat, chunk = _bits(flat), _bits(chunk)
    cache = geom.view5d(flat)
    if block_ids.numel() <= _MAX_LOOPED_BLOCKS:
        for i, b in enumerate(block_ids.tolist()):
            chunk[:, i].copy_(cache[:, b])
    else:
        chunk.copy_(cache[:, block_ids])


def chunk_to_paged_ref(
    chunk: torch.Tensor, flat: torch.Tensor, geom: PagedKVGeometry, block_ids: torch.Tensor
) -> None:
    """Twin of `paged_copy.chunk_to_paged`: scatter `chunk` into the pages of `block_ids`.

    Args:
        chunk: `[L, K, H, N, C]` contiguous source.
        flat: `[*]` flat tensor over the cache storage, written in place.
        geom: `PagedKVGeometry` of the cache in `flat`.
        block_ids: `[K]` int64 block ids; with repeats, which copy lands is unspecified.
    """
    flat, chunk = _bits(flat), _bits(chunk)
    cache = geom.view5d(flat)
    if block_ids.numel() <= _MAX_LOOPED_BLOCKS:
        for i, b in enumerate(block_ids.tolist()):
            cache[:, b].copy_(chunk[:, i])
    else:
        cache[:, block_ids] = chunk


def _token_rows(
    flat: torch.Tensor, geom: PagedKVGeometry, slot_mapping: torch.Tensor, kv_split: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A strided view `[S, L, M, H, D]` of `flat` whose axis 2 (stride 1) is indexed by a token
    row's flat offset `block * stride_b + pos * stride_n`, plus those offsets and the valid mask.

    One `index_select`/`index_copy_` along axis 2 then moves every layer, head and K/V half of
    the selected tokens straight between the cache and the canonical layout, with no temporary.
    The view overlaps itself (axis 2 has stride 1), which is fine: only the selected offsets,
    distinct token rows, are read or written.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    rows = (
        torch.div(slots, geom.block_size, rounding_mode="floor") * geom.stride_b
        + (slots % geom.block_size) * geom.stride_n
    )
    span = int(rows.max()) + 1 if rows.numel() else 1
    D = geom.row_size // kv_split
    view = flat.as_strided(
        (kv_split, geom.num_layers, span, geom.num_heads, D),
        (D, geom.stride_l, 1, geom.stride_h, 1),
        geom.offset,
    )
    return view, rows, valid


def paged_to_tokens_ref(
    flat: torch.Tensor, geom: PagedKVGeometry, slot_mapping: torch.Tensor, out: torch.Tensor
) -> None:
    """Twin of `paged_copy.paged_to_tokens`: gather token rows by slot into `out`.

    Args:
        flat: `[*]` flat tensor over the cache storage.
        geom: `PagedKVGeometry` of the cache in `flat`.
        slot_mapping: `[T]` int64 slots; `< 0` is padding, its `out` rows left untouched.
        out: `[2, L, T, H, C // 2]` or `[1, L, T, H, C]` contiguous, written in place.
    """
    flat, out = _bits(flat), _bits(out)
    view, rows, valid = _token_rows(flat, geom, slot_mapping, out.shape[0])
    if rows.numel() == slot_mapping.numel():
        torch.index_select(view, 2, rows, out=out)
    elif rows.numel():
        out.index_copy_(2, valid.nonzero().squeeze(1), view.index_select(2, rows))


def tokens_to_paged_ref(
    src: torch.Tensor, flat: torch.Tensor, geom: PagedKVGeometry, slot_mapping: torch.Tensor
) -> None:
    """Twin of `paged_copy.tokens_to_paged`: scatter token rows of `src` into the cache by slot.

    Args:
        src: `[2, L, T, H, C // 2]` or `[1, L, T, H, C]` contiguous source.
        flat: `[*]` flat tensor over the cache storage, written in place.
        geom: `PagedKVGeometry` of the cache in `flat`.
        slot_mapping: `[T]` int64 slots; `< 0` is padding, skipped.
    """
    flat, src = _bits(flat), _bits(src)
    view, rows, valid = _token_rows(flat, geom, slot_mapping, src.shape[0])
    if rows.numel() == slot_mapping.numel():
        view.index_copy_(2, rows, src)
    elif rows.numel():
        view.index_copy_(2, rows, src[:, :, valid])


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# CacheBlend: token selection and RoPE re-rotation (twins of kernels/blend.py, kernels/rope.py)
# ---------------------------------------------------------------------------

# (blend twins go here)
