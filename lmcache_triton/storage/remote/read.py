"""The remote tier's reads: a chunk GET from its server, its header checked before the payload
is read, the payload verified where it lands; the fate of a value that is not a usable chunk.

Primitives:
  `RemoteReads.open_read(key, expect)`  GET with the chunk header read and checked first; the
                             reader's `read_into(out)` receives the payload straight into the
                             caller's buffer and verifies it there (one copy, no buffer of ours).
  `RemoteReads.fetch(key, expect)`  GET + verify a whole value held in memory: `(dtype, shape,
                             meta, payload view)` or None; `get_into` copies it out.
  `copy_payload(payload, out)`  a verified payload into a tensor of the same byte size.

Invariants (the tier's, `remote.tier`, in full):
  * A value is used only once verified; a damaged one is a miss, counted and deleted; one sealed
    in a way we cannot check, or sound but for another configuration (`expect`, a codec this
    tier would not write), is a miss left in place.
  * Never an exception into the caller for anything the server or network does: a server down,
    slow (one overall deadline per reply: `data_timeout`), refusing or redirecting is a miss.
  * A reply never makes the tier allocate by the server's word: a value claiming more than
    `max_value_bytes` is a miss (connection dropped, value kept, `oversized`).
  * A connection whose reply was not read to its end is dropped, never reused.
  * Counts, once-only warnings and the change log are the tier's (`TierCounters`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping

import torch

from lmcache_triton.chunk.codec import CodecPolicy, Encoding
from lmcache_triton.chunk.format import (
    RESERVED_META,
    ChunkAuth,
    ChunkError,
    ChunkHeader,
    ChunkUnverifiable,
    check_expect,
    decode_payload,
    header_length,
    parse_header,
)

from ..counters import TierCounters
from ..tier import ChunkReader
from .cluster import Node, Router
from .keys import KeySpace
from .protocol import ReplyReader, ReplyTooLarge, ServerError, connection_socket, read_value


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


class RemoteReads:
    """The read path of one `RemoteTier` (see the module docstring).

    Args:
        router: the tier's servers (`cluster.Router`).
        keys: the tier's key space (`keys.KeySpace`).
        auth: checksum or MAC (`chunk_secret`) values are verified with.
        codecs: the tier's codec policy (a lossy chunk is served only where it would be written).
        counts: the tier, whose counters, warnings and change log the reads use.
        data_timeout: seconds bounding one GET of a chunk (all of its reply).
        max_value_bytes: bytes a value may claim at most; a reply claiming more is a miss.
        refused: redis-py's `ResponseError` (a server's refusal, as the client raises it).
    """

    def __init__(
        self,
        router: Router,
        keys: KeySpace,
        auth: ChunkAuth,
        codecs: CodecPolicy,
        counts: TierCounters,
        data_timeout: float,
        max_value_bytes: int,
        refused: type[Exception],
    ) -> None:
        self.router = router
        self.masked = router.masked
        self.keys = keys
        self.auth = auth
        self.codecs = codecs
        self.data_timeout = data_timeout
        self.max_value_bytes = max_value_bytes
        self._counts = counts
        self._refused = refused

    def _read_failed(self, key: str, e: BaseException, node: Node) -> None:
        """Count (and log once) a read that failed for a reason of the server or network."""
        self._counts.count("misses")
        if isinstance(e, (ServerError, self._refused)):
            self.router.redirected(e)
            self._counts.warn_once("get", "lmcache_triton remote tier: GET refused by %s: %s", self.masked, e)
        elif isinstance(e, ReplyTooLarge):  # not ours to use (another configuration, or hostile): kept
            self._counts.count("oversized")
            self._counts.warn_once(
                "oversized", "lmcache_triton remote tier: chunk %s not read from %s: %s (warned once)",
                key[:24], self.masked, e,
            )  # fmt: skip
        elif self.router.is_outage(e):
            self.router.went_down(e, node=node)
        else:
            raise e

    def _bad_chunk(self, key: str, e: ChunkError | ChunkUnverifiable) -> None:
        """A value that is not a usable chunk: unverifiable (kept) or damaged (deleted)."""
        self._counts.count("misses")
        if isinstance(e, ChunkUnverifiable):
            self._counts.count("unauthenticated")
            self._counts.warn_once(
                "unauth", "lmcache_triton remote tier: chunk %s not used: %s (warned once)", key[:24], e
            )
            return
        self._counts.count("corrupt")
        self._counts.warn_once(
            "corrupt", "lmcache_triton remote tier: chunk %s rejected: %s (warned once)", key[:24], e
        )
        with contextlib.suppress(Exception):  # in our key space and damaged: remove it
            rkey = self.keys.server_key(key)
            node = self.router.owners([rkey])[0]
            if node is not None:
                self.router.call(lambda: node.bulk.delete(rkey), None, node)
        self._counts.changed("-", key)

    def _mismatch(self, key: str, e: ChunkError) -> None:
        # Sound and ours, for another configuration (e.g. format_version): a miss, kept.
        self._counts.count("mismatch")
        self._counts.count("misses")
        self._counts.warn_once(
            "mismatch", "lmcache_triton remote tier: chunk %s not used: %s (warned once)", key[:24], e
        )

    @contextlib.contextmanager
    def open_read(self, key: str, expect: Mapping[str, str] | None = None) -> Iterator[ChunkReader | None]:
        """GET a chunk with its header read and checked (`expect`ed fields included): a
        `ChunkReader` whose `read_into(out)` receives the payload into `out` and verifies it
        there, or None (a miss, counted). The connection stays with the reader until the block
        ends; one not read to its end is dropped."""
        rkey = self.keys.server_key(key)
        node = self.router.owners([rkey])[0]
        if node is None or not self.router.may_try(node):
            self._counts.count("misses")
            yield None
            return
        pool = node.bulk.connection_pool
        conn = None
        reader: _StreamReader | None = None
        try:
            hdr = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command(conn.pack_command("GET", rkey), check_health=False)
                rd = ReplyReader(connection_socket(conn), time.monotonic() + self.data_timeout, self.max_value_bytes)
                with rd:
                    hdr = self._read_header(rd, key)
                self.router.went_up(node)
                if hdr is not None:
                    check_expect(hdr.meta, dict(expect or {}))
                    self._check_codec(key, hdr)
                    reader = _StreamReader(self, key, node, rd, hdr)
            except (ChunkError, ChunkUnverifiable) as e:
                if hdr is not None and isinstance(e, ChunkError):  # `expect`: another configuration
                    self._mismatch(key, e)
                else:
                    self._bad_chunk(key, e)
            except Exception as e:
                self._read_failed(key, e, node)
            yield reader
        finally:
            if conn is not None:
                if reader is None or not reader.clean:
                    conn.disconnect()  # a half-read reply must never be reused
                pool.release(conn)

    def _read_header(self, rd: ReplyReader, key: str) -> ChunkHeader | None:
        """The checked header of the GET reply being read (None: no such key)."""
        n = rd.bulk_length()
        if n is None:
            self._counts.count("misses")
            return None
        head = bytearray(min(n, 8))
        rd.read_exact(memoryview(head))
        hlen = header_length(bytes(head), n)
        raw = bytearray(hlen)
        rd.read_exact(memoryview(raw))
        return parse_header(bytes(raw), key, n, self.auth)

    def _get_raw(self, key: str) -> memoryview | None:
        rkey = self.keys.server_key(key)
        node = self.router.owners([rkey])[0]
        if node is None or not self.router.may_try(node):
            self._counts.count("misses")
            return None
        pool = node.bulk.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            conn.send_packed_command(conn.pack_command("GET", rkey), check_health=False)
            data = read_value(connection_socket(conn), time.monotonic() + self.data_timeout, self.max_value_bytes)
        except Exception as e:
            if conn is not None:
                conn.disconnect()  # a half-read reply must never be reused
            self._read_failed(key, e, node)
            return None
        finally:
            if conn is not None:
                pool.release(conn)
        self.router.went_up(node)
        if data is None:
            self._counts.count("misses")
            return None
        self._counts.count("bytes_read", len(data))
        return data

    def _verify(
        self, key: str, data: memoryview, expect: Mapping[str, str] | None
    ) -> tuple[ChunkHeader, memoryview] | None:
        """The checked header and payload view of a value, or None (a miss, counted)."""
        try:
            hlen = header_length(bytes(data[:8]), len(data))
            hdr = parse_header(bytes(data[8 : 8 + hlen]), key, len(data), self.auth)
            payload = data[8 + hlen :]
            h = self.auth.start(hdr.meta)
            h.update(payload)
            if self.auth.seal(h) != hdr.meta["checksum"]:
                raise ChunkError("checksum mismatch" if not self.auth.signed else "MAC mismatch")
        except (ChunkError, ChunkUnverifiable) as e:
            self._bad_chunk(key, e)
            return None
        try:
            check_expect(hdr.meta, dict(expect or {}))
            self._check_codec(key, hdr)
        except ChunkError as e:
            self._mismatch(key, e)
            return None
        return hdr, payload

    def _check_codec(self, key: str, hdr: ChunkHeader) -> None:
        """A lossy chunk this tier would not write for `key` is not served (`CodecPolicy.readable`)."""
        if not self.codecs.readable(key, hdr.codec):
            raise ChunkError(f"{hdr.codec} chunk, and this model is exact here")

    def fetch(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> tuple[torch.dtype, tuple[int, ...], dict[str, str], memoryview] | None:
        """GET and verify a whole chunk in memory: `(dtype, shape, meta, payload)` or None (a miss)."""
        data = self._get_raw(key)
        if data is None:
            return None
        got = self._verify(key, data, expect)
        if got is None:
            return None
        hdr, payload = got
        self._counts.count("hits")
        return hdr.dtype, tuple(hdr.shape), dict(hdr.meta), payload

    def get_into(
        self, key: str, out: torch.Tensor | None = None, expect: Mapping[str, str] | None = None
    ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """The verified chunk copied into `out` (or a new tensor) with its header metadata;
        None on a miss or when `out` has another dtype/shape (the value is kept)."""
        data = self._get_raw(key)
        got = None if data is None else self._verify(key, data, expect)
        if got is None:
            return None
        hdr, payload = got
        self._counts.count("hits")
        shape = tuple(hdr.shape)
        if out is None:
            out = torch.empty(shape, dtype=hdr.dtype)
        elif out.dtype != hdr.dtype or tuple(out.shape) != shape or not out.is_contiguous():
            return None
        if hdr.parts:  # encoded: decode the verified bytes
            buf = torch.empty(hdr.nbytes, dtype=torch.uint8)
            _bytes_of(buf)[:] = payload
            decode_payload(hdr, buf, out)
        else:
            copy_payload(payload, out)
        return out, dict(hdr.meta)




class _StreamReader:
    """A GET reply whose chunk header was checked; `read_into` receives the payload into the
    caller's buffer, then verifies it there (`ChunkReader`)."""

    def __init__(self, reads: RemoteReads, key: str, node: Node, rd: ReplyReader, hdr: ChunkHeader) -> None:
        self.dtype = hdr.dtype
        self.shape = tuple(hdr.shape)
        self.meta = {k: v for k, v in hdr.meta.items() if k not in RESERVED_META}
        self.clean = False  # True once the reply was read to its end: the connection is reusable
        self._reads, self._key, self._node, self._rd, self._hdr = reads, key, node, rd, hdr
        self._used = False
        self.encoding: Encoding | None = (
            Encoding(hdr.codec, str(hdr.dtype).removeprefix("torch."), tuple(hdr.shape)) if hdr.parts else None
        )

    def read_encoded_into(self, buf: torch.Tensor) -> bool:
        """`EncodedReader`: the verified parts into `buf`, not decoded."""
        want = (self._hdr.nbytes,)
        fits = buf.dtype == torch.uint8 and tuple(buf.shape) == want and buf.is_contiguous() and not buf.is_cuda
        if self.encoding is None or not fits:
            raise ValueError(f"remote tier: read_encoded_into needs a contiguous CPU [{want[0]}] uint8 tensor")
        return self._read(buf, None)

    def read_into(self, out: torch.Tensor) -> bool:
        if out.dtype != self.dtype or tuple(out.shape) != self.shape or not out.is_contiguous() or out.is_cuda:
            raise ValueError(
                f"remote tier: read_into needs a contiguous CPU {self.dtype} tensor of shape {self.shape}, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        hdr = self._hdr
        # An encoded chunk lands in a scratch buffer, is verified there, then decoded into `out`.
        if hdr.parts:
            return self._read(torch.empty(hdr.nbytes, dtype=torch.uint8), out)
        return self._read(out, None)

    def _read(self, buf: torch.Tensor, decode_into: torch.Tensor | None) -> bool:
        """The payload into `buf`, verified there, then (when `decode_into` is given) decoded."""
        if self._used:
            raise ValueError("remote tier: a chunk reader reads once")
        self._used = True
        reads = self._reads
        hdr = self._hdr
        view = _bytes_of(buf)
        try:
            with self._rd as rd:
                rd.read_exact(view)
                rd.end_bulk()
                rd.done()
        except Exception as e:
            reads._read_failed(self._key, e, self._node)
            return False
        self.clean = True
        h = reads.auth.start(self._hdr.meta)
        h.update(view)
        if reads.auth.seal(h) != self._hdr.meta["checksum"]:
            reads._bad_chunk(self._key, ChunkError("checksum mismatch" if not reads.auth.signed else "MAC mismatch"))
            return False
        if decode_into is not None:
            try:
                decode_payload(hdr, buf, decode_into)
            except ValueError as e:  # parts were checked with the header: not expected
                reads._bad_chunk(self._key, ChunkError(f"cannot decode: {e}"))
                return False
        reads._counts.count("hits")
        reads._counts.count("bytes_read", 8 + self._hdr.hlen + self._hdr.nbytes)
        return True


def copy_payload(payload: memoryview, out: torch.Tensor) -> None:
    """Copy a verified payload into a contiguous tensor of the same byte size."""
    n = math.prod(out.shape) * out.element_size()
    if len(payload) != n:
        raise ValueError(f"payload of {len(payload)} bytes for a tensor of {n}")
    if n:
        _bytes_of(out)[:] = payload
