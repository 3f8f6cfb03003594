"""The engine without vLLM: chunk planning, the scheduler's prefix index, store/load round trips.

The paged cache is built the way vLLM builds it (one buffer, per-layer 4-D views), so the engine
sees what the connector hands it; the tiers are real (CPU pool and a disk directory).
"""

from __future__ import annotations

import pytest
import torch

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.engine import ChunkPlanner, KVCacheEngine, PrefixIndex, chunk_key
from lmcache_triton.hashing import key_namespace
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.disk import DiskTier
from lmcache_triton.storage.manager import StorageManager

LAYOUTS = ["LBHNC", "LHBNC", "BLNHC"]


def _cache(layout="LBHNC", layers=3, blocks=12, heads=2, page=4, row=16, dtype=torch.float32, seed=0):
    c5 = allocate_paged_cache(layout, layers, blocks, heads, page, row, dtype)
    g = torch.Generator().manual_seed(seed)
    c5.copy_(torch.randn(c5.shape, generator=g).to(dtype))
    return c5, [c5[i] for i in range(layers)]


def _engine(tmp_path, views, block_size, cpu=True, disk=True, meta=None, cpu_bytes=1 << 24):
    """An engine over real tiers; `cpu=False` is `local_cpu: false` (the CPU tier only stages)."""
    tier = CpuTier(cpu_bytes) if (cpu or disk) else None
    storage = StorageManager(tier, DiskTier(tmp_path / "disk", 1 << 26) if disk else None, keep_in_cpu=cpu)
    eng = KVCacheEngine(storage, "0a" * 16, meta or {"model": "m", "layout": "L"})
    eng.register(views, block_size)
    return eng


def _prefetch(eng, *digests):
    eng.prefetch(list(digests))
    assert eng.synchronize(prefetch_timeout=30), "prefetch did not finish"
    return eng.poll()


def test_planner_rejects_chunk_not_multiple_of_block():
    with pytest.raises(ValueError, match="chunk_size \\(100\\) must be a multiple of vLLM's block size \\(32\\)"):
        ChunkPlanner(LMCacheConfig(chunk_size=100), 32)


def test_planner_spans_partial_and_blocks():
    planner = ChunkPlanner(LMCacheConfig(chunk_size=64, save_unfull_chunk=True), 32)
    spans = planner.spans(list(range(150)))
    assert [(s.start, s.end) for s in spans] == [(0, 64), (64, 128), (128, 150)]
    assert planner.blocks_of(spans[2], [7, 8, 9, 10, 11]) == [11]
    assert planner.blocks_of(spans[1], [7, 8, 9, 10, 11]) == [9, 10]
    with pytest.raises(ValueError, match="needs blocks"):
        planner.blocks_of(spans[2], [7, 8])
    no_partial = ChunkPlanner(LMCacheConfig(chunk_size=64, save_unfull_chunk=False), 32)
    assert len(no_partial.spans(list(range(150)))) == 2
    # Prefix chaining: a different first chunk changes every later digest.
    other = planner.spans([999] + list(range(1, 150)))
    assert all(a.digest != b.digest for a, b in zip(spans, other, strict=True))


def test_prefix_index_needs_every_rank(tmp_path):
    ns = [key_namespace("m", 2, r, "f32", 64, "x") for r in (0, 1)]
    assert ns[0] != ns[1]
    idx = PrefixIndex(ns, str(tmp_path))
    planner = ChunkPlanner(LMCacheConfig(chunk_size=64), 32)
    spans = planner.spans(list(range(200)))
    d = [s.digest for s in spans]
    idx.report(0, d[:3], [])
    assert idx.cached_prefix(spans) == 0, "rank 1 holds nothing: nothing is loadable"
    idx.report(1, d[:1], [])
    assert idx.cached_prefix(spans) == 1
    assert idx.cached_prefix(spans, satisfied_tokens=64) == 1
    # A file on disk is worth a prefetch, never a promise: it may be damaged.
    for r in (0, 1):
        (tmp_path / (chunk_key(ns[r], d[1]) + ".safetensors")).write_bytes(b"x")
    assert idx.cached_prefix(spans) == 1
    assert idx.on_disk(d[1]) and not idx.on_disk(d[2])
    idx.report(0, [], [], failed=[d[1]])  # the prefetch found it damaged: not asked again soon
    assert not idx.on_disk(d[1])
    idx.report(0, [], [d[0]])  # rank 0 retired chunk 0: the prefix is broken at 0
    assert idx.cached_prefix(spans) == 0
    # ... unless vLLM's own prefix cache already has those tokens.
    idx.report(0, [d[1]], [])
    idx.report(1, [d[1]], [])
    assert idx.cached_prefix(spans, satisfied_tokens=64) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiers", ["cpu", "disk"])
