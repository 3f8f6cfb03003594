"""CI has no GPU: compile every Triton kernel ahead of time for sm_80 and sm_90 instead.

`tests/aot_compile.py` runs Triton's whole pipeline down to a cubin (with the ptxas Triton ships)
for `GPUTarget("cuda", 80|90, 32)`, every element type and tile the launchers use. A kernel that
only fails to compile on a GPU (an unsupported op, a type error past the interpreter) fails here.
It runs in a fresh process: this test session set TRITON_INTERPRET=1, whose kernels cannot compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Two full Triton compiles of every kernel (~30-80 s each on 2 cores): CI and the full suite run
# them; `nox -s tests_fast` (the edit-test loop) leaves them out.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", [80, 90], ids=["sm_80", "sm_90"])
def test_every_kernel_compiles_for(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: every kernel really compiles
    r = subprocess.run([sys.executable, str(REPO / "tests" / "aot_compile.py"), str(arch)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiled 91 kernels" in r.stdout, r.stdout[-2000:]
