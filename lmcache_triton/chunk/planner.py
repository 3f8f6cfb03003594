"""How a token sequence becomes keyed chunks, and which paged-cache blocks hold each chunk.

Primitives:
  `ChunkPlanner(config, block_size).spans(tokens, extra)`  keyed chunks of a prompt.
  `ChunkPlanner.blocks_of(span, block_ids)`                 the blocks holding a chunk.
  `chunk_key(namespace, digest)`                            a chunk's storage key.

Invariants:
  * The scheduler and every worker compute the same keys from the same tokens: hashes are
    process-stable (`hashing.py`) and prefix-chained (a chunk's key names every token before it).
  * A key is lower-case hex (namespace digest + chunk digest), safe as a file name or server key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.hashing import chunk_hashes


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a prompt: tokens `[start, end)` and its key's chunk digest (hex)."""

    index: int
    start: int
    end: int
    digest: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ChunkPlanner:
    """Splits token sequences into keyed chunks and maps chunks to cache blocks.

    Args:
        config: the loaded configuration (`chunk_size`, `save_unfull_chunk`).
        block_size: tokens per vLLM (manager) block; `chunk_size` must be a multiple of it.
    """

    def __init__(self, config: LMCacheConfig, block_size: int) -> None:
        if config.chunk_size % block_size != 0:
            raise ValueError(
                f"chunk_size ({config.chunk_size}) must be a multiple of vLLM's block size "
                f"({block_size}): chunks move whole pages. Set LMCACHE_CHUNK_SIZE to a multiple "
                f"of {block_size}."
            )
        self.chunk_size = config.chunk_size
        self.block_size = block_size
        self.include_partial = config.save_unfull_chunk

    def spans(self, tokens: Sequence[int], extra: Sequence[str] = ()) -> list[ChunkSpan]:
        """Keyed chunks of `tokens`: every whole chunk, plus the last partial one when
        `save_unfull_chunk` is on."""
        digests = chunk_hashes(tokens, self.chunk_size, extra=tuple(extra), include_partial=self.include_partial)
        n = len(tokens)
        return [
            ChunkSpan(i, i * self.chunk_size, min((i + 1) * self.chunk_size, n), d.hex()) for i, d in enumerate(digests)
        ]

    def blocks_of(self, span: ChunkSpan, block_ids: Sequence[int]) -> list[int]:
        """The block ids holding `span`'s tokens (the last one may be partly filled)."""
        first = span.start // self.block_size
        last = (span.end + self.block_size - 1) // self.block_size
        if last > len(block_ids):
            raise ValueError(
                f"chunk {span.index} needs blocks [{first}, {last}) but the request has {len(block_ids)} blocks"
            )
        return list(block_ids[first:last])


def chunk_key(namespace: str, digest: str) -> str:
    """The storage key of a chunk: hex only, so it is safe as a file name."""
    return f"{namespace}{digest}"
