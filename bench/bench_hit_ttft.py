"""Hit TTFT through vLLM's OpenAI server: ours against LMCache's, same model, same prompts, one run (issue 19).

For each server (bench_serving.py's three: `vllm` alone, `ours` = LMCache's launch line served by
lmcache_triton, `lmcache` = LMCache 0.5.6's multi-process server + vLLM's LMCacheMPConnector from
scripts/bench_env_lmcache.sh's venv), with vLLM's own prefix cache OFF so a repeat can only be
served by the external cache (its CPU tier): each of `--prompts` prompts of `--tokens` tokens is
sent twice as a streamed chat completion of one token; the first send is a miss, the second a hit
(before them, one prompt of the same length is sent twice, not counted).
The client measures TTFT (send -> first streamed token). Reported per server: median miss and hit
TTFT, hit/miss, the hit's cached tokens, and whether the hit's token and logprob equal the miss's;
across servers: ours' hit against LMCache's (issue 19's target: <= 0.5x).

  python bench/bench_hit_ttft.py                          # vllm, ours, lmcache (needs the LMCache venv)
  python bench/bench_hit_ttft.py --servers ours,lmcache --prompts 7 --repeat 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_csv, work_dir  # noqa: E402
from bench_e2e import BENCH_MODEL  # noqa: E402
from bench_serving import (  # noqa: E402
    BLOCK,
    CHAT_TEMPLATE,
    REPO,
    SERVERS,
    Result,
    add_server_args,
    server,
    stream_chat,
)

from lmcache_triton.testing import build_tiny_model  # noqa: E402
from lmcache_triton.testing.tiny_model import sample_prompt  # noqa: E402

CSV = Path(__file__).with_name("results_hit_ttft.csv")


def ask(port: int, model: str, text: str, timeout: float) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "logprobs": True,
    }
    return stream_chat(port, body, timeout)


def run(name: str, args: argparse.Namespace, model: str, prompts: list[str], work: Path) -> list[tuple[Result, Result]]:
    pairs = []
    with server(name, args, model, work, prefix_caching=False) as (port, _log):
        # Not counted: a prompt of the same length, twice (the first long prefill and the first
        # hit pay one-time costs: allocator growth, the connector's first copies).
        warm = sample_prompt(model, args.tokens, seed=499)
        ask(port, model, warm, args.request_timeout)
        ask(port, model, warm, args.request_timeout)
        for text in prompts:
            miss = ask(port, model, text, args.request_timeout)
            hit = ask(port, model, text, args.request_timeout)
            for r in (miss, hit):
                if r.error:
                    raise RuntimeError(f"{name}: {r.error}")
            pairs.append((miss, hit))
    return pairs


def summarize(name: str, pairs: list[tuple[Result, Result]]) -> dict:
    miss = [m.ttft for m, _ in pairs]
    hit = [h.ttft for _, h in pairs]
    same = sum(m.token_ids == h.token_ids for m, h in pairs)
    dlp = max((abs(a - b) for m, h in pairs for a, b in zip(m.logprobs, h.logprobs, strict=False)), default=0.0)
    return {
        "server": name,
        "prompts": len(pairs),
        "prompt_tokens": statistics.median(h.prompt_tokens for _, h in pairs),
        "miss_ttft_s": statistics.median(miss),
        "hit_ttft_s": statistics.median(hit),
        "hit_over_miss": statistics.median(h / m for m, h in zip(miss, hit, strict=True)),
        "hit_cached_tokens": statistics.median(h.cached_tokens for _, h in pairs),
        "same_token": f"{same}/{len(pairs)}",
        "max_logprob_diff": dlp,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="vllm,ours,lmcache", help="comma-separated subset of vllm,ours,lmcache,base")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=5)
    add_server_args(ap)
    args = ap.parse_args()
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not names or any(n not in SERVERS for n in names):
        ap.error(f"--servers: choose from {','.join(SERVERS)}")
    if "lmcache" in names and not args.lmcache_python.exists():
        ap.error(f"no LMCache venv at {args.lmcache_python}: bash scripts/bench_env_lmcache.sh, or --servers vllm,ours")
    if "base" in names and not (args.base_tree and (args.base_tree / "lmcache_triton").is_dir()):
        ap.error("--servers base needs --base-tree DIR, a checkout holding lmcache_triton/")
    args.step_profile = None
    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-e2e", **BENCH_MODEL))
    prompts = [sample_prompt(model, args.tokens, seed=500 + i) for i in range(args.prompts)]
    args.max_model_len = int(math.ceil((args.tokens + 128) / 512) * 512)
    args.kv_blocks = 2 * math.ceil(args.max_model_len / BLOCK)  # vLLM's own cache: two prompts (prefix caching off)
    per_token = 2 * BENCH_MODEL["num_layers"] * BENCH_MODEL["num_kv_heads"] * BENCH_MODEL["head_size"] * 4
    args.cpu_gb = max(0.25, math.ceil(2 * args.prompts * args.max_model_len * per_token / 2**30 * 4) / 4)

    work = work_dir("lmct-bench-hit-ttft-")
    (work / "tmp").mkdir()
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    os.chdir(work)  # `python -m` puts the working directory first on the path (see bench_serving)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for p in range(args.repeat):
        for name in names if p % 2 == 0 else list(reversed(names)):
            print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] pass {p + 1}: {name} ...", flush=True)
            row = summarize(name, run(name, args, model, prompts, work))
            row["pass"] = p + 1
            rows.append(row)
    lmc = {r["pass"]: r["hit_ttft_s"] for r in rows if r["server"] == "lmcache"}
    print(f"\n{args.prompts} prompts x {args.tokens} tokens, chunk {args.chunk_size}, vLLM prefix cache off")
    hdr = f"{'server':<9}{'pass':>5}{'miss s':>9}{'hit s':>9}{'hit/miss':>10}{'cached':>8}{'vs LMC hit':>11}"
    print(hdr + f"{'same':>7}{'max dlogp':>11}")
    for r in rows:
        r["hit_vs_lmcache"] = r["hit_ttft_s"] / lmc[r["pass"]] if r["pass"] in lmc else math.nan
        print(
            f"{r['server']:<9}{r['pass']:>5}{r['miss_ttft_s']:>9.3f}{r['hit_ttft_s']:>9.3f}{r['hit_over_miss']:>10.2%}"
            f"{r['hit_cached_tokens']:>8.0f}{r['hit_vs_lmcache']:>11.2f}{r['same_token']:>7}{r['max_logprob_diff']:>11.1e}"
        )
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if not args.no_csv:
        commit = os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()
        head = {"started_utc": f"{started:%Y-%m-%d %H:%M}", "host": platform.node(), "commit": commit,
                "tokens": args.tokens, "chunk_size": args.chunk_size, "reserved_cpus": args.reserved_cpus}  # fmt: skip
        load = {"load_1m": f"{load_before[0]:.2f}/{load_after[0]:.2f}"}
        out = [{**head, **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()}, **load} for r in rows]
        append_csv(CSV, list(out[0]), out)

if __name__ == "__main__":
    main()
