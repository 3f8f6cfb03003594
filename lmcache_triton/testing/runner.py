"""Run prompts through a real vLLM engine, with or without the lmcache_triton connector.

It drives vLLM through its public offline API only (`LLM`, `SamplingParams`, `KVTransferConfig`);
anything that reaches into the connector lives in `integration/vllm/`.

Used by the end-to-end tests, the demo, `lmcache-triton warm` and bench/bench_e2e.py. In a
separate process (`python -m lmcache_triton.testing.runner SPEC.json OUT.json`) it gives an
honest "restart": nothing survives but what the disk tier wrote.

Outputs per prompt: generated token ids and text, the chosen tokens' logprobs, vLLM's
`num_cached_tokens`, and the time to first token measured as the wall time of a 1-token
generation (prefill + one sample) when `measure_ttft` is set.

For the test suite, whose cost is engine starts:
  EngineProcess   an engine in a child process that answers job after job (the no-cache
                  reference outputs every module compares with).
  fork_server     `run_in_subprocess`, `run_script_in_subprocess` and `EngineProcess` in children
                  forked from a process that has imported torch and vLLM and nothing more
                  (`fork_server.use_fork_server`): still a new process per run.
  isolate         a new key epoch between tests sharing one engine, instead of a new engine.
  note_engine_start  one line per engine start in $LMCT_TEST_ENGINE_LOG (the suite counts them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from lmcache_triton.testing.fork_server import FORKED_ENV, PYTHON, fork_server_for

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.config import KVTransferConfig

CONNECTOR_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
# When set (the test suite's conftest sets it), every engine start appends one JSON line here:
# the suite's cost is its engine starts, and the session summary counts them per module.
ENGINE_LOG_ENV = "LMCT_TEST_ENGINE_LOG"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"


@dataclass
class EngineSpec:
    """How to start the engine.

    Args:
        model: a local model directory.
        connector: `kv_connector_extra_config` for the connector (keys `lmcache.*`), or None to
            run without it.
        prefix_caching: vLLM's own prefix cache (off by default so hits come from us).
        multiprocess: vLLM's default multi-process engine (EngineCore in its own process)
            instead of the in-process one.
        max_model_len: context length; None is the model's.
        block_size: vLLM block size; None lets vLLM choose (CPU needs a multiple of 32).
        extra_args: more `vllm.LLM(...)` keyword arguments.
        by_name: name the connector `LMCacheTritonConnector` (registered by our
            `vllm.general_plugins` entry point) instead of giving its module path.
        failure_policy: vLLM's `kv_load_failure_policy`; default None leaves vLLM's default
            ("fail", what LMCache's launch line runs): nothing in our tiers may fail a request.
        kv_role: vLLM's `kv_role`: "kv_both" (default), "kv_producer" or "kv_consumer".
    """

    model: str
    connector: dict[str, Any] | None = None
    prefix_caching: bool = False
    multiprocess: bool = False
    max_model_len: int | None = 4096
    block_size: int | None = None
    dtype: str = "float32"
    extra_args: dict[str, Any] = field(default_factory=dict)
    by_name: bool = False
    failure_policy: str | None = None
    kv_role: str = "kv_both"


def kv_transfer_config(
    extra: dict[str, Any], by_name: bool = False, failure_policy: str | None = None, kv_role: str = "kv_both"
) -> KVTransferConfig:
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(kv_role=kv_role, kv_connector_extra_config=dict(extra))
    if failure_policy is not None:
        kwargs["kv_load_failure_policy"] = failure_policy
    if by_name:
        from lmcache_triton.integration.vllm.plugin import CONNECTOR_NAME

        return KVTransferConfig(kv_connector=CONNECTOR_NAME, **kwargs)
    return KVTransferConfig(kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE, **kwargs)


def prepare_env(multiprocess: bool = False) -> None:
    """Environment vLLM needs on this kind of machine, unless the caller set it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def note_engine_start(kind: str, origin: str | None = None) -> None:
    """Record one engine start in the file named by `LMCT_TEST_ENGINE_LOG`, if set, with the
    test that caused it (pytest's PYTEST_CURRENT_TEST, inherited by child processes)."""
    path = os.environ.get(ENGINE_LOG_ENV)
    if not path:
        return
    line = json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "kind": kind, "pid": os.getpid(),
                       "origin": origin or process_origin()})  # fmt: skip
    with open(path, "a") as f:
        f.write(line + "\n")


