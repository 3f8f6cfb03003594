"""The worker's transfer counters, shared by the engine (`engine.engine`) and its prefetch pool
(`engine.prefetch`).

Primitives: `TransferStats` (plain counters) and `TransferStats.take()` (the counters since the
last call, as vLLM's stats interval wants them).

Invariants: the counters only grow between two `take()` calls; `loaded_from` counts each loaded
chunk once, under the tier it came from (`loaded_chunks_<tier>` in `take()`'s answer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TransferStats:
    """Counters of one worker, reset by `take()` at each vLLM stats interval."""

    stored_chunks: int = 0
    stored_bytes: int = 0
    store_seconds: float = 0.0
    loaded_chunks: int = 0
    loaded_tokens: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    load_errors: int = 0
    store_errors: int = 0
    prefetched_chunks: int = 0
    prefetch_errors: int = 0
    loaded_from: dict[str, int] = field(default_factory=dict)

    def take(self) -> dict[str, Any]:
        """The counters since the last call (`loaded_from` flattened into `loaded_chunks_<tier>`
        keys), and reset them.

        Returns:
            Field name (or `loaded_chunks_<tier>`) -> count or seconds.
        """
        out = asdict(self)
        for tier, n in out.pop("loaded_from").items():
            out[f"loaded_chunks_{tier}"] = n
        self.__dict__.update(TransferStats().__dict__)
        return out