def test_store_then_load_is_bit_exact(tmp_path, layout, tiers):
    c5, views = _cache(layout)
    eng = _engine(tmp_path, views, block_size=4, cpu=tiers == "cpu", disk=tiers == "disk")
    assert eng.store("ab" * 16, [5, 2, 9], num_tokens=12)
    eng.storage.flush()
    if tiers == "disk":
        # local_cpu off: the chunk left memory once written; a load needs a prefetch first.
        assert eng.poll().held == [] and not eng.load("ab" * 16, [0, 1, 3])
        assert _prefetch(eng, "ab" * 16).held == ["ab" * 16]
    else:
        assert eng.poll().held == ["ab" * 16]
    before = c5.clone()
    c5[:, [0, 1, 3]] = float("nan")  # poison the destination blocks
    expected = before.clone()
    expected[:, [0, 1, 3]] = before[:, [5, 2, 9]]
    assert eng.load("ab" * 16, [0, 1, 3])
    assert torch.equal(c5.view(torch.int32), expected.view(torch.int32))
    assert eng.stats.loaded_from == {tiers: 1}


def test_lookup_counts_the_cached_prefix(tmp_path):
    c5, views = _cache(page=4, blocks=40)
    eng = _engine(tmp_path, views, block_size=4)
    planner = ChunkPlanner(LMCacheConfig(chunk_size=8, save_unfull_chunk=True), 4)
    tokens = list(range(30))
    spans = planner.spans(tokens)
    assert eng.lookup(planner, tokens) == 0
    eng.store(spans[0].digest, [0, 1], 8)
    eng.store(spans[2].digest, [4, 5], 8)  # a gap at chunk 1: only chunk 0 counts
    assert eng.lookup(planner, tokens) == 8
    eng.store(spans[1].digest, [2, 3], 8)
    assert eng.lookup(planner, tokens) == 24
    eng.store(spans[3].digest, [6], 6)  # the partial tail
    assert eng.lookup(planner, tokens) == 30
    assert eng.lookup(planner, tokens, extra=("lora:x",)) == 0, "extra keys change every digest"


def test_load_skips_leading_blocks_and_maps_manager_blocks(tmp_path):
    c5, views = _cache(page=4)
    eng = _engine(tmp_path, views, block_size=8)  # a manager block = 2 kernel pages
    assert eng.store("cd" * 16, [1, 3], num_tokens=16)  # pages 2,3,6,7
    before = c5.clone()
    assert eng.load("cd" * 16, [4, 5], skip_blocks=1)  # only manager block 5 -> pages 10,11
    expected = before.clone()
    expected[:, [10, 11]] = before[:, [6, 7]]
    assert torch.equal(c5, expected), "skipped block 4 (pages 8,9) must stay untouched"


def test_missing_or_mismatched_chunk_is_a_clean_miss(tmp_path):
    c5, views = _cache()
    eng = _engine(tmp_path, views, block_size=4)
    before = c5.clone()
    assert not eng.load("ee" * 16, [0, 1])
    eng.store("ff" * 16, [0, 1, 2], num_tokens=12)
    assert not eng.load("ff" * 16, [3, 4]), "a 3-block chunk must not load into 2 blocks"
    assert torch.equal(c5, before)
    assert eng.stats.load_errors == 2


