"""CacheBlend kernels: token deviation, token selection, RoPE re-rotation.

Numeric kernels are compared with float64 references under a stated tolerance; failures report
the max error. On CPU the kernels run through TRITON_INTERPRET=1 (set by conftest) at small,
odd shapes; `gpu` tests rerun them natively at model shapes and in bf16.
"""

import math

import pytest
import torch
from conftest import DEVICE

from lmcache_triton.kernels.blend import select_tokens, token_deviation
from lmcache_triton.kernels.reference import (
    rerotate_k_ref,
    select_tokens_ref,
    token_deviation_ref,
)
from lmcache_triton.kernels.rope import rerotate_k, rope_inv_freq

DEV_SHAPES = [(63, 3, 80), (1, 1, 1), (17, 2, 128)]  # (T, H, D)
STACKS = [None, 2]  # None: K only [T, H, D]; 2: K and V stacked [2, T, H, D]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(80, 64), (80, 80), (64, 64)]  # (head size D, rotary_dim)
STYLES = [True, False]  # is_neox
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SCALINGS = [(10000.0, None), (500000.0, LLAMA3), (10000.0, {"type": "linear", "factor": 4.0})]
SCALING_IDS = ["default", "llama3", "linear"]
# Storage rounding of the output: half an ulp relative.
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


def _shape_id(shape):
    return "T{}-H{}-D{}".format(*shape)


def _head_id(head):
    return "D{}-rot{}".format(*head)


def _assert_close(got, want, atol, what):
    err = (got.double() - want.double()).abs()
    excess = err - atol
    assert excess.max().item() <= 0, (
        f"{what}: max abs error {err.max().item():.3e} exceeds tolerance "
        f"(max over elements of error - atol = {excess.max().item():.3e})"
    )


# ---------------------------------------------------------------------------
# token_deviation
# ---------------------------------------------------------------------------


def _deviation_tol(want, n_terms):
    # All terms are >= 0, so fp32 summation of n terms errs by at most n * 2^-24 relative to the
    # sum; the fp32 difference and square add 3 * 2^-24 per term.
    return want.abs() * (n_terms + 3) * 2.0**-24 + 1e-30


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("stack", STACKS, ids=["K", "KV"])
@pytest.mark.parametrize("shape", DEV_SHAPES, ids=_shape_id)
def test_token_deviation_matches_fp64(shape, stack, dtype):
    torch.manual_seed(0)
    full = shape if stack is None else (stack, *shape)
    cached = torch.randn(full, device=DEVICE).to(dtype)
    fresh = (cached.float() + 0.1 * torch.randn(full, device=DEVICE)).to(dtype)
    got = token_deviation(cached, fresh)
    assert got.dtype == torch.float32 and got.shape == (shape[0],) and got.device == cached.device
    want = token_deviation_ref(cached.double(), fresh.double())
    n_terms = (stack or 1) * shape[1] * shape[2]
    _assert_close(got, want, _deviation_tol(want, n_terms), "token_deviation vs fp64")


