"""Quantizing copies (kernels/quant.py): Triton kernels (interpreter on CPU, native on GPU) against
their torch twins (kernels/quant_ref.py), bit for bit, with every output poisoned first; and the
twins against the arithmetic they promise (the error bound of each group's own scale).

Odd sizes throughout: head size 80 (two 4-bit channel groups, the second partial), 63 tokens (a
partial 64-token K group), padding slots, a chunk straddling blocks, MLA rows (S = 1).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from lmcache_triton.kernels import quant_ref
from lmcache_triton.kernels.geometry import allocate_paged_cache, geometry_from_layer_views
from lmcache_triton.kernels.quant import dequantize_rows, paged_to_quant, quant_to_paged, quantize_rows
from lmcache_triton.kernels.quant_ref import (
    QMAX,
    QuantSpec,
    dequantize_half_ref,
    dequantize_rows_ref,
    pack_int4,
    paged_to_quant_ref,
    quant_to_paged_ref,
    quantize_half_ref,
    quantize_rows_ref,
    scale_shape,
    unpack_int4,
)

SPECS = {
    "int8-token": QuantSpec(8, "token", 0, 0),
    "int8-kchannel": QuantSpec(8, "channel", 64, 0),
    "int4-kivi": QuantSpec(4, "channel", 64, 64),
    "int4-token32": QuantSpec(4, "token", 32, 32),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROW_SHAPES = [(2, 2, 63, 3, 80), (1, 1, 5, 1, 64), (2, 1, 130, 2, 16)]
# Every spec x dtype on the odd main shape; the other shapes on bf16 (interpreter time).
ROW_CASES = [(sp, dt, ROW_SHAPES[0]) for sp in SPECS for dt in DTYPES] + [
    (sp, torch.bfloat16, sh) for sp in SPECS for sh in ROW_SHAPES[1:]
]

# The interpreter divides in masked-off lanes too (0 / 0 there, never stored).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


def _ids(x):
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return "x".join(map(str, x)) if isinstance(x, tuple) else None


def _outputs(spec: QuantSpec, shape, device=DEVICE):
    """Poisoned q (0x4D bytes) and scales (NaN) for rows of `shape`."""
    S, L, T, H, D = shape
    q = torch.full((S, L, T, H, spec.q_cols(D)), 77, dtype=spec.q_dtype(), device=device)
    scales = [
        torch.full(scale_shape(*spec.half(s, S), L, T, H, D), float("nan"), dtype=torch.float16, device=device)
        for s in range(S)
    ]
    return q, scales


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as integers: NaN poison compares equal to itself."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]) if t.dtype.is_floating_point else t


def _rows(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[..., 5] *= 40  # an outlier channel, as K has
    return x.to(dtype)


@pytest.mark.parametrize("spec,dtype,shape", ROW_CASES, ids=lambda x: _ids(x) or str(x))
def test_rows_kernel_matches_twin_bit_for_bit(spec, dtype, shape):
    spec = SPECS[spec]
    if spec.bits == 4 and shape[4] % 2:
        pytest.skip("4-bit needs an even head size")
    rows = _rows(shape, dtype).to(DEVICE)
    q, sc = _outputs(spec, shape)
    q_ref, sc_ref = _outputs(spec, shape, "cpu")
    quantize_rows(rows, spec, q, sc)
    quantize_rows_ref(rows.cpu(), spec, q_ref, sc_ref)
    assert torch.equal(q.cpu(), q_ref)
    for a, b in zip(sc, sc_ref, strict=True):
        assert torch.equal(a.cpu().view(torch.int16), b.view(torch.int16))
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    out_ref = torch.full(shape, float("nan"), dtype=dtype)
    dequantize_rows(q, sc, spec, out)
    dequantize_rows_ref(q_ref, sc_ref, spec, out_ref)
    assert torch.equal(_bits(out.cpu()), _bits(out_ref))


def _group_bound(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per element, half the step of its own group's scale (amax / QMAX), computed here from the
    definition of the groups, independently of the twin's code: the error a correct codec keeps
    under (plus the fp16 rounding of the scale and the output cast)."""
    S, L, T, H, D = x.shape
    x = x.float().abs()
    bound = torch.empty_like(x)
    for s in range(S):
        mode, group = spec.half(s, S)
        for l_ in range(L):
            for h in range(H):
                if mode == "token":
                    g = D if group <= 0 else group
                    for c0 in range(0, D, g):
                        blk = x[s, l_, :, h, c0 : c0 + g]
                        bound[s, l_, :, h, c0 : c0 + g] = blk.amax(dim=1, keepdim=True) / QMAX[spec.bits] / 2
                else:
                    for t0 in range(0, T, group):
                        blk = x[s, l_, t0 : t0 + group, h, :]
                        bound[s, l_, t0 : t0 + group, h, :] = blk.amax(dim=0, keepdim=True) / QMAX[spec.bits] / 2
    return bound


