"""A CUDA cache's stores and loads on the side streams (`engine.streams`), off vLLM's compute stream.

`DeviceCopies` is what `KVCacheEngine` (`engine.engine`) runs instead of its in-step CPU copies
when the cache is on a GPU (or a stream runtime is given: tests pass a recorder): it owns the
side streams (`TransferStreams`), the staging rings of the stores and of the loads, and the
stream of the background loader, all made at `register`.

Primitives:
* `store(...)`: gather a chunk into a store staging buffer on the gather stream, copy it out into
  the CPU tier's pinned buffer (put and held in one step of the hold book's lock) on the
  copy-out stream; the compute stream waits for the gather only.
* `load(...)`: copy a held chunk host-to-device into a load staging buffer (an encoded one as it
  is), wait for a marker on the compute stream, scatter (dequantizing an encoded chunk); the
  compute stream waits for the scatter.
* `mark()`: an event on the compute stream after everything queued so far.

Invariants:
* No call waits on the host: every wait is an event on a stream (`engine.streams`).
* A store's CPU-tier buffer is held from its put until its copy is done, and a load's held
  chunk until its scatter is done: both tracked by `InFlightCopies`, finished at `advance`.
* A store the CPU tier refused still has its gather tracked (its blocks are still read).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_triton.chunk.codec import Encoding
from lmcache_triton.storage.hierarchy import StorageHierarchy

from .chunk_copies import StoreForm, scatter_chunk
from .copy_paths import CopyPath
from .holds import HoldBook
from .inflight import InFlightCopies
from .streams import EventLike, StagingRing, StreamBackend, StreamLike, TransferStreams


class DeviceCopies:
    """The side-stream copies of one engine over a CUDA cache.

    Args:
        storage: the tiers the chunks are put into and loaded from.
        book: the engine's hold book (its lock: the put and hold of a store's buffer).
        copies: the engine's in-flight copies (each store and load is tracked there).
        device: the cache's device.
        backend: the stream runtime; None: torch.cuda.
        staging_bytes: bytes of each staging buffer, allocated now (0: at the first copy).
        staging_slots: store staging buffers (loads have two).
    """

    def __init__(
        self,
        storage: StorageHierarchy,
        book: HoldBook,
        copies: InFlightCopies,
        device: torch.device,
        backend: StreamBackend | None,
        staging_bytes: int,
        staging_slots: int,
    ) -> None:
        self.storage = storage
        self.book = book
        self.copies = copies
        self.streams = TransferStreams(device, backend)
        # Asynchronous loads queue from the loader thread: a stream of their own.
        self.load_stream: StreamLike = self.streams.backend.new_stream(device, "async_load")
        self.staging = StagingRing(device, staging_bytes, staging_slots)  # device buffers of the stores
        self.load_staging = StagingRing(device, staging_bytes, 2)  # ... of the loads (one stream: no events)

    def mark(self) -> EventLike:
        """An event on the compute stream after every kernel queued so far."""
        return self.streams.record(self.streams.compute())

    def store(
        self,
        path: CopyPath,
        digest: str,
        key: str,
        block_ids: Sequence[int],
        form: StoreForm,
        num_tokens: int,
        meta: dict[str, str],
    ) -> bool:
        """Queue a store of `block_ids`' first `num_tokens` tokens into the CPU tier.

        Args:
            path: the copy path (its ids and gather).
            digest: the chunk's digest.
            key: its key.
            block_ids: the blocks holding its tokens, in order.
            form: what the CPU tier holds (token rows, or a lossy codec's parts).
            num_tokens: the chunk's tokens.
            meta: the chunk's header fields.

        Returns:
            False when the CPU tier refused the chunk (its gather is still tracked).
        """
        streams = self.streams
        compute = streams.compute()
        streams.gather.wait_stream(compute)  # the pages are written by kernels queued so far
        with streams.use(streams.gather):
            ids = path.ids(block_ids, num_tokens)
            # Encoded: the fused gather + quantize writes the parts into staging, so the
            # device-to-host copy and the pinned buffer carry the encoded bytes only.
            staged = self.staging.take(form.shape, form.dtype)
            if staged.busy is not None:  # every buffer still copying out: wait on the device
                streams.gather.wait_event(staged.busy)
            form.gather(ids, staged.tensor)
            gathered = streams.record(streams.gather)
        with streams.use(streams.copy_out):
            streams.copy_out.wait_event(gathered)  # and for nothing else
            with self.book.lock:
                # The device->host copy lands in the tier's pinned buffer, held until it is
                # done (never evicted or reused under the DMA); the disk write waits for it.
                # Held from the put itself (no eviction can slip in between).
                _, held = self.storage.put_fill_held(
                    key, form.dtype, form.shape, lambda dst: streams.copy(dst, staged.tensor),
                    meta, write_back=False, encoding=form.encoding,
                )  # fmt: skip
            done = streams.record(streams.copy_out)
        self.staging.release(staged.slot, done)
        # vLLM may hand the blocks to another request: its kernels run after our gather only.
        compute.wait_event(gathered)
        # A refused store's gather still reads the blocks: tracked (kind "gather") until done.
        self.copies.add_store(digest, key, done, held, gathered)
        return held is not None

    def load(
        self,
        path: CopyPath,
        digest: str,
        key: str,
        tensor: torch.Tensor,
        enc: Encoding | None,
        block_ids: Sequence[int],
        num_tokens: int,
        skip_blocks: int,
        skip_tokens: int,
    ) -> None:
        """Queue the scatter of a held chunk into `block_ids` before this step's forward.

        Args:
            path: the copy path (its ids and scatter).
            digest: the chunk's digest.
            key: its key.
            tensor: the chunk's CPU-tier tensor, held for this copy (released when it is done).
            enc: its encoding (None: token rows).
            block_ids: the blocks that hold its tokens, in order.
            num_tokens: the chunk's tokens.
            skip_blocks: leading blocks not to overwrite.
            skip_tokens: the tokens of those blocks.
        """
        streams = self.streams
        compute = streams.compute()
        # Blocks freshly handed to this request may still be read by kernels queued so far:
        # the scatter waits for them; the host->device copy into staging waits for nothing.
        handed = streams.record(compute)
        with streams.use(streams.load):
            # Whole chunk from pinned memory, async; an encoded one as it is (fewer bytes).
            dev = self.load_staging.take(tuple(tensor.shape), tensor.dtype).tensor
            streams.copy(dev, tensor)
            streams.load.wait_event(handed)
            ids = path.ids(block_ids, num_tokens, skip_tokens)
            scatter_chunk(path, dev, enc, ids, skip_blocks)
            done = streams.record(streams.load)
        compute.wait_event(done)  # this step's forward reads the loaded pages
        self.copies.add_load(digest, key, done, tensor)
