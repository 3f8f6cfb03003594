"""lmcache_triton/threads.py: the package's background threads run on the CPUs the worker sets
(vLLM's reserved cores), the running ones included; with none set they keep their creator's."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import pytest
import torch

from lmcache_triton import threads
from lmcache_triton.storage.writer import WriteQueue

ALL = frozenset(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="needs two CPUs to tell a pinned thread from a free one")
ONE = frozenset({max(ALL)})


@pytest.fixture(autouse=True)
def no_background_cpus():
    """Every test starts and ends with nothing pinned (the setting is process-wide)."""
    threads.set_background_cpus(())
    yield
    threads.set_background_cpus(())


def _parked() -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A background thread that waits for `go`, after telling `started`."""
    started, go = threading.Event(), threading.Event()

    def body() -> None:
        started.set()
        go.wait(30)

    t = threads.background_thread(body, "test-parked")
    t.start()
    assert started.wait(30)
    return t, started, go


def test_without_cpus_a_thread_keeps_its_creators_affinity():
    t, _, go = _parked()
    try:
        assert os.sched_getaffinity(t.native_id) == ALL
    finally:
        go.set()
        t.join(30)


def test_a_thread_started_after_the_setting_pins_itself():
    assert threads.set_background_cpus(ONE) == ONE
    t, _, go = _parked()
    try:
        assert os.sched_getaffinity(t.native_id) == ONE
        assert os.sched_getaffinity(0) == ALL  # the creator is not moved
    finally:
        go.set()
        t.join(30)


def test_the_setting_moves_running_background_threads_only():
    t, _, go = _parked()
    other_started, other_go = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: (other_started.set(), other_go.wait(30)))  # not ours
    other.start()
    assert other_started.wait(30)
    try:
        threads.set_background_cpus(ONE)
        assert os.sched_getaffinity(t.native_id) == ONE
        assert os.sched_getaffinity(other.native_id) == ALL
    finally:
        go.set()
        other_go.set()
        t.join(30)
        other.join(30)


def test_a_pool_thread_with_the_initializer_is_pinned():
    threads.set_background_cpus(ONE)
    with concurrent.futures.ThreadPoolExecutor(1, initializer=threads.enter_background) as pool:
        assert pool.submit(lambda: frozenset(os.sched_getaffinity(0))).result(30) == ONE


def test_an_ended_thread_is_forgotten():
    t, _, go = _parked()
    go.set()
    t.join(30)
    assert not t.is_alive()
    threads.set_background_cpus(ONE)  # must not touch the ended thread's id (it may be reused)
    assert t.native_id not in threads._live


def test_the_slow_tiers_writer_runs_on_the_background_cpus():
    """The write queue the disk and remote tiers share, as the package starts it."""
    threads.set_background_cpus(ONE)
    seen: list[frozenset[int]] = []

    def write(key, tensor, meta, enc) -> bool:
        seen.append(frozenset(os.sched_getaffinity(0)))
        return True

    q = WriteQueue(write, name="test-writer", maxsize=2)
    try:
        assert q.submit("k", torch.zeros(4), {}, None)
        assert q.flush(30)
    finally:
        q.close(30)
    assert seen == [ONE]


# Threads the package starts that are not background work: the copy helper pins itself to the
# same CPUs (copy_helper.py), the loader's one-off thread sets torch's thread count.
NOT_BACKGROUND = {"threads.py", "copy_helper.py", "loader.py:torch._C.set_num_threads"}


def test_every_thread_of_the_package_starts_through_background_thread():
    """A new `threading.Thread(` or thread pool in the package would run on the forward's core."""
    import pathlib

    import lmcache_triton

    root = pathlib.Path(lmcache_triton.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "threading.Thread(" not in code and "ThreadPoolExecutor(" not in code:
                continue
            if path.name in NOT_BACKGROUND or any(
                k.startswith(path.name + ":") and k.split(":", 1)[1] in code for k in NOT_BACKGROUND
            ):
                continue
            if "ThreadPoolExecutor(" in code:
                window = "".join(path.read_text().splitlines()[n - 1 : n + 3])
                if "initializer=enter_background" in window:
                    continue
            offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "threads not started through lmcache_triton.threads:\n" + "\n".join(offenders)
