"""`lmcache-triton warm`: prefill prompts through vLLM with the connector so their KV lands on disk.

The engine runs in a child process (`python -m lmcache_triton.warm JOB.json`): vLLM keeps its
KV-transfer group in module globals, so a second engine in one process would reuse the first
one's connector, and the CLI must import without vLLM. The child prints one JSON line per
prompt on stdout (the CLI's progress bar); vLLM's own log goes to a file shown on failure.

Summary figures come from the disk tier itself (file headers before and after, after the
child flushed and exited), not from the child's counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmcache_triton.child_job import log_tail, run_child
from lmcache_triton.prompt_file import read_prompt_file


class WarmError(RuntimeError):
    """The prompts file or the engine failed; the message is one line."""


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or `.jsonl` with `"prompt"`.

    Raises:
        WarmError: unreadable file, bad JSON line, or no prompts.
    """

    def from_object(obj: dict, where: str) -> str:
        if not isinstance(obj.get("prompt"), str):
            raise WarmError(f'{where}: expected an object with a string "prompt"')
        return obj["prompt"]

    return read_prompt_file(path, WarmError, lambda line: line, from_object)


def warm(
    model: str,
    prompts: list[str],
    connector: dict[str, Any],
    *,
    block_size: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    on_progress: Callable[[dict], None] | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Prefill `prompts` (max_tokens=1) in a child engine; returns the child's last report.

    Args:
        model: model directory or name vLLM can load.
        prompts: prompt texts.
        connector: `kv_connector_extra_config` (`lmcache.*` keys).
        block_size: vLLM block size; default None lets vLLM choose.
        max_model_len: context length; longer prompts are skipped. Default None: the model's.
        dtype: model dtype. Default "auto".
        on_progress: called with each progress record (`{"done", "total", "skipped", ...}`).
        timeout: seconds for the whole run. Default 3600.
    """
    from lmcache_triton.testing.runner import EngineSpec

    spec = EngineSpec(model=model, connector=connector, block_size=block_size, max_model_len=max_model_len, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="lmct-warm-") as d:
        log = Path(d, "engine.log")
        try:
            rc, last = run_child(
                "lmcache_triton.warm",
                {"spec": asdict(spec), "prompts": prompts},
                Path(d, "job.json"),
                log,
                on_progress,
                timeout,
            )
        except subprocess.TimeoutExpired:
            raise WarmError(f"engine did not finish within {timeout:g} s: {log_tail(log, -9)}") from None
        if rc != 0 or not last.get("finished"):
            raise WarmError(f"engine failed: {log_tail(log, rc)}")
    return last


def _worker(job_path: str) -> int:
    from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine

    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    prompts = job["prompts"]

    def emit(**rec: Any) -> None:
        print(json.dumps(rec), flush=True)

    emit(done=0, total=len(prompts), skipped=0, stage="engine")
    llm = start_engine(spec)
    from vllm import SamplingParams

    rejected: type[Exception] = ValueError
    try:  # vLLM 0.32 rejects a too-long prompt with this, not with ValueError
        from vllm.exceptions import VLLMValidationError

        rejected = VLLMValidationError
    except ImportError:
        pass
    params = SamplingParams(max_tokens=1, temperature=0.0)
    max_len = llm.llm_engine.model_config.max_model_len
    tokenizer = llm.get_tokenizer()
    skipped = tokens = 0
    for i, prompt in enumerate(prompts):
        try:
            n = len(tokenizer.encode(prompt))
            if n >= max_len:  # one token must be left to generate
                raise ValueError(f"{n} tokens, more than max_model_len {max_len} allows")
            r = llm.generate([prompt], params, use_tqdm=False)[0]
            tokens += len(r.prompt_token_ids or [])
        except (ValueError, rejected) as e:  # too long, or rejected by vLLM: skip, keep warming
            print(f"skipping prompt {i + 1}: {e}", file=sys.stderr, flush=True)
            skipped += 1
        emit(done=i + 1, total=len(prompts), skipped=skipped, tokens=tokens, stage="prefill")
    # In-process engine: the worker's tiers live here; wait for the background disk writes.
    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

    flush_local_worker()
    shutdown(llm)
    emit(done=len(prompts), total=len(prompts), skipped=skipped, tokens=tokens, stage="done", finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
