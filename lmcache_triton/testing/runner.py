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
  ForkServer      `run_in_subprocess` (and `run_script_in_subprocess`) in children forked from a
                  process that has imported torch and vLLM and nothing more (`use_fork_server`):
                  still a new process per run.
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

if TYPE_CHECKING:
    import subprocess

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


def note_engine_start(kind: str) -> None:
    """Record one engine start in the file named by `LMCT_TEST_ENGINE_LOG`, if set, with the
    test that caused it (pytest's PYTEST_CURRENT_TEST, inherited by child processes)."""
    path = os.environ.get(ENGINE_LOG_ENV)
    if not path:
        return
    line = json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "kind": kind, "pid": os.getpid()})
    with open(path, "a") as f:
        f.write(line + "\n")


def start_engine(spec: EngineSpec) -> LLM:
    """A `vllm.LLM` for `spec` (imports vLLM)."""
    note_engine_start("multiprocess" if spec.multiprocess else "in-process")
    prepare_env(spec.multiprocess)
    from vllm import LLM

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
    return LLM(**kwargs)


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
    llm = start_engine(spec)
    try:
        return generate(llm, prompts, max_tokens, measure_ttft, ttft_from_metrics)
    finally:
        shutdown(llm)


def shutdown(llm: LLM) -> None:
    """Stop an engine and flush the connector (its disk writes) before returning."""
    engine = getattr(llm, "llm_engine", None)
    try:
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
    except Exception:  # best effort: the process may be ending anyway
        pass
    import gc

    del llm
    gc.collect()


def run_in_subprocess(
    spec: EngineSpec,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 8,
    measure_ttft: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    ttft_from_metrics: bool = False,
) -> list[dict]:
    """`run` in a fresh Python process (a real restart): a new interpreter, or a fork of the
    fork server when one is in use (`use_fork_server`)."""
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
        rc, stderr = _run_child([spec_path, out_path], {**os.environ, **(env or {})}, timeout)
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


def _run_child(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """`python -m lmcache_triton.testing.runner ARGV` in a fresh process: through the fork
    server when one is in use and accepts `env`, else a new interpreter."""
    server = _FORK_SERVER if _FORK_SERVER is not None and _FORK_SERVER.accepts(env) else None
    result = server.run(argv, env, timeout) if server is not None else None
    if result is not None:
        return result
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "lmcache_triton.testing.runner", *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return proc.returncode, proc.stderr


# ---------------------------------------------------------------------------------------------
# Fork server: a fresh process per engine run, without paying the imports each time.
# ---------------------------------------------------------------------------------------------

# Variables read when torch, vLLM or this package are IMPORTED: a job whose value differs from
# the fork server's runs in a new interpreter instead.
_IMPORT_TIME_ENV = (
    "PYTHONPATH", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "VLLM_TARGET_DEVICE", "VLLM_CONFIGURE_LOGGING",
    "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_PREFIX", "VLLM_PLUGINS",
)
# Never imported ahead by the fork server: the code under test is imported fresh by each child.
_NOT_PRELOADED = ("lmcache_triton", "__main__", "__mp_main__")
_FORK_SERVER: ForkServer | None = None


class ForkServer:
    """Engine runs (`run_in_subprocess`) in children forked from one process that has imported
    torch, vLLM and transformers and done nothing else.

    Starting a Python process that imports vLLM costs about 20 s of CPU on a small machine; the
    engine itself a few. Each child is still a new process: its own pid, memory, tiers and
    vLLM globals; nothing of an earlier run is in it (the server never runs an engine). After
    each run the server also imports what that child imported (this package excepted), so
    later children find it loaded. A job whose import-time variables (`_IMPORT_TIME_ENV`)
    differ from the server's runs in a new interpreter instead.

    Args:
        env: the server's environment (the import-time variables of its children).
        log_path: the server's own output; default a temporary file.
    """

    def __init__(self, env: dict[str, str], log_path: str | None = None):
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._results: TextIO | None = None
        self._child: int | None = None  # the running child, if a run was interrupted
        self.broken = False

    def accepts(self, env: dict[str, str]) -> bool:
        def imported_with(e: dict[str, str]) -> list[str | None]:
            # prepare_env sets VLLM_LOGGING_LEVEL=WARNING before a child imports vLLM.
            return [e.get(k) or ("WARNING" if k == "VLLM_LOGGING_LEVEL" else None) for k in _IMPORT_TIME_ENV]

        return not self.broken and imported_with(env) == imported_with(self.env)

    def _start(self) -> None:
        import subprocess
        import tempfile

        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="lmct-fork-server-", suffix=".log")
            os.close(fd)
        r, w = os.pipe()
        with open(self.log_path, "w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache_triton.testing.runner", "--fork-server", str(w)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,), env=self.env,
                text=True, start_new_session=True,
            )
        os.close(w)
        self._results = os.fdopen(r, "r")

    def _read(self, timeout: float) -> dict | None:
        import select

        assert self._results is not None
        ready, _, _ = select.select([self._results], [], [], timeout)
        line = self._results.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str] | None:
        """Run `runner._main(argv)` in a forked child with `env`; returns (exit code, stderr),
        or None when the server cannot fork (the caller starts a new interpreter instead)."""
        import signal
        import tempfile

        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        with tempfile.TemporaryDirectory() as d:
            err = os.path.join(d, "stderr")
            job = {"argv": argv, "env": env, "cwd": os.getcwd(), "stdout": os.path.join(d, "stdout"), "stderr": err}
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            started = self._read(600)  # the first job waits for the server's imports
            if started is None or "pid" not in started:
                import warnings

                warnings.warn(f"fork server unusable ({started}); engine runs start new interpreters: "
                              f"{self._log_tail()[-1000:]}", stacklevel=3)  # fmt: skip
                self.broken = True
                return None
            pid = self._child = started["pid"]
            done = self._read(timeout)
            self._child = None
            if done is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
                self.broken = True  # its answer may still come: start over with a new server
                import subprocess

                raise subprocess.TimeoutExpired(argv, timeout)
            with open(err, errors="replace") as f:
                return done["rc"], f.read()

    def _log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def close(self) -> None:
        import signal

        if self._child is not None:  # a run interrupted (e.g. by pytest-timeout): stop its child
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._child, signal.SIGKILL)
            self._child = None
        if self._proc is not None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except Exception:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._results is not None:
            self._results.close()
            self._results = None


