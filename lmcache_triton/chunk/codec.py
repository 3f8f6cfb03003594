"""Chunk codecs: how a chunk's token rows are encoded in the slow tiers (disk, remote).

Primitives:
  `CODECS`            name -> `Codec`: "exact" (default: the rows as they are, bit-exact),
                      "int8" (8-bit, 0.51x of bf16 bytes with the scales) and "int4" (4-bit,
                      KIVI-style, 0.27x of bf16 bytes with the scales).
  `get_codec(name)`   the codec, or a one-line ValueError naming the known ones.
  `Codec.parts(shape, dtype)`  the tensors an encoded chunk holds (`PartSpec`: name, dtype name,
                      shape): what a header must list, checked before any payload is read.
  `Codec.applies(shape, dtype, meta)`  whether this codec encodes such a chunk (else it is
                      stored exact: opaque pages, fp8 caches, odd head sizes for 4-bit).
  `Codec.encode(rows)` -> `[(name, tensor)]`; `Codec.decode(parts, out)` writes the rows.
  `CodecPolicy(default)`  which codec a tier writes a key with: a default and per-namespace
                      choices (`set(name, namespace)`); the quality guard sets them.
  `Encoding(codec, dtype, shape)`  an encoded chunk held as one byte buffer (the CPU tier's
                      encoded entries, a device staging buffer): the parts packed from offset 0
                      in `Codec.parts` order, exactly the payload layout of an encoded file;
                      `split(buf)` gives the part views.

A lossy codec quantizes each half (K, V) of token rows `[S, L, T, H, D]` symmetrically in groups
with fp16 scales; the arithmetic is `kernels.quant_ref` (torch twins) and `kernels.quant`
(Triton, bit-identical). int8: one scale per token row and head for K and V (measured against K
per-channel: bench/bench_codec.py); int4: K per channel over groups of 64 tokens, V per token over
groups of 64 channels (KIVI's grouping), symmetric with 15 levels.

Invariants:
  * Deterministic: encoding the same rows gives the same bytes (torch twin == Triton kernel).
  * Torch-free at import and in `parts`/`applies` (header parsing runs without torch); `encode`
    and `decode` import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lmcache_triton.kernels.quant_ref import QuantSpec

EXACT = "exact"
TOKEN_ROWS = "tokens"  # the `rows` header field of token-row chunks (engine.copy_paths.ROWS_FORM)
_FLOAT_NAMES = ("float32", "float16", "bfloat16")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class PartSpec:
    """One tensor of an encoded chunk: its name, dtype name ("int8") and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def _groups(n: int, group: int) -> int:
    return 1 if group <= 0 or n == 0 else -(-n // group)


@dataclass(frozen=True)
class Codec:
    """A chunk encoding.

    Args:
        name: the name in config and headers.
        lossy: decoding does not give the stored bits back.
        bits: 8 or 4 (lossy codecs); 0 for exact.
        k_mode: "token" (one scale per group of channels of a token row) or "channel" (one scale
            per channel over a group of tokens) for the K half.
        k_group: the K half's group (tokens in channel mode, channels in token mode; 0: the row).
        v_group: channels per group of the V half and of MLA rows (0: the whole row).
    """

    name: str
    lossy: bool
    bits: int = 0
    k_mode: str = "token"
    k_group: int = 0
    v_group: int = 0

    def _half(self, s: int, num_halves: int) -> tuple[str, int]:
        if num_halves == 2 and s == 0:
            return self.k_mode, self.k_group
        return "token", self.v_group

    def applies(self, shape: Sequence[int], dtype: str, meta: Mapping[str, str] | None = None) -> bool:
        """Whether this codec encodes a chunk of `shape` and dtype name `dtype` with header
        fields `meta` (token rows of a float cache; 4-bit: an even head size). Exact: always."""
        if not self.lossy:
            return True
        if meta is not None and meta.get("rows", TOKEN_ROWS) != TOKEN_ROWS:
            return False  # whole opaque pages: no K/V axes to group by
        if len(shape) != 5 or shape[0] not in (1, 2) or dtype not in _FLOAT_NAMES:
            return False
        return self.bits == 8 or shape[4] % 2 == 0

    def parts(self, shape: Sequence[int], dtype: str) -> list[PartSpec]:
        """The tensors an encoding of rows `shape`/`dtype` holds, in payload order."""
        if not self.lossy:
            return [PartSpec("kv", dtype, tuple(shape))]
        S, L, T, H, D = shape
        out = [PartSpec("q", "int8" if self.bits == 8 else "uint8", (S, L, T, H, D if self.bits == 8 else D // 2))]
        for s in range(S):
            mode, group = self._half(s, S)
            if mode == "token":
                sh = (L, T, H, _groups(D, group))
            else:
                sh = (L, _groups(T, group), H, D)
            out.append(PartSpec(f"s{s}", "float16", sh))
        return out

    def encoded_bytes(self, shape: Sequence[int], dtype: str) -> int:
        """Payload bytes of an encoded chunk (sizing, benchmarks)."""
        return sum(p.nbytes for p in self.parts(shape, dtype))

    def quant_spec(self) -> QuantSpec:
        """The kernels' description of this codec (imports torch)."""
        from lmcache_triton.kernels.quant_ref import QuantSpec

        return QuantSpec(self.bits, self.k_mode, self.k_group, self.v_group)

    def encode(self, rows: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """`[(part name, tensor)]` of contiguous CPU `rows` `[S, L, T, H, D]` (`applies` true).

        Raises:
            ValueError: rows this codec does not apply to.
        """
        import torch

        dtype = str(rows.dtype).removeprefix("torch.")
        if not self.applies(tuple(rows.shape), dtype):
            raise ValueError(f"codec {self.name}: cannot encode {dtype} rows of shape {tuple(rows.shape)}")
        if not self.lossy:
            return [("kv", rows)]
        specs = self.parts(tuple(rows.shape), dtype)
        tensors = [torch.empty(p.shape, dtype=getattr(torch, p.dtype), device=rows.device) for p in specs]
        if rows.is_cuda:
            from lmcache_triton.kernels.quant import quantize_rows
        else:  # CPU: the torch twin (bit-identical), never the interpreter, which is not thread-safe
            from lmcache_triton.kernels.quant_ref import quantize_rows_ref as quantize_rows
        quantize_rows(rows.contiguous(), self.quant_spec(), tensors[0], tensors[1:])
        return [(p.name, t) for p, t in zip(specs, tensors, strict=True)]

    def decode(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write the rows encoded in `parts` into `out` (contiguous, the chunk's dtype/shape).

        Raises:
            ValueError: `parts` is not what `parts(out.shape, out.dtype)` lists.
        """
        dtype = str(out.dtype).removeprefix("torch.")
        want = self.parts(tuple(out.shape), dtype)
        for p in want:
            t = parts.get(p.name)
            if t is None or tuple(t.shape) != p.shape or str(t.dtype).removeprefix("torch.") != p.dtype:
                raise ValueError(f"codec {self.name}: part {p.name!r} missing or not {p.dtype} {p.shape}")
        if not self.lossy:
            out.copy_(parts["kv"])
            return
        if out.is_cuda:
            from lmcache_triton.kernels.quant import dequantize_rows
        else:  # CPU (the prefetcher's threads): the torch twin, never the interpreter
            from lmcache_triton.kernels.quant_ref import dequantize_rows_ref as dequantize_rows
        dequantize_rows(parts["q"], [parts[p.name] for p in want[1:]], self.quant_spec(), out)


@dataclass(frozen=True)
class Encoding:
    """An encoded chunk held as one `[nbytes]` uint8 buffer: the codec's parts packed from
    offset 0 in `Codec.parts` order (the payload layout of an encoded chunk file, so a tier
    writes or reads it as is).

    Args:
        codec: the lossy codec's name.
        dtype: dtype name of the decoded rows ("bfloat16").
        shape: shape of the decoded rows `[S, L, T, H, D]`.
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]

    def parts(self) -> list[PartSpec]:
        return get_codec(self.codec).parts(self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts())

    @property
    def num_tokens(self) -> int:
        return int(self.shape[2])

    @property
    def aligned(self) -> bool:
        """Whether every part sits at an offset its dtype divides, so `split` views all of them in
        place: what a writer of the parts into a buffer (a fused gather + quantize) needs. False
        only for odd sizes (an odd-sized int8 part before fp16 scales): `split` copies such a
        part out, and a write into the copy would never reach the buffer."""
        at = 0
        for p in self.parts():
            if at % _ITEMSIZE[p.dtype]:
                return False
            at += p.nbytes
        return True

    def split(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of each part in `buf` (`[nbytes]` uint8, contiguous, on any device). A part at
        an offset its dtype cannot be viewed at (an odd-sized int8 part before fp16 scales) is
        copied out instead."""
        import torch

        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self.nbytes:
            got = f"{buf.dtype} {tuple(buf.shape)}"
            raise ValueError(f"encoding {self.codec}: expected a [{self.nbytes}] uint8 buffer, got {got}")
        out, at = {}, 0
        for p in self.parts():
            dt = getattr(torch, p.dtype)
            raw = buf[at : at + p.nbytes]
            if at % dt.itemsize:
                raw = raw.clone()
            out[p.name] = raw.view(dt).view(p.shape)
            at += p.nbytes
        return out

    def q_and_scales(self, buf: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`(q, [scales per half])` of `buf`, as the quantizing kernels take them."""
        views = self.split(buf)
        return views["q"], [views[f"s{s}"] for s in range(self.shape[0])]

    def decode(self, buf: torch.Tensor, out: torch.Tensor) -> None:
        """Write the decoded rows of `buf` into `out` (`Codec.decode`)."""
        get_codec(self.codec).decode(self.split(buf), out)


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec(EXACT, lossy=False),
        Codec("int8", lossy=True, bits=8, k_mode="token", k_group=0, v_group=0),
        Codec("int4", lossy=True, bits=4, k_mode="channel", k_group=64, v_group=64),
    )
}
CODEC_NAMES: tuple[str, ...] = tuple(CODECS)


def get_codec(name: str) -> Codec:
    """The codec called `name`; ValueError (one line, naming the known ones) otherwise."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"codec: unknown {name!r}, expected one of {', '.join(CODEC_NAMES)}")
    return codec


class CodecPolicy:
    """Which codec a tier writes each chunk with: a default, and per-namespace choices (a key
    starts with its namespace digest, `hashing.CacheKey.hex`). The quality guard (`calibrate`)
    sets a namespace to a lossy codec only where a passing record exists.

    Args:
        default: codec name for keys of no listed namespace; default "exact".
    """

    def __init__(self, default: str = EXACT) -> None:
        self.default = get_codec(default)
        self._by_ns: dict[str, Codec] = {}

    def set(self, name: str, namespace: str | None = None) -> None:
        """Use codec `name` for keys of `namespace` (hex digest), or as the default (None)."""
        codec = get_codec(name)
        if namespace is None:
            self.default = codec
        else:
            self._by_ns[namespace.lower()] = codec

    def for_key(self, key: str) -> Codec:
        for ns, codec in self._by_ns.items():
            if key.startswith(ns):
                return codec
        return self.default

    def readable(self, key: str, name: str) -> bool:
        """Whether a chunk of `key` encoded with codec `name` may be served here: exact always,
        a lossy codec only where this policy writes `key` with it. A server left exact (the
        default, or the quality guard without a passing record) never serves a peer's lossy
        chunks from a shared directory or server: its outputs stay those of no cache."""
        return name == EXACT or name == self.for_key(key).name

    def names(self) -> list[str]:
        """Every codec this policy may write with (the default first)."""
        out = [self.default.name]
        out += [c.name for c in self._by_ns.values() if c.name not in out]
        return out
