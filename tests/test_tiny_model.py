"""The locally built tiny model: deterministic, cached, loadable (no vLLM engine here).

The engine-level check lives in scripts/smoke_tiny_model.py and the e2e tests.
"""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lmcache_triton.testing import build_tiny_model, sample_prompt
from lmcache_triton.testing.tiny_model import BUILD_FILE, MODEL_FILES, SUPPORTED_HEAD_SIZES

ARCHS = ["llama", "qwen2"]
# qwen2 in vLLM takes head_size = hidden // heads, so its width must give a supported head.
SPECS = {
    "llama": {"arch": "llama"},  # 64 / 4 = 16 -> rounded up to 32 via head_dim
    "qwen2": {"arch": "qwen2", "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2},
}
PROMPT_LENGTHS = [1, 63, 500]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **SPECS[request.param])


def test_files_and_build_record(model_dir):
    for name in (*MODEL_FILES, BUILD_FILE):
        assert (model_dir / name).is_file(), name
    rec = json.loads((model_dir / BUILD_FILE).read_text())
    assert rec["params"]["head_size"] in SUPPORTED_HEAD_SIZES
    assert len(rec["params_hash"]) == 64


def test_weights_names_shapes_and_scale(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_file(str(model_dir / "model.safetensors"))
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head
    want = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        want.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if cfg["model_type"] == "qwen2":
            want.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                         p + "self_attn.v_proj.bias": (kv,)})
    assert {k: tuple(t.shape) for k, t in w.items()} == want
    assert all(t.dtype == torch.float32 for t in w.values())
    assert torch.equal(w["model.norm.weight"], torch.ones(h))
    std = w["lm_head.weight"].std().item()
    assert abs(std - cfg["initializer_range"]) < 0.01, f"lm_head std {std}"


def test_tokenizer_roundtrip_and_specials(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    cfg = json.loads((model_dir / "config.json").read_text())
    assert tok.get_vocab_size() == cfg["vocab_size"]
    assert 1000 < cfg["vocab_size"] <= 4096
    assert tok.token_to_id("<s>") == cfg["bos_token_id"]
    assert tok.token_to_id("</s>") == cfg["eos_token_id"]
    text = "Alice reads a long book, 1234 times; café ünïcode!"
    enc = tok.encode(text)
    assert enc.ids[0] == cfg["bos_token_id"]
    assert tok.decode(enc.ids) == text


@pytest.mark.parametrize("num_tokens", PROMPT_LENGTHS, ids=lambda n: f"{n}tok")
def test_sample_prompt_length_and_determinism(model_dir, num_tokens):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    p = sample_prompt(model_dir, num_tokens, seed=5)
    assert p == sample_prompt(model_dir / "tokenizer.json", num_tokens, seed=5)
    assert p != sample_prompt(model_dir, num_tokens, seed=6) or num_tokens == 1
    n = len(tok.encode(p, add_special_tokens=False).ids)
    assert abs(n - num_tokens) <= 2, f"wanted {num_tokens}, got {n}"


def test_deterministic_and_cached(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=1)
    b = build_tiny_model(tmp_path / "b", seed=1)
    for name in MODEL_FILES:
        assert _digest(a / name) == _digest(b / name), name
    # Cached: a second call with equal parameters rewrites nothing.
    mtimes = {n: os.stat(a / n).st_mtime_ns for n in MODEL_FILES}
    assert build_tiny_model(tmp_path / "a", seed=1) == a
    assert {n: os.stat(a / n).st_mtime_ns for n in MODEL_FILES} == mtimes
    # Other parameters (or force) rebuild in place.
    build_tiny_model(tmp_path / "a", seed=2)
    assert _digest(a / "model.safetensors") != _digest(b / "model.safetensors")
    build_tiny_model(tmp_path / "a", seed=1, force=True)
    assert _digest(a / "model.safetensors") == _digest(b / "model.safetensors")
    # A build missing its record (interrupted) is not taken as complete.
    (a / BUILD_FILE).unlink()
    build_tiny_model(tmp_path / "a", seed=1)
    assert (a / BUILD_FILE).is_file()


def test_bad_head_sizes_raise(tmp_path):
    with pytest.raises(ValueError, match="qwen2"):
        build_tiny_model(tmp_path / "q", arch="qwen2")  # 64 / 4 = 16, unsupported
    with pytest.raises(ValueError, match="head_size=48"):
        build_tiny_model(tmp_path / "l", head_size=48)


def test_transformers_loads(model_dir):
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed; the files were checked above"
    )
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    ids = tok("Alice reads a book.")["input_ids"]
    assert ids[0] == cfg.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Alice reads a book."
    assert len(tok) == cfg.vocab_size
