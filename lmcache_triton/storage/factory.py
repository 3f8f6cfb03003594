"""Build the tiers a configuration asks for."""

from __future__ import annotations

from lmcache_triton.config import LMCacheConfig
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.disk import DiskTier
from lmcache_triton.storage.manager import StorageManager


def build_storage(config: LMCacheConfig, *, track_cpu_removals: bool = False) -> StorageManager:
    """A `StorageManager` with a disk tier when `local_disk` is set with a non-zero
    `max_local_disk_size`, and a CPU tier of `max_local_cpu_size` when `local_cpu` is on or a
    disk tier exists: with `local_cpu: false` it only stages chunks (writes on their way to
    disk, verified prefetches on their way to a load), so pending writes are bounded and a
    chunk is promised only once it is in memory."""
    disk = None
    if config.local_disk and config.max_local_disk_bytes > 0:
        disk = DiskTier(config.local_disk, config.max_local_disk_bytes)
    cpu = None
    if (config.local_cpu or disk is not None) and config.max_local_cpu_bytes > 0:
        cpu = CpuTier(config.max_local_cpu_bytes)
        if track_cpu_removals:
            cpu.track_removals()
    return StorageManager(cpu, disk, keep_in_cpu=config.local_cpu)
