"""CacheBlend prefill on locally built tiny models: the reference forward against transformers,
blend_prefill's invariants (ratio 1 = full prefill, ratio 0 = full reuse, error falls with the
ratio), re-rotation on layer 0, and refusal of what the forward does not reproduce.

Tolerances (fp32 everywhere): forward vs transformers 1e-4 absolute on logits and KV (measured
~1e-5: the two differ in fused-op order only); blend at ratio 1 vs full prefill 1e-5 relative on
KV and 1e-4 absolute on logits (measured ~1e-6 / ~2e-5: re-rotated layer-0 K differs from directly
rotated K by fp32 rounding of cos/sin products, and subset matmuls block differently).
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from lmcache_triton.blend.blender import SegmentKV, blend_prefill, prefill_segment
from lmcache_triton.blend.model import BlendUnsupported, from_vllm_model, load_hf_weights, prefill
from lmcache_triton.kernels.rope import rerotate_k
from lmcache_triton.testing.tiny_model import build_tiny_model

# name -> build_tiny_model kwargs. qwen2: hidden 128 / 4 heads = head 32 (vLLM's CPU minimum).
MODELS = {
    "llama": dict(arch="llama", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2),
    "llama3rope": dict(
        arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(arch="qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2),
}
BLEND_MODELS = ["llama", "qwen2"]
NUM_TOKENS = 67  # odd, several segments of odd lengths
SPANS = [(1, 20), (23, 45), (47, 60)]  # cached documents; the rest: BOS, separators, question


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend_models")
    return {name: build_tiny_model(root / name, **kw) for name, kw in MODELS.items()}


@pytest.fixture(scope="module")
def qwen3_dir(model_dirs, tmp_path_factory):
    """A Qwen3 model made from the qwen2 build: no q/k/v biases, per-head q_norm/k_norm."""
    from safetensors.torch import load_file, save_file

    src = model_dirs["qwen2"]
    out = tmp_path_factory.mktemp("qwen3")
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim,
               attention_bias=False)
    (out / "config.json").write_text(json.dumps(cfg))
    sd = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.endswith("proj.bias")}
    gen = torch.Generator().manual_seed(3)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("q_norm", "k_norm"):
            sd[f"model.layers.{i}.self_attn.{n}.weight"] = 1 + 0.3 * torch.randn(head_dim, generator=gen)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _ids(w, seed=0, n=NUM_TOKENS):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, w.config.vocab_size, (n,), generator=g)


def _kv_rel_err(kv, ref):
    num = sum((k - rk).pow(2).sum() + (v - rv).pow(2).sum() for (k, v), (rk, rv) in zip(kv, ref, strict=True))
    den = sum(rk.pow(2).sum() + rv.pow(2).sum() for rk, rv in ref)
    return (num / den).sqrt().item()


def _compare_with_transformers(model_dir):
    transformers = pytest.importorskip("transformers", reason="transformers validates the reference forward")
    w = load_hf_weights(model_dir)
    ids = _ids(w)
    logits, kv = prefill(w, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(ids[None], use_cache=True)
    err = (logits - out.logits[0, -1]).abs().max().item()
    assert err < 1e-4, f"last-token logits differ from transformers by {err:.3e}"
    cache = out.past_key_values
    for i, (k, v) in enumerate(kv):
        hk, hv = cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1)
        err_k, err_v = (k - hk).abs().max().item(), (v - hv).abs().max().item()
        assert max(err_k, err_v) < 1e-4, f"layer {i}: K err {err_k:.3e}, V err {err_v:.3e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_transformers(model_dirs, name):
    _compare_with_transformers(model_dirs[name])


def test_forward_matches_transformers_qwen3(qwen3_dir):
    w = load_hf_weights(qwen3_dir)
    assert w.layers[0].q_norm is not None and w.layers[0].q_b is None
    _compare_with_transformers(qwen3_dir)


def _blend_case(model_dirs, name, seed=0):
    w = load_hf_weights(model_dirs[name])
    ids = _ids(w, seed)
    full_logits, full_kv = prefill(w, ids)
    segs = [prefill_segment(w, ids, s, e) for s, e in SPANS]
    return w, ids, segs, full_logits, full_kv


@pytest.mark.parametrize("name", BLEND_MODELS)
def test_ratio_one_is_full_prefill(model_dirs, name):
    w, ids, segs, full_logits, full_kv = _blend_case(model_dirs, name)
    res = blend_prefill(w, ids, segs, ratio=1.0)
    assert res.recompute_idx.tolist() == list(range(len(ids)))
    kv_err = _kv_rel_err(res.kv, full_kv)
    logit_err = (res.logits_last - full_logits).abs().max().item()
    assert kv_err < 1e-5, f"KV relative error {kv_err:.3e}"
    assert logit_err < 1e-4, f"logit error {logit_err:.3e}"


@pytest.mark.parametrize("check", [1, 2, 3])
@pytest.mark.parametrize("name", BLEND_MODELS)
def test_ratio_one_is_full_prefill_at_every_check_layer(model_dirs, name, check):
    """Layers before the check layer compute every token anyway: their KV must be the fresh KV,
    or a later check layer starts from stale rows and ratio 1 no longer equals a full prefill."""
    w, ids, segs, full_logits, full_kv = _blend_case(model_dirs, name)
    if check >= len(w.layers):
        pytest.skip(f"the test model has {len(w.layers)} layers")
    res = blend_prefill(w, ids, segs, ratio=1.0, check_layers=(check,))
    kv_err = _kv_rel_err(res.kv, full_kv)
    logit_err = (res.logits_last - full_logits).abs().max().item()
    assert kv_err < 1e-5, f"check layer {check}: KV relative error {kv_err:.3e}"
    assert logit_err < 1e-4, f"check layer {check}: logit error {logit_err:.3e}"


@pytest.mark.parametrize("name", BLEND_MODELS)
def test_ratio_zero_is_full_reuse(model_dirs, name):
    w, ids, segs, _, _ = _blend_case(model_dirs, name)
    res = blend_prefill(w, ids, segs, ratio=0.0)
    cached = set().union(*(range(s, e) for s, e in SPANS))
    fresh = [i for i in range(len(ids)) if i not in cached]
    assert res.recompute_idx.tolist() == fresh  # the last token is not cached here
    assert res.selected[0].numel() == 0
    inv = w.inv_freq
    for seg in segs:
        n = seg.end - seg.start
        dst = torch.arange(seg.start, seg.end)
        for i in range(w.num_layers):
            k_moved = rerotate_k(seg.kv[i][0], torch.arange(n), dst, inv_freq=inv)
            k_got, v_got = res.kv[i][0][seg.start : seg.end], res.kv[i][1][seg.start : seg.end]
            if i < 1:  # before the check layer every token is computed: fresh K/V, equal up to rounding
                assert torch.allclose(k_got, k_moved, atol=1e-4), f"layer {i} K differs beyond rounding"
                assert torch.allclose(v_got, seg.kv[i][1], atol=1e-4), f"layer {i} V differs beyond rounding"
            else:  # from the check layer on, dropped tokens keep the reused K/V exactly
                assert torch.equal(k_got, k_moved), f"layer {i} K not the reused K"
                assert torch.equal(v_got, seg.kv[i][1]), f"layer {i} V not reused"


@pytest.mark.parametrize("name", BLEND_MODELS)
def test_error_falls_with_ratio(model_dirs, name, capsys):
    w, ids, segs, full_logits, full_kv = _blend_case(model_dirs, name)
    errs = {}
    for r in (0.0, 0.15, 0.5, 1.0):
        res = blend_prefill(w, ids, segs, ratio=r)
        errs[r] = (_kv_rel_err(res.kv, full_kv), (res.logits_last - full_logits).abs().max().item())
    with capsys.disabled():
        print(f"\n[{name}] ratio -> (KV rel err, max logit err): "
              + ", ".join(f"{r}: ({a:.3g}, {b:.3g})" for r, (a, b) in errs.items()))
    assert errs[0.15][0] < errs[0.0][0], errs
    assert errs[0.5][0] < errs[0.15][0], errs
    assert errs[1.0][0] < 1e-5, errs


def test_last_token_recomputed_when_cached(model_dirs):
    # The prompt ends inside a cached segment: its last token must still be recomputed.
    w = load_hf_weights(model_dirs["llama"])
    ids = _ids(w, n=40)
    full_logits, _ = prefill(w, ids)
    res = blend_prefill(w, ids, [prefill_segment(w, ids, 10, 40)], ratio=0.0)
    assert res.recompute_idx.tolist() == list(range(10)) + [39]
    res1 = blend_prefill(w, ids, [prefill_segment(w, ids, 10, 40)], ratio=1.0)
    assert (res1.logits_last - full_logits).abs().max().item() < 1e-4


def test_two_check_layers_shrink(model_dirs):
    w, ids, segs, _, _ = _blend_case(model_dirs, "llama")
    res = blend_prefill(w, ids, segs, ratio=(0.5, 0.2), check_layers=(1, 2))
    first, second = (set(s.tolist()) for s in res.selected)
    assert second <= first and len(second) < len(first)
    assert set(res.candidates[1].tolist()) == first


@pytest.mark.parametrize("name", BLEND_MODELS)
@pytest.mark.parametrize("src_offset", [0, 5], ids=["src0", "src5"])
def test_rerotation_matches_layer0(model_dirs, name, src_offset):
    """Layer-0 K/V depend only on the token and its position, so a segment prefilled alone (at
    `src_offset + 0..n-1`) and re-rotated must equal the full prefill's layer 0 at its span."""
    w = load_hf_weights(model_dirs[name])
    ids = _ids(w)
    _, full_kv = prefill(w, ids)
    start, end = SPANS[1]
    n = end - start
    src = torch.arange(n) + src_offset
    _, seg_kv = prefill(w, ids[start:end], positions=src)
    moved = rerotate_k(seg_kv[0][0], src, torch.arange(start, end), inv_freq=w.inv_freq)
    err_k = (moved - full_kv[0][0][start:end]).abs().max().item()
    err_v = (seg_kv[0][1] - full_kv[0][1][start:end]).abs().max().item()
    assert err_k < 1e-5 and err_v < 1e-6, f"K err {err_k:.3e}, V err {err_v:.3e}"
    # The same through blend_prefill with src_positions (no recompute of the segment).
    res = blend_prefill(w, ids, [SegmentKV(start, end, seg_kv, src_positions=src)], ratio=0.0)
    assert (res.kv[0][0][start:end] - full_kv[0][0][start:end]).abs().max().item() < 1e-5


