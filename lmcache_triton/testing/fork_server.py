"""A fork server: fresh processes for engine runs without paying the imports each time.

Starting a Python process that imports torch and vLLM costs about 20 s of CPU on a small machine;
the tiny test engine itself a few. The test suite routes `runner.run_in_subprocess`,
`runner.run_script_in_subprocess` and `runner.EngineProcess` through one `ForkServer`
(`use_fork_server`): a process that has imported torch, vLLM and transformers and done nothing
else forks a child per job. Each child is still a new process: its own pid, memory, tiers and
vLLM globals; nothing of an earlier job is in it (the server never runs an engine).

Primitives:
  ForkServer.start(argv, env, stdout, stderr) -> (job id, pid)   a child runs `runner.main(argv)`
  ForkServer.wait(job, timeout) / ended(job) / kill(job)          its exit code, without blocking others
  ForkServer.run(argv, env, timeout)                              start + wait: (exit code, stderr)

Invariants:
  * Children run concurrently: a long-lived engine child (`EngineProcess`, the suite's no-cache
    reference) does not hold up the next job.
  * A job whose import-time variables (`IMPORT_TIME_ENV`) differ from the server's is refused
    (`accepts`): the caller starts a new interpreter instead.
  * The server holds no Python thread when it forks (checked per job) and imports nothing of this
    package ahead: each child imports the code under test itself. After a child ends, the server
    imports what that child imported (this package excepted), so later children find it loaded.
  * Each child leads its own process group (`kill` ends the child and whatever it started).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import subprocess

# How child interpreters start (this server, and the runner's children that it does not fork):
# `-P` (Python 3.11+) keeps the working directory off sys.path, so the package comes from the
# child's PYTHONPATH (a benchmark's `--before DIR`) or its install, not from a checkout the
# caller happens to stand in.
PYTHON: tuple[str, ...] = (sys.executable, "-P") if sys.version_info >= (3, 11) else (sys.executable,)

# Variables read when torch, vLLM or this package are IMPORTED: a job whose value differs from
# the fork server's runs in a new interpreter instead.
IMPORT_TIME_ENV = (
    "PYTHONPATH", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "VLLM_TARGET_DEVICE", "VLLM_CONFIGURE_LOGGING",
    "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_PREFIX", "VLLM_PLUGINS",
)
# What the server imports before its first fork (an engine run needs all of it).
PRELOAD = ("torch", "transformers", "vllm", "vllm.v1.engine.core", "vllm.v1.engine.llm_engine")
# Never imported ahead by the fork server: the code under test is imported fresh by each child.
_NOT_PRELOADED = ("lmcache_triton", "__main__", "__mp_main__")
# Set in each child the server forks, to the child's pid (so not true in anything the child
# starts): `runner.process_origin` tells a forked engine from a new interpreter's.
FORKED_ENV = "LMCT_FORK_SERVER_CHILD"

_FORK_SERVER: ForkServer | None = None


class ForkServer:
    """Jobs run in children forked from one process that has imported `preload` and done nothing
    else (module docstring). Started on the first job.

    Args:
        env: the server's environment (the import-time variables of its children).
        log_path: the server's own output; default a temporary file.
        preload: modules imported before the first fork; default `PRELOAD` (torch, vLLM, ...).
    """

    def __init__(self, env: dict[str, str], log_path: str | None = None, preload: Sequence[str] = PRELOAD):
        self.env = dict(env)
        self.log_path = log_path
        self.preload = list(preload)
        self._proc: subprocess.Popen[str] | None = None
        self._results: TextIO | None = None
        self._next_id = 0
        self._pids: dict[int, int] = {}  # job id -> its child's pid, until its exit code is taken
        self._ended: dict[int, int] = {}  # job id -> exit code, not yet taken
        self._error: object = None  # the server's last message that was not an answer
        self.broken = False

    def accepts(self, env: dict[str, str]) -> bool:
        def imported_with(e: dict[str, str]) -> list[str | None]:
            # prepare_env sets VLLM_LOGGING_LEVEL=WARNING before a child imports vLLM.
            return [e.get(k) or ("WARNING" if k == "VLLM_LOGGING_LEVEL" else None) for k in IMPORT_TIME_ENV]

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
                [*PYTHON, "-m", __name__, str(w), ",".join(self.preload)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,), env=self.env,
                text=True, start_new_session=True,
            )
        os.close(w)
        self._results = os.fdopen(r, "r")

    def _pump(self, timeout: float) -> bool:
        """Take one message from the server within `timeout` seconds; False when none came."""
        import select

        assert self._results is not None
        ready, _, _ = select.select([self._results], [], [], max(0.0, timeout))
        line = self._results.readline() if ready else ""
        msg = json.loads(line) if line else None
        if not isinstance(msg, dict) or "id" not in msg:
            if msg is not None:
                self._error = msg
            return False
        if "rc" in msg:
            self._ended[msg["id"]] = msg["rc"]
        else:
            self._pids[msg["id"]] = msg["pid"]
        return True

    def start(self, argv: list[str], env: dict[str, str], stdout: str, stderr: str) -> tuple[int, int] | None:
        """Fork a child that runs `runner.main(argv)` with `env` and the caller's working
        directory, its stdout and stderr written to these files (one file when the paths are
        equal). Returns (job id, pid), or None when the server cannot fork (it is then `broken`
        and the caller starts a new interpreter)."""
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        job_id, self._next_id = self._next_id, self._next_id + 1
        job = {"id": job_id, "argv": argv, "env": env, "cwd": os.getcwd(), "stdout": stdout, "stderr": stderr}
        self._error = None
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except OSError as e:
            self._error = repr(e)
        else:
            deadline = time.monotonic() + 600  # the first job waits for the server's imports
            while job_id not in self._pids and self._pump(deadline - time.monotonic()):
                pass
        if job_id not in self._pids:
            import warnings

            warnings.warn(f"fork server unusable ({self._error}); engine runs start new interpreters: "
                          f"{self._log_tail()[-1000:]}", stacklevel=3)  # fmt: skip
            self.broken = True
            return None
        return job_id, self._pids[job_id]

    def ended(self, job_id: int) -> int | None:
        """The job's exit code if its child has ended, without waiting (it stays to be taken by
        `wait`)."""
        while job_id not in self._ended and self._pump(0):
            pass
        return self._ended.get(job_id)

    def wait(self, job_id: int, timeout: float) -> int | None:
        """The job's exit code once its child ends, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while job_id not in self._ended:
            if not self._pump(deadline - time.monotonic()) and time.monotonic() >= deadline:
                return None
            if self._results is not None and self._proc is not None and self._proc.poll() is not None:
                self.ended(job_id)  # the server is gone: what it said last is all there is
                if job_id not in self._ended:
                    return None
        self._pids.pop(job_id, None)
        return self._ended.pop(job_id)

    def kill(self, job_id: int) -> None:
        """SIGKILL the job's child and its process group (its exit code still arrives)."""
        import signal

        pid = self._pids.get(job_id)
        if pid is not None and job_id not in self._ended:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def run(self, argv: list[str], env: dict[str, str], timeout: float, stdout: str | None = None,
            stderr: str | None = None) -> tuple[int, str] | None:  # fmt: skip
        """Run `runner.main(argv)` in a forked child with `env`; returns (exit code, the text of
        its stderr), or None when the server cannot fork (the caller starts a new interpreter
        instead). Its stdout and stderr go to these files if given (the same path: one file)."""
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            out = stdout or os.path.join(d, "stdout")
            err = stderr or os.path.join(d, "stderr")
            started = self.start(argv, env, out, err)
            if started is None:
                return None
            job_id, _ = started
            rc = self.wait(job_id, timeout)
            if rc is None:
                self.kill(job_id)
                self.broken = True  # its answer may still come: start over with a new server
                raise subprocess.TimeoutExpired(argv, timeout)
            with open(err, errors="replace") as f:
                return rc, f.read()

    def _log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def close(self) -> None:
        """Kill children still running (a run interrupted, e.g. by pytest-timeout) and stop the
        server."""
        for job_id in list(self._pids):
            self.kill(job_id)
        self._pids.clear()
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
    """Route `runner.run_in_subprocess`, `run_script_in_subprocess` and `EngineProcess` through
    `server` (None: new interpreters again); returns the one used before, for the caller to close."""
    global _FORK_SERVER
    previous, _FORK_SERVER = _FORK_SERVER, server
    return previous


