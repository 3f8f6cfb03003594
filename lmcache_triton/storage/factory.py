"""Build the tiers a configuration asks for."""

from __future__ import annotations

import logging

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.disk import DiskTier, DiskTierError
from lmcache_triton.storage.manager import StorageManager

logger = logging.getLogger(__name__)


def build_storage(config: LMCacheConfig, *, track_cpu_removals: bool = False) -> StorageManager:
    """A `StorageManager` with a disk tier when `local_disk` is set with a non-zero
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
    cpu = None
    if (config.local_cpu or disk is not None) and config.max_local_cpu_bytes > 0:
        cpu = CpuTier(config.max_local_cpu_bytes)
        if track_cpu_removals:
            cpu.track_removals()
    return StorageManager(cpu, disk, keep_in_cpu=config.local_cpu)
