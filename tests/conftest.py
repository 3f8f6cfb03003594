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
