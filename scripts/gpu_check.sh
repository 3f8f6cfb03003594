#!/usr/bin/env bash
# The one prepared GPU check, for a session lent a device machine (see the `device` tool):
# the GPU-marked tests natively (kernels, the engine's asynchronous store/load on CUDA), the
# kernel benchmarks, and the worker's store/load path on a vLLM-shaped cache with a matmul
# loop beside it. Everything is written under $OUT. About 4 minutes; run it with the device
# tool's timeout_s ~ 420:
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=420)
#
# The device image has torch, triton, safetensors, pyyaml and pytest but no vLLM: the connector's
# end-to-end tests stay on CPU CI. Record the numbers in bench/RESULTS.md with the card's name.
set -uo pipefail
OUT=${OUT:-/tmp/lmcache-triton-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

# test_gpu_path.py: no copy kernel compiles after register (Triton's real JIT cache, both cache
# forms); test_engine.py: the store/load round trips on the three side streams.
# test_fused_codec.py / test_quant_kernels.py: the fused quantize/dequantize kernels natively, and
# the engine's encoded store and load on CUDA (issue 20).
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_paged_copy.py tests/test_blend_kernels.py \
    tests/test_engine.py tests/test_cpu_arena.py tests/test_gpu_path.py tests/test_quant_kernels.py \
    tests/test_fused_codec.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# 3 steps of 32 chunks stored (an 8k-token prefill each): the compute slow-down with 4 store
# staging buffers (the default) and with 32 (PCIe entirely off the compute stream's path); each
# also reports the JIT compiles after register (must be 0).
timeout 90 $PY bench/bench_transfers_gpu.py --chunks 96 --step-chunks 32 --staging-slots 4 --reps 3 \
    --csv "$OUT/results_transfers_gpu.csv" 2>&1 | tee "$OUT/bench_transfers_gpu.log"
timeout 90 $PY bench/bench_transfers_gpu.py --chunks 96 --step-chunks 32 --staging-slots 32 --reps 3 \
    --csv "$OUT/results_transfers_gpu.csv" 2>&1 | tee -a "$OUT/bench_transfers_gpu.log"
# The fused codec path against the exact one above (effective GB/s: decoded KV bytes per second).
for codec in int8 int4; do
    timeout 60 $PY bench/bench_transfers_gpu.py --chunks 32 --step-chunks 32 --staging-slots 4 --reps 3 \
        --cpu-codec $codec --csv "$OUT/results_transfers_gpu.csv" 2>&1 | tee -a "$OUT/bench_transfers_gpu.log"
done
timeout 100 $PY bench/bench_paged_copy.py --csv "$OUT/results_paged_copy.csv" 2>&1 | tee "$OUT/bench_paged_copy.log"
timeout 60 $PY bench/bench_blend_kernels.py 2>&1 | tee "$OUT/bench_blend_kernels.log"
cp bench/results_blend_kernels.csv "$OUT/" 2>/dev/null || true
