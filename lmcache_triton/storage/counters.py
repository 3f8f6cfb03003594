"""Counters, once-only warnings and the KV-event change log shared by the slow tiers.

A tier mixes in `TierCounters` and provides `_lock` (a `threading.Lock`), `_stats` (a dict of
counts), `_warned` (a set of warning kinds) and `_changes` (None until `track_changes()`). The
tier's helpers in other modules (its read path) count, warn and log changes through the public
`count`/`count_each`, `warn_once` and `changed`, handed the tier as its `TierCounters`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable


class TierCounters:
    """Counters, once-only warnings and the change log shared by the disk and remote tiers."""

    _lock: threading.Lock
    _stats: dict[str, int]
    _warned: set[str]
    _changes: list[tuple[str, str]] | None

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` (default 1) to the counter `name` of `stats`."""
        with self._lock:
            self._stats[name] += n

    def count_each(self, *names: str) -> None:
        """Add 1 to each counter of `names`, in one step (a `stats` reader sees all or none)."""
        with self._lock:
            for name in names:
                self._stats[name] += 1

    def _dropped(self, on_done: Callable[[bool], object] | None) -> bool:
        """A put that will not be written: counted as "dropped", its caller told (`on_done(False)`);
        returns False, the put's answer."""
        self.count("dropped")
        if on_done is not None:
            on_done(False)
        return False

    def warn_once(self, kind: str, msg: str, *args: object) -> None:
        """Log `msg % args` as a warning (on the tier's module's logger) the first time a warning
        of `kind` comes, never again."""
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logging.getLogger(type(self).__module__).warning(msg, *args)

    # Change log for vLLM's KV events (routers).

    def track_changes(self) -> None:
        """From now on record the keys this tier writes (`("+", key)`) and drops (`("-", key)`:
        evicted, damaged, cleared), for `take_changes`. A remote tier sees only what this
        process wrote and deleted, not the server's own evictions."""
        with self._lock:
            if self._changes is None:
                self._changes = []

    def take_changes(self) -> list[tuple[str, str]]:
        """The changes recorded since the last call (empty unless `track_changes()`)."""
        with self._lock:
            if not self._changes:
                return []
            out, self._changes = self._changes, []
            return out

    def changed(self, op: str, key: str) -> None:
        """Log `op` ("+" written, "-" dropped) for `key` when tracking."""
        with self._lock:
            self._record(op, [key])

    def _record(self, op: str, keys: list[str]) -> None:
        """Log `op` ("+" written, "-" dropped) for `keys` when tracking (caller has `_lock`)."""
        if self._changes is not None:
            self._changes.extend((op, k) for k in keys)
