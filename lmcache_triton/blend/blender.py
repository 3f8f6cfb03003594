"""CacheBlend prefill: reuse the KV of non-prefix segments, recompute only the tokens that matter.

A prompt is a run of spans, some of them cached segments (documents whose KV was computed when the
segment was prefilled alone, at positions `0..n-1`), the rest fresh text (separators, the
question). `blend_prefill` produces the per-layer KV of the whole prompt and the last token's
logits, recomputing only a `ratio` fraction of the cached tokens:

 1. Re-rotate. Cached K was RoPE'd at `src_positions` (default `0..n-1`); `rerotate_k` moves it to
    the positions the segment occupies now (`R(dst) R(src)^-1 = R(dst - src)`). V is reused as is.
    The blended KV of every layer starts as: re-rotated cached K/V on cached tokens, empty
    elsewhere.
 2. Layers before the first check layer: Q/K/V for all tokens (every hidden state is needed to
    reach the check layer), and since every token is computed there, the fresh K/V of every
    token replace the cached rows (no extra cost); every token attends over that KV. With the
    check layer at 1 this changes nothing measurable (layer-0 K/V depend only on the token and
    its position); at a deeper check layer it keeps the tokens' hidden states exact up to it,
    so ratio 1 equals a full prefill at any check layer.
 3. Check layer(s): fresh Q/K/V for every token still carried; `token_deviation` (squared L2 of
    K and V across heads) between fresh and cached on the carried cached tokens; `select_tokens`
    keeps the `ceil(ratio * num_cached)` most deviating ones. The recompute set becomes the kept
    cached tokens, every non-cached token, and the last token (its query gives the logits).
    Dropped tokens keep their cached K/V from this layer on; recomputed ones get fresh K/V.
 4. Later layers: Q/K/V, attention (over the blended KV of ALL tokens, causal by position), o_proj
    and MLP only for the recompute set; its fresh K/V overwrite the cached rows.

Invariants (asserted in tests/test_blend_algorithm.py):
  * ratio 1 reproduces a full prefill (KV and logits) up to float rounding at any check layer:
    every token is computed, and its fresh K/V used, on every layer.
  * ratio 0 is full reuse: only non-cached tokens (and the last token) are recomputed.
  * Non-cached tokens are recomputed on every layer; a cached token once dropped is never
    recomputed again (later check layers only choose among the tokens still carried, with their
    own ratio, so a smaller ratio there shrinks the set further).
  * The KV returned for cached, non-recomputed tokens is the re-rotated cached KV (cast to the
    weights' dtype), bit for bit what a connector would write anyway.

Cost: `computed_token_layers = T * first_check + sum over later layers of |recompute set|`; the
FLOP proxy `flop_fraction = computed_token_layers / (L * T)` ignores that attention of the
recomputed queries still reads all T keys.

vLLM integration (integration/vllm/blend_scheduler.py and blend_worker.py, not here): the worker builds
`from_vllm_model(model)` once (views, no copy); for a planned blend it reads each segment's K/V
rows out of the prefix chunks that hold them (a document sent alone, or a separated segment of
an earlier prompt, at the positions recorded with it), calls `blend_prefill`, and writes rows
`0..T-2` of `kv[i]` into layer i's paged cache through the request's slot mapping; the scheduler
reports `T - 1` external tokens so that vLLM itself computes the last token over the blended KV
(the same computation `blend_prefill` does for it, so `logits_last` is only a cross-check).

Tensor parallelism: not here (the reference forward refuses TP); a TP version must all-reduce the
`[T]` deviation across ranks before selecting (see kernels/blend.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.blend import select_tokens, token_deviation
from ..kernels.reference import num_selected_tokens
from ..kernels.rope import rerotate_k
from .model import (
    TransformerWeights,
    attention,
    attention_layout,
    embed,
    final_logits,
    layer_out,
    layer_qkv,
    prefill,
)

__all__ = ["BlendResult", "SegmentKV", "blend_prefill", "prefill_segment"]


@dataclass
class SegmentKV:
    """A cached segment placed in the prompt.

    Attributes:
        start, end: half-open span `[start, end)` of the segment in the prompt's tokens.
        kv: per layer `(K, V)`, each `[end - start, H_kv, D]`; K post-RoPE at `src_positions`.
        src_positions: `[end - start]` int positions the KV was computed at; default None =
            `0..n-1` (the segment prefilled alone).
    """

    start: int
    end: int
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    src_positions: torch.Tensor | None = None


@dataclass
class BlendResult:
    """What `blend_prefill` returns.

    Attributes:
        logits_last: `[vocab_size]` logits of the prompt's last token.
        kv: per layer `(K, V)` `[T, H_kv, D]` for all tokens (K post-RoPE at the prompt positions).
        recompute_idx: `[R]` int64 sorted prompt indices recomputed on the layers after the last
            check layer (kept cached tokens, non-cached tokens, the last token).
        cached_idx: `[C]` int64 sorted prompt indices covered by cached segments.
        selected: per check layer, `[k]` sorted prompt indices of the cached tokens kept there.
        deviation: per check layer, `[n]` fp32 deviation of the cached tokens still carried
            into it (aligned with `candidates`).
        candidates: per check layer, `[n]` prompt indices scored there.
        computed_token_layers: token-layer steps run (see the module's cost note).
        num_layers: L.
        recomputed_cached: cached tokens in `recompute_idx` (known on the host).
    """

    logits_last: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    recompute_idx: torch.Tensor
    cached_idx: torch.Tensor
    selected: list[torch.Tensor] = field(default_factory=list)
    deviation: list[torch.Tensor] = field(default_factory=list)
    candidates: list[torch.Tensor] = field(default_factory=list)
    computed_token_layers: int = 0
    num_layers: int = 0
    recomputed_cached: int = 0

    @property
    def num_tokens(self) -> int:
        return self.kv[0][0].shape[0]

    @property
    def recompute_fraction(self) -> float:
        """Recomputed tokens after the last check layer / all tokens."""
        return self.recompute_idx.numel() / self.num_tokens

    @property
    def flop_fraction(self) -> float:
        """Token-layer steps run / those of a full prefill (`L * T`)."""
        return self.computed_token_layers / (self.num_layers * self.num_tokens)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`; host to CUDA through pinned memory, asynchronously (a pageable copy makes
    the host wait for it). The pinned staging comes from torch's caching host allocator, which
    keeps it until the copy has run."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_host(x: torch.Tensor) -> np.ndarray:
    """`x` as a host array: a device-to-host copy, which waits for the device. A blend calls it
    once per check layer (the size of the recompute set); tests count the calls."""
    return x.cpu().numpy()


def prefill_segment(w: TransformerWeights, token_ids: torch.Tensor, start: int, end: int) -> SegmentKV:
    """Prefill `token_ids[start:end]` alone at positions `0..n-1` and wrap its KV as the segment
    at `[start, end)` of the prompt: what a cache would have stored for that document."""
    seg = torch.as_tensor(token_ids)[start:end]
    _, kv = prefill(w, seg)
    return SegmentKV(start, end, kv)


def _check_segments(w: TransformerWeights, t: int, segments: Sequence[SegmentKV]) -> list[SegmentKV]:
    c = w.config
    segs = sorted(segments, key=lambda s: s.start)
    prev_end = 0
    for s in segs:
        n = s.end - s.start
        if not (0 <= s.start < s.end <= t):
            raise ValueError(f"segment [{s.start}, {s.end}) is empty or outside the prompt ({t} tokens)")
        if s.start < prev_end:
            raise ValueError(f"segment [{s.start}, {s.end}) overlaps the previous one ending at {prev_end}")
        prev_end = s.end
        if len(s.kv) != w.num_layers:
            raise ValueError(
                f"segment [{s.start}, {s.end}) has KV for {len(s.kv)} layers, model has {w.num_layers}"
            )
        want = (n, c.num_kv_heads, c.head_dim)
        for i, (k, v) in enumerate(s.kv):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(
                    f"segment [{s.start}, {s.end}) layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)}, "
                    f"want {want}"
                )
        if s.src_positions is not None and tuple(s.src_positions.shape) != (n,):
            raise ValueError(f"segment [{s.start}, {s.end}): src_positions must be [{n}]")
    return segs


@torch.inference_mode()
def blend_prefill(
    w: TransformerWeights,
    token_ids: torch.Tensor,
    segments: Sequence[SegmentKV],
    *,
    ratio: float | Sequence[float] = 0.15,
    check_layers: Sequence[int] = (1,),
    positions: torch.Tensor | None = None,
    deviation_on: str = "kv",
    select_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    causal_attention: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> BlendResult:
    """CacheBlend prefill of one prompt (see the module docstring for the algorithm).

    Args:
        w: the model (`load_hf_weights` / `from_vllm_model`).
        token_ids: `[T]` prompt token ids.
        segments: cached segments placed in the prompt (disjoint spans, any order); tokens outside
            them are always recomputed.
        ratio: fraction of the cached tokens to recompute, in `[0, 1]`; one value for every check
            layer or one per check layer (later ones choose among the tokens still carried).
            Default 0.15 (the paper's).
        check_layers: layers where tokens are scored and selected, ascending, each in `[0, L)`.
            Default `(1,)`.
        positions: `[T]` prompt positions; default None = `0..T-1`.
        deviation_on: `"kv"` (default) scores K and V together, `"k"` K only (LMCache v1),
            `"v"` V only (the paper); see kernels/blend.py for the choice.
        select_fn: for ablations only: `(deviation [n], budget k) -> [k]` row indices replacing
            `select_tokens` (e.g. a random choice, to see what the deviation ranking buys).
            Default None.
        causal_attention: `(layer, q [T, H, D], k [T, H_kv, D], v [T, H_kv, D]) -> [T, H * D]`,
            plain causal attention of ALL tokens at positions `0..T-1`, used for the layers
            before the first check layer instead of `model.attention` (the connector passes vLLM's
            own CPU attention kernel, which also writes those K/V into the request's pages).
            Only used when `positions` is None. Default None.

    Returns:
        `BlendResult`.
    """
    dev_ = w.device
    token_ids = to_device(torch.as_tensor(token_ids), dev_)
    t = token_ids.shape[0]
    num_layers = w.num_layers
    pos = torch.arange(t, device=dev_) if positions is None else positions.to(dev_)
    checks = list(check_layers)
    if not checks or checks != sorted(set(checks)) or not all(0 <= c < num_layers for c in checks):
        raise ValueError(f"check_layers must be ascending, distinct, in [0, {num_layers}): got {checks}")
    ratios = [float(ratio)] * len(checks) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(checks) or not all(0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"ratio must be in [0, 1], one value or one per check layer: got {ratio}")
    if deviation_on not in ("k", "v", "kv"):
        raise ValueError(f"deviation_on must be 'k', 'v' or 'kv', got {deviation_on!r}")
    segs = _check_segments(w, t, segments)

    # What the segments cover is known on the host: built there and copied once, asynchronously
    # (a `nonzero` on the device would wait for everything queued before it).
    # (Host bookkeeping in numpy: nothing in it can touch the device.)
    cached_host = np.zeros(t, dtype=np.bool_)
    for s in segs:
        cached_host[s.start : s.end] = True
    cached_idx_host = np.flatnonzero(cached_host)
    cached = to_device(torch.from_numpy(cached_host), dev_)
    cached_idx = to_device(torch.from_numpy(cached_idx_host), dev_)
    n_cached = int(cached_idx_host.size)
    n_fresh = t - n_cached  # tokens no segment covers: computed on every layer

    # 1. Blended KV per layer: re-rotated cached rows, the rest filled as tokens are computed.
    c = w.config
    shape = (t, c.num_kv_heads, c.head_dim)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if segs:
        src = to_device(torch.cat([
            torch.arange(s.end - s.start) if s.src_positions is None else s.src_positions.cpu()
            for s in segs
        ]).to(torch.int64), dev_)
        dst = pos[cached_idx].to(torch.int64)
    for i in range(num_layers):
        k_all = torch.zeros(shape, dtype=w.dtype, device=dev_)
        v_all = torch.zeros(shape, dtype=w.dtype, device=dev_)
        if segs:
            # One re-rotation per layer over all segments (concatenated in prompt order).
            k_c = to_device(torch.cat([s.kv[i][0] for s in segs]), dev_).to(w.dtype)
            k_all[cached_idx] = rerotate_k(k_c, src, dst, rotary_dim=c.rotary_dim,
                                           is_neox=c.is_neox_style, inv_freq=w.inv_freq)
            v_all[cached_idx] = to_device(torch.cat([s.kv[i][1] for s in segs]), dev_).to(w.dtype)
        kv.append((k_all, v_all))

    result = BlendResult(logits_last=torch.empty(0), kv=kv, recompute_idx=torch.empty(0),
                         cached_idx=cached_idx, num_layers=num_layers)
    active = torch.arange(t, device=dev_)  # prompt indices whose hidden state is carried
    # The same on the host, known without asking the device: all tokens until the first check,
    # then what each check kept (its one device-to-host copy).
    active_host = np.arange(t, dtype=np.int64)
    h = embed(w, token_ids)
    for i in range(num_layers):
        q, k, v = layer_qkv(w, i, h, pos[active])
        if i in checks:
            # 3. Score the carried cached tokens, keep the most deviating ones.
            r = ratios[checks.index(i)]
            is_c = cached[active]
            n_cand = int(active_host.size) - n_fresh  # every fresh token is carried
            cand_rows = torch.nonzero_static(is_c, size=n_cand).flatten()  # fixed size: no sync
            cand = active[cand_rows]
            keep_rows = torch.empty(0, dtype=torch.int64, device=dev_)
            if n_cand:
                k_cached, v_cached = kv[i][0][cand], kv[i][1][cand]
                k_fresh, v_fresh = k[cand_rows], v[cand_rows]
                if deviation_on == "kv":
                    d = token_deviation(torch.stack([k_cached, v_cached]), torch.stack([k_fresh, v_fresh]))
                elif deviation_on == "k":
                    d = token_deviation(k_cached, k_fresh)
                else:
                    d = token_deviation(v_cached, v_fresh)
                # Budget counted on all cached tokens of the prompt, chosen among the candidates.
                budget = min(num_selected_tokens(n_cached, r, always_last=False), n_cand)
                if select_fn is not None:
                    keep_rows = torch.sort(select_fn(d, budget).to(device=dev_, dtype=torch.int64)).values
                else:
                    keep_rows = select_tokens(d, budget / n_cand, min_tokens=0, always_last=False)
                result.deviation.append(d)
            else:
                result.deviation.append(torch.empty(0, device=dev_))
            result.candidates.append(cand)
            result.selected.append(cand[keep_rows])
            keep = ~is_c
            keep[cand_rows[keep_rows]] = True
            keep[-1] = True  # active is sorted and always holds T - 1: its logits are the output
            # The check's one host sync: how many rows it keeps (whether T - 1 was among the
            # selected depends on the deviations), and which, for the host's copy of `active`.
            rows_host = np.flatnonzero(to_host(keep))
            rows = to_device(torch.from_numpy(rows_host), dev_)
            active_host = active_host[rows_host]
            active, h, q, k, v = (x.index_select(0, rows) for x in (active, h, q, k, v))
        # 2./4. Fresh K/V of every token computed on this layer into the blended KV: before the
        # first check that is every token (computed anyway to reach it), afterwards the
        # recompute set. Cached rows survive only where a token is no longer computed.
        kv[i][0][active] = k
        kv[i][1][active] = v
        if causal_attention is not None and positions is None and active_host.size == t:
            o = causal_attention(i, q, k, v)
        elif positions is None:
            # Positions 0..T-1 and `active` ascending, known on the host: the attention's layout
            # needs no device check (`attention_layout`).
            o = attention(q, pos[active], kv[i][0], kv[i][1], pos, layout=attention_layout(active_host, t))
        else:
            o = attention(q, pos[active], kv[i][0], kv[i][1], pos)
        h = layer_out(w, i, h, o)
        result.computed_token_layers += int(active_host.size)

    result.recompute_idx = active
    result.recomputed_cached = int(cached_host[active_host].sum())  # host tensors: no sync
    result.logits_last = final_logits(w, h[-1:])[0]
    return result
