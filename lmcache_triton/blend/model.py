"""A plain-PyTorch reference forward of Llama / Qwen2 / Qwen3 decoders, split into the layer steps
CacheBlend needs.

vLLM runs the real model; CacheBlend must re-run parts of it on a subset of tokens against a KV
that mixes reused and fresh entries, which vLLM's fused forward cannot express. This module holds
the same math, written so each layer can be run on any subset of tokens:

    h = embed(w, ids)                                         # [T, hidden]
    for i, lw in enumerate(w.layers):
        q, k, v = layer_qkv(w, i, h, positions)              # K post-RoPE, as vLLM caches it
        ... the caller chooses the KV each query attends over ...
        o = attention(q, positions, k_all, v_all, kv_positions)  # causal by position
        h = layer_out(w, i, h, o)                            # o_proj + residual + MLP + residual
    logits = final_logits(w, h[-1:])

`prefill` chains these over all tokens (a full prefill). The blender (`blender.py`) chains them
over shrinking token subsets.

Weights live in `TransformerWeights` (`weights.py`, re-exported here), a plain structure filled
either from an HF model directory (`load_hf_weights`) or from vLLM's loaded modules
(`from_vllm_model`, which splits vLLM's merged `qkv_proj` / `gate_up_proj`). Anything the forward
cannot reproduce exactly (other architectures, sliding windows, yarn/dynamic RoPE, tensor
parallelism, quantised weights) raises `BlendUnsupported` rather than computing something subtly
different.

Invariants:
  * Every layer step is row-wise in its query tokens except attention, whose keys are passed
    explicitly: running a step on a subset of rows gives those rows of the full run (up to matmul
    blocking, ~1e-6 relative in fp32).
  * K is stored post-RoPE (and post-k_norm for Qwen3), NeoX layout, exactly what vLLM writes to
    its paged cache; V carries no position.
  * RoPE angles are `pos * inv_freq` in fp32 (as HF and vLLM compute them) whatever the weights'
    dtype; everything else runs in the weights' dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .weights import (
    BlendUnsupported,
    LayerWeights,
    ModelConfig,
    TransformerWeights,
    from_vllm_model,
    load_hf_weights,
)

__all__ = [
    "BlendUnsupported",
    "LayerWeights",
    "ModelConfig",
    "TransformerWeights",
    "apply_rope",
    "attention",
    "embed",
    "final_logits",
    "from_vllm_model",
    "layer_out",
    "layer_qkv",
    "load_hf_weights",
    "prefill",
]


# --------------------------------------------------------------------------------------------
# Layer steps
# --------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF and vLLM normalise in fp32 and multiply by the weight after casting back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [T, D/2]
    return ang.cos().to(dtype)[:, None, :], ang.sin().to(dtype)[:, None, :]


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, cos_sin=None
) -> torch.Tensor:
    """NeoX RoPE of `x` `[T, H, D]` at `positions` `[T]`; angle `pos * inv_freq` in fp32.
    `cos_sin`: the `(cos, sin)` tables of these positions when already computed (Q and K share)."""
    cos, sin = _cos_sin(positions, inv_freq, x.dtype) if cos_sin is None else cos_sin
    half = inv_freq.shape[0]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if 2 * half < x.shape[-1]:
        out = torch.cat([out, x[..., 2 * half :]], dim=-1)
    return out


def embed(w: TransformerWeights, token_ids: torch.Tensor) -> torch.Tensor:
    """`[T]` int ids -> `[T, hidden]` hidden states (the residual stream entering layer 0)."""
    return F.embedding(token_ids.to(w.device), w.embed)


def layer_qkv(
    w: TransformerWeights, i: int, h: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of layer `i` for the rows of `h`.

    Args:
        w: the model.
        i: layer index.
        h: `[N, hidden]` residual stream entering layer i for N tokens (any subset).
        positions: `[N]` their positions.

    Returns:
        q `[N, H, D]`, k `[N, H_kv, D]` (post q/k-norm and RoPE: what vLLM caches), v `[N, H_kv, D]`.
    """
    c, lw = w.config, w.layers[i]
    x = _rms_norm(h, lw.ln1, c.rms_eps)
    n = x.shape[0]
    if lw.mm is not None:
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = lw.mm["qkv"](x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(n, c.num_heads, c.head_dim)
        k = k.reshape(n, c.num_kv_heads, c.head_dim)
        v = v.reshape(n, c.num_kv_heads, c.head_dim)
    else:
        q = F.linear(x, lw.q_w, lw.q_b).view(n, c.num_heads, c.head_dim)
        k = F.linear(x, lw.k_w, lw.k_b).view(n, c.num_kv_heads, c.head_dim)
        v = F.linear(x, lw.v_w, lw.v_b).view(n, c.num_kv_heads, c.head_dim)
    if lw.q_norm is not None:
        q = _rms_norm(q, lw.q_norm, c.rms_eps)
    if lw.k_norm is not None:
        k = _rms_norm(k, lw.k_norm, c.rms_eps)
    pos = positions.to(x.device)
    cs = _cos_sin(pos, w.inv_freq, q.dtype)
    return apply_rope(q, pos, w.inv_freq, cs), apply_rope(k, pos, w.inv_freq, cs), v


# Queries per attention call over a position-sorted subset (see `attention`). Measured, 656
# spread queries over 4094 keys, 8 heads of 64, 2 threads: one call 38 ms, groups of 256 27 ms,
# 128 27 ms, 64 23.5 ms, 32 22.8 ms (a full causal layer of 4094 queries: 109 ms).
_QUERY_GROUP = 64


def attention_layout(q_rows: np.ndarray, num_keys: int) -> str | list[int]:
    """`attention`'s `layout` for queries at host-known positions `q_rows` (ascending, `[N]`, a
    host array) over keys at positions `0..num_keys-1`: "causal", the key ends of the query
    groups, or "mask"."""
    n = len(q_rows)
    if n == num_keys:
        return "causal"
    if n >= 2 * _QUERY_GROUP:
        return [int(q_rows[min(a + _QUERY_GROUP, n) - 1]) + 1 for a in range(0, n, _QUERY_GROUP)]
    return "mask"


def attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_positions: torch.Tensor,
    layout: str | list[int] | None = None,
) -> torch.Tensor:
    """GQA attention, causal by position: query t sees key s iff `kv_positions[s] <= q_positions[t]`.

    Args:
        q: `[N, H, D]` queries. q_positions: `[N]`.
        k, v: `[S, H_kv, D]` keys (post-RoPE) and values of every token that may be attended.
        kv_positions: `[S]`.
        layout: what the caller knows on the host, so nothing is checked on the device (each
            check waits for it on a GPU): "causal" (the queries are the keys, in position
            order), a list of key ends per group of `_QUERY_GROUP` queries (both in position
            order), or "mask"; `attention_layout` computes it. Default None: checked here.

    Returns:
        `[N, H * D]` attention output (before o_proj).
    """
    n, h, d = q.shape
    qp, kp = q_positions.to(q.device), kv_positions.to(q.device)
    # [1, H, N, D] / [1, H_kv, S, D] views: torch's CPU flash kernel needs the batch dimension (3-D
    # inputs take the math path: 4k tokens, 8 heads of 64, one thread: 1.17 s vs 0.21 s causal).
    qt, kt, vt = (x[None].transpose(1, 2) for x in (q, k, v))
    gqa = h != k.shape[1]  # query head j reads KV head j // (H / H_kv) (HF repeat_kv / vLLM's GQA)
    if layout is not None:
        return _attention_in(layout, qt, kt, vt, qp, kp, d, gqa)
    if n == k.shape[0] and (n < 2 or bool((kp[1:] > kp[:-1]).all())) and torch.equal(qp, kp):
        # Every token attends over every token, in position order: plain causal attention, which
        # the flash kernel runs without a mask and skips the upper triangle (0.21 s vs 0.47 s with
        # the equivalent boolean mask).
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=d**-0.5, enable_gqa=gqa)
    elif n >= 2 * _QUERY_GROUP and bool((kp[1:] > kp[:-1]).all()) and bool((qp[1:] >= qp[:-1]).all()):
        # A subset of queries in position order (CacheBlend's recompute set) over keys in position
        # order: each group of queries reads only the keys up to its last position, which skips
        # most of the masked-out half (the kernel does not skip masked blocks by itself).
        outs = []
        for a in range(0, n, _QUERY_GROUP):
            b = min(a + _QUERY_GROUP, n)
            end = int(torch.searchsorted(kp, qp[b - 1], right=True))
            mask = kp[None, :end] <= qp[a:b, None]
            outs.append(F.scaled_dot_product_attention(
                qt[:, :, a:b], kt[:, :, :end], vt[:, :, :end], attn_mask=mask, scale=d**-0.5, enable_gqa=gqa))
        out = torch.cat(outs, dim=2)
    else:
        mask = kp[None, :] <= qp[:, None]  # [N, S]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=d**-0.5, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(n, h * d)


