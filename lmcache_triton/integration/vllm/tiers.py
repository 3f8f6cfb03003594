"""The tiers the integration knows by name: "cpu" and the registered slow tiers.

Per-tier code in the connector (prefetch waits, KV events, counters, the hit line) loops over
this list; a tier registered with the storage builder (`storage.builder.TIERS`, one line)
appears here with no edit in the integration.

Primitives:
  `SlowTierInfo`, `slow_tiers()`  name, medium and locality of every slow tier the storage
                                  builder can build (fastest first).
  `tier_names()`                  "cpu" and then `slow_tiers()`' names.
  `tier_media()`                  tier name -> (vLLM KV-event medium, locality), "cpu" included.
"""

from __future__ import annotations

from typing import NamedTuple

CPU_TIER = "cpu"


class SlowTierInfo(NamedTuple):
    """What the integration needs to know of a slow tier without building it (the `SlowTier`
    protocol's `name`, `medium` and `locality`, storage/tier.py)."""

    name: str
    medium: str  # vLLM's KV-event medium: "CPU" | "STORAGE"
    locality: str  # "LOCAL" | "REMOTE"
    doc: str  # what a hit from it means, for /metrics


def slow_tiers() -> tuple[SlowTierInfo, ...]:
    """Every slow tier registered with the storage builder (`storage.builder.TIERS`), fastest
    first."""
    from lmcache_triton.storage.builder import TIERS

    return tuple(
        SlowTierInfo(name, e.medium, e.locality, e.doc or f"the {name} tier") for name, e in TIERS.items()
    )


def tier_names() -> list[str]:
    """"cpu" and then every registered slow tier, fastest first."""
    return [CPU_TIER, *(t.name for t in slow_tiers())]


def tier_media() -> dict[str, tuple[str, str]]:
    """Tier name -> (medium, locality) in vLLM's KV events (vLLM's strings, as its own offloading
    tiers send them: the CPU tier is "CPU"/"LOCAL")."""
    return {CPU_TIER: ("CPU", "LOCAL"), **{t.name: (t.medium, t.locality) for t in slow_tiers()}}
