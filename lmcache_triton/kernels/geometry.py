"""Geometry of vLLM's paged KV cache, seen as one flat tensor plus strides.

vLLM 0.32 hands a connector one 4-D view `[B, H, N, C]` per attention layer, all into ONE backing
buffer. Layer `l`'s element `(b, h, n, c)` lives at

    offset + l * stride_l + b * stride_b + h * stride_h + n * stride_n + c

in element units of a flat 1-D tensor over the whole storage (C is innermost and contiguous).
That single base plus integer strides is what lets the copy kernels reach every layer in one
launch without a pointer table (the Triton interpreter cannot load pointers): the fast path.

vLLM 0.34's extensible KV cache (on by default on CUDA/ROCm) gives every layer of the default
layer-outermost layouts its own allocation, at unrelated addresses. Such views become a
`LayerTable` (one 1-D tensor per layer, each starting at its layer's element `(0, 0, 0, 0)`)
with a geometry marked `per_layer`: the same `[B, H, N, C]` strides for every layer, `offset`
0 and no layer stride. The copy kernels reach its layers in one launch through a table of 64-bit
element offsets from layer 0 (`LayerTable.element_offsets`); the torch twins move it one layer at
a time (`paged_copy.py`).

Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

# Physical order of the logical axes [L, B, H, N, C] for vLLM's KVCacheLayout members
# (vllm/v1/kv_cache_layout.py); copied as plain data so this module does not import vLLM.
LAYOUTS: dict[str, tuple[int, int, int, int, int]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
_AXES = "LBHNC"


@dataclass(frozen=True)
class PagedKVGeometry:
    """Where each layer's `[B, H, N, C]` element lives in a flat 1-D tensor over the storage.

    All sizes, strides and `offset` are in elements of `dtype`, relative to element 0 of the flat
    tensor returned beside this geometry (not to the layer views' own storage offsets).

    Attributes:
        num_layers: `L`, layers sharing the buffer.
        num_blocks: `B`, blocks per layer.
        num_heads: `H`, KV heads (1 for MLA).
        block_size: `N`, tokens per block.
        row_size: `C`, elements of one token row of one head (`2 * head_size`: K then V; MLA: the
            latent row).
        offset: flat index of layer 0, block 0, head 0, token 0.
        stride_l, stride_b, stride_h, stride_n: element strides (the C stride is 1). `stride_l` is
            0 for a single layer.
        dtype: element type of the views (bf16, fp16, fp32, fp8, ...).
        per_layer: the layers are separate tensors (a `LayerTable`, not one flat tensor):
            `offset` and the strides hold inside each layer's own 1-D tensor, `stride_l` is 0.
            Default False.
    """

    num_layers: int
    num_blocks: int
    num_heads: int
    block_size: int
    row_size: int
    offset: int
    stride_l: int
    stride_b: int
    stride_h: int
    stride_n: int
    dtype: torch.dtype
    per_layer: bool = False

    @property
    def shape5d(self) -> tuple[int, int, int, int, int]:
        """Logical `(L, B, H, N, C)`."""
        return (self.num_layers, self.num_blocks, self.num_heads, self.block_size, self.row_size)

    @property
    def strides5d(self) -> tuple[int, int, int, int, int]:
        """Element strides of the logical `[L, B, H, N, C]` axes."""
        return (self.stride_l, self.stride_b, self.stride_h, self.stride_n, 1)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_numel(self) -> int:
        """Elements of one (layer, block, head) page: `N * C`."""
        return self.block_size * self.row_size

    @property
    def page_bytes(self) -> int:
        return self.page_numel * self.itemsize

    @property
    def block_numel(self) -> int:
        """Elements of one block of one layer: `H * N * C`."""
        return self.num_heads * self.page_numel

    @property
    def num_slots(self) -> int:
        """Token slots per layer: `B * N` (slot = block_id * N + offset in block)."""
        return self.num_blocks * self.block_size

    def chunk_shape(self, num_chunk_blocks: int) -> tuple[int, int, int, int, int]:
        """Shape `[L, K, H, N, C]` of the contiguous chunk holding `K` blocks of every layer."""
        return (self.num_layers, num_chunk_blocks, self.num_heads, self.block_size, self.row_size)

    def chunk_numel(self, num_chunk_blocks: int) -> int:
        return self.num_layers * num_chunk_blocks * self.block_numel

    def extent(self) -> int:
        """One past the largest flat index any layer's view reaches (per layer: in its own tensor)."""
        return 1 + self.offset + sum((n - 1) * s for n, s in zip(self.shape5d, self.strides5d, strict=True))

    def one_layer(self) -> PagedKVGeometry:
        """The geometry of one layer of a per-layer cache, in that layer's own 1-D tensor."""
        return replace(self, num_layers=1, stride_l=0, per_layer=False)

    def physical_order(self) -> str:
        """Axes from outermost to innermost by stride, e.g. `"LBHNC"` (size-1 axes go first)."""
        keyed = []
        for i, (n, s) in enumerate(zip(self.shape5d, self.strides5d, strict=True)):
            # A size-1 axis (e.g. L of a single layer, stride 0) has no physical place; separate
            # per-layer tensors are layer-outermost.
            rank = math.inf if n == 1 or (i == 0 and self.per_layer) else s
            keyed.append((-rank, i))
        return "".join(_AXES[i] for _, i in sorted(keyed))

    def fingerprint(self) -> str:
        """Short, restart-stable description of the layout: excludes `num_blocks` and `offset`,
        which change when vLLM re-profiles memory.

        Example: `"LBHNC:H8:N16:C256:bfloat16:page8192B"`.
        """
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.physical_order()}:H{self.num_heads}:N{self.block_size}:C{self.row_size}"
            f":{dtype}:page{self.page_bytes}B"
        )

    def view5d(self, flat: torch.Tensor) -> torch.Tensor:
        """The logical `[L, B, H, N, C]` view of `flat` (a strided view, no copy)."""
        if self.per_layer:
            raise ValueError("view5d: a per-layer cache has no single 5-D view; use one_layer() per layer")
        # `offset` counts from flat's element 0 (a per-layer tensor may start inside its storage).
        return flat.as_strided(self.shape5d, self.strides5d, flat.storage_offset() + self.offset)


