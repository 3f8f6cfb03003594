"""Turn a configuration into tiers: the worker's `StorageHierarchy` and the scheduler's
presence-only views, through one registry of slow tiers.

Primitives:
  `TIERS`                     name -> `TierEntry(build, view)`, fastest tier first. A new tier is
                              one file with its `SlowTier` and one line here (or, in a test,
                              `monkeypatch.setitem(TIERS, name, TierEntry(...))`).
  `build_storage(config, replica=False, track_cpu_removals=False)`  the worker's hierarchy.
  `build_views(config)`       the scheduler's `TierView`s (what `PrefixIndex` asks).
  `build_disk(config)`, `build_remote(config, writer=True)`  the two shipped tiers.
  `requested_codecs(config)`  tier name -> the codec the config asks for (`disk_codec`,
                              `remote_codec`); `build_storage(config, codecs=...)` takes the codecs
                              actually used (the quality guard's decision), default the requested.
  `set_codec(storage, tier, codec, namespace=None)`  change a built tier's codec (for one
                              namespace, or its default): False when the tier is absent or does
                              not encode.

Invariants:
  * Imports run downward only: this module imports `config` and the tiers; neither imports it.
  * A tier that cannot run (an unusable directory, no client library, wrong credentials) logs
    one error line naming its config key and is left out; the others keep working.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lmcache_triton.config import LMCacheConfig

from .cpu import CpuTier
from .disk import DiskTier, DiskTierError
from .disk_admin import SUFFIX
from .hierarchy import StorageHierarchy
from .remote import RemoteTier
from .tier import EncodingTier, Locality, Medium, SlowTier

logger = logging.getLogger(__name__)


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class TierView:
    """The scheduler's presence-only view of a slow tier (its workers hold the tier itself).

    Args:
        name: the tier's name (`SlowTier.name`).
        contains_many: batched presence of full chunk keys; worth a prefetch, never a promise.
        miss_ttl: seconds a miss is remembered and not asked again: 0 for a tier whose question
            is a `stat`, a couple of seconds for one whose question is a network round trip.
        close: release what the view holds (a connection); default nothing.
    """

    name: str
    contains_many: Callable[[Sequence[str]], list[bool]]
    miss_ttl: float = 0.0
    close: Callable[[], object] = field(default=_nothing)


@dataclass(frozen=True)
class TierEntry:
    """How to build one kind of slow tier from the config.

    Args:
        build: the worker's tier, or None when the config does not ask for it (or it cannot run).
        view: the scheduler's presence-only view, or None; default: `build`'s tier, viewed.
        medium, locality: the tier's `SlowTier.medium`/`locality`, known without building it
            (the scheduler's KV events and /metrics need them); default local storage.
        doc: what a hit from it is, for /metrics' help text.
    """

    build: Callable[[LMCacheConfig], SlowTier | None]
    view: Callable[[LMCacheConfig], TierView | None] | None = None
    medium: Medium = "STORAGE"
    locality: Locality = "LOCAL"
    doc: str = ""  # what a hit from it is, for /metrics' help text; default "the <name> tier"


# ---------------------------------------------------------------------------------- disk


def build_disk(config: LMCacheConfig) -> DiskTier | None:
    """The disk tier of `local_disk` with a non-zero `max_local_disk_size`, or None. A directory
    the tier cannot use (unwritable, unsafe, not a directory) logs one error line naming
    `local_disk` and what is wrong; the server then runs without the disk tier."""
    if not config.local_disk or config.max_local_disk_bytes <= 0:
        return None
    try:
        return DiskTier(config.local_disk, config.max_local_disk_bytes, secret=config.chunk_secret)
    except DiskTierError as e:
        logger.error("lmcache_triton: disk tier disabled: %s", e)
        return None


def disk_view(directory: str) -> TierView:
    """Presence of chunk files in `directory`: one `stat` per key, so it is right across
    processes and restarts without an index (the scheduler starts no disk tier of its own)."""

    def contains_many(keys: Sequence[str]) -> list[bool]:
        return [os.path.isfile(os.path.join(directory, k + SUFFIX)) for k in keys]

    return TierView(DiskTier.name, contains_many)


def view_disk(config: LMCacheConfig) -> TierView | None:
    if not config.local_disk or config.max_local_disk_bytes <= 0:
        return None
    return disk_view(config.local_disk)


# ---------------------------------------------------------------------------------- remote

REMOTE_MISS_TTL = 2.0  # seconds a remote miss is not asked again (a round trip per lookup)


def build_remote(config: LMCacheConfig, *, writer: bool = True) -> SlowTier | None:
    """The remote tier of `remote_url`, or None. At start-up one PING: wrong credentials (or a
    server that refuses us) log one error line naming remote_url (password masked) and the tier
    is off; an unreachable server logs one line too, and the tier keeps retrying with backoff
    (lookups are misses meanwhile). Data GET/SET are bounded by 20x `remote_timeout`, >= 10 s.

    Args:
        writer: start the writer thread (False for the scheduler's lookups); default True.
    """
    if not config.remote_url:
        return None
    try:
        remote = RemoteTier(
            config.remote_url,
            timeout=config.remote_timeout,
            data_timeout=max(10.0, 20 * config.remote_timeout),
            secret=config.chunk_secret,
            writer=writer,
            # No usable chunk is larger than the CPU tier it is fetched into (issue 21).
            max_value_bytes=min(config.max_local_cpu_bytes, 1 << 31) + (1 << 20),
        )
    except ImportError:
        logger.error("lmcache_triton: remote tier disabled: remote_url needs redis-py (pip install 'redis>=5' hiredis)")
        return None
    problem = remote.check_connection()
    if problem is None:
        logger.info("lmcache_triton: remote tier %s", remote.masked)
        return remote
    if "unreachable" in problem:
        logger.error("lmcache_triton: %s; retrying in the background, remote lookups are misses meanwhile", problem)
        remote.mark_down()
        return remote
    logger.error("lmcache_triton: remote tier disabled: %s", problem)
    remote.close()
    return None


def view_remote(config: LMCacheConfig) -> TierView | None:
    remote = build_remote(config, writer=False)
    if remote is None:
        return None
    return TierView(remote.name, remote.contains_many, REMOTE_MISS_TTL, remote.close)


# ---------------------------------------------------------------------------------- registry

# Fastest first: the hierarchy reads them in this order, and the prefix index names the first
# that has a chunk.
TIERS: dict[str, TierEntry] = {
    "disk": TierEntry(build_disk, view_disk, DiskTier.medium, DiskTier.locality, "the disk tier"),
    "remote": TierEntry(
        build_remote, view_remote, RemoteTier.medium, RemoteTier.locality, "the remote tier (remote_url)"
    ),
}


def requested_codecs(config: LMCacheConfig) -> dict[str, str]:
    """Tier name -> the codec the config asks that tier to write with (`disk_codec`,
    `remote_codec`). What a server uses may be less (the quality guard keeps a model exact
    until a calibration record passes): pass that to `build_storage(codecs=...)`."""
    return {"disk": config.disk_codec, "remote": config.remote_codec}


def set_codec(
    tiers: StorageHierarchy | Sequence[SlowTier], tier: str, codec: str, namespace: str | None = None
) -> bool:
    """Make the built tier called `tier` write with `codec` (for keys of `namespace`, a namespace
    digest, or by default when None). False when there is no such tier or it does not encode.

    Raises:
        ValueError: an unknown codec name (`chunk.codec.get_codec`).
    """
    from lmcache_triton.chunk.codec import get_codec

    get_codec(codec)
    if isinstance(tiers, StorageHierarchy):
        found = tiers.tier(tier)
    else:
        found = next((t for t in tiers if t.name == tier), None)
    if not isinstance(found, EncodingTier):
        return False
    found.codecs.set(codec, namespace)
    return True


def build_tiers(config: LMCacheConfig, codecs: Mapping[str, str] | None = None) -> list[SlowTier]:
    """The slow tiers the config asks for, in `TIERS` order, each writing with its codec from
    `codecs` (tier name -> codec name; default `requested_codecs(config)`; a tier not named
    writes exact)."""
    codecs = requested_codecs(config) if codecs is None else codecs
    out = []
    for name, entry in TIERS.items():
        tier = entry.build(config)
        if tier is not None:
            set_codec([tier], tier.name, codecs.get(name, "exact"))
            out.append(tier)
    return out


def build_views(config: LMCacheConfig) -> list[TierView]:
    """The scheduler's presence-only view of each slow tier the config asks for, in `TIERS`
    order (only when loads are enabled does the caller need them)."""
    out = []
    for entry in TIERS.values():
        if entry.view is not None:
            view = entry.view(config)
        else:
            tier = entry.build(config)
            view = None if tier is None else TierView(tier.name, tier.contains_many, 0.0, tier.close)
        if view is not None:
            out.append(view)
    return out


def build_storage(
    config: LMCacheConfig,
    *,
    replica: bool = False,
    track_cpu_removals: bool = False,
    codecs: Mapping[str, str] | None = None,
) -> StorageHierarchy:
    """The worker's `StorageHierarchy`: the slow tiers of `build_tiers`, and a CPU tier of
    `max_local_cpu_size` when `local_cpu` is on or a slow tier exists: with `local_cpu: false`
    it only stages chunks (writes on their way to the slow tiers, verified prefetches on their
    way to a load), so pending writes are bounded and a chunk is promised only once it is in
    memory.

    Args:
        replica: this rank is a KV replica (another rank holds the same KV under the same key:
            MLA, or more TP ranks than KV heads). It then writes no slow tier -- disk and remote
            alike -- and reads them all; the first replica writes. Default False.
        track_cpu_removals: record the keys leaving the CPU tier (the connector reports them).
        codecs: tier name -> the codec it writes with (the quality guard's decision); default
            `requested_codecs(config)`. The CPU tier's codec is the engine's (`cpu_codec`).
    """
    tiers = build_tiers(config, codecs)
    cpu = None
    if (config.local_cpu or tiers) and config.max_local_cpu_bytes > 0:
        cpu = CpuTier(config.max_local_cpu_bytes, hugepages=config.cpu_hugepages)
        if track_cpu_removals:
            cpu.track_removals()
        if config.cpu_pretouch:  # at the worker's start-up, in the background: never in a step
            gb = config.cpu_pretouch_max_size
            cpu.pretouch(int(gb * (1 << 30)) if gb > 0 else None)
    return StorageHierarchy(cpu, tiers, keep_in_cpu=config.local_cpu, write_slow_tiers=not replica)
