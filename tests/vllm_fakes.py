"""The smallest vLLM config a scheduler-role connector starts from, for tests that drive it
without an engine (tests/test_tail_hits.py, test_connector_logs.py, test_gpu_path.py). Imports
vLLM: only for modules that skip without it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import FullAttentionSpec

from lmcache_triton.integration.vllm.scheduler import SchedulerConnector


def scheduler_connector(
    tmp_path: Path, extra: dict[str, object], block: int, device_type: str | None = None
) -> SchedulerConnector:
    """A `SchedulerConnector` for a model folder `tmp_path` (its namespace), configured by the
    `kv_connector_extra_config` `extra`, over one full-attention group of `block`-token blocks
    (2 KV heads of 80, fp32); `device_type` sets `vllm_config.device_config` (absent: None)."""
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, kv_role="kv_both"),
        model_config=SimpleNamespace(model=str(tmp_path), quantization=None),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        kv_events_config=None,
    )
    if device_type is not None:
        vllm_config.device_config = SimpleNamespace(device_type=device_type)
    spec = FullAttentionSpec(block_size=block, num_kv_heads=2, head_size=80, dtype=torch.float32)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)], kv_cache_tensors=[])
    parent = SimpleNamespace(_kv_cache_config=kv_cache_config)
    return SchedulerConnector(vllm_config, KVConnectorRole.SCHEDULER, parent)  # type: ignore[arg-type]
