"""The seam every slow tier implements (disk, remote, and whatever comes next).

The hierarchy (`storage.hierarchy`) holds the CPU tier and an ordered list of `SlowTier`s
(fastest first) and talks to them only through this protocol; the scheduler's prefix index asks
every tier the same batched question (`contains_many`); the vLLM integration reads `name`,
`medium` and `locality` for KV events and `stats` for metrics. A new tier is one file that
implements `SlowTier` plus one registration line in `storage.builder` (see docs/architecture.md).

Primitives:
  `contains_many(keys)`     batched presence: one round trip (remote) or one stat each (disk).
                            Worth a prefetch, never a promise: the read verifies.
  `open_read(key, expect)`  a context manager yielding a `ChunkReader` (header parsed and
                            checked against `expect`) or None on a miss; `reader.read_into(out)`
                            writes the payload into the caller's buffer and verifies it there (one
                            copy: the hierarchy passes a CPU-arena view).
  `check_put(key, dtype, meta)`  raises ValueError for a put the tier would refuse, before the
                            caller reserves anything.
  `put(key, tensor, meta, on_done)`  queue a background write and return at once; `on_done(ok)` is
                            called exactly once when the writer is done with `tensor` (also when
                            the write failed), and never when `put` returns False or raises.
  `EncodedReader` (optional)  a reader that can hand an encoded chunk over as is:
                            `encoding` and `read_encoded_into(buf)` (the verified parts, no
                            decode), for a CPU tier that holds chunks encoded (a CUDA engine
                            dequantizes them on the device).
  `EncodedWriter` (optional)  `put_encoded(key, buf, encoding, meta, on_done)`: a chunk already
                            encoded, written as it is (no re-encode).
  `describe()`               its bound and place for the start-up line (no secret in it).
  `flush(timeout)`, `close()`, `stats` (a property), `track_changes()`/`take_changes()` (KV events).

Invariants:
  * A tier never raises on a damaged, foreign, truncated or hostile chunk: that is a miss,
    counted in its stats. Only caller errors (a bad key or meta) raise.
  * `read_into` returns False (nothing usable in `out`) rather than leaving a half-verified
    chunk; the caller must not use `out` then.
  * The tier keeps a reference to a queued tensor until `on_done`: the caller must not reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Literal, Protocol, runtime_checkable

import torch

from lmcache_triton.chunk.codec import CodecPolicy, Encoding

# vLLM's KV-event vocabulary for where a block lives (vllm.distributed.kv_events: medium strings
# as its offloading tiers spell them).
Medium = Literal["CPU", "STORAGE"]
Locality = Literal["LOCAL", "REMOTE"]

OnDone = Callable[[bool], object]


@runtime_checkable
class ChunkReader(Protocol):
    """One chunk opened for reading: header verified, payload not read yet."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict[str, str]  # the writer's meta, without the format's reserved fields

    def read_into(self, out: torch.Tensor) -> bool:
        """Read the payload into `out` (contiguous, `shape`/`dtype` as above) and verify it.

        Returns:
            True when `out` holds the verified chunk; False on a damaged or vanished chunk
            (the tier counts it, and removes it where it owns it).
        """
        ...


@runtime_checkable
class EncodedReader(Protocol):
    """A `ChunkReader` that can also hand over an encoded chunk without decoding it. Optional:
    a tier's reader without it is always read decoded (`read_into`)."""

    encoding: Encoding | None  # None: the chunk is exact rows

    def read_encoded_into(self, buf: torch.Tensor) -> bool:
        """Read the payload (the codec's parts, packed) into `buf` (`[encoding.nbytes]` uint8,
        contiguous, CPU) and verify it there; same return as `read_into`. Only when `encoding`
        is set."""
        ...


@runtime_checkable
class EncodedWriter(Protocol):
    """A slow tier that writes a chunk already encoded as it is (a CPU tier holding chunks
    quantized on the GPU: `cpu_codec`). Optional: the hierarchy writes no encoded chunk to a tier
    without it (a lossy chunk is never decoded and stored as exact)."""

    def put_encoded(
        self, key: str, buf: torch.Tensor, encoding: Encoding, meta: Mapping[str, str], on_done: OnDone | None = None
    ) -> bool:
        """`put` of an encoded chunk (`buf`: `[encoding.nbytes]` uint8, its parts): the same
        file or value as `put` of its decoded rows would write with that codec. Only where the
        tier writes `key` with `encoding.codec`; otherwise False and `on_done(False)`."""
        ...


@runtime_checkable
class SlowTier(Protocol):
    """A tier below the CPU arena: written in the background, read by the prefetcher."""

    name: str  # config/metrics/CLI name: "disk", "remote", ...
    medium: Medium
    locality: Locality

    def contains_many(self, keys: Sequence[str]) -> list[bool]: ...

    def open_read(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> AbstractContextManager[ChunkReader | None]: ...

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None: ...

    def put(self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], on_done: OnDone | None = None) -> bool: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...

    @property
    def stats(self) -> dict[str, int]: ...

    def describe(self) -> str:
        """Its bound and place for the start-up line, e.g. "100.0 GB at /var/cache/kv" or a
        masked URL; never a secret."""
        ...

    def track_changes(self) -> None: ...

    def take_changes(self) -> list[tuple[str, str]]: ...


@runtime_checkable
class EncodingTier(Protocol):
    """A slow tier that encodes chunks (`chunk.codec`): `codecs` says which codec it writes each
    key with, and which it serves (exact always, a lossy codec only where it writes that key with
    it: `CodecPolicy.readable`). Optional: a tier without it stores exact."""

    name: str
    codecs: CodecPolicy