class LayerTable:
    """A KV cache whose layers are separate tensors: one 1-D tensor per layer, starting at the
    layer's element `(0, 0, 0, 0)`, all of one dtype and device.

    It stands where a one-buffer cache's flat tensor stands (`dtype`, `device`, `is_cuda`,
    `element_size()`), so the engine passes either to the copy launchers unchanged.

    Args:
        layers: `[*]` per-layer 1-D tensors, in layer order.
    """

    def __init__(self, layers: Sequence[torch.Tensor]):
        self.layers = tuple(layers)
        self._offsets: torch.Tensor | None = None
        if not self.layers:
            raise ValueError("layers: expected at least one per-layer tensor, got none")
        first = self.layers[0]
        for i, t in enumerate(self.layers):
            if t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
                raise ValueError(f"layers[{i}]: expected a contiguous 1-D tensor, got shape {tuple(t.shape)}")
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"layers[{i}]: {t.dtype} on {t.device} != layers[0]: {first.dtype} on {first.device}")

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def is_cuda(self) -> bool:
        return self.layers[0].is_cuda

    def element_size(self) -> int:
        return self.layers[0].element_size()

    def element_offsets(self) -> torch.Tensor:
        """`[L]` int64 on the layers' device: where each layer starts, in elements from layer
        0's first element (negative for a layer at a lower address). The copy kernels add it to
        layer 0's pointer: one launch reaches every layer. Computed once (the addresses of a
        registered cache do not move)."""
        if self._offsets is None:
            origin, size = self.layers[0].data_ptr(), self.element_size()
            offs = []
            for i, t in enumerate(self.layers):
                delta = t.data_ptr() - origin
                if delta % size:
                    raise ValueError(f"layers[{i}]: {delta} bytes from layers[0], not a multiple of {size}")
                offs.append(delta // size)
            self._offsets = torch.tensor(offs, dtype=torch.int64, device=self.device)
        return self._offsets

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"LayerTable({len(self.layers)} layers, {self.dtype}, {self.device})"


# A cache as the copy launchers take it: one flat tensor over its storage, or a per-layer table
# (vLLM 0.34's extensible cache: every layer its own allocation).
Cache = torch.Tensor | LayerTable


def _flat_over_storage(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of `t.dtype` over `t`'s whole untyped storage, starting at byte 0."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    return t.as_strided((numel,), (1,), 0)


def geometry_from_layer_views(
    views: Sequence[torch.Tensor],
) -> tuple[Cache, PagedKVGeometry]:
    """Describe vLLM's per-layer KV views as one flat tensor (or a per-layer table) plus a geometry.

    Args:
        views: per-layer `[B, H, N, C]` views in layer order with equal shapes, strides and
            dtype and `C` contiguous (vLLM's `create_kv_cache_views` output). Either all into
            one storage with a uniform distance between consecutive layers (0.32/0.33, and
            0.34 without the extensible cache), or each layer in a storage of its own (0.34's
            extensible cache, layer-outermost layouts).

    Returns:
        `(flat, geom)`: one storage: `flat` is a 1-D tensor of the views' dtype over the whole
        storage and `geom` locates each layer's elements in it. Separate storages: `flat` is a
        `LayerTable` and `geom.per_layer` is True.

    Raises:
        ValueError: naming the offending tensor when the views do not fit that model.
    """
    if len(views) == 0:
        raise ValueError("views: expected at least one per-layer KV view, got none")
    first = views[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        raise ValueError(f"views[0]: expected a 4-D [B, H, N, C] tensor, got {_describe(first)}")
    storage_ptr = first.untyped_storage().data_ptr()
    shared = all(
        isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage_ptr for v in views
    )
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"views[{i}]: expected a tensor, got {type(v).__name__}")
        if v.device != first.device:
            raise ValueError(f"views[{i}]: on {v.device}, views[0] on {first.device}")
        if not shared and i and v.untyped_storage().data_ptr() == storage_ptr:
            raise ValueError(f"views[{i}]: shares views[0]'s storage while other layers do not")
        if v.dtype != first.dtype:
            raise ValueError(f"views[{i}]: dtype {v.dtype} != views[0] dtype {first.dtype}")
        if v.shape != first.shape:
            raise ValueError(f"views[{i}]: shape {tuple(v.shape)} != views[0] shape {tuple(first.shape)}")
        if v.stride() != first.stride():
            raise ValueError(f"views[{i}]: strides {v.stride()} != views[0] strides {first.stride()}")
    B, H, N, C = first.shape
    sB, sH, sN, sC = first.stride()
    if sC != 1 and C > 1:
        raise ValueError(f"views[0]: innermost (C) stride must be 1, got strides {first.stride()}")
    for name, n, s in (("B", B, sB), ("H", H, sH), ("N", N, sN)):
        if n > 1 and s <= 0:
            raise ValueError(f"views[0]: axis {name} has size {n} but stride {s}; writes would alias")

    if not shared:
        return _per_layer_geometry(views)
    itemsize = first.element_size()
    stride_l = 0
    if len(views) > 1:
        step = views[1].data_ptr() - first.data_ptr()
        if step <= 0 or step % itemsize:
            raise ValueError(
                f"views[1]: starts {step} bytes after views[0]; expected a positive multiple of the "
                f"element size {itemsize}"
            )
        stride_l = step // itemsize
        for i, v in enumerate(views):
            if v.data_ptr() - first.data_ptr() != i * step:
                raise ValueError(
                    f"views[{i}]: starts {v.data_ptr() - first.data_ptr()} bytes after views[0]; "
                    f"expected a uniform layer stride ({i} * {step})"
                )
    geom = PagedKVGeometry(
        num_layers=len(views),
        num_blocks=B,
        num_heads=H,
        block_size=N,
        row_size=C,
        offset=int(first.storage_offset()),
        stride_l=stride_l,
        stride_b=sB,
        stride_h=sH,
        stride_n=sN,
        dtype=first.dtype,
    )
    flat = _flat_over_storage(first)
    if geom.extent() > flat.numel():
        raise ValueError(f"views[{len(views) - 1}]: reaches past the end of the storage")
    return flat, geom


def _per_layer_geometry(views: Sequence[torch.Tensor]) -> tuple[LayerTable, PagedKVGeometry]:
    """Layers in separate storages (checked alike by the caller): a `LayerTable` of 1-D tensors
    from each layer's element 0 to the end of its storage."""
    first = views[0]
    B, H, N, C = first.shape
    sB, sH, sN, _ = first.stride()
    geom = PagedKVGeometry(
        num_layers=len(views), num_blocks=B, num_heads=H, block_size=N, row_size=C, offset=0,
        stride_l=0, stride_b=sB, stride_h=sH, stride_n=sN, dtype=first.dtype, per_layer=True,
    )  # fmt: skip
    layers = []
    for i, v in enumerate(views):
        numel = v.untyped_storage().nbytes() // v.element_size() - v.storage_offset()
        if geom.one_layer().extent() > numel:
            raise ValueError(f"views[{i}]: reaches past the end of its storage")
        layers.append(v.as_strided((numel,), (1,), v.storage_offset()))
    return LayerTable(layers), geom


def geometry_for_tensor(cache5d: torch.Tensor) -> tuple[Cache, PagedKVGeometry]:
    """Geometry of a logical `[L, B, H, N, C]` view (any layout, e.g. from `allocate_paged_cache`).

    Args:
        cache5d: `[L, B, H, N, C]` with the C axis contiguous.

    Returns:
        `(flat, geom)` as for `geometry_from_layer_views`.
    """
    if cache5d.dim() != 5:
        raise ValueError(f"cache5d: expected a 5-D [L, B, H, N, C] tensor, got {tuple(cache5d.shape)}")
    return geometry_from_layer_views(list(cache5d.unbind(0)))


def allocate_paged_cache(
    layout: str,
    num_layers: int,
    num_blocks: int,
    num_heads: int,
    block_size: int,
    row_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Allocate (uninitialised) a cache in a vLLM layout; return its logical `[L, B, H, N, C]` view.

    Args:
        layout: one of `LAYOUTS` (`"LBHNC"`, `"LBNHC"`, `"LHBNC"`, `"BLHNC"`, `"BLNHC"`, `"BHLNC"`).
        num_layers, num_blocks, num_heads, block_size, row_size: `L, B, H, N, C`.
        dtype: element type.
        device: where to allocate. Default `"cpu"`.
    """
    order = LAYOUTS[layout]
    logical = (num_layers, num_blocks, num_heads, block_size, row_size)
    physical = torch.empty([logical[a] for a in order], dtype=dtype, device=device)
    # permute(inverse): logical axis a sits at physical position order.index(a).
    return physical.permute([order.index(a) for a in range(5)])


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
