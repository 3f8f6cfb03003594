"""The chunk format: one safetensors blob per chunk, the same bytes on disk and on the wire.

Primitives:
  `encode_chunk(key, tensor, meta, auth, codec)`  `(header, payload view)`: write the two in order.
  `header_length(head, total)` / `parse_header(raw, key, total, auth)`  the bounded header parser.
  `check_expect(md, want)`   the header carries each expected field.
  `decode_chunk(key, data, auth, expect, out)`  verify (and decode) a whole chunk held in memory.
  `decode_payload(hdr, payload, out)`  decode the verified payload of an encoded chunk.
  `ChunkAuth(secret)`        the seal: xxh3_64 checksum (no secret) or keyed BLAKE3 MAC.
  `ANY_SEAL`                 header checks for tools (inspect, clear): any seal this format writes
                             is accepted (nothing verified), an unknown scheme is not.

A chunk is a standard safetensors file (loadable by `safetensors.torch`) holding one tensor "kv"
and `__metadata__` with `format` (FORMAT), `key`, `checksum`, `dtype`, `shape`, plus the caller's
`meta` (model, layout fingerprint, ...). A chunk encoded by a lossy codec (`chunk.codec`) names it
in `codec` and holds the codec's tensors instead ("q", "s0", "s1": exactly the names, dtypes,
shapes and order `Codec.parts(shape, dtype)` lists, packed from offset 0); `dtype`/`shape` stay
those of the decoded rows. A header without `codec` is exact (every chunk written before codecs
existed reads as before). A codec this reader does not know is `UnknownCodec` (a miss, the chunk
left in place); parts that disagree with the codec are ChunkError (damaged). `checksum` is either
`xxh3_64:<hex>` (no secret: detects damage, not an adversary) or `blake3-mac:<key id>:<hex>` (with
`chunk_secret`: keyed BLAKE3, a MAC), in both cases over the metadata (canonical JSON minus
`checksum`) and the payload (for an encoded chunk: the encoded bytes, so nothing is decoded before
it is verified). The header is written here (8-byte little-endian length + JSON, space-padded to 8
bytes) so the payload goes from the tensor's memory to the file or socket with no intermediate
bytes object.

Invariants:
  * The parser never raises anything but ChunkError / ChunkUnverifiable on a hostile header
    (size, JSON nesting, exact schema, types, sizes are bounded before use).
  * Header parsing imports no torch: dtypes are safetensors codes here; `ChunkHeader.dtype`
    imports torch only when asked (the disk tools run without torch).

Checksum: xxh3_64, measured on this sandbox over a 32 MiB buffer: xxh3_64 29-45 GB/s, xxh3_128
31 GB/s, blake3 4.6 GB/s (single-threaded), zlib.crc32 4.2 GB/s. The checksum must not cost
more than the disk, so xxh3_64 (64 bits is plenty to detect corruption, not an adversary).
MAC (with a secret): keyed BLAKE3 8.4 GB/s single-threaded on a 32 MiB buffer, against
HMAC-SHA256 2.1 GB/s, keyed BLAKE2b 1.45 GB/s, Poly1305 14.6 GB/s (needs a one-time key per
message and the `cryptography` package); a MAC over header + xxh3 digest would not do (xxh3
collisions can be forged). BLAKE3 keyed mode is a PRF, so it is a sound MAC, and at 8 GB/s it
stays under the ~1.7 GB/s of the disk (bench_storage).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import blake3
import xxhash

if TYPE_CHECKING:
    import torch

    from lmcache_triton.chunk.codec import Codec, Encoding

FORMAT = "lmcache_triton.kv/1"
TENSOR_NAME = "kv"
RESERVED_META = ("format", "key", "checksum", "dtype", "shape", "codec")
MAX_HEADER = 1 << 20  # our headers are < 4 KiB; anything above 1 MiB is not ours
_MAX_OPENERS = 16  # '{' + '[' outside strings: ours has 5; bounds JSON nesting before json.loads
_MAX_DIMS = 16
_MAX_DIM = 1 << 48
_JSON_STR_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
KEY_RE = re.compile(r"^[0-9a-f]{8,256}$")  # chunk keys: lower-case hex (`CacheKey.hex`)
XXH = "xxh3_64:"
MAC = "blake3-mac:"
_KDF_CONTEXT = "lmcache_triton 2026-11 chunk MAC v1"

# torch dtype name (str(dtype) without "torch.") -> (safetensors code, bytes per element).
# Strings, not torch dtypes, so that parsing a header needs no torch.
DTYPE_CODES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}
_NAME_OF_CODE = {code: name for name, (code, _) in DTYPE_CODES.items()}


def check_key(key: str) -> str:
    """`key` itself when it is a chunk key (lower-case hex, safe as a file name or server key),
    else ValueError: nothing from user input may become a key."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"key: expected lower-case hex (CacheKey.hex), got {key!r}")
    return key


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the header's `dtype` field)."""
    return str(dtype).removeprefix("torch.")


