"""Storage: the CPU tier (`cpu.CpuTier`) in front of an ordered list of slow tiers (`tier.SlowTier`:
`disk.DiskTier`, `remote.RemoteTier`, ...) in `hierarchy.StorageHierarchy`, built from the config
by `builder`. See docs/architecture.md.

Names are imported lazily so that the torch-free modules (`disk_admin`, `safe_file`) import
without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cpu import CpuTier
    from .disk import DiskTier
    from .hierarchy import StorageHierarchy

__all__ = ["CpuTier", "DiskTier", "StorageHierarchy"]

_WHERE = {"CpuTier": ".cpu", "DiskTier": ".disk", "StorageHierarchy": ".hierarchy"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
