"""The package type-checks: mypy over `lmcache_triton` (the `[tool.mypy]` section of
pyproject.toml) reports no error. Runs in the README's test command, i.e. in CI.

One mypy run: ~15 s with its cache (`.mypy_cache/`), about a minute from a fresh clone on 2 cores.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (the `test` extra)")
def test_package_type_checks_clean():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    assert "Success: no issues found" in proc.stdout
