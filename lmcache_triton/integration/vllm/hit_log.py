"""The scheduler's log lines about hits: one INFO line per request hit (rate-limited) and a
periodic summary of the hit rate beyond vLLM's own prefix cache (`HitLog`).

Logs to the `lmcache_triton` logger, as the rest of the connector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

logger = logging.getLogger("lmcache_triton")

# The periodic hit-rate summary: at most one line per this many seconds, on a scheduler step.
SUMMARY_INTERVAL_S = 10.0
# A request's hit line: at most one per this many seconds; the hits in between are counted in the
# next line (a restart plus one request logs the hit at once).
HIT_LOG_INTERVAL_S = 1.0


class HitLog:
    """The scheduler's log lines about hits: one per request hit (rate-limited) and a periodic
    summary of the hit rate beyond vLLM's own prefix cache.

    Args:
        tiers: the tier names a hit line counts chunks for, fastest first ("cpu" first).
        hit_interval: seconds between two request lines; default `HIT_LOG_INTERVAL_S`.
        summary_interval: seconds between two summaries; default `SUMMARY_INTERVAL_S`.
    """

    def __init__(
        self,
        tiers: list[str],
        hit_interval: float = HIT_LOG_INTERVAL_S,
        summary_interval: float = SUMMARY_INTERVAL_S,
    ) -> None:
        self.tiers = list(tiers)
        self.hit_interval = hit_interval
        self.summary_interval = summary_interval
        self.hit_tokens = 0  # since the last summary
        self.query_tokens = 0
        self._last_summary = time.monotonic()
        self._last_hit: float | None = None
        self._unlogged = 0  # request hits not logged since the last hit line

    def query(self, tokens: int, hit: int) -> None:
        """A request was scheduled with `tokens` prompt tokens beyond vLLM's prefix hit, `hit` of
        them from our cache."""
        self.query_tokens += max(tokens, 0)
        self.hit_tokens += max(hit, 0)

    def request_hit(
        self, req_id: str, hit_tokens: int, prompt_tokens: int, chunks: Mapping[str, int], how: str = ""
    ) -> None:
        """One INFO line for a request that got `hit_tokens` of its `prompt_tokens` from our cache,
        `chunks` per tier name; at most one per `hit_interval` (the others are counted in it)."""
        now = time.monotonic()
        if self._last_hit is not None and now - self._last_hit < self.hit_interval:
            self._unlogged += 1
            return
        where = how or ", ".join(
            f"{t} {chunks.get(t, 0)}{' chunks' if i == 0 else ''}" for i, t in enumerate(self.tiers)
        )
        more = f"; {self._unlogged} more request hits since the last line" if self._unlogged else ""
        logger.info(
            "lmcache_triton: request %s: %d/%d tokens from cache (%s)%s",
            req_id, hit_tokens, prompt_tokens, where, more,
        )
        self._last_hit, self._unlogged = now, 0

    def maybe_summary(self) -> None:
        """The hit-rate summary, when `summary_interval` has passed and a request came."""
        now = time.monotonic()
        if now - self._last_summary < self.summary_interval or not self.query_tokens:
            return
        logger.info(
            "lmcache_triton: %d of %d prompt tokens beyond vLLM's prefix cache hit the cache (%.1f%%)",
            self.hit_tokens, self.query_tokens, 100.0 * self.hit_tokens / self.query_tokens,
        )
        self.hit_tokens = self.query_tokens = 0
        self._last_summary = now
