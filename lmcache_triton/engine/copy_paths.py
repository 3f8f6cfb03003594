"""Copy paths: how a chunk moves between vLLM's paged KV cache and a contiguous chunk tensor.

One strategy per kind of cache, chosen once at `register` (`make_copy_path`):
  `TokenRows`    token-addressable pages (every GPU layout, the Triton token kernels): chunks are
                 token rows `[S, L, T, H, C / S]`, portable across block sizes, page layouts and
                 attention backends.
  `PackedPages`  the CPU attention backend's packed pages, addressed through a map of the packing
                 probed from vLLM's own cache-write op: the same portable token rows.
  `OpaquePages`  pages packed in a way nobody could map to token rows: whole pages
                 `[L, pages, H, N, C]`, never portable (the packing is named in every header).

Primitives (every path): `chunk_shape(num_blocks, num_tokens)`, `ids(block_ids, num_tokens,
skip_tokens)` (what the copies index by), `gather(ids, out)`, `scatter(src, ids)`,
`skipped(chunk, skip_blocks)` (what a load writes when vLLM holds leading blocks),
`tokens_in(chunk, num_blocks)`, and `for_layers(start, stop)`: the same path over a layer range
alone (its chunks hold those layers only), for layer-wise transfers.

Invariants:
  * Copies are bit-exact and touch only the slots (pages) named by `ids`; a slot `< 0` is
    skipped.
  * A path never allocates on the copy itself: `out`/`src` are the caller's (a CPU-arena view or
    a staging tensor on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lmcache_triton.kernels.geometry import PagedKVGeometry

# What a chunk's rows are, in its header: token rows `[S, L, T, H, C / S]`, portable across block
# sizes, page layouts and attention backends.
ROWS_FORM = "tokens"


class CopyPath:
    """Token rows by slot (the base path); see the module docstring.

    Args:
        flat: `[*]` the flat tensor over the cache's storage (`geometry_from_layer_views`).
        geom: where each layer's `[B, H, N, C]` lives in `flat`.
        block_size: tokens per vLLM (manager) block, a multiple of the page size `N`.
        kv_split: `S`: 2 (K then V) or 1 (an MLA latent row).
    """

    rows: str = ROWS_FORM

    def __init__(self, flat: torch.Tensor, geom: PagedKVGeometry, block_size: int, kv_split: int = 2) -> None:
        if block_size % geom.block_size != 0:
            raise ValueError(f"vLLM block size {block_size} is not a multiple of the cache page size {geom.block_size}")
        if kv_split not in (1, 2) or geom.row_size % kv_split:
            raise ValueError(f"kv_split: expected 1 or 2 dividing the row size {geom.row_size}, got {kv_split}")
        self.flat, self.geom = flat, geom
        self.block_size = block_size
        self.pages_per_block = block_size // geom.block_size
        self.kv_split = kv_split

    def for_layers(self, start: int, stop: int) -> CopyPath:
        """This path over layers `[start, stop)` alone."""
        g = self.geom
        if not 0 <= start < stop <= g.num_layers:
            raise ValueError(f"layers [{start}, {stop}) outside [0, {g.num_layers})")
        sub = dataclasses.replace(g, num_layers=stop - start, offset=g.offset + start * g.stride_l)
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, geom=sub)
        return out

    def chunk_shape(self, num_blocks: int, num_tokens: int | None = None) -> tuple[int, ...]:
        """Shape of a chunk of `num_tokens` tokens (default: all) held by `num_blocks` blocks."""
        g = self.geom
        t = num_blocks * self.block_size if num_tokens is None else num_tokens
        return (self.kv_split, g.num_layers, t, g.num_heads, g.row_size // self.kv_split)

    def fills(self, num_blocks: int, num_tokens: int) -> bool:
        """`num_tokens` need exactly `num_blocks` manager blocks (the last one may be partial)."""
        return (num_blocks - 1) * self.block_size < num_tokens <= num_blocks * self.block_size

    def tokens_in(self, chunk: torch.Tensor, num_blocks: int) -> int:
        """Tokens a stored chunk holds (a chunk of another form: what `num_blocks` would)."""
        return int(chunk.shape[2]) if chunk.dim() == 5 else num_blocks * self.block_size

    def ids(self, block_ids: Sequence[int], num_tokens: int, skip_tokens: int = 0) -> torch.Tensor:
        """The slots of the first `num_tokens` tokens of `block_ids` (`-1`, skipped, for the first
        `skip_tokens`), on the cache's device."""
        # Token t of manager block b sits in slot b * block_size + t (its kernel page is
        # b * pages_per_block + t // N, so the kernels' page * N + offset is the same number).
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        bs = self.block_size
        ids = (ids[:, None] * bs + torch.arange(bs, dtype=torch.int64)[None, :]).reshape(-1)[:num_tokens]
        if skip_tokens:
            ids[:skip_tokens] = -1
        return self._to_device(ids)

    def _to_device(self, ids: torch.Tensor) -> torch.Tensor:
        if self.flat.is_cuda:
            # Pinned, so the upload is asynchronous; the caching host allocator keeps the page
            # until the copy has run.
            return ids.pin_memory().to(self.flat.device, non_blocking=True)
        return ids

    def skipped(self, chunk: torch.Tensor, skip_blocks: int) -> torch.Tensor:
        """What a load scatters when vLLM holds `skip_blocks` leading blocks: token rows skip by
        slot (-1), so the whole chunk."""
        return chunk

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import paged_to_tokens

        paged_to_tokens(self.flat, self.geom, ids, out)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import tokens_to_paged

        tokens_to_paged(src, self.flat, self.geom, ids)


