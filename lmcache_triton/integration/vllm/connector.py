"""vLLM V1 KV connector: LMCache-style chunk reuse over lmcache_triton's engine and tiers.

`LMCacheConnectorV1Dynamic` is the class vLLM loads (`kv_connector_module_path` =
`lmcache_triton.integration.vllm.vllm_v1_adapter`, or the name `LMCacheTritonConnector`
registered by our `vllm.general_plugins` entry point). It is thin: every hook goes to the core
that `LMCacheConnectorV1Impl(vllm_config, role, parent)` builds for its role (LMCache's
contract for that name):

  scheduler.SchedulerConnector   EngineCore process: lookups, prefetch waits, load/store plans,
                                 the prefix index, KV events, the hit log.
  worker.WorkerConnector         each Worker process: the engine over this rank's tiers, loads,
                                 saves, reports, stats.

Both derive from core.ConnectorCore (config, layout, key namespaces: computed alike in every
process). metadata.py holds what travels between them, metrics.py the counters, kv_events.py
the events, blend_scheduler.py/blend_worker.py CacheBlend's halves.

kv_role (vLLM's kv_transfer_config): `kv_producer` stores and never loads, `kv_consumer` loads
and never stores, `kv_both` (default) both: a prefill instance and a decode instance sharing a
remote tier.

Invariants: the scheduler counts a chunk only when every rank holds it in memory; a held chunk is
freed only after the scheduler acknowledged its retirement, so every load planned before reaches
its bytes; loads never write blocks vLLM already computed; a failed load writes nothing and is
reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from lmcache_triton.integration.vllm import compat
from lmcache_triton.integration.vllm.metrics import LMCacheTritonPromMetrics, LMCacheTritonStats
from lmcache_triton.integration.vllm.scheduler import SchedulerConnector
from lmcache_triton.integration.vllm.worker import WorkerConnector

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


def LMCacheConnectorV1Impl(  # LMCache's class name: its wrapper calls it like a class
    vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1
) -> SchedulerConnector | WorkerConnector:
    """The connector's core for `role`: a `SchedulerConnector` or a `WorkerConnector`.

    Args:
        vllm_config: vLLM's config; `kv_transfer_config.kv_connector_extra_config` keys
            `lmcache.*` override the LMCACHE_* variables and the LMCACHE_CONFIG_FILE YAML.
        role: SCHEDULER or WORKER.
        parent: the `KVConnectorBase_V1` vLLM loaded (gives access to bound metadata).
    """
    if role == KVConnectorRole.SCHEDULER:
        return SchedulerConnector(vllm_config, role, parent)
    return WorkerConnector(vllm_config, role, parent)


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1):
    """The KV connector vLLM instantiates; every call goes to the role's core."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._impl: SchedulerConnector | WorkerConnector = LMCacheConnectorV1Impl(vllm_config, role, self)

    def _scheduler(self) -> SchedulerConnector:
        assert isinstance(self._impl, SchedulerConnector), "a scheduler hook called on a worker connector"
        return self._impl

    def _worker(self) -> WorkerConnector:
        assert isinstance(self._impl, WorkerConnector), "a worker hook called on the scheduler connector"
        return self._impl

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: object = None) -> bool:
        return compat.supports_sleep_mode(cls, kv_transfer_config)  # 0.33+: vLLM asks at config time

    # worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker().start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        self._worker().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self._worker().wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker().build_connector_worker_meta()

    # either role (the scheduler asks for stats too: its counters go to the log line instead)
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._impl.get_kv_connector_stats()

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        return self._impl.get_kv_connector_kv_cache_events()

    def shutdown(self) -> None:
        self._impl.shutdown()

    def reset_cache(self) -> bool | None:
        return self._impl.reset_cache()

    def take_events(self) -> list[KVCacheEvent]:
        return self._impl.take_events()

    # scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler().update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().request_finished(request, block_ids)

    def may_load_async(self, request: Request) -> bool:  # 0.34: --max-num-inflight-kv-loads
        return self._scheduler().may_load_async(request)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        return self._scheduler().get_external_cache_hit_sources(request, num_external_tokens)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheTritonStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(  # type: ignore[override]
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> LMCacheTritonPromMetrics:
        return LMCacheTritonPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# The name the `vllm.general_plugins` entry point registers.
LMCacheTritonConnector = LMCacheConnectorV1Dynamic
