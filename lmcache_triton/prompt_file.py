"""Prompt files, as `warm` and `calibrate` read them: one prompt a line (blank lines skipped), or
`.jsonl` with one JSON object a line. Every problem is one line naming the file (and the line).

`read_prompt_file(path, error, from_text, from_object)` reads the file and turns each line into
the caller's item; `from_object(obj, where)` raises `error(f"{where}: ...")` on an object it does
not accept. Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def read_prompt_file(
    path: str | os.PathLike,
    error: type[Exception],
    from_text: Callable[[str], T],
    from_object: Callable[[dict, str], T],
) -> list[T]:
    """The items of prompts file `path`.

    Args:
        path: a text file (one prompt a line) or a `.jsonl` file (one object a line).
        error: the exception class every problem raises, with a one-line message.
        from_text: the item of a non-blank line of a text file.
        from_object: the item of a JSON object of a `.jsonl` file; `where` is `"file:line"`.

    Raises:
        error: the file is missing or unreadable, a line is not a JSON object, or it holds no
            prompts.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"prompts file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read prompts file {str(p)!r}: {e}") from None
    out: list[T] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append(from_text(line))
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise error(f"{p}:{n}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise error(f"{p}:{n}: expected a JSON object")
        out.append(from_object(obj, f"{p}:{n}"))
    if not out:
        raise error(f"prompts file {str(p)!r} holds no prompts")
    return out