def fork_server_for(env: dict[str, str]) -> ForkServer | None:
    """The fork server in use, if it can run a job with `env`."""
    server = _FORK_SERVER
    return server if server is not None and server.accepts(env) else None


def _child(job: dict, out: TextIO) -> None:
    """The forked child: never returns."""
    rc = 1
    try:
        os.setpgid(0, 0)
        opened: dict[str, int] = {}
        for target, key in ((1, "stdout"), (2, "stderr")):
            path = job[key]
            if path not in opened:
                opened[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(opened[path], target)
        for fd in opened.values():
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        out.close()
        os.environ.clear()
        os.environ.update(job["env"])
        os.environ[FORKED_ENV] = str(os.getpid())
        import tempfile

        tempfile.tempdir = None  # TMPDIR is the job's
        os.chdir(job["cwd"])
        before = set(sys.modules)
        from lmcache_triton.testing.runner import main

        rc = main(job["argv"])
        with open(job["stderr"] + ".modules", "w") as f:
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


def _serve(fd: int, preload: list[str]) -> int:
    """The fork server (`python -m lmcache_triton.testing.fork_server FD MODULES`): imports
    MODULES, then for each job line on stdin forks a child (`_child`); answers {"id", "pid"} when
    the child starts and {"id", "pid", "rc"} when it ends, on the pipe FD. On EOF it kills the
    children still running and exits."""
    import gc
    import importlib
    import select
    import signal
    import threading

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    for name in preload:
        importlib.import_module(name)
    out = os.fdopen(fd, "w")

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    children: dict[int, tuple[int, str]] = {}  # pid -> (job id, the file of its imports)
    buf, eof = b"", False
    while not eof or children:
        ready, _, _ = select.select([] if eof else [0], [], [], 0.1 if children else None)
        if ready:
            data = os.read(0, 1 << 16)
            eof = not data
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                job = json.loads(line)
                if threading.active_count() > 1:  # a Python thread would not survive the fork
                    send({"error": f"threads in the fork server: {threading.enumerate()}"})
                    return 1
                # Every object the server holds goes to the permanent generation: a child's full
                # collections (vLLM's start-up runs nine, runner.shutdown one more) then skip the
                # preloaded modules' objects. gc.collect took 3.6 of an engine run's 6.8 CPU-s
                # with torch and vLLM imported; 4 forked runs took 31.0 CPU-s with the freeze,
                # 37.3 without (2026-12-07, load ~8).
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    _child(job, out)
                children[pid] = (job["id"], job["stderr"] + ".modules")
                send({"id": job["id"], "pid": pid})
        if eof:  # the client is gone: nothing may outlive it
            for pid in children:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid not in children:
                continue
            job_id, modules_path = children.pop(pid)
            try:  # read before answering: the client may remove the file once it has the answer
                with open(modules_path) as f:
                    names = json.load(f)
                os.unlink(modules_path)
            except (OSError, ValueError):
                names = []
            send({"id": job_id, "pid": pid, "rc": os.waitstatus_to_exitcode(status)})
            # Load what the child needed, for the next one.
            for name in names:
                if name.split(".")[0] not in _NOT_PRELOADED and name not in sys.modules:
                    # Generated or platform-specific modules may fail here: the child imports them.
                    with contextlib.suppress(Exception):
                        importlib.import_module(name)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), [m for m in sys.argv[2].split(",") if m]))
