"""The cache engine: moves chunks between vLLM's paged KV cache and the storage tiers.

Two halves, one per vLLM role, neither imports vLLM:

* `ChunkPlanner` (both roles): splits a prompt into chunks, gives each its key, and maps a
  chunk to the paged-cache blocks that hold it. The scheduler and every worker compute the
  same keys from the same tokens: hashes are process-stable (`hashing.py`).
* `PrefixIndex` (scheduler role): answers "how many leading chunks can every rank load?".
  The CPU tier lives in the worker processes, so the scheduler keeps a mirror of it, fed by
  the keys the workers report after each step; the disk tier is checked directly (one
  `stat` per chunk and rank), so it is right across processes and restarts without an index.
* `KVCacheEngine` (worker role): `lookup` counts the cached prefix in this process's tiers;
  `store` gathers a chunk's pages out of the paged cache in
  one kernel launch for all layers and hands the copy to the tiers; `load` fetches a chunk
  from the tiers and scatters it into the given blocks.

Invariants:
* A chunk is keyed by (namespace, prefix-chained token hash). The namespace names the model,
  world size, rank, KV dtype, chunk size and a fingerprint of the page layout, so a chunk is
  never loaded into a cache of another shape or packing.
* A stored chunk is `[L, pages, H, N, C]` pages of the cache dtype, bit-exact. Only whole
  pages move, so the CPU backend's packed pages work like any other layout.
* `store` returns only after the pages are copied out, so vLLM may reuse the blocks at once;
  the slower tiers are written in the background.
* A chunk that fails to load (missing, damaged, wrong shape) is reported, never half-used:
  the caller tells vLLM to recompute its blocks.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.hashing import chunk_hashes

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a prompt: tokens `[start, end)` and its key's chunk digest (hex)."""

    index: int
    start: int
    end: int
    digest: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ChunkPlanner:
    """Splits token sequences into keyed chunks and maps chunks to cache blocks.

    Args:
        config: the loaded configuration (`chunk_size`, `save_unfull_chunk`).
        block_size: tokens per vLLM (manager) block; `chunk_size` must be a multiple of it.
    """

    def __init__(self, config: LMCacheConfig, block_size: int):
        if config.chunk_size % block_size != 0:
            raise ValueError(
                f"chunk_size ({config.chunk_size}) must be a multiple of vLLM's block size "
                f"({block_size}): chunks move whole pages. Set LMCACHE_CHUNK_SIZE to a multiple "
                f"of {block_size}."
            )
        self.chunk_size = config.chunk_size
        self.block_size = block_size
        self.include_partial = config.save_unfull_chunk

    def spans(self, tokens: Sequence[int], extra: Sequence[str] = ()) -> list[ChunkSpan]:
        """Keyed chunks of `tokens`: every whole chunk, plus the last partial one when
        `save_unfull_chunk` is on."""
        digests = chunk_hashes(tokens, self.chunk_size, extra=tuple(extra), include_partial=self.include_partial)
        n = len(tokens)
        return [
            ChunkSpan(i, i * self.chunk_size, min((i + 1) * self.chunk_size, n), d.hex()) for i, d in enumerate(digests)
        ]

    def blocks_of(self, span: ChunkSpan, block_ids: Sequence[int]) -> list[int]:
        """The block ids holding `span`'s tokens (the last one may be partly filled)."""
        first = span.start // self.block_size
        last = (span.end + self.block_size - 1) // self.block_size
        if last > len(block_ids):
            raise ValueError(
                f"chunk {span.index} needs blocks [{first}, {last}) but the request has {len(block_ids)} blocks"
            )
        return list(block_ids[first:last])


def chunk_key(namespace: str, digest: str) -> str:
    """The storage key of a chunk: hex only, so it is safe as a file name."""
    return f"{namespace}{digest}"


