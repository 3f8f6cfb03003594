"""The engine's copies still running on the side streams (CUDA caches), and what their end does.

`InFlightCopies` keeps the stores and loads `KVCacheEngine` (`engine.engine`) queued on its
transfer streams until their events complete; the engine's `poll`, `stores_read` and
`synchronize` finish them through `advance`, and its prefetch pool (`engine.prefetch`) asks
`copying(key)` before reading a chunk a store is still copying out.

Primitives:
* `add_store` / `add_load`: a copy just queued, with the event that marks its end.
* `advance()`: finish the copies whose event completed (a store: write-back, then the protocol
  hold; a load: its hold released).
* `store_fence()` / `stores_read(fence)`: whether every store queued before a mark has read
  vLLM's blocks (its gather done); the device-to-host copy may still run.

Invariants:
* A store's CPU-tier buffer is held from its put until its copy completes, and that hold becomes
  the protocol hold (`HoldBook.hold(held=)`) or is released: never a moment unheld in between.
* A store the CPU tier refused is still tracked (kind `"gather"`) until its gather has read the
  blocks, so `stores_read` never reports blocks free under a running gather.
* Every field is guarded by the hold book's lock (`HoldBook.lock`), taken by each method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache_triton.storage.hierarchy import StorageHierarchy

from .holds import HoldBook
from .streams import EventLike


@dataclass
class InFlight:
    """One copy queued on a side stream."""

    kind: str  # "store" | "load" | "gather" (a store the CPU tier refused: only its gather)
    digest: str
    key: str
    done: EventLike
    tensor: torch.Tensor | None = None  # the CPU-tier buffer held for the copy
    seq: int = 0  # a store's number (`store_fence`)
    gathered: EventLike | None = None  # a store: its gather read the blocks


class InFlightCopies:
    """The copies of one engine still running on its side streams.

    Args:
        storage: the tiers the copies read from and write to.
        book: the engine's hold book (its lock guards this class too; a completed store's hold
            is handed to it).
    """

    def __init__(self, storage: StorageHierarchy, book: HoldBook) -> None:
        self.storage = storage
        self.book = book
        self._inflight: list[InFlight] = []
        self._stores_issued = 0  # stores queued on the transfer stream so far (`store_fence`)

    def add_store(
        self, digest: str, key: str, done: EventLike, held: torch.Tensor | None, gathered: EventLike
    ) -> None:
        """A store just queued: its gather (`gathered`), then its device-to-host copy (`done`)
        into the CPU tier's buffer `held`; None: the tier refused it, only the gather is tracked.
        """
        with self.book.lock:
            kind = "store" if held is not None else "gather"
            self._inflight.append(InFlight(kind, digest, key, done, held, self._stores_issued, gathered))
            self._stores_issued += 1

    def add_load(self, digest: str, key: str, done: EventLike, tensor: torch.Tensor) -> None:
        """A load just queued, reading the held CPU-tier buffer `tensor` (released at `done`)."""
        with self.book.lock:
            self._inflight.append(InFlight("load", digest, key, done, tensor))

    def copying(self, key: str) -> bool:
        """Whether a copy of the chunk of `key` is still tracked (a store not finished yet)."""
        with self.book.lock:
            return any(f.key == key for f in self._inflight)

    def idle(self) -> bool:
        """Whether no copy is tracked (call `advance` first to finish the completed ones)."""
        with self.book.lock:
            return not self._inflight

    def advance(self) -> None:
        """Finish the copies on the transfer streams that are done; never waits."""
        with self.book.lock:
            still = []
            for f in self._inflight:
                if f.done.query():
                    self._complete(f)
                else:
                    still.append(f)
            self._inflight = still

    def store_fence(self) -> int:
        """A mark after every store queued so far (`stores_read`)."""
        with self.book.lock:
            return self._stores_issued

    def stores_read(self, fence: int) -> bool:
        """Whether every store queued before `fence` (`store_fence()`) has read its blocks
        (its gather completed); the device-to-host copies may still run. Never waits."""
        with self.book.lock:
            self.advance()
            for f in self._inflight:
                if f.kind in ("store", "gather") and f.seq < fence:
                    ev = f.gathered if f.gathered is not None else f.done
                    if not ev.query():
                        return False
            return True

    def _complete(self, f: InFlight) -> None:
        if f.kind == "gather":  # a refused store: nothing of ours holds anything
            return
        if f.kind == "load":
            self.storage.release(f.key, f.tensor)
            return
        # A store: the bytes are in the CPU tier now. The copy's hold becomes the protocol hold
        # (or is released): never a moment unheld in between.
        self.storage.write_back(f.key)
        self.book.hold(f.digest, held=f.tensor)
