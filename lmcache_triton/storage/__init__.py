"""Storage tiers: a pooled CPU LRU (`cpu.CpuTier`), safetensors files (`disk.DiskTier`), and the
`manager.StorageManager` that puts the CPU tier in front of the disk tier."""

from .cpu import CpuTier
from .disk import DiskTier
from .manager import StorageManager

__all__ = ["CpuTier", "DiskTier", "StorageManager"]
