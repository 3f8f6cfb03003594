"""`remote_url`: the URL forms the remote tier takes, their checks, password masking, and a
cluster URL's seed nodes.

The implementation lives in the leaf module `lmcache_triton.remote_url` (standard library only),
so that `config` checks `remote_url` without importing the storage package (whose `__init__`
imports the tiers); this module is the tier's name for it, plus `is_cluster`.

Forms: `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS), `unix:///path[?db=N]`,
`valkey[s]://` (mapped to `redis[s]://`), and a cluster's
`redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS).
A password never appears in a message: every error carries the URL through `mask_url`.
"""

from __future__ import annotations

import urllib.parse

from lmcache_triton.remote_url import (
    CLUSTER_SCHEMES,
    SCHEMES,
    RemoteURLError,
    check_url,
    cluster_nodes,
    mask_url,
    node_url,
)

__all__ = [
    "CLUSTER_SCHEMES",
    "SCHEMES",
    "RemoteURLError",
    "check_url",
    "cluster_nodes",
    "is_cluster",
    "mask_url",
    "node_url",
]


def is_cluster(url: str) -> bool:
    """True for a cluster URL (`redis+cluster://`, `rediss+cluster://`, `valkey[s]+cluster://`)."""
    return urllib.parse.urlsplit(url).scheme.lower() in CLUSTER_SCHEMES
