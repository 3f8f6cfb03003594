"""The remote tier: chunks on a Valkey/Redis server or cluster shared by many vLLM instances.

Modules, one job each:
  `url`       `remote_url` forms, checks, password masking, a cluster's seed nodes (imports
              neither redis-py nor torch: config and the CLI use it through this package).
  `keys`      server keys: each `chunk_secret` its own key space.
  `protocol`  the replies the tier reads itself, each with one deadline and a size bound.
  `cluster`   `Router`: the servers of a URL, cluster slot routing, connection state and backoff.
  `read`      `RemoteReads`: a chunk GET, header checked first, verified where it lands.
  `tier`      `RemoteTier`, the `storage.tier.SlowTier` over them (lookups, writes; reads above).
  `admin`     `RemoteAdmin`: scan, entries, clear, server_info (the CLI).

`from lmcache_triton.storage.remote import RemoteTier` works as before; the tier's modules (torch,
redis-py) are imported only when one of their names is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .url import CLUSTER_SCHEMES, SCHEMES, RemoteURLError, check_url, cluster_nodes, is_cluster, mask_url, node_url

if TYPE_CHECKING:
    from .admin import RemoteAdmin
    from .keys import KEY_PREFIX, KeySpace
    from .protocol import ReplyReader, ReplyTooLarge, ServerError
    from .read import RemoteReads, copy_payload
    from .tier import DEFAULT_MAX_VALUE, RemoteTier

_LAZY = {
    "RemoteTier": "tier",
    "DEFAULT_MAX_VALUE": "tier",
    "copy_payload": "read",
    "RemoteReads": "read",
    "RemoteAdmin": "admin",
    "KEY_PREFIX": "keys",
    "KeySpace": "keys",
    "ReplyReader": "protocol",
    "ReplyTooLarge": "protocol",
    "ServerError": "protocol",
}

__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_MAX_VALUE",
    "KEY_PREFIX",
    "SCHEMES",
    "KeySpace",
    "RemoteAdmin",
    "RemoteReads",
    "RemoteTier",
    "RemoteURLError",
    "ReplyReader",
    "ReplyTooLarge",
    "ServerError",
    "check_url",
    "cluster_nodes",
    "copy_payload",
    "is_cluster",
    "mask_url",
    "node_url",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
