"""Run one engine job in a child interpreter and follow its JSON progress lines.

`warm` and `calibrate` start vLLM in a child process (the parent, a CLI, must import without
vLLM; the child's memory and vLLM's globals go away with it). The child reads a JSON job file,
prints one JSON object per line as it goes, and writes its logs to stderr.

  `run_child(module, job, log, on_progress, timeout)`  -> `(exit status, last JSON object)`
  `follow_progress(lines, on_progress)`  the JSON objects among a child's stdout lines
  `log_tail(log, rc)`  the last non-empty line of the child's log, for a one-line error
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def run_child(
    module: str,
    job: dict[str, Any],
    job_path: Path,
    log: Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """Write `job` to `job_path`, run `python -m module job_path` with stderr to `log`, call
    `on_progress` with each JSON object it prints (other lines, a library's prints, are
    skipped), and return its exit status and the last object. `timeout` bounds the whole run,
    also a child that hangs with its stdout open: it is killed and `subprocess.TimeoutExpired`
    propagates. The child is killed if this returns early."""
    job_path.write_text(json.dumps(job))
    expired = threading.Event()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(job_path)],
            stdout=subprocess.PIPE,
            stderr=logf,
            text=True,
            env=dict(os.environ),
        )

        def expire() -> None:  # reading stdout blocks while the child holds it open: kill it
            expired.set()
            proc.kill()

        watchdog = threading.Timer(timeout, expire) if timeout is not None else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            assert proc.stdout is not None
            last = follow_progress(proc.stdout, on_progress)
            rc = proc.wait()
            if expired.is_set():
                raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, last


def follow_progress(lines: Iterable[str], on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Call `on_progress` with each JSON object among a child's stdout `lines` as they come
    (other lines, a library's prints, are skipped); returns the last one ({} when none)."""
    last: dict[str, Any] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            last = rec
            if on_progress is not None:
                on_progress(rec)
    return last


def log_tail(log: Path, rc: int) -> str:
    """The child's last non-empty log line, or its exit status when it logged nothing."""
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return tail[-1] if tail else f"exit status {rc}"
