"""The replies the remote tier reads itself (RESP2/RESP3 on a redis-py connection's socket),
each with ONE overall deadline and a bound on what it may claim.

Primitives:
  `ReplyReader(sock, deadline, max_bulk)`  a context manager reading replies off a socket:
                            `bulk()` a whole bulk string, `bulk_length()`/`read_exact(view)`/
                            `end_bulk()` one streamed into a caller's buffer, `reply()` a simple
                            string, integer, bulk string or null, `done()` nothing left over.
  `read_value`, `read_reply`, `read_replies`  one GET value, one reply, n pipelined replies.
  `connection_socket(conn)` the socket of a connected redis-py connection, to read them off.

Invariants (issue 21):
  * A reply is complete by its deadline or the read raises TimeoutError: each receive waits at
    most the time left (a per-receive timeout alone let a server trickling a byte per receive
    hold a GET for 45 s and more).
  * A bulk string claiming more than `max_bulk` bytes raises ReplyTooLarge before a byte of it
    is read; a value's memory follows the bytes that arrived (`ReplyReader.bulk`), never the
    server's word.
  * Malformed replies, a closed connection or bytes after the last reply raise ConnectionError;
    the caller then drops the connection (a half-read reply is never reused). The server's own
    error reply is ServerError, the rest of the stream intact.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from redis.connection import AbstractConnection

MAX_LINE = 1 << 16  # a RESP header line longer than this is no reply of ours
EAGER_BYTES = 8 << 20  # a value's buffer starts at this (or its size), then doubles as it arrives


def connection_socket(conn: AbstractConnection) -> socket.socket:
    """The socket of a connected redis-py connection (plain TCP, unix, or TLS).

    Raises:
        ConnectionError: the connection has no socket (not connected, or another transport).
    """
    sock = getattr(conn, "_sock", None)  # redis-py keeps it private; no public accessor exists
    if not isinstance(sock, socket.socket):
        raise ConnectionError("remote tier: not connected over a socket")
    return sock


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


class ServerError(Exception):
    """The server's error reply (`-ERR ...`, `-MOVED ...`): the text without the dash."""


class ReplyTooLarge(Exception):
    """A reply claims more bytes than any chunk this tier could have stored (`max_value_bytes`)."""


