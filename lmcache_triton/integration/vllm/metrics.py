"""The connector's counters: vLLM's stats interval (`LMCacheTritonStats`) and /metrics
(`LMCacheTritonPromMetrics`, `vllm:lmcache_triton_<name>_total`).

The per-tier counters (`loaded_chunks_<tier>`) come from the tier list (tiers.py), not from a
table of names written here: a new tier gets its counter by being registered.

Primitives:
  `counters()`   the Prometheus counters: name -> help text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from lmcache_triton.integration.vllm.tiers import CPU_TIER, slow_tiers

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_COUNTERS = {
    "loaded_tokens": "Tokens whose KV was loaded from lmcache_triton",
    "loaded_chunks": "Chunks loaded from lmcache_triton",
    "loaded_bytes": "Bytes loaded into the paged cache",
    "load_seconds": "Seconds spent loading chunks",
    "stored_chunks": "Chunks stored into lmcache_triton",
    "stored_bytes": "Bytes copied out of the paged cache",
    "store_seconds": "Seconds spent copying chunks out",
    "load_errors": "Chunks that failed to load (recomputed by vLLM)",
    "store_errors": "Chunks the tiers refused",
}
_LATER_COUNTERS = {
    "prefetched_chunks": "Chunks read from a slow tier into memory, verified, in the background",
    "prefetch_errors": "Prefetches that found a missing, damaged or foreign chunk (a miss)",
    "blend_requests": "Requests prefilled by CacheBlend",
    "blend_reused_tokens": "Prompt tokens whose cached KV CacheBlend reused (not recomputed)",
    "blend_recomputed_tokens": "Prompt tokens CacheBlend recomputed (selected cached tokens and new text)",
    "blend_errors": "Blends that failed in the worker (the prompt was computed in full instead)",
    "blend_fallbacks": "Failed blends whose prompt the worker computed in full",
    "blend_seconds": "Seconds spent blending in the worker",
}


def counters() -> dict[str, str]:
    """Every counter on /metrics: name -> help text (per-tier ones from `slow_tiers()`)."""
    out = dict(_COUNTERS)
    out[f"loaded_chunks_{CPU_TIER}"] = "Chunks loaded from the CPU tier"
    for t in slow_tiers():
        out[f"loaded_chunks_{t.name}"] = f"Chunks loaded after a prefetch from {t.doc}"
    out.update(_LATER_COUNTERS)
    for t in slow_tiers():  # codecs: bytes saved = unencoded_bytes - written_bytes
        out[f"written_bytes_{t.name}"] = f"Bytes written to {t.doc} (encoded by its codec)"
        out[f"unencoded_bytes_{t.name}"] = f"Bytes the chunks written to {t.doc} hold decoded"
    return out


class LMCacheTritonStats(KVConnectorStats):
    """Worker counters for one interval; summed across ranks and steps."""

    def reset(self) -> None:
        self.data: dict[str, int | float] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {
            "loaded_tokens": d.get("loaded_tokens", 0),
            "loaded_chunks": d.get("loaded_chunks", 0),
            "loaded_MB": round(d.get("loaded_bytes", 0) / 2**20, 2),
            "load_ms": round(d.get("load_seconds", 0.0) * 1e3, 2),
            "stored_chunks": d.get("stored_chunks", 0),
            "stored_MB": round(d.get("stored_bytes", 0) / 2**20, 2),
            "store_ms": round(d.get("store_seconds", 0.0) * 1e3, 2),
            "load_errors": d.get("load_errors", 0),
            "store_errors": d.get("store_errors", 0),
            "prefetched_chunks": d.get("prefetched_chunks", 0),
            "prefetch_errors": d.get("prefetch_errors", 0),
        }
        for k, v in d.items():
            if k.startswith("loaded_chunks_"):
                out[k] = v
            elif k.startswith("blend_"):  # CacheBlend counters (blend_worker.py)
                out[k] = round(v * 1e3, 2) if k == "blend_seconds" else v
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LMCacheTritonPromMetrics(KVConnectorPromMetrics):
    """Counters on vLLM's /metrics: `vllm:lmcache_triton_<name>_total` (`counters()`)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.COUNTERS = counters()
        self._counters: dict[str, dict[int, object]] = {}
        for name, doc in self.COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:lmcache_triton_{name}", documentation=doc, labelnames=labelnames
            )
            self._counters[name] = self.create_metric_per_engine(counter)
        # The codec each slow tier is configured with (`disk_codec`, `remote_codec`); a model the
        # quality guard keeps exact shows in written_bytes == unencoded_bytes.
        from lmcache_triton.config import load_config
        from lmcache_triton.storage.builder import requested_codecs

        kv = vllm_config.kv_transfer_config
        try:
            extra = dict((kv.kv_connector_extra_config if kv else None) or {})
            codecs = requested_codecs(load_config(extra, warn=False))
        except Exception:  # a bad config fails the connector itself, with its message
            codecs = {}
        gauge = self._gauge_cls(
            name="vllm:lmcache_triton_codec_info",
            documentation="The codec each slow tier is configured to write with (value 1)",
            labelnames=[*labelnames, "tier", "codec"],
        )
        for t in slow_tiers():
            for vals in self.per_engine_labelvalues.values():
                gauge.labels(*vals, t.name, codecs.get(t.name, "exact")).set(1)

    def observe(self, transfer_stats_data: dict[str, int | float], engine_idx: int = 0) -> None:
        for name, per_engine in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                per_engine[engine_idx].inc(value)  # type: ignore[attr-defined]

    def create_metric_per_engine(self, metric):  # type: ignore[no-untyped-def]
        return {idx: metric.labels(*vals) for idx, vals in self.per_engine_labelvalues.items()}
