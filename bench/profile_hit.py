"""Where the time of a CPU-tier hit goes (issue 19): one in-process vLLM engine, bench_e2e's model.

For each prompt: a miss (stores every chunk), then the same prompt again (a CPU-tier hit). The
hit is timed as a whole (a 1-token generation, as bench_e2e) and broken down by wrapping our
hooks with timers, in this process only (nothing is changed in the package):
  scheduler hooks  get_num_new_matched_tokens, update_state_after_alloc, build_connector_meta,
                   update_connector_output, request_finished
  worker hooks     start_load_kv (of it: the copies `CopyPath.scatter`, the id/page-map work
                   `CopyPath.ids`), wait_for_save, build_connector_worker_meta, get_finished
  forward          vLLM's model forward (`GPUModelRunner`/`CPUModelRunner.execute_model` minus
                   the connector hooks it calls)
  rest             the hit's wall time minus the above (vLLM's scheduler, input preparation,
                   sampling, detokenisation, the LLM front end)
A second engine without the connector, with vLLM's own prefix cache on, serves the same prompt
twice: its second TTFT is the floor no connector can beat (vLLM's own hit: the last token's
forward plus vLLM's overhead).

With `--cprofile FILE`, the hits also run under cProfile (slower; the table's times are then
inflated, read the profile for the shape).

Usage: [PROFILE_TREE=DIR] python bench/profile_hit.py [--tokens 4096] [--reps 3] [--cprofile out.prof]
(PROFILE_TREE: profile the package of an older checkout, e.g. `git archive COMMIT | tar -x -C DIR`)
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time
from pathlib import Path

# PROFILE_TREE=DIR profiles the package in DIR (a checkout of an older commit) instead of this one.
sys.path.insert(0, os.environ.get("PROFILE_TREE") or str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

# The package first: bench_e2e puts this tree first on the path again, and PROFILE_TREE's must win.
from lmcache_triton.testing import build_tiny_model  # noqa: E402, I001
from lmcache_triton.testing.runner import EngineSpec, generate, shutdown, start_engine  # noqa: E402

from _common import work_dir  # noqa: E402
from bench_e2e import BENCH_MODEL, _prompts  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def _wrap(cls: type, name: str, label: str) -> None:
    fn = getattr(cls, name)

    @functools.wraps(fn)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[label] += time.perf_counter() - t0
            CALLS[label] += 1

    setattr(cls, name, timed)


def _instrument() -> None:
    from lmcache_triton.engine import copy_paths
    from lmcache_triton.engine.engine import KVCacheEngine
    from lmcache_triton.integration.vllm.scheduler import SchedulerConnector
    from lmcache_triton.integration.vllm.worker import WorkerConnector

    for name in (
        "get_num_new_matched_tokens",
        "update_state_after_alloc",
        "build_connector_meta",
        "update_connector_output",
        "request_finished",
    ):
        _wrap(SchedulerConnector, name, f"sched.{name}")
    for name in ("start_load_kv", "wait_for_save", "build_connector_worker_meta", "get_finished"):
        _wrap(WorkerConnector, name, f"worker.{name}")
    _wrap(KVCacheEngine, "load", "  engine.load")
    paths = [copy_paths.CopyPath, copy_paths.PackedPages, copy_paths.TokenRows, copy_paths.OpaquePages]
    paths += [copy_paths.StridedPages] if hasattr(copy_paths, "StridedPages") else []
    for cls in paths:
        for name in ("scatter", "ids"):
            if name in cls.__dict__:
                _wrap(cls, name, f"    path.{name}")
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as Runner
    except ImportError:  # pragma: no cover - other vLLM layouts
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner
    _wrap(Runner, "execute_model", "runner.execute_model")
    # The model's own forward (inside execute_model).
    import torch

    orig = torch.nn.Module.__call__

    def call(self, *a, **k):
        if type(self).__name__.endswith("ForCausalLM"):
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                TIMES["  model forward"] += time.perf_counter() - t0
                CALLS["  model forward"] += 1
        return orig(self, *a, **k)

    torch.nn.Module.__call__ = call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--cprofile", default=None)
    ap.add_argument("--no-floor", action="store_true", help="skip the engine without the connector")
    args = ap.parse_args()

    work = work_dir("lmct-profile-hit-")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-e2e", **BENCH_MODEL))
    max_len = args.tokens + 64
    prompts = _prompts(args.reps, args.tokens - 1, seed=7)
    base = dict(model=model, block_size=32, max_model_len=max_len, extra_args={"max_num_batched_tokens": max_len})
    connector = {"lmcache.chunk_size": args.chunk_size, "lmcache.max_local_cpu_size": 2}

    _instrument()
    llm = start_engine(EngineSpec(**base, connector=connector))
    import torch

    import lmcache_triton

    print(f"package {Path(lmcache_triton.__file__).parent}", flush=True)
    print(f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}", flush=True)
    generate(llm, [prompts[0][:512]], 1, measure_ttft=True)  # warm-up (not counted)
    hits, misses, breakdown = [], [], []
    prof = None
    for p in prompts:
        miss = generate(llm, [p], 1, measure_ttft=True)[0]
        TIMES.clear()
        CALLS.clear()
        if args.cprofile:
            import cProfile

            prof = prof or cProfile.Profile()
            prof.enable()
        hit = generate(llm, [p], 1, measure_ttft=True)[0]
        if prof is not None:
            prof.disable()
        # generate() runs the 1-token TTFT request then the timed-out 1-token logprob request:
        # halve the counters (both are hits of the same prompt).
        breakdown.append({k: v / 2 for k, v in TIMES.items()})
        misses.append(miss["ttft"])
        hits.append(hit["ttft"])
        print(
            f"miss {miss['ttft'] * 1e3:.0f} ms, hit {hit['ttft'] * 1e3:.1f} ms, cached {hit['num_cached_tokens']}",
            flush=True,
        )
    shutdown(llm)
    if prof is not None:
        prof.dump_stats(args.cprofile)

    floor = None
    if not args.no_floor:
        llm = start_engine(EngineSpec(**{**base, "prefix_caching": True}))
        floors = []
        for p in prompts:
            generate(llm, [p], 1, measure_ttft=True)
            floors.append(generate(llm, [p], 1, measure_ttft=True)[0]["ttft"])
        shutdown(llm)
        floor = statistics.median(floors)

    hit, miss = statistics.median(hits), statistics.median(misses)
    print(f"\nload {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M', time.gmtime())} UTC")
    print(f"miss {miss * 1e3:.0f} ms, CPU hit {hit * 1e3:.1f} ms = {hit / miss:.4f} of the miss")
    if floor is not None:
        print(f"vLLM's own prefix-cache hit (no connector): {floor * 1e3:.1f} ms = {floor / miss:.4f} of the miss")
    print(f"\n{'part of the hit (median per request)':<40}{'ms':>8}")
    keys = sorted({k for b in breakdown for k in b}, key=lambda k: (k.strip().split(".")[0], k))
    for k in keys:
        print(f"{k:<40}{statistics.median(b.get(k, 0.0) for b in breakdown) * 1e3:>8.2f}")


if __name__ == "__main__":
    main()
