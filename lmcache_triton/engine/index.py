"""The scheduler's prefix index: which chunks every rank holds, and where the others could come from.

Primitives:
  `report(rank, stored, removed, failed)`  one worker's step report.
  `cached_prefix(spans, satisfied_tokens)`  leading chunks every rank holds in memory (a promise).
  `locate(digests)`                          per digest, the first slow tier that has it for every
                                             rank: worth a prefetch, never a promise.

Invariants:
  * The CPU tier lives in the worker processes, so the index keeps a mirror of it, fed by the
    keys the workers report after each step. Only chunks a worker reported as held -- verified,
    pinned against eviction until the scheduler acknowledges their retirement -- count as cached.
  * Every slow tier is asked the same batched question (`TierView.contains_many` over every
    rank's key of every candidate), in the hierarchy's order, and only about the digests no
    earlier tier had. The disk answers with a `stat` per key (right across processes and
    restarts without an index), the remote tier with one pipelined round trip.
  * A digest whose prefetch failed is not located again for `failed_ttl` seconds; a tier's miss
    is remembered for that tier's `miss_ttl` (0 for the disk, 2 s for the remote tier).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence

from lmcache_triton.chunk.planner import ChunkSpan, chunk_key
from lmcache_triton.storage.builder import TierView

_MAX_MISSES = 100_000  # remembered misses per tier before the expired ones are dropped


class PrefixIndex:
    """Scheduler-side view of what every rank holds in memory, and of the slow tiers.

    Args:
        namespaces: one namespace digest per rank.
        tiers: presence-only views of the slow tiers, fastest first (`storage.builder.build_views`);
            default none.
        failed_ttl: seconds a chunk whose prefetch failed is not located again; default 30.
    """

    def __init__(
        self,
        namespaces: Sequence[str],
        tiers: Sequence[TierView] = (),
        failed_ttl: float = 30.0,
    ) -> None:
        self.namespaces = list(namespaces)
        self.tiers: list[TierView] = list(tiers)
        self.failed_ttl = failed_ttl
        self._misses: dict[str, dict[str, float]] = {t.name: {} for t in self.tiers}  # tier -> digest -> time
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

    def tier(self, name: str) -> TierView | None:
        return next((t for t in self.tiers if t.name == name), None)

    def locate(self, digests: Sequence[str], only: Collection[str] | None = None) -> dict[str, str]:
        """Where each chunk could be prefetched from: digest -> the name of the first slow tier
        that has it for every rank's namespace (digests found nowhere are left out). One batched
        question per tier, only about the digests no earlier tier had; recent prefetch failures
        and a tier's remembered misses are not asked.

        Args:
            digests: candidate chunk digests (repeats are asked once).
            only: ask only the tiers of these names; default all.
        """
        out: dict[str, str] = {}
        if not digests:
            return out
        now = time.monotonic()
        with self._lock:
            left = []
            for d in dict.fromkeys(digests):
                t = self._failed.get(d)
                if t is not None:
                    if now - t < self.failed_ttl:
                        continue
                    del self._failed[d]
                left.append(d)
        r = len(self.namespaces)
        for tier in self.tiers:
            if not left:
                break
            if only is not None and tier.name not in only:
                continue
            misses = self._misses[tier.name]
            with self._lock:
                if tier.miss_ttl > 0 and len(misses) > _MAX_MISSES:  # bounded: drop the expired ones
                    self._misses[tier.name] = misses = {
                        d: t for d, t in misses.items() if now - t < tier.miss_ttl
                    }
                ask = [d for d in left if not (d in misses and now - misses[d] < tier.miss_ttl)]
            if not ask:
                continue
            got = tier.contains_many([chunk_key(ns, d) for d in ask for ns in self.namespaces])
            found = set()
            with self._lock:
                for i, d in enumerate(ask):
                    if all(got[i * r : (i + 1) * r]):
                        out[d] = tier.name
                        found.add(d)
                    elif tier.miss_ttl > 0:
                        misses[d] = now
            left = [d for d in left if d not in found]
        return out

    def clear(self) -> None:
        with self._lock:
            for keys in self._mem:
                keys.clear()
            self._failed.clear()
            for misses in self._misses.values():
                misses.clear()