# (2, 1100, 8, 128) spans three of the twin's 512-token blocks, the last one partial.
@pytest.mark.parametrize("shape", [(2, 63, 3, 80), (2, 1100, 8, 128), (63, 3, 80)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_token_deviation_twin_matches_fp64(dtype, shape):
    # The twin is the CPU production path (interpreter off).
    torch.manual_seed(1)
    cached = torch.randn(shape).to(dtype)
    fresh = torch.randn(shape).to(dtype)
    got = token_deviation_ref(cached, fresh)
    assert got.dtype == torch.float32
    want = token_deviation_ref(cached.double(), fresh.double())
    n_terms = math.prod(shape) // shape[-3]
    _assert_close(got, want, _deviation_tol(want, n_terms), "token_deviation_ref vs fp64")


def test_token_deviation_strided_and_mixed_dtypes():
    torch.manual_seed(2)
    t, h, d = 63, 3, 80
    # [H, T, D] storage seen as [T, H, D]; fresh is a slice out of a wider buffer.
    cached = torch.randn(h, t, d, device=DEVICE).transpose(0, 1)
    fresh = torch.randn(t, h, 2 * d, device=DEVICE, dtype=torch.float16)[..., 5 : 5 + d]
    assert not cached.is_contiguous() and not fresh.is_contiguous()
    got = token_deviation(cached, fresh)
    want = token_deviation_ref(cached.double(), fresh.double())
    _assert_close(got, want, _deviation_tol(want, h * d), "strided token_deviation vs fp64")


def test_token_deviation_identical_inputs_is_zero():
    x = torch.randn(63, 3, 80, device=DEVICE)
    assert torch.equal(token_deviation(x, x.clone()), torch.zeros(63, device=DEVICE))


def test_token_deviation_rejects_bad_shapes():
    x = torch.randn(4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="differ in shape"):
        token_deviation(x, x[:3])
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        token_deviation(x[0], x[0])


# ---------------------------------------------------------------------------
# select_tokens
# ---------------------------------------------------------------------------

SELECTORS = [select_tokens, select_tokens_ref]
SELECTOR_IDS = ["select_tokens", "select_tokens_ref"]


def _check_sorted_int64(idx, device):
    assert idx.dtype == torch.int64 and idx.device == torch.device(device)
    assert torch.all(idx[1:] > idx[:-1]), idx


@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
def test_select_ratio_zero(select):
    dev = torch.rand(63, device=DEVICE)
    none = select(dev, 0.0, always_last=False)
    _check_sorted_int64(none, DEVICE)
    assert none.numel() == 0
    assert select(dev, 0.0).tolist() == [62]  # always_last defaults to True


@pytest.mark.parametrize("always_last", [True, False])
@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
def test_select_ratio_one_is_all(select, always_last):
    dev = torch.rand(63, device=DEVICE)
    assert select(dev, 1.0, always_last=always_last).tolist() == list(range(63))


def _distinct_deviation_inputs(t, h, d, seed):
    # Per-token perturbation scales spaced by a factor 1.2 in random order: float64 deviations
    # are then far apart relative to the fp32 error bound, so the top-k set is unambiguous.
    g = torch.Generator().manual_seed(seed)
    scales = 1.2 ** torch.randperm(t, generator=g).double()
    cached = torch.randn(t, h, d, generator=g)
    noise = torch.randn(t, h, d, generator=g)
    noise = noise / noise.norm(dim=(1, 2), keepdim=True)
    fresh = cached + (scales[:, None, None] * noise).float()
    return cached.to(DEVICE), fresh.to(DEVICE)


@pytest.mark.parametrize("always_last", [True, False])
@pytest.mark.parametrize("ratio", [0.15, 0.5], ids=["r0.15", "r0.5"])
def test_select_top_k_set_equals_fp64(ratio, always_last):
    t = 63
    cached, fresh = _distinct_deviation_inputs(t, 3, 80, seed=3)
    got = select_tokens(token_deviation(cached, fresh), ratio, always_last=always_last)
    _check_sorted_int64(got, DEVICE)

    dev64 = token_deviation_ref(cached.double(), fresh.double()).cpu()
    k = math.ceil(ratio * t)
    order = torch.argsort(dev64, descending=True)
    assert dev64[order[k - 1]] > 1.1 * dev64[order[k]], "precondition: a clear gap at the boundary"
    if always_last:
        rest = [i for i in order.tolist() if i != t - 1]
        want = {t - 1, *rest[: k - 1]}
    else:
        want = set(order[:k].tolist())
    assert len(got) == k
    assert set(got.tolist()) == want


@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
def test_select_ties_go_to_lower_index(select):
    flat = torch.ones(10, device=DEVICE)
    assert select(flat, 0.3, always_last=False).tolist() == [0, 1, 2]
    assert select(flat, 0.3).tolist() == [0, 1, 9]
    boundary = torch.tensor([5.0, 3.0, 1.0, 3.0, 3.0, 0.0], device=DEVICE)
    assert select(boundary, 0.5, always_last=False).tolist() == [0, 1, 3]


def test_select_count_rules():
    dev = torch.arange(100.0, device=DEVICE).flip(0)  # token 0 deviates most
    assert select_tokens(dev, 0.07, always_last=False).tolist() == list(range(7))  # 0.07*100 = 7.000..01
    assert select_tokens(dev, 0.071, always_last=False).tolist() == list(range(8))
    assert select_tokens(dev, 0.01, min_tokens=5, always_last=False).tolist() == list(range(5))
    assert select_tokens(dev, 0.0, min_tokens=5, always_last=False).numel() == 0
    assert select_tokens(dev, 0.01, min_tokens=500, always_last=False).numel() == 100
    # The last token takes a slot of the budget, it does not add one.
    assert select_tokens(dev, 0.05).tolist() == [0, 1, 2, 3, 99]
    assert select_tokens(torch.empty(0, device=DEVICE), 0.5).numel() == 0


def test_select_nan_ranks_highest():
    dev = torch.tensor([1.0, float("nan"), 5.0, 2.0], device=DEVICE)
    assert select_tokens(dev, 0.5, always_last=False).tolist() == [1, 2]


def test_select_rejects_bad_args():
    dev = torch.rand(8, device=DEVICE)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(dev, ratio)
    with pytest.raises(ValueError, match=r"\[T\]"):
        select_tokens(dev[None], 0.5)


# ---------------------------------------------------------------------------
# rope_inv_freq
# ---------------------------------------------------------------------------


def _llama3_inv_freq_fp64(rotary_dim, base, cfg):
    # Independent, per-frequency statement of the Llama 3.1 schedule.
    out = []
    for i in range(0, rotary_dim, 2):
        f = 1.0 / base ** (i / rotary_dim)
        wavelen = 2 * math.pi / f
        lo_wl = cfg["original_max_position_embeddings"] / cfg["low_freq_factor"]
        hi_wl = cfg["original_max_position_embeddings"] / cfg["high_freq_factor"]
        if wavelen < hi_wl:
            out.append(f)
        elif wavelen > lo_wl:
            out.append(f / cfg["factor"])
        else:
            s = (cfg["original_max_position_embeddings"] / wavelen - cfg["low_freq_factor"]) / (
                cfg["high_freq_factor"] - cfg["low_freq_factor"]
            )
            out.append((1 - s) * f / cfg["factor"] + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("rotary_dim", [64, 80, 128])
def test_rope_inv_freq_schedules(rotary_dim):
    plain = torch.tensor([1.0 / 10000.0 ** (i / rotary_dim) for i in range(0, rotary_dim, 2)])
    got = rope_inv_freq(rotary_dim, 10000.0)
    assert got.dtype == torch.float32 and got.shape == (rotary_dim // 2,)
    _assert_close(got, plain, plain * 2.0**-21, "default inv_freq")
    _assert_close(
        rope_inv_freq(rotary_dim, 10000.0, {"rope_type": "default"}), plain, plain * 2.0**-21, "default"
    )
    linear = rope_inv_freq(rotary_dim, 10000.0, {"rope_type": "linear", "factor": 4.0})
    _assert_close(linear, plain / 4, plain * 2.0**-21, "linear inv_freq")

    want = _llama3_inv_freq_fp64(rotary_dim, 500000.0, LLAMA3)
    got64 = rope_inv_freq(rotary_dim, 500000.0, LLAMA3, dtype=torch.float64)
    _assert_close(got64, want, want * 1e-12, "llama3 inv_freq fp64")
    got32 = rope_inv_freq(rotary_dim, 500000.0, LLAMA3)
    _assert_close(got32, want, want * 2.0**-20, "llama3 inv_freq fp32")
    # The schedule really has all three bands at these settings.
    plain_l3 = rope_inv_freq(rotary_dim, 500000.0, dtype=torch.float64)
    ratio = plain_l3 / want
    assert (ratio - 1).abs().min() < 1e-12 and (ratio - 8).abs().min() < 1e-9
    assert ((ratio > 1 + 1e-6) & (ratio < 8 - 1e-6)).any()


def test_rope_inv_freq_rejects_unknown():
    with pytest.raises(ValueError, match="unsupported"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(63, 10000.0)


# ---------------------------------------------------------------------------
# rerotate_k
# ---------------------------------------------------------------------------


def _rope_tol(k, delta, inv_freq, dtype):
    # The fp32 angle delta * inv_freq errs by |angle| * 2^-24, fp32 cos/sin by a few ulp, and
    # the output is rounded once to `dtype`.
    amax = k.double().abs().max().item()
    max_angle = (delta.double().abs().max() * inv_freq.double().abs().max()).item()
    return amax * (2 * max_angle * 2.0**-24 + 2.0**-20 + 2 * OUT_EPS[dtype])


def _positions(t, seed, lo=0, hi=2000):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(lo, hi, (t,), generator=g)
    dst = torch.randint(lo, hi, (t,), generator=g)
    return src.to(DEVICE), dst.to(DEVICE)


@pytest.mark.parametrize("base, scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
@pytest.mark.parametrize("head", HEADS, ids=_head_id)
def test_rerotate_matches_fp64(head, is_neox, dtype, base, scaling):
    d, rot = head
    t, h = 63, 3
    torch.manual_seed(4)
    k = torch.randn(t, h, d, device=DEVICE).to(dtype)
    src, dst = _positions(t, seed=5)
    assert ((dst - src) < 0).any() and ((dst - src) > 0).any()
    inv = rope_inv_freq(rot, base, scaling).to(DEVICE)
    out = torch.full_like(k, float("nan"))  # poisoned: catches missed writes
    ret = rerotate_k(k, src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv, out=out)
    assert ret is out
    want = rerotate_k_ref(k.double(), src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv.double())
    _assert_close(out, want, _rope_tol(k, dst - src, inv, dtype), f"rerotate_k {dtype} vs fp64")
    assert torch.equal(out[..., rot:], k[..., rot:]), "dims past rotary_dim must be copied bit-exactly"


@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
@pytest.mark.parametrize("head", HEADS, ids=_head_id)
def test_rerotate_in_place_equals_out_of_place(head, is_neox):
    d, rot = head
    k = torch.randn(63, 3, d, device=DEVICE, dtype=torch.float16)
    src, dst = _positions(63, seed=6)
    inv = rope_inv_freq(rot, 10000.0).to(DEVICE)
    fresh = rerotate_k(k, src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv)
    k2 = k.clone()
    ret = rerotate_k(k2, src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv, out=k2)
    assert ret is k2 and torch.equal(k2, fresh)


def test_rerotate_strided_k_and_out():
    t, h, d, rot = 63, 3, 80, 64
    k = torch.randn(h, t, d, device=DEVICE).transpose(0, 1)  # [T, H, D] through [H, T, D] storage
    out_buf = torch.full((t, h, 2 * d), float("nan"), device=DEVICE)
    out = out_buf[..., :d]
    src, dst = _positions(t, seed=7)
    inv = rope_inv_freq(rot, 10000.0).to(DEVICE)
    rerotate_k(k, src.to(torch.int32), dst, rotary_dim=rot, inv_freq=inv, out=out)
    want = rerotate_k_ref(k.double(), src, dst, rotary_dim=rot, inv_freq=inv.double())
    _assert_close(out, want, _rope_tol(k, dst - src, inv, torch.float32), "strided rerotate_k")
    assert torch.isnan(out_buf[..., d:]).all(), "stray writes outside out"


@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_rerotate_delta_zero_is_identity(dtype, is_neox):
    # cos 0 = 1 and sin 0 = 0 exactly, so the identity holds bit for bit (tolerance 0).
    k = torch.randn(63, 3, 80, device=DEVICE).to(dtype)
    pos, _ = _positions(63, seed=8)
    inv = rope_inv_freq(64, 10000.0).to(DEVICE)
    out = rerotate_k(k, pos, pos.clone(), rotary_dim=64, is_neox=is_neox, inv_freq=inv)
    assert torch.equal(out, k), f"max error {(out.double() - k.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
def test_rerotate_round_trip(is_neox):
    k = torch.randn(63, 3, 80, device=DEVICE)
    src, dst = _positions(63, seed=9)
    inv = rope_inv_freq(64, 500000.0, LLAMA3).to(DEVICE)
    there = rerotate_k(k, src, dst, rotary_dim=64, is_neox=is_neox, inv_freq=inv)
    back = rerotate_k(there, dst, src, rotary_dim=64, is_neox=is_neox, inv_freq=inv)
    _assert_close(back, k, 2 * _rope_tol(k, dst - src, inv, torch.float32), "src -> dst -> src")


@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
def test_rerotation_composes_fp64(is_neox):
    # R(dst) R(src)^-1 = R(dst - src): RoPE at src then re-rotate to dst == RoPE directly at dst.
    t, h, d, rot = 63, 3, 80, 64
    raw = torch.randn(t, h, d, dtype=torch.float64)
    src, dst = (p.cpu() for p in _positions(t, seed=10, hi=100000))
    zero = torch.zeros_like(src)
    inv = rope_inv_freq(rot, 10000.0, dtype=torch.float64)
    kw = dict(rotary_dim=rot, is_neox=is_neox, inv_freq=inv)
    at_src = rerotate_k_ref(raw, zero, src, **kw)
    moved = rerotate_k_ref(at_src, src, dst, **kw)
    direct = rerotate_k_ref(raw, zero, dst, **kw)
    _assert_close(moved, direct, 1e-9, "fp64 composition")

    # The kernel in fp32 against the fp64 direct rotation (angles up to 1e5 rad here).
    kw32 = dict(rotary_dim=rot, is_neox=is_neox, inv_freq=inv.float().to(DEVICE))
    at_src32 = rerotate_k(raw.float().to(DEVICE), zero.to(DEVICE), src.to(DEVICE), **kw32)
    moved32 = rerotate_k(at_src32, src.to(DEVICE), dst.to(DEVICE), **kw32)
    tol = 2 * _rope_tol(raw, torch.maximum(src, dst), inv, torch.float32)
    _assert_close(moved32.cpu(), direct, tol, "fp32 kernel composition vs fp64")


def test_rerotate_rejects_bad_args():
    k = torch.randn(4, 2, 80, device=DEVICE)
    p = torch.arange(4, device=DEVICE)
    inv = rope_inv_freq(64, 10000.0).to(DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        rerotate_k(k, p, p, rotary_dim=63, inv_freq=inv)
    with pytest.raises(ValueError, match="rotary_dim"):
        rerotate_k(k, p, p, rotary_dim=96, inv_freq=rope_inv_freq(96, 1e4).to(DEVICE))
    with pytest.raises(ValueError, match="inv_freq"):
        rerotate_k(k, p, p, rotary_dim=80, inv_freq=inv)
    with pytest.raises(ValueError, match="out must match"):
        rerotate_k(k, p, p, rotary_dim=64, inv_freq=inv, out=k.half())
    with pytest.raises(ValueError, match="src_pos"):
        rerotate_k(k, p[:3], p, rotary_dim=64, inv_freq=inv)


# ---------------------------------------------------------------------------
# GPU: model shapes, bf16
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
def test_gpu_deviation_and_selection_model_shape(dtype):
    t, h, d = 4096, 8, 128
    torch.manual_seed(11)
    cached = torch.randn(2, t, h, d, device="cuda").to(dtype)
    fresh = (cached.float() + 0.05 * torch.randn_like(cached, dtype=torch.float32)).to(dtype)
    got = token_deviation(cached, fresh)
    want = token_deviation_ref(cached.double(), fresh.double())
    _assert_close(got, want, _deviation_tol(want, 2 * h * d), f"gpu token_deviation {dtype}")
    idx = select_tokens(got, 0.15)
    assert idx.numel() == math.ceil(0.15 * t) and idx[-1].item() == t - 1
    _check_sorted_int64(idx, "cuda:0")


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "gptj"])
@pytest.mark.parametrize("head", [(128, 128), (80, 64)], ids=_head_id)
def test_gpu_rerotate_bf16_model_shape(head, is_neox):
    d, rot = head
    t, h = 4096, 8
    k = torch.randn(t, h, d, device="cuda").to(torch.bfloat16)
    src = torch.randint(0, 32768, (t,), device="cuda")
    dst = torch.randint(0, 32768, (t,), device="cuda")
    inv = rope_inv_freq(rot, 500000.0, LLAMA3).cuda()
    out = torch.full_like(k, float("nan"))
    rerotate_k(k, src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv, out=out)
    want = rerotate_k_ref(k.double(), src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv.double())
    _assert_close(out, want, _rope_tol(k, dst - src, inv, torch.bfloat16), "gpu rerotate_k bf16")
    assert torch.equal(out[..., rot:], k[..., rot:])
    k2 = k.clone()
    rerotate_k(k2, src, dst, rotary_dim=rot, is_neox=is_neox, inv_freq=inv, out=k2)
    assert torch.equal(k2, out)
