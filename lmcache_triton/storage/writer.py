"""One bounded write queue with its background thread: what every slow tier's `put` hands work to.

Primitives:
  `WriteQueue(write, name, nice, on_error)`  `write(key, tensor, meta, encoding) -> bool` runs on
                                        the thread (`encoding`: None, or the tensor holds a
                                        chunk's encoded parts, `chunk.codec.Encoding`).
  `submit(key, tensor, meta, on_done)`  False at once when the queue is full (nothing queued,
                                        `on_done` not called: the caller answers it).
  `flush(timeout)`, `close(timeout)`, `qsize()`.

Invariants:
  * `on_done(ok)` runs exactly once per submitted item, on the writer thread, after `write`
    returned (False when it raised: `on_error(key, exc)` is told, the thread never dies).
  * The queue keeps a reference to the tensor until `on_done`: the caller must not reuse it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping

import torch

from lmcache_triton.chunk.codec import Encoding
from lmcache_triton.threads import background_thread

from .tier import OnDone

logger = logging.getLogger(__name__)

Write = Callable[[str, torch.Tensor, Mapping[str, str], Encoding | None], bool]
_Item = tuple[str, torch.Tensor, Mapping[str, str], OnDone | None, Encoding | None]


class WriteQueue:
    """A bounded queue drained by one background thread.

    Args:
        write: the write itself (on the thread); True when written.
        name: the thread's name.
        maxsize: items waiting at most (>= 1).
        nice: the thread's niceness (Linux applies it per thread); default 0 leaves it.
        on_error: told of an exception `write` raised (counted and warned by the tier).
        after: called with each key once it is done, before `on_done` (the tier's bookkeeping).
    """

    def __init__(
        self,
        write: Write,
        name: str,
        maxsize: int,
        *,
        nice: int = 0,
        on_error: Callable[[str, Exception], object] | None = None,
        after: Callable[[str], object] | None = None,
    ) -> None:
        self._write, self._nice = write, nice
        self._on_error, self._after = on_error, after
        self._q: queue.Queue[_Item | None] = queue.Queue(maxsize=max(1, maxsize))
        self._thread = background_thread(self._run, name)
        self._thread.start()

    def submit(
        self, key: str, tensor: torch.Tensor, meta: Mapping[str, str], on_done: OnDone | None,
        encoding: Encoding | None = None,
    ) -> bool:
        try:
            self._q.put_nowait((key, tensor, meta, on_done, encoding))
        except queue.Full:
            return False
        return True

    def qsize(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        if self._nice:
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                key, tensor, meta, on_done, encoding = item
                ok = False
                try:
                    ok = self._write(key, tensor, meta, encoding)
                except Exception as e:  # never kill the writer thread
                    if self._on_error is not None:
                        self._on_error(key, e)
                finally:
                    if self._after is not None:
                        self._after(key)
                    if on_done is not None:
                        try:
                            on_done(ok)
                        except Exception:
                            logger.exception("%s: on_done callback failed", self._thread.name)
            finally:
                self._q.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._q.all_tasks_done
        with cond:
            while self._q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Finish queued writes and stop the thread (call once)."""
        self._q.put(None)
        self._thread.join(timeout)
