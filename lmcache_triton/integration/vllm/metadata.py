"""What the scheduler tells the workers each step, and what the workers report back.

Primitives:
  `ChunkOp`                       move one chunk between the CPU tier and a request's blocks.
  `SegmentRef`, `BlendOp`         CacheBlend: where a segment's rows are, and one blend to run.
  `LMCacheTritonMetadata`         scheduler -> workers (loads, asynchronous loads and their
                                  cancellations, stores, blends, prefetches, acknowledged
                                  retirements, finished requests awaiting their stores), one per
                                  step.
  `LMCacheTritonWorkerMetadata`   workers -> scheduler (per rank: held, retiring, removed,
                                  failed prefetches; asynchronous loads that finished short),
                                  merged across ranks by `aggregate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class ChunkOp:
    """Move one chunk: `digest` <-> the pages of `block_ids` (`skip_blocks` leading ones are
    not written on load)."""

    digest: str
    block_ids: list[int]
    num_tokens: int
    skip_blocks: int = 0


@dataclass
class SegmentRef:
    """Where the KV of prompt tokens `[start, end)` comes from: rows `first..first+end-start` of
    the concatenated token rows of the prefix chunks `digests`, computed at positions
    `src_start..`."""

    start: int
    end: int
    src_start: int
    digests: list[str]
    first: int


@dataclass
class BlendOp:
    """Blend one prompt: cached `segments` placed in `token_ids`; write rows `0..T-2` into
    `block_ids` (the blocks of all T tokens)."""

    token_ids: list[int]
    block_ids: list[int]
    segments: list[SegmentRef] = field(default_factory=list)


@dataclass
class LMCacheTritonMetadata(KVConnectorMetadata):
    loads: dict[str, list[ChunkOp]] = field(default_factory=dict)
    stores: list[ChunkOp] = field(default_factory=list)
    # CacheBlend (blend_scheduler.py): req -> the blend its worker runs.
    blends: dict[str, BlendOp] = field(default_factory=dict)
    # Chunk digests to bring from a slow tier into the workers' CPU tiers (verified) in the background.
    prefetches: list[str] = field(default_factory=list)
    # rank -> digests the worker retired and the scheduler no longer counts: free them.
    retire_acks: dict[int, list[str]] = field(default_factory=dict)
    # Finished requests whose blocks vLLM keeps (request_finished said True) until every worker
    # reports, through get_finished, that the gathers of their stores have read them.
    await_stores: list[str] = field(default_factory=list)
    # Asynchronous loads (the request waits in WAITING_FOR_REMOTE_KVS): req -> its chunks, copied
    # by the worker's background loader and reported through get_finished.
    async_loads: dict[str, list[ChunkOp]] = field(default_factory=dict)
    # Requests aborted while their asynchronous load runs: stop it (it is still reported).
    cancel_loads: list[str] = field(default_factory=list)
    # > 0: this step schedules no token while requests wait for asynchronous loads or prefetches:
    # get_finished waits up to this many seconds for one to end instead of returning to a
    # spinning engine loop.
    idle_wait_s: float = 0.0


# One rank's report: (digests now held in its CPU tier, digests it is retiring (to be
# acknowledged), digests that left its CPU tier, prefetches that failed).
RankReport = tuple[list[str], list[str], list[str], list[str]]


@dataclass
class LMCacheTritonWorkerMetadata(KVConnectorWorkerMetadata):
    """Per rank: its `RankReport`; and the asynchronous loads that finished short: req -> the
    leading chunks that are in its blocks (the fewest of any rank)."""

    reports: dict[int, RankReport] = field(default_factory=dict)
    short_loads: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LMCacheTritonWorkerMetadata)
        merged = dict(self.reports)
        for rank, lists in other.reports.items():
            old = merged.get(rank, ([], [], [], []))
            merged[rank] = (old[0] + lists[0], old[1] + lists[1], old[2] + lists[2], old[3] + lists[3])
        short = dict(self.short_loads)
        for rid, n in other.short_loads.items():
            short[rid] = min(n, short.get(rid, n))
        return LMCacheTritonWorkerMetadata(merged, short)
