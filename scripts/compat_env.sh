#!/usr/bin/env bash
# Build (or reuse) a virtual environment with one GPU release of vLLM from PyPI plus this
# package, for the version matrix (tests/compat/, `nox -s compat`). No GPU needed: a CUDA build
# of torch imports on a machine without one, and vLLM then detects no platform.
#
#   scripts/compat_env.sh 0.34.0          # -> $COMPAT_DIR/venv-0.34.0, prints its python
#   COMPAT_DIR=/work/compat scripts/compat_env.sh 0.33.0
#
# vLLM is installed with --no-deps, then its own Requires-Dist (markers evaluated, extras
# dropped) minus COMPAT_SKIP: vLLM 0.34 pins flashinfer-python==0.7.3, which some indexes lack,
# and none of the code the matrix drives imports flashinfer. Then `pip install -e . --no-deps`
# and this package's own small dependencies that vLLM does not already bring.
#
# Idempotent: a finished env carries a stamp naming the vLLM version; with the stamp present
# only the editable install is refreshed (seconds). Delete the venv folder to rebuild it.
#
# Env: COMPAT_DIR (default <repo>/.compat, git-ignored), COMPAT_PYTHON (default python3),
#      COMPAT_SKIP (space-separated distribution names, default "flashinfer-python").
set -euo pipefail

VER="${1:?usage: compat_env.sh VLLM_VERSION (e.g. 0.34.0)}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPAT_DIR="${COMPAT_DIR:-$REPO/.compat}"
PY="${COMPAT_PYTHON:-python3}"
SKIP="${COMPAT_SKIP:-flashinfer-python}"
VENV="$COMPAT_DIR/venv-$VER"
WHEELS="$COMPAT_DIR/wheels"
STAMP="$VENV/.compat-stamp"
WANT="vllm==$VER"

log() { echo "[compat_env $VER] $*" >&2; }
mkdir -p "$COMPAT_DIR" "$WHEELS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    "$VENV/bin/pip" install -q --no-deps -e "$REPO" >&2
    echo "$VENV/bin/python"
    exit 0
fi

t0=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)
"${PIP[@]}" -q -U pip wheel packaging >&2

log "downloading vllm==$VER (no deps)"
"$VENV/bin/pip" download -q --no-deps "vllm==$VER" -d "$WHEELS" >&2
WHL="$(ls "$WHEELS"/vllm-"$VER"-*.whl | head -1)"
"${PIP[@]}" -q --no-deps "$WHL" >&2

# vLLM's requirements, read from the installed metadata with that interpreter's markers.
REQS="$VENV/compat-requirements.txt"
"$VENV/bin/python" - "$SKIP" > "$REQS" <<'EOF'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
skip = {canonicalize_name(s) for s in sys.argv[1].split()}
for raw in distribution("vllm").requires or []:
    req = Requirement(raw)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # other platforms and optional extras
    if canonicalize_name(req.name) in skip:
        print(f"# skipped: {raw}", file=sys.stderr)
        continue
    req.marker = None
    print(req)
EOF
log "installing $(grep -vc '^#' "$REQS") requirements of vllm (minus: $SKIP)"
"${PIP[@]}" -q -r "$REQS" >&2

# This package: editable, no deps (torch/triton come from vLLM's pins), then the small ones.
"${PIP[@]}" -q --no-deps -e "$REPO" >&2
"${PIP[@]}" -q "safetensors>=0.4" "typer>=0.12" "pyyaml>=6" "numpy>=1.24" "xxhash>=3.4" \
    "blake3>=0.4" "pytest>=8" "pytest-timeout>=2.3" >&2

"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$WANT" > "$STAMP"
log "built in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)"
echo "$VENV/bin/python"
