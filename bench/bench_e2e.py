"""End-to-end TTFT on a real vLLM engine: miss, CPU-tier hit, disk-tier hit, no connector.

A locally generated Llama-style model (float32, ~40M parameters by default) large enough that
prefill dominates; vLLM's prefix cache is OFF so the connector must serve every hit.

TTFT is the wall time of a 1-token generation (prefill + one sample) inside the engine's process,
after start-up, median over `--reps` prompts (each miss needs a prompt never seen before):
  no connector   engine without kv_transfer_config                     (one process)
  miss           engine with the connector, prompt not cached          (same process as hit)
  CPU hit        the same prompt again: chunks come from the CPU tier
  disk hit       a NEW process on the same disk directory: chunks come from disk
  vLLM hit       (--floor) no connector, vLLM's own prefix cache ON, the prompt a second time:
                 the last token's forward plus vLLM's own overhead, the floor of any hit
Targets (issue 19): CPU hit <= 1% of the miss, disk hit after a restart <= 3%; miss overhead
<= 5% vs no connector.

`--async-load-min-tokens N` runs the connector cases a second time with `async_load_min_tokens`
and `async_load_slow_min_tokens` both N, interleaved with the default-config ones (rows "async N:
..."): N > 0 loads every hit of N tokens or more in the background while the request waits, 0
loads every hit in the step. The default config loads CPU-tier hits in the step and hits read
from disk (>= 1024 tokens) in the background: `--async-load-min-tokens 0` compares the disk hit
against the same load in the step, `--async-load-min-tokens 256` the CPU hit against the same
load in the background.

`--before DIR` runs the connector cases a second time with the package from DIR (a checkout of
an older commit: `git archive COMMIT | tar -x -C DIR`), interleaved with this tree's (before
miss/hit, after miss/hit, before disk hit, after disk hit), so a change is compared under the
same load; its rows are labelled "before: ...". The engine processes start with `python -P`
(Python 3.11+), so DIR's package is the one they import; on Python 3.10 start the benchmark from
outside the checkout (else the working directory's package shadows DIR's).

`--pretouch` runs the connector cases a second time with `cpu_pretouch` on (rows "pretouch:
..."), interleaved with the default-config ones. Since 2026-12-07 the default is on as well (the
first GB), so those rows now repeat the main ones; to compare on and off, use
`bench_config_ab.py cpu_pretouch true false`. `--hugepages` does the same with `cpu_hugepages`
on (rows "huge pages: ...").

Usage: python bench/bench_e2e.py [--tokens 4096] [--reps 3] [--quick] [--floor] [--before DIR]
                                 [--async-load-min-tokens N] [--pretouch] [--hugepages]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import work_dir  # noqa: E402

from lmcache_triton.testing import build_tiny_model  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess  # noqa: E402

CSV = Path(__file__).with_name("results_e2e.csv")
BENCH_MODEL = dict(
    arch="llama",
    hidden_size=512,
    num_layers=12,
    num_heads=8,
    num_kv_heads=4,
    head_size=64,
    intermediate_size=1536,
    vocab_size=4096,
    initializer_range=0.15,
    dtype="float32",
    seed=0,
)


def bench_setup(prefix: str, tokens: int, **model_params: object) -> tuple[Path, dict[str, str], dict]:
    """A work folder (`prefix` in its name) with vLLM's temp and cache folders inside, their
    environment for the engine processes, and `EngineSpec` keywords for this benchmark's model
    (`BENCH_MODEL` updated by `model_params`, built once under ~/.cache) at `tokens` tokens."""
    work = work_dir(prefix)
    (work / "tmp").mkdir()
    env = {"TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
    params = {**BENCH_MODEL, **model_params}
    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-e2e", **params))
    max_len = tokens + 64
    base = dict(model=model, block_size=32, max_model_len=max_len, extra_args={"max_num_batched_tokens": max_len})
    return work, env, base


def _prompts(n: int, tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 2600) for _ in range(tokens)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="1k tokens, 1 rep, a smaller model")
    ap.add_argument("--floor", action="store_true", help="also vLLM's own prefix-cache hit (no connector)")
    ap.add_argument("--before", default=None, help="a checkout of an older tree to compare, interleaved")
    ap.add_argument(
        "--async-load-min-tokens", type=int, default=None, metavar="N",
        help="also the connector cases with every hit of N tokens or more loaded in the background "
        "(0: every hit in the step), interleaved (rows 'async N: ...')",
    )
    ap.add_argument(
        "--pretouch", action="store_true",
        help="also the connector cases with cpu_pretouch on, interleaved (rows 'pretouch: ...')",
    )
    ap.add_argument(
        "--hugepages", action="store_true",
        help="also the connector cases with cpu_hugepages on (the arena in transparent huge pages), "
        "interleaved (rows 'huge pages: ...')",
    )
    args = ap.parse_args()
    model_params = dict(BENCH_MODEL)
    if args.quick:
        args.tokens, args.reps = 1024, 1
        model_params.update(hidden_size=256, num_layers=4)

    work, env, base = bench_setup("lmct-bench-e2e-", args.tokens, **model_params)
    n_params = _count_params(base["model"])
    prompts = _prompts(args.reps, args.tokens - 1, seed=1)  # + BOS-free token ids, exact length

    def connector(disk: Path, label: str) -> dict:
        cfg = {
            "lmcache.chunk_size": args.chunk_size,
            "lmcache.local_disk": str(disk),
            "lmcache.max_local_disk_size": 4,
            "lmcache.max_local_cpu_size": 2,
        }
        if label.startswith("pretouch"):
            cfg["lmcache.cpu_pretouch"] = True
        if label.startswith("huge pages"):
            cfg["lmcache.cpu_hugepages"] = True
        if label.startswith("async"):
            cfg["lmcache.async_load_min_tokens"] = args.async_load_min_tokens
            cfg["lmcache.async_load_slow_min_tokens"] = args.async_load_min_tokens
        return cfg

    def disk_of(label: str) -> Path:
        return work / ("disk-" + label.rstrip(": ").replace(" ", "-") if label else "disk")

    # (label, environment): each runs the connector cases on its own disk directory.
    trees = [("", env)]
    if args.before:
        before_env = {**env, "PYTHONPATH": str(Path(args.before).resolve())}
        trees.insert(0, ("before: ", before_env))
    if args.async_load_min_tokens is not None:
        trees.append((f"async {args.async_load_min_tokens}: ", env))
    if args.pretouch:
        trees.append(("pretouch: ", env))
    if args.hugepages:
        trees.append(("huge pages: ", env))

    print(f"model: {n_params / 1e6:.1f}M params float32; prompt {args.tokens} tokens; reps {args.reps}", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at start", flush=True)
    print("no connector ...", flush=True)
    rows = {"no connector": run_in_subprocess(EngineSpec(**base), prompts, 1, measure_ttft=True, env=env)}
    if args.floor:
        print("vLLM's own prefix cache ...", flush=True)
        twice = run_in_subprocess(
            EngineSpec(**{**base, "prefix_caching": True}),
            [p for p in prompts for _ in (0, 1)],
            1,
            measure_ttft=True,
            env=env,
        )
        rows["vLLM hit"] = twice[1::2]
    for label, tree_env in trees:
        print(f"{label}connector: miss then CPU hit ...", flush=True)
        spec = EngineSpec(**base, connector=connector(disk_of(label), label))
        both = run_in_subprocess(spec, [p for p in prompts for _ in (0, 1)], 1, measure_ttft=True, env=tree_env)
        rows[f"{label}miss"], rows[f"{label}CPU hit"] = both[0::2], both[1::2]
    for label, tree_env in trees:
        print(f"{label}connector, new process: disk hit ...", flush=True)
        spec = EngineSpec(**base, connector=connector(disk_of(label), label))
        rows[f"{label}disk hit"] = run_in_subprocess(spec, prompts, 1, measure_ttft=True, env=tree_env)
    print(f"load {os.getloadavg()[0]:.1f} at the end", flush=True)

    med = {k: statistics.median(r["ttft"] for r in v) for k, v in rows.items()}
    cached = {k: statistics.median(r["num_cached_tokens"] for r in v) for k, v in rows.items()}

    def miss_of(k: str) -> float:
        label = next((t for t, _ in trees if t and k.startswith(t)), "")
        return med[f"{label}miss"]

    print(f"\n{'case':<24}{'TTFT s':>10}{'vs miss':>10}{'cached tok':>12}")
    for k in rows:
        print(f"{k:<24}{med[k]:>10.3f}{med[k] / miss_of(k):>10.2%}{cached[k]:>12.0f}")
    overhead = med["miss"] / med["no connector"] - 1
    print(f"\nconnector overhead on a miss: {overhead:+.1%} (target <= 5%)")
    cpu_frac, disk_frac = med["CPU hit"] / med["miss"], med["disk hit"] / med["miss"]
    print(f"CPU hit / miss: {cpu_frac:.2%} (target <= 1%), disk hit / miss: {disk_frac:.2%} (target <= 3%)")

    import torch
    import vllm

    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                [
                    "date",
                    "machine",
                    "torch",
                    "vllm",
                    "model_params_M",
                    "prompt_tokens",
                    "chunk_size",
                    "reps",
                    "case",
                    "ttft_s",
                    "frac_of_miss",
                    "cached_tokens",
                ]
            )
        for k in rows:
            w.writerow(
                [
                    dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                    f"{platform.machine()} x{os.cpu_count()} CPU",
                    torch.__version__,
                    vllm.__version__,
                    f"{n_params / 1e6:.1f}",
                    args.tokens,
                    args.chunk_size,
                    args.reps,
                    k,
                    f"{med[k]:.4f}",
                    f"{med[k] / miss_of(k):.4f}",
                    f"{cached[k]:.0f}",
                ]
            )
    print(f"appended to {CSV}")


def _count_params(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


if __name__ == "__main__":
    main()
