"""Who waits for whom on a CUDA cache: the engine's transfer streams and staging buffers.

Three side streams beside vLLM's compute stream (issue 18, GPU item 1):

* `gather`: waits for the compute stream (a store's pages are written by kernels queued so far),
  uploads the slot ids and gathers the pages into a staging buffer; records `gathered`.
* `copy_out`: waits for `gathered` only, then copies the staging buffer to the CPU tier's pinned
  buffer (PCIe); records `done`, which also frees the staging buffer.
* `load`: copies a held chunk host-to-device into its own staging buffer without waiting for
  anything on the compute stream, then waits for a marker recorded on the compute stream when
  the load was asked (kernels queued before may still read the blocks just handed to the
  request), scatters into the pages, and records `done`.

The compute stream waits for a store's `gathered` and for a load's `done`, nothing else: a
device-to-host copy never sits in front of vLLM's next kernels (on one stream, a step storing n
chunks made them wait for n - 1 PCIe copies), and a load's PCIe copy does not wait for
unrelated compute. No call here waits on the host.

Primitives: `StreamBackend` (what the engine needs of CUDA: streams, events, the current stream,
an asynchronous copy; `CudaBackend` is torch.cuda, tests pass a recorder), `TransferStreams`
(the three streams), `StagingRing` (device buffers allocated once, handed out by free slot).
Imports torch only.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import NamedTuple, Protocol

import torch


class EventLike(Protocol):
    def record(self, stream: StreamLike | None = None) -> None: ...

    def query(self) -> bool: ...


class StreamLike(Protocol):
    def wait_event(self, event: EventLike) -> None: ...

    def wait_stream(self, stream: StreamLike) -> None: ...

    def synchronize(self) -> None: ...


class StreamBackend(Protocol):
    """What the engine asks of the device runtime (torch.cuda on a GPU)."""

    def new_stream(self, device: torch.device, name: str) -> StreamLike: ...

    def new_event(self) -> EventLike: ...

    def current_stream(self, device: torch.device) -> StreamLike: ...

    def use(self, stream: StreamLike) -> AbstractContextManager[object]: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """`dst.copy_(src)` queued on the current stream, asynchronous (pinned host memory)."""
        ...


class CudaBackend:
    """`StreamBackend` over torch.cuda."""

    def new_stream(self, device: torch.device, name: str) -> StreamLike:
        return torch.cuda.Stream(device=device)  # type: ignore[return-value]

    def new_event(self) -> EventLike:
        return torch.cuda.Event()  # type: ignore[return-value]

    def current_stream(self, device: torch.device) -> StreamLike:
        return torch.cuda.current_stream(device)  # type: ignore[return-value]

    def use(self, stream: StreamLike) -> AbstractContextManager[object]:
        return torch.cuda.stream(stream)  # type: ignore[arg-type]

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)


class TransferStreams:
    """The gather, copy-out and load streams of one cache (see the module docstring).

    Args:
        device: the cache's device.
        backend: the runtime; default torch.cuda.
    """

    def __init__(self, device: torch.device, backend: StreamBackend | None = None) -> None:
        self.device = device
        self.backend: StreamBackend = backend or CudaBackend()
        self.gather = self.backend.new_stream(device, "gather")
        self.copy_out = self.backend.new_stream(device, "copy_out")
        self.load = self.backend.new_stream(device, "load")

    def compute(self) -> StreamLike:
        """vLLM's stream: the one current where the engine is called."""
        return self.backend.current_stream(self.device)

    def use(self, stream: StreamLike) -> AbstractContextManager[object]:
        return self.backend.use(stream)

    def record(self, stream: StreamLike) -> EventLike:
        """A new event recorded on `stream` now."""
        ev = self.backend.new_event()
        ev.record(stream)
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.backend.copy(dst, src)

    def synchronize(self) -> None:
        """Host wait for everything queued on the three streams (shutdown, tests)."""
        for s in (self.gather, self.copy_out, self.load):
            s.synchronize()


class Staged(NamedTuple):
    """A staging buffer handed out: `tensor`, its `slot` (for `StagingRing.release`) and `busy`:
    None, or the event of the slot's last reader still pending, which the writer's stream must
    wait for before writing (device-side)."""

    tensor: torch.Tensor
    slot: int
    busy: EventLike | None


class StagingRing:
    """Device buffers for the copies, allocated once (at `register`, or at the first copy)
    instead of per chunk: with vLLM's memory taken up to its profile, a per-call allocation could
    fail a load (an OOM fails the request under the default policy).

    `take` hands out the first slot, from a round-robin cursor, whose last reader has completed
    (`release(slot, event)`: the event recorded after it; a slot never released is free). When
    every slot is still being read it hands out the next one in turn with the pending event:
    the writer's stream waits for it on the device, never the host. A ring read and written on
    one stream needs no `release` (stream order). A chunk larger than a buffer grows that buffer
    (counted in `allocations`).

    How many slots: a store's buffer is read by its device-to-host copy, so a step storing more
    chunks than there are slots makes gather k wait for copy-out k - slots, and the compute
    stream, which waits for gather k, inherits that wait. Slots >= chunks stored per step keep
    PCIe entirely off the compute stream's path; fewer trade device memory for that wait.

    Args:
        device: the cache's device (None: no buffers).
        nbytes: bytes of each buffer, allocated now (0: at first use).
        slots: how many buffers.
    """

    def __init__(self, device: torch.device | None, nbytes: int, slots: int) -> None:
        self.device = device
        self._bufs: list[torch.Tensor | None] = [None] * max(slots, 1)
        self._free: list[EventLike | None] = [None] * len(self._bufs)
        self._next = 0
        self.allocations = 0
        if device is not None and nbytes:
            for i in range(len(self._bufs)):
                self._grow(i, nbytes)

    def __len__(self) -> int:
        return len(self._bufs)

    def _grow(self, i: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._bufs[i] = buf
        self.allocations += 1
        return buf

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Staged:
        """A contiguous `[shape]` `dtype` view of a free buffer (see the class docstring)."""
        nbytes = math.prod(shape) * dtype.itemsize
        n = len(self._bufs)
        i = self._next
        for k in range(n):
            j = (self._next + k) % n
            ev = self._free[j]
            if ev is None or ev.query():
                i = j
                break
        busy = self._free[i]
        if busy is not None and busy.query():
            busy = None
        self._free[i] = None
        self._next = (i + 1) % n
        buf = self._bufs[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._grow(i, nbytes)
        return Staged(buf[:nbytes].view(dtype).view(shape), i, busy)

    def release(self, slot: int, event: EventLike) -> None:
        """`slot`'s buffer is read until `event` (recorded after its last reader) completes."""
        self._free[slot] = event