def test_unsupported_arch_refused(model_dirs, tmp_path):
    src = model_dirs["llama"]
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    for patch, match in [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(BlendUnsupported, match=match):
            load_hf_weights(tmp_path)

    class GPTNeoXForCausalLM(torch.nn.Module):
        config = SimpleNamespace(num_hidden_layers=1)

    with pytest.raises(BlendUnsupported, match="GPTNeoXForCausalLM"):
        from_vllm_model(GPTNeoXForCausalLM())


def test_bad_segments_rejected(model_dirs):
    w, ids, segs, _, _ = _blend_case(model_dirs, "llama")
    with pytest.raises(ValueError, match="overlaps"):
        blend_prefill(w, ids, [segs[0], SegmentKV(5, 10, segs[0].kv)])
    with pytest.raises(ValueError, match="layer 0"):
        blend_prefill(w, ids, [SegmentKV(0, 3, segs[0].kv)])


# ---- from_vllm_model on a stand-in with vLLM's attribute names (vllm 0.32 llama.py / qwen2.py:
# self_attn.{qkv_proj, o_proj, q_size, kv_size, head_dim, num_heads, num_kv_heads, rotary_emb},
# mlp.{gate_up_proj, down_proj}, {input,post_attention}_layernorm.variance_epsilon, model.norm,
# lm_head padded to a multiple of 64 rows). A real engine's model is exercised by the connector.


def _lin(weight, bias=None):
    return SimpleNamespace(weight=weight, bias=bias)


def _vllm_standin(w, arch_name, cfg):
    c = w.config
    half = c.head_dim // 2
    pos = torch.arange(256, dtype=torch.float32)[:, None] * w.inv_freq[None, :half]
    rotary = SimpleNamespace(rotary_dim=c.head_dim, is_neox_style=True,
                             cos_sin_cache=torch.cat([pos.cos(), pos.sin()], dim=-1))
    layers = []
    for lw in w.layers:
        qkv_b = None if lw.q_b is None else torch.cat([lw.q_b, lw.k_b, lw.v_b])
        attn = SimpleNamespace(
            qkv_proj=_lin(torch.cat([lw.q_w, lw.k_w, lw.v_w]), qkv_b), o_proj=_lin(lw.o_w),
            q_size=c.num_heads * c.head_dim, kv_size=c.num_kv_heads * c.head_dim, head_dim=c.head_dim,
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, rotary_emb=rotary,
        )
        mlp = SimpleNamespace(gate_up_proj=_lin(torch.cat([lw.gate_w, lw.up_w])), down_proj=_lin(lw.down_w))
        layers.append(SimpleNamespace(
            self_attn=attn, mlp=mlp,
            input_layernorm=SimpleNamespace(weight=lw.ln1, variance_epsilon=c.rms_eps),
            post_attention_layernorm=SimpleNamespace(weight=lw.ln2, variance_epsilon=c.rms_eps),
        ))
    pad = (-w.lm_head.shape[0]) % 64
    lm_head = torch.cat([w.lm_head, torch.zeros(pad, w.lm_head.shape[1])])
    model = type(arch_name, (), {})()
    model.config = SimpleNamespace(**cfg)
    model.model = SimpleNamespace(embed_tokens=_lin(w.embed), layers=layers, norm=_lin(w.norm))
    model.lm_head = _lin(lm_head)
    return model


@pytest.mark.parametrize("name", BLEND_MODELS)
def test_from_vllm_model_standin(model_dirs, name):
    w = load_hf_weights(model_dirs[name])
    cfg = json.loads((model_dirs[name] / "config.json").read_text())
    arch = cfg["architectures"][0]
    wv = from_vllm_model(_vllm_standin(w, arch, cfg))
    ids = _ids(w)
    logits, kv = prefill(w, ids)
    logits_v, kv_v = prefill(wv, ids)
    # Not bit-equal: views into the merged tensors start at other alignments, so the CPU matmul
    # may take another vector path.
    assert (logits - logits_v).abs().max().item() < 1e-5
    assert _kv_rel_err(kv_v, kv) < 1e-6
    # A tensor-parallel shard (half the heads on this rank) is refused.
    model = _vllm_standin(w, arch, cfg)
    for layer in model.model.layers:
        layer.self_attn.num_heads //= 2
    with pytest.raises(BlendUnsupported, match="tensor parallelism"):
        from_vllm_model(model)


def _attention_f64(q, qp, k, v, kp):
    """Plain softmax attention in float64, causal by position, GQA by head groups."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("nhd,shd->hns", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~(kp[None, None, :] <= qp[None, :, None]), float("-inf"))
    return torch.einsum("hns,shd->nhd", s.softmax(-1), v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("case", ["causal_all", "sorted_subset", "unsorted_subset"])
def test_attention_paths_match_float64(case):
    """The three attention paths of the reference forward (plain causal, a position-sorted
    subset split into query groups, a general masked call) against float64 softmax attention.
    Sizes make the grouped path run several groups (300 queries, 128 a group)."""
    from lmcache_triton.blend import model as m

    g = torch.Generator().manual_seed(0)
    s, h, hk, d = 701, 4, 2, 32
    k, v = torch.randn(s, hk, d, generator=g), torch.randn(s, hk, d, generator=g)
    kp = torch.arange(s) + 5
    if case == "causal_all":
        qp = kp.clone()
    else:
        qp = torch.sort(torch.randperm(s, generator=g)[:300]).values + 5
        if case == "unsorted_subset":
            qp = qp[torch.randperm(300, generator=g)]
    assert case != "sorted_subset" or qp.numel() >= 2 * m._QUERY_GROUP
    q = torch.randn(qp.numel(), h, d, generator=g)
    got = m.attention(q, qp, k, v, kp)
    want = _attention_f64(q, qp, k, v, kp)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-5, f"{case}: max error {err:.2e}"
