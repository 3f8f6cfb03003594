"""The remote tier's URLs: checking, masking the password, a cluster's nodes.

A leaf module (standard library only) so that `config` checks `remote_url` without importing the
storage package (`storage.builder` imports `config`: the import runs downward only).
"""

from __future__ import annotations

import urllib.parse

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster", "valkey+cluster", "valkeys+cluster")
SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", *CLUSTER_SCHEMES)


class RemoteURLError(ValueError):
    """`remote_url` cannot be used; the message carries the URL with its password masked."""


def mask_url(url: str) -> str:
    """`url` with its password (in the netloc or a `password=` query parameter) replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        # user:password@ keeps the user; a lone userinfo may be a password typed without the
        # colon: masked too.
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        q = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if k.lower() == 'password' else v}" for k, v in q)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes `(host, port)` of a `redis+cluster://[user:password@]host[:port][,host[:port]...]`
    URL (port 6379 when left out); RemoteURLError when one is malformed."""
    netloc = urllib.parse.urlsplit(url).netloc
    hosts = netloc.rsplit("@", 1)[-1]
    out = []
    for h in hosts.split(","):
        try:
            p = urllib.parse.urlsplit("//" + h.strip())
            port = p.port
        except ValueError as e:
            raise RemoteURLError(f"{mask_url(url)}: node {h!r}: {e}") from None
        if not p.hostname:
            raise RemoteURLError(f"{mask_url(url)}: a node without a host ({h!r})")
        if port == 0:
            raise RemoteURLError(f"{mask_url(url)}: node {h!r}: port 0")
        out.append((p.hostname, port or 6379))
    return out


def node_url(url: str, host: str, port: int) -> str:
    """The plain `redis[s]://` URL of one node of a cluster URL: same user, password and query
    (TLS options), database 0."""
    parts = urllib.parse.urlsplit(url)
    scheme = "rediss" if parts.scheme.lower().split("+")[0] in ("rediss", "valkeys") else "redis"
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    h = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((scheme, f"{userinfo}{h}:{port}", "", parts.query, ""))


def check_url(url: str) -> str:
    """The URL redis-py takes (valkey[s]:// mapped to redis[s]://); RemoteURLError when it is
    not one of `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS),
    `unix:///path/to/socket[?db=N]`, or a cluster's `redis+cluster://[user:password@]host:port[,host:port...]`
    (`rediss+cluster://` with TLS; database 0 only)."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port if scheme not in CLUSTER_SCHEMES else None
    except ValueError as e:
        raise RemoteURLError(f"{mask_url(url)}: {e}") from None
    if scheme not in SCHEMES:
        raise RemoteURLError(
            f"{mask_url(url)}: expected redis://[user:password@]host:port[/db], rediss://... (TLS), "
            "unix:///path/to/socket or redis+cluster://host:port[,host:port...]"
        )
    if scheme == "unix":
        if not parts.path:
            raise RemoteURLError(f"{mask_url(url)}: a unix:// URL names the socket path (unix:///path/to/socket)")
    elif scheme in CLUSTER_SCHEMES:
        cluster_nodes(url)
        db = parts.path.strip("/")
        if db not in ("", "0"):
            raise RemoteURLError(f"{mask_url(url)}: a cluster has database 0 only, got {db!r}")
    else:
        if not parts.hostname:
            raise RemoteURLError(f"{mask_url(url)}: no host")
        if port == 0:
            raise RemoteURLError(f"{mask_url(url)}: port 0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise RemoteURLError(f"{mask_url(url)}: the path is the database number, got {db!r}")
    if scheme.startswith("valkey"):
        url = "redis" + url[len("valkey") :]
    return url
