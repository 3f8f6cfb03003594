"""Remote tier: chunks on a Valkey or Redis server shared by many vLLM instances and machines.

Primitives:
  `contains_many(keys)`      presence of many chunks in ONE pipelined round trip (EXISTS each),
                             bounded by the short lookup timeout (`remote_timeout`).
  `fetch(key, expect)`       GET + verify (the disk tier's chunk format: header, checksum or MAC,
                             `expect`ed header fields): `(dtype, shape, meta, payload view)` or
                             None. `get_into(key, out, expect)` copies the verified payload into
                             `out`; `get_with_meta(key, expect)` returns a fresh tensor.
  `put(key, tensor, meta, on_done)`  queue a write and return at once (bounded queue); the
                             writer thread seals the chunk and SETs it.
  `flush`, `close`, `keys()`, `entries()`, `clear()` (our prefix only), `stats`.

Client: redis-py with hiredis (measured against valkey-glide, bench/RESULTS.md "Remote tier"):
redis-py's own SET of a 16 MiB value runs at ~0.6 GB/s on loopback because it packs the command
into one bytes object; this tier writes the RESP header, then the chunk header and the tensor's
own memory (no intermediate copy) with `send_packed_command`, which measured ~2.2 GB/s (glide
~1.3 GB/s). GETs of chunks receive the value with one blocking `recv_into(MSG_WAITALL)` on
plain TCP/unix sockets (`_get_direct`: the GIL is released once per value, not per socket read;
inside vLLM a 6 MB prefetch went from 10-35 ms to 4-11 ms); TLS uses redis-py's reader.

Invariants:
  * Keys are `KEY_PREFIX` + the chunk key, which is lower-case hex (namespace digest + chunk
    digest: model, world size, rank, KV dtype, chunk size and page layout are in the namespace).
    Nothing from user input reaches a key; any other key string raises ValueError.
  * Values are byte-identical to the disk tier's files (`disk.encode_chunk`): safetensors with
    a checksum (xxh3_64) or, with `chunk_secret`, a keyed BLAKE3 MAC over header and payload.
    A value is used only once verified; a damaged one is a miss, counted and deleted; one signed
    with another (or no) secret is a miss left in place (another fleet may own it).
  * Never an exception into the caller for anything the server or network does: server down,
    slow (socket timeouts bound every call), restarted empty or evicting (a key gone between
    lookup and fetch) are misses; a write the server refuses (OOM under maxmemory, READONLY
    replica, no permission) is counted in `stats["refused"]` and `write_errors`, warned once.
  * Connection state: after a connection error or timeout the tier is *down*: calls are
    immediate misses until a backoff (0.5 s doubling to 30 s) expires, then one call probes.
    One log line per state change (down / up again), the URL always with its password masked.
  * Writes: a bounded queue (`max_pending` chunks); a full queue drops the write (counted in
    `dropped`). The writer keeps a reference to the queued tensor until written: the caller must
    not mutate it (the manager hands over a held CPU-tier buffer, released by `on_done`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import torch

from .disk import (
    ChunkAuth,
    ChunkError,
    ChunkHeader,
    ChunkUnverifiable,
    TierCounters,
    check_expect,
    check_meta,
    encode_chunk,
    header_length,
    parse_header,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "lmct:"
SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_KEY_RE = re.compile(r"^[0-9a-f]{8,256}$")
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
_READ_SIZE = 1 << 20  # socket reads for large GETs (see module docstring)
_SHOWN_META = ("model", "layout", "num_tokens", "kv_dtype")  # what `entries` reports of a header
_MAX_VALUE = 1 << 31  # a value above 2 GiB is no chunk of ours


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


class RemoteURLError(ValueError):
    """`remote_url` cannot be used; the message carries the URL with its password masked."""


def mask_url(url: str) -> str:
    """`url` with its password (in the netloc or a `password=` query parameter) replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        # user:password@ keeps the user; a lone userinfo may be a password typed without the
        # colon: masked too.
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        q = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if k.lower() == 'password' else v}" for k, v in q)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_url(url: str) -> str:
    """The URL redis-py takes (valkey[s]:// mapped to redis[s]://); RemoteURLError when it is
    not one of `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS) or
    `unix:///path/to/socket[?db=N]`."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RemoteURLError(f"{mask_url(url)}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RemoteURLError(
            f"{mask_url(url)}: expected redis://[user:password@]host:port[/db], rediss://... (TLS) or "
            "unix:///path/to/socket"
        )
    if scheme == "unix":
        if not parts.path:
            raise RemoteURLError(f"{mask_url(url)}: a unix:// URL names the socket path (unix:///path/to/socket)")
    else:
        if not parts.hostname:
            raise RemoteURLError(f"{mask_url(url)}: no host")
        if port == 0:
            raise RemoteURLError(f"{mask_url(url)}: port 0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise RemoteURLError(f"{mask_url(url)}: the path is the database number, got {db!r}")
    if scheme.startswith("valkey"):
        url = "redis" + url[len("valkey") :]
    return url


def _remote_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"remote tier: key must be lower-case hex, got {str(key)[:80]!r}")
    return KEY_PREFIX + key


class RemoteTier(TierCounters):
    """Chunks on a Valkey/Redis server (see module docstring).

    Args:
        url: `remote_url` (checked by `check_url`).
        timeout: seconds bounding a presence lookup (connect and read); default 0.5.
        data_timeout: seconds bounding one GET/SET of a chunk; default 10.
        secret: `chunk_secret` (None: xxh3 checksums, no authentication).
        max_pending: chunks queued for writing at most; default 64.
        writer: start the background writer (False for a scheduler that only looks up).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        data_timeout: float = 10.0,
        secret: bytes | str | None = None,
        max_pending: int = 64,
        writer: bool = True,
    ) -> None:
        import redis  # imported here: the CLI and tiers import without the client installed
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.url = check_url(url)
        self.masked = mask_url(url)
        self.timeout = timeout
        self.auth = ChunkAuth(secret)

        def client(t: float):
            # No retries inside redis-py: one bounded attempt per call; this tier backs off itself.
            return redis.Redis.from_url(
                self.url,
                socket_timeout=t,
                socket_connect_timeout=min(t, timeout * 4),
                socket_read_size=_READ_SIZE,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
            )

        try:
            self._fast = client(timeout)  # lookups (the scheduler's critical path)
            self._bulk = client(max(data_timeout, timeout))  # chunk GET/SET (background threads)
        except (ValueError, TypeError) as e:  # redis-py's own URL checks (bad db, options)
            raise RemoteURLError(f"{self.masked}: {str(e).replace(url, self.masked)}") from None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            (
                "lookups", "lookup_keys", "hits", "misses", "corrupt", "unauthenticated", "mismatch", "writes",
                "bytes_written", "bytes_read", "write_errors", "refused", "dropped", "errors", "reconnects",
            ),
            0,
        )
        self._up = True
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._warned: set[str] = set()
        self._closed = False
        self._changes: list[tuple[str, str]] | None = None  # ("+" | "-", key), see track_changes
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if writer:
            self._q = queue.Queue(maxsize=max(1, max_pending))
            self._thread = threading.Thread(target=self._writer, name="lmcache-triton-remote-writer", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:  # never the password
        return f"RemoteTier({self.masked})"

    # ------------------------------------------------------------------ connection state

    def _may_try(self) -> bool:
        with self._lock:
            return self._up or time.monotonic() >= self._retry_at

    def _went_down(self, e: BaseException, log: bool = True) -> None:
        with self._lock:
            self._stats["errors"] += 1
            was_up = self._up
            if not was_up:
                self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            self._up = False
            self._retry_at = time.monotonic() + self._backoff
        if was_up and log:
            what = "authentication failed" if isinstance(e, self._redis.AuthenticationError) else "unreachable"
            logger.warning(
                "lmcache_triton remote tier: remote_url %s %s (%s): remote lookups are misses, "
                "retrying with backoff",
                self.masked, what, str(e).replace(self.url, self.masked)[:200],
            )

    def _went_up(self) -> None:
        with self._lock:
            if self._up:
                return
            self._up = True
            self._backoff = _BACKOFF_MIN_S
            self._stats["reconnects"] += 1
        logger.warning("lmcache_triton remote tier: remote_url %s reachable again", self.masked)

    @property
    def up(self) -> bool:
        with self._lock:
            return self._up

    def _call(self, fn: Callable[[], Any], default: Any) -> Any:
        """`fn()` unless the tier is backing off; connection errors and timeouts mark it down
        and give `default`."""
        if not self._may_try():
            return default
        r = self._redis
        try:
            out = fn()
        except (r.ConnectionError, r.TimeoutError, OSError) as e:
            self._went_down(e)
            return default
        self._went_up()
        return out

    def ping(self) -> bool:
        """True when the server answers (a probe that ignores the backoff)."""
        with self._lock:
            self._retry_at = 0.0
        return bool(self._call(self._fast.ping, False))

    def mark_down(self) -> None:
        """Start in the down state (backing off) without a log line: the caller said why."""
        self._went_down(OSError("down"), log=False)

    def check_connection(self) -> str | None:
        """None when the server answers PING, else one line naming remote_url (masked) and why
        ("unreachable" in it when the server may come back)."""
        r = self._redis
        try:
            self._fast.ping()
            return None
        except r.AuthenticationError as e:
            why = f"authentication failed ({e})"
        except r.ResponseError as e:  # NOAUTH, WRONGPASS, NOPERM ...
            why = f"the server refused: {e}"
        except (r.ConnectionError, r.TimeoutError, OSError) as e:
            why = f"unreachable ({e})"
        return f"remote_url {self.masked}: {why.replace(self.url, self.masked)[:300]}"

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[str]) -> list[bool]:
        """Presence of each key, in one pipelined round trip; all False when the server is down,
        slow (past `timeout`) or refuses."""
        rkeys = [_remote_key(k) for k in keys]
        if not rkeys:
            return []

        def run() -> list[bool]:
            pipe = self._fast.pipeline(transaction=False)
            for k in rkeys:
                pipe.exists(k)
            return [bool(v) for v in pipe.execute(raise_on_error=False)]

        try:
            got = self._call(run, None)
        except self._redis.RedisError as e:  # NOAUTH, NOPERM...: a miss, warned once
            self._warn_once("lookup", "lmcache_triton remote tier: lookup refused by %s: %s", self.masked, e)
            got = None
        with self._lock:
            self._stats["lookups"] += 1
            self._stats["lookup_keys"] += len(rkeys)
        if got is None or len(got) != len(rkeys):
            return [False] * len(rkeys)
        return got

    # ------------------------------------------------------------------ reads

    def _get_direct(self, rkey: str) -> bytes | bytearray | None:
        """GET with the value received by ONE blocking `recv_into(MSG_WAITALL)` (the GIL is
        released for the whole value; redis-py's reader takes it back per socket read, and vLLM's
        engine loop, spinning while a request waits for its prefetch, holds it ~5 ms each time:
        a 6 MB GET took 10-30 ms that way). The kernel bounds the wait (SO_RCVTIMEO). Plain TCP
        and unix sockets only; TLS goes through redis-py's reader."""
        pool = self._bulk.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_command("GET", rkey), check_health=False)
            sock = conn._sock
            if sock is None or not isinstance(sock, socket.socket) or type(sock) is not socket.socket:
                return conn.read_response()  # TLS (SSLSocket) or an unknown transport
            # The reply's first bytes in one receive (a byte-at-a-time header read cost one GIL
            # hand-off per byte), then the rest of the value in one blocking receive.
            head = bytearray()
            while b"\r\n" not in head:  # "$<n>\r\n", "$-1\r\n" / "_\r\n" (null), "-ERR ...\r\n"
                more = sock.recv(1 << 16)
                if not more:
                    raise self._redis.ConnectionError("connection closed by the server")
                head += more
                if len(head) > 1 << 17:
                    raise self._redis.ConnectionError("unexpected reply")
            end = head.index(b"\r\n") + 2
            line, rest = bytes(head[:end]), head[end:]
            if line == b"_\r\n" or line == b"$-1\r\n":  # null (RESP3 / RESP2): no such key
                return None
            if line[:1] == b"-":
                raise self._redis.ResponseError(line[1:-2].decode(errors="replace"))
            if line[:1] != b"$":
                raise self._redis.ConnectionError(f"unexpected reply {line[:40]!r}")
            n = int(line[1:-2])
            if n < 0 or n > _MAX_VALUE or len(rest) > n + 2:
                raise self._redis.ConnectionError("unexpected reply length")
            buf = bytearray(n + 2)
            buf[: len(rest)] = rest
            got0 = len(rest)
            timeout = sock.gettimeout()
            sock.settimeout(None)  # blocking: MSG_WAITALL waits for it all, the kernel bounds it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout or 10.0))
            try:
                view, got = memoryview(buf), got0
                while got < n + 2:
                    k = sock.recv_into(view[got:], n + 2 - got, socket.MSG_WAITALL)
                    if k == 0:
                        raise self._redis.ConnectionError("connection closed by the server")
                    got += k
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise self._redis.TimeoutError("timeout reading a value") from None
            finally:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
                sock.settimeout(timeout)
            return memoryview(buf)[:n]
        except BaseException:
            conn.disconnect()  # a half-read reply must never be reused
            raise
        finally:
            pool.release(conn)

    def _get_raw(self, key: str) -> bytes | memoryview | None:
        rkey = _remote_key(key)
        try:
            data = self._call(lambda: self._get_direct(rkey), None)
        except self._redis.RedisError as e:
            self._warn_once("get", "lmcache_triton remote tier: GET refused by %s: %s", self.masked, e)
            data = None
        if not isinstance(data, (bytes, memoryview)) or len(data) > _MAX_VALUE:
            self._count("misses")
            return None
        self._count("bytes_read", len(data))
        return data

    def _verify(
        self, key: str, data: bytes | memoryview, expect: dict[str, str] | None
    ) -> tuple[ChunkHeader, memoryview] | None:
        """The checked header and payload view of a value, or None (a miss, counted)."""
        mv = memoryview(data)
        try:
            hlen = header_length(bytes(mv[:8]), len(mv))
            hdr = parse_header(bytes(mv[8 : 8 + hlen]), key, len(mv), self.auth)
            payload = mv[8 + hlen :]
            h = self.auth.start(hdr.meta)
            h.update(payload)
            if self.auth.seal(h) != hdr.meta["checksum"]:
                raise ChunkError("checksum mismatch" if not self.auth.signed else "MAC mismatch")
        except ChunkUnverifiable as e:
            self._count("unauthenticated")
            self._count("misses")
            self._warn_once("unauth", "lmcache_triton remote tier: chunk %s not used: %s (warned once)", key[:24], e)
            return None
        except ChunkError as e:
            self._count("corrupt")
            self._count("misses")
            self._warn_once("corrupt", "lmcache_triton remote tier: chunk %s rejected: %s (warned once)", key[:24], e)
            with contextlib.suppress(Exception):  # ours by prefix and damaged: remove it
                self._call(lambda: self._bulk.delete(_remote_key(key)), None)
            self._changed("-", key)
            return None
        try:  # sound and ours, for another configuration (e.g. format_version): a miss, kept
            check_expect(hdr.meta, expect or {})
        except ChunkError as e:
            self._count("mismatch")
            self._count("misses")
            self._warn_once("mismatch", "lmcache_triton remote tier: chunk %s not used: %s (warned once)", key[:24], e)
            return None
        return hdr, payload

    def fetch(
        self, key: str, expect: dict[str, str] | None = None
    ) -> tuple[torch.dtype, tuple[int, ...], dict[str, str], memoryview] | None:
        """GET and verify a chunk: `(dtype, shape, meta, payload)` or None (a miss)."""
        data = self._get_raw(key)
        if data is None:
            return None
        got = self._verify(key, data, expect)
        if got is None:
            return None
        hdr, payload = got
        self._count("hits")
        return hdr.dtype, tuple(hdr.shape), dict(hdr.meta), payload

    def get_into(
        self, key: str, out: torch.Tensor | None = None, expect: dict[str, str] | None = None
    ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """The verified chunk copied into `out` (or a new tensor) with its header metadata;
        None on a miss or when `out` has another dtype/shape (the value is kept)."""
        got = self.fetch(key, expect)
        if got is None:
            return None
        dtype, shape, meta, payload = got
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            return None
        copy_payload(payload, out)
        return out, meta

    def get_with_meta(self, key: str, expect: dict[str, str] | None = None):
        return self.get_into(key, None, expect)

    # ------------------------------------------------------------------ writes

    def check_put(self, key: str, dtype: torch.dtype, meta: dict[str, str] | None) -> None:
        """ValueError for what `put` would refuse (bad key, reserved meta, unknown dtype)."""
        _remote_key(key)
        check_meta(dtype, meta)

    def put(
        self,
        key: str,
        tensor: torch.Tensor,
        meta: dict[str, str] | None = None,
        on_done: Callable[[bool], None] | None = None,
    ) -> bool:
        """Queue a write; returns at once. `on_done(ok)` is called once: from the writer thread,
        or from this call when the write is not queued (queue full, closed, no writer, down).

        Raises:
            ValueError: a bad key, reserved/non-string meta, a dtype with no safetensors code
                (`on_done` is not called).
        """
        self.check_put(key, tensor.dtype, meta)
        ok = False
        if self._q is not None and not self._closed and self._may_try():
            try:
                self._q.put_nowait((key, tensor, dict(meta or {}), on_done))
                return True
            except queue.Full:
                pass
        self._count("dropped")
        if on_done is not None:
            on_done(ok)
        return False

    def write(self, key: str, tensor: torch.Tensor, meta: dict[str, str] | None = None) -> bool:
        """Seal and SET one chunk now (the writer thread's step); False on any failure (counted)."""
        header, payload = encode_chunk(key, tensor, meta, self.auth)
        rkey = _remote_key(key).encode()
        size = len(header) + len(payload)
        resp = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, size)
        r = self._redis

        def run() -> Any:
            pool = self._bulk.connection_pool
            conn = pool.get_connection()
            try:
                # Header and the tensor's own memory go out as they are: no joined copy.
                conn.send_packed_command([resp + header, payload, b"\r\n"], check_health=False)
                return conn.read_response()
            except BaseException:
                conn.disconnect()  # a half-written command must never be reused
                raise
            finally:
                pool.release(conn)

        try:
            reply = self._call(run, None)
        except r.ResponseError as e:  # OOM under maxmemory, READONLY replica, NOPERM ...
            self._count("refused")
            self._count("write_errors")
            kind = str(e).split(" ", 1)[0] or "refused"
            self._warn_once(
                f"refused-{kind}",
                "lmcache_triton remote tier: %s refused a write (%s); such writes are skipped and "
                "counted, serving continues (warned once)",
                self.masked, e,
            )
            return False
        if reply is None:
            self._count("write_errors")
            return False
        with self._lock:
            self._stats["writes"] += 1
            self._stats["bytes_written"] += size
        return True

    def _writer(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                key, tensor, meta, on_done = item
                ok = False
                try:
                    if self._may_try():
                        ok = self.write(key, tensor, meta)
                        if ok:
                            self._changed("+", key)
                    else:  # backing off: skipped, a counted store error
                        self._count("write_errors")
                except Exception as e:  # never kill the writer thread
                    self._count("write_errors")
                    self._warn_once("write-bug", "lmcache_triton remote tier: write of %s failed: %r", key[:24], e)
                if on_done is not None:
                    try:
                        on_done(ok)
                    except Exception:
                        logger.exception("remote tier on_done callback failed")
            finally:
                self._q.task_done()

    # ------------------------------------------------------------------ change tracking

    def track_changes(self) -> None:
        """From now on record the keys this process wrote (`("+", key)`) and deleted as damaged
        (`("-", key)`), for `take_changes` (vLLM's KV events for routers). The server's own
        evictions are not seen."""
        with self._lock:
            if self._changes is None:
                self._changes = []

    def take_changes(self) -> list[tuple[str, str]]:
        """The changes recorded since the last call (empty unless `track_changes()`)."""
        with self._lock:
            if not self._changes:
                return []
            out, self._changes = self._changes, []
            return out

    def _changed(self, op: str, key: str) -> None:
        with self._lock:
            if self._changes is not None:
                self._changes.append((op, key))

    # ------------------------------------------------------------------ maintenance

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False on timeout."""
        if self._q is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._q.all_tasks_done
        with cond:
            while self._q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cond.wait(left)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued writes (up to `timeout`), stop the writer, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._q is not None:
            self._q.put(None)
            self._thread.join(timeout)
        for c in (self._fast, self._bulk):
            with contextlib.suppress(Exception):
                c.close()

    def scan_keys(self, count: int = 1000) -> list[str]:
        """Chunk keys (without the prefix) under our prefix; SCAN, never KEYS. Raises the
        client's error when the server cannot be reached (the CLI reports it)."""
        out = []
        for k in self._bulk.scan_iter(match=KEY_PREFIX + "*", count=count):
            s = k.decode() if isinstance(k, bytes) else str(k)
            tail = s[len(KEY_PREFIX) :]
            if _KEY_RE.match(tail):
                out.append(tail)
        return out

    def entries(self) -> list[dict[str, Any]]:
        """One record per chunk under our prefix: key, bytes and `meta` (the header's model, layout,
        num_tokens, kv_dtype), or `error` and `file` (the server key) for a value not ours
        (the header only: GETRANGE of the first 4 KiB, pipelined 256 keys a round trip, never
        the payload). Raises the client's error when the server cannot be reached."""
        keys = self.scan_keys()
        out = []
        for i in range(0, len(keys), 256):
            batch = keys[i : i + 256]
            pipe = self._bulk.pipeline(transaction=False)
            for key in batch:
                pipe.strlen(_remote_key(key))
                pipe.getrange(_remote_key(key), 0, 4095)
            got = pipe.execute(raise_on_error=False)
            for j, key in enumerate(batch):
                size, head = got[2 * j], got[2 * j + 1]
                rec: dict[str, Any] = {"key": key, "bytes": size if isinstance(size, int) else 0}
                try:
                    if not isinstance(head, bytes):
                        raise ChunkError("gone")
                    hlen = header_length(head[:8], rec["bytes"])
                    if 8 + hlen > len(head):
                        raise ChunkError("header larger than 4 KiB")
                    hdr = parse_header(head[8 : 8 + hlen], key, rec["bytes"], _AnyAuth())
                    rec["meta"] = {k: v for k, v in hdr.meta.items() if k in _SHOWN_META}
                    rec["signed"] = hdr.meta["checksum"].startswith("blake3-mac:")
                except (ChunkError, ChunkUnverifiable, TypeError, ValueError) as e:
                    rec["error"] = str(e)[:120]
                    rec["file"] = KEY_PREFIX + key
                out.append(rec)
        return out

    def server_info(self) -> dict[str, Any]:
        """The server's own memory and eviction figures (INFO memory/stats/server)."""
        info: dict[str, Any] = {}
        for section in ("server", "memory", "stats"):
            info.update(self._bulk.info(section))
        keep = (
            "redis_version", "valkey_version", "server_name", "used_memory", "maxmemory", "maxmemory_policy",
            "evicted_keys", "keyspace_hits", "keyspace_misses",
        )
        return {k: info[k] for k in keep if k in info}

    def clear(self) -> int:
        """Delete every key under our prefix (and nothing else); the number deleted."""
        n = 0
        batch: list[str] = []
        for key in self.scan_keys():
            batch.append(_remote_key(key))
            if len(batch) >= 500:
                n += int(self._bulk.unlink(*batch))
                batch = []
        if batch:
            n += int(self._bulk.unlink(*batch))
        return n

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["up"] = int(self._up)
        out["pending"] = 0 if self._q is None else self._q.qsize()
        return out


class _AnyAuth(ChunkAuth):
    """Reads any seal's header (inspection only: nothing is verified or used)."""

    def check_scheme(self, md: dict[str, str]) -> None:
        return


def copy_payload(payload: memoryview, out: torch.Tensor) -> None:
    """Copy a verified payload into a contiguous tensor of the same byte size."""
    n = math.prod(out.shape) * out.element_size()
    if len(payload) != n:
        raise ValueError(f"payload of {len(payload)} bytes for a tensor of {n}")
    if n:
        memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")[:] = payload
