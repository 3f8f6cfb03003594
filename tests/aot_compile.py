"""Compile every Triton kernel of lmcache_triton.kernels ahead of time for real GPUs, without one.

Run in a fresh process WITHOUT TRITON_INTERPRET (the test suite sets it before importing the
kernels): `python tests/aot_compile.py ARCH [ARCH ...]`, e.g. `80 90 100`. Each kernel is
compiled through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas
Triton ships) for `GPUTarget("cuda", ARCH, 32)`. Prints one line per compile and exits non-zero
on the first failure, with its error.

The copy kernels are compiled as the engine launches them, not from a hand-written signature:
`KVCacheEngine` is driven on CPU caches shaped like vLLM's (register and its warm-up, a full
chunk, a partial tail, a load that skips a block), with the launchers forced onto their Triton
path and every kernel replaced by a recorder. Each recorded launch goes through Triton's own
argument binder for the target (what `JITFunction.run` does before compiling): the real
constexprs (tiles), element types (the same-width integer views of bf16/fp16/fp8/fp32),
pointer alignment and the divisibility-by-16 and `== 1` attributes of the integer arguments.
One compile per distinct key, as the JIT would. The fused codec kernels (kernels/quant.py) are
recorded the same way where the engine launches them (`CODEC_OF`): its warm-up, its stores with a
lossy `cpu_codec` (gather + quantize) and its loads of encoded chunks, its own and those a disk
tier holds (dequantize + scatter); and from hand-written signatures for every element kind
(`quant_cases`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter's kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from lmcache_triton.kernels import blend, paged_copy, quant, rope  # noqa: E402

FLOAT_PTRS = ["*fp32", "*fp16", "*bf16"]
COPY_KERNELS = (
    "_paged_to_chunk_kernel", "_chunk_to_paged_kernel", "_paged_to_tokens_kernel", "_tokens_to_paged_kernel",
)

# vLLM-shaped caches the engine serves on a GPU: (name, layout, heads, block, row C, dtype,
# kv_split, per-layer tensors (0.34's extensible cache), opaque pages).
CACHES = [
    ("bf16-HND", "LBHNC", 8, 16, 256, torch.bfloat16, 2, False, False),
    ("bf16-NHD", "LBNHC", 8, 16, 256, torch.bfloat16, 2, False, False),
    ("bf16-NHD-per-layer", "LBNHC", 8, 16, 256, torch.bfloat16, 2, True, False),
    ("fp16-head80", "LBNHC", 4, 16, 160, torch.float16, 2, False, False),
    ("fp8-NHD", "LBNHC", 8, 16, 256, torch.float8_e4m3fn, 2, False, False),
    ("fp8-per-layer", "LBHNC", 8, 16, 256, torch.float8_e4m3fn, 2, True, False),
    ("fp32-NHD", "LBNHC", 2, 16, 128, torch.float32, 2, False, False),
    ("mla-bf16", "LBNHC", 1, 64, 576, torch.bfloat16, 1, False, False),
    ("mla-bf16-per-layer", "LBNHC", 1, 64, 576, torch.bfloat16, 1, True, False),
    ("pages-bf16", "LBHNC", 8, 16, 256, torch.bfloat16, 2, False, True),
    ("pages-bf16-per-layer", "LBHNC", 8, 16, 256, torch.bfloat16, 2, True, True),
]
CHUNK = 256
LAYERS = 3
QUANT_KERNELS = ("_token_mode_kernel", "_channel_mode_kernel")
# The lossy codec each cache's engine stores with (`cpu_codec`) and is handed encoded chunks of
# (through a disk tier): both codecs, bf16 (as int16) and fp16, one buffer and per-layer caches,
# K/V and MLA rows (~35 compiles: each tail length class of `quant.launch_class`, both ways; fp32
# is in `quant_cases`). Caches not listed are left exact (fp8, opaque pages: never encoded).
CODEC_OF = {"bf16-HND": "int8", "fp16-head80": "int4", "mla-bf16-per-layer": "int8"}


class _Now:
    """A stream runtime that runs everything at once (the recorded kernels do nothing)."""

    class _S:
        def wait_event(self, ev) -> None: ...
        def wait_stream(self, s) -> None: ...
        def synchronize(self) -> None: ...

    class _E:
        def record(self, stream=None) -> None: ...
        def query(self) -> bool:
            return True

    def new_stream(self, device, name):
        return self._S()

    def new_event(self):
        return self._E()

    def current_stream(self, device):
        return self._S()

    def use(self, stream):
        return contextlib.nullcontext()

    def copy(self, dst, src) -> None:
        dst.copy_(src)


def engine_launches() -> list[tuple[str, str, tuple, dict]]:
    """(cache name, kernel name, args, kwargs) of every copy- and codec-kernel launch the engine
    makes."""
    with tempfile.TemporaryDirectory() as tmp:
        return _engine_launches(tmp)


def _engine_launches(tmp: str) -> list[tuple[str, str, tuple, dict]]:
    from lmcache_triton.engine import KVCacheEngine
    from lmcache_triton.kernels.geometry import allocate_paged_cache
    from lmcache_triton.storage.cpu import CpuTier
    from lmcache_triton.storage.disk import DiskTier
    from lmcache_triton.storage.hierarchy import StorageHierarchy

    launches: list[tuple[str, str, tuple, dict]] = []
    current = ["", ""]  # the cache's name, its codec's suffix (the codec kernels' labels)

    class Recorded:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            label = current[0] + (current[1] if self.name in QUANT_KERNELS else "")
            return lambda *args, **kwargs: launches.append((label, self.name, args, kwargs))

    real = {n: getattr(paged_copy, n) for n in COPY_KERNELS}
    real_quant = {n: getattr(quant, n) for n in QUANT_KERNELS}
    use_triton, quant_use_triton = paged_copy._use_triton, quant._use_triton
    paged_copy._use_triton = quant._use_triton = lambda t: True  # the launchers' GPU path, on CPU tensors
    for n in COPY_KERNELS:
        setattr(paged_copy, n, Recorded(n))
    for n in QUANT_KERNELS:
        setattr(quant, n, Recorded(n))
    try:
        for name, layout, heads, block, row, dtype, kv_split, per_layer, pages in CACHES:
            codec = CODEC_OF.get(name)
            current[:] = [name, f"+{codec}"]
            blocks = 2 * CHUNK // block + 4
            c5 = allocate_paged_cache(layout, LAYERS, blocks, heads, block, row, dtype)
            c5.zero_()
            views = [c5[i].clone() for i in range(LAYERS)] if per_layer else [c5[i] for i in range(LAYERS)]
            tiers = [DiskTier(os.path.join(tmp, name), 1 << 30, codec=codec)] if codec else []
            storage = StorageHierarchy(CpuTier(1 << 28, pin_memory=False), tiers, keep_in_cpu=True)
            eng = KVCacheEngine(
                storage, "0a" * 16, {"model": "aot"}, streams=_Now(), cpu_codec=codec or "exact"  # type: ignore[arg-type]
            )
            form = {"opaque_packing": "aot"} if pages else {}
            eng.register(views, block, kv_split=kv_split, staging_tokens=CHUNK, **form)  # warm-up
            per = CHUNK // block
            for i, tokens in enumerate((CHUNK, CHUNK - block - 5, 7)):
                n = -(-tokens // block)
                ids = list(range(i * per, i * per + n))
                if eng.store(f"d{i}", ids, tokens if not pages else n * block):
                    eng.poll()
                    eng.load(f"d{i}", ids, skip_blocks=min(1, n - 1))
            if codec:  # chunks another server left encoded on the disk: loaded dequantizing
                assert storage.flush(60)
                for i, tokens in enumerate((CHUNK, CHUNK - block - 5, 7)):
                    n = -(-tokens // block)
                    ids = list(range(i * per, i * per + n))
                    digest = f"e{i}"
                    rows = torch.zeros(eng.chunk_shape(n, tokens), dtype=dtype)
                    assert tiers[0].put(eng.key(digest), rows, {**eng.meta, "num_tokens": str(tokens)})
                    assert tiers[0].flush(60)
                    eng.prefetch([digest])
                    eng.synchronize(prefetch_timeout=60)
                    eng.poll()
                    assert eng.holds(digest), f"{name}: the encoded chunk was not prefetched"
                    assert storage.encoding(eng.key(digest)) is not None, f"{name}: not held encoded"
                    eng.load(digest, ids, skip_blocks=min(1, n - 1))
            eng.close()
            storage.close()
    finally:
        paged_copy._use_triton, quant._use_triton = use_triton, quant_use_triton
        for n, k in real.items():
            setattr(paged_copy, n, k)
        for n, k in real_quant.items():
            setattr(quant, n, k)
    return launches


def copy_cases(target: GPUTarget):
    """(label, ASTSource, options) for each distinct JIT key of the engine's launches."""
    backend = make_backend(target)
    seen: dict[tuple, str] = {}
    for cache, kname, args, kwargs in engine_launches():
        jf = getattr(quant if kname in QUANT_KERNELS else paged_copy, kname)
        binder = create_function_from_signature(jf.signature, jf.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        key = (kname, tuple(spec), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen[key] = cache
        options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, options)
        consts = ",".join(f"{jf.params[p[0]].name}={v}" for p, v in constexprs.items())
        label = f"{kname}[{cache}:{signature['cache_ptr']},{consts}]"
        yield label, ASTSource(jf, signature, constexprs, attrs), options


def _signature(fn, types: dict[str, str]) -> dict[str, str]:
    return {p.name: ("constexpr" if p.is_constexpr else types.get(p.name, "i64")) for p in fn.params}


def quant_cases():
    """The codecs' quantizing copies (kernels/quant.py) as the engine does not launch them yet
    (gather + quantize on store; the load side is recorded in `copy_cases`): hand-written
    signatures for each cache element kind (fp32, fp16, bf16 as int16), 8 and 4
    bits, store and load, the tiles `quant._launch` picks for head size 128 (int8: one group per
    row; int4: groups of 64), one buffer and per-layer tables."""
    kinds = [("*fp32", 0), ("*fp16", 1), ("*i16", 2)]
    for (ptr, kind), bits, q_on, per_layer in itertools.product(kinds, (8, 4), (True, False), (False, True)):
        types = {"cache_ptr": ptr, "q_ptr": "*i8" if bits == 8 else "*u8", "scale_ptr": "*fp16",
                 "slot_ptr": "*i64", "layer_off_ptr": "*i64"}
        common = {"KIND": kind, "BITS": bits, "QUANT": q_on, "PER_LAYER": per_layer}
        tag = f"{ptr},{bits}b,quant={q_on},per_layer={per_layer}"
        kern = quant._token_mode_kernel
        tile = {"GROUP": 128, "NG": 1, "BLOCK_T": 32} if bits == 8 else {"GROUP": 64, "NG": 2, "BLOCK_T": 32}
        yield f"_token_mode_kernel[{tag}]", ASTSource(kern, _signature(kern, types), {**common, **tile}), None
        kern = quant._channel_mode_kernel
        consts = {**common, "GROUP_T": 64, "BLOCK_D": 128}
        yield f"_channel_mode_kernel[{tag}]", ASTSource(kern, _signature(kern, types), consts), None


def other_cases():
    """The CacheBlend kernels (not launched by the engine): hand-written signatures."""
    for ptr in FLOAT_PTRS:
        kern = blend._token_deviation_kernel
        sig = _signature(kern, {"cached_ptr": ptr, "fresh_ptr": ptr, "out_ptr": "*fp32"})
        yield f"_token_deviation_kernel[{ptr}]", ASTSource(kern, sig, {"BLOCK_T": 8, "BLOCK_D": 128}), None
    for ptr, pos, neox, tail in itertools.product(FLOAT_PTRS, ["*i32", "*i64"], [True, False], [True, False]):
        kern = rope._rerotate_k_kernel
        sig = _signature(kern, {"k_ptr": ptr, "out_ptr": ptr, "src_ptr": pos, "dst_ptr": pos, "inv_freq_ptr": "*fp32"})
        consts = {"HALF": 64, "IS_NEOX": neox, "COPY_TAIL": tail, "BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_TAIL": 32}
        yield f"_rerotate_k_kernel[{ptr},{pos},neox={neox},tail={tail}]", ASTSource(kern, sig, consts), None


def main(archs: list[int], claims: str | None = None) -> int:
    """Compile every case for each of `archs`. With `claims` (a directory the processes of one
    arch share: the suite's background jobs) a process compiles only the cases it claims first
    (a file created there with O_EXCL, named by the arch, the label and its occurrence: by label,
    not position, so the processes agree whatever order each records the launches in); they
    share the list as they go and end within one compile of each other."""
    n = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        cases = itertools.chain(copy_cases(target), quant_cases(), other_cases())
        seen: dict[str, int] = {}
        for name, src, options in cases:
            if claims is not None:
                k = seen[name] = seen.get(name, -1) + 1
                if not _claim(claims, f"sm_{arch} {name}#{k}"):
                    continue
            try:
                opts = options.__dict__ if options is not None else None
                compiled = triton.compile(src, target=target, options=opts)
            except Exception as e:  # report which kernel and specialisation broke
                print(f"FAILED sm_{arch} {name}: {type(e).__name__}: {e}")
                return 1
            assert compiled.asm.get("cubin"), f"sm_{arch} {name}: no cubin produced"
            n += 1
            print(f"ok sm_{arch} {name}")
    print(f"compiled {n} kernels" + (" (claimed)" if claims is not None else ""))
    return 0


def _claim(directory: str, case: str) -> bool:
    """True for the one process that claims `case` first (creates its file in `directory`)."""
    name = hashlib.sha256(case.encode()).hexdigest()
    try:
        os.close(os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _cli(argv: list[str]) -> int:
    """`aot_compile.py [ARCH ...] [--claims DIR]`"""
    claims = None
    if "--claims" in argv:
        k = argv.index("--claims")
        claims, argv = argv[k + 1], argv[:k] + argv[k + 2:]
    return main([int(a) for a in argv] or [80, 90, 100], claims)


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
