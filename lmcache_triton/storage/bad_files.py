"""What a tier remembers and says about chunk files it must not use. Torch-free.

  `KnownBad`      bad files it could not remove (or must leave in place), by identity, so an
                  unchanged one is not read again; bounded, thread-safe.
  `BadFileLog`    warnings about bad files, bounded per tier: a hostile directory must not flood
                  the log (after the limit, one note, then debug level).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from .safe_file import identity


class KnownBad:
    """Bad files remembered by identity (dev, inode, size, mtime), the oldest forgotten first.

    Args:
        limit: files remembered at most; default 4096.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, tuple[int, int, int, int]] = OrderedDict()

    def remember(self, key: str, st: os.stat_result) -> None:
        with self._lock:
            self._ids[key] = identity(st)
            self._ids.move_to_end(key)
            while len(self._ids) > self.limit:
                self._ids.popitem(last=False)

    def is_known(self, key: str, st: os.stat_result) -> bool:
        """Whether `key`'s file, as `st` shows it now, is the bad one remembered (a file
        replaced since is forgotten: look again)."""
        with self._lock:
            ident = self._ids.get(key)
            if ident is None:
                return False
            if ident == identity(st):
                return True
            del self._ids[key]
            return False

    def forget(self, key: str) -> None:
        with self._lock:
            self._ids.pop(key, None)


class BadFileLog:
    """Warnings about bad files: the first `limit` at warning level, then debug level.

    Args:
        logger: where to log.
        what: the tier, as the note after the limit names it (e.g. "lmcache_triton disk tier").
        limit: warnings at warning level; default 20.
    """

    def __init__(self, logger: logging.Logger, what: str, limit: int = 20) -> None:
        self.logger, self.what, self.limit = logger, what, limit
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self, msg: str, *args: object) -> None:
        with self._lock:
            self._count += 1
            n = self._count
        if n <= self.limit:
            self.logger.warning(msg, *args)
            if n == self.limit:
                self.logger.warning("%s: further bad files are logged at debug level only", self.what)
        else:
            self.logger.debug(msg, *args)
