"""The worker's hold book: which chunks this rank promises the scheduler, and the lock they share.

`HoldBook` is the state `KVCacheEngine` (`engine.engine`), its prefetch pool
(`engine.prefetch`) and its in-flight copies (`engine.inflight`) all work on; it owns the one
lock they take, so none of them reaches into another's fields.

Primitives:
* `lock`: the re-entrant lock over the CPU tier's puts and holds and every field below; the
  storage hierarchy publishes a prefetched chunk under it (`StorageHierarchy.prefetch(lock=)`).
  Every method takes it (re-entrant: callers already holding it for a larger step may call
  them).
* `hold(digest, origin, held)`: take the protocol hold on a chunk complete in the CPU tier and
  report it (`take_progress`); `take_hold(key)`: one more hold on a held chunk, for a copy.
* `retire(high, low)` / `ack_retired(digests)`: the retirement half of the protocol.
* `claim_prefetches` / `prefetch_ended`: the digests a prefetch is reading now.
* `hold_or_wait(digest)` / `settled` / `wait_landed` / `abandon`: a background load's chunk
  that a prefetch is still reading (`Waiter`), held for the load in the lock step that publishes
  it; `on_settled(wake)`: told each time waiters settle (the loader looks at its jobs again).

Invariants:
* A chunk is *held* (`is_held`) once it sits, complete and verified, in this worker's CPU tier
  with the book's hold on it: never evicted, and reported once as held (`Progress.held`). Only
  held chunks may be promised by the scheduler.
* A retiring chunk stays held and loadable until the scheduler acknowledges it
  (`ack_retired`): only then is its hold released and the chunk removed.
* A waiter gets its own hold in the same lock step as the chunk's protocol hold (`hold`), or
  hears that the read ended without it (`prefetch_ended`): nothing can evict the chunk between
  the two.
* Without `keep_in_cpu`, only a chunk being prefetched is held (a store's copy is not kept).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmcache_triton.chunk.planner import chunk_key
from lmcache_triton.storage.hierarchy import StorageHierarchy


@dataclass
class Progress:
    """What finished in the background since the last `KVCacheEngine.poll()` (digests)."""

    held: list[str] = field(default_factory=list)  # now held in memory: the scheduler may count them
    failed: list[str] = field(default_factory=list)  # prefetches that found nothing usable


@dataclass
class Waiter:
    """A background load's wait for a chunk a prefetch is still reading (`HoldBook.hold_or_wait`).
    The book's `lock` guards every field."""

    digest: str
    key: str
    tensor: torch.Tensor | None = None  # the load's hold, taken as the chunk landed
    failed: bool = False  # the read ended without the chunk, or the wait was given up