class TokenRows(CopyPath):
    """Token rows by slot in token-addressable pages (every GPU layout): the base behaviour."""


class PackedPages(CopyPath):
    """Token rows out of (into) the CPU backend's packed pages, through the probed `page_map`.

    Torch indexing straight between the cache and the chunk, one call per layer and K/V half
    over a contiguous 1-D slice of the buffer (`index_select` on a strided 2-D view would first
    copy all of it); exact, the map being a verified permutation of each block. Measured on this
    2-core VM (12 layers, 4 KV heads of 64, fp32, 256-token chunks of 6.3 MB): store 3.2 ms, load
    1.3 ms a chunk (whole-page copies: 1.4 / 0.3 ms).

    Args:
        page_map: where token element `(s, n, h, e)` of a page sits among one block's
            `H * N * C` elements, `[S, N, H, C / S]` int64.
    """

    def __init__(
        self, flat: torch.Tensor, geom: PagedKVGeometry, block_size: int, kv_split: int, page_map: torch.Tensor
    ) -> None:
        super().__init__(flat, geom, block_size, kv_split)
        g = geom
        want = (kv_split, g.block_size, g.num_heads, g.row_size // kv_split)
        if tuple(page_map.shape) != want:
            raise ValueError(f"page_map: expected shape {want}, got {tuple(page_map.shape)}")
        if g.stride_n != g.row_size or (g.num_heads > 1 and g.stride_h != g.block_size * g.row_size):
            raise ValueError(f"page_map: packed pages need contiguous blocks, got strides {g.strides5d}")
        self.page_map = page_map.to(torch.int64)

    def _offsets(self, slots: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per layer a 1-D slice of the buffer from its first element, and per valid slot the
        `[S, T', H, E]` offsets of its elements in that slice."""
        g = self.geom
        valid = slots >= 0
        s = slots[valid]
        page, off = s // g.block_size, s % g.block_size
        offs = self.page_map[:, off] + (page * g.stride_b)[None, :, None, None]
        span = int(offs.max()) + 1 if offs.numel() else 1
        starts = [g.offset + layer * g.stride_l for layer in range(g.num_layers)]
        rows = [self.flat[start : start + span] for start in starts]
        return rows, offs, valid

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        rows, offs, _ = self._offsets(ids)
        for s in range(out.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                torch.index_select(row, 0, idx, out=out[s, layer].view(-1))

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        rows, offs, valid = self._offsets(ids)
        whole = bool(valid.all())
        for s in range(src.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                part = src[s, layer] if whole else src[s, layer][valid]
                row.index_copy_(0, idx, part.reshape(-1))


class OpaquePages(CopyPath):
    """Whole kernel pages `[L, pages, H, N, C]` (never portable: the packing is in the header).

    Args:
        packing: names the packing (vLLM's backend and version), so only a cache packed alike
            loads these chunks.
    """

    def __init__(
        self, flat: torch.Tensor, geom: PagedKVGeometry, block_size: int, kv_split: int, packing: str
    ) -> None:
        super().__init__(flat, geom, block_size, kv_split)
        self.rows = f"pages:{packing}:N{geom.block_size}"

    def chunk_shape(self, num_blocks: int, num_tokens: int | None = None) -> tuple[int, ...]:
        return self.geom.chunk_shape(num_blocks * self.pages_per_block)

    def tokens_in(self, chunk: torch.Tensor, num_blocks: int) -> int:
        return num_blocks * self.block_size

    def ids(self, block_ids: Sequence[int], num_tokens: int, skip_tokens: int = 0) -> torch.Tensor:
        """The kernel page ids of `block_ids`, without the pages of the first `skip_tokens`."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        r = self.pages_per_block
        if r > 1:
            ids = (ids[:, None] * r + torch.arange(r, dtype=torch.int64)[None, :]).reshape(-1)
        return self._to_device(ids[skip_tokens // self.geom.block_size :])

    def skipped(self, chunk: torch.Tensor, skip_blocks: int) -> torch.Tensor:
        return chunk if not skip_blocks else chunk[:, skip_blocks * self.pages_per_block :].contiguous()

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import paged_to_chunk

        paged_to_chunk(self.flat, self.geom, ids, out)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import chunk_to_paged

        chunk_to_paged(src, self.flat, self.geom, ids)


def make_copy_path(
    flat: torch.Tensor,
    geom: PagedKVGeometry,
    block_size: int,
    kv_split: int = 2,
    page_map: torch.Tensor | None = None,
    opaque_packing: str | None = None,
) -> CopyPath:
    """The path for a cache: opaque pages when its packing is named, packed pages with a
    `page_map`, else token rows by slot."""
    # Imported here, at start-up: importing Triton costs ~0.1-0.2 s, which the first request
    # would otherwise pay (measured as +27% on a 1k-token miss in bench_e2e --quick).
    import lmcache_triton.kernels.paged_copy  # noqa: F401

    if opaque_packing is not None:
        return OpaquePages(flat, geom, block_size, kv_split, opaque_packing)
    if page_map is not None:
        return PackedPages(flat, geom, block_size, kv_split, page_map)
    return TokenRows(flat, geom, block_size, kv_split)
