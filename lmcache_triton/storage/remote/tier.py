"""Remote tier: chunks on a Valkey or Redis server (or cluster) shared by many vLLM instances.

Implements `storage.tier.SlowTier` (name "remote", medium "STORAGE", locality "REMOTE").

Primitives:
  `contains_many(keys)`      presence of many chunks in ONE pipelined round trip (EXISTS each; a
                             cluster: one pipeline per primary, all sent before any reply is
                             read), bounded by the short lookup timeout (`remote_timeout`).
  `open_read(key, expect)`   GET with the chunk header read and checked first; the reader's
                             `read_into(out)` receives the payload straight into the caller's
                             buffer and verifies it there (one copy, no buffer of ours).
  `fetch(key, expect)`       GET + verify a whole value held in memory: `(dtype, shape, meta,
                             payload view)` or None; `get_into`/`get_with_meta` copy it out.
                             The read path (these four) is `read.RemoteReads`.
  `put(key, tensor, meta, on_done)`  queue a write and return at once (bounded queue); the
                             writer thread seals the chunk and SETs it.
  `flush`, `close`, `stats`, `track_changes`/`take_changes`; maintenance (`scan_keys`,
  `entries`, `clear`, `server_info`) in `admin.RemoteAdmin`.

Client: redis-py with hiredis for connections, commands and maintenance (measured against
valkey-glide, bench/RESULTS.md "Remote tier"); its SET of a 16 MiB value runs at ~0.6 GB/s on
loopback because it packs the command into one bytes object: this tier writes the RESP header,
then the chunk header and the tensor's own memory (no intermediate copy) with
`send_packed_command`, ~2.2 GB/s (glide ~1.3 GB/s). Replies to the tier's own commands are read
by `protocol.ReplyReader` off the connection's socket: on plain TCP/unix sockets a value arrives
in one blocking `recv_into(MSG_WAITALL)` (the GIL is released once per value; inside vLLM a 6 MB
prefetch went from 10-35 ms to 4-11 ms).

Invariants:
  * Server keys: `keys.KeySpace` (each `chunk_secret` its own key space; no chunk key visible
    with a secret). Any key that is not lower-case hex raises ValueError.
  * Values are byte-identical to the disk tier's files (`chunk.format.encode_chunk`): safetensors
    with a checksum (xxh3_64) or, with `chunk_secret`, a keyed BLAKE3 MAC over header and
    payload. A value is used only once verified; a damaged one is a miss, counted and deleted;
    one sealed in a way we cannot check is a miss left in place.
  * Never an exception into the caller for anything the server or network does: down, slow
    (every reply has ONE overall deadline: `timeout` for lookups, `data_timeout` for a chunk),
    restarted empty or evicting are misses; a write the server refuses (OOM under maxmemory,
    READONLY replica, no permission) is counted in `stats["refused"]` and `write_errors`, warned
    once. Connection state and backoff per server: `cluster.Router`.
  * A reply never makes the tier allocate by the server's word: a value claiming more than
    `max_value_bytes` is a miss (connection dropped, value kept, `stats["oversized"]`), and a
    value's memory follows the bytes that arrived.
  * Writes: a bounded queue (`max_pending` chunks); a full queue drops the write (counted in
    `dropped`). The writer keeps a reference to the queued tensor until written: the caller must
    not mutate it (the manager hands over a held CPU-tier buffer, released by `on_done`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmcache_triton.chunk.codec import EXACT, CodecPolicy, Encoding
from lmcache_triton.chunk.format import ChunkAuth, check_meta, encode_chunk

from ..counters import TierCounters
from ..tier import ChunkReader, Locality, Medium, OnDone
from ..writer import WriteQueue
from .admin import RemoteAdmin
from .cluster import Node, Router
from .keys import KeySpace
from .protocol import ReplyTooLarge, ServerError, connection_socket, read_replies, read_reply
from .read import RemoteReads
from .url import check_url

if TYPE_CHECKING:
    from redis.connection import Connection

logger = logging.getLogger("lmcache_triton.storage.remote")

DEFAULT_MAX_VALUE = 1 << 30  # bytes a value may claim when the caller names no bound
_STATS = (
    "lookups", "lookup_keys", "hits", "misses", "corrupt", "unauthenticated", "mismatch", "writes",
    "bytes_written", "bytes_read", "write_errors", "refused", "dropped", "oversized",
    "raw_bytes_written", "encoded_writes",
)  # fmt: skip


class RemoteTier(TierCounters):
    """Chunks on a Valkey/Redis server or cluster (see module docstring).

    Args:
        url: `remote_url` (checked by `check_url`).
        timeout: seconds bounding a presence lookup (connect and all replies); default 0.5.
        data_timeout: seconds bounding one GET/SET of a chunk (all of its reply); default 10.
        secret: `chunk_secret` (None: xxh3 checksums, no authentication, the unsigned key space).
        max_pending: chunks queued for writing at most; default 64.
        writer: start the background writer (False for a scheduler that only looks up).
        max_value_bytes: bytes a stored value may have at most (the largest chunk this tier
            could have stored: the builder passes the CPU tier's size; an engine that knows its
            chunk shape may lower the attribute); a reply claiming more is a miss. Default
            `DEFAULT_MAX_VALUE` (1 GiB).
        codec: the codec chunks are written with (`chunk.codec`; default "exact"); `codecs`
            (a `CodecPolicy`) changes it, per namespace too. Exact chunks are always read, a lossy
            codec's only where the policy writes that key with it (`CodecPolicy.readable`).

    Raises:
        RemoteURLError: the URL is not one the tier takes (message masked).
    """

    name = "remote"
    medium: Medium = "STORAGE"
    locality: Locality = "REMOTE"

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        data_timeout: float = 10.0,
        secret: bytes | str | None = None,
        max_pending: int = 64,
        writer: bool = True,
        max_value_bytes: int = DEFAULT_MAX_VALUE,
        codec: str = EXACT,
    ) -> None:
        self.codecs = CodecPolicy(codec)
        import redis  # imported here: the CLI and tiers import without the client installed

        self._redis = redis
        self.url = check_url(url)
        self.timeout = timeout
        data_timeout = max(data_timeout, timeout)
        self.router = Router(self.url, timeout, data_timeout)
        self.masked = self.router.masked
        self.cluster = self.router.cluster
        self.auth = ChunkAuth(secret)
        self.keys = KeySpace(secret)
        self.admin = RemoteAdmin(self.router, self.keys)
        self._reads = RemoteReads(
            self.router, self.keys, self.auth, self.codecs, self, data_timeout, max(1, int(max_value_bytes)),
            redis.ResponseError,
        )
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(_STATS, 0)
        self._warned: set[str] = set()
        self._closed = False
        self._changes: list[tuple[str, str]] | None = None  # ("+" | "-", key), see track_changes
        self._writer: WriteQueue | None = None
        if writer:
            self._writer = WriteQueue(
                self._write_queued, "lmcache-triton-remote-writer", max_pending, on_error=self._write_raised
            )

    def __repr__(self) -> str:  # never the password
        return f"RemoteTier({self.masked})"

    # The reads' settings (`RemoteReads`), read at each use; the writes read them here too.

    @property
    def data_timeout(self) -> float:
        """Seconds bounding one GET/SET of a chunk (all of its reply)."""
        return self._reads.data_timeout

    @data_timeout.setter
    def data_timeout(self, value: float) -> None:
        self._reads.data_timeout = value

    @property
    def max_value_bytes(self) -> int:
        """Bytes a stored value may have at most; a reply claiming more is a miss."""
        return self._reads.max_value_bytes

    @max_value_bytes.setter
    def max_value_bytes(self, value: int) -> None:
        self._reads.max_value_bytes = value

    # ------------------------------------------------------------------ connection state

    @property
    def up(self) -> bool:
        """True when every server (every known cluster primary) is reachable."""
        return self.router.up

    def ping(self) -> bool:
        """True when the server (every cluster primary) answers (a probe that ignores the backoff)."""
        return self.router.ping()

    def mark_down(self) -> None:
        """Start in the down state (backing off) without a log line: the caller said why."""
        self.router.mark_down()

    def check_connection(self) -> str | None:
        """None when the server answers PING, else one line naming remote_url (masked) and why
        ("unreachable" in it when the server may come back)."""
        return self.router.check_connection()

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Presence of each key, in one pipelined round trip (a cluster: one pipeline per primary,
        all sent before any reply is read); False for keys whose server is down, slow (past
        `timeout` for all replies) or refuses, or whose slot has no owner."""
        rkeys = [self.keys.server_key(k) for k in keys]
        if not rkeys:
            return []
        out = [False] * len(rkeys)
        groups: dict[str, tuple[Node, list[int]]] = {}
        for i, node in enumerate(self.router.owners(rkeys)):
            if node is not None:
                groups.setdefault(node.name, (node, []))[1].append(i)
        sent: list[tuple[Node, list[int], Connection]] = []
        for node, idx in groups.values():
            if not self.router.may_try(node):
                continue
            pool = node.fast.connection_pool
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command(conn.pack_commands([("EXISTS", rkeys[i]) for i in idx]), check_health=False)
                sent.append((node, idx, conn))
            except Exception as e:
                if not self.router.is_outage(e):
                    raise
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                self.router.went_down(e, node=node)
        deadline = time.monotonic() + self.timeout  # all replies of all nodes: one deadline
        for node, idx, c in sent:
            try:
                got = read_replies(connection_socket(c), len(idx), deadline)
            except (OSError, ReplyTooLarge) as e:  # timeouts and closed connections are OSErrors
                c.disconnect()  # a half-read pipeline must never be reused
                self.router.went_down(e, node=node)
                continue
            finally:
                node.fast.connection_pool.release(c)
            self.router.went_up(node)
            for i, v in zip(idx, got, strict=True):
                if isinstance(v, ServerError):  # NOAUTH, NOPERM, MOVED ...: a miss, warned once
                    self.router.redirected(v)
                    self.warn_once("lookup", "lmcache_triton remote tier: lookup refused by %s: %s", self.masked, v)
                out[i] = v == 1
        with self._lock:
            self._stats["lookups"] += 1
            self._stats["lookup_keys"] += len(rkeys)
        return out

    # ------------------------------------------------------------------ reads

    def open_read(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[ChunkReader | None]:
        """See `RemoteReads.open_read`."""
        return self._reads.open_read(key, expect)

    def fetch(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> tuple[torch.dtype, tuple[int, ...], dict[str, str], memoryview] | None:
        """See `RemoteReads.fetch`."""
        return self._reads.fetch(key, expect)

    def get_into(
        self, key: str, out: torch.Tensor | None = None, expect: Mapping[str, str] | None = None
    ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """See `RemoteReads.get_into`."""
        return self._reads.get_into(key, out, expect)

    def get_with_meta(
        self, key: str, expect: Mapping[str, str] | None = None
    ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """`get_into` a new tensor."""
        return self._reads.get_into(key, None, expect)

    # ------------------------------------------------------------------ writes

    def check_put(self, key: str, dtype: torch.dtype, meta: Mapping[str, str] | None) -> None:
        """ValueError for what `put` would refuse (bad key, reserved meta, unknown dtype)."""
        self.keys.server_key(key)
        check_meta(dtype, None if meta is None else dict(meta))

    def put(
        self,
        key: str,
        tensor: torch.Tensor,
        meta: Mapping[str, str] | None = None,
        on_done: OnDone | None = None,
    ) -> bool:
        """Queue a write; returns at once. `on_done(ok)` is called once: from the writer thread,
        or from this call when the write is not queued (queue full, closed, no writer, down).

        Raises:
            ValueError: a bad key, reserved/non-string meta, a dtype with no safetensors code
                (`on_done` is not called).
        """
        return self._put(key, tensor, meta, on_done, None)

    def put_encoded(
        self, key: str, buf: torch.Tensor, encoding: Encoding, meta: Mapping[str, str], on_done: OnDone | None = None
    ) -> bool:
        """`EncodedWriter`: queue a chunk already encoded (`buf`: its parts), SET as it is; only
        where this tier writes `key` with that codec (else dropped, `on_done(False)`)."""
        if self.codecs.for_key(key).name != encoding.codec:  # never under another codec
            return self._dropped(on_done)
        return self._put(key, buf, meta, on_done, encoding)

    def _put(
        self, key: str, tensor: torch.Tensor, meta: Mapping[str, str] | None, on_done: OnDone | None,
        encoding: Encoding | None,
    ) -> bool:
        self.check_put(key, tensor.dtype if encoding is None else getattr(torch, encoding.dtype), meta)
        if self._writer is not None and not self._closed:
            owner = self.router.known_owner(self.keys.server_key(key))
            if self.router.may_try(owner) and self._writer.submit(key, tensor, dict(meta or {}), on_done, encoding):
                return True
        return self._dropped(on_done)

    def write(
        self, key: str, tensor: torch.Tensor, meta: Mapping[str, str] | None = None, encoding: Encoding | None = None
    ) -> bool:
        """Seal and SET one chunk now (the writer thread's step); False on any failure (counted).
        `encoding`: `tensor` holds the chunk's encoded parts, written as they are."""
        header, payload = encode_chunk(
            key, tensor, None if meta is None else dict(meta), self.auth, self.codecs.for_key(key), encoding
        )
        rows = tensor.numel() * tensor.element_size()
        if encoding is not None:
            rows = math.prod(encoding.shape) * getattr(torch, encoding.dtype).itemsize
        rkey = self.keys.server_key(key).encode()
        size = len(header) + len(payload)
        resp = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, size)
        node = self.router.owners([rkey.decode()])[0]
        if node is None:  # a cluster without a slot map or an owner for this slot
            self.count("write_errors")
            return False

        def run() -> bytes | int | None:
            pool = node.bulk.connection_pool
            conn = pool.get_connection()
            try:
                # Header and the tensor's own memory go out as they are: no joined copy.
                conn.send_packed_command([resp + header, payload, b"\r\n"], check_health=False)
                return read_reply(connection_socket(conn), time.monotonic() + self.data_timeout)
            except BaseException:
                conn.disconnect()  # a half-written command must never be reused
                raise
            finally:
                pool.release(conn)

        try:
            reply = self.router.call(run, None, node)
        except (self._redis.ResponseError, ServerError) as e:  # OOM under maxmemory, READONLY, NOPERM, MOVED
            self.router.redirected(e)
            self.count("refused")
            self.count("write_errors")
            kind = str(e).split(" ", 1)[0] or "refused"
            self.warn_once(
                f"refused-{kind}",
                "lmcache_triton remote tier: %s refused a write (%s); such writes are skipped and "
                "counted, serving continues (warned once)",
                self.masked, e,
            )  # fmt: skip
            return False
        if reply is None:
            self.count("write_errors")
            return False
        with self._lock:
            self._stats["writes"] += 1
            self._stats["bytes_written"] += size
            self._stats["raw_bytes_written"] += len(header) + rows
            self._stats["encoded_writes"] += size < len(header) + rows
        return True

    def _write_queued(
        self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], encoding: Encoding | None = None
    ) -> bool:
        """The writer thread's step: skipped (a counted store error) while the server backs off."""
        if not self.router.may_try(self.router.known_owner(self.keys.server_key(key))):
            self.count("write_errors")
            return False
        ok = self.write(key, tensor, meta, encoding)
        if ok:
            self.changed("+", key)
        return ok

    def _write_raised(self, key: str, e: Exception) -> None:
        self.count("write_errors")
        self.warn_once("write-bug", "lmcache_triton remote tier: write of %s failed: %r", key[:24], e)

    # ------------------------------------------------------------------ maintenance

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False on timeout."""
        return True if self._writer is None else self._writer.flush(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued writes (up to `timeout`), stop the writer, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close(timeout)
        self.router.close()

    def scan_keys(self, count: int = 1000) -> list[str]:
        """See `RemoteAdmin.scan_keys`."""
        return self.admin.scan_keys(count)

    def entries(self) -> list[dict[str, Any]]:
        """See `RemoteAdmin.entries`."""
        return self.admin.entries()

    def clear(self) -> int:
        """See `RemoteAdmin.clear`."""
        return self.admin.clear()

    def server_info(self) -> dict[str, Any]:
        """See `RemoteAdmin.server_info`."""
        return self.admin.server_info()

    def describe(self) -> str:
        """The server's URL with the password masked, for the start-up line (and the codec
        when it is not exact)."""
        names = self.codecs.names()
        return self.masked if names == [EXACT] else f"{self.masked}, codec {'/'.join(names)}"

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
        out["errors"] = self.router.errors
        out["reconnects"] = self.router.reconnects
        out["up"] = int(self.up)
        out["pending"] = 0 if self._writer is None else self._writer.qsize()
        return out
