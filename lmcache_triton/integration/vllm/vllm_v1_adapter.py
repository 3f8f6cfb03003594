"""vLLM V1 KV connector: LMCache-style chunk reuse over lmcache_triton's engine and tiers.

`LMCacheConnectorV1Dynamic` is the class vLLM loads (`kv_connector_module_path` =
`lmcache_triton.integration.vllm.vllm_v1_adapter`, or the name `LMCacheTritonConnector`
registered by our `vllm.general_plugins` entry point); it delegates every call to
`LMCacheConnectorV1Impl(vllm_config, role, parent)`, the core.

Scheduler role (EngineCore process):
  get_num_new_matched_tokens  whole chunks beyond vLLM's own prefix hit that EVERY rank holds in
                              memory (verified, pinned against eviction), at least one prompt
                              token left to compute. Chunks that are only on disk or on the
                              remote server (`remote_url`: one pipelined presence check for all of
                              a request's candidate chunks and ranks) are prefetched in the
                              background and the answer is None ("ask again"): the request waits
                              (at most PREFETCH_WAIT_S) while others run.
  update_state_after_alloc    remembers the load plan of a request that got external tokens.
  build_connector_meta        per step: loads (chunk -> blocks), stores (chunks that became fully
                              computed this step and are not held yet), prefetches, and the
                              acknowledgements of chunks the workers retire.
  get_external_cache_hit_sources  labels a hit "disk" (the request waited for those chunks to be
                              read from disk) or "host" (they were in the CPU tier).
  reset_cache                 /reset_prefix_cache?reset_external=true: later keys carry a new
                              epoch, so nothing stored before is served after.
  (kv_transfer_params {"lmcache.skip_save": true} on a request: nothing of it is stored.)
  update_connector_output     applies the workers' reports (chunks now held, retiring, dropped,
                              prefetches that failed) to the scheduler's `PrefixIndex`.
  take_events                 with vLLM's KV events on (`--kv-events-config`): BlockStored /
                              BlockRemoved for chunks in our tiers, published by vLLM's
                              scheduler (kv_events.py).
Worker role (each Worker process):
  register_kv_caches          adopts the per-layer views of vLLM's one backing buffer.
  start_load_kv               copies promised chunks from the CPU tier into the paged cache (on
                              CUDA on the engine's own stream; the compute stream waits on an
                              event, the host never does), frees acknowledged retirements, and
                              queues prefetches. No disk read ever runs in the step.
  save_kv_layer               nothing: all layers are saved in ONE launch in wait_for_save.
  wait_for_save               gathers the pages of the step's completed chunks (one kernel
                              launch for all layers) into the CPU tier; on CUDA the device-to-host
                              copy finishes behind on the side stream and vLLM's next kernels
                              wait only for the gather, so the blocks are free at once. Disk
                              writes run in the background, bounded by the CPU tier.
  build_connector_worker_meta reports chunks that became held, retiring and dropped.
  get_kv_connector_kv_cache_events  (KV events on) chunks this rank's disk and remote tiers wrote
                              and dropped, for the scheduler to announce (kv_events.py).
  handle_preemptions          not needed: no copy out of a block outlives the step's gather.
  get_block_ids_with_load_errors  blocks of chunks that failed to load. Nothing promised can be
                              missing (the worker holds it), so this is a last safety net: it
                              stays empty under vLLM's default kv_load_failure_policy ("fail").

kv_role (vLLM's kv_transfer_config): `kv_producer` stores and never loads, `kv_consumer` loads
and never stores, `kv_both` (default) both: a prefill instance and a decode instance sharing a
remote tier.

Invariants: the scheduler counts a chunk only when every rank holds it in memory; a held chunk is
freed only after the scheduler acknowledged its retirement, so every load planned before reaches
its bytes; loads never write blocks vLLM already computed; a failed load writes nothing and is
reported.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from lmcache_triton.config import LMCacheConfig, load_config
from lmcache_triton.engine import ChunkPlanner, ChunkSpan, KVCacheEngine, PrefixIndex
from lmcache_triton.hashing import key_namespace
from lmcache_triton.integration.vllm import compat
from lmcache_triton.integration.vllm.kv_events import kv_events_enabled

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_triton")

# How long a request waits, in all, for its chunks to come from disk into memory before it is
# scheduled without them (what did not arrive is computed).
PREFETCH_WAIT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Metadata passed scheduler -> workers and back
# ---------------------------------------------------------------------------------------------


@dataclass
class ChunkOp:
    """Move one chunk: `digest` <-> the pages of `block_ids` (`skip_blocks` leading ones are
    not written on load)."""

    digest: str
    block_ids: list[int]
    num_tokens: int
    skip_blocks: int = 0


@dataclass
class LMCacheTritonMetadata(KVConnectorMetadata):
    loads: dict[str, list[ChunkOp]] = field(default_factory=dict)
    stores: list[ChunkOp] = field(default_factory=list)
    # CacheBlend (blend_connector.py): req -> BlendOp.
    blends: dict[str, Any] = field(default_factory=dict)
    # Chunk digests to bring from disk into the workers' CPU tiers (verified) in the background.
    prefetches: list[str] = field(default_factory=list)
    # rank -> digests the worker retired and the scheduler no longer counts: free them.
    retire_acks: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class LMCacheTritonWorkerMetadata(KVConnectorWorkerMetadata):
    """Per rank: (digests now held in its CPU tier, digests it is retiring (to be acknowledged),
    digests that left its CPU tier, prefetches that failed)."""

    reports: dict[int, tuple[list[str], list[str], list[str], list[str]]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LMCacheTritonWorkerMetadata)
        merged = dict(self.reports)
        for rank, lists in other.reports.items():
            old = merged.get(rank, ([], [], [], []))
            merged[rank] = tuple(a + b for a, b in zip(old, lists, strict=True))
        return LMCacheTritonWorkerMetadata(merged)


class LMCacheTritonStats(KVConnectorStats):
    """Worker counters for one interval; summed across ranks and steps."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {
            "loaded_tokens": d.get("loaded_tokens", 0),
            "loaded_chunks": d.get("loaded_chunks", 0),
            "loaded_MB": round(d.get("loaded_bytes", 0) / 2**20, 2),
            "load_ms": round(d.get("load_seconds", 0.0) * 1e3, 2),
            "stored_chunks": d.get("stored_chunks", 0),
            "stored_MB": round(d.get("stored_bytes", 0) / 2**20, 2),
            "store_ms": round(d.get("store_seconds", 0.0) * 1e3, 2),
            "load_errors": d.get("load_errors", 0),
            "store_errors": d.get("store_errors", 0),
            "prefetched_chunks": d.get("prefetched_chunks", 0),
            "prefetch_errors": d.get("prefetch_errors", 0),
        }
        for k, v in d.items():
            if k.startswith("loaded_chunks_"):
                out[k] = v
            elif k.startswith("blend_"):  # CacheBlend counters (blend_connector.py)
                out[k] = round(v * 1e3, 2) if k == "blend_seconds" else v
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LMCacheTritonPromMetrics(KVConnectorPromMetrics):
    """Counters on vLLM's /metrics: `vllm:lmcache_triton_<name>_total`."""

    COUNTERS = {
        "loaded_tokens": "Tokens whose KV was loaded from lmcache_triton",
        "loaded_chunks": "Chunks loaded from lmcache_triton",
        "loaded_bytes": "Bytes loaded into the paged cache",
        "load_seconds": "Seconds spent loading chunks",
        "stored_chunks": "Chunks stored into lmcache_triton",
        "stored_bytes": "Bytes copied out of the paged cache",
        "store_seconds": "Seconds spent copying chunks out",
        "load_errors": "Chunks that failed to load (recomputed by vLLM)",
        "store_errors": "Chunks the tiers refused",
        "loaded_chunks_cpu": "Chunks loaded from the CPU tier",
        "loaded_chunks_disk": "Chunks loaded after a prefetch from the disk tier",
        "loaded_chunks_remote": "Chunks loaded after a prefetch from the remote tier (remote_url)",
        "prefetched_chunks": "Chunks read from disk into memory, verified, in the background",
        "prefetch_errors": "Prefetches that found a missing, damaged or foreign file (a miss)",
        "blend_requests": "Requests prefilled by CacheBlend",
        "blend_reused_tokens": "Prompt tokens whose cached KV CacheBlend reused (not recomputed)",
        "blend_recomputed_tokens": "Prompt tokens CacheBlend recomputed (selected cached tokens and new text)",
        "blend_errors": "Blends that failed in the worker (the prompt was computed in full instead)",
        "blend_fallbacks": "Failed blends whose prompt the worker computed in full",
        "blend_seconds": "Seconds spent blending in the worker",
    }

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for name, doc in self.COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:lmcache_triton_{name}", documentation=doc, labelnames=labelnames
            )
            self._counters[name] = self.create_metric_per_engine(counter)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, per_engine in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                per_engine[engine_idx].inc(value)

    def create_metric_per_engine(self, metric):
        return {idx: metric.labels(*vals) for idx, vals in self.per_engine_labelvalues.items()}