def test_foreign_layout_on_disk_is_never_loaded(tmp_path):
    c5, views = _cache()
    writer = _engine(tmp_path, views, block_size=4, cpu=False, meta={"model": "m", "layout": "A"})
    writer.store("aa" * 16, [0], num_tokens=4)
    writer.storage.flush()
    reader = _engine(tmp_path, views, block_size=4, cpu=False, meta={"model": "m", "layout": "B"})
    before = c5.clone()
    assert _prefetch(reader, "aa" * 16).failed == ["aa" * 16]
    assert not reader.load("aa" * 16, [5])
    assert torch.equal(c5, before)


def test_damaged_file_is_never_held(tmp_path):
    c5, views = _cache()
    writer = _engine(tmp_path, views, block_size=4, cpu=False)
    writer.store("ab" * 16, [0, 1], num_tokens=8)
    writer.storage.flush()
    (path,) = (tmp_path / "disk").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one payload byte
    path.write_bytes(bytes(data))
    reader = _engine(tmp_path, views, block_size=4, cpu=False)
    progress = _prefetch(reader, "ab" * 16)
    assert progress.held == [] and progress.failed == ["ab" * 16]
    assert not reader.holds("ab" * 16)
    assert not path.exists(), "a damaged file is removed"


def test_held_chunks_survive_pressure_until_the_retirement_is_acknowledged(tmp_path):
    c5, views = _cache(blocks=12)
    nbytes = 3 * 2 * 4 * 16 * 4  # layers * heads * page * row * fp32, one block
    eng = _engine(tmp_path, views, block_size=4, disk=False, cpu_bytes=4 * nbytes)
    for i in range(4):
        assert eng.store(f"{i:02x}" * 16, [i], num_tokens=4)
    assert len(eng.poll().held) == 4
    # Full of held chunks: a new store is refused (a future miss), never an eviction of a
    # chunk the scheduler may have promised.
    assert not eng.store("ee" * 16, [5], num_tokens=4)
    assert eng.stats.store_errors == 1
    retiring = eng.retire()
    assert retiring and retiring[0] == "00" * 16, "least recently used first"
    assert eng.load(retiring[0], [6]), "a retiring chunk stays loadable until acknowledged"
    eng.ack_retired(retiring)
    assert not eng.holds(retiring[0]) and not eng.load(retiring[0], [6])
    assert eng.store("ee" * 16, [5], num_tokens=4)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_cuda_store_load_async_round_trip(layout):
    """On CUDA: stores and loads run on the engine's own stream, ordered against the compute
    stream by events: the sources are overwritten right after the stores, yet what loads back is
    the stored bytes, bit-exact; skipped blocks stay untouched."""
    c5 = allocate_paged_cache(layout, 4, 64, 2, 16, 80, torch.bfloat16, device="cuda")
    c5.view(torch.int16).random_(-32768, 32767)
    orig = c5.clone()
    views = [c5[i] for i in range(4)]
    storage = StorageManager(CpuTier(64 << 20, pin_memory=True), None)
    eng = KVCacheEngine(storage, "0b" * 16, {"model": "m"})
    eng.register(views, block_size=32)  # a manager block = 2 kernel pages
    digests = [f"{i:02x}" * 16 for i in range(6)]
    for i, d in enumerate(digests):
        assert eng.store(d, [2 * i, 2 * i + 1], 64)  # pages 4i .. 4i+3
    c5[:, :24] = 0  # queued on the compute stream right after the stores
    eng.synchronize()
    assert sorted(eng.poll().held) == digests
    before = c5.clone()
    for i, d in enumerate(digests):
        assert eng.load(d, [16 + 2 * i, 17 + 2 * i], skip_blocks=1 if i == 5 else 0)
    eng.synchronize()
    expected = before.clone()
    for i in range(5):
        expected[:, 32 + 4 * i : 36 + 4 * i] = orig[:, 4 * i : 4 * i + 4]
    expected[:, 54:56] = orig[:, 22:24]  # chunk 5 skipped its first manager block (pages 52, 53)
    assert torch.equal(c5.view(torch.int16), expected.view(torch.int16))
    assert storage.cpu.stats["held"] == len(digests), "only the protocol holds remain"