class HoldBook:
    """The holds of one worker's engine, and the lock over them and the CPU tier's puts.

    Args:
        storage: the tiers whose CPU tier keeps the held chunks.
        namespace: this rank's namespace digest: a chunk's key is `chunk_key(namespace, digest)`.
    """

    def __init__(self, storage: StorageHierarchy, namespace: str) -> None:
        self.storage = storage
        self.namespace = namespace
        self.lock = threading.RLock()  # puts + holds of the CPU tier, bookkeeping below
        self._cond = threading.Condition(self.lock)  # a pending chunk of a background load landed
        self._waiters: dict[str, list[Waiter]] = {}  # key -> background loads waiting for its read
        self._held: dict[str, torch.Tensor] = {}  # key -> the held CPU-tier tensor
        self._origin: dict[str, str] = {}  # key -> tier it came from ("cpu", "disk")
        self._retiring: set[str] = set()
        self._rejected_seen = 0  # the CPU tier's refused puts already answered by `retire`
        self._progress = Progress()
        self._prefetching: set[str] = set()  # digests a prefetch is reading now
        self._wake: Callable[[], None] | None = None  # `on_settled`

    def on_settled(self, wake: Callable[[], None]) -> None:
        """Call `wake()` (under `lock`, never waiting) each time the waiters of a chunk settle:
        it landed and they hold it, or it will not come (the background loader's `wake`)."""
        with self.lock:
            self._wake = wake

    def key(self, digest: str) -> str:
        """The chunk's key in this rank's namespace."""
        return chunk_key(self.namespace, digest)

    # ------------------------------------------------------------------ questions

    def is_held(self, key: str) -> bool:
        """Whether the chunk of `key` is held (promisable)."""
        with self.lock:
            return key in self._held

    def is_retiring(self, key: str) -> bool:
        """Whether the chunk of `key` was reported retiring and is not acknowledged yet."""
        with self.lock:
            return key in self._retiring

    def origin(self, key: str) -> str:
        """The tier a held chunk came from (`"cpu"`: stored here, or unknown), for the counters."""
        with self.lock:
            return self._origin.get(key, "cpu")

    def is_prefetching(self, digest: str) -> bool:
        """Whether a prefetch of `digest` is queued or reading."""
        with self.lock:
            return digest in self._prefetching

    def any_prefetching(self) -> bool:
        """Whether any prefetch is queued or reading."""
        with self.lock:
            return bool(self._prefetching)

    def has_progress(self) -> bool:
        """Whether a hold or a failed prefetch waits to be reported (`take_progress`)."""
        with self.lock:
            return bool(self._progress.held or self._progress.failed)

    def take_progress(self) -> Progress:
        """The chunks held and the prefetches failed since the last call."""
        with self.lock:
            out, self._progress = self._progress, Progress()
            return out

    # ------------------------------------------------------------------ holds

    def hold(self, digest: str, origin: str = "cpu", held: torch.Tensor | None = None) -> bool:
        """Take the protocol hold on a chunk now complete in the CPU tier.

        Args:
            digest: the chunk's digest.
            origin: the tier it came from, for the load counters; default `"cpu"`.
            held: a hold on it taken already (a put that held atomically), adopted or, when not
                wanted, released; default None: take one here.

        Returns:
            True when the chunk became held now (reported by the next `take_progress`).
        """
        key = self.key(digest)
        with self.lock:
            if key in self._held or (not self.storage.keep_in_cpu and digest not in self._prefetching):
                if held is not None:
                    self.storage.release(key, held)
                return False
            t = held if held is not None else self.storage.hold(key)
            if t is None:
                return False
            self._held[key] = t
            self._origin[key] = origin
            self._progress.held.append(digest)
            if key in self._waiters:
                self._feed(key)
            return True

    def take_hold(self, key: str) -> torch.Tensor | None:
        """One more hold (counted as a hit) on a held chunk's CPU-tier tensor, for one copy or
        read; the caller releases it (`storage.release`). None when the chunk is not held."""
        with self.lock:
            return self.storage.hold(key, count=True) if key in self._held else None

    def drop(self, key: str) -> None:
        """Forget a held chunk and release its hold (the chunk stays in the CPU tier)."""
        with self.lock:
            t = self._held.pop(key, None)
            self._origin.pop(key, None)
            if t is not None:
                self.storage.release(key, t)

    # ------------------------------------------------------------------ retirement

    def retire(self, high: float, low: float) -> list[str]:
        """Held chunks to give up, least recently used first, when held bytes pass `high` of
        the CPU tier's bound (or a put was refused since the last call), down to `low`; they
        stay loadable until `ack_retired`.

        Args:
            high: the fraction of the CPU tier's bound that starts a retirement.
            low: the fraction it retires down to.

        Returns:
            The digests now retiring (reported to the scheduler).
        """
        bound = self.storage.memory_bound
        if bound == 0:
            return []
        with self.lock:
            used = sum(t.nbytes for k, t in self._held.items() if k not in self._retiring)
            # A put refused for want of a block (the arena fragments) also asks for room.
            rejected = self.storage.memory_rejected()
            refused, self._rejected_seen = rejected > self._rejected_seen, rejected
            if used <= high * bound and not refused:
                return []
            out: list[str] = []
            for key in self.storage.memory_keys():  # LRU first
                if used <= low * bound and (out or not refused):
                    break  # (after a refused put, at least one chunk goes)
                t = self._held.get(key)
                if t is None or key in self._retiring:
                    continue
                self._retiring.add(key)
                used -= t.nbytes
                out.append(key[len(self.namespace) :])
            return out

    def ack_retired(self, digests: Sequence[str]) -> None:
        """The scheduler no longer counts these: release and drop them from the CPU tier."""
        with self.lock:
            for digest in digests:
                key = self.key(digest)
                if key not in self._retiring:
                    continue
                self._retiring.discard(key)
                self.drop(key)
                self.storage.remove(key)

    # ------------------------------------------------------------------ prefetches

    def claim_prefetches(self, digests: Sequence[str]) -> list[str]:
        """Mark these digests as being prefetched, but for those held or already being
        prefetched; returns the ones marked now (to be read), in order."""
        todo = []
        with self.lock:
            for d in digests:
                if self.key(d) in self._held or d in self._prefetching:
                    continue
                self._prefetching.add(d)
                todo.append(d)
        return todo

    def prefetch_ended(self, digest: str, ok: bool) -> None:
        """A prefetch ended: loads still waiting for it get it (it is held, e.g. by a store
        meanwhile) or hear that it will not come; a failed one is reported (`Progress.failed`).

        Args:
            digest: the chunk's digest.
            ok: whether the chunk is held now.
        """
        with self.lock:
            self._prefetching.discard(digest)
            key = self.key(digest)
            if key in self._waiters:
                if key in self._held:
                    self._feed(key)
                else:
                    for w in self._waiters.pop(key):
                        w.failed = True
                    self._cond.notify_all()
                    if self._wake is not None:
                        self._wake()
            if not ok:
                self._progress.failed.append(digest)

    # ------------------------------------------------------------------ background loads' waits

    def hold_or_wait(self, digest: str) -> torch.Tensor | Waiter | None:
        """For a background load, in one lock step: a hold on the chunk when it is held
        (`take_hold`), a registered `Waiter` when a prefetch is still reading it, else None."""
        key = self.key(digest)
        with self.lock:
            if key not in self._held and digest in self._prefetching:
                w = Waiter(digest, key)
                self._waiters.setdefault(key, []).append(w)
                return w
            return self.take_hold(key)

    def settled(self, w: Waiter) -> bool:
        """Whether `w`'s chunk landed (its hold taken) or will not come: `wait_landed` would
        return at once. Never waits."""
        with self.lock:
            return w.tensor is not None or w.failed

    def wait_landed(self, w: Waiter, give_up: Callable[[], bool]) -> torch.Tensor | None:
        """Block until `w`'s chunk landed (its hold, handed over to the caller, who releases it)
        or its read failed (None); None as well once `give_up()` says so (then `abandon` it)."""
        with self._cond:
            while w.tensor is None and not w.failed:
                if give_up():
                    return None  # the job ends here; `abandon` unregisters it
                self._cond.wait(0.01)
            tensor, w.tensor = w.tensor, None  # handed over to the caller (or nothing)
        return tensor

    def abandon(self, w: Waiter) -> None:
        """The load stopped waiting for `w`: unregister it, release its hold if one landed."""
        with self.lock:
            waiting = self._waiters.get(w.key, [])
            if any(x is w for x in waiting):
                waiting[:] = [x for x in waiting if x is not w]
                if not waiting:
                    del self._waiters[w.key]
            tensor, w.tensor, w.failed = w.tensor, None, True
            if tensor is not None:  # landed, but the loader stopped before it
                self.storage.release(w.key, tensor)

    def _feed(self, key: str) -> None:
        """The chunk is held now (caller has `lock`): each background load waiting for it takes
        its own hold in this same lock step, so nothing can evict it in between."""
        waiters = self._waiters.pop(key, [])
        for w in waiters:
            w.tensor = self.storage.hold(key, count=True)
            w.failed = w.tensor is None
        self._cond.notify_all()
        if waiters and self._wake is not None:
            self._wake()
