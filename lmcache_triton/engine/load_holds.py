"""What a background load holds: its chunks held at submit, or as a prefetch publishes them.

`LoadHolds.take(chunks)` turns the chunks of `KVCacheEngine.load_async` (`engine.engine`) into
the loader's `ChunkLoad`s (`engine.loader`): each chunk held now is held for the load now, in
the step that planned it; one a prefetch is still reading becomes a `Pending` over the hold
book's `Waiter` (`engine.holds`), held for the load in the lock step that publishes it.

Primitives: `LoadHolds.take`; `CheckHeld` (the engine's check of a held chunk against its cache:
the tensor, its token count and encoding, or None with the hold released and counted).

Invariants:
* Every `ChunkLoad` with a tensor carries the hold taken for it and the `release` of that hold;
  a pending one has none until `Pending.wait` hands it over, and `Pending.abandon` releases a
  hold that landed after the loader stopped.
* The chunks from the first one neither held (and of this cache's shape) nor being read on are
  not loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from lmcache_triton.chunk.codec import Encoding
from lmcache_triton.storage.hierarchy import StorageHierarchy

from .holds import HoldBook, Waiter
from .loader import ChunkLoad, Pending

# (digest, the hold taken on it or None, blocks) -> (tensor, tokens, encoding), or None: the hold
# (if any) released and the failure counted.
CheckHeld = Callable[[str, torch.Tensor | None, int], tuple[torch.Tensor, int, Encoding | None] | None]


class _PendingRead(Pending):
    """A chunk of a background load that a prefetch is still reading: the loader's `Pending`
    over the hold book's `Waiter`, checked against the cache on landing."""

    def __init__(self, holds: LoadHolds, waiter: Waiter) -> None:
        self.holds, self.waiter = holds, waiter

    def wait(self, chunk: ChunkLoad, give_up: Callable[[], bool]) -> bool:
        return self.holds.landed(self.waiter, chunk, give_up)

    def settled(self) -> bool:
        return self.holds.book.settled(self.waiter)

    def abandon(self) -> None:
        self.holds.book.abandon(self.waiter)


class LoadHolds:
    """The holds of one engine's background loads.

    Args:
        book: the engine's hold book (holds now, or a `Waiter` for a chunk still being read).
        storage: the tiers whose CPU tier holds the chunks (`release`).
        check: the engine's check of a held chunk against its cache (`CheckHeld`).
    """

    def __init__(self, book: HoldBook, storage: StorageHierarchy, check: CheckHeld) -> None:
        self.book = book
        self.storage = storage
        self.check = check

    def take(self, chunks: Sequence[tuple[str, Sequence[int], int]]) -> list[ChunkLoad]:
        """The loader's chunks for `(digest, block_ids, skip_blocks)` in prefix order, each held
        now or pending; it stops at the first chunk neither held nor being read.

        Args:
            chunks: `(digest, block_ids, skip_blocks)` of a request, in prefix order.

        Returns:
            The `ChunkLoad`s of the leading chunks that can be loaded.
        """
        loads: list[ChunkLoad] = []
        for digest, block_ids, skip in chunks:
            held = self.book.hold_or_wait(digest)
            if isinstance(held, Waiter):
                loads.append(ChunkLoad(digest, list(block_ids), skip, 0, None, None, _PendingRead(self, held)))
                continue
            taken = self.check(digest, held, len(block_ids))
            if taken is None:
                break
            tensor, num_tokens, _ = taken
            release = functools.partial(self.storage.release, self.book.key(digest), tensor)
            loads.append(ChunkLoad(digest, list(block_ids), skip, num_tokens, tensor, release))
        return loads

    def landed(self, w: Waiter, chunk: ChunkLoad, give_up: Callable[[], bool]) -> bool:
        """`Pending.wait` for `w`: the chunk's hold once it landed (`HoldBook.wait_landed`),
        checked and handed to `chunk` (tensor, tokens, release).

        Args:
            w: the chunk's waiter.
            chunk: the loader's chunk, filled on success.
            give_up: asked while waiting; True ends the wait.

        Returns:
            False when nothing of the chunk is held (read failed, refused, or given up).
        """
        tensor = self.book.wait_landed(w, give_up)
        if tensor is None:
            return False
        checked = self.check(w.digest, tensor, len(chunk.block_ids))
        if checked is None:
            return False
        chunk.tensor, chunk.num_tokens, _ = checked
        chunk.release = functools.partial(self.storage.release, w.key, tensor)
        return True
