"""The disk tier's directory: the safety checks at open, all-or-nothing writes, stale temp files.

Torch-free. Invariants:
  * Private by default: the directory is created 0700 and files 0600. At open (not for the
    read-only inspection mode) a directory owned by another user or writable by all users is
    refused (`DiskTierError`) unless chunks are authenticated (then a warning); a group-writable
    one is warned about. A directory that cannot be created or is not a directory is a
    `DiskTierError`; `storage.builder` logs it (one line naming `local_disk`) and runs without
    the disk tier. An unwritable directory (read-only mount, immutable, not ours) logs one error
    line naming `local_disk` at open and `writable` is False: the chunks there are still served,
    and every failed write counts in `write_errors`.
  * Temp files are `.<key>.<host>.<pid>.<rand>.tmp` in the same directory; start-up removes
    those of this host's dead processes and any older than an hour.
  * All-or-nothing files (`write_atomic`): a temp file, fsynced, then `os.replace`d to the final
    name; readers see a whole file or none.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import uuid
from pathlib import Path

import xxhash

from .safe_file import write_all

logger = logging.getLogger("lmcache_triton.storage.disk")  # its messages are the disk tier's

STALE_TMP_S = 3600.0
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_TMP_RE = re.compile(r"^\.([0-9a-f]{8,256})\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+\.tmp$")
HOST_TAG = xxhash.xxh32_hexdigest(socket.gethostname().encode())


class DiskTierError(OSError):
    """The disk tier cannot run on this directory (unwritable, unsafe, not a directory)."""


def tmp_path(directory: Path, key: str) -> Path:
    """A fresh temp-file name for `key` in `directory`, naming this host and process."""
    return directory / f".{key}.{HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def write_atomic(directory: Path, key: str, final: Path, parts: tuple[bytes | memoryview, ...]) -> OSError | None:
    """Write `parts` to `final` all-or-nothing: a temp file (0600) in `directory`, fsynced, then
    `os.replace`d. Returns the error (the temp file removed), or None when written."""
    tmp = tmp_path(directory, key)
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        for part in parts:
            write_all(fd, part)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, final)
    except OSError as e:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return e
    return None


def check_directory(path: Path, signed: bool) -> bool:
    """Create `path` (0700) if missing and check it is a safe directory to serve chunks from.

    Returns:
        False when it is not writable (logged once: its chunks are still served), else True.

    Raises:
        DiskTierError: not a directory, cannot be created, or owned by another user / writable
            by all without `signed` chunks.
    """
    where = f"local_disk {str(path)!r}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except (FileExistsError, NotADirectoryError):
        raise DiskTierError(f"{where}: is not a directory") from None
    except OSError as e:
        raise DiskTierError(f"{where}: cannot create the directory ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DiskTierError(f"{where}: is not a directory")
    unsafe = []
    if st.st_uid != os.geteuid():
        unsafe.append(f"owned by uid {st.st_uid}, not this user (uid {os.geteuid()})")
    if st.st_mode & stat.S_IWOTH:
        unsafe.append("writable by all users")
    if unsafe:
        what = " and ".join(unsafe)
        if not signed:
            raise DiskTierError(
                f"{where}: refusing a directory {what}: anyone who can write there can plant KV "
                "that changes this server's outputs. Use a private directory (chmod 700, owned by "
                "this user), or set chunk_secret to authenticate chunks"
            )
        logger.warning("lmcache_triton disk tier: %s is %s; chunks are authenticated (chunk_secret)", where, what)
    elif st.st_mode & stat.S_IWGRP and not signed:
        logger.warning(
            "lmcache_triton disk tier: %s is group-writable: group members can plant chunks; "
            "chmod g-w, or set chunk_secret",
            where,
        )
    probe = tmp_path(path, "0" * 8)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, b"\0")
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        if e.errno in FULL_ERRNOS:  # full is not unwritable: eviction makes room
            logger.warning("lmcache_triton disk tier: %s is full at start-up", where)
            return True
        # Read-only mount, immutable, not ours: the chunks already there are still served
        # (verified), and every write that fails is counted in write_errors.
        logger.error(
            "lmcache_triton disk tier: %s is not writable (%s): serving the chunks already there, "
            "storing nothing new (failed writes are counted as store errors)",
            where,
            e.strerror or e,
        )
        return False
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def remove_stale_tmp(de: os.DirEntry[str], now: float) -> bool:
    """Remove `de` if it is a temp file of ours left by a dead process of this host or older than
    an hour; True when removed."""
    m = _TMP_RE.match(de.name)
    if m is None:
        return False
    try:
        st = de.stat(follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    age = now - st.st_mtime
    dead = False
    if m.group(2) == HOST_TAG:
        try:
            os.kill(int(m.group(3)), 0)
        except ProcessLookupError:
            dead = True
        except (PermissionError, OverflowError, ValueError):
            pass
    if dead or age > STALE_TMP_S:
        try:
            os.unlink(de.path)
            return True
        except OSError:
            return False
    return False
