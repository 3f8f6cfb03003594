"""The remote tier's maintenance (the CLI's `stats --remote`, `clear --remote`): list, inspect and
remove the chunks of one key space on every server that answers, and the servers' own figures.

Only our key space (`KeySpace`: this `chunk_secret`'s) is touched: SCAN with its prefix, never
KEYS; nothing else on the server is read or removed. Values are inspected by their header only
(GETRANGE of the first 4 KiB), never the payload. A cluster's primary that does not answer is
skipped with one warning line (`Router.reachable`).
"""

from __future__ import annotations

import json
from typing import Any

from lmcache_triton.chunk.format import ANY_SEAL, ChunkError, ChunkUnverifiable, header_length, parse_header

from .cluster import Node, Router
from .keys import KEY_RE, KeySpace

_SHOWN_META = ("model", "layout", "num_tokens", "kv_dtype")  # what `entries` reports of a header


class RemoteAdmin:
    """Maintenance over one key space.

    Args:
        router: the servers (`Router`).
        keys: the key space to work on.
    """

    def __init__(self, router: Router, keys: KeySpace) -> None:
        self.router = router
        self.keys = keys

    def scan(self, node: Node, count: int) -> list[str]:
        out = []
        for k in node.bulk.scan_iter(match=self.keys.prefix + "*", count=count):
            s = k.decode() if isinstance(k, bytes) else str(k)
            if self.keys.owns(s):
                out.append(s)
        return out

    def scan_keys(self, count: int = 1000) -> list[str]:
        """The names in our key space (this `chunk_secret`'s, see `KeySpace`) on every cluster
        primary, without the space's prefix: the chunk keys without a secret, their keyed
        digests with one. SCAN, never KEYS. Raises the client's error when the server cannot be
        reached (the CLI reports it)."""
        cut = len(self.keys.prefix)
        return [k[cut:] for n in self.router.reachable() for k in self.scan(n, count)]

    def entries(self) -> list[dict[str, Any]]:
        """One record per chunk in our key space: key, bytes and `meta` (the header's model, layout,
        num_tokens, kv_dtype), or `error` and `file` (the server key) for a value not ours
        (the header only: GETRANGE of the first 4 KiB, pipelined 256 keys a round trip per
        server, never the payload). Raises the client's error when the server cannot be reached."""
        out = []
        for node in self.router.reachable():
            keys = self.scan(node, 1000)
            for i in range(0, len(keys), 256):
                batch = keys[i : i + 256]
                pipe = node.bulk.pipeline(transaction=False)
                for skey in batch:
                    pipe.strlen(skey)
                    pipe.getrange(skey, 0, 4095)
                got = pipe.execute(raise_on_error=False)
                for j, key in enumerate(batch):
                    out.append(self.entry(key, got[2 * j], got[2 * j + 1]))
        return out

    def entry(self, skey: str, size: object, head: object) -> dict[str, Any]:
        key = skey[len(self.keys.prefix) :]  # the chunk key in the unsigned space
        rec: dict[str, Any] = {"key": key, "bytes": size if isinstance(size, int) else 0}
        try:
            if not isinstance(head, bytes):
                raise ChunkError("gone")
            hlen = header_length(head[:8], rec["bytes"])
            if 8 + hlen > len(head):
                raise ChunkError("header larger than 4 KiB")
            if self.keys.keyed:  # the server key is a digest: the chunk names its key, checked here
                named = (json.loads(head[8 : 8 + hlen]).get("__metadata__") or {}).get("key")
                if not isinstance(named, str) or not KEY_RE.match(named) or self.keys.server_key(named) != skey:
                    raise ChunkError("the chunk's key does not match its server key")
                rec["key"] = key = named
            hdr = parse_header(head[8 : 8 + hlen], key, rec["bytes"], ANY_SEAL)
            rec["meta"] = {k: v for k, v in hdr.meta.items() if k in _SHOWN_META}
            rec["signed"] = hdr.meta["checksum"].startswith("blake3-mac:")
        except (ChunkError, ChunkUnverifiable, TypeError, ValueError) as e:
            rec["error"] = str(e)[:120]
            rec["file"] = skey
        return rec

    def server_info(self) -> dict[str, Any]:
        """The server's own memory and eviction figures (INFO memory/stats/server); a cluster:
        summed over the primaries that answer (`nodes`: how many)."""
        keep = (
            "redis_version", "valkey_version", "server_name", "used_memory", "maxmemory", "maxmemory_policy",
            "evicted_keys", "keyspace_hits", "keyspace_misses",
        )
        summed = ("used_memory", "maxmemory", "evicted_keys", "keyspace_hits", "keyspace_misses")
        out: dict[str, Any] = {}
        nodes = self.router.reachable()
        for node in nodes:
            info: dict[str, Any] = {}
            for section in ("server", "memory", "stats"):
                info.update(node.bulk.info(section))
            for k in keep:
                if k not in info:
                    continue
                if k in summed and k in out and isinstance(info[k], int):
                    out[k] += info[k]
                else:
                    out.setdefault(k, info[k])
        if self.router.cluster:
            out["nodes"] = len(nodes)
        return out

    def clear(self) -> int:
        """Delete every key under our prefix (and nothing else) on every server that answers;
        the number deleted. One UNLINK per key, pipelined 500 a round trip (a cluster refuses
        multi-key commands across slots)."""
        n = 0
        for node in self.router.reachable():
            keys = self.scan(node, 1000)
            for i in range(0, len(keys), 500):
                pipe = node.bulk.pipeline(transaction=False)
                for skey in keys[i : i + 500]:
                    pipe.unlink(skey)
                n += sum(int(v) for v in pipe.execute(raise_on_error=False) if isinstance(v, int))
        return n
