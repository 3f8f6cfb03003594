"""Where each key of the remote tier goes, and whether that server is up.

`Router` holds one `Node` per server: the server itself, or every primary of a cluster. A node
has its own pair of plain redis-py clients (`fast`: lookups, bounded by `timeout`; `bulk`: chunk
GET/SET, bounded by `data_timeout`) and its own connection state, so a dead cluster node costs
misses for its keys only.

Cluster (`redis+cluster://[user:password@]host:port[,host:port...]`, `rediss+cluster://` with TLS):
redis-py's `RedisCluster` holds the slot map (CLUSTER SLOTS from the first seed that answers,
made at first use, refreshed at most once a second after a MOVED/ASK/CLUSTERDOWN reply or a node
failure; its own retries are off). `owners(keys)` maps each server key to the primary owning its
slot (None: no slot map yet, or a slot without an owner); `primaries()`/`reachable()` list the
servers maintenance walks.

Connection state (per node): after a connection error or timeout the node is *down*: `call`s are
immediate misses (`may_try` is False) until a backoff (0.5 s doubling to 30 s) expires, then one
call probes. One log line per state change (down / up again), the URL always with its password
masked (`scrub`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .protocol import ServerError
from .url import RemoteURLError, cluster_nodes, is_cluster, mask_url, node_url

if TYPE_CHECKING:
    import redis
    from redis.cluster import RedisCluster

logger = logging.getLogger("lmcache_triton.storage.remote")

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
_REFRESH_MIN_S = 1.0  # cluster: at most one topology refresh (CLUSTER SLOTS) a second
_READ_SIZE = 1 << 20  # redis-py's socket reads (TLS, maintenance)
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")  # URL query options
REDIRECTS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")  # error replies that move a slot

T = TypeVar("T")


class Node:
    """One server (the whole tier, or one cluster primary): its two clients and its connection
    state (up, or backing off until `retry_at`). The cluster's topology is a node without
    clients (`fast`/`bulk` None): its state is that of the slot map."""

    def __init__(self, name: str, fast: redis.Redis | None, bulk: redis.Redis | None) -> None:
        self.name = name
        self._fast = fast  # lookups: the short timeout
        self._bulk = bulk  # chunk GET/SET: the data timeout
        self.up = True
        self.retry_at = 0.0
        self.backoff = _BACKOFF_MIN_S

    @property
    def fast(self) -> redis.Redis:
        assert self._fast is not None, "the topology node has no client"
        return self._fast

    @property
    def bulk(self) -> redis.Redis:
        assert self._bulk is not None, "the topology node has no client"
        return self._bulk

    def close(self) -> None:
        for c in (self._fast, self._bulk):
            if c is not None:
                with contextlib.suppress(Exception):  # closing: nothing to report
                    c.close()


class Router:
    """The servers of one `remote_url` and their connection state (see module docstring).

    Args:
        url: the checked URL (`url.check_url`).
        timeout: seconds bounding a lookup, a connect and a topology refresh.
        data_timeout: seconds bounding a chunk GET/SET on the `bulk` clients.

    Raises:
        RemoteURLError: redis-py refuses the URL (database, options, a TLS file that is missing).
    """

    def __init__(self, url: str, timeout: float, data_timeout: float) -> None:
        import redis  # imported here: the CLI and tiers import without the client installed
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self._no_retry = lambda: Retry(NoBackoff(), 0)
        self.url = url
        self.masked = mask_url(url)
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.cluster = is_cluster(url)
        self.errors = 0  # connection errors and timeouts
        self.reconnects = 0  # down -> up
        self._lock = threading.Lock()
        self._seeds: list[tuple[str, int]] = []
        self._cl: RedisCluster | None = None
        self._nodes: dict[str, Node] = {}
        try:
            if self.cluster:
                # The slot map is made at first use: a cluster that is down at start-up is no
                # exception. Every primary gets its own pair of clients (`node_of`).
                self._seeds = cluster_nodes(url)
                self._topo = Node("cluster", None, None)
                self._stale_at = 0.0  # last topology refresh
                self._stale = False
                self._topo_lock = threading.Lock()
                self.client(node_url(url, *self._seeds[0]), timeout)  # redis-py's URL checks now
            else:
                self._topo = Node(
                    "",
                    self.client(url, timeout),  # lookups (the scheduler's critical path)
                    self.client(url, data_timeout),  # chunk GET/SET (background threads)
                )
                self._nodes = {"": self._topo}
        except (ValueError, TypeError, redis.RedisError) as e:  # redis-py's own URL checks (db, options)
            raise RemoteURLError(f"remote_url {self.masked}: {self.scrub(e)}") from None

    def client(self, url: str, t: float) -> redis.Redis:
        """A plain client of one server bounded by `t` seconds a call; no retries inside
        redis-py (one bounded attempt per call: the router backs off itself)."""
        c = self._redis.Redis.from_url(
            url,
            socket_timeout=t,
            socket_connect_timeout=min(t, self.timeout * 4),
            socket_read_size=_READ_SIZE,
            retry=self._no_retry(),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        pool = c.connection_pool
        # redis-py hands unknown query parameters (a typo: `ssl_ca_cert`) to the connection's
        # constructor at the first command: a TypeError there would reach the caller. Build one
        # now (no connect) so it is a RemoteURLError at start-up.
        pool.connection_class(**pool.connection_kwargs)
        for opt in _TLS_FILES:
            path = pool.connection_kwargs.get(opt)
            if path is not None and not os.path.exists(path):
                raise ValueError(f"{opt}: no such file {path!r}")
        return c

    def scrub(self, e: BaseException) -> str:
        """An error's text with any URL of ours masked."""
        text = str(e).replace(self.url, self.masked)
        for h, p in self._seeds:
            u = node_url(self.url, h, p)
            text = text.replace(u, mask_url(u))
        return text

    # ------------------------------------------------------------------ connection state

    @property
    def single(self) -> Node | None:
        """The one server of a non-cluster URL (None for a cluster)."""
        return None if self.cluster else self._topo

    def nodes(self) -> list[Node]:
        """Every server known so far (a cluster: the primaries met since start)."""
        with self._lock:
            return list(self._nodes.values())

    def may_try(self, node: Node | None = None) -> bool:
        """False while `node` (default: the server, or a cluster's topology) backs off."""
        node = node or self._topo
        with self._lock:
            return node.up or time.monotonic() >= node.retry_at

    def went_down(self, e: BaseException, log: bool = True, node: Node | None = None) -> None:
        node = node or self._topo
        with self._lock:
            self.errors += 1
            was_up = node.up
            if not was_up:
                node.backoff = min(node.backoff * 2, _BACKOFF_MAX_S)
            node.up = False
            node.retry_at = time.monotonic() + node.backoff
            if self.cluster:
                self._stale = True  # a failover may have moved its slots: refresh the map soon
        if was_up and log:
            what = "authentication failed" if isinstance(e, self._redis.AuthenticationError) else "unreachable"
            where = f" node {node.name}" if self.cluster else ""
            logger.warning(
                "lmcache_triton remote tier: remote_url %s%s %s (%s): %s lookups are misses, "
                "retrying with backoff",
                self.masked, where, what, self.scrub(e)[:200], "its keys'" if self.cluster else "remote",
            )

    def went_up(self, node: Node | None = None) -> None:
        node = node or self._topo
        with self._lock:
            if node.up:
                return
            node.up = True
            node.backoff = _BACKOFF_MIN_S
            self.reconnects += 1
        where = f" node {node.name}" if self.cluster else ""
        logger.warning("lmcache_triton remote tier: remote_url %s%s reachable again", self.masked, where)

    @property
    def up(self) -> bool:
        """True when every server (every known cluster primary) is reachable."""
        with self._lock:
            return self._topo.up and all(n.up for n in self._nodes.values())

    def is_outage(self, e: BaseException) -> bool:
        """True for an error that marks a node down (connection, timeout, cluster failure)."""
        r = self._redis
        return isinstance(e, (r.ConnectionError, r.TimeoutError, OSError, r.exceptions.RedisClusterException))

    def call(self, fn: Callable[[], T], default: T, node: Node | None = None) -> T:
        """`fn()` unless `node` (default: the server, or a cluster's topology) is backing off;
        connection errors and timeouts mark it down and give `default`."""
        if not self.may_try(node):
            return default
        try:
            out = fn()
        except Exception as e:
            if not self.is_outage(e):
                raise
            self.went_down(e, node=node)
            return default
        self.went_up(node)
        return out

    def mark_down(self) -> None:
        """Start in the down state (backing off) without a log line: the caller said why."""
        self.went_down(OSError("down"), log=False)

    # ------------------------------------------------------------------ cluster routing

    def topology(self) -> RedisCluster | None:
        """The RedisCluster holding the slot map (made at first use, refreshed after a
        redirection or a node failure, at most once a second); None while no seed answers."""
        if self._cl is not None and not (self._stale and time.monotonic() - self._stale_at >= _REFRESH_MIN_S):
            return self._cl

        def make() -> RedisCluster:
            from redis.cluster import ClusterNode, RedisCluster

            if self._cl is None:
                h, p = self._seeds[0]
                return RedisCluster(
                    url=node_url(self.url, h, p),
                    startup_nodes=[ClusterNode(h2, p2) for h2, p2 in self._seeds[1:]],
                    retry=self._no_retry(),  # its own retries and reinitialisations: none
                    require_full_coverage=False,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    health_check_interval=0,
                )
            self._stale = False
            self._cl.nodes_manager.initialize()
            return self._cl

        if not self._topo_lock.acquire(blocking=False):  # another thread asks: never wait for it
            return self._cl
        try:
            self._stale_at = time.monotonic()
            cl = self.call(make, None, self._topo)
            if cl is not None:
                self._cl = cl
            return self._cl
        finally:
            self._topo_lock.release()

    def node_of(self, name: str, host: str, port: int) -> Node:
        with self._lock:
            node = self._nodes.get(name)
        if node is None:
            u = node_url(self.url, host, port)
            node = Node(name, self.client(u, self.timeout), self.client(u, self.data_timeout))
            with self._lock:
                node = self._nodes.setdefault(name, node)
        return node

    def owners(self, rkeys: list[str]) -> list[Node | None]:
        """The node serving each key: the server itself, or the primary owning the key's slot in
        a cluster (None: no slot map yet, or a slot without an owner)."""
        if not self.cluster:
            return [self._topo] * len(rkeys)
        cl = self.topology()
        if cl is None:
            return [None] * len(rkeys)
        from redis.crc import key_slot
        from redis.exceptions import SlotNotCoveredError

        out: list[Node | None] = []
        nm = cl.nodes_manager
        for k in rkeys:
            try:
                cn = nm.get_node_from_slot(key_slot(k.encode()))
                out.append(self.node_of(cn.name, cn.host, cn.port))
            except SlotNotCoveredError:
                out.append(None)
        return out

    def known_owner(self, rkey: str) -> Node | None:
        """The node a write of `rkey` goes to when known without a round trip (None: ask
        `owners`, i.e. the topology's state decides)."""
        if not self.cluster:
            return self._topo
        cl = self._cl
        if cl is None:
            return None
        from redis.crc import key_slot

        try:
            cn = cl.nodes_manager.get_node_from_slot(key_slot(rkey.encode()))
        except Exception:  # no owner: the topology's state decides
            return None
        with self._lock:
            return self._nodes.get(cn.name)

    def primaries(self) -> list[Node]:
        """Every server holding our keys (a cluster's primaries); ConnectionError when a cluster's
        slot map cannot be had."""
        if not self.cluster:
            return [self._topo]
        with self._lock:
            self._topo.retry_at = 0.0  # maintenance (CLI): ask now, whatever the backoff
        cl = self.topology()
        if cl is None:
            raise self._redis.ConnectionError(f"remote_url {self.masked}: no cluster node answers")
        return [self.node_of(n.name, n.host, n.port) for n in cl.get_primaries()]

    def redirected(self, e: BaseException) -> None:
        """A MOVED/ASK/CLUSTERDOWN reply: refresh the slot map soon."""
        x = self._redis.exceptions
        # redis-py strips the reply's first word ("MOVED 7798 h:p" is MovedError("7798 h:p"));
        # our own reader (ServerError) keeps it.
        moved = isinstance(e, ServerError) and str(e).split(" ", 1)[0] in REDIRECTS
        if self.cluster and (moved or isinstance(e, (x.AskError, x.ClusterDownError, x.TryAgainError))):
            with self._lock:
                self._stale = True

    def ping(self) -> bool:
        """True when the server (every cluster primary) answers (a probe that ignores the backoff)."""
        with self._lock:
            for n in (self._topo, *self._nodes.values()):
                n.retry_at = 0.0
        try:
            nodes = self.primaries()
        except self._redis.ConnectionError:
            return False
        return all(bool(self.call(n.fast.ping, False, n)) for n in nodes)

    def check_connection(self) -> str | None:
        """None when the server answers PING (a cluster: its slot map can be had and every
        primary answers), else one line naming remote_url (masked) and why ("unreachable" in it
        when the server may come back)."""
        r = self._redis
        try:
            if self.cluster:
                # Each seed first: wrong credentials say so (RedisCluster only says "cannot connect").
                seeds = [self.client(node_url(self.url, h, p), self.timeout) for h, p in self._seeds]
                errors: list[BaseException] = []
                for c in seeds:
                    try:
                        c.ping()
                        break
                    except (r.ConnectionError, r.TimeoutError, OSError) as e:
                        if isinstance(e, r.AuthenticationError):
                            raise
                        errors.append(e)
                    finally:
                        c.close()
                else:
                    raise r.ConnectionError(f"no cluster node answers ({errors[-1]})")
                for n in self.primaries():
                    try:
                        n.fast.ping()
                    except (r.ConnectionError, r.TimeoutError, OSError) as e:
                        if isinstance(e, r.AuthenticationError):
                            raise
                        self.went_down(e, node=n)  # its keys miss; the others serve
            else:
                self._topo.fast.ping()
            return None
        except r.AuthenticationError as e:
            why = f"authentication failed ({e})"
        except r.ResponseError as e:  # NOAUTH, WRONGPASS, NOPERM ...
            why = f"the server refused: {e}"
        except (r.ConnectionError, r.TimeoutError, OSError) as e:
            why = f"unreachable ({e})"
        return f"remote_url {self.masked}: {self.scrub(Exception(why))[:300]}"

    def reachable(self) -> list[Node]:
        """The servers to work on for maintenance (scan, entries, clear, info): the server, or
        every cluster primary that answers PING (one that does not is skipped with one warning
        line: its keys cannot be listed or removed now). Raises the client's error when none
        can be reached (the CLI reports it)."""
        nodes = self.primaries()
        if not self.cluster:
            return nodes
        r = self._redis
        ok, last = [], None
        for n in nodes:
            try:
                n.bulk.ping()
                ok.append(n)
            except (r.ConnectionError, r.TimeoutError, OSError) as e:
                last = e
                logger.warning(
                    "lmcache_triton remote tier: remote_url %s node %s skipped (%s)",
                    self.masked, n.name, self.scrub(e),
                )
        if not ok:
            raise last or r.ConnectionError(f"remote_url {self.masked}: no cluster node answers")
        return ok

    def close(self) -> None:
        """Close every client (the cluster's slot map included)."""
        for n in self.nodes():
            n.close()
        if self._cl is not None:
            with contextlib.suppress(Exception):  # closing: nothing to report
                self._cl.close()
