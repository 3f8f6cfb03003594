"""Caches whose layers are separate tensors at unrelated addresses (vLLM 0.34's extensible KV
cache, on by default on CUDA/ROCm, layer-outermost layouts): geometry, copies, engine round trip.

Before the per-layer table, `geometry_from_layer_views` raised "not in the same storage" on such
views, and the worker failed at `register_kv_caches`. Every copy here is compared bit for bit
against the same copy on a one-buffer cache holding the same bytes (the fast path, itself
tested against oracles in tests/test_paged_copy.py), with destinations poisoned first. Runs in
the normal suite: the kernels through Triton's interpreter (conftest sets TRITON_INTERPRET=1 on
CPU) in one launch through the per-layer offset table, and the torch twins one layer at a time.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_triton.engine import KVCacheEngine
from lmcache_triton.kernels import paged_copy
from lmcache_triton.kernels.geometry import LayerTable, allocate_paged_cache, geometry_from_layer_views
from lmcache_triton.kernels.paged_copy import chunk_to_paged, paged_to_chunk, paged_to_tokens, tokens_to_paged
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.hierarchy import StorageHierarchy

# (physical order of one layer's [B, H, N, C], i.e. vLLM's LBHNC / LBNHC per layer)
LAYER_LAYOUTS = ["LBHNC", "LBNHC"]
DTYPES = [torch.bfloat16, torch.float8_e4m3fn]
HEAD_SIZES = [80]  # row C = 2 * head size (odd: not a power of two)
BLOCK_SIZES = [16, 5]
LAYERS, BLOCKS, HEADS = 3, 9, 2


def _random_bits(shape, dtype, gen) -> torch.Tensor:
    """Random bytes of `dtype` (NaN payloads included: copies must be bit-exact)."""
    width = torch.empty((), dtype=dtype).element_size()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32}[width]
    lo, hi = torch.iinfo(ints).min, torch.iinfo(ints).max
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(ints).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _caches(layout, block_size, head, dtype, seed=0):
    """The same bytes twice: a one-buffer cache (`[L, B, H, N, C]` view) and per-layer tensors,
    each in its own allocation with some elements before it (a storage offset) and after it."""
    gen = torch.Generator().manual_seed(seed)
    row = 2 * head
    one = allocate_paged_cache(layout, LAYERS, BLOCKS, HEADS, block_size, row, dtype)
    one.copy_(_random_bits(one.shape, dtype, gen))
    per_layer = []
    for layer in range(LAYERS):
        alone = allocate_paged_cache(layout, 1, BLOCKS, HEADS, block_size, row, dtype)[0]
        raw = torch.empty(alone.numel() + 96, dtype=dtype)
        view = raw[64:].as_strided(alone.shape, alone.stride())
        view.copy_(one[layer])
        per_layer.append(view)
    return one, per_layer


def _cases():
    for layout in LAYER_LAYOUTS:
        for dtype in DTYPES:
            for head in HEAD_SIZES:
                for n in BLOCK_SIZES:
                    yield pytest.param(layout, dtype, head, n, id=f"{layout}-{str(dtype)[6:]}-d{head}-N{n}")


CASES = list(_cases())


def test_separate_storages_make_a_layer_table():
    _, views = _caches("LBHNC", 16, 64, torch.bfloat16)
    flat, geom = geometry_from_layer_views(views)
    assert isinstance(flat, LayerTable) and geom.per_layer and len(flat) == LAYERS
    assert (geom.num_layers, geom.num_blocks, geom.num_heads, geom.block_size, geom.row_size) == (
        LAYERS,
        BLOCKS,
        HEADS,
        16,
        128,
    )
    for layer, view in enumerate(views):
        assert flat.layers[layer].data_ptr() == view.data_ptr(), layer
        delta = int(flat.element_offsets()[layer])
        assert view.data_ptr() - views[0].data_ptr() == delta * view.element_size(), layer
    assert flat.dtype == torch.bfloat16 and not flat.is_cuda and flat.element_size() == 2
    # Layer-outermost, as 0.34 lays them out; the same fingerprint as the one-buffer LBHNC cache.
    one = geometry_from_layer_views(list(allocate_paged_cache("LBHNC", LAYERS, 5, HEADS, 16, 128, torch.bfloat16)))
    assert geom.fingerprint() == one[1].fingerprint()
    with pytest.raises(ValueError, match="per-layer cache"):
        geom.view5d(flat.layers[0])


@pytest.fixture(params=["kernel", "twin"])
def path(request, monkeypatch):
    """`kernel`: one launch through the offset table (Triton's interpreter on CPU, which reaches
    across allocations as a GPU does); `twin`: the torch twins, one layer at a time (the CPU
    production path)."""
    if request.param == "twin":
        monkeypatch.setattr(paged_copy, "_INTERPRET", False)
    elif not paged_copy._INTERPRET:
        pytest.skip("the kernel path needs TRITON_INTERPRET=1 on CPU (conftest sets it)")
    return request.param


@pytest.mark.parametrize("layout, dtype, head, n", CASES)
def test_token_rows_per_layer_match_one_buffer(layout, dtype, head, n, path):
    one, views = _caches(layout, n, head, dtype)
    flat1, g1 = geometry_from_layer_views(list(one))
    flatl, gl = geometry_from_layer_views(views)
    # 2 * n + 3 tokens straddling blocks, out of order, with padding.
    slots = torch.tensor([*range(3 * n, 5 * n + 1), -1, *range(n - 2, -1, -1), -1], dtype=torch.int64)
    shape = (2, LAYERS, slots.numel(), HEADS, head)
    want = torch.full(shape, float("nan")).to(dtype)
    got = torch.full(shape, float("nan")).to(dtype)
    paged_to_tokens(flat1, g1, slots, want)
    paged_to_tokens(flatl, gl, slots, got)
    assert torch.equal(_bits(got), _bits(want))

    # Scatter new rows into both; the whole caches must stay equal (no stray or missed write).
    src = _random_bits(shape, dtype, torch.Generator().manual_seed(7))
    tokens_to_paged(src, flat1, g1, slots)
    tokens_to_paged(src, flatl, gl, slots)
    for layer, view in enumerate(views):
        assert torch.equal(_bits(view), _bits(one[layer])), f"layer {layer}"


@pytest.mark.parametrize("layout, dtype, head, n", CASES[::2])
def test_pages_per_layer_match_one_buffer(layout, dtype, head, n, path):
    one, views = _caches(layout, n, head, dtype)
    flat1, g1 = geometry_from_layer_views(list(one))
    flatl, gl = geometry_from_layer_views(views)
    ids = torch.tensor([7, 0, 3], dtype=torch.int64)
    want = torch.full(g1.chunk_shape(3), float("nan")).to(dtype)
    got = torch.full(gl.chunk_shape(3), float("nan")).to(dtype)
    paged_to_chunk(flat1, g1, ids, want)
    paged_to_chunk(flatl, gl, ids, got)
    assert torch.equal(_bits(got), _bits(want))
    chunk = _random_bits(g1.chunk_shape(3), dtype, torch.Generator().manual_seed(3))
    chunk_to_paged(chunk, flat1, g1, ids)
    chunk_to_paged(chunk, flatl, gl, ids)
    for layer, view in enumerate(views):
        assert torch.equal(_bits(view), _bits(one[layer])), f"layer {layer}"


def test_layer_table_checks():
    _, views = _caches("LBHNC", 16, 64, torch.bfloat16)
    flat, geom = geometry_from_layer_views(views)
    out = torch.empty((2, LAYERS, 4, HEADS, 64), dtype=torch.bfloat16)
    slots = torch.arange(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="per_layer"):
        paged_to_tokens(flat.layers[0], geom, slots, out)  # a per-layer geometry needs its table
    with pytest.raises(ValueError, match="layers\\[1\\]"):
        LayerTable([flat.layers[0], flat.layers[1].view(torch.float16)])
    with pytest.raises(ValueError, match="views\\[1\\]: shape"):
        geometry_from_layer_views([views[0], views[1][:4]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_engine_round_trip_on_per_layer_tensors(dtype):
    """The worker's engine adopts per-layer tensors as handed over by 0.34's `extend_kv_cache`,
    stores a chunk of 2.5 blocks and loads it into other blocks bit for bit."""
    block = 16
    one, views = _caches("LBHNC", block, 64, dtype)
    eng = KVCacheEngine(StorageHierarchy(CpuTier(1 << 24), []), "0d" * 16, {"model": "m", "layout": "L"})
    eng.register(views, block)
    try:
        assert eng.store("ab" * 16, [5, 2, 8], 40)
        eng.synchronize()
        before = [v.clone() for v in views]
        assert eng.load("ab" * 16, [1, 6, 4])
        eng.synchronize()
        src_slots = [5 * block + t for t in range(block)] + [2 * block + t for t in range(block)]
        src_slots += [8 * block + t for t in range(8)]
        dst_slots = [1 * block + t for t in range(block)] + [6 * block + t for t in range(block)]
        dst_slots += [4 * block + t for t in range(8)]
        for layer, view in enumerate(views):
            expect = before[layer].clone()
            rows_src = expect.permute(0, 2, 1, 3).reshape(BLOCKS * block, HEADS, -1)[src_slots]
            flat_dst = expect.permute(0, 2, 1, 3).reshape(BLOCKS * block, HEADS, -1).clone()
            flat_dst[dst_slots] = rows_src
            expect = flat_dst.reshape(BLOCKS, block, HEADS, -1).permute(0, 2, 1, 3)
            assert torch.equal(_bits(view), _bits(expect.contiguous())), f"layer {layer}"
    finally:
        eng.close()
