"""A real vLLM OpenAI server in a child process group, for end-to-end tests and scripts.

`served(cmd, ...)` starts it, waits for /health, yields its base URL, and stops it the way a
user's Ctrl-C does (SIGINT: vLLM's clean shutdown, engine core included), then makes sure no
process of the group is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` in a /metrics text whose label set contains `labels`."""
    total = 0.0
    for ln in text.splitlines():
        if ln.startswith(name) and ln[len(name) : len(name) + 1] in ("{", " ") and labels in ln:
            total += float(ln.rsplit(" ", 1)[1])
    return total


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def served(
    cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> Iterator[str]:
    """Run `cmd` (a server listening on 127.0.0.1:`port`), logging to `log_path`; yield its URL."""
    from lmcache_triton.testing.runner import note_engine_start

    note_engine_start("server", origin="new")  # a new interpreter, started from here
    with open(log_path, "w") as log:  # the server keeps its own copy of the handle
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ), start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + log_path.read_text()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no /health in {timeout:.0f} s:\n" + log_path.read_text()[-4000:])
            try:
                if get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("server left processes behind after shutdown")


def wait_metric(base: str, name: str, labels: str = "", tries: int = 20) -> float:
    """A counter of the server's /metrics, waiting for it to be published (step stats)."""
    value = 0.0
    for _ in range(tries):
        value = metric(get(base + "/metrics")[1], name, labels)
        if value > 0:
            break
        time.sleep(0.5)
    return value


__all__ = ["free_port", "get", "post", "metric", "served", "stop", "wait_metric"]
