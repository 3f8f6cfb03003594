"""The module path vLLM and LMCache's launch lines name (`kv_connector_module_path`,
`lmcache.integration.vllm.vllm_v1_adapter`): the connector's public names, re-exported.

The connector lives in connector.py (the class vLLM loads), scheduler.py and worker.py (the two
roles), core.py (what both compute alike), metadata.py, metrics.py, tiers.py and kv_events.py.
"""

from lmcache_triton.integration.vllm.connector import (
    LMCacheConnectorV1Dynamic,
    LMCacheConnectorV1Impl,
    LMCacheTritonConnector,
)
from lmcache_triton.integration.vllm.core import ConnectorCore, first_replica, kv_replicas
from lmcache_triton.integration.vllm.metadata import ChunkOp, LMCacheTritonMetadata, LMCacheTritonWorkerMetadata
from lmcache_triton.integration.vllm.metrics import LMCacheTritonPromMetrics, LMCacheTritonStats
from lmcache_triton.integration.vllm.scheduler import (
    PREFETCH_WAIT_S,
    SKIP_SAVE_PARAM,
    SchedulerConnector,
    skip_save_requested,
)
from lmcache_triton.integration.vllm.worker import WorkerConnector, flush_local_worker, local_worker

__all__ = [
    "PREFETCH_WAIT_S",
    "SKIP_SAVE_PARAM",
    "ChunkOp",
    "ConnectorCore",
    "LMCacheConnectorV1Dynamic",
    "LMCacheConnectorV1Impl",
    "LMCacheTritonConnector",
    "LMCacheTritonMetadata",
    "LMCacheTritonPromMetrics",
    "LMCacheTritonStats",
    "LMCacheTritonWorkerMetadata",
    "SchedulerConnector",
    "WorkerConnector",
    "first_replica",
    "flush_local_worker",
    "kv_replicas",
    "local_worker",
    "skip_save_requested",
]