def process_origin() -> str:
    """How this process came to run an engine: "pytest" (the test process itself), "fork" (a
    child of the fork server: imports already paid) or "new" (a new interpreter that imported
    torch and vLLM itself, ~15-20 CPU-s on 2 cores)."""
    if os.environ.get(FORKED_ENV) == str(os.getpid()):
        return "fork"
    return "pytest" if "_pytest" in sys.modules else "new"


_frozen_engines = 0  # engines of this process started under the suite's collector freeze


def _freeze_heap() -> None:
    """In the test suite (`ENGINE_LOG_ENV` set) only: every object alive before an engine starts
    goes to the garbage collector's permanent generation until the last such engine of the
    process is shut down (`shutdown` unfreezes, then collects). vLLM's start-up runs nine full
    collections, each over the whole heap of a process with torch and vLLM loaded (and in the
    test process, pytest and every test module): 3.6 of a tiny engine run's 6.8 CPU-s. Nothing
    that dies while frozen is lost: it is collected after the unfreeze."""
    global _frozen_engines
    if os.environ.get(ENGINE_LOG_ENV):
        import gc

        gc.freeze()
        _frozen_engines += 1


def _unfreeze_heap() -> None:
    global _frozen_engines
    if _frozen_engines:
        import gc

        _frozen_engines -= 1
        if not _frozen_engines:
            gc.unfreeze()


def start_engine(spec: EngineSpec) -> LLM:
    """A `vllm.LLM` for `spec` (imports vLLM)."""
    note_engine_start("multiprocess" if spec.multiprocess else "in-process")
    prepare_env(spec.multiprocess)
    from vllm import LLM

    _freeze_heap()
    try:
        return LLM(**_llm_kwargs(spec))
    except BaseException:
        _unfreeze_heap()
        raise


def _llm_kwargs(spec: EngineSpec) -> dict[str, Any]:

    kwargs: dict[str, Any] = dict(
        model=spec.model,
        dtype=spec.dtype,
        enforce_eager=True,
        enable_prefix_caching=spec.prefix_caching,
        max_model_len=spec.max_model_len,
        seed=0,
    )
    if spec.block_size is not None:
        kwargs["block_size"] = spec.block_size
    if spec.connector is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(
            spec.connector, spec.by_name, spec.failure_policy, spec.kv_role
        )
    kwargs.update(spec.extra_args)
    return kwargs


def generate(
    llm: LLM,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    """Greedy generation, one request at a time; see the module docstring for the fields.

    With `ttft_from_metrics`, each prompt is ONE request and its TTFT is vLLM's own
    `RequestOutput.metrics.first_token_latency` (start the engine with
    `extra_args={"disable_log_stats": False}`, else it is None): the request timed is the one
    whose output is returned, so a first (missing) request is timed and compared as a miss.
    """
    from vllm import SamplingParams

    out = []
    for p in prompts:
        prompt = {"prompt_token_ids": list(p)} if not isinstance(p, str) else p
        ttft = None
        if measure_ttft and not ttft_from_metrics:
            t0 = time.perf_counter()
            first = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
            ttft = time.perf_counter() - t0
            cached = first.num_cached_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
        r = llm.generate([prompt], params, use_tqdm=False)[0]
        c = r.outputs[0]
        if ttft_from_metrics:
            ttft = getattr(r.metrics, "first_token_latency", None) or None
            cached = r.num_cached_tokens
        logprobs = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs or [], strict=False)]
        out.append(
            {
                "token_ids": list(c.token_ids),
                "text": c.text,
                "logprobs": logprobs,
                "num_cached_tokens": cached if measure_ttft or ttft_from_metrics else r.num_cached_tokens,
                "num_prompt_tokens": len(r.prompt_token_ids or []),
                "ttft": ttft,
            }
        )
    return out


def isolate(llm: LLM) -> None:
    """Isolate what runs next on `llm` from what ran before, without a new engine: vLLM's
    `reset_prefix_cache(reset_connector=True)` (= POST /reset_prefix_cache?reset_external=true)
    empties vLLM's own prefix cache and gives the connector a new key epoch, so no chunk stored
    before is served after. The epoch lives in the process: a restarted engine reads epoch 0."""
    if not llm.reset_prefix_cache(reset_connector=True):
        raise RuntimeError("reset_prefix_cache(reset_connector=True) failed (requests still running?)")


