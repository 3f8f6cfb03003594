"""What the scheduler and the workers of one server compute alike: the connector's identity.

`ConnectorCore` is the base of the two role classes (`scheduler.SchedulerConnector`,
`worker.WorkerConnector`): the configuration, the token-row layout, the chunk planner and the
key namespaces, which must agree byte for byte between the EngineCore process and every worker
so that a chunk stored by a worker is the chunk the scheduler counts. It also answers, with
"nothing", the hooks vLLM calls on both roles; each role class overrides its own.

Primitives:
  `kv_replicas(vllm_config)`        how many tensor-parallel ranks hold the same KV.
  `first_replica(rank, tp, r)`      the rank whose keys (and files) `rank` shares.
  `producer(vllm_config)`           the model's name and a fingerprint of its weights.
  `layout_fingerprint(...)`         the shape of a token row, and vLLM's KV-cache spec.

Invariants: nothing here depends on the role; no attribute of `ConnectorCore` is set for one
role only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.kv_cache_interface import AttentionSpec

from lmcache_triton.config import LMCacheConfig, load_config
from lmcache_triton.engine import ChunkPlanner
from lmcache_triton.hashing import key_namespace
from lmcache_triton.integration.vllm import compat

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("lmcache_triton")


def kv_replicas(vllm_config: VllmConfig) -> int:
    """How many tensor-parallel ranks hold the same KV: all of them for MLA (one latent vector
    per token, not split by heads), `tp // KV heads` when there are more ranks than KV heads
    (vLLM gives each head to that many consecutive ranks), else 1."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp <= 1 or getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
        return 1  # decode context parallelism shards the KV across ranks: no two ranks share it
    mc = vllm_config.model_config
    if getattr(mc, "use_mla", False):
        return tp
    heads = mc.get_total_num_kv_heads()
    return tp // heads if 0 < heads < tp else 1


def first_replica(rank: int, tp_size: int, replicas: int) -> int:
    """The rank whose keys (and disk files) `rank` shares: the first of its group of `replicas`
    consecutive tensor-parallel ranks in its pipeline stage (ranks are `pp * tp_size + tp`)."""
    return rank - (rank % tp_size) % replicas


def producer(vllm_config: VllmConfig) -> tuple[str, str]:
    """The model's name and a fingerprint of what produces its KV: the weights vLLM loads (a
    stat of every weight and config file of a local directory, or the hub revision) and the
    quantisation. Computed alike in the scheduler and the workers."""
    from lmcache_triton.identity import model_fingerprint

    mc = vllm_config.model_config
    weights = model_fingerprint(
        str(mc.model),
        getattr(mc, "revision", None),
        getattr(mc, "code_revision", None),
        getattr(getattr(vllm_config, "load_config", None), "download_dir", None),
    )
    quant = getattr(mc, "quantization", None) or "none"
    return str(mc.model), f"{weights}-q:{quant}"


def layout_fingerprint(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> tuple[str, AttentionSpec]:
    """The shape of a token row (attention kind, KV heads, head size, dtype), computed alike in
    the scheduler and the workers, and the cache group's spec.

    Chunks are stored as token rows (engine.py), so neither vLLM's block size nor the attention
    backend's page size or layout is part of it: a chunk stored at block size 128 loads at 32.

    Raises:
        ValueError: the model has more than one KV cache group (hybrid attention), or its cache
            is not attention KV.
    """
    groups = [g for g in kv_cache_config.kv_cache_groups if getattr(g, "enable_kv_transfer", True)]
    if len(groups) != 1:
        raise ValueError(
            f"lmcache_triton supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid attention). Run without the connector."
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"lmcache_triton caches attention KV; this model's cache is {type(spec).__name__}")
    parts = [
        "rows",
        type(spec).__name__,
        f"h{getattr(spec, 'num_kv_heads', 1)}",
        f"d{spec.head_size}",
        str(spec.dtype).replace("torch.", ""),
    ]
    return "-".join(parts), spec


class ConnectorCore:
    """The identity both roles share (module docstring) and the role-neutral hook answers.

    Args:
        vllm_config: vLLM's config; `kv_transfer_config.kv_connector_extra_config` keys
            `lmcache.*` override the LMCACHE_* variables and the LMCACHE_CONFIG_FILE YAML.
        role: SCHEDULER or WORKER (kept for LMCache's contract; the class says the same).
        parent: the `KVConnectorBase_V1` vLLM loaded (bound metadata, the KV-cache config).
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1):
        self.parent = parent
        self.role = role
        self.vllm_config = vllm_config
        kv_cache_config = parent._kv_cache_config
        assert kv_cache_config is not None, "vLLM passes the KV-cache config to connectors since 0.11"
        self.kv_cache_config: KVCacheConfig = kv_cache_config
        kv_transfer = vllm_config.kv_transfer_config
        extra = dict((kv_transfer.kv_connector_extra_config if kv_transfer is not None else None) or {})
        # Warnings once per server: the scheduler's; the workers (own processes) stay quiet.
        self.config: LMCacheConfig = load_config(extra, warn=role == KVConnectorRole.SCHEDULER)

        self.layout, self.spec = layout_fingerprint(vllm_config, kv_cache_config)
        self.block_size: int = self.spec.block_size
        self.planner = ChunkPlanner(self.config, self.block_size)
        pc = vllm_config.parallel_config
        self.world_size: int = pc.tensor_parallel_size * pc.pipeline_parallel_size
        self.tp_size: int = pc.tensor_parallel_size
        self.kv_replicas = compat.kv_tp_replicas(kv_cache_config, kv_replicas(vllm_config))  # 0.33+: vLLM's
        model, fingerprint = producer(vllm_config)
        # vLLM stores fp8_e4m3 and fp8_e5m2 alike as uint8: the spec's dtype alone cannot tell them
        # apart, the configured cache dtype can.
        kv_dtype = f"{str(self.spec.dtype).replace('torch.', '')}/{vllm_config.cache_config.cache_dtype}"
        self.key_meta: dict[str, str] = {
            "model": str(model),
            "producer": fingerprint,
            "layout": self.layout,
            "kv_dtype": kv_dtype,
            "chunk_size": str(self.config.chunk_size),
            "world_size": str(self.world_size),
        }
        kv_role = getattr(kv_transfer, "kv_role", None) or "kv_both"
        self.loads_enabled = kv_role != "kv_producer"
        self.stores_enabled = kv_role != "kv_consumer"
        self.namespaces = [
            # Ranks holding the same KV share the first replica's keys: one file on disk, not one per rank.
            key_namespace(
                f"{model}@{fingerprint}", self.world_size, first_replica(r, self.tp_size, self.kv_replicas),
                kv_dtype, self.config.chunk_size, self.layout,
            )
            for r in range(self.world_size)
        ]

    # -- hooks vLLM calls on either role: "nothing" unless the role class says otherwise -------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return None

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        return None

    def take_events(self) -> list[KVCacheEvent]:
        return []

    def reset_cache(self) -> bool | None:
        return None

    def shutdown(self) -> None:
        return
