"""The worker's prefetch pool: chunks read from the slow tiers into the CPU tier, off the step.

`PrefetchPool` serves `KVCacheEngine.prefetch` (`engine.engine`): a queue and
`prefetch_threads` daemon threads, started at the first prefetch, each reading, verifying and
(on CPU engines) decoding one chunk at a time through `StorageHierarchy.prefetch`. File reads,
socket reads and the checksum release the GIL, so the chunks of one request are read in
parallel.

Primitives:
* `prefetch(digests)`: queue the chunks neither held nor being read; each ends in the engine's
  `poll()` as held or failed (`HoldBook.prefetch_ended`).
* `close()`: the threads stop after the chunks already queued.

Invariants:
* A chunk read is published under the hold book's lock (`HoldBook.lock`, handed to
  `StorageHierarchy.prefetch`), which takes the protocol hold and, in the same lock step, the
  hold of every background load waiting for it.
* A chunk a store is still copying out (`InFlightCopies.copying`) is not read: it is reported
  held when its copy is done.
* Encoded chunks (a lossy codec) are kept encoded in the CPU tier when `keep_encoded()` says so
  (the engine's `hold_encoded`: the CUDA path); otherwise the prefetcher decodes them here, off
  the step. The slow tiers' quality guard has refused what this server may not serve before.
* A prefetch never raises into the worker: a hostile or damaged chunk is a failed prefetch,
  logged and counted (`TransferStats.prefetch_errors`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from lmcache_triton.storage.hierarchy import StorageHierarchy
from lmcache_triton.threads import background_thread

from .holds import HoldBook
from .inflight import InFlightCopies
from .loader import one_torch_thread
from .stats import TransferStats

logger = logging.getLogger(__name__)


class PrefetchPool:
    """Background readers of chunks from the slow tiers into the CPU tier.

    Args:
        storage: the tiers read from (the first slow tier with a usable copy) and into.
        book: the engine's hold book (its lock publishes a chunk; it takes the holds).
        copies: the engine's in-flight copies (a chunk still being stored is not read).
        stats: the engine's counters (`prefetched_chunks`, `prefetch_errors`).
        expect: header fields every chunk read must carry (the engine's meta, read at each
            read: it gains the row form at `register`).
        keep_encoded: asked at each read: keep an encoded chunk encoded in the CPU tier.
        threads: how many reader threads; default 2 (at least 1).
    """

    def __init__(
        self,
        storage: StorageHierarchy,
        book: HoldBook,
        copies: InFlightCopies,
        stats: TransferStats,
        expect: dict[str, str],
        keep_encoded: Callable[[], bool],
        threads: int = 2,
    ) -> None:
        self.storage = storage
        self.book = book
        self.copies = copies
        self.stats = stats
        self.expect = expect
        self.keep_encoded = keep_encoded
        self.threads = max(1, threads)
        self._queue: queue.Queue[str | None] | None = None
        self._threads: list[threading.Thread] = []

    def prefetch(self, digests: Sequence[str]) -> None:
        """Bring these chunks from the slower tiers into the CPU tier, verified, in the
        background; each ends in the engine's `poll()` as held or failed.

        Args:
            digests: the chunks' digests; those held or being read already are skipped.
        """
        with self.book.lock:
            todo = self.book.claim_prefetches(digests)
            if not todo:
                return
            q = self._queue
            if q is None:
                q = self._queue = queue.Queue()
                for i in range(self.threads):
                    t = background_thread(self._prefetcher, f"lmcache-triton-prefetch-{i}", args=(q,))
                    t.start()
                    self._threads.append(t)
        for d in todo:
            q.put(d)

    def close(self) -> None:
        """Stop the threads once the chunks queued so far are read; never waits."""
        if self._queue is not None:
            for _ in self._threads:
                self._queue.put(None)

    def _prefetcher(self, q: queue.Queue[str | None]) -> None:
        # Reads, verification and the CPU decode, one chunk per thread: `threads` of them use the
        # cores in parallel, so none needs an intra-op team of its own.
        one_torch_thread()
        while True:
            digest = q.get()
            if digest is None:
                return
            ok = False
            try:
                ok = self._prefetch_one(digest)
            except Exception:  # a hostile file must never take the worker down
                logger.exception("lmcache_triton: prefetch of chunk %s failed", digest[:12])
            with self.book.lock:
                self.book.prefetch_ended(digest, ok)
                if ok:
                    self.stats.prefetched_chunks += 1
                else:
                    self.stats.prefetch_errors += 1

    def _prefetch_one(self, digest: str) -> bool:
        book = self.book
        key = book.key(digest)
        if not self.storage.memory_bound:
            return False
        with book.lock:
            if book.is_held(key):
                return True
            if self.copies.copying(key):
                return False  # its store is still copying: it is reported held when done
            if self.storage.in_memory(key) and not book.is_retiring(key):
                return book.hold(digest) or book.is_held(key)

        # Read and verify outside the lock (seconds on a slow disk); the put takes it.
        def stored(tier: str) -> None:  # under `book.lock`, the chunk just published
            book.hold(digest, tier)

        ok = self.storage.prefetch(
            key, expect=self.expect, lock=book.lock, on_stored=stored, keep_encoded=self.keep_encoded()
        )
        return ok and book.is_held(key)