def run(
    spec: EngineSpec,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    """One engine's outputs for `prompts`, in a process that ends next (`main`)."""
    llm = start_engine(spec)
    try:
        return generate(llm, prompts, max_tokens, measure_ttft, ttft_from_metrics)
    finally:
        shutdown(llm, collect=False)


def shutdown(llm: LLM, collect: bool = True) -> None:
    """Stop an engine and flush the connector (its disk writes) before returning; then, unless
    `collect` is False (the process ends next: a full collection of its heap costs ~0.6 CPU-s
    and frees nothing the exit would not), collect the engine's garbage."""
    engine = getattr(llm, "llm_engine", None)
    try:
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
    except Exception:  # best effort: the process may be ending anyway
        pass
    import gc

    del llm
    _unfreeze_heap()
    if collect:
        gc.collect()


def run_in_subprocess(
    spec: EngineSpec,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    ttft_from_metrics: bool = False,
    log_path: str | None = None,
) -> list[dict]:
    """`run` in a fresh Python process (a real restart): a new interpreter, or a fork of the
    fork server when one is in use (`fork_server.use_fork_server`). `log_path`: where the
    child's stdout and stderr go (vLLM's log); default: kept only to report a failure."""
    import tempfile
    from dataclasses import asdict

    with tempfile.TemporaryDirectory() as d:
        spec_path, out_path = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "spec": asdict(spec),
                    "prompts": list(prompts),
                    "max_tokens": max_tokens,
                    "measure_ttft": measure_ttft,
                    "ttft_from_metrics": ttft_from_metrics,
                },
                f,
            )
        rc, stderr = _run_child([spec_path, out_path], {**os.environ, **(env or {})}, timeout, log_path, log_path)
        if rc != 0:
            raise RuntimeError(f"engine subprocess failed ({rc}):\n{stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def run_script_in_subprocess(
    path: str, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, str]:
    """Run the Python file `path` as `__main__` with `sys.argv[1:] = args` in a fresh process
    (a fork of the fork server when one is in use, else a new interpreter), for a test whose
    engine needs more than `run` does; returns (exit code, stderr)."""
    return _run_child(["--script", path, *args], {**os.environ, **(env or {})}, timeout)


def run_module_in_subprocess(
    module: str, args: Sequence[str], stdout: str, stderr: str, env: dict[str, str] | None = None,
    timeout: float = 600,
) -> int:  # fmt: skip
    """`python -m module ARGS` in a fresh process (a fork of the fork server when one is in use,
    else a new interpreter), its stdout and stderr written to these files (one file when the
    paths are equal); returns its exit code. The suite runs `warm`'s and `calibrate`'s engine
    child (`child_job.run_child`) this way."""
    return _run_child(["--module", module, *args], {**os.environ, **(env or {})}, timeout, stdout, stderr)[0]


def _run_child(argv: list[str], env: dict[str, str], timeout: float, stdout: str | None = None,
               stderr: str | None = None) -> tuple[int, str]:  # fmt: skip
    """`python -m lmcache_triton.testing.runner ARGV` in a fresh process: through the fork
    server when one is in use and accepts `env`, else a new interpreter. Returns (exit code,
    the text of its stderr); stdout and stderr go to these files if given (default: kept only
    for the answer)."""
    server = fork_server_for(env)
    result = server.run(argv, env, timeout, stdout, stderr) if server is not None else None
    if result is not None:
        return result
    import subprocess

    cmd = [*PYTHON, "-m", "lmcache_triton.testing.runner", *argv]
    if stdout is None and stderr is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stderr
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(stdout, "w")) if stdout is not None else subprocess.DEVNULL
        err = subprocess.STDOUT if stderr == stdout else files.enter_context(open(stderr, "w")) if stderr else None
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=err, timeout=timeout).returncode
    if stderr is None:
        return rc, ""
    with open(stderr, errors="replace") as f:
        return rc, f.read()


