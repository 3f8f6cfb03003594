"""Transitional: the old `StorageManager(cpu, disk, keep_in_cpu, remote)` constructor, for tests
not yet moved to `StorageHierarchy` (tests/test_remote.py). Delete once they are."""

from __future__ import annotations

from .cpu import CpuTier
from .disk import DiskTier
from .hierarchy import StorageHierarchy
from .remote import RemoteTier
from .tier import SlowTier


def StorageManager(  # noqa: N802 -- the old class name, kept for its callers
    cpu: CpuTier | None, disk: DiskTier | None, keep_in_cpu: bool = True, remote: RemoteTier | None = None
) -> StorageHierarchy:
    from .builder import _as_slow_tier

    tiers: list[SlowTier] = [] if disk is None else [disk]
    if remote is not None:
        tiers.append(_as_slow_tier(remote))
    return StorageHierarchy(cpu, tiers, keep_in_cpu=keep_in_cpu)