def use_fork_server(server: ForkServer | None) -> ForkServer | None:
    """Route `run_in_subprocess` through `server` (None: new interpreters again); returns the
    one used before, for the caller to close."""
    global _FORK_SERVER
    previous, _FORK_SERVER = _FORK_SERVER, server
    return previous


def _fork_server_main(fd: int) -> int:
    """The fork server (`python -m lmcache_triton.testing.runner --fork-server FD`): imports,
    then for each job line on stdin forks a child that runs `_main(job["argv"])`; answers
    {"pid"} when the child starts and {"pid", "rc"} when it ends, on the pipe FD."""
    import importlib
    import threading

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import vllm  # noqa: F401
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.engine.llm_engine  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401

    out = os.fdopen(fd, "w")

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    for line in sys.stdin:
        job = json.loads(line)
        if threading.active_count() > 1:  # a Python thread would not survive the fork
            send({"error": f"threads in the fork server: {threading.enumerate()}"})
            return 1
        modules_path = job["stderr"] + ".modules"
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 1
            try:
                os.setpgid(0, 0)
                for target, path in ((1, job["stdout"]), (2, job["stderr"])):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(fd, target)
                    os.close(fd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                out.close()
                os.environ.clear()
                os.environ.update(job["env"])
                import tempfile

                tempfile.tempdir = None  # TMPDIR is the job's
                os.chdir(job["cwd"])
                before = set(sys.modules)
                rc = _main(job["argv"])
                with open(modules_path, "w") as f:
                    json.dump(sorted(set(sys.modules) - before), f)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        send({"pid": pid, "rc": os.waitstatus_to_exitcode(status)})
        # Load what the child needed, for the next one.
        try:
            with open(modules_path) as f:
                names = json.load(f)
        except (OSError, ValueError):
            names = []
        for name in names:
            if name.split(".")[0] not in _NOT_PRELOADED and name not in sys.modules:
                # Generated or platform-specific modules may fail here: the child imports them.
                with contextlib.suppress(Exception):
                    importlib.import_module(name)
    return 0


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

    The child is `python -m lmcache_triton.testing.runner --serve SPEC.json FD`: jobs come as
    JSON lines on its stdin, results go back as JSON lines on the pipe FD (vLLM prints on
    stdout). `close()` (or the end of a `with` block) stops it.
    """

    def __init__(self, spec: EngineSpec, env: dict[str, str] | None = None, log_path: str | None = None,
                 timeout: float = 600):
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
        r, w = os.pipe()
        with open(self.log_path, "w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache_triton.testing.runner", "--serve", spec_path, str(w)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,),
                env=dict(os.environ if env is None else env), text=True,
            )
        os.close(w)
        self._results = os.fdopen(r, "r")
        try:
            self._read()  # {"ready": true} once the engine is up
        except BaseException:
            self.close()
            raise

    def _read(self) -> Any:
        import select

        ready, _, _ = select.select([self._results], [], [], self.timeout)
        line = self._results.readline() if ready else ""
        if not line:
            self._proc.kill()
            self._proc.wait()
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-4000:]
            what = "timed out" if not ready else f"exited ({self._proc.returncode})"
            raise RuntimeError(f"engine process {what}:\n{tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"engine process job failed:\n{msg['error']}")
        return msg.get("result")

    def generate(self, prompts: Sequence[str | list[int]], max_tokens: int = 8) -> list[dict]:
        """`generate(llm, prompts, max_tokens)` in the child."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"prompts": list(prompts), "max_tokens": max_tokens}) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        import shutil
        import subprocess

        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # EOF: the child shuts its engine down and exits
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._results.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(spec_path: str, fd: int) -> int:
    """The child of `EngineProcess`."""
    import traceback

    with open(spec_path) as f:
        spec = EngineSpec(**json.load(f))
    out = os.fdopen(fd, "w")

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    llm = start_engine(spec)
    try:
        send({"ready": True})
        for line in sys.stdin:
            job = json.loads(line)
            try:
                send({"result": generate(llm, job["prompts"], job["max_tokens"])})
            except Exception:
                send({"error": traceback.format_exc()})
    finally:
        shutdown(llm)
    return 0


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve":
        return _serve(argv[1], int(argv[2]))
    if argv and argv[0] == "--fork-server":
        return _fork_server_main(int(argv[1]))
    if argv and argv[0] == "--script":  # run_script_in_subprocess
        import runpy

        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")
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
    sys.exit(_main(sys.argv[1:]))
