"""The cache engine, one room per job (see docs/architecture.md):

* `engine.engine.KVCacheEngine` (worker role): store / load / prefetch / holds / retirements,
  over `engine.holds.HoldBook` (holds, retirements, the lock), `engine.inflight.InFlightCopies`
  (copies on the side streams), `engine.device_copies.DeviceCopies` (a CUDA cache's store and
  load on those streams), `engine.load_holds.LoadHolds` (what a background load holds),
  `engine.prefetch.PrefetchPool` (reader threads) and
  `engine.stats.TransferStats` (counters).
* `engine.copy_paths`: how chunk bytes move between the paged cache and a chunk tensor.
* `engine.chunk_copies`: the engine's copies around a path (store forms, encoded scatters, the
  background loader's copier, the start-up warm-up); `engine.loader`, `engine.streams`.
* `engine.index.PrefixIndex` (scheduler role): what every rank holds, and where else a chunk is.
* `engine.tails.TailRegistry` (scheduler role): partial chunks stored, for the next turn's hit.
* `chunk.planner` (both roles): chunks of a prompt, their keys, their blocks.

The names below keep `from lmcache_triton.engine import ...` working as before the split.
"""

from lmcache_triton.chunk.planner import ChunkPlanner, ChunkSpan, chunk_key

from .copy_paths import ROWS_FORM, CopyPath, OpaquePages, PackedPages, StridedPages, TokenRows, make_copy_path
from .engine import FORMAT_VERSION, KVCacheEngine
from .holds import Progress
from .index import PrefixIndex
from .stats import TransferStats

__all__ = [
    "FORMAT_VERSION",
    "ROWS_FORM",
    "ChunkPlanner",
    "ChunkSpan",
    "CopyPath",
    "KVCacheEngine",
    "OpaquePages",
    "PackedPages",
    "PrefixIndex",
    "Progress",
    "StridedPages",
    "TokenRows",
    "TransferStats",
    "chunk_key",
    "make_copy_path",
]
