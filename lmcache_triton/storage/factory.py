"""Build the tiers a configuration asks for."""

from __future__ import annotations

import logging

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.disk import DiskTier, DiskTierError
from lmcache_triton.storage.manager import StorageManager
from lmcache_triton.storage.remote import RemoteTier

logger = logging.getLogger(__name__)


def build_remote(config: LMCacheConfig, *, writer: bool = True) -> RemoteTier | None:
    """The remote tier of `remote_url`, or None. At start-up one PING: wrong credentials (or a
    server that refuses us) log one error line naming remote_url (password masked) and the tier
    is off; an unreachable server logs one line too, and the tier keeps retrying with backoff
    (lookups are misses meanwhile). Data GET/SET are bounded by 20x `remote_timeout`, >= 10 s."""
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


def build_storage(config: LMCacheConfig, *, track_cpu_removals: bool = False) -> StorageManager:
    """A `StorageManager` with a remote tier when `remote_url` is set (`build_remote`), a disk
    tier when `local_disk` is set with a non-zero
    `max_local_disk_size`, and a CPU tier of `max_local_cpu_size` when `local_cpu` is on or a
    disk tier exists: with `local_cpu: false` it only stages chunks (writes on their way to
    disk, verified prefetches on their way to a load), so pending writes are bounded and a
    chunk is promised only once it is in memory.

    A disk directory the tier cannot use (unwritable, unsafe, not a directory) logs one error
    line naming `local_disk` and what is wrong; the server then runs without the disk tier (the
    CPU tier keeps working)."""
    disk = None
    if config.local_disk and config.max_local_disk_bytes > 0:
        try:
            disk = DiskTier(config.local_disk, config.max_local_disk_bytes, secret=config.chunk_secret)
        except DiskTierError as e:
            logger.error("lmcache_triton: disk tier disabled: %s", e)
    remote = build_remote(config)
    cpu = None
    if (config.local_cpu or disk is not None or remote is not None) and config.max_local_cpu_bytes > 0:
        cpu = CpuTier(config.max_local_cpu_bytes)
        if track_cpu_removals:
            cpu.track_removals()
    return StorageManager(cpu, disk, keep_in_cpu=config.local_cpu, remote=remote)
