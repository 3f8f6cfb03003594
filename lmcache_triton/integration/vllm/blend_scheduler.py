"""CacheBlend's scheduler half: finds the cached segments of prompts, plans blends, remembers
separated segments (blend_connector.py says where a segment's KV comes from)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lmcache_triton.blend.segments import segment_hashes, split_segments
from lmcache_triton.config import ConfigError
from lmcache_triton.integration.vllm.blend_connector import (
    GUARD_ENV,
    MAX_COST_FRACTION,
    MAX_POINTERS,
    blend_unsupported_reason,
    estimate_blend_cost,
    with_extra,
)
from lmcache_triton.integration.vllm.metadata import BlendOp, LMCacheTritonMetadata, SegmentRef

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from lmcache_triton.integration.vllm.scheduler import RequestState, SchedulerConnector

logger = logging.getLogger("lmcache_triton")


class Tokenizer(Protocol):
    """What the planner needs of the model's tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class _PromptInfo:
    plan: list[SegmentRef] = field(default_factory=list)  # covered segments of this prompt
    keys: list[tuple[bytes, int, int]] = field(default_factory=list)  # text segments (key, s, e)
    blended: bool = False
    registered: bool = False


class BlendScheduler:
    """Finds the cached segments of prompts, plans blends, remembers separated segments.

    Args:
        impl: the connector's scheduler side (`index`, `planner`, `block_size`, `config`,
            `request_extra_keys`).
        tokenizer: the model's tokenizer (`encode`, `bos_token_id`).
        num_layers: the model's decoder layers (for the cost guard).
    """

    def __init__(self, impl: SchedulerConnector, tokenizer: Tokenizer, num_layers: int):
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
            key = with_extra(key, extra)
            info.keys.append((key, s, e))
            if j == len(text) - 1:
                continue  # the last text span is the question: never reused
            cands = [c for c in (self._pointer(key, s), self._alone(tokens[s:e], s, extra)) if c is not None]
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
        info = self._analyse(tokens, self.impl.request_extra_keys(rid))  # the cache changes
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

    def plan_blend(self, req_id: str, st: RequestState, meta: LMCacheTritonMetadata) -> bool:
        """Put the blend of a newly scheduled request in `meta`; True when it was blended (the
        caller drops its prefix load plan then)."""
        plan = self._ready.pop(req_id, None)
        if plan is None:
            return False
        info = self._info[req_id]
        # Blocks of all T tokens: the blend writes rows 0..T-2; the last token's block is also
        # the page vLLM's attention kernel reads when the blend runs layer 0 through it.
        n_blocks = (st.prompt_len + self.impl.block_size - 1) // self.impl.block_size
        tokens = list(self._tokens.pop(req_id))
        meta.blends[req_id] = BlendOp(tokens, list(st.block_ids[:n_blocks]), list(plan))
        st.num_handled = len(st.spans)  # blended KV is approximate: never stored as prefix chunks
        info.blended = True
        return True

    def after_alloc(self, request: Request, num_external_tokens: int) -> bool:
        """Returns True when the request's external tokens are a blend (not prefix chunks)."""
        if num_external_tokens <= 0:
            self._ready.pop(request.request_id, None)
        elif request.request_id in self._ready:
            self._tokens[request.request_id] = list(request.prompt_token_ids or [])
            return True
        return False

    def register_segments(self, req_id: str, st: RequestState, computed: int) -> None:
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


def make_blend_scheduler(impl: SchedulerConnector) -> BlendScheduler | None:
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