# ---------------------------------------------------------------------------------------------
# The core
# ---------------------------------------------------------------------------------------------


@dataclass
class _RequestState:
    spans: list[ChunkSpan]
    prompt_len: int
    request: Any = None  # vLLM's Request (its all_token_ids grows while decoding)
    extra: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_handled: int = 0  # leading chunks already stored, loaded or known cached
    skip_save: bool = False  # kv_transfer_params {"lmcache.skip_save": true}: never stored


def kv_replicas(vllm_config: VllmConfig) -> int:
    """How many tensor-parallel ranks hold the same KV: all of them for MLA (one latent vector
    per token, not split by heads), `tp // KV heads` when there are more ranks than KV heads
    (vLLM gives each head to that many consecutive ranks), else 1."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp <= 1:
        return 1
    mc = vllm_config.model_config
    if getattr(mc, "use_mla", False):
        return tp
    heads = mc.get_total_num_kv_heads()
    return tp // heads if 0 < heads < tp else 1


def first_replica(rank: int, tp_size: int, replicas: int) -> int:
    """The rank whose keys (and disk files) `rank` shares: the first of its group of `replicas`
    consecutive tensor-parallel ranks in its pipeline stage (ranks are `pp * tp_size + tp`)."""
    return rank - (rank % tp_size) % replicas


def _producer(vllm_config: VllmConfig) -> tuple[str, str]:
    """The model's name and a fingerprint of what produces its KV: the weights vLLM loads (a
    stat of every weight and config file of a local directory, or the hub revision) and the
    quantisation. Computed alike in the scheduler and the workers."""
    from lmcache_triton.identity import model_fingerprint

    mc = vllm_config.model_config
    weights = model_fingerprint(
        str(mc.model),
        getattr(mc, "revision", None),
        getattr(mc, "code_revision", None),
        getattr(getattr(vllm_config, "load_config", None), "download_dir", None),
    )
    quant = getattr(mc, "quantization", None) or "none"
    return str(mc.model), f"{weights}-q:{quant}"


def _layout_fingerprint(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> tuple[str, Any]:
    """The shape of a token row (attention kind, KV heads, head size, dtype), computed alike in
    the scheduler and the workers.

    Chunks are stored as token rows (engine.py), so neither vLLM's block size nor the attention
    backend's page size or layout is part of it: a chunk stored at block size 128 loads at 32.
    """
    groups = [g for g in kv_cache_config.kv_cache_groups if getattr(g, "enable_kv_transfer", True)]
    if len(groups) != 1:
        raise ValueError(
            f"lmcache_triton supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid attention). Run without the connector."
        )
    spec = groups[0].kv_cache_spec
    parts = [
        "rows",
        type(spec).__name__,
        f"h{getattr(spec, 'num_kv_heads', 1)}",
        f"d{spec.head_size}",
        str(spec.dtype).replace("torch.", ""),
    ]
    return "-".join(parts), spec


def _row_form(spec: Any, views: list[torch.Tensor], vllm_config: VllmConfig) -> dict[str, Any]:
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


class LMCacheConnectorV1Impl:
    """The connector's core. See the module docstring for what each role does.

    Args:
        vllm_config: vLLM's config; `kv_transfer_config.kv_connector_extra_config` keys
            `lmcache.*` override the LMCACHE_* variables and the LMCACHE_CONFIG_FILE YAML.
        role: SCHEDULER or WORKER.
        parent: the `KVConnectorBase_V1` vLLM loaded (gives access to bound metadata).
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1):
        self.parent = parent
        self.role = role
        self.vllm_config = vllm_config
        kv_cache_config = parent._kv_cache_config
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        # Warnings once per server: the scheduler's; the workers (own processes) stay quiet.
        self.config: LMCacheConfig = load_config(extra, warn=role == KVConnectorRole.SCHEDULER)

        self.layout, self.spec = _layout_fingerprint(vllm_config, kv_cache_config)
        self.block_size = self.spec.block_size
        self.planner = ChunkPlanner(self.config, self.block_size)
        pc = vllm_config.parallel_config
        self.world_size = pc.tensor_parallel_size * pc.pipeline_parallel_size
        self.tp_size = pc.tensor_parallel_size
        self.kv_replicas = compat.kv_tp_replicas(kv_cache_config, kv_replicas(vllm_config))  # 0.33+: vLLM's
        model, producer = _producer(vllm_config)
        # vLLM stores fp8_e4m3 and fp8_e5m2 alike as uint8: the spec's dtype alone cannot tell them
        # apart, the configured cache dtype can.
        kv_dtype = f"{str(self.spec.dtype).replace('torch.', '')}/{vllm_config.cache_config.cache_dtype}"
        self.key_meta = {
            "model": str(model),
            "producer": producer,
            "layout": self.layout,
            "kv_dtype": kv_dtype,
            "chunk_size": str(self.config.chunk_size),
            "world_size": str(self.world_size),
        }
        kv_role = getattr(vllm_config.kv_transfer_config, "kv_role", None) or "kv_both"
        self.loads_enabled = kv_role != "kv_producer"
        self.stores_enabled = kv_role != "kv_consumer"
        self.namespaces = [
            # Ranks holding the same KV share the first replica's keys: one file on disk, not one per rank.
            key_namespace(
                f"{model}@{producer}", self.world_size, first_replica(r, self.tp_size, self.kv_replicas), kv_dtype,
                self.config.chunk_size, self.layout,
            )
            for r in range(self.world_size)
        ]
        # The blender slot: CacheBlend halves (blend_connector.py), set per role when
        # enable_blending is on.
        self._blend = None
        self._blend_worker = None
        # vLLM KV events for our tiers (kv_events.py), set by the scheduler when the user enabled them.
        self._events = None

        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker()

    # -- scheduler ------------------------------------------------------------------------------

    def _init_scheduler(self) -> None:
        from lmcache_triton.storage.factory import build_remote

        disk_dir = self.config.local_disk if self.config.max_local_disk_bytes > 0 else None
        # Lookups only (no writer): the workers read and write chunks.
        self._remote = build_remote(self.config, writer=False) if self.loads_enabled else None
        self.index = PrefixIndex(self.namespaces, disk_dir, remote=self._remote)
        self._states: dict[str, _RequestState] = {}
        self._prefetching: dict[str, float] = {}  # digest -> monotonic deadline
        self._to_prefetch: list[str] = []  # goes out with the next metadata
        self._waiting: dict[str, float] = {}  # req -> deadline of its wait for prefetches
        self._acks: dict[int, list[str]] = {}  # rank -> retirements to acknowledge
        self._lookups: dict[str, tuple[int, int]] = {}  # req -> (local tokens, cached tokens)
        self._load_plans: dict[str, tuple[int, int]] = {}  # req -> (first token, end token)
        self._hit_tokens = 0
        self._query_tokens = 0
        self._last_log = time.monotonic()
        self._epoch = 0  # bumped by reset_cache(); folded into every key (see reset_cache)
        self._disk_waits: dict[str, set[str]] = {}  # req -> digests it waited for from disk
        if kv_events_enabled(self.vllm_config):
            from lmcache_triton.integration.vllm.kv_events import TierEvents, TierState

            hbs = getattr(self.parent._kv_cache_config, "hash_block_size", None) or self.block_size
            self._events = TierEvents(hbs, self.config.chunk_size)
            self._tier_state = {"disk": TierState(self.namespaces), "remote": TierState(self.namespaces)}
        logger.info(
            "lmcache_triton scheduler: chunk_size=%d block_size=%d world_size=%d layout=%s disk=%s",
            self.config.chunk_size, self.block_size, self.world_size, self.layout, self.config.local_disk,
        )
        if self.config.enable_blending:
            from lmcache_triton.integration.vllm.blend_connector import make_blend_scheduler

            self._blend = make_blend_scheduler(self)

    def _state(self, request: Request) -> _RequestState:
        st = self._states.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            extra = _extra_keys(request)
            if self._epoch:
                extra.append(f"epoch:{self._epoch}")
            st = _RequestState(self.planner.spans(tokens, extra), len(tokens), request, extra)
            st.skip_save = skip_save_requested(request)
            self._states[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.prompt_token_ids is None or request.num_prompt_tokens < 2:
            return 0, False
        st = self._state(request)  # stores are planned from it
        if not self.loads_enabled:  # kv_producer
            return 0, False
        n = self.index.cached_prefix(st.spans, num_computed_tokens)
        if self._wait_for_prefetch(request.request_id, st.spans[n:], num_computed_tokens):
            return None, False  # vLLM asks again next step; other requests run meanwhile
        cached = min(st.spans[n - 1].end if n else 0, st.prompt_len - 1)
        if self._blend is not None:
            hit = self._blend.lookup(request, num_computed_tokens, cached)
            if hit > 0:
                self._lookups[request.request_id] = (num_computed_tokens, num_computed_tokens + hit)
                return hit, False
        if cached < max(self.config.min_retrieve_tokens, 1) or cached <= num_computed_tokens:
            self._lookups.pop(request.request_id, None)
            return 0, False
        self._lookups[request.request_id] = (num_computed_tokens, cached)
        return cached - num_computed_tokens, False

    def _wait_for_prefetch(self, req_id: str, rest: list[ChunkSpan], num_computed_tokens: int) -> bool:
        """Start background reads of the leading chunks of `rest` that are on disk or on the
        remote server (asked once per call, in one round trip, for all the candidates), and tell
        whether the request should wait for them. A request waits at most
        `PREFETCH_WAIT_S` in all; what is not in memory by then is computed."""
        now = time.monotonic()
        want = []
        remote: set[str] | None = None  # asked once, for all the remaining candidates
        for i, span in enumerate(rest):
            if span.end <= num_computed_tokens:
                continue
            d = span.digest
            if d in self._prefetching and self._prefetching[d] > now:
                want.append(d)
                continue
            on_disk = self.index.on_disk(d)
            if not on_disk and remote is None and self.index.remote is not None:
                asked = [s.digest for s in rest[i:] if s.digest not in self._prefetching]
                remote = self.index.on_remote(asked)
                if self._events is not None:  # the server evicted them (or they are unusable)
                    gone = self._tier_state["remote"].drop(d for d in asked if d not in remote)
                    self._events.sync("remote", gone, self._tier_state["remote"].present)
            if on_disk or d in (remote or ()):
                if self._events is not None and req_id in self._states:
                    self._events.remember(self._states[req_id].request, span.start, span.end, d)
                    # Found there (e.g. written before a restart, or by another instance): announced.
                    state = self._tier_state["disk" if on_disk else "remote"]
                    state.apply((ns, "+", d) for ns in self.namespaces)
                    self._events.sync("disk" if on_disk else "remote", [d], state.present)
                self._prefetching[d] = now + PREFETCH_WAIT_S
                self._to_prefetch.append(d)
                want.append(d)
            else:
                break
        if not want:
            self._waiting.pop(req_id, None)
            return False
        self._disk_waits.setdefault(req_id, set()).update(want)  # hit-source labels
        deadline = self._waiting.setdefault(req_id, now + PREFETCH_WAIT_S)
        if now < deadline:
            # vLLM asks again at once, and an in-process worker's prefetch thread needs the GIL
            # to make progress: hand it over (a no-op when no other thread wants it). Measured:
            # a 4k-token disk hit waited 1.1-1.5 s for its chunks without this.
            time.sleep(0)
            return True
        self._waiting.pop(req_id, None)
        return False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        local, _ = self._lookups.pop(request.request_id, (request.num_computed_tokens, 0))
        self._query_tokens += max(request.num_prompt_tokens - local, 0)
        if num_external_tokens > 0:
            self._load_plans[request.request_id] = (local, local + num_external_tokens)
            self._hit_tokens += num_external_tokens
        if self._blend is not None:
            self._blend.after_alloc(request, num_external_tokens)

    def _plan_load(self, req_id: str, st: _RequestState, meta: LMCacheTritonMetadata) -> None:
        plan = self._load_plans.pop(req_id, None)
        if plan is None:
            return
        first, end = plan
        ops = []
        for span in st.spans:
            if span.end <= first or span.start >= end:
                continue
            blocks = self.planner.blocks_of(span, st.block_ids)
            skip = max(first - span.start, 0) // self.block_size
            ops.append(ChunkOp(span.digest, blocks, span.num_tokens, skip))
        if ops:
            meta.loads[req_id] = ops
            # Loaded chunks are cached: never store them again.
            st.num_handled = max(st.num_handled, sum(1 for s in st.spans if s.start < end))

    def _extend_for_decode(self, st: _RequestState, computed: int) -> None:
        """save_decode_cache: add the whole chunks that decoding has filled (prompt + output
        tokens), so a follow-up turn that repeats the conversation hits them too."""
        cs = self.config.chunk_size
        n_full = computed // cs
        have_full = sum(1 for s in st.spans if s.num_tokens == cs)
        if n_full <= have_full or st.request is None:
            return
        tokens = list(st.request.all_token_ids[: n_full * cs])
        if len(tokens) < n_full * cs:
            return
        # The prompt's partial chunk (already stored under its own key) gives way to the
        # whole chunk that now covers those tokens.
        st.num_handled = min(st.num_handled, have_full)
        st.spans = self.planner.spans(tokens, st.extra)

    def _plan_stores(self, st: _RequestState, computed: int, meta: LMCacheTritonMetadata) -> None:
        if st.skip_save or not self.stores_enabled:  # per-request opt-out, or kv_consumer
            return
        if self.config.save_decode_cache and computed > st.prompt_len:
            self._extend_for_decode(st, computed)
        while st.num_handled < len(st.spans):
            span = st.spans[st.num_handled]
            if span.end > computed:
                break
            if not self.index.has(span.digest):
                meta.stores.append(ChunkOp(span.digest, self.planner.blocks_of(span, st.block_ids), span.num_tokens))
                if self._events is not None:
                    self._events.remember(st.request, span.start, span.end, span.digest)
            st.num_handled += 1

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LMCacheTritonMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._states.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if self._blend is None or not self._blend.plan_blend(new.req_id, st, meta, self._load_plans):
                self._plan_load(new.req_id, st, meta)
            computed = new.num_computed_tokens + sched.get(new.req_id, 0)
            self._plan_stores(st, computed, meta)
            if self._blend is not None and not st.skip_save:
                self._blend.register_segments(new.req_id, st, computed)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._states.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in compat.resumed_req_ids(cached):  # 0.34: resumed ones come as new
                st.block_ids = list(new_blocks[0]) if new_blocks is not None else []
                self._plan_load(req_id, st, meta)
            elif new_blocks is not None:
                st.block_ids.extend(new_blocks[0])
            computed = cached.num_computed_tokens[i] + sched.get(req_id, 0)
            self._plan_stores(st, computed, meta)
            if self._blend is not None and not st.skip_save:
                self._blend.register_segments(req_id, st, computed)
        if self._to_prefetch:
            meta.prefetches, self._to_prefetch = self._to_prefetch, []
        if self._acks:
            meta.retire_acks, self._acks = self._acks, {}
        self._maybe_log()
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, LMCacheTritonWorkerMetadata):
            for rank, (held, retiring, removed, failed) in wm.reports.items():
                self.index.report(rank, held, [*retiring, *removed], failed)
                if retiring:
                    self._acks.setdefault(rank, []).extend(retiring)
                for d in (*held, *failed):
                    self._prefetching.pop(d, None)
        if self._events is not None:
            self._update_events(wm, connector_output.kv_cache_events)

    def _update_events(self, wm: Any, tier_writes: Any) -> None:
        """Turn this step's worker reports into vLLM KV events (kv_events.py): chunks every rank
        now holds in its CPU tier / has written to disk or the remote server, and chunks that
        left."""
        from lmcache_triton.integration.vllm.kv_events import TierWrites

        try:
            if isinstance(wm, LMCacheTritonWorkerMetadata):
                touched = [d for lists in wm.reports.values() for part in lists[:3] for d in part]
                if touched:
                    self._events.sync("cpu", touched, self.index.has)
            if isinstance(tier_writes, TierWrites) and tier_writes.items:
                for tier, state in self._tier_state.items():
                    touched = state.apply(it[1:] for it in tier_writes.items if it[0] == tier)
                    if touched:
                        self._events.sync(tier, touched, state.present)
        except Exception:  # events are best effort: never into the step
            logger.exception("lmcache_triton: KV events for this step failed")

    def take_events(self) -> list:
        """vLLM's scheduler publishes these after each step (through its own publisher)."""
        return self._events.take() if self._events is not None else []

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        rid = request.request_id
        self._states.pop(rid, None)
        self._disk_waits.pop(rid, None)
        self._lookups.pop(rid, None)
        self._load_plans.pop(rid, None)
        self._waiting.pop(rid, None)
        if self._blend is not None:
            self._blend.finished(rid)
        # A save reads the blocks before vLLM's next kernel runs (on CUDA the compute stream
        # waits for the gather): nothing of ours holds them after this step.
        return False, None

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        """vLLM's hit-source labels: tokens of chunks this request waited for from disk are
        "disk", the others were in the CPU tier already: "host"."""
        if num_external_tokens <= 0:
            return {}
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        rid = request.request_id
        disk, st, plan = self._disk_waits.get(rid), self._states.get(rid), self._load_plans.get(rid)
        from_disk = 0
        if disk and st is not None and plan is not None:
            first, end = plan
            for span in st.spans:
                if span.digest in disk and span.end > first and span.start < end:
                    from_disk += min(span.end, end) - max(span.start, first)
        from_disk = min(from_disk, num_external_tokens)
        sources = {CacheHitSource.DISK: from_disk, CacheHitSource.HOST: num_external_tokens - from_disk}
        return {k: v for k, v in sources.items() if v}

    def reset_cache(self) -> bool | None:
        """vLLM's `reset_prefix_cache(reset_connector=True)` (`POST /reset_prefix_cache?
        reset_external=true`, e.g. after a weight update): no chunk stored before it is served
        after it. Every later key carries a new epoch, so old chunks never match again and age
        out of the tiers by LRU; no file is deleted (`lmcache-triton clear` does that). The epoch
        is not persisted: after a restart the model is loaded from its files again and the
        chunks of epoch 0 (computed with those weights) are valid again."""
        if self.role != KVConnectorRole.SCHEDULER:
            return None
        self._epoch += 1
        if self._events is not None:
            self._events.reset()
        logger.info("lmcache_triton: cache reset (epoch %d): earlier chunks are not served again", self._epoch)
        return True

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < 10.0 or not self._query_tokens:
            return
        logger.info(
            "lmcache_triton: %d of %d prompt tokens beyond vLLM's prefix cache hit the cache (%.1f%%)",
            self._hit_tokens, self._query_tokens, 100.0 * self._hit_tokens / self._query_tokens,
        )
        self._hit_tokens = self._query_tokens = 0
        self._last_log = now

    # -- worker ---------------------------------------------------------------------------------

    def _init_worker(self) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        from lmcache_triton.storage.factory import build_storage

        self.rank = get_pp_group().rank_in_group * self.tp_size + get_tensor_model_parallel_rank()
        self.storage = build_storage(self.config, track_cpu_removals=True)
        self._disk_failed_seen = 0  # disk write failures already reported as store_errors
        self._remote_failed_seen = 0  # the same for the remote tier
        if first_replica(self.rank, self.tp_size, self.kv_replicas) != self.rank:
            self.storage.write_disk = False  # the first replica writes the shared file (and remote key)
        self.engine = KVCacheEngine(self.storage, self.namespaces[self.rank], self.key_meta)
        # vLLM KV events (kv_events.py): this rank reports its disk and remote tiers' writes and drops.
        self._tier_events = []
        if kv_events_enabled(self.vllm_config):
            self._tier_events = [(n, t) for n, t in (("disk", self.storage.disk), ("remote", self.storage.remote)) if t]
            for _, tier in self._tier_events:
                tier.track_changes()
        self._invalid_blocks: set[int] = set()
        self._ns_len = len(self.namespaces[self.rank])
        logger.info("lmcache_triton worker rank %d: %s", self.rank, self.storage)
        if self.config.enable_blending:
            from lmcache_triton.integration.vllm.blend_connector import BlendWorker

            self._blend_worker = BlendWorker(self)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        kv_cache_config = self.parent._kv_cache_config
        names: list[str] = []
        for t in kv_cache_config.kv_cache_tensors:
            names.extend(n for n in t.layers if n in kv_caches and n not in names)
        names.extend(n for n in kv_caches if n not in names)
        views = [kv_caches[n] for n in names]
        self.engine.register(views, self.block_size, **_row_form(self.spec, views, self.vllm_config))
        logger.info(
            "lmcache_triton: registered %d layers, geometry %s", len(names), self.engine.geom
        )
        if self._blend_worker is not None:
            self._blend_worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self.parent._get_connector_metadata()
        assert isinstance(meta, LMCacheTritonMetadata)
        # Loads read only chunks this worker holds (the scheduler promised nothing else):
        # CPU-tier copies, asynchronous on CUDA. Disk reads happen in the background only.
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
        if meta.prefetches:
            self.engine.prefetch(meta.prefetches)

    def _load_one(self, req_id: str, op: ChunkOp) -> bool:
        try:
            return self.engine.load(op.digest, op.block_ids, op.skip_blocks)
        except Exception:  # a damaged chunk must never take the server down
            logger.exception("lmcache_triton: loading chunk %s of %s failed", op.digest[:12], req_id)
            self.engine.stats.load_errors += 1
            return False

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs):
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

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        progress = self.engine.poll()
        retiring = self.engine.retire()
        removed = [k[self._ns_len :] for k in self.storage.take_removed_cpu()]
        held = progress.held  # prefix chunks and CacheBlend segments alike
        if not (held or retiring or removed or progress.failed):
            return None
        return LMCacheTritonWorkerMetadata({self.rank: (held, retiring, removed, progress.failed)})

    def get_kv_connector_kv_cache_events(self) -> Any:
        """The chunks this rank's disk and remote tiers wrote and dropped since the last step,
        for the scheduler (kv_events.py: it alone knows their block hashes and publishes)."""
        if self.role != KVConnectorRole.WORKER or not self._tier_events:
            return None
        from lmcache_triton.integration.vllm.kv_events import TierWrites

        try:
            ns = self.namespaces[self.rank]
            items = [
                (name, ns, op, k[self._ns_len :])
                for name, tier in self._tier_events
                for op, k in tier.take_changes()
                if k.startswith(ns)
            ]
            return TierWrites(items) if items else None
        except Exception:  # never into the step
            logger.exception("lmcache_triton: collecting disk-tier KV events failed")
            return None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.role != KVConnectorRole.WORKER:
            return None  # the scheduler asks too; its counters go to the log line
        data = self.engine.stats.take()
        disk = self.storage.disk
        if disk is not None:  # background disk writes that failed (or were dropped) are store errors too
            d = disk.stats
            failed = d["write_errors"] + d["dropped"] + d["rejected"]
            data["store_errors"] += failed - self._disk_failed_seen
            self._disk_failed_seen = failed
        remote = self.storage.remote
        if remote is not None:  # remote writes refused, failed or dropped: store errors too
            r = remote.stats
            failed = r["write_errors"] + r["dropped"]
            data["store_errors"] += failed - self._remote_failed_seen
            self._remote_failed_seen = failed
        if self._blend_worker is not None:
            data.update(self._blend_worker.take_stats())
        return LMCacheTritonStats(data=data) if any(data.values()) else None

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self.engine.close()
            self.storage.close()
        elif getattr(self, "_remote", None) is not None:
            self._remote.close()