class PrefixIndex:
    """Scheduler-side view of what every rank can load (see module docstring).

    Args:
        namespaces: one namespace digest per rank.
        disk_dir: the disk tier's directory, or None when there is no disk tier.
    """

    def __init__(self, namespaces: Sequence[str], disk_dir: str | None):
        self.namespaces = list(namespaces)
        self.disk_dir = disk_dir
        self._cpu: list[set[str]] = [set() for _ in self.namespaces]
        self._lock = threading.Lock()

    def report(self, rank: int, stored: Sequence[str], evicted: Sequence[str]) -> None:
        """Apply one worker's report: chunk digests it now holds in, or dropped from, its CPU tier."""
        with self._lock:
            keys = self._cpu[rank]
            keys.difference_update(evicted)
            keys.update(stored)

    def _on_disk(self, rank: int, digest: str) -> bool:
        if self.disk_dir is None:
            return False
        name = chunk_key(self.namespaces[rank], digest) + ".safetensors"
        return os.path.exists(os.path.join(self.disk_dir, name))

    def has(self, digest: str) -> bool:
        """True when every rank holds this chunk in its CPU tier or on disk."""
        with self._lock:
            return all(digest in self._cpu[r] or self._on_disk(r, digest) for r in range(len(self.namespaces)))

    def cached_prefix(self, spans: Sequence[ChunkSpan]) -> int:
        """Number of leading chunks of `spans` that every rank can load."""
        n = 0
        for span in spans:
            if not self.has(span.digest):
                break
            n += 1
        return n

    def clear(self) -> None:
        with self._lock:
            for keys in self._cpu:
                keys.clear()


@dataclass
class TransferStats:
    """Counters of one worker, reset by `take()` at each vLLM stats interval."""

    stored_chunks: int = 0
    stored_bytes: int = 0
    store_seconds: float = 0.0
    loaded_chunks: int = 0
    loaded_tokens: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    load_errors: int = 0
    store_errors: int = 0
    loaded_from: dict[str, int] = field(default_factory=dict)

    def take(self) -> dict:
        out = asdict(self)
        for tier, n in out.pop("loaded_from").items():
            out[f"loaded_chunks_{tier}"] = n
        self.__init__()
        return out


