"""vLLM KV cache events for the chunks our tiers hold, for KV-aware routers (llm-d, Dynamo).

Routers subscribe to vLLM's KV event stream (`--kv-events-config`, ZMQ publisher) and key
blocks by vLLM's own block hashes. We publish through vLLM's publisher only: the scheduler
connector's `take_events()` is drained by vLLM's scheduler after every step, right after the
GPU prefix cache's own events, into the same `KVEventBatch`.

Primitives:
  `kv_events_enabled(vllm_config)`  whether the user turned vLLM's KV events on; when off, the
                                    adapter builds none of this (no cost).
  `TierEvents` (scheduler role)     `remember(request, start, end, digest)` snapshots a chunk's
                                    payload (vLLM's block hashes of its tokens, the parent hash,
                                    token ids, LoRA, per-block extra keys) while the request is
                                    alive; `sync(tier, digests, present)`
                                    turns changes of what the tiers hold into `BlockStored` /
                                    `BlockRemoved`; `reset()` removes everything announced;
                                    `take()` hands the events to vLLM.
  `TierWrites` (worker role)        a `KVConnectorKVEvents` that carries the digests this rank's
                                    slow tiers wrote and dropped to the scheduler
                                    through vLLM's worker -> scheduler events channel
                                    (`get_kv_connector_kv_cache_events`); the scheduler, which
                                    alone knows the block hashes, turns them into events.
  `TierState` (scheduler role)      which chunks every rank group has written to a tier.

Media and localities (vLLM's strings, as its own offloading tiers send them: `MEDIUM_CPU`,
`MEDIUM_STORAGE`, `Locality`) come from the tier list (tiers.py): our CPU tier is medium "CPU",
the disk tier "STORAGE", both locality "LOCAL"; the remote tier (`remote_url`, Valkey/Redis) is
medium "STORAGE" with locality "REMOTE", as vLLM's object-store tier reports itself.

Invariants:
  * Only the scheduler publishes, once per change of the whole instance's state: a chunk is
    "stored" in a tier when EVERY rank holds it there (`PrefixIndex.has` for CPU; every
    rank's namespace written for disk and remote) and "removed" when the first rank lets it go
    (remote: also when the scheduler finds it missing on the server, which evicts without
    telling anyone). With tensor parallelism the ranks' reports are never published one by
    one, so nothing is announced twice.
  * Only whole chunks of a request (chunk_size tokens) are announced, with the hashes vLLM
    computes for those tokens (`request.block_hashes`): a router that sees them routes the
    request whose prompt starts with those tokens here. A partial last chunk and a CacheBlend
    segment are not; chunks already in the tiers at start-up (their tokens are unknown) only
    once a request finds them there.
  * Nothing here raises into a step: a failure is logged once and drops events.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

from lmcache_triton.integration.vllm.tiers import tier_media

__all__ = ["TIERS", "TierEvents", "TierState", "TierWrites", "kv_events_enabled"]

logger = logging.getLogger("lmcache_triton")

# Our tier -> (medium, locality) in the events, from the tier list (tiers.py): the CPU tier is
# ("CPU", "LOCAL"), each slow tier says its own. `TierEvents` reads the list when it is built.
TIERS: dict[str, tuple[str, str]] = tier_media()
# Payloads remembered for chunks that were planned but are not (yet) in any tier; the oldest go
# first beyond this (a store the tiers refused never reports back).
MAX_PENDING = 65536


def kv_events_enabled(vllm_config: Any) -> bool:
    """True when the user enabled vLLM's KV cache events (`--kv-events-config
    '{"enable_kv_cache_events": true, ...}'`)."""
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and getattr(cfg, "enable_kv_cache_events", False))


@dataclass(slots=True)
class _Payload:
    block_hashes: list[Any]  # vLLM's ExternalBlockHash (bytes, or int with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    parent: Any
    token_ids: list[int]
    lora_id: int | None
    lora_name: str | None
    extra_keys: list[Any] | None  # per block, as vLLM publishes them (LoRA name, mm, cache salt)
    session_id: str | None


class TierEvents:
    """Scheduler-side producer of `BlockStored` / `BlockRemoved` for our tiers (module docstring).

    Args:
        block_size: tokens per hash block, i.e. per entry of `request.block_hashes` (vLLM's
            `hash_block_size`, the block size for a one-group model).
        chunk_size: tokens per chunk; only whole chunks are announced.
        max_pending: bound on payloads of chunks not (yet) in any tier; default `MAX_PENDING`.
    """

    def __init__(self, block_size: int, chunk_size: int, max_pending: int = MAX_PENDING):
        from vllm.v1.core.kv_cache_utils import (
            generate_block_hash_extra_keys,
            maybe_convert_block_hash,
            to_event_extra_keys,
        )

        self._convert = maybe_convert_block_hash
        self._extra_keys, self._event_extra_keys = generate_block_hash_extra_keys, to_event_extra_keys
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.max_pending = max_pending
        self._media = tier_media()  # tier -> (medium, locality), as registered when the server started
        self._payloads: dict[str, _Payload] = {}  # digest -> payload, until no tier holds it
        self._pending: OrderedDict[str, None] = OrderedDict()  # remembered, not (yet) announced
        self._announced: dict[str, set[str]] = {}  # tier -> digests announced as stored
        self._events: list[KVCacheEvent] = []
        self._failed = False

    # -- scheduler hooks ----------------------------------------------------------------------

    def remember(self, request: Any, start: int, end: int, digest: str) -> None:
        """Snapshot the payload of the chunk `[start, end)` of `request` (keyed `digest`), while
        the request is alive: its tier reports may come after it finished."""
        try:
            bs = self.block_size
            if digest in self._payloads or end - start != self.chunk_size or start % bs or end % bs:
                return  # only whole chunks, made of whole blocks
            first, last = start // bs, end // bs
            hashes = getattr(request, "block_hashes", None) or ()  # sliced, never copied whole
            if len(hashes) < last:
                return  # not hashed (yet): nothing a router could match
            lora = getattr(request, "lora_request", None)
            extra, mm_idx = [], 0
            for b in range(first, last):  # what vLLM folded into each block's hash
                keys, mm_idx = self._extra_keys(request, b * bs, (b + 1) * bs, mm_idx)
                extra.append(keys)
            self._payloads[digest] = _Payload(
                block_hashes=[self._convert(h) for h in hashes[first:last]],
                parent=self._convert(hashes[first - 1]) if first > 0 else None,
                token_ids=[int(t) for t in request.all_token_ids[first * bs : last * bs]],
                lora_id=lora.adapter_id if lora is not None else None,
                lora_name=lora.name if lora is not None else None,
                extra_keys=self._event_extra_keys(extra),
                session_id=getattr(request, "session_id", None),
            )
            self._pending[digest] = None
            while len(self._pending) > self.max_pending:  # oldest first: a refused store never reports
                old, _ = self._pending.popitem(last=False)
                self._payloads.pop(old, None)
        except Exception:
            self._fail("remembering a chunk")

    def sync(self, tier: str, digests: Iterable[str], present: Callable[[str], bool]) -> None:
        """Announce the changes among `digests` in `tier` (a name of `tiers.tier_names()`): `present(d)` says
        whether the whole instance holds chunk `d` there now."""
        try:
            medium, locality = self._media[tier]
            announced = self._announced.setdefault(tier, set())
            stored, removed = [], []
            for d in dict.fromkeys(digests):
                now = present(d)
                if now and d not in announced and d in self._payloads:
                    announced.add(d)
                    stored.append(d)
                elif not now and d in announced:
                    announced.discard(d)
                    removed.append(d)
            for d in stored:
                p = self._payloads[d]
                self._pending.pop(d, None)
                self._events.append(
                    BlockStored(
                        block_hashes=list(p.block_hashes),
                        parent_block_hash=p.parent,
                        token_ids=list(p.token_ids),
                        block_size=self.block_size,
                        lora_id=p.lora_id,
                        medium=medium,
                        lora_name=p.lora_name,
                        extra_keys=p.extra_keys,
                        group_idx=0,
                        locality=locality,
                        session_id=p.session_id,
                    )
                )
            if removed:
                hashes = [h for d in removed for h in self._payloads[d].block_hashes]
                self._events.append(
                    BlockRemoved(block_hashes=hashes, medium=medium, group_idx=0, locality=locality)
                )
                for d in removed:
                    if not any(d in a for a in self._announced.values()):
                        self._payloads.pop(d, None)
        except Exception:
            self._fail(f"tracking {tier} chunks")

    def reset(self) -> None:
        """Everything announced is gone for routers (a cache reset: no chunk stored before is
        served again)."""
        try:
            for tier, announced in self._announced.items():
                if announced:
                    self.sync(tier, list(announced), lambda _d: False)
            self._payloads.clear()
            self._pending.clear()
        except Exception:
            self._fail("resetting")

    def take(self) -> list[KVCacheEvent]:
        out, self._events = self._events, []
        return out

    # -- internals ----------------------------------------------------------------------------

    def _fail(self, what: str) -> None:
        if not self._failed:
            logger.exception("lmcache_triton: KV events: %s failed; events may be missing", what)
            self._failed = True


class TierWrites(KVConnectorKVEvents):
    """Worker -> scheduler: chunk digests written to and dropped from the ranks' disk and remote
    tiers, carried through vLLM's `kv_cache_events` channel (vLLM merges the ranks' objects with
    `add_events`). Items are `(tier, namespace, "+" | "-", digest)`; the scheduler turns them
    into events (`TierEvents`), it never publishes them as they are."""

    def __init__(self, items: list[tuple[str, str, str, str]] | None = None) -> None:
        self.items: list[tuple[str, str, str, str]] = list(items or [])
        self._workers = 1

    def add_events(self, events: list[Any]) -> None:
        self.items.extend(events)

    def aggregate(self) -> TierWrites:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[Any]:
        return list(self.items)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self.items = []
        self._workers = 1

    def __bool__(self) -> bool:
        return bool(self.items)


class TierState:
    """Scheduler-side: which chunks every distinct namespace (rank group) has written to one
    tier, as the workers' `TierWrites` say (`present` feeds `TierEvents.sync`).

    Args:
        namespaces: one namespace per rank (replicas share their first replica's).
    """

    def __init__(self, namespaces: Sequence[str]):
        self._have: dict[str, set[str]] = {ns: set() for ns in dict.fromkeys(namespaces)}

    def apply(self, items: Iterable[tuple[str, str, str]]) -> list[str]:
        """Apply reported `(namespace, "+" | "-", digest)` writes and drops; returns the digests
        they touched."""
        touched = []
        for ns, op, digest in items:
            have = self._have.get(ns)
            if have is None:
                continue  # another instance's namespace sharing the directory
            (have.add if op == "+" else have.discard)(digest)
            touched.append(digest)
        return touched

    def drop(self, digests: Iterable[str]) -> list[str]:
        """Forget these digests in every namespace (found missing); returns those known."""
        out = []
        for d in digests:
            known = False
            for have in self._have.values():
                if d in have:
                    have.discard(d)
                    known = True
            if known:
                out.append(d)
        return out

    def present(self, digest: str) -> bool:
        return all(digest in have for have in self._have.values())
