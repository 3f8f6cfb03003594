"""The cache engine: moves chunks between vLLM's paged KV cache and the storage tiers.

Two halves, one per vLLM role, neither imports vLLM:

* `ChunkPlanner` (both roles): splits a prompt into chunks, gives each its key, and maps a
  chunk to the paged-cache blocks that hold it. The scheduler and every worker compute the
  same keys from the same tokens: hashes are process-stable (`hashing.py`).
* `PrefixIndex` (scheduler role): answers "how many leading chunks can every rank load?".
  The CPU tier lives in the worker processes, so the scheduler keeps a mirror of it, fed by
  the keys the workers report after each step; the disk tier is checked directly (one
  `stat` per chunk and rank), so it is right across processes and restarts without an index;
  the remote tier in one pipelined round trip for all candidate chunks and ranks (`on_remote`).
* `KVCacheEngine` (worker role): `lookup` counts the cached prefix in this process's tiers;
  `store` gathers a chunk's token rows out of the paged cache in one kernel launch for all
  layers and hands the copy to the tiers; `load` scatters a held chunk into the given blocks.

Invariants:
* A chunk is keyed by (namespace, prefix-chained token hash). The namespace names the model and
  what produced its weights, world size, rank, KV dtype, chunk size and the shape of a token
  row (attention kind, heads, head size), so a chunk is never loaded into a cache of another
  model or row shape.
* A stored chunk is token rows `[S, L, T, H, C / S]` (S = 2: K then V, LMCache's KV_2LTD order;
  1 for an MLA latent row) of the cache dtype, bit-exact, with exactly its `T` tokens: it does
  not depend on vLLM's block size, the attention backend's page size or the page layout, so a
  chunk stored by one server loads into any other of the same model and KV dtype. GPU layouts
  are addressed by slot with the Triton token kernels; the CPU backend's packed pages through
  a map of the packing probed from vLLM's own cache-write op (`register(page_map=...)`).
* `store` returns only after the pages are copied out, so vLLM may reuse the blocks at once;
  the slower tiers are written in the background.
* A chunk that fails to load (missing, damaged, wrong shape) is reported, never half-used:
  the caller tells vLLM to recompute its blocks.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.hashing import chunk_hashes

logger = logging.getLogger(__name__)

FORMAT_VERSION = "2"
# What a chunk's rows are, in its header: token rows `[S, L, T, H, C / S]`, portable across block
# sizes, page layouts and attention backends.
ROWS_FORM = "tokens"


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
    """Scheduler-side view of what every rank holds in memory (see module docstring).

    Only chunks a worker reported as held in its CPU tier -- verified, pinned against eviction
    until the scheduler acknowledges their retirement -- count as cached. A file on disk only
    makes a chunk worth prefetching.

    Args:
        namespaces: one namespace digest per rank.
        disk_dir: the disk tier's directory, or None when there is no disk tier.
        failed_ttl: seconds a chunk whose prefetch failed is not asked for again; default 30.
        remote: the remote tier (anything with `contains_many(keys) -> list[bool]`), or None.
        remote_miss_ttl: seconds a remote miss is remembered (not asked again); default 2.
    """

    def __init__(
        self,
        namespaces: Sequence[str],
        disk_dir: str | None,
        failed_ttl: float = 30.0,
        remote: Any = None,
        remote_miss_ttl: float = 2.0,
    ):
        self.namespaces = list(namespaces)
        self.disk_dir = disk_dir
        self.failed_ttl = failed_ttl
        self.remote = remote
        self.remote_miss_ttl = remote_miss_ttl
        self._remote_miss: dict[str, float] = {}  # digest -> monotonic time of the miss
        self._mem: list[set[str]] = [set() for _ in self.namespaces]
        self._failed: dict[str, float] = {}  # digest -> monotonic time of the failure
        self._lock = threading.Lock()

    def report(self, rank: int, stored: Sequence[str], removed: Sequence[str], failed: Sequence[str] = ()) -> None:
        """Apply one worker's report: digests it now holds in memory, digests it retired or
        dropped, and digests it could not fetch from a slower tier."""
        with self._lock:
            keys = self._mem[rank]
            keys.difference_update(removed)
            keys.update(stored)
            now = time.monotonic()
            for d in failed:
                self._failed[d] = now

    def has(self, digest: str) -> bool:
        """True when every rank holds this chunk in memory."""
        with self._lock:
            return all(digest in keys for keys in self._mem)

    def cached_prefix(self, spans: Sequence[ChunkSpan], satisfied_tokens: int = 0) -> int:
        """Number of leading chunks of `spans` that every rank holds in memory; chunks that end
        within the first `satisfied_tokens` (vLLM already has them) count without being held."""
        n = 0
        for span in spans:
            if span.end > satisfied_tokens and not self.has(span.digest):
                break
            n += 1
        return n

    def on_disk(self, digest: str) -> bool:
        """True when every rank has this chunk's file and no recent prefetch of it failed: worth
        a prefetch, not a promise (the file may be damaged; the worker finds out)."""
        if self.disk_dir is None:
            return False
        with self._lock:
            t = self._failed.get(digest)
            if t is not None:
                if time.monotonic() - t < self.failed_ttl:
                    return False
                del self._failed[digest]
        for ns in self.namespaces:
            path = os.path.join(self.disk_dir, chunk_key(ns, digest) + ".safetensors")
            if not os.path.isfile(path):
                return False
        return True

    def on_remote(self, digests: Sequence[str]) -> set[str]:
        """The digests whose chunk every rank's namespace has on the remote server: worth a
        prefetch, not a promise. One pipelined round trip for all of them (bounded by
        `remote_timeout`; a down server answers nothing at once). Misses are remembered for
        `remote_miss_ttl` seconds, recent prefetch failures for `failed_ttl`."""
        if self.remote is None or not digests:
            return set()
        now = time.monotonic()
        with self._lock:
            if len(self._remote_miss) > 100_000:  # bounded: drop the expired ones
                self._remote_miss = {d: t for d, t in self._remote_miss.items() if now - t < self.remote_miss_ttl}
            ask = []
            for d in dict.fromkeys(digests):
                t = self._failed.get(d)
                if t is not None and now - t < self.failed_ttl:
                    continue
                t = self._remote_miss.get(d)
                if t is not None and now - t < self.remote_miss_ttl:
                    continue
                ask.append(d)
        if not ask:
            return set()
        r = len(self.namespaces)
        got = self.remote.contains_many([chunk_key(ns, d) for d in ask for ns in self.namespaces])
        present = set()
        with self._lock:
            for i, d in enumerate(ask):
                if all(got[i * r : (i + 1) * r]):
                    present.add(d)
                else:
                    self._remote_miss[d] = now
        return present

    def clear(self) -> None:
        with self._lock:
            for keys in self._mem:
                keys.clear()
            self._failed.clear()
            self._remote_miss.clear()


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
    prefetched_chunks: int = 0
    prefetch_errors: int = 0
    loaded_from: dict[str, int] = field(default_factory=dict)

    def take(self) -> dict:
        out = asdict(self)
        for tier, n in out.pop("loaded_from").items():
            out[f"loaded_chunks_{tier}"] = n
        self.__init__()
        return out


@dataclass
class Progress:
    """What finished in the background since the last `KVCacheEngine.poll()` (digests)."""

    held: list[str] = field(default_factory=list)  # now held in memory: the scheduler may count them
    failed: list[str] = field(default_factory=list)  # prefetches that found nothing usable


@dataclass
class _InFlight:
    kind: str  # "store" | "load"
    digest: str
    key: str
    done: Any  # torch.cuda.Event
    tensor: torch.Tensor | None = None  # the CPU-tier buffer held for the copy


class KVCacheEngine:
    """Worker-side mover between one paged KV cache and the storage tiers.

    Protocol with the scheduler (device-agnostic; the vLLM adapter only carries the lists):

    * A chunk is *held* once it sits, complete and verified, in this worker's CPU tier: the
      engine takes a hold on it (never evicted) and `poll()` reports it. Only held chunks may be
      promised by the scheduler, so a promised load cannot miss.
    * To make room the engine picks held chunks to *retire* (`retire()`), reports them, and
      frees them only when the scheduler acknowledges (`ack_retired`): every load the
      scheduler planned before it saw the report reaches this worker first.
    * `prefetch(digests)` reads chunks from the slower tiers (disk, remote) into the CPU tier on a
      background thread, verified there; completions come out of `poll()`.
    * `store` / `load` move pages between the paged cache and the CPU tier. On CUDA both run on
      a dedicated stream: the compute stream waits on events (no host synchronisation); a store
      only waits for its gather (a device-to-device copy) before vLLM's next kernels may touch
      the blocks, the device-to-host copy finishes behind. On CPU they are plain copies.

    Args:
        storage: the tiers (`storage.manager.StorageManager`).
        namespace: this rank's namespace digest (`hashing.key_namespace`).
        meta: header fields stored with every chunk (model, layout fingerprint, ...); a chunk
            whose header disagrees with them is never loaded.
        retire_high / retire_low: when held bytes exceed `retire_high` of the CPU tier's bound,
            the least recently used held chunks are retired down to `retire_low`; defaults
            0.9 / 0.8.
    """

    def __init__(
        self, storage, namespace: str, meta: dict[str, str], retire_high: float = 0.9, retire_low: float = 0.8
    ):
        self.storage = storage
        self.namespace = namespace
        self.meta = {**meta, "format_version": FORMAT_VERSION}
        self.stats = TransferStats()
        self.flat: torch.Tensor | None = None
        self.geom = None
        self.pages_per_block = 1
        self.block_size = 0
        self.kv_split = 2
        self._opaque = False
        self.retire_high, self.retire_low = retire_high, retire_low
        self._lock = threading.RLock()  # puts + holds of the CPU tier, bookkeeping below
        self._held: dict[str, torch.Tensor] = {}  # key -> the held CPU-tier tensor
        self._origin: dict[str, str] = {}  # key -> tier it came from ("cpu", "disk")
        self._retiring: set[str] = set()
        self._rejected_seen = 0  # the CPU tier's refused puts already answered by `retire`
        self._progress = Progress()
        self._inflight: list[_InFlight] = []
        self._stream = None
        self._prefetch_q: queue.Queue | None = None
        self._prefetching: set[str] = set()
        self._prefetch_thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def register(
        self,
        layer_views: Sequence[torch.Tensor],
        block_size: int,
        page_map: torch.Tensor | None = None,
        kv_split: int = 2,
        opaque_packing: str | None = None,
    ) -> None:
        """Adopt vLLM's per-layer `[B, H, N, C]` views (in layer order) of one backing buffer.

        Chunks are stored as token rows `[S, L, T, H, C / S]` (`S` = 2: K then V; 1: an MLA
        latent row), whatever the cache's block size, page layout or attention backend: a chunk
        written by one server loads into any other of the same model and KV dtype.

        Args:
            layer_views: the views vLLM registered, one per attention layer.
            block_size: tokens per vLLM (manager) block; a manager block may span several
                kernel pages (`N` divides it).
            page_map: for caches whose pages are packed (the CPU attention backend), where
                token element `(s, n, h, e)` of a page sits among one block's `H * N * C`
                elements, `[S, N, H, C / S]` int64; None for token-addressable layouts.
            kv_split: `S`.
            opaque_packing: the pages are packed in a way nobody could map to token rows: move
                whole pages (`[L, pages, H, N, C]`, never portable) and name the packing in every
                chunk header, so only a cache packed alike loads them.
        """
        from lmcache_triton.kernels.geometry import geometry_from_layer_views
        from lmcache_triton.kernels.paged_copy import (
            chunk_to_paged,
            paged_to_chunk,
            paged_to_tokens,
            tokens_to_paged,
        )

        # Imported here, at start-up: importing Triton costs ~0.1-0.2 s, which the first request
        # would otherwise pay (measured as +27% on a 1k-token miss in bench_e2e --quick).
        self.flat, self.geom = geometry_from_layer_views(list(layer_views))
        g = self.geom
        if block_size % g.block_size != 0:
            raise ValueError(f"vLLM block size {block_size} is not a multiple of the cache page size {g.block_size}")
        if kv_split not in (1, 2) or g.row_size % kv_split:
            raise ValueError(f"kv_split: expected 1 or 2 dividing the row size {g.row_size}, got {kv_split}")
        self.block_size = block_size
        self.pages_per_block = block_size // g.block_size
        self.kv_split = kv_split
        self._opaque = opaque_packing is not None
        self._page_map = None
        if self._opaque:
            self._gather, self._scatter = paged_to_chunk, chunk_to_paged
            self.meta["rows"] = f"pages:{opaque_packing}:N{g.block_size}"
        elif page_map is not None:
            want = (kv_split, g.block_size, g.num_heads, g.row_size // kv_split)
            if tuple(page_map.shape) != want:
                raise ValueError(f"page_map: expected shape {want}, got {tuple(page_map.shape)}")
            if g.stride_n != g.row_size or (g.num_heads > 1 and g.stride_h != g.block_size * g.row_size):
                raise ValueError(f"page_map: packed pages need contiguous blocks, got strides {g.strides5d}")
            self._page_map = page_map.to(torch.int64)
            self._gather, self._scatter = self._packed_gather, self._packed_scatter
            self.meta["rows"] = ROWS_FORM
        else:
            self._gather, self._scatter = paged_to_tokens, tokens_to_paged
            self.meta["rows"] = ROWS_FORM
        if self.flat.is_cuda:
            self._stream = torch.cuda.Stream(device=self.flat.device)
            self._warm_up()

    def _warm_up(self) -> None:
        """JIT-compile the copy kernels at start-up, not on the first request's step: gather
        one page's rows and scatter the same bytes back (the cache holds nothing yet). The
        chunk length is not a specialisation key (`do_not_specialize`), so these two compiles
        serve every chunk."""
        # After whatever vLLM queued on the cache (e.g. zeroing it): the scatter writes back
        # exactly the bytes the gather read.
        self._stream.wait_stream(torch.cuda.current_stream(self.flat.device))
        with torch.cuda.stream(self._stream):
            ids = self._ids([0], self.block_size)
            scratch = torch.empty(self.chunk_shape(1), dtype=self.flat.dtype, device=self.flat.device)
            self._gather(self.flat, self.geom, ids, scratch)
            self._scatter(scratch, self.flat, self.geom, ids)
        self._stream.synchronize()

    def _ids(self, block_ids: Sequence[int], num_tokens: int, skip_tokens: int = 0) -> torch.Tensor:
        """What the copy kernels index by: the slots of the first `num_tokens` tokens of
        `block_ids` (`-1`, skipped, for the first `skip_tokens`), or for opaque pages the kernel
        page ids."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if self._opaque:
            r = self.pages_per_block
            if r > 1:
                ids = (ids[:, None] * r + torch.arange(r, dtype=torch.int64)[None, :]).reshape(-1)
            ids = ids[skip_tokens // self.geom.block_size :]
        else:
            # Token t of manager block b sits in slot b * block_size + t (its kernel page is
            # b * pages_per_block + t // N, so the kernels' page * N + offset is the same number).
            bs = self.block_size
            ids = (ids[:, None] * bs + torch.arange(bs, dtype=torch.int64)[None, :]).reshape(-1)[:num_tokens]
            if skip_tokens:
                ids[:skip_tokens] = -1
        if self.flat.is_cuda:
            # Pinned, so the upload is asynchronous; the caching host allocator keeps the page
            # until the copy has run.
            return ids.pin_memory().to(self.flat.device, non_blocking=True)
        return ids

    # Packed pages (the CPU backend): torch indexing with the probed map, straight between the
    # cache and the chunk, one call per layer and K/V half over a contiguous 1-D slice of the
    # buffer (`index_select` on a strided 2-D view would first copy all of it); exact, the map
    # being a verified permutation of each block. Measured on this 2-core VM (12 layers, 4 KV
    # heads of 64, fp32, 256-token chunks of 6.3 MB): store 3.2 ms, load 1.3 ms a chunk (whole-page
    # copies: 1.4 / 0.3 ms).

    def _packed_offsets(self, slots: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per layer a 1-D slice of the buffer from its first element, and per valid slot the
        `[S, T', H, E]` offsets of its elements in that slice."""
        g = self.geom
        valid = slots >= 0
        s = slots[valid]
        page, off = s // g.block_size, s % g.block_size
        offs = self._page_map[:, off] + (page * g.stride_b)[None, :, None, None]
        span = int(offs.max()) + 1 if offs.numel() else 1
        starts = [g.offset + layer * g.stride_l for layer in range(g.num_layers)]
        rows = [self.flat[start : start + span] for start in starts]
        return rows, offs, valid

    def _packed_gather(self, flat, geom, slots: torch.Tensor, out: torch.Tensor) -> None:
        rows, offs, _ = self._packed_offsets(slots)
        for s in range(out.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                torch.index_select(row, 0, idx, out=out[s, layer].view(-1))

    def _packed_scatter(self, src: torch.Tensor, flat, geom, slots: torch.Tensor) -> None:
        rows, offs, valid = self._packed_offsets(slots)
        whole = bool(valid.all())
        for s in range(src.shape[0]):
            idx = offs[s].reshape(-1)
            for layer, row in enumerate(rows):
                part = src[s, layer] if whole else src[s, layer][valid]
                row.index_copy_(0, idx, part.reshape(-1))

    def _fills(self, num_blocks: int, num_tokens: int) -> bool:
        """`num_tokens` need exactly `num_blocks` manager blocks (the last one may be partial)."""
        return (num_blocks - 1) * self.block_size < num_tokens <= num_blocks * self.block_size

    def chunk_shape(self, num_blocks: int, num_tokens: int | None = None) -> tuple[int, ...]:
        """Shape of a stored chunk of `num_tokens` tokens (default: all) held by `num_blocks`
        manager blocks."""
        g = self.geom
        if self._opaque:
            return g.chunk_shape(num_blocks * self.pages_per_block)
        t = num_blocks * self.block_size if num_tokens is None else num_tokens
        return (self.kv_split, g.num_layers, t, g.num_heads, g.row_size // self.kv_split)

    def key(self, digest: str) -> str:
        return chunk_key(self.namespace, digest)

    def _meta(self, num_tokens: int) -> dict[str, str]:
        return {**self.meta, "num_tokens": str(num_tokens)}

    def lookup(self, planner: ChunkPlanner, tokens: Sequence[int], extra: Sequence[str] = ()) -> int:
        """Cached prefix length of `tokens` in this process's tiers, in tokens (chunk granular).

        The scheduler asks `PrefixIndex` instead (it sees every rank); this is the one-process
        view, for tools and tests.
        """
        spans = planner.spans(tokens, extra)
        n = self.storage.contains_prefix([self.key(s.digest) for s in spans])
        return spans[n - 1].end if n else 0

    # ------------------------------------------------------------------ holds

    def _hold(self, digest: str, origin: str = "cpu") -> bool:
        """Take the protocol hold on a chunk now complete in the CPU tier (caller has `_lock`);
        `origin` names the tier it came from, for the load counters."""
        key = self.key(digest)
        if key in self._held:
            return False
        cpu = self.storage.cpu
        if cpu is None or not self.storage.keep_in_cpu and digest not in self._prefetching:
            return False
        t = cpu.hold(key)
        if t is None:
            return False
        self._held[key] = t
        self._origin[key] = origin
        self._progress.held.append(digest)
        return True

    def holds(self, digest: str) -> bool:
        with self._lock:
            return self.key(digest) in self._held

    def retire(self) -> list[str]:
        """Held chunks to give up, least recently used first, when held bytes pass the high
        watermark; they stay loadable until `ack_retired`."""
        cpu = self.storage.cpu
        if cpu is None or cpu.max_bytes == 0:
            return []
        with self._lock:
            used = sum(t.nbytes for k, t in self._held.items() if k not in self._retiring)
            # A put refused for want of a block (the arena fragments) also asks for room.
            rejected = cpu.stats["rejected"]
            refused, self._rejected_seen = rejected > self._rejected_seen, rejected
            if used <= self.retire_high * cpu.max_bytes and not refused:
                return []
            out = []
            for key in cpu.keys():  # noqa: SIM118 -- a CpuTier method (LRU order), not a dict
                if used <= self.retire_low * cpu.max_bytes and (out or not refused):
                    break  # (after a refused put, at least one chunk goes)
                t = self._held.get(key)
                if t is None or key in self._retiring:
                    continue
                self._retiring.add(key)
                used -= t.nbytes
                out.append(key[len(self.namespace) :])
            return out

    def ack_retired(self, digests: Sequence[str]) -> None:
        """The scheduler no longer counts these: release and drop them."""
        with self._lock:
            for digest in digests:
                key = self.key(digest)
                if key not in self._retiring:
                    continue
                self._retiring.discard(key)
                t = self._held.pop(key, None)
                self._origin.pop(key, None)
                if t is not None:
                    self.storage.cpu.release(key, t)
                self.storage.cpu.remove(key)

    def drop_all(self) -> list[str]:
        """Release every hold not yet retiring and report them as retiring (reset)."""
        with self._lock:
            out = [k[len(self.namespace) :] for k in self._held if k not in self._retiring]
            self._retiring.update(self._held)
            return out

    # ------------------------------------------------------------------ background progress

    def _advance(self) -> None:
        """Finish the copies on the transfer stream that are done (caller has `_lock`)."""
        still = []
        for f in self._inflight:
            if f.done.query():
                self._complete(f)
            else:
                still.append(f)
        self._inflight = still

    def poll(self) -> Progress:
        """Finish what completed in the background (copies on the transfer stream, prefetches)
        without waiting, and return the chunks now held and the prefetches that failed since
        the last call."""
        with self._lock:
            self._advance()
            out, self._progress = self._progress, Progress()
            return out

    def synchronize(self, prefetch_timeout: float | None = 0.0) -> bool:
        """Wait for every copy on the transfer stream and, up to `prefetch_timeout` seconds
        (None: no limit), for queued prefetches; what completes is reported by the next `poll`.
        True when nothing is left in flight."""
        if self._stream is not None:
            self._stream.synchronize()
        deadline = None if prefetch_timeout is None else time.monotonic() + prefetch_timeout
        while True:
            with self._lock:
                self._advance()
                idle = not self._prefetching and not self._inflight
            if idle or (deadline is not None and time.monotonic() >= deadline):
                return idle
            time.sleep(0.002)

    def _complete(self, f: _InFlight) -> None:
        cpu = self.storage.cpu
        if f.kind == "load":
            cpu.release(f.key, f.tensor)
            return
        # A store: the bytes are in the CPU tier now.
        cpu.release(f.key, f.tensor)
        self.storage.write_back(f.key)
        self._hold(f.digest)

    # ------------------------------------------------------------------ store

    def store(self, digest: str, block_ids: Sequence[int], num_tokens: int) -> bool:
        """Copy the pages of `block_ids` out of the paged cache into the CPU tier.

        vLLM may reuse the blocks as soon as this returns: on CPU the copy is done; on CUDA
        the compute stream waits for the gather before its next kernel. The chunk is reported
        held (`poll`) once its bytes are in the CPU tier; the disk write follows in the
        background. Returns False when the tiers refused the chunk (full of held chunks):
        a future miss, counted.
        """
        n = len(block_ids)
        if not self._fills(n, num_tokens):
            raise ValueError(f"{num_tokens} tokens do not fill {n} blocks of {self.block_size}")
        key = self.key(digest)
        if self.storage.contains(key):
            return True
        t0 = time.perf_counter()
        shape = self.chunk_shape(n, num_tokens)
        if self.flat.is_cuda:
            ok = self._store_cuda(digest, key, block_ids, shape, num_tokens)
        else:
            ids = self._ids(block_ids, num_tokens)
            # Gather straight into the CPU tier's pooled buffer: one copy, no allocation.
            with self._lock:
                ok = self.storage.put_fill(
                    key, self.flat.dtype, shape, lambda dst: self._gather(self.flat, self.geom, ids, dst),
                    self._meta(num_tokens),
                )
                if ok:
                    self._hold(digest)
        self.stats.store_seconds += time.perf_counter() - t0
        if ok:
            self.stats.stored_chunks += 1
            self.stats.stored_bytes += math.prod(shape) * self.flat.element_size()
        else:
            self.stats.store_errors += 1
        return ok

    def _store_cuda(self, digest: str, key: str, block_ids, shape, num_tokens: int) -> bool:
        compute = torch.cuda.current_stream(self.flat.device)
        side = self._stream
        side.wait_stream(compute)  # the pages are written by kernels queued so far
        with torch.cuda.stream(side):
            ids = self._ids(block_ids, num_tokens)
            staged = torch.empty(shape, dtype=self.flat.dtype, device=self.flat.device)
            self._gather(self.flat, self.geom, ids, staged)
            gathered = torch.cuda.Event()
            gathered.record(side)
            with self._lock:
                # The device->host copy lands in the tier's pinned buffer, held until it is
                # done (never evicted or reused under the DMA); the disk write waits for it.
                ok = self.storage.put_fill(
                    key, self.flat.dtype, shape, lambda dst: dst.copy_(staged, non_blocking=True),
                    self._meta(num_tokens), write_back=False,
                )
                held = self.storage.cpu.hold(key) if ok else None
            done = torch.cuda.Event()
            done.record(side)
        # vLLM may hand the blocks to another request: its kernels run after our gather only.
        compute.wait_event(gathered)
        if held is None:
            return False
        with self._lock:
            self._inflight.append(_InFlight("store", digest, key, done, held))
        return True

    # ------------------------------------------------------------------ load

    def load(self, digest: str, block_ids: Sequence[int], skip_blocks: int = 0) -> bool:
        """Scatter a held chunk into `block_ids` (before this step's forward reads them).

        Args:
            digest: the chunk's digest; it must be held (the scheduler promised it).
            block_ids: the blocks that hold the chunk's tokens, in order.
            skip_blocks: leading blocks not to overwrite (vLLM already holds them).

        Returns:
            False when the chunk is not held or is of another shape: nothing was written.
        """
        t0 = time.perf_counter()
        key = self.key(digest)
        cpu = self.storage.cpu
        with self._lock:
            tensor = cpu.hold(key, count=True) if cpu is not None and key in self._held else None
        expected, num_tokens = None, 0
        if tensor is not None:
            n = len(block_ids)
            num_tokens = n * self.block_size if self._opaque or tensor.dim() != 5 else int(tensor.shape[2])
            if self._fills(n, num_tokens):
                expected = self.chunk_shape(n, num_tokens)
        if tensor is None or tuple(tensor.shape) != expected or tensor.dtype != self.flat.dtype:
            if tensor is not None:
                logger.warning(
                    "chunk %s has shape %s %s, expected %s %s: not loaded",
                    digest[:12], tuple(tensor.shape), tensor.dtype, expected, self.flat.dtype,
                )
                cpu.release(key, tensor)
            self.stats.load_errors += 1
            return False
        nbytes = tensor.numel() * tensor.element_size()
        skip_tokens = skip_blocks * self.block_size
        if skip_tokens >= num_tokens:
            cpu.release(key, tensor)
        elif self.flat.is_cuda:
            compute = torch.cuda.current_stream(self.flat.device)
            side = self._stream
            side.wait_stream(compute)  # blocks freshly handed to this request may still be read
            with torch.cuda.stream(side):
                dev = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.flat.device)
                dev.copy_(tensor, non_blocking=True)  # whole chunk from pinned memory: async
                ids = self._ids(block_ids, num_tokens, skip_tokens)
                self._scatter(self._skipped(dev, skip_blocks), self.flat, self.geom, ids)
                done = torch.cuda.Event()
                done.record(side)
            compute.wait_event(done)  # this step's forward reads the loaded pages
            with self._lock:
                self._inflight.append(_InFlight("load", digest, key, done, tensor))
        else:
            try:
                ids = self._ids(block_ids, num_tokens, skip_tokens)
                self._scatter(self._skipped(tensor, skip_blocks), self.flat, self.geom, ids)
            finally:
                cpu.release(key, tensor)
        self.stats.load_seconds += time.perf_counter() - t0
        self.stats.loaded_chunks += 1
        self.stats.loaded_bytes += nbytes
        origin = self._origin.get(key, "cpu")
        self.stats.loaded_from[origin] = self.stats.loaded_from.get(origin, 0) + 1
        return True

    def _skipped(self, chunk: torch.Tensor, skip_blocks: int) -> torch.Tensor:
        """What the scatter writes: token rows skip by slot (-1); opaque pages by slicing."""
        if not self._opaque or not skip_blocks:
            return chunk
        return chunk[:, skip_blocks * self.pages_per_block :].contiguous()

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, digests: Sequence[str]) -> None:
        """Bring these chunks from the slower tiers into the CPU tier, verified, in the
        background; each ends in `poll()` as held or failed."""
        todo = []
        with self._lock:
            for d in digests:
                if self.key(d) in self._held or d in self._prefetching:
                    continue
                self._prefetching.add(d)
                todo.append(d)
            if not todo:
                return
            if self._prefetch_q is None:
                self._prefetch_q = queue.Queue()
                self._prefetch_thread = threading.Thread(
                    target=self._prefetcher, name="lmcache-triton-prefetch", daemon=True
                )
                self._prefetch_thread.start()
        for d in todo:
            self._prefetch_q.put(d)

    def _prefetcher(self) -> None:
        while True:
            digest = self._prefetch_q.get()
            if digest is None:
                return
            ok = False
            try:
                ok = self._prefetch_one(digest)
            except Exception:  # a hostile file must never take the worker down
                logger.exception("lmcache_triton: prefetch of chunk %s failed", digest[:12])
            with self._lock:
                self._prefetching.discard(digest)
                if ok:
                    self.stats.prefetched_chunks += 1
                else:
                    self.stats.prefetch_errors += 1
                    self._progress.failed.append(digest)

    def _prefetch_one(self, digest: str) -> bool:
        key = self.key(digest)
        if self.storage.cpu is None:
            return False
        with self._lock:
            if key in self._held:
                return True
            if any(f.key == key for f in self._inflight):
                return False  # its store is still copying: it is reported held when done
            if self.storage.cpu.contains(key) and key not in self._retiring:
                return self._hold(digest) or key in self._held
        # Read and verify outside the lock (seconds on a slow disk); the put takes it.
        ok = self.storage.prefetch(
            key, expect=self.meta, lock=self._lock, on_stored=lambda tier="disk": self._hold(digest, tier)
        )
        return ok and self.holds(digest)

    def close(self) -> None:
        if self._prefetch_q is not None:
            self._prefetch_q.put(None)
        if self.flat is not None:
            self.synchronize()
