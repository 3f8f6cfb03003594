"""Test-session set-up.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1), which must be
set before any `@triton.jit` runs, i.e. before the kernel modules are imported: hence here, at
the top of the first conftest pytest loads.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Device the kernel tests run on: the GPU when present, else CPU tensors through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here); the CPU twin of this test ran")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="module")
def workdir():
    """A temp dir for one module's vLLM engines, and the environment they need.

    vLLM writes sockets and caches under the temp dir and `~/.cache`: TMPDIR, VLLM_CACHE_ROOT and
    Python's cached `tempfile.tempdir` point inside it. LMCACHE_* variables of the caller are
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
            VLLM_CACHE_ROOT=str(d / "vllm-cache"),
            VLLM_CPU_KVCACHE_SPACE="1",
            PYTHONPATH=os.pathsep.join([REPO, *filter(None, [saved.get("PYTHONPATH")])]),
        )
        old_tempdir, tempfile.tempdir = tempfile.tempdir, str(d / "tmp")
        try:
            yield d
        finally:
            tempfile.tempdir = old_tempdir
            os.environ.clear()
            os.environ.update(saved)
