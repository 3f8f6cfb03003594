"""The scheduler connector's vLLM KV events: what it announces for chunks in our tiers.

`SchedulerEvents` is built only when the user turned vLLM's KV events on
(`kv_events.kv_events_enabled`); the scheduler then holds one and calls it at four points:

  `found(request, span, tier)`      a lookup found a chunk in a slow tier (written before a
                                    restart, or by another instance): announced there.
  `forget_evicted(asked, where)`    after a batched `PrefixIndex.locate`: chunks a remote tier
                                    was asked about and lacks are removed (a remote server
                                    evicts without telling anyone).
  `stored(request, span)`           a store was planned: the chunk's payload is remembered for
                                    when the workers report it held or written.
  `update(worker_meta, writes, held)`  the workers' reports of a step: chunks every rank now holds
                                    in its CPU tier (`held`, i.e. `PrefixIndex.has`) or has written
                                    to / dropped from a slow tier (`TierWrites`).
and `take()` (vLLM drains the events after each step), `reset()` (a cache reset).

Built on kv_events.py's `TierEvents` (the events and payloads) and one `TierState` per slow
tier (which rank groups wrote what). Invariant: nothing here raises into a step (`update`
logs a failure and drops that step's events; `TierEvents` logs its own once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lmcache_triton.engine import ChunkSpan
from lmcache_triton.integration.vllm.kv_events import TierEvents, TierState, TierWrites
from lmcache_triton.integration.vllm.metadata import LMCacheTritonWorkerMetadata
from lmcache_triton.integration.vllm.tiers import CPU_TIER, SlowTierInfo

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_triton")


class SchedulerEvents:
    """The scheduler's KV-event state over our tiers (module docstring).

    Args:
        hash_block_size: tokens per entry of `request.block_hashes` (vLLM's `hash_block_size`).
        chunk_size: tokens per chunk; only whole chunks are announced.
        namespaces: one key namespace per rank (`ConnectorCore.namespaces`).
        slow_tiers: the slow tiers, fastest first (`tiers.slow_tiers()`).
    """

    def __init__(
        self, hash_block_size: int, chunk_size: int, namespaces: Sequence[str], slow_tiers: Sequence[SlowTierInfo]
    ) -> None:
        self._events = TierEvents(hash_block_size, chunk_size)
        self._namespaces = namespaces
        self._slow_tiers = tuple(slow_tiers)
        self._tier_state: dict[str, TierState] = {t.name: TierState(namespaces) for t in self._slow_tiers}

    def found(self, request: Request | None, span: ChunkSpan, tier: str) -> None:
        """A lookup of `request` found chunk `span` in slow tier `tier` (for every rank).

        Args:
            request: vLLM's request whose prompt holds the chunk.
            span: the chunk.
            tier: the name of the first slow tier that has it.
        """
        d = span.digest
        self._events.remember(request, span.start, span.end, d)
        # Found there (e.g. written before a restart, or by another instance): announced.
        state = self._tier_state[tier]
        state.apply((ns, "+", d) for ns in self._namespaces)
        self._events.sync(tier, [d], state.present)

    def forget_evicted(self, asked: list[str], where: dict[str, str]) -> None:
        """A remote server evicts without telling anyone: chunks it was asked about and lacks
        (every remote tier faster than where each was found) are removed in the events. Local
        tiers' drops come from their writers, the workers (`TierWrites`).

        Args:
            asked: the digests `PrefixIndex.locate` was asked about.
            where: its answer, digest -> the first slow tier that has it.
        """
        order = [t.name for t in self._slow_tiers]
        for i, t in enumerate(self._slow_tiers):
            if t.locality != "REMOTE" or t.name not in self._tier_state:
                continue
            missing = [d for d in asked if d not in where or order.index(where[d]) > i]
            state = self._tier_state[t.name]
            gone = state.drop(missing)
            self._events.sync(t.name, gone, state.present)

    def stored(self, request: Request | None, span: ChunkSpan) -> None:
        """A store of chunk `span` of `request` goes to the workers: its payload is remembered
        while the request is alive (the reports that it is held come later).

        Args:
            request: vLLM's request (None: nothing to remember).
            span: the chunk.
        """
        self._events.remember(request, span.start, span.end, span.digest)

    def update(
        self, wm: object, tier_writes: KVConnectorKVEvents | None, held: Callable[[str], bool]
    ) -> None:
        """Turn this step's worker reports into vLLM KV events (kv_events.py): chunks every rank
        now holds in its CPU tier / has written to a slow tier, and chunks that left.

        Args:
            wm: the step's `kv_connector_worker_meta` (ours: `LMCacheTritonWorkerMetadata`).
            tier_writes: the step's `kv_cache_events` (ours: `TierWrites`), or None.
            held: whether every rank holds a digest in memory (`PrefixIndex.has`).
        """
        try:
            if isinstance(wm, LMCacheTritonWorkerMetadata):
                touched = [d for lists in wm.reports.values() for part in lists[:3] for d in part]
                if touched:
                    self._events.sync(CPU_TIER, touched, held)
            if isinstance(tier_writes, TierWrites) and tier_writes.items:
                for tier, state in self._tier_state.items():
                    touched = state.apply(it[1:] for it in tier_writes.items if it[0] == tier)
                    if touched:
                        self._events.sync(tier, touched, state.present)
        except Exception:  # events are best effort: never into the step
            logger.exception("lmcache_triton: KV events for this step failed")

    def take(self) -> list[KVCacheEvent]:
        """The events since the last call (vLLM's scheduler publishes them after each step)."""
        return self._events.take()

    def reset(self) -> None:
        """A cache reset: everything announced is removed for routers."""
        self._events.reset()
