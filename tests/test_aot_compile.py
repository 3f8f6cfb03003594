"""CI has no GPU: compile every Triton kernel ahead of time for sm_80, sm_90 and sm_100 instead.

`tests/aot_compile.py` runs Triton's whole pipeline down to a cubin (with the ptxas Triton ships)
for `GPUTarget("cuda", 80|90|100, 32)`: the copy kernels as the engine launches them (recorded
launches through Triton's binder: real tiles, dtypes, alignment and divisibility), the CacheBlend
kernels from hand-written signatures. A kernel that
only fails to compile on a GPU (an unsupported op, a type error past the interpreter) fails here.
It runs in a fresh process: this test session set TRITON_INTERPRET=1, whose kernels cannot compile.
Run alone, each arch compiles in the test; in the whole suite the three archs compile in the
background at the lowest priority from the start (tests/aot_jobs.py), and the test collects them.
"""

from __future__ import annotations

import aot_jobs
import pytest

# Three full Triton compiles of every kernel (~100 CPU-s each on this machine): CI and the full
# suite run them; `nox -s tests_fast` (the edit-test loop) leaves them out.
pytestmark = pytest.mark.slow


# sm_100: the ptxas Triton 3.9 ships (CUDA 12.9) targets it.
@pytest.mark.parametrize("arch", aot_jobs.ARCHS, ids=[f"sm_{a}" for a in aot_jobs.ARCHS])
def test_every_kernel_compiles_for(arch, tmp_path):
    root = aot_jobs.background_root()
    r = aot_jobs.collect(arch, root) if root is not None else aot_jobs.run(arch, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiled" in r.stdout and "FAILED" not in r.stdout, r.stdout[-2000:]
    # The engine's own launches (recorded, not hand-written): both token kernels for each cache
    # form and dtype class, and the CacheBlend kernels beside them.
    for kernel in ("_paged_to_tokens_kernel", "_tokens_to_paged_kernel"):
        for form in ("bf16-HND:*i16,PER_LAYER=False", "PER_LAYER=True,BLOCK_T=32", "fp8-NHD:*i8", "mla-bf16:"):
            assert f"ok sm_{arch} {kernel}[" in r.stdout and any(
                line.startswith(f"ok sm_{arch} {kernel}[") and form in line for line in r.stdout.splitlines()
            ), f"{kernel} {form} not compiled:\n{r.stdout[-2000:]}"
    assert f"ok sm_{arch} _token_deviation_kernel[*bf16]" in r.stdout
    # The fused codec kernels as the engine launches them (warm-up, stores with a lossy
    # cpu_codec, loads of encoded chunks): both directions.
    lines = r.stdout.splitlines()
    for label in ("_token_mode_kernel[bf16-HND+int8:*i16", "_channel_mode_kernel[fp16-head80+int4:*fp16",
                  "_token_mode_kernel[fp16-head80+int4:*fp16", "_token_mode_kernel[mla-bf16-per-layer+int8:*i16"):
        for way in ("QUANT=True", "QUANT=False"):
            assert any(line.startswith(f"ok sm_{arch} {label}") and way in line for line in lines), (
                f"{label} {way} (engine launch) not compiled:\n{r.stdout[-2000:]}"
            )
    for kernel in ("_token_mode_kernel", "_channel_mode_kernel"):  # the codecs' quantizing copies
        for tag in ("*i16,8b,quant=True", "*fp16,4b,quant=False", "*fp32,4b,quant=True,per_layer=True"):
            assert f"ok sm_{arch} {kernel}[{tag}" in r.stdout, f"{kernel} {tag} not compiled"