class KVCacheEngine:
    """Worker-side mover between one paged KV cache and the storage tiers.

    Args:
        storage: the tiers (`storage.manager.StorageManager`).
        namespace: this rank's namespace digest (`hashing.key_namespace`).
        meta: header fields stored with every chunk (model, layout fingerprint, ...); a chunk
            whose header disagrees with them is never loaded.
    """

    def __init__(self, storage, namespace: str, meta: dict[str, str]):
        self.storage = storage
        self.namespace = namespace
        self.meta = {**meta, "format_version": FORMAT_VERSION}
        self.stats = TransferStats()
        self.flat: torch.Tensor | None = None
        self.geom = None
        self.pages_per_block = 1

    def register(self, layer_views: Sequence[torch.Tensor], block_size: int) -> None:
        """Adopt vLLM's per-layer `[B, H, N, C]` views (in layer order) of one backing buffer.

        Args:
            layer_views: the views vLLM registered, one per attention layer.
            block_size: tokens per vLLM manager block; a manager block may span several
                kernel pages (`N` divides it).
        """
        from lmcache_triton.kernels.geometry import geometry_from_layer_views
        from lmcache_triton.kernels.paged_copy import chunk_to_paged, paged_to_chunk

        # Imported here, at start-up: importing Triton costs ~0.1-0.2 s, which the first request
        # would otherwise pay (measured as +27% on a 1k-token miss in bench_e2e --quick).
        self._gather, self._scatter = paged_to_chunk, chunk_to_paged
        self.flat, self.geom = geometry_from_layer_views(list(layer_views))
        if block_size % self.geom.block_size != 0:
            raise ValueError(
                f"vLLM block size {block_size} is not a multiple of the cache page size {self.geom.block_size}"
            )
        self.pages_per_block = block_size // self.geom.block_size

    def _page_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        r = self.pages_per_block
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if r > 1:
            ids = (ids[:, None] * r + torch.arange(r, dtype=torch.int64)[None, :]).reshape(-1)
        return ids.to(self.flat.device)

    def chunk_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.geom.chunk_shape(num_blocks * self.pages_per_block)

    def key(self, digest: str) -> str:
        return chunk_key(self.namespace, digest)

    def lookup(self, planner: ChunkPlanner, tokens: Sequence[int], extra: Sequence[str] = ()) -> int:
        """Cached prefix length of `tokens` in this process's tiers, in tokens (chunk granular).

        The scheduler asks `PrefixIndex` instead (it sees every rank); this is the one-process
        view, for tools and tests.
        """
        spans = planner.spans(tokens, extra)
        n = self.storage.contains_prefix([self.key(s.digest) for s in spans])
        return spans[n - 1].end if n else 0

    def store(self, digest: str, block_ids: Sequence[int], num_tokens: int) -> bool:
        """Copy the pages of `block_ids` out of the paged cache and hand them to the tiers.

        Returns when the copy is taken (vLLM may reuse the blocks then); disk writes go on in
        the background. Returns False when the tiers refused the chunk.
        """
        key = self.key(digest)
        if self.storage.contains(key):
            return True
        t0 = time.perf_counter()
        ids = self._page_ids(block_ids)
        shape = self.chunk_shape(len(block_ids))
        if self.flat.is_cuda:
            # Gather on the GPU (one launch, all layers), then one copy into the pinned pool buffer.
            staged = torch.empty(shape, dtype=self.flat.dtype, device=self.flat.device)
            self._gather(self.flat, self.geom, ids, staged)
            fill = lambda dst: dst.copy_(staged)
        else:
            # Gather straight into the CPU tier's pooled buffer: one copy, no allocation.
            fill = lambda dst: self._gather(self.flat, self.geom, ids, dst)
        ok = self.storage.put_fill(key, self.flat.dtype, shape, fill, self._meta(num_tokens))
        self.stats.store_seconds += time.perf_counter() - t0
        if ok:
            self.stats.stored_chunks += 1
            self.stats.stored_bytes += math.prod(shape) * self.flat.element_size()
        else:
            self.stats.store_errors += 1
        return ok

    def _meta(self, num_tokens: int) -> dict[str, str]:
        return {**self.meta, "num_tokens": str(num_tokens)}

    def load(self, digest: str, block_ids: Sequence[int], skip_blocks: int = 0) -> bool:
        """Fetch a chunk from the tiers and scatter it into `block_ids`.

        Args:
            digest: the chunk's digest.
            block_ids: the blocks that hold the chunk's tokens, in order.
            skip_blocks: leading blocks not to overwrite (vLLM already holds them).

        Returns:
            False when the chunk is missing, damaged or of another shape: nothing was written.
        """
        t0 = time.perf_counter()
        expected = self.chunk_shape(len(block_ids))
        with self.storage.open_chunk(self.key(digest), expect=self.meta) as got:
            tensor, tier = got if got is not None else (None, None)
            if tensor is None or tuple(tensor.shape) != expected or tensor.dtype != self.flat.dtype:
                if tensor is not None:
                    logger.warning(
                        "chunk %s has shape %s %s, expected %s %s: not loaded",
                        digest[:12], tuple(tensor.shape), tensor.dtype, expected, self.flat.dtype,
                    )
                self.stats.load_errors += 1
                return False
            nbytes = tensor.numel() * tensor.element_size()
            if skip_blocks:
                tensor = tensor[:, skip_blocks * self.pages_per_block :].contiguous()
                block_ids = list(block_ids)[skip_blocks:]
            if len(block_ids):
                # Blocking host->device copy: a held CPU-tier buffer may be reused once released.
                src = tensor.to(self.flat.device) if self.flat.is_cuda else tensor
                self._scatter(src, self.flat, self.geom, self._page_ids(block_ids))
        self.stats.load_seconds += time.perf_counter() - t0
        self.stats.loaded_chunks += 1
        self.stats.loaded_bytes += nbytes
        self.stats.loaded_from[tier] = self.stats.loaded_from.get(tier, 0) + 1
        return True