@pytest.mark.parametrize("spec", list(SPECS), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_roundtrip_error_within_each_groups_own_step(spec, dtype):
    """A wrong scale (another group's, a stale one) or a dropped group (the partial last one of
    63 tokens or of 80 channels) breaks this bound at once."""
    spec = SPECS[spec]
    shape = (2, 2, 63, 3, 80)
    x = _rows(shape, dtype, seed=3)
    x[0, 1, 60:, 2, :] *= 1e-3  # a quiet tail: another group's scale would be far too coarse
    x[1, 0, :, 1, 64:] *= 1e-3
    q, sc = _outputs(spec, shape, "cpu")
    quantize_rows_ref(x, spec, q, sc)
    y = torch.empty_like(x)
    dequantize_rows_ref(q, sc, spec, y)
    err = (y.float() - x.float()).abs()
    slack = 1.01 if dtype == torch.float32 else 1.02  # fp16 scale rounding; output cast
    tol = _group_bound(x, spec) * slack + x.float().abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    worst = (err - tol).max().item()
    assert worst <= 0, f"max excess over the group bound {worst:.3g} (max err {err.max().item():.3g})"


def test_int4_packing_is_two_nibbles_low_first():
    q = torch.tensor([[-7, 7, 0, -1, 3, -8]], dtype=torch.int8)
    p = pack_int4(q)
    assert p.tolist() == [[0x79, 0xF0, 0x83]]
    assert torch.equal(unpack_int4(p), q)


# ------------------------------------------------------------ the rows twins' blocks (CPU path)

# The rows twins work in blocks of `quant_ref.BLOCK_ELEMS` values: the default (one block at these
# sizes), 1000 (several, the last one short) and 1 (one row or token group per block).
BLOCKS = [quant_ref.BLOCK_ELEMS, 1000, 1]
# 130 tokens: two full 64-token groups and a partial one; head size 48: a full 32-channel group
# and a partial one (int4-token32), one whole-row group (int8-token).
BLOCK_SHAPE = (2, 3, 130, 2, 48)


@pytest.mark.parametrize("block", BLOCKS[1:], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("spec", list(SPECS), ids=str)
def test_rows_twin_in_blocks_matches_kernel(monkeypatch, spec, dtype, block):
    """The CPU production path (the twin in small blocks, partial groups in separate regions)
    against the kernel, bit for bit, every output poisoned, the input left as it was."""
    spec = SPECS[spec]
    rows = _rows(BLOCK_SHAPE, dtype, seed=5)
    rows[1, 2, 70:, 1, :] = 0  # an all-zero token group of V rows and of K channels: scale 0
    q, sc = _outputs(spec, BLOCK_SHAPE)
    q_ref, sc_ref = _outputs(spec, BLOCK_SHAPE, "cpu")
    quantize_rows(rows.to(DEVICE), spec, q, sc)
    monkeypatch.setattr(quant_ref, "BLOCK_ELEMS", block)
    before = rows.clone()
    quantize_rows_ref(rows, spec, q_ref, sc_ref)
    assert torch.equal(_bits(rows), _bits(before)), "the twin wrote into its input"
    assert torch.equal(q.cpu(), q_ref)
    for a, b in zip(sc, sc_ref, strict=True):
        assert torch.equal(a.cpu().view(torch.int16), b.view(torch.int16))
    out = torch.full(BLOCK_SHAPE, float("nan"), dtype=dtype, device=DEVICE)
    out_ref = torch.full(BLOCK_SHAPE, float("nan"), dtype=dtype)
    dequantize_rows(q, sc, spec, out)
    dequantize_rows_ref(q_ref, sc_ref, spec, out_ref)
    assert torch.equal(_bits(out.cpu()), _bits(out_ref))


ODD_SHAPES = [(2, 2, 63, 3, 80), (1, 1, 5, 1, 64), (2, 1, 130, 2, 16), (2, 2, 256, 2, 64), (1, 2, 1, 1, 6)]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("spec", list(SPECS), ids=str)
def test_rows_twin_matches_the_definition(monkeypatch, spec, block):
    """The blockwise rows twins against `quantize_half_ref` / `dequantize_half_ref` (the
    arithmetic on whole tensors) and `pack_int4` / `unpack_int4`, over odd shapes and every
    dtype, without the interpreter: a wrong region, block edge, scale or nibble shows here."""
    spec = SPECS[spec]
    monkeypatch.setattr(quant_ref, "BLOCK_ELEMS", block)
    for shape in ODD_SHAPES:
        if spec.bits == 4 and shape[4] % 2:
            continue
        for dtype in DTYPES:
            x = _rows(shape, dtype, seed=7)
            x[0, 0, 0, 0, :] = 0  # a zero group
            q, sc = _outputs(spec, shape, "cpu")
            quantize_rows_ref(x, spec, q, sc)
            S = shape[0]
            out = torch.full(shape, float("nan"), dtype=dtype)
            dequantize_rows_ref(q, sc, spec, out)
            for s in range(S):
                mode, group = spec.half(s, S)
                q_def, sc_def = quantize_half_ref(x[s], spec.bits, mode, group)
                assert torch.equal(q[s], q_def if spec.bits == 8 else pack_int4(q_def)), (shape, dtype, s)
                assert torch.equal(sc[s].view(torch.int16), sc_def.view(torch.int16)), (shape, dtype, s)
                y_def = dequantize_half_ref(q_def, sc_def, mode, group, dtype)
                assert torch.equal(_bits(out[s]), _bits(y_def)), (shape, dtype, s)


def test_rows_twin_unpacks_every_byte():
    """Every packed byte (all 256) decodes to its two nibbles, low first, sign-extended."""
    spec = SPECS["int4-token32"]
    shape = (1, 1, 8, 1, 64)  # 8 rows of 32 bytes: 256 bytes
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, 8, 1, 32)
    scales = [torch.ones(scale_shape(*spec.half(0, 1), 1, 8, 1, 64), dtype=torch.float16)]
    out = torch.full(shape, float("nan"))
    dequantize_rows_ref(q, scales, spec, out)
    b = torch.arange(256)
    lo, hi = ((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8
    assert torch.equal(out.view(256, 2), torch.stack((lo, hi), 1).float())


# ----------------------------------------------------------------------------- fused paged copies

BLOCK_SIZES = [1, 16]
# (spec, dtype, layout, block size, S): each spec and dtype, both layouts and block sizes, MLA.
FUSED_CASES = [
    ("int8-token", torch.bfloat16, "LBHNC", 16, 2),
    ("int8-token", torch.float32, "BLNHC", 1, 2),
    ("int8-token", torch.float16, "LBHNC", 1, 1),
    ("int4-kivi", torch.bfloat16, "BLNHC", 16, 2),
    ("int4-kivi", torch.float16, "LBHNC", 16, 2),
    ("int4-kivi", torch.float32, "LBHNC", 1, 1),
    ("int8-kchannel", torch.bfloat16, "LBHNC", 16, 2),
    ("int8-kchannel", torch.float32, "BLNHC", 16, 2),
]


@pytest.mark.parametrize(
    "spec,dtype,layout,block_size,kv_split",
    FUSED_CASES,
    ids=lambda x: _ids(x) if isinstance(x, torch.dtype) else str(x),
)
def test_fused_gather_quantize_and_dequantize_scatter(spec, dtype, layout, block_size, kv_split):
    """paged_to_quant == paged_to_tokens + quantize (twin), quant_to_paged == dequantize +
    tokens_to_paged (twin): the whole cache compared bit for bit, outputs poisoned first."""
    spec = SPECS[spec]
    L, B, H, D = 2, 9, 2, 80
    C = kv_split * D
    views = allocate_paged_cache(layout, L, B, H, block_size, C, dtype, DEVICE)
    flat, geom = geometry_from_layer_views(views)
    g = torch.Generator().manual_seed(7)
    src = (torch.randn(flat.numel(), generator=g) * 2).to(dtype)
    flat.copy_(src.to(DEVICE))
    T = min(63, B * block_size - 3)
    perm = torch.randperm(B * block_size, generator=g)[:T]
    slots = perm.clone()
    slots[[1, T - 2]] = -1  # padding reads as zeros
    slots = slots.to(DEVICE)
    shape = (kv_split, L, T, H, D)
    q, sc = _outputs(spec, shape)
    q_ref, sc_ref = _outputs(spec, shape, "cpu")
    paged_to_quant(flat, geom, slots, spec, q, sc)
    paged_to_quant_ref(flat.cpu(), geom, slots.cpu(), spec, q_ref, sc_ref)
    assert torch.equal(q.cpu(), q_ref)
    for a, b in zip(sc, sc_ref, strict=True):
        assert torch.equal(a.cpu().view(torch.int16), b.view(torch.int16))

    poison = torch.full_like(flat, float("nan"))
    dst, dst_ref = poison.clone(), poison.clone().cpu()
    quant_to_paged(q, sc, spec, dst, geom, slots)
    quant_to_paged_ref(q_ref, sc_ref, spec, dst_ref, geom, slots.cpu())
    assert torch.equal(_bits(dst.cpu()), _bits(dst_ref))
    # Only the slots of valid tokens were written: everything else is still NaN.
    written = ~torch.isnan(dst_ref.float())
    assert int(written.sum()) == (T - 2) * L * H * C


def test_fused_matches_gather_then_quantize_oracle():
    """The fused gather + quantize equals the exact gather (paged_copy) followed by the rows
    quantizer: one oracle that shares no code with the fused twin's addressing."""
    from lmcache_triton.kernels.paged_copy import paged_to_tokens

    spec = SPECS["int4-kivi"]
    views = allocate_paged_cache("LBHNC", 3, 6, 2, 16, 160, torch.bfloat16, DEVICE)
    flat, geom = geometry_from_layer_views(views)
    values = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(1)) * 4
    flat.copy_(values.to(torch.bfloat16).to(DEVICE))
    slots = torch.arange(5, 5 + 70, dtype=torch.int64, device=DEVICE)  # straddles blocks
    rows = torch.empty((2, 3, 70, 2, 80), dtype=torch.bfloat16, device=DEVICE)
    paged_to_tokens(flat, geom, slots, rows)
    q1, s1 = _outputs(spec, rows.shape)
    q2, s2 = _outputs(spec, rows.shape)
    paged_to_quant(flat, geom, slots, spec, q1, s1)
    quantize_rows(rows, spec, q2, s2)
    assert torch.equal(q1, q2) and all(torch.equal(a, b) for a, b in zip(s1, s2, strict=True))


def test_launchers_refuse_bad_outputs():
    spec = SPECS["int8-token"]
    rows = torch.randn(2, 1, 4, 1, 8)
    q, sc = _outputs(spec, rows.shape, "cpu")
    with pytest.raises(ValueError, match="scales\\[1\\]"):
        quantize_rows(rows, spec, q, [sc[0], sc[0][:, :2]])
    with pytest.raises(ValueError, match="q: expected"):
        quantize_rows(rows, spec, q.to(torch.uint8), sc)
    with pytest.raises(ValueError, match="even head size"):
        outputs = _outputs(SPECS["int8-token"], (2, 1, 4, 1, 7), "cpu")
        quantize_rows(torch.randn(2, 1, 4, 1, 7), SPECS["int4-kivi"], *outputs)
