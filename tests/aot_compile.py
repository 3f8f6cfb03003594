"""Compile every Triton kernel of lmcache_triton.kernels ahead of time for real GPUs, without one.

Run in a fresh process WITHOUT TRITON_INTERPRET (the test suite sets it before importing the
kernels): `python tests/aot_compile.py ARCH [ARCH ...]`, e.g. `80 90`. Each kernel is compiled
through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas Triton ships)
for `GPUTarget("cuda", ARCH, 32)`, for every element type and constexpr tile the launchers can
pass. Prints one line per compile and exits non-zero on the first failure, with its error.
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter's kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmcache_triton.kernels import blend, paged_copy, rope  # noqa: E402

INT_PTRS = ["*i8", "*i16", "*i32", "*i64"]  # the launchers view every dtype as a same-width integer
FLOAT_PTRS = ["*fp32", "*fp16", "*bf16"]


def _signature(fn, types: dict[str, str]) -> dict[str, str]:
    return {p.name: ("constexpr" if p.is_constexpr else types.get(p.name, "i64")) for p in fn.params}


def cases():
    """(name, fn, signature, constexprs): the specialisations that matter."""
    for kern, ptr, (br, bw) in itertools.product(
        (paged_copy._paged_to_chunk_kernel, paged_copy._chunk_to_paged_kernel),
        INT_PTRS,
        [(1, 4096), (8, 256), (64, 128)],  # tiles `_tile` picks for wide runs, rows, narrow rows
    ):
        sig = _signature(kern, {"cache_ptr": ptr, "chunk_ptr": ptr, "ids_ptr": "*i64", "layer_off_ptr": "*i64"})
        for per_layer in (False, True):  # one buffer; 0.34's per-layer tensors (offset table)
            consts = {"PER_LAYER": per_layer, "BLOCK_R": br, "BLOCK_W": bw}
            yield f"{kern.__name__}[{ptr},{br}x{bw},per_layer={per_layer}]", kern, sig, consts
    token_kernels = (paged_copy._paged_to_tokens_kernel, paged_copy._tokens_to_paged_kernel)
    for kern, ptr in itertools.product(token_kernels, INT_PTRS):
        sig = _signature(kern, {"cache_ptr": ptr, "tok_ptr": ptr, "slot_ptr": "*i64", "layer_off_ptr": "*i64"})
        for per_layer in (False, True):
            consts = {"PER_LAYER": per_layer, "BLOCK_T": 16, "BLOCK_C": 256}
            yield f"{kern.__name__}[{ptr},per_layer={per_layer}]", kern, sig, consts
    for ptr in FLOAT_PTRS:
        kern = blend._token_deviation_kernel
        sig = _signature(kern, {"cached_ptr": ptr, "fresh_ptr": ptr, "out_ptr": "*fp32"})
        yield f"_token_deviation_kernel[{ptr}]", kern, sig, {"BLOCK_T": 16, "BLOCK_D": 128}
    for ptr, pos, neox, tail in itertools.product(FLOAT_PTRS, ["*i32", "*i64"], [True, False], [True, False]):
        kern = rope._rerotate_k_kernel
        sig = _signature(kern, {"k_ptr": ptr, "out_ptr": ptr, "src_ptr": pos, "dst_ptr": pos, "inv_freq_ptr": "*fp32"})
        consts = {"HALF": 64, "IS_NEOX": neox, "COPY_TAIL": tail, "BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_TAIL": 32}
        yield f"_rerotate_k_kernel[{ptr},{pos},neox={neox},tail={tail}]", kern, sig, consts


def main(archs: list[int]) -> int:
    n = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, consts in cases():
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
            except Exception as e:  # report which kernel and specialisation broke
                print(f"FAILED sm_{arch} {name}: {type(e).__name__}: {e}")
                return 1
            assert compiled.asm.get("cubin"), f"sm_{arch} {name}: no cubin produced"
            n += 1
            print(f"ok sm_{arch} {name}")
    print(f"compiled {n} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
