"""Transitional: `SlowTier` over today's `RemoteTier` (`fetch` + copy), until storage/remote
implements the protocol itself (the remote helper's part of issue 17). Delete at that merge:
`builder._as_slow_tier` then returns the tier unwrapped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from lmcache_triton.chunk.format import RESERVED_META

from .remote import RemoteTier, copy_payload
from .tier import ChunkReader, Locality, Medium, OnDone


class _Fetched:
    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], meta: dict[str, str], payload: memoryview) -> None:
        self.dtype, self.shape, self._payload = dtype, shape, payload
        self.meta = {k: v for k, v in meta.items() if k not in RESERVED_META}

    def read_into(self, out: torch.Tensor) -> bool:
        copy_payload(self._payload, out)  # verified by `fetch` already
        return True


class RemoteSeam:
    name = "remote"
    medium: Medium = "STORAGE"
    locality: Locality = "REMOTE"

    def __init__(self, tier: RemoteTier) -> None:
        self.inner = tier

    def __repr__(self) -> str:
        return repr(self.inner)

    def __getattr__(self, attr: str) -> object:  # everything else: the tier's own
        return getattr(self.inner, attr)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return self.inner.contains_many(list(keys))

    @contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        got = self.inner.fetch(key, dict(expect or {}))
        yield None if got is None else _Fetched(*got)

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None:
        self.inner.check_put(key, dtype, None if meta is None else dict(meta))

    def put(self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], on_done: OnDone | None = None) -> bool:
        return self.inner.put(key, tensor, dict(meta), on_done)  # type: ignore[arg-type]

    def flush(self, timeout: float | None = None) -> bool:
        return self.inner.flush(timeout)

    def close(self) -> None:
        self.inner.close()

    @property
    def stats(self) -> dict[str, int]:
        return self.inner.stats

    def track_changes(self) -> None:
        self.inner.track_changes()

    def take_changes(self) -> list[tuple[str, str]]:
        return self.inner.take_changes()
