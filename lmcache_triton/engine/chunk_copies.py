"""The engine's chunk copies around a `CopyPath`: what a store gathers into, what a load
scatters from, the background loader's copier, and the start-up warm-up of every kernel variant.

Primitives:
  `StoreForm`          how a store holds a chunk: token rows of the cache's dtype, or one uint8
                       buffer of a lossy codec's parts (`chunk.codec.Encoding`), gathered and
                       quantized in one fused launch per K/V half.
  `scatter_chunk`      a load's scatter: token rows as they are (leading blocks skipped), an
                       encoded chunk dequantized on the way.
  `LoadCopier`         `loader.ChunkCopier` for `AsyncLoader`: its own copy path and, on CUDA, its
                       own stream and staging ring.
  `warm_up`            JIT-compile at start-up every copy-kernel variant serving launches.

Invariants:
  * Nothing here allocates on a copy beyond the staging rings (allocated once, reused in stream
    order); every copy touches only the slots named by its ids.
  * On CUDA a load's host-to-device copy waits for nothing; its scatter waits only for the
    compute work queued when the load was planned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from lmcache_triton.chunk.codec import Encoding

from .copy_paths import CopyPath
from .loader import ChunkCopier, ChunkLoad, LoadJob
from .streams import EventLike, StagingRing, StreamLike, TransferStreams


class StoreForm:
    """How a store holds a chunk: token rows `rows` of the cache's dtype, or (`encoding`) one
    uint8 buffer of a lossy codec's parts, gathered and quantized in one fused launch per half."""

    def __init__(self, path: CopyPath, rows: tuple[int, ...], encoding: Encoding | None) -> None:
        self.path, self.encoding = path, encoding
        self.dtype: torch.dtype = path.flat.dtype if encoding is None else torch.uint8
        self.shape: tuple[int, ...] = rows if encoding is None else (encoding.nbytes,)

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        if self.encoding is None:
            self.path.gather(ids, out)
        else:
            self.path.gather_encoded(ids, out, self.encoding)


def scatter_chunk(path: CopyPath, src: torch.Tensor, enc: Encoding | None, ids: torch.Tensor, skip_blocks: int) -> None:
    """A load's scatter: token rows as they are, an encoded chunk dequantized on the way (token
    rows skip leading blocks by slot, so an encoded chunk is always whole)."""
    if enc is None:
        path.scatter(path.skipped(src, skip_blocks), ids)
    else:
        path.scatter_encoded(src, enc, ids)


class LoadCopier(ChunkCopier):
    """The engine's chunk copy for the background loader: its own copy path (id buffers), and
    on CUDA its own stream and staging ring (two chunk buffers, reused in stream order).

    On CUDA each chunk's host-to-device copy into staging waits for nothing; before the first
    scatter of a job the stream waits for the job's `after` marker (the compute work queued
    when the load was planned), never for later steps.

    Args:
        path: the loads' own copy path (its id buffers are rewritten per call).
        block_size: tokens per vLLM block.
        encoding_of: `(digest, held tensor)` -> the chunk's encoding, None for token rows.
        streams / stream: the side streams and the load stream (CUDA caches); None: plain copies.
    """

    def __init__(
        self,
        path: CopyPath,
        block_size: int,
        encoding_of: Callable[[str, torch.Tensor], Encoding | None],
        streams: TransferStreams | None,
        stream: StreamLike | None,
    ) -> None:
        self._path, self._block_size, self._encoding_of = path, block_size, encoding_of
        self._streams = streams
        self._stream = stream if streams is not None else None
        self.on_device = self._stream is not None
        self._staging = StagingRing(path.flat.device if self.on_device else None, 0, 2)
        self._job: LoadJob | None = None

    def start(self, job: LoadJob) -> AbstractContextManager[object]:
        # Entered around each chunk (the loader interleaves jobs): the job's marker is waited
        # for once, before its first scatter, and then dropped from the job.
        self._job = job
        if self._streams is None or self._stream is None:
            return contextlib.nullcontext()
        return self._streams.use(self._stream)

    def copy_chunk(self, chunk: ChunkLoad) -> None:
        path, skip_tokens = self._path, chunk.skip_blocks * self._block_size
        if skip_tokens >= chunk.num_tokens:
            return
        src = chunk.tensor
        assert src is not None, "the loader copies held chunks only"
        enc = self._encoding_of(chunk.digest, src)
        if self._streams is not None and self._stream is not None:
            dev = self._staging.take(tuple(src.shape), src.dtype).tensor
            self._streams.copy(dev, src)  # from pinned memory: asynchronous, waits for nothing
            job = self._job
            if job is not None and job.after is not None:
                self._stream.wait_event(job.after)
                job.after = None
            src = dev
        ids = path.ids(chunk.block_ids, chunk.num_tokens, skip_tokens)
        scatter_chunk(path, src, enc, ids, chunk.skip_blocks)

    def finish(self) -> EventLike | None:
        if self._streams is None or self._stream is None:
            return None
        return self._streams.record(self._stream)


def warm_up(
    path: CopyPath,
    streams: TransferStreams,
    staging: StagingRing,
    max_tokens: int,
    codecs: Sequence[str] = (),
    store_codec: str | None = None,
    scatter_encoded: bool = False,
) -> None:
    """JIT-compile, at start-up, every copy-kernel variant serving launches (never in a request's
    step: 0.3-1.2 s each, per rank).

    For each chunk length of `CopyPath.warm_lengths` (one specialisation each: a full chunk and
    every partial tail share the tile and the count is not specialised), gather its rows and
    scatter the same bytes back through the staging ring (the cache holds nothing yet). For each
    lossy codec of `codecs` and each length of `CopyPath.encoded_warm_lengths`: the fused gather +
    quantize (`store_codec`: a lossy CPU-tier codec) and the fused dequantize + scatter
    (`scatter_encoded`: encoded chunks are loaded), by slots that are all skipped (-1): the same
    compiled kernels, nothing written.
    """
    # After whatever vLLM queued on the cache (e.g. zeroing it): the scatter writes back exactly
    # the bytes the gather read.
    side = streams.gather
    side.wait_stream(streams.compute())
    blocks = path.geom.num_blocks // path.pages_per_block
    with streams.use(side):
        for t in path.warm_lengths(max_tokens):
            n = -(-t // path.block_size)
            if n > blocks:  # a chunk this cache could never hold
                continue
            ids = path.ids(list(range(n)), t)
            staged = staging.take(path.chunk_shape(n, t), path.flat.dtype).tensor
            path.gather(ids, staged)
            path.scatter(staged, ids)
        dtype = str(path.flat.dtype).removeprefix("torch.")
        for codec in codecs:
            for t in path.encoded_warm_lengths(codec, max_tokens):
                n = -(-t // path.block_size)
                if n > blocks:
                    continue
                enc = Encoding(codec, dtype, path.chunk_shape(n, t))
                ids = path.ids(list(range(n)), t, skip_tokens=t)
                buf = staging.take((enc.nbytes,), torch.uint8).tensor
                if codec == store_codec:
                    path.gather_encoded(ids, buf, enc)
                if scatter_encoded:
                    path.scatter_encoded(buf, enc, ids)
    side.synchronize()
