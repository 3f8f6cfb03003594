"""The scheduler's record of partial chunks stored, so a later prompt that continues one hits it.

Primitives:
  `TailRegistry.add(parent, length, digest)`   a partial chunk of `length` tokens was stored
                                               after the chunk `parent` (its chain predecessor).
  `TailRegistry.candidates(parent, below)`     the partial chunks stored after `parent` that are
                                               shorter than `below` tokens, longest first.
  `TailRegistry.root(extra)`                   the parent name of a first chunk.

Why: chunk digests are prefix-chained, so a chunk is found only by hashing exactly its tokens.
The next turn of a conversation repeats the previous prompt and goes on: the previous prompt's
last partial chunk (T tokens) is a prefix of the new prompt's chunk at the same place, whose
digest covers more tokens. Hashing the new prompt's first T tokens of that chunk finds it, but
only if T is known: the registry remembers the lengths stored after each chunk.

Invariants:
  * It is a hint: a candidate is served only when every rank holds its digest (the prefix index)
    and the request's own tokens hash to it. A forgotten entry costs a hit, never correctness.
  * Bounded: at most `max_parents` parents, least recently added or asked first out, at most
    `per_parent` lengths each (the longest kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT = "root:"


class TailRegistry:
    """Lengths and digests of partial chunks, by the digest of the chunk before them.

    Args:
        max_parents: parents remembered; default 65536 (about 10 MB).
        per_parent: partial chunks remembered per parent, longest kept; default 8.
    """

    def __init__(self, max_parents: int = 65536, per_parent: int = 8) -> None:
        self.max_parents = max_parents
        self.per_parent = per_parent
        self._tails: OrderedDict[str, dict[int, str]] = OrderedDict()

    @staticmethod
    def root(extra: Sequence[str]) -> str:
        """The parent name of a request's first chunk (its extras decide its digest)."""
        return ROOT + "\x00".join(extra)

    def add(self, parent: str, length: int, digest: str) -> None:
        tails = self._tails.get(parent)
        if tails is None:
            tails = self._tails[parent] = {}
            while len(self._tails) > self.max_parents:
                self._tails.popitem(last=False)
        else:
            self._tails.move_to_end(parent)
        tails[length] = digest
        if len(tails) > self.per_parent:
            del tails[min(tails)]

    def candidates(self, parent: str, below: int) -> list[tuple[int, str]]:
        """`(length, digest)` of the partial chunks stored after `parent` with fewer than
        `below` tokens, longest first."""
        tails = self._tails.get(parent)
        if not tails:
            return []
        self._tails.move_to_end(parent)
        return sorted(((n, d) for n, d in tails.items() if n < below), reverse=True)

    def __len__(self) -> int:
        return len(self._tails)
