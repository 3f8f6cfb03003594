"""Step profile of a vLLM OpenAI server (bench_serving.py --step-profile): imported at start-up
of every Python process whose PYTHONPATH holds this folder; active where LMCT_STEP_PROFILE is set.

Writes one JSON line per engine step to `$LMCT_STEP_PROFILE.<pid>`: its start (time.time()), its
duration, the requests it scheduled (id, prompt tokens, computed tokens before the step, tokens
scheduled), and the time spent in each KV connector hook during it (any connector: ours,
LMCache's MP connector). Lookups (`get_num_new_matched_tokens`) are recorded with vLLM's local
hit and the connector's answer. Nothing of the package is changed; the timers wrap the objects.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time

_OUT = os.environ.get("LMCT_STEP_PROFILE")
_HOOKS = (
    "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "update_connector_output",
    "request_finished", "start_load_kv", "wait_for_save", "get_finished", "save_kv_layer", "wait_for_layer_load",
    "build_connector_worker_meta",
)  # fmt: skip
_WORKER_HOOKS = ("start_load_kv", "wait_for_save", "get_finished")
_cur: dict = {"hooks": {}, "lookups": []}
_lock = threading.Lock()
_file = None


def _emit(rec: dict) -> None:
    global _file
    if _file is None:
        _file = open(f"{_OUT}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115
    _file.write(json.dumps(rec) + "\n")


def _wrap_connector(conn: object) -> object:
    for name in _HOOKS:
        fn = getattr(conn, name, None)
        if fn is None:
            continue

        def timed(*a, __fn=fn, __name=name, **k):
            t0 = time.perf_counter()
            try:
                out = __fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                with _lock:
                    _cur["hooks"][__name] = _cur["hooks"].get(__name, 0.0) + dt
            if __name in _WORKER_HOOKS and dt > 0.0005:  # the worker may be another process
                _emit({"t": time.time() - dt, "hook": __name, "dur": dt})
            if __name == "get_num_new_matched_tokens":
                req = a[0]
                with _lock:
                    _cur["lookups"].append(
                        [req.request_id, req.num_prompt_tokens, a[1], out[0] if out else None, bool(out and out[1])]
                    )
            return out

        setattr(conn, name, timed)
    return conn


def _patch(mod) -> None:
    name = mod.__name__
    if name == "vllm.distributed.kv_transfer.kv_connector.factory":
        cls = mod.KVConnectorFactory
        orig = cls.create_connector.__func__

        def create_connector(c, *a, **k):
            return _wrap_connector(orig(c, *a, **k))

        cls.create_connector = classmethod(create_connector)
    elif name == "vllm.v1.engine.core":
        core = mod.EngineCore
        for meth in ("step", "step_with_batch_queue"):
            fn = getattr(core, meth, None)
            if fn is None:
                continue

            def step(self, *a, __fn=fn, **k):
                t_wall, t0 = time.time(), time.perf_counter()
                with _lock:
                    _cur["hooks"], _cur["lookups"], _cur["sched"] = {}, [], None
                out = __fn(self, *a, **k)
                dt = time.perf_counter() - t0
                with _lock:
                    rec = {"t": t_wall, "dur": dt, "hooks": _cur["hooks"], "lookups": _cur["lookups"],
                           "sched": _cur.get("sched")}  # fmt: skip
                if rec["sched"] or rec["lookups"]:
                    _emit(rec)
                return out

            setattr(core, meth, step)
    elif name == "vllm.v1.core.sched.scheduler":
        sch = mod.Scheduler
        orig_schedule = sch.schedule

        def schedule(self, *a, **k):
            t0 = time.perf_counter()
            out = orig_schedule(self, *a, **k)
            dt = time.perf_counter() - t0
            reqs = []
            for rid, n in out.num_scheduled_tokens.items():
                r = self.requests.get(rid)
                reqs.append([rid, r.num_prompt_tokens if r else -1, (r.num_computed_tokens if r else -1), n])
            with _lock:
                _cur["sched"] = reqs
                _cur["hooks"]["schedule"] = _cur["hooks"].get("schedule", 0.0) + dt
            return out

        sch.schedule = schedule


class _Finder(importlib.abc.MetaPathFinder):
    WANT = {"vllm.distributed.kv_transfer.kv_connector.factory", "vllm.v1.engine.core", "vllm.v1.core.sched.scheduler"}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.WANT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module, __orig=orig_exec):
            __orig(module)
            try:
                _patch(module)
            except Exception as e:  # a profile must never take the server down
                print(f"step profile: patching {module.__name__} failed: {e!r}", file=sys.stderr)

        loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())
