"""Paged KV copies: Triton kernels (interpreter on CPU, native on GPU) against the torch twins and an
independent per-block/per-slot oracle, on every vLLM layout.

Destinations are poisoned (all bytes 0xFF: NaN in every float type here) and compared WHOLE,
bit for bit, so stray and missed writes both show.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE

from lmcache_triton.kernels import paged_copy
from lmcache_triton.kernels.geometry import (
    LAYOUTS,
    PagedKVGeometry,
    allocate_paged_cache,
    geometry_for_tensor,
    geometry_from_layer_views,
)
from lmcache_triton.kernels.paged_copy import chunk_to_paged, paged_to_chunk, paged_to_tokens, tokens_to_paged
from lmcache_triton.kernels.reference import (
    chunk_to_paged_ref,
    paged_to_chunk_ref,
    paged_to_tokens_ref,
    tokens_to_paged_ref,
)


@dataclass(frozen=True)
class Case:
    layout: str
    L: int
    B: int
    H: int
    N: int
    C: int
    dtype: torch.dtype

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.layout}-L{self.L}-B{self.B}-H{self.H}-N{self.N}-C{self.C}-{dt}"


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
BLOCK_SIZES = [1, 16, 128]
HEAD_SIZE_ODD = 80  # C = 160

# Interpreter-sized shapes: every layout x dtype with head size 80, block sizes 1/16/128, 1 and 40
# layers (tiny other dims), MLA-like (H = 1, C = a latent row).
CPU_CASES = (
    [Case(lay, 2, 6, 2, 4, 2 * HEAD_SIZE_ODD, dt) for lay in LAYOUTS for dt in DTYPES]
    + [Case("LBHNC", 2, 5, 2, n, 16, torch.bfloat16) for n in BLOCK_SIZES]
    + [Case("LHBNC", 2, 5, 2, n, 16, torch.bfloat16) for n in BLOCK_SIZES]
    + [Case(lay, 1, 4, 2, 4, 8, torch.float16) for lay in ("LBHNC", "BHLNC")]
    + [Case(lay, 40, 3, 1, 2, 4, torch.bfloat16) for lay in ("LBHNC", "BLNHC")]
)
# Native-GPU shapes (skipped here with a reason by conftest): Llama-8B-like and MLA-sized.
GPU_CASES = [Case(lay, 32, 64, 8, 16, 256, torch.bfloat16) for lay in LAYOUTS] + [
    Case("LBHNC", 40, 64, 8, 16, 2 * HEAD_SIZE_ODD, torch.float8_e4m3fn),
    Case("BLHNC", 61, 32, 1, 64, 576, torch.bfloat16),
]
MLA_CASES = [Case(lay, 3, 5, 1, 16, 72, torch.bfloat16) for lay in ("LBHNC", "BLHNC")]


def _params(cpu: list[Case], gpu: list[Case]) -> list:
    return [pytest.param(c, id=str(c)) for c in cpu] + [
        pytest.param(c, id=f"gpu-{c}", marks=pytest.mark.gpu) for c in gpu
    ]


PAGE_CASES = _params(CPU_CASES + MLA_CASES, GPU_CASES)
TOKEN_CASES = _params([c for c in CPU_CASES if c.B * c.N >= 8], GPU_CASES)
MLA_TOKEN_CASES = _params(MLA_CASES, [Case("BLHNC", 61, 32, 1, 64, 576, torch.bfloat16)])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.int8)
        if t.element_size() == 1
        else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
    )


def _random_cache(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, PagedKVGeometry]:
    """A cache in `case.layout` filled with random bytes (NaNs included: copies must keep bits)."""
    cache5d = allocate_paged_cache(case.layout, case.L, case.B, case.H, case.N, case.C, case.dtype, DEVICE)
    flat, geom = geometry_for_tensor(cache5d)
    g = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.randint(-128, 128, (flat.numel() * flat.element_size(),), dtype=torch.int8, generator=g)
    flat.view(torch.int8).copy_(raw.to(DEVICE))
    return cache5d, flat, geom


def _poisoned_like_cache(case: Case) -> tuple[torch.Tensor, torch.Tensor, PagedKVGeometry]:
    cache5d = allocate_paged_cache(case.layout, case.L, case.B, case.H, case.N, case.C, case.dtype, DEVICE)
    flat, geom = geometry_for_tensor(cache5d)
    flat.view(torch.int8).fill_(-1)
    return cache5d, flat, geom


def _poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    t.view(torch.int8).fill_(-1)  # 0xFF bytes: NaN in bf16/fp16/fp32/fp8
    return t


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = _bits(actual), _bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {a.numel()} elements differ, first at {bad[:4].tolist()}"
        )


def _block_ids(case: Case) -> torch.Tensor:
    """Non-contiguous order with a repeat (gathers allow repeats)."""
    ids = [case.B - 1, 0, case.B // 2, 0] if case.B > 2 else [1, 0, 1]
    return torch.tensor(ids, dtype=torch.int64, device=DEVICE)


def _distinct_block_ids(case: Case) -> torch.Tensor:
    ids = [case.B - 1, 0, case.B // 2] if case.B > 2 else [1, 0]
    return torch.tensor(ids, dtype=torch.int64, device=DEVICE)


def _slots(case: Case, num_tokens: int | None = None, pad_every: int = 5) -> torch.Tensor:
    """A chunk of consecutive positions that starts mid-block and straddles blocks, mapped through
    a reversed block table (non-contiguous physical blocks), with some padding slots (-1)."""
    N, B = case.N, case.B
    total = B * N
    num_tokens = min(63, total - 1) if num_tokens is None else num_tokens
    start = min(N // 2 + 1, total - num_tokens) if N > 1 else 0
    positions = torch.arange(start, start + num_tokens)
    table = torch.arange(B - 1, -1, -1)
    slots = table[positions // N] * N + positions % N
    slots[::pad_every] = -1
    return slots.to(torch.int64).to(DEVICE)


def test_kernels_run_through_triton_here():
    """On CPU the suite must exercise the interpreter, not silently the twin."""
    if DEVICE == "cpu":
        assert paged_copy._INTERPRET, "conftest sets TRITON_INTERPRET=1 before the kernels import"


# ---------------------------------------------------------------------------
# Page copies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", PAGE_CASES)
def test_paged_to_chunk_matches_twin_and_oracle(case: Case):
    cache5d, flat, geom = _random_cache(case)
    ids = _block_ids(case)
    out = _poisoned(geom.chunk_shape(ids.numel()), case.dtype)
    ref = _poisoned(geom.chunk_shape(ids.numel()), case.dtype)
    paged_to_chunk(flat, geom, ids, out)
    paged_to_chunk_ref(flat, geom, ids, ref)
    _assert_same_bits(out, ref, "chunk vs twin")
    oracle = torch.stack([cache5d[:, b] for b in ids.tolist()], dim=1)
    _assert_same_bits(out, oracle, "chunk vs per-block oracle")


@pytest.mark.parametrize("case", PAGE_CASES)
def test_chunk_to_paged_restores_only_chosen_blocks(case: Case):
    src5d, src_flat, geom = _random_cache(case, seed=1)
    ids = _distinct_block_ids(case)
    chunk = _poisoned(geom.chunk_shape(ids.numel()), case.dtype)
    paged_to_chunk(src_flat, geom, ids, chunk)

    dst5d, dst_flat, dst_geom = _poisoned_like_cache(case)
    ref5d, ref_flat, _ = _poisoned_like_cache(case)
    chunk_to_paged(chunk, dst_flat, dst_geom, ids)
    chunk_to_paged_ref(chunk, ref_flat, dst_geom, ids)
    _assert_same_bits(dst_flat, ref_flat, "cache vs twin")

    expected = torch.empty_like(ref_flat)
    expected.view(torch.int8).fill_(-1)
    exp5d = dst_geom.view5d(expected)
    for b in ids.tolist():
        exp5d[:, b].copy_(src5d[:, b])
    _assert_same_bits(dst_flat, expected, "cache vs chosen blocks on poison")


@pytest.mark.parametrize("case", PAGE_CASES[:3])
def test_chunk_to_paged_repeated_ids_of_equal_data(case: Case):
    """Repeated destination ids are well defined when the repeats carry the same bytes."""
    _, src_flat, geom = _random_cache(case, seed=2)
    ids = _block_ids(case)
    chunk = _poisoned(geom.chunk_shape(ids.numel()), case.dtype)
    paged_to_chunk(src_flat, geom, ids, chunk)
    _, dst_flat, _ = _poisoned_like_cache(case)
    _, ref_flat, _ = _poisoned_like_cache(case)
    chunk_to_paged(chunk, dst_flat, geom, ids)
    chunk_to_paged_ref(chunk, ref_flat, geom, ids)
    _assert_same_bits(dst_flat, ref_flat, "cache vs twin")


# ---------------------------------------------------------------------------
# Token copies
# ---------------------------------------------------------------------------


def _token_oracle(cache5d: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    expected = out.clone()
    S, N = out.shape[0], cache5d.shape[3]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            row = cache5d[:, s // N, :, s % N, :]  # [L, H, C]
            expected[:, :, t] = torch.stack(row.chunk(S, dim=-1), dim=0)
    return expected


def _check_token_roundtrip(case: Case, kv_split: int):
    src5d, src_flat, geom = _random_cache(case, seed=3)
    slots = _slots(case)
    shape = (kv_split, case.L, slots.numel(), case.H, case.C // kv_split)

    out, ref = _poisoned(shape, case.dtype), _poisoned(shape, case.dtype)
    paged_to_tokens(src_flat, geom, slots, out)
    paged_to_tokens_ref(src_flat, geom, slots, ref)
    _assert_same_bits(out, ref, "tokens vs twin")
    _assert_same_bits(out, _token_oracle(src5d, slots, _poisoned(shape, case.dtype)), "tokens vs oracle")

    _, dst_flat, dst_geom = _poisoned_like_cache(case)
    _, ref_flat, _ = _poisoned_like_cache(case)
    tokens_to_paged(out, dst_flat, dst_geom, slots)
    tokens_to_paged_ref(out, ref_flat, dst_geom, slots)
    _assert_same_bits(dst_flat, ref_flat, "cache vs twin")

    expected = torch.empty_like(ref_flat)
    expected.view(torch.int8).fill_(-1)
    exp5d = dst_geom.view5d(expected)
    for s in slots.tolist():
        if s >= 0:
            exp5d[:, s // case.N, :, s % case.N].copy_(src5d[:, s // case.N, :, s % case.N])
    _assert_same_bits(dst_flat, expected, "cache vs chosen slots on poison")


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_gather_scatter_kv(case: Case):
    _check_token_roundtrip(case, kv_split=2)


@pytest.mark.parametrize("case", MLA_TOKEN_CASES)
def test_token_gather_scatter_mla(case: Case):
    _check_token_roundtrip(case, kv_split=1)


def test_tokens_all_padding_and_empty_touch_nothing():
    case = Case("LBHNC", 2, 3, 2, 4, 8, torch.bfloat16)
    _, flat, geom = _random_cache(case)
    before = flat.clone()
    slots = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    out = _poisoned((2, 2, 5, 2, 4), case.dtype)
    paged_to_tokens(flat, geom, slots, out)
    assert (out.view(torch.int8) == -1).all()
    tokens_to_paged(out, flat, geom, slots)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    tokens_to_paged(_poisoned((2, 2, 0, 2, 4), case.dtype), flat, geom, empty)
    chunk_to_paged(_poisoned(geom.chunk_shape(0), case.dtype), flat, geom, empty)
    _assert_same_bits(flat, before, "cache")


# ---------------------------------------------------------------------------
# Geometry from vLLM-style per-layer views
# ---------------------------------------------------------------------------


def _vllm_style_views(
    layout: str,
    L: int,
    B: int,
    H: int,
    N: int,
    head_bytes: int,
    dtype: torch.dtype,
    pad: int = 0,
    offset: int = 0,
) -> list[torch.Tensor]:
    """Per-layer views made as vLLM's create_kv_cache_views makes them: byte strides over one int8
    buffer (pages optionally padded, tensor at a byte offset), as_strided, then `.view(dtype)`."""
    order = LAYOUTS[layout]
    shape = (L, B, H, N, head_bytes)
    strides = [0] * 5
    cur = 1
    for pos, dim in reversed(list(enumerate(order))):
        if pad and pos == max(order.index(0), order.index(1)):
            cur += pad  # padded page: the innermost L/B axis steps over extra bytes
        strides[dim] = cur
        cur = strides[dim] * shape[dim]
    raw = torch.zeros(offset + cur, dtype=torch.int8, device=DEVICE)
    view5d = torch.as_strided(raw, shape, strides, storage_offset=offset)
    return [view5d[i].view(dtype) for i in range(L)]


VIEW_LAYOUTS = list(LAYOUTS)


@pytest.mark.parametrize("layout", VIEW_LAYOUTS)
def test_geometry_from_vllm_style_views(layout: str):
    views = _vllm_style_views(layout, 3, 4, 2, 4, 32, torch.bfloat16, pad=64, offset=128)
    flat, geom = geometry_from_layer_views(views)
    assert flat.dtype == torch.bfloat16 and flat.dim() == 1
    view5d = geom.view5d(flat)
    for i, v in enumerate(views):
        assert view5d[i].data_ptr() == v.data_ptr() and view5d[i].stride() == v.stride(), i
    # Writes through the geometry land in the layer views.
    ids = torch.tensor([3, 1], device=DEVICE)
    chunk = torch.randn(geom.chunk_shape(2), device=DEVICE).to(torch.bfloat16)
    chunk_to_paged(chunk, flat, geom, ids)
    for i, v in enumerate(views):
        _assert_same_bits(v[3], chunk[i, 0], f"layer {i} block 3")


def test_geometry_single_layer_and_fingerprint():
    flat, geom = geometry_from_layer_views(_vllm_style_views("LBHNC", 1, 4, 2, 4, 32, torch.float16))
    assert geom.num_layers == 1 and geom.stride_l == 0
    a = geometry_for_tensor(allocate_paged_cache("BLHNC", 2, 7, 2, 4, 16, torch.bfloat16))[1]
    b = geometry_for_tensor(allocate_paged_cache("BLHNC", 2, 9, 2, 4, 16, torch.bfloat16))[1]
    c = geometry_for_tensor(allocate_paged_cache("LBHNC", 2, 7, 2, 4, 16, torch.bfloat16))[1]
    assert a.fingerprint() == b.fingerprint() == "BLHNC:H2:N4:C16:bfloat16:page128B"
    assert a.fingerprint() != c.fingerprint()


def _bad_views() -> list:
    good = _vllm_style_views("LBHNC", 3, 4, 2, 4, 16, torch.bfloat16)
    other = _vllm_style_views("LBHNC", 1, 4, 2, 4, 16, torch.bfloat16)
    base = torch.zeros(4 * 2 * 4 * 16 * 8, dtype=torch.bfloat16, device=DEVICE)
    v4 = base.view(8, 4, 2, 4, 16)
    return [
        pytest.param([], "at least one", id="empty"),
        # Layers in separate storages are a per-layer cache (vLLM 0.34): tests/compat/test_per_layer_cache.py.
        pytest.param([good[0], good[1].view(torch.float16)], r"views\[1\]: dtype", id="dtype"),
        pytest.param([good[0], good[1][:2]], r"views\[1\]: shape", id="shape"),
        pytest.param(
            [v4[0], v4[1], v4[3]], r"views\[2\]: starts .* uniform layer stride", id="uneven-layers"
        ),
        pytest.param([v4[1], v4[0]], r"views\[1\]: starts .* positive", id="reversed-layers"),
        pytest.param(
            [v4[0].transpose(2, 3), v4[1].transpose(2, 3)], r"views\[0\]: innermost", id="c-strided"
        ),
        pytest.param([good[0][:, :, :, ::2], good[1][:, :, :, ::2]], r"views\[0\]: innermost", id="c-step2"),
        pytest.param([good[0][:, :1].expand(4, 2, 4, 8)], r"views\[0\]: axis H", id="aliased"),
        pytest.param([good[0], good[1], other[0]], r"views\[1\]: shares views\[0\]'s storage", id="mixed"),
        pytest.param([good[0], good[1].permute(0, 2, 1, 3)], r"views\[1\]: shape", id="permuted"),
    ]


@pytest.mark.parametrize("views, message", _bad_views())
def test_geometry_rejects_bad_views(views, message):
    with pytest.raises(ValueError, match=message):
        geometry_from_layer_views(views)


# ---------------------------------------------------------------------------
# Launcher validation: in-place destinations are checked, never coerced
# ---------------------------------------------------------------------------


def test_launchers_reject_bad_destinations():
    case = Case("LBHNC", 2, 4, 2, 4, 8, torch.bfloat16)
    _, flat, geom = _random_cache(case)
    ids = torch.tensor([1, 2], device=DEVICE)
    good = _poisoned(geom.chunk_shape(2), case.dtype)
    with pytest.raises(ValueError, match="chunk: must be contiguous"):
        paged_to_chunk(flat, geom, ids, good.transpose(3, 4).contiguous().transpose(3, 4))
    with pytest.raises(ValueError, match="chunk: expected dtype"):
        paged_to_chunk(flat, geom, ids, good.to(torch.float32))
    with pytest.raises(ValueError, match="chunk: expected shape"):
        paged_to_chunk(flat, geom, ids[:1], good)
    with pytest.raises(ValueError, match="block_ids: values"):
        paged_to_chunk(flat, geom, torch.tensor([1, 4], device=DEVICE), good)
    with pytest.raises(ValueError, match="block_ids: expected a 1-D int64"):
        paged_to_chunk(flat, geom, ids.to(torch.int32), good)
    with pytest.raises(ValueError, match="flat: dtype"):
        chunk_to_paged(good, flat.view(torch.int16), geom, ids)
    slots = torch.tensor([0, 5, -1], device=DEVICE)
    with pytest.raises(ValueError, match="out: leading dim"):
        paged_to_tokens(flat, geom, slots, _poisoned((3, 2, 3, 2, 8), case.dtype))
    with pytest.raises(ValueError, match="out: expected shape"):
        paged_to_tokens(flat, geom, slots, _poisoned((2, 2, 3, 2, 8), case.dtype))
    with pytest.raises(ValueError, match="slot_mapping: slot 16"):
        tokens_to_paged(_poisoned((2, 2, 1, 2, 4), case.dtype), flat, geom, torch.tensor([16], device=DEVICE))
