"""The disk tools: list, verify and clear a disk tier's directory (`lmcache-triton inspect`,
`verify`, `clear`), without torch and without starting a tier.

Primitives:
  `DiskAdmin(path, secret, expect)`  a directory of chunk files, opened for inspection: nothing
                                     is indexed, created or removed at open.
  `entries()`      per-file header metadata (header reads only).
  `verify(fix)`    read every file fully and check it; `fix` removes the damaged ones.
  `clear_files()`  remove every file whose header says this format wrote it.
  `chunk_files(path)`  `(key, path)` of the files named like chunks.

Invariants:
  * Only regular files are opened (`safe_file`), a file is removed only if it is still the one
    judged, and a file another secret signed, or that cannot be read, is never removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from io import FileIO
from pathlib import Path
from typing import Any

from lmcache_triton.chunk.format import (
    ANY_SEAL,
    FORMAT,
    KEY_RE,
    ChunkAuth,
    ChunkError,
    ChunkUnverifiable,
    check_expect,
)

from .safe_file import READ_PIECE, NotRegular, header_is_ours, open_regular, read_header, readinto_all, unlink_if_same

SUFFIX = ".safetensors"


def chunk_files(path: Path) -> list[tuple[str, Path]]:
    """`(key, path)` of each file in `path` named like a chunk, sorted by name ([] when the
    directory does not exist)."""
    out = []
    try:
        with os.scandir(path) as it:
            names = sorted(de.name for de in it)
    except FileNotFoundError:  # inspection does not create the directory
        return []
    for name in names:
        if name.endswith(SUFFIX) and KEY_RE.match(name[: -len(SUFFIX)]):
            out.append((name[: -len(SUFFIX)], path / name))
    return out


class DiskAdmin:
    """A disk tier's directory opened by the tools.

    Args:
        path: the directory (`local_disk`).
        auth: how chunks are sealed (`ChunkAuth(chunk_secret)`); default: unsigned.
        expect: header fields `verify` asks of every file; default none.
        on_remove: called with each key whose file the tools removed (a live tier forgets it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        auth: ChunkAuth | None = None,
        expect: dict[str, str] | None = None,
        on_remove: Callable[[str], object] | None = None,
    ) -> None:
        self.path = Path(path)
        self.auth = auth or ChunkAuth()
        self.expect = dict(expect or {})
        self._on_remove = on_remove

    def _removed(self, key: str) -> None:
        if self._on_remove is not None:
            self._on_remove(key)

    def clear_files(self) -> dict[str, Any]:
        """Remove every chunk file of this format in the directory (what `lmcache-triton clear`
        does): regular files named like a chunk whose header is ours (format and key; a damaged
        payload or another secret's chunk is still ours). Anything else is left alone.

        Returns:
            {"removed": int, "bytes": int, "kept": [{"file": name, "reason": str}]}
        """
        report: dict[str, Any] = {"removed": 0, "bytes": 0, "kept": []}
        for key, path in chunk_files(self.path):
            try:
                f, st = open_regular(path)
                with f:
                    header_is_ours(f, st.st_size, key, FORMAT)
            except FileNotFoundError:
                continue
            except (ChunkError, NotRegular, OSError) as e:
                report["kept"].append({"file": path.name, "reason": f"not written by this tier: {e}"})
                continue
            self._removed(key)
            if unlink_if_same(path, st):
                report["removed"] += 1
                report["bytes"] += st.st_size
            else:
                report["kept"].append({"file": path.name, "reason": "could not be removed"})
        return report

    def _check(self, f: FileIO, key: str, size: int) -> None:
        """Read and verify one whole file (ChunkError / ChunkUnverifiable / OSError)."""
        hdr = read_header(f, size, key, self.auth)
        check_expect(hdr.meta, self.expect)
        h = self.auth.start(hdr.meta)
        buf = memoryview(bytearray(min(READ_PIECE, hdr.nbytes)))
        left = hdr.nbytes
        while left:
            piece = buf[: min(left, len(buf))]
            readinto_all(f, piece)
            h.update(piece)
            left -= len(piece)
        if self.auth.seal(h) != hdr.meta["checksum"]:
            raise ChunkError("MAC mismatch" if self.auth.signed else "checksum mismatch")

    def verify(self, fix: bool = False) -> dict[str, Any]:
        """Read every chunk file fully and check it.

        Args:
            fix: remove damaged files. Default False. Files that cannot be read (EACCES, EIO, not
                a regular file) or checked (signed with another or no secret) are not damaged:
                they are reported and never removed.

        Returns:
            {"checked": int, "ok": int, "damaged": [{"file", "reason", "removed": bool}],
             "removed": int, "unreadable": [{"file", "reason"}], "unverified": [{"file", "reason"}]}
        """
        report: dict[str, Any] = {
            "checked": 0, "ok": 0, "damaged": [], "removed": 0, "unreadable": [], "unverified": []
        }
        for key, path in chunk_files(self.path):
            st = None
            try:
                f, st = open_regular(path)
                with f:
                    self._check(f, key, st.st_size)
            except FileNotFoundError:
                continue
            except ChunkUnverifiable as e:
                report["checked"] += 1
                report["unverified"].append({"file": path.name, "reason": str(e)})
                continue
            except ChunkError as e:
                report["checked"] += 1
                row: dict[str, Any] = {"file": path.name, "reason": str(e), "removed": False}
                report["damaged"].append(row)
                if fix:
                    self._removed(key)
                    if unlink_if_same(path, st):
                        row["removed"] = True
                        report["removed"] += 1
                    else:
                        row["reason"] += "; could not be removed"
                continue
            except (NotRegular, OSError) as e:
                report["checked"] += 1
                reason = str(e) if isinstance(e, NotRegular) else (e.strerror or str(e))
                report["unreadable"].append({"file": path.name, "reason": reason})
                continue
            report["checked"] += 1
            report["ok"] += 1
        return report

    def entries(self) -> list[dict[str, Any]]:
        """Per-file header metadata (header reads only), for `lmcache-triton inspect`."""
        out = []
        for key, path in chunk_files(self.path):
            row: dict[str, Any] = {"file": path.name, "key": key}
            try:
                f, st = open_regular(path)
                with f:
                    row.update(bytes=st.st_size, mtime=st.st_mtime)
                    hdr = read_header(f, st.st_size, key, ANY_SEAL)
                row["meta"] = hdr.meta
                row["dtype"], row["shape"] = hdr.code, hdr.shape
                row["codec"] = hdr.codec
            except FileNotFoundError:
                continue
            except (ChunkError, ChunkUnverifiable, NotRegular, OSError) as e:  # Unverifiable: an unknown codec
                row["error"] = str(e)
            out.append(row)
        return out
