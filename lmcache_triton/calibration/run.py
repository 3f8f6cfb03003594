"""A calibration run: the same prompts through vLLM with exact KV and with the codec's decoded KV.

One engine, in a child process (`python -m lmcache_triton.calibration.run JOB.json`: vLLM keeps
its connector in module globals, and the CLI imports without vLLM), with our connector on a
private disk directory whose tier stores with the codec (`disk_codec`), `local_cpu: false` (the
CPU tier only stages: nothing stored stays in memory) and the guard off (this run is what makes
a record):

  1. each prompt, with a `cache_salt` of its own, generates greedily: a miss (checked: 0 cached
     tokens), so this is vLLM's exact output; its chunks are encoded and written to disk;
  2. the writes are flushed after each prompt (the write queue is bounded and drops overflow);
  3. each prompt again, same salt: its chunks are read from disk, decoded into the CPU tier and
     loaded into vLLM's cache; vLLM computes only the rest. Checked: the disk tier served at
     least as many chunks as the loaded tokens need, so the decoded KV is what was measured.

The child prints its progress as JSON lines and writes the generations and the identity the
connector computed (the same `key_meta` a server computes for these weights) to a file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmcache_triton.child_job import log_tail, run_child

from .measure import Generation, Prompt, compare
from .record import Identity, Metrics

TOP_LOGPROBS = 20  # vLLM's default cap on requested logprobs


class CalibrationError(RuntimeError):
    """The run could not measure what it must (one line)."""


@dataclass
class RunResult:
    identity: Identity
    metrics: Metrics
    exact: list[Generation]
    decoded: list[Generation]
    tier_reads: int
    chunk_size: int


def run_calibration(
    model: str,
    codec: str,
    prompts: list[Prompt],
    *,
    max_tokens: int = 32,
    chunk_size: int = 64,
    block_size: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    tier: str = "disk",
    on_progress: Callable[[dict], None] | None = None,
    timeout: float = 3600,
    log_path: str | None = None,
) -> RunResult:
    """Run `prompts` exact and decoded through `codec` (module docstring) and compare.

    Args:
        model: a model directory or name vLLM loads.
        codec: the codec name (`chunk.codec.CODECS`).
        prompts: the prompt set.
        max_tokens: tokens generated per prompt; default 32.
        chunk_size: the connector's chunk size for the run (a multiple of the block size); default 64.
        block_size: vLLM's block size; default None (vLLM's choice).
        max_model_len: context length; default None (the model's).
        dtype: the model dtype; default "auto".
        tier: the codec's tier; only "disk" (the codec and its decoded bytes are the same on
            every tier). Default "disk".
        on_progress: called with each progress record.
        timeout: seconds for the whole run; default 3600.
        log_path: where vLLM's log goes; default a temporary file, shown (last line) on failure.

    Raises:
        CalibrationError: the engine failed, or nothing decoded was measured.
    """
    from lmcache_triton.testing.runner import EngineSpec

    if tier != "disk":
        raise CalibrationError(f"tier {tier!r}: calibration runs on the disk tier (a codec decodes alike everywhere)")
    with tempfile.TemporaryDirectory(prefix="lmct-calibrate-") as d:
        connector = {
            "lmcache.chunk_size": chunk_size,
            "lmcache.local_cpu": False,
            "lmcache.max_local_cpu_size": 1.0,
            "lmcache.local_disk": str(Path(d) / "disk"),
            "lmcache.max_local_disk_size": 4.0,
            f"lmcache.{tier}_codec": codec,
            "lmcache.codec_guard": False,
        }
        spec = EngineSpec(
            model=model, connector=connector, block_size=block_size, max_model_len=max_model_len, dtype=dtype
        )
        out = Path(d, "out.json")
        log = Path(log_path) if log_path else Path(d, "engine.log")
        job = {"spec": asdict(spec), "prompts": [asdict(p) for p in prompts], "max_tokens": max_tokens,
               "tier": tier, "out": str(out)}  # fmt: skip
        try:
            rc, _ = run_child("lmcache_triton.calibration.run", job, Path(d, "job.json"), log, on_progress, timeout)
        except subprocess.TimeoutExpired:
            raise CalibrationError(f"engine did not finish within {timeout:g} s: {log_tail(log, -9)}") from None
        if rc != 0 or not out.exists():
            raise CalibrationError(f"engine failed: {log_tail(log, rc)}")
        res = json.loads(out.read_text())
    if res.get("error"):
        raise CalibrationError(res["error"])
    exact = [Generation.from_json(g) for g in res["exact"]]
    decoded = [Generation.from_json(g) for g in res["decoded"]]
    metrics = compare(exact, decoded, [p.answer for p in prompts])
    return RunResult(Identity(**res["identity"]), metrics, exact, decoded, int(res["tier_reads"]), chunk_size)


def _generation(output: Any) -> Generation:
    c = output.outputs[0]
    top = []
    for tok, lp in zip(c.token_ids, c.logprobs or [], strict=True):
        pos = {int(t): float(v.logprob) for t, v in lp.items()}
        pos.setdefault(int(tok), float(lp[tok].logprob))
        top.append(pos)
    return Generation(
        list(c.token_ids), top, c.text, int(output.num_cached_tokens or 0), len(output.prompt_token_ids or [])
    )


def _worker(job_path: str) -> int:
    from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine

    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    prompts = [Prompt(**p) for p in job["prompts"]]
    tier = job["tier"]
    out_path = Path(job["out"])

    def emit(**rec: Any) -> None:
        print(json.dumps(rec), flush=True)

    def fail(msg: str) -> int:
        out_path.write_text(json.dumps({"error": msg}))
        return 0

    emit(stage="engine", done=0, total=2 * len(prompts))
    llm = start_engine(spec)
    from vllm import SamplingParams

    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker, local_worker

    worker = local_worker()
    if worker is None:
        return fail("no connector worker in this process (an in-process engine is needed)")
    storage = worker.storage
    if storage.tier(tier) is None:
        return fail(f"the {tier} tier did not start (see the engine log)")
    identity = Identity.from_key_meta(worker.key_meta)
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=TOP_LOGPROBS)
    salts = [f"lmcache-triton-calibrate-{i}" for i in range(len(prompts))]

    exact = []
    for i, (p, salt) in enumerate(zip(prompts, salts, strict=True)):
        g = _generation(llm.generate([p.as_vllm(salt)], params, use_tqdm=False)[0])
        if g.cached_tokens:
            return fail(f"prompt {i + 1}: the exact run was served {g.cached_tokens} tokens from a cache")
        exact.append(g)
        # The tier's write queue is bounded and drops what does not fit: wait for this prompt's
        # chunks (encoded in the background) before the next prompt queues more.
        if not flush_local_worker(timeout=600):
            return fail(f"the {tier} tier's writes did not finish in 600 s")
        emit(stage="exact", done=i + 1, total=2 * len(prompts))
    before = int((storage.stats().get(tier) or {}).get("hits", 0))
    decoded = []
    for i, (p, salt) in enumerate(zip(prompts, salts, strict=True)):
        decoded.append(_generation(llm.generate([p.as_vllm(salt)], params, use_tqdm=False)[0]))
        emit(stage="decoded", done=len(prompts) + i + 1, total=2 * len(prompts))
    reads = int((storage.stats().get(tier) or {}).get("hits", 0)) - before
    loaded = sum(g.cached_tokens for g in decoded)
    chunk_size = int(worker.config.chunk_size)
    if loaded == 0:
        return fail(
            f"no prompt was served from the {tier} tier: the prompts are shorter than one chunk "
            f"({chunk_size} tokens) plus one; use longer prompts or a smaller --chunk-size"
        )
    if reads < math.ceil(loaded / chunk_size):
        return fail(f"{loaded} tokens were loaded but the {tier} tier served only {reads} chunks: not all decoded")
    out_path.write_text(
        json.dumps(
            {
                "identity": asdict(identity),
                "exact": [g.to_json() for g in exact],
                "decoded": [g.to_json() for g in decoded],
                "tier_reads": reads,
            }
        )
    )
    shutdown(llm)
    emit(stage="done", done=2 * len(prompts), total=2 * len(prompts), finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
