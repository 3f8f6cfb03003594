"""Run prompts through a real vLLM engine, with or without the lmcache_triton connector.

It drives vLLM through its public offline API only (`LLM`, `SamplingParams`, `KVTransferConfig`);
anything that reaches into the connector lives in `integration/vllm/`.

Used by the end-to-end tests, the demo, `lmcache-triton warm` and bench/bench_e2e.py. In a
separate process (`python -m lmcache_triton.testing.runner SPEC.json OUT.json`) it gives an
honest "restart": nothing survives but what the disk tier wrote.

Outputs per prompt: generated token ids and text, the chosen tokens' logprobs, vLLM's
`num_cached_tokens`, and the time to first token measured as the wall time of a 1-token
generation (prefill + one sample) when `measure_ttft` is set.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.config import KVTransferConfig

CONNECTOR_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"


@dataclass
class EngineSpec:
    """How to start the engine.

    Args:
        model: a local model directory.
        connector: `kv_connector_extra_config` for the connector (keys `lmcache.*`), or None to
            run without it.
        prefix_caching: vLLM's own prefix cache (off by default so hits come from us).
        multiprocess: vLLM's default multi-process engine (EngineCore in its own process)
            instead of the in-process one.
        max_model_len: context length; None is the model's.
        block_size: vLLM block size; None lets vLLM choose (CPU needs a multiple of 32).
        extra_args: more `vllm.LLM(...)` keyword arguments.
        by_name: name the connector `LMCacheTritonConnector` (registered by our
            `vllm.general_plugins` entry point) instead of giving its module path.
        failure_policy: vLLM's `kv_load_failure_policy`; default None leaves vLLM's default
            ("fail", what LMCache's launch line runs): nothing in our tiers may fail a request.
        kv_role: vLLM's `kv_role`: "kv_both" (default), "kv_producer" or "kv_consumer".
    """

    model: str
    connector: dict[str, Any] | None = None
    prefix_caching: bool = False
    multiprocess: bool = False
    max_model_len: int | None = 4096
    block_size: int | None = None
    dtype: str = "float32"
    extra_args: dict[str, Any] = field(default_factory=dict)
    by_name: bool = False
    failure_policy: str | None = None
    kv_role: str = "kv_both"


def kv_transfer_config(
    extra: dict[str, Any], by_name: bool = False, failure_policy: str | None = None, kv_role: str = "kv_both"
) -> KVTransferConfig:
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(kv_role=kv_role, kv_connector_extra_config=dict(extra))
    if failure_policy is not None:
        kwargs["kv_load_failure_policy"] = failure_policy
    if by_name:
        from lmcache_triton.integration.vllm.plugin import CONNECTOR_NAME

        return KVTransferConfig(kv_connector=CONNECTOR_NAME, **kwargs)
    return KVTransferConfig(kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE, **kwargs)


def prepare_env(multiprocess: bool = False) -> None:
    """Environment vLLM needs on this kind of machine, unless the caller set it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def start_engine(spec: EngineSpec) -> LLM:
    """A `vllm.LLM` for `spec` (imports vLLM)."""
    prepare_env(spec.multiprocess)
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=spec.model,
        dtype=spec.dtype,
        enforce_eager=True,
        enable_prefix_caching=spec.prefix_caching,
        max_model_len=spec.max_model_len,
        seed=0,
    )
    if spec.block_size is not None:
        kwargs["block_size"] = spec.block_size
    if spec.connector is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(
            spec.connector, spec.by_name, spec.failure_policy, spec.kv_role
        )
    kwargs.update(spec.extra_args)
    return LLM(**kwargs)


def generate(
    llm: LLM,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    """Greedy generation, one request at a time; see the module docstring for the fields.

    With `ttft_from_metrics`, each prompt is ONE request and its TTFT is vLLM's own
    `RequestOutput.metrics.first_token_latency` (start the engine with
    `extra_args={"disable_log_stats": False}`, else it is None): the request timed is the one
    whose output is returned, so a first (missing) request is timed and compared as a miss.
    """
    from vllm import SamplingParams

    out = []
    for p in prompts:
        prompt = {"prompt_token_ids": list(p)} if not isinstance(p, str) else p
        ttft = None
        if measure_ttft and not ttft_from_metrics:
            t0 = time.perf_counter()
            first = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
            ttft = time.perf_counter() - t0
            cached = first.num_cached_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
        r = llm.generate([prompt], params, use_tqdm=False)[0]
        c = r.outputs[0]
        if ttft_from_metrics:
            ttft = getattr(r.metrics, "first_token_latency", None) or None
            cached = r.num_cached_tokens
        logprobs = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs or [], strict=False)]
        out.append(
            {
                "token_ids": list(c.token_ids),
                "text": c.text,
                "logprobs": logprobs,
                "num_cached_tokens": cached if measure_ttft or ttft_from_metrics else r.num_cached_tokens,
                "num_prompt_tokens": len(r.prompt_token_ids or []),
                "ttft": ttft,
            }
        )
    return out


def run(
    spec: EngineSpec,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    llm = start_engine(spec)
    try:
        return generate(llm, prompts, max_tokens, measure_ttft, ttft_from_metrics)
    finally:
        shutdown(llm)


def shutdown(llm: LLM) -> None:
    """Stop an engine and flush the connector (its disk writes) before returning."""
    engine = getattr(llm, "llm_engine", None)
    try:
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
    except Exception:  # best effort: the process may be ending anyway
        pass
    import gc

    del llm
    gc.collect()


def run_in_subprocess(
    spec: EngineSpec,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    """`run` in a fresh Python process (a real restart)."""
    import subprocess
    import tempfile
    from dataclasses import asdict

    with tempfile.TemporaryDirectory() as d:
        spec_path, out_path = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "spec": asdict(spec),
                    "prompts": list(prompts),
                    "max_tokens": max_tokens,
                    "measure_ttft": measure_ttft,
                    "ttft_from_metrics": ttft_from_metrics,
                },
                f,
            )
        proc = subprocess.run(
            [sys.executable, "-m", "lmcache_triton.testing.runner", spec_path, out_path],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"engine subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def _main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        job = json.load(f)
    spec = EngineSpec(**job["spec"])
    ttft_from_metrics = job.get("ttft_from_metrics", False)
    results = run(spec, job["prompts"], job["max_tokens"], job["measure_ttft"], ttft_from_metrics)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