SKIP_SAVE_PARAM = "lmcache.skip_save"  # LMCache's spelling of the per-request opt-out


def skip_save_requested(request: Any) -> bool:
    """Whether the request's `kv_transfer_params` ask that its KV is never stored (LMCache's
    `{"lmcache.skip_save": true}`; true, "true", 1 and "1" count). Loads still happen."""
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict):
        return False
    v = params.get(SKIP_SAVE_PARAM, False)
    return v is True or v == 1 or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes"))


def _extra_keys(request: Request) -> list[str]:
    """What besides the tokens decides the KV: LoRA adapter, cache salt, multimodal inputs."""
    extra = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        extra.append(f"lora:{lora.lora_name}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        extra.append(f"salt:{salt}")
    for f in getattr(request, "mm_features", None) or []:
        extra.append(f"mm:{f.identifier}")
    return extra


# ---------------------------------------------------------------------------------------------
# The class vLLM loads
# ---------------------------------------------------------------------------------------------


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1):
    """The KV connector vLLM instantiates; every call goes to `LMCacheConnectorV1Impl`."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._impl = LMCacheConnectorV1Impl(vllm_config, role, self)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    supports_sleep_mode = classmethod(compat.supports_sleep_mode)  # 0.33+: vLLM asks at config time

    # worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._impl.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._impl.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._impl.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        self._impl.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self):
        self._impl.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._impl.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._impl.build_connector_worker_meta()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._impl.get_kv_connector_stats()

    def get_kv_connector_kv_cache_events(self) -> Any:
        return self._impl.get_kv_connector_kv_cache_events()

    def shutdown(self):
        self._impl.shutdown()

    # scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._impl.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        self._impl.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._impl.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput):
        self._impl.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._impl.request_finished(request, block_ids)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        return self._impl.get_external_cache_hit_sources(request, num_external_tokens)

    def reset_cache(self) -> bool | None:
        return self._impl.reset_cache()

    def take_events(self) -> Any:
        return self._impl.take_events()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheTritonStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return LMCacheTritonPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# The name the `vllm.general_plugins` entry point registers.
LMCacheTritonConnector = LMCacheConnectorV1Dynamic


def local_worker() -> LMCacheConnectorV1Impl | None:
    """The worker-role core of this process's connector (an in-process engine:
    VLLM_ENABLE_V1_MULTIPROCESSING=0), or None when this process holds none."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    impl = getattr(connector, "_impl", None)
    if isinstance(impl, LMCacheConnectorV1Impl) and impl.role == KVConnectorRole.WORKER:
        return impl
    return None


def flush_local_worker(timeout: float | None = None) -> bool:
    """Wait for this process's background disk writes (see `local_worker`); True when none is
    left or there is no local worker."""
    impl = local_worker()
    if impl is None:
        return True
    impl.engine.synchronize()
    return impl.storage.flush(timeout)