class ReplyReader:
    """Reads RESP replies off one socket, every receive bounded by ONE overall deadline.

    A per-receive timeout does not bound a reply: a server trickling a byte per receive keeps
    it going forever (issue 21: a GET still read 45 s later). Each receive here waits at most
    the time left until `deadline`; then TimeoutError. A bulk reply longer than `max_bulk` is
    ReplyTooLarge before a byte of it is read, and a value is held in memory as it arrives
    (`bulk`), never allocated by the server's word.

    Plain TCP/unix sockets are read blocking with SO_RCVTIMEO and MSG_WAITALL (the GIL is
    released once per value, not per socket read); TLS sockets with the socket timeout.
    Use as a context manager: the socket's timeout settings are restored on exit.

    Args:
        sock: the connection's socket (after the command was sent).
        deadline: `time.monotonic()` value by which the replies must be complete.
        max_bulk: bytes a bulk string may claim at most.
    """

    def __init__(self, sock: socket.socket, deadline: float, max_bulk: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.max_bulk = max_bulk
        self.pending = bytearray()  # received, not yet consumed
        self.plain = type(sock) is socket.socket
        self._timeout = sock.gettimeout()

    def __enter__(self) -> ReplyReader:
        if self.plain:
            self.sock.settimeout(None)  # blocking: SO_RCVTIMEO bounds each receive
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            if self.plain:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
            self.sock.settimeout(self._timeout)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("reply not complete within the deadline")
        return max(left, 0.001)  # SO_RCVTIMEO 0 would mean "forever"

    def _recv_into(self, view: memoryview, wait_all: bool = True) -> int:
        """One receive into `view`: all of it on a plain socket with `wait_all` unless the time
        runs out, else whatever has arrived (header lines: never wait for 64 KiB)."""
        left = self._left()
        try:
            if self.plain:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
                k = self.sock.recv_into(view, len(view), socket.MSG_WAITALL if wait_all else 0)
            else:
                self.sock.settimeout(left)
                k = self.sock.recv_into(view, len(view))
        except (TimeoutError, BlockingIOError):  # the socket timeout / SO_RCVTIMEO expired
            raise TimeoutError("reply not complete within the deadline") from None
        if k == 0:
            raise ConnectionError("connection closed by the server")
        return k

    def _line(self) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while (i := self.pending.find(b"\r\n")) < 0:
            if len(self.pending) > MAX_LINE:
                raise ConnectionError("unexpected reply (no line end)")
            more = bytearray(1 << 16)
            k = self._recv_into(memoryview(more), wait_all=False)
            self.pending += more[:k]
        line = bytes(self.pending[:i])
        del self.pending[: i + 2]
        return line

    def read_exact(self, view: memoryview) -> None:
        """Fill `view` with the next `len(view)` bytes of the stream."""
        got = min(len(self.pending), len(view))
        if got:
            view[:got] = self.pending[:got]
            del self.pending[:got]
        while got < len(view):
            got += self._recv_into(view[got:])

    def bulk_length(self) -> int | None:
        """The length of the bulk string that follows (None: a null reply); ServerError for an
        error reply, ReplyTooLarge past `max_bulk`, ConnectionError for anything else."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if line in (b"_", b"$-1"):  # null (RESP3 / RESP2): no such key
            return None
        if kind == b"-":
            raise ServerError(rest.decode(errors="replace"))
        if kind != b"$" or not rest.isdigit():
            raise ConnectionError(f"unexpected reply {line[:40]!r}")
        n = int(rest)
        if n > self.max_bulk:
            raise ReplyTooLarge(f"a reply of {n} bytes (at most {self.max_bulk} expected)")
        return n

    def end_bulk(self) -> None:
        crlf = bytearray(2)
        self.read_exact(memoryview(crlf))
        if crlf != b"\r\n":
            raise ConnectionError("unexpected reply (bulk string not terminated)")

    def bulk(self) -> memoryview | None:
        """A whole bulk reply (None: null), in memory that follows the bytes received: the first
        `EAGER_BYTES` (or the whole value when smaller) first; room for the rest only once those
        arrived. Buffers are `numpy.empty`, never zero-filled: their pages become resident as
        the kernel writes received bytes into them, so a server announcing a large value and
        sending little costs little (a zero-filled `bytearray(n)` cost n at once; it was also
        the slower path: 16 MiB took 22 ms of memset and page faults on a loaded 2-core VM)."""
        n = self.bulk_length()
        if n is None:
            return None
        first = min(n, max(EAGER_BYTES, len(self.pending)))
        buf = np.empty(first, np.uint8)
        self.read_exact(buf.data)
        if first < n:  # the server sent EAGER_BYTES of it: room for the rest (n <= max_bulk)
            whole = np.empty(n, np.uint8)
            whole[:first] = buf
            del buf
            self.read_exact(whole.data[first:])
            buf = whole
        self.end_bulk()
        return buf.data

    def reply(self) -> bytes | int | None:
        """One non-array reply: a simple string, an integer, a bulk string or null."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b":":
            try:
                return int(rest)
            except ValueError:
                raise ConnectionError(f"unexpected reply {line[:40]!r}") from None
        if kind == b"-":
            raise ServerError(rest.decode(errors="replace"))
        if kind in (b"$", b"_"):
            self.pending[:0] = line + b"\r\n"
            got = self.bulk()
            return None if got is None else bytes(got)
        raise ConnectionError(f"unexpected reply {line[:40]!r}")

    def done(self) -> None:
        """ConnectionError when the server sent more than the replies read (never reuse it)."""
        if self.pending:
            raise ConnectionError("unexpected bytes after the reply")


def read_value(sock: socket.socket, deadline: float, max_bulk: int) -> memoryview | None:
    """The one bulk reply of a GET (None: no such key)."""
    with ReplyReader(sock, deadline, max_bulk) as rd:
        value = rd.bulk()
        rd.done()
    return value


def read_reply(sock: socket.socket, deadline: float) -> bytes | int | None:
    """One short reply (`+OK`, an integer, null); ServerError for an error reply."""
    with ReplyReader(sock, deadline, MAX_LINE) as rd:
        got = rd.reply()
        rd.done()
    return got


def read_replies(sock: socket.socket, n: int, deadline: float) -> list[bytes | int | None | ServerError]:
    """`n` pipelined short replies, an error reply in its place as a ServerError."""
    out: list[bytes | int | None | ServerError] = []
    with ReplyReader(sock, deadline, MAX_LINE) as rd:
        for _ in range(n):
            try:
                out.append(rd.reply())
            except ServerError as e:
                out.append(e)
        rd.done()
    return out