class EngineProcess:
    """An engine in a child process that stays up between jobs.

    The test suite's no-cache baselines run here: one engine per (model, block size) answers
    every module's prompts, instead of one engine start per module. Outputs do not depend on
    what ran before (greedy, one request at a time, vLLM's prefix cache off unless the spec
    turns it on), so sharing the engine changes no result.

    Args:
        spec: the engine to start.
        env: the child's whole environment; default the caller's.
        log_path: where the child's stdout and stderr go; default a temporary file.
        timeout: seconds to wait for the engine to start and for each job.

    The child is `python -m lmcache_triton.testing.runner --serve SPEC.json SOCKET`, forked from
    the fork server when one is in use and accepts `env` (no imports to pay), else a new
    interpreter. It connects to the Unix socket SOCKET this process listens on; jobs go there as
    JSON lines and results come back the same way (vLLM prints on stdout). `close()` (or the end
    of a `with` block) stops it.
    """

    def __init__(self, spec: EngineSpec, env: dict[str, str] | None = None, log_path: str | None = None,
                 timeout: float = 600):
        import socket
        import subprocess
        import tempfile
        from dataclasses import asdict

        self.spec = spec
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="lmct-engine-")
        spec_path = os.path.join(self._dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(asdict(spec), f)
        self.log_path = log_path or os.path.join(self._dir, "engine.log")
        sock_path = os.path.join(self._dir, "jobs.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(1)
        argv = ["--serve", spec_path, sock_path]
        env = dict(os.environ if env is None else env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._server, self._job = fork_server_for(env), -1
        started = self._server.start(argv, env, self.log_path, self.log_path) if self._server is not None else None
        if started is not None:
            self._job = started[0]
        else:
            self._server = None
            with open(self.log_path, "w") as log:
                self._proc = subprocess.Popen([*PYTHON, "-m", "lmcache_triton.testing.runner", *argv],
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              env=env)  # fmt: skip
        self._conn: socket.socket | None = None
        self._file: TextIO | None = None
        try:
            listener.settimeout(0.5)
            deadline = time.monotonic() + timeout
            while self._conn is None:
                try:
                    self._conn, _ = listener.accept()
                except TimeoutError:
                    if not self._alive() or time.monotonic() > deadline:
                        self._fail("timed out" if self._alive() else "exited")
            self._conn.settimeout(None)
            self._file = self._conn.makefile("rw", encoding="utf-8")
            self._read()  # {"ready": true} once the engine is up
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _alive(self) -> bool:
        if self._server is not None:
            return self._server.ended(self._job) is None
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        if self._server is not None:
            self._server.kill(self._job)
            self._server.wait(self._job, 60)
        elif self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    def _fail(self, what: str) -> None:
        self._kill()
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"engine process {what}:\n{tail}")

    def _read(self) -> Any:
        import select

        assert self._conn is not None and self._file is not None
        ready, _, _ = select.select([self._conn], [], [], self.timeout)
        line = self._file.readline() if ready else ""
        if not line:
            self._fail("timed out" if not ready else "exited")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"engine process job failed:\n{msg['error']}")
        return msg.get("result")

    def generate(self, prompts: Sequence[str | list[int]], max_tokens: int = 8) -> list[dict]:
        """`generate(llm, prompts, max_tokens)` in the child."""
        assert self._file is not None
        self._file.write(json.dumps({"prompts": list(prompts), "max_tokens": max_tokens}) + "\n")
        self._file.flush()
        return self._read()

    def close(self) -> None:
        """EOF on the socket: the child shuts its engine down and exits (killed after 60 s)."""
        import shutil
        import subprocess

        for closable in (self._file, self._conn):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()
        self._file = self._conn = None
        if self._server is not None:
            if self._server.wait(self._job, 60) is None:
                self._kill()
            self._server = None
        elif self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(spec_path: str, sock_path: str) -> int:
    """The child of `EngineProcess`."""
    import socket
    import traceback

    with open(spec_path) as f:
        spec = EngineSpec(**json.load(f))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    io = conn.makefile("rw", encoding="utf-8")

    def send(msg: dict) -> None:
        io.write(json.dumps(msg) + "\n")
        io.flush()

    llm = start_engine(spec)
    try:
        send({"ready": True})
        for line in io:
            job = json.loads(line)
            try:
                send({"result": generate(llm, job["prompts"], job["max_tokens"])})
            except Exception:
                send({"error": traceback.format_exc()})
    finally:
        shutdown(llm)
    return 0


def main(argv: list[str]) -> int:
    """`python -m lmcache_triton.testing.runner ARGV` (also what a fork-server child runs):
    `SPEC.json OUT.json` (`run_in_subprocess`), `--serve SPEC.json SOCKET` (`EngineProcess`),
    `--script FILE ARGS...` (`run_script_in_subprocess`) or `--module NAME ARGS...`
    (`run_module_in_subprocess`)."""
    if argv and argv[0] == "--serve":
        return _serve(argv[1], argv[2])
    if argv and argv[0] == "--script":  # run_script_in_subprocess
        import runpy

        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")
        return 0
    if argv and argv[0] == "--module":  # run_module_in_subprocess
        import runpy

        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    spec_path, out_path = argv
    with open(spec_path) as f:
        job = json.load(f)
    spec = EngineSpec(**job["spec"])
    ttft_from_metrics = job.get("ttft_from_metrics", False)
    results = run(spec, job["prompts"], job["max_tokens"], job["measure_ttft"], ttft_from_metrics)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