def dtype_code(dtype: torch.dtype) -> str | None:
    """The safetensors code of a torch dtype ("BF16"), None when the format has none."""
    got = DTYPE_CODES.get(dtype_name(dtype))
    return None if got is None else got[0]


class ChunkError(Exception):
    """A chunk that must never be returned (damaged, forged, foreign): removed, counted."""


class ChunkUnverifiable(Exception):
    """A sound-looking chunk this reader cannot authenticate (signed with another or no secret,
    or signed while we have none): a miss, left in place for whoever owns it."""


class UnknownCodec(ChunkUnverifiable):
    """A chunk encoded by a codec this reader does not know (a newer writer): a miss, kept."""


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


class ChunkAuth:
    """How chunks are sealed: an xxh3_64 checksum (no secret) or a keyed BLAKE3 MAC (secret).

    Args:
        secret: bytes or str; None or empty means no authentication. The MAC key is derived from
            it with BLAKE3's key-derivation mode, so any length works (config asks >= 16 chars).
    """

    def __init__(self, secret: bytes | str | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self._key = blake3.blake3(secret, derive_key_context=_KDF_CONTEXT).digest() if secret else None
        # Names the key in headers so a reader tells "another server's secret" (a miss, file
        # kept) from "forged with our id" (corrupt, removed). A hash of the key: reveals nothing.
        self.key_id = blake3.blake3(b"key id", key=self._key).hexdigest()[:16] if self._key else None

    @property
    def signed(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never the secret
        return f"{type(self).__name__}(key_id={self.key_id})"

    def start(self, md: dict[str, str]) -> Hasher:
        """A hasher primed with the metadata (canonical JSON minus `checksum`); feed the payload."""
        h: Hasher = xxhash.xxh3_64() if self._key is None else blake3.blake3(key=self._key)
        h.update(json.dumps({k: v for k, v in md.items() if k != "checksum"}, sort_keys=True).encode())
        return h

    def seal(self, h: Hasher) -> str:
        """The `checksum` value for a finished hasher from `start`."""
        if self._key is None:
            return XXH + h.hexdigest()
        return f"{MAC}{self.key_id}:{h.hexdigest()}"

    def check_scheme(self, md: dict[str, str]) -> None:
        """Raises ChunkUnverifiable when this reader cannot (or must not) check the chunk's seal,
        ChunkError when the seal is not one we know. Cheap: header only, before the payload."""
        c = md["checksum"]
        if c.startswith(XXH):
            if self._key is not None:
                raise ChunkUnverifiable("unsigned chunk (chunk_secret is set: only signed chunks are used)")
            return
        if c.startswith(MAC):
            if self._key is None:
                raise ChunkUnverifiable("signed chunk (no chunk_secret configured)")
            if not c.startswith(f"{MAC}{self.key_id}:"):
                raise ChunkUnverifiable("chunk signed with another chunk_secret")
            return
        raise ChunkError("unknown checksum scheme")


class AnySeal(ChunkAuth):
    """Header checks for tools (`inspect`, `clear`, the remote tier's `entries`): a chunk sealed
    in any scheme this format writes (checksum, or a MAC under any key) is accepted, an unknown
    scheme is ChunkError. Nothing is verified: never use it to read a chunk for serving."""

    def check_scheme(self, md: dict[str, str]) -> None:
        if not md["checksum"].startswith((XXH, MAC)):
            raise ChunkError("unknown checksum scheme")


ANY_SEAL = AnySeal()


def is_signed(md: dict[str, str]) -> bool:
    """Whether a parsed header carries a MAC (rather than a plain checksum)."""
    return md.get("checksum", "").startswith(MAC)


@dataclass
class ChunkHeader:
    """A parsed, schema-checked chunk header (see `parse_header`)."""

    meta: dict[str, str]
    code: str  # safetensors dtype code ("BF16")
    shape: list[int]
    nbytes: int  # payload bytes (encoded, for an encoded chunk)
    hlen: int  # JSON length (the payload starts at 8 + hlen)
    codec: str = "exact"  # `chunk.codec` name; `code`/`shape` are the decoded rows'
    parts: tuple[tuple[str, str, tuple[int, ...], int, int], ...] = ()  # (name, dtype, shape, start, end)

    @property
    def dtype(self) -> torch.dtype:
        import torch  # here: parsing a header needs no torch

        return getattr(torch, _NAME_OF_CODE[self.code])


def _payload_view(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(_uint8(t)).numpy().data.cast("B")


def _uint8(t: torch.Tensor) -> torch.dtype:
    import torch

    return torch.uint8


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    return t.reshape(-1).view(_uint8(t)).numpy().data.cast("B")


def check_meta(dtype: torch.dtype, meta: Mapping[str, str] | None) -> dict[str, str]:
    """Validate what `encode_chunk` would refuse, before anything is taken (ValueError)."""
    meta = dict(meta or {})
    clash = [k for k in meta if k in RESERVED_META]
    if clash:
        raise ValueError(f"meta: keys {clash} are reserved by the chunk format")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("meta: expected dict[str, str]")
    if dtype_code(dtype) is None:
        codes = sorted(c for c, _ in DTYPE_CODES.values())
        raise ValueError(f"tensor: dtype {dtype} has no safetensors code (supported: {codes})")
    return meta


def encode_chunk(
    key: str,
    tensor: torch.Tensor,
    meta: Mapping[str, str] | None = None,
    auth: ChunkAuth | None = None,
    codec: Codec | None = None,
    encoding: Encoding | None = None,
) -> tuple[bytes, memoryview]:
    """`(header, payload)`: the 8-byte length + JSON header, and the payload's bytes (a view of the
    tensor's memory when exact; the encoded parts, packed, otherwise).

    With `encoding`, `tensor` is a chunk already encoded (`[encoding.nbytes]` uint8: its parts
    packed as a file holds them, e.g. quantized on the GPU): written as it is (no re-encode,
    `codec` unused), the header that of the decoded rows `encoding` names.

    Writing `header` then `payload` gives a safetensors file; the checksum or MAC in the header
    covers the metadata and the payload. A lossy `codec` that does not apply to the chunk
    (`Codec.applies`: opaque pages, an fp8 cache, ...) stores it exact. Encoding runs here, in
    the caller's thread: the tiers call this from their background writers.
    """
    if encoding is not None:
        return _encoded_chunk(key, tensor, meta, auth or ChunkAuth(), encoding)
    meta = check_meta(tensor.dtype, meta)
    auth = auth or ChunkAuth()
    md = dict(meta)
    md.update(format=FORMAT, key=key, dtype=dtype_name(tensor.dtype), shape=",".join(map(str, tensor.shape)))
    if codec is not None and codec.lossy and codec.applies(tuple(tensor.shape), md["dtype"], meta):
        payload, entries = _encode_parts(tensor, codec)
        md["codec"] = codec.name
    else:
        payload = _payload_view(tensor)
        entries = {
            TENSOR_NAME: {
                "dtype": dtype_code(tensor.dtype),
                "shape": list(tensor.shape),
                "data_offsets": [0, len(payload)],
            }
        }
    h = auth.start(md)
    h.update(payload)
    md["checksum"] = auth.seal(h)
    header = {"__metadata__": md, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors: payload starts 8-aligned
    return len(raw).to_bytes(8, "little") + raw, payload


def _encoded_chunk(
    key: str, buf: torch.Tensor, meta: Mapping[str, str] | None, auth: ChunkAuth, encoding: Encoding
) -> tuple[bytes, memoryview]:
    """`encode_chunk` of a chunk already encoded: the same header and payload bytes as encoding
    its decoded rows here would give (the kernels and the twins quantize bit-identically)."""
    import torch

    if buf.dtype != torch.uint8 or tuple(buf.shape) != (encoding.nbytes,) or encoding.dtype not in DTYPE_CODES:
        want = f"[{encoding.nbytes}] uint8 parts of {encoding.dtype} rows"
        raise ValueError(f"encoding {encoding.codec}: expected {want}")
    meta = check_meta(getattr(torch, encoding.dtype), meta)
    md = dict(meta)
    md.update(format=FORMAT, key=key, dtype=encoding.dtype, shape=",".join(map(str, encoding.shape)))
    md["codec"] = encoding.codec
    entries: dict[str, dict[str, Any]] = {}
    at = 0
    for p in encoding.parts():
        offsets = [at, at + p.nbytes]
        entries[p.name] = {"dtype": DTYPE_CODES[p.dtype][0], "shape": list(p.shape), "data_offsets": offsets}
        at += p.nbytes
    payload = _payload_view(buf)
    h = auth.start(md)
    h.update(payload)
    md["checksum"] = auth.seal(h)
    raw = json.dumps({"__metadata__": md, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, payload


def _encode_parts(tensor: torch.Tensor, codec: Codec) -> tuple[memoryview, dict[str, dict[str, Any]]]:
    """The codec's parts packed into one buffer, and their safetensors entries."""
    import torch

    rows = tensor.detach()
    if rows.device.type != "cpu":
        rows = rows.cpu()
    parts = codec.encode(rows.contiguous())
    total = sum(t.numel() * t.element_size() for _, t in parts)
    buf = torch.empty(total, dtype=torch.uint8)
    entries: dict[str, dict[str, Any]] = {}
    at = 0
    for name, t in parts:
        n = t.numel() * t.element_size()
        if n:
            buf[at : at + n].copy_(t.reshape(-1).view(torch.uint8))
        entries[name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    return tensor_bytes(buf), entries


def header_length(head: bytes, total_size: int) -> int:
    """The JSON length from a chunk's first 8 bytes; ChunkError when implausible."""
    if len(head) < 8:
        raise ChunkError("shorter than a safetensors header")
    hlen = int.from_bytes(head[:8], "little")
    if hlen <= 0 or hlen > MAX_HEADER or 8 + hlen > total_size:
        raise ChunkError(f"bad header length {hlen}")
    return hlen


def load_json(raw: bytes) -> Any:
    """json.loads with the nesting bounded first: a 100k-deep `[[[...` raises RecursionError."""
    skeleton = _JSON_STR_RE.sub(b"", raw)
    if skeleton.count(b"{") + skeleton.count(b"[") > _MAX_OPENERS:
        raise ChunkError("header nests too deep for a chunk header")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChunkError("header is not JSON") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(raw: bytes, key: str, total_size: int, auth: ChunkAuth | None = None) -> ChunkHeader:
    """Parse and check the JSON header of the chunk `key` whose whole size is `total_size`.

    Any header this parser has not seen before raises ChunkError (never TypeError, OverflowError,
    RecursionError, ...); a header sealed in a way `auth` cannot check raises ChunkUnverifiable.
    """
    auth = auth or ChunkAuth()
    hlen = len(raw)
    header = load_json(raw)
    if not isinstance(header, dict):
        raise ChunkError("header is not a JSON object")
    md = header.get("__metadata__")
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise ChunkError("no __metadata__ of strings")
    if md.get("format") != FORMAT:
        raise ChunkError(f"format {str(md.get('format'))[:64]!r}, expected {FORMAT!r}")
    if md.get("key") != key:
        raise ChunkError(f"key {str(md.get('key'))[:80]!r} does not match the file name")
    if "checksum" not in md:
        raise ChunkError("no checksum")
    if "codec" in md:
        return _parse_encoded(header, md, hlen, total_size, auth)
    info = header.get(TENSOR_NAME)
    if not isinstance(info, dict) or set(header) != {"__metadata__", TENSOR_NAME}:
        raise ChunkError(f"expected exactly one tensor {TENSOR_NAME!r}")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    name = _NAME_OF_CODE.get(code) if isinstance(code, str) else None
    if (
        name is None
        or not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape)
    ):
        raise ChunkError("bad dtype or shape")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * DTYPE_CODES[name][1]
    if not isinstance(offsets, list) or len(offsets) != 2 or offsets != [0, nbytes]:
        raise ChunkError("data_offsets disagree with dtype and shape")
    if md.get("shape") != ",".join(map(str, shape)) or md.get("dtype") != name:
        raise ChunkError("metadata dtype/shape disagree with the tensor entry")
    if total_size != 8 + hlen + nbytes:
        raise ChunkError(f"size {total_size}, expected {8 + hlen + nbytes} (truncated or padded)")
    auth.check_scheme(md)
    return ChunkHeader(md, str(code), list(shape), nbytes, hlen)


def _dims(v: Any) -> tuple[int, ...] | None:
    if not isinstance(v, list) or len(v) > _MAX_DIMS or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in v):
        return None
    return tuple(v)


def _parse_encoded(
    header: dict[str, Any], md: dict[str, str], hlen: int, total_size: int, auth: ChunkAuth
) -> ChunkHeader:
    """`parse_header` for a chunk whose `codec` is set: its tensors must be exactly the codec's
    parts for the decoded `dtype`/`shape`, packed in order from offset 0."""
    from lmcache_triton.chunk.codec import CODECS

    name = md["codec"]
    codec = CODECS.get(name)
    dtype = md.get("dtype", "")
    shape = _dims([int(d) for d in md.get("shape", "").split(",") if d.isdigit()]) if md.get("shape") else None
    if shape is None or ",".join(map(str, shape)) != md.get("shape") or dtype not in DTYPE_CODES:
        raise ChunkError("metadata dtype/shape of an encoded chunk are malformed")
    if codec is None or not codec.lossy:
        auth.check_scheme(md)  # a foreign seal says more than a foreign codec
        raise UnknownCodec(f"codec {name[:40]!r} is not known to this reader")
    if not codec.applies(shape, dtype):
        raise ChunkError(f"codec {name} cannot encode {dtype} rows of shape {list(shape)}")
    want = codec.parts(shape, dtype)
    if set(header) != {"__metadata__", *(p.name for p in want)}:
        got = sorted(set(header) - {"__metadata__"})
        raise ChunkError(f"codec {name}: expected tensors {[p.name for p in want]}, got {got}")
    at = 0
    parts = []
    for p in want:
        info = header[p.name]
        if (
            not isinstance(info, dict)
            or info.get("dtype") != DTYPE_CODES[p.dtype][0]
            or _dims(info.get("shape")) != p.shape
        ):
            raise ChunkError(f"codec {name}: tensor {p.name!r} is not {p.dtype} {list(p.shape)}")
        if info.get("data_offsets") != [at, at + p.nbytes]:
            raise ChunkError(f"codec {name}: tensor {p.name!r} offsets disagree with its size")
        parts.append((p.name, p.dtype, p.shape, at, at + p.nbytes))
        at += p.nbytes
    if total_size != 8 + hlen + at:
        raise ChunkError(f"size {total_size}, expected {8 + hlen + at} (truncated or padded)")
    auth.check_scheme(md)
    return ChunkHeader(md, DTYPE_CODES[dtype][0], list(shape), at, hlen, name, tuple(parts))


def decode_payload(hdr: ChunkHeader, payload: torch.Tensor, out: torch.Tensor) -> None:
    """Decode the verified payload of an encoded chunk (`hdr.codec` set; `payload` the `[nbytes]`
    uint8 CPU tensor) into `out` (contiguous, the decoded dtype/shape)."""
    import torch

    from lmcache_triton.chunk.codec import get_codec

    views = {
        name: payload[a:b].view(getattr(torch, dt)).view(shape) for name, dt, shape, a, b in hdr.parts
    }
    get_codec(hdr.codec).decode(views, out)


def check_expect(md: dict[str, str], want: dict[str, str]) -> None:
    """ChunkError unless the header carries each `want` field with the same value."""
    for k, v in want.items():
        if md.get(k) != v:
            raise ChunkError(f"metadata {k}={str(md.get(k))[:80]!r}, expected {v!r}")


def decode_chunk(
    key: str,
    data: bytes | memoryview,
    auth: ChunkAuth | None = None,
    expect: dict[str, str] | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, str]]:
    """The verified `(tensor, metadata)` of a whole chunk held in memory (e.g. from a network
    tier). Raises ChunkError (damaged, forged, wrong `expect`), ChunkUnverifiable, or ValueError
    when `out` has another dtype/shape."""
    import torch

    auth = auth or ChunkAuth()
    mv = memoryview(data).cast("B")
    hlen = header_length(bytes(mv[:8]), len(mv))
    hdr = parse_header(bytes(mv[8 : 8 + hlen]), key, len(mv), auth)
    check_expect(hdr.meta, expect or {})
    payload = mv[8 + hlen :]
    h = auth.start(hdr.meta)
    h.update(payload)
    if auth.seal(h) != hdr.meta["checksum"]:
        raise ChunkError("checksum mismatch" if not auth.signed else "MAC mismatch")
    if out is None:
        out = torch.empty(hdr.shape, dtype=hdr.dtype)
    elif out.dtype != hdr.dtype or list(out.shape) != hdr.shape or not out.is_contiguous():
        raise ValueError(f"out: expected contiguous {hdr.dtype} {tuple(hdr.shape)}, got {out.dtype} {tuple(out.shape)}")
    if hdr.parts:
        buf = torch.empty(hdr.nbytes, dtype=torch.uint8)
        tensor_bytes(buf)[:] = payload
        decode_payload(hdr, buf, out)
    elif hdr.nbytes:
        tensor_bytes(out)[:] = payload
    return out, hdr.meta
