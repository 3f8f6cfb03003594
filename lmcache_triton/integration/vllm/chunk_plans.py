"""Which chunks of a request the workers load into its blocks, and which they store from them.

`ChunkPlans` turns a request's state (`RequestState`: chunk spans, block ids, how many leading
chunks are handled) into `ChunkOp`s for the step's metadata:

  `loads(st, first, end)`   the chunks of the promised tokens `[first, end)`: the request's own
                            chunks, or up to a stored partial chunk the lookup hit (`st.tail`,
                            taken); blocks vLLM already computed are skipped.
  `stores(st, computed)`    the chunks that became whole by `computed` tokens and that not every
                            rank holds yet; partial chunks are noted as tails (`TailRegistry`) so
                            a later prompt that continues them hits them. With
                            `save_decode_cache`, the chunks decoding filled too.
  `tail_hit(st, n, computed)`  the lookup's side of tails: the longest stored partial chunk
                            that continues the `n` chunks a lookup hit (`st.tail`, loaded by
                            `loads`).

Invariants: a loaded chunk is never stored again (`st.num_handled` moves past it); a loaded tail
is not the prompt's chunk there, which is stored once computed. What the scheduler does with
the ops (metadata, asynchronous loads, KV events) is scheduler.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmcache_triton.engine import ChunkSpan
from lmcache_triton.integration.vllm.metadata import ChunkOp

if TYPE_CHECKING:
    from lmcache_triton.chunk.planner import ChunkPlanner
    from lmcache_triton.config import LMCacheConfig
    from lmcache_triton.engine import PrefixIndex
    from lmcache_triton.engine.tails import TailRegistry
    from lmcache_triton.integration.vllm.request_state import RequestState


class ChunkPlans:
    """Load and store plans of a request's chunks (module docstring).

    Args:
        config: the connector's config (`chunk_size`, `save_decode_cache`).
        planner: the chunk planner both roles share (`ConnectorCore.planner`).
        index: the scheduler's `PrefixIndex` (which chunks every rank holds).
        tails: the partial chunks stored, by the chunk before them.
        block_size: tokens per vLLM block.
    """

    def __init__(
        self, config: LMCacheConfig, planner: ChunkPlanner, index: PrefixIndex, tails: TailRegistry, block_size: int
    ) -> None:
        self.config = config
        self.planner = planner
        self.index = index
        self.tails = tails
        self.block_size = block_size

    def loads(self, st: RequestState, first: int, end: int) -> tuple[list[ChunkOp], list[int]]:
        """The loads of the promised tokens `[first, end)` of a request; takes `st.tail`.

        Args:
            st: the request's state; `st.num_handled` moves past the loaded chunks.
            first: the first promised token (vLLM's own prefix hit ends there).
            end: the end of the promised tokens.

        Returns:
            The ops, in order, and for each the end token of its chunk (at most `end`).
        """
        tail, st.tail = st.tail, None
        spans = st.spans if tail is None else [*st.spans[: tail.index], tail]
        ops, ends = [], []
        for span in spans:
            if span.end <= first or span.start >= end:
                continue
            blocks = self.planner.blocks_of(span, st.block_ids)
            skip = max(first - span.start, 0) // self.block_size
            ops.append(ChunkOp(span.digest, blocks, span.num_tokens, skip))
            ends.append(min(span.end, end))
        if ops:
            # Loaded chunks are cached: never store them again. A tail is not the prompt's
            # chunk there: that one is stored once computed.
            loaded = tail.index if tail is not None else sum(1 for s in st.spans if s.start < end)
            st.num_handled = max(st.num_handled, loaded)
        return ops, ends

    def stores(self, st: RequestState, computed: int) -> list[tuple[ChunkSpan, ChunkOp]]:
        """The stores of a request whose first `computed` tokens are computed.

        Args:
            st: the request's state; `st.num_handled` moves past every whole chunk up to
                `computed`, stored or already held.
            computed: tokens computed once this step ran.

        Returns:
            Per chunk to store, in order: its span and its op.
        """
        if self.config.save_decode_cache and computed > st.prompt_len:
            self._extend_for_decode(st, computed)
        out = []
        while st.num_handled < len(st.spans):
            span = st.spans[st.num_handled]
            if span.end > computed:
                break
            if span.num_tokens < self.config.chunk_size:  # a later turn may continue it
                self._note_tail(st, span)
            if not self.index.has(span.digest):
                out.append((span, ChunkOp(span.digest, self.planner.blocks_of(span, st.block_ids), span.num_tokens)))
            st.num_handled += 1
        return out

    def tail_hit(self, st: RequestState, n: int, num_computed_tokens: int) -> ChunkSpan | None:
        """The longest stored partial chunk that continues the `n` chunks the lookup hit: a
        chunk shorter than its neighbour `st.spans[n]`, stored after the same chunks (the last
        partial chunk of an earlier prompt of this conversation), whose tokens all begin
        `st.spans[n]`. Every rank must hold it. A multi-turn conversation's next prompt repeats
        the previous prompt: without this, the previous prompt's last partial chunk, up to
        `chunk_size - 1` tokens, was computed again every turn.

        Args:
            st: the request's state.
            n: how many leading chunks of `st.spans` every rank holds.
            num_computed_tokens: vLLM's own prefix hit.

        Returns:
            The partial chunk as a span at index `n`, or None when nothing longer than vLLM's
            own hit is held.
        """
        if n >= len(st.spans) or st.request is None:
            return None
        nxt = st.spans[n]
        parent = st.spans[n - 1].digest if n else self.tails.root(st.extra)
        tokens = st.request.prompt_token_ids
        for length, digest in self.tails.candidates(parent, below=nxt.num_tokens):
            end = nxt.start + length
            if end <= num_computed_tokens:
                break  # longest first: the rest are shorter still
            if not self.index.has(digest):
                continue
            # Equal digests mean equal tokens (prefix-chained): hash this prompt's first tokens.
            mine = self.planner.spans(tokens[:end], st.extra)[-1]
            if mine.digest == digest:
                return ChunkSpan(n, nxt.start, end, digest)
        return None

    def _extend_for_decode(self, st: RequestState, computed: int) -> None:
        """save_decode_cache: add the whole chunks that decoding has filled (prompt + output
        tokens), so a follow-up turn that repeats the conversation hits them too."""
        cs = self.config.chunk_size
        n_full = computed // cs
        have_full = sum(1 for s in st.spans if s.num_tokens == cs)
        if n_full <= have_full or st.request is None:
            return
        tokens = list(st.request.all_token_ids[: n_full * cs])
        if len(tokens) < n_full * cs:
            return
        # The prompt's partial chunk (already stored under its own key) gives way to the
        # whole chunk that now covers those tokens.
        st.num_handled = min(st.num_handled, have_full)
        st.spans = self.planner.spans(tokens, st.extra)

    def _note_tail(self, st: RequestState, span: ChunkSpan) -> None:
        parent = st.spans[span.index - 1].digest if span.index else self.tails.root(st.extra)
        self.tails.add(parent, span.num_tokens, span.digest)