def _attention_in(layout, qt, kt, vt, qp, kp, d: int, gqa: bool) -> torch.Tensor:
    """`attention`'s three cases, chosen by the caller's host-known `layout` (same results)."""
    n, h = qt.shape[2], qt.shape[1]
    if layout == "causal":
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=d**-0.5, enable_gqa=gqa)
    elif isinstance(layout, list):
        outs = []
        for g, a in enumerate(range(0, n, _QUERY_GROUP)):
            b, end = min(a + _QUERY_GROUP, n), layout[g]
            mask = kp[None, :end] <= qp[a:b, None]
            outs.append(F.scaled_dot_product_attention(
                qt[:, :, a:b], kt[:, :, :end], vt[:, :, :end], attn_mask=mask, scale=d**-0.5, enable_gqa=gqa))
        out = torch.cat(outs, dim=2)
    else:
        mask = kp[None, :] <= qp[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=d**-0.5, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(n, h * d)


def layer_out(w: TransformerWeights, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Finish layer `i` for the rows of `h`: o_proj, residual, MLP, residual.

    Args:
        h: `[N, hidden]` residual stream entering layer i. attn_out: `[N, H * D]` from `attention`.

    Returns:
        `[N, hidden]` residual stream leaving layer i.
    """
    c, lw = w.config, w.layers[i]
    if lw.mm is not None:
        h = h + lw.mm["o"](attn_out)
        x = _rms_norm(h, lw.ln2, c.rms_eps)
        gate, up = lw.mm["gate_up"](x).chunk(2, dim=-1)
        return h + lw.mm["down"](F.silu(gate) * up)
    h = h + F.linear(attn_out, lw.o_w, lw.o_b)
    x = _rms_norm(h, lw.ln2, c.rms_eps)
    return h + F.linear(F.silu(F.linear(x, lw.gate_w)) * F.linear(x, lw.up_w), lw.down_w)


def final_logits(w: TransformerWeights, h: torch.Tensor) -> torch.Tensor:
    """`[N, hidden]` -> `[N, vocab_size]` logits (vLLM's lm_head padding rows dropped)."""
    x = _rms_norm(h, w.norm, w.config.rms_eps)
    return F.linear(x, w.lm_head[: w.config.vocab_size])


@torch.inference_mode()
def prefill(
    w: TransformerWeights, token_ids: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Full prefill of one sequence.

    Args:
        w: the model.
        token_ids: `[T]` int ids.
        positions: `[T]` positions; default None = `0..T-1`.

    Returns:
        (logits of the last token `[vocab_size]`, per-layer `(K, V)` each `[T, H_kv, D]`, K post-RoPE).
    """
    token_ids = torch.as_tensor(token_ids, device=w.device)
    t = token_ids.shape[0]
    pos = torch.arange(t, device=w.device) if positions is None else positions.to(w.device)
    h = embed(w, token_ids)
    kv = []
    for i in range(w.num_layers):
        q, k, v = layer_qkv(w, i, h, pos)
        kv.append((k, v))
        h = layer_out(w, i, h, attention(q, pos, k, v, pos))
    return final_logits(w, h[-1:])[0], kv
