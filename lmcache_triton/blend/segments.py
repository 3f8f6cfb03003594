"""Split a prompt into CacheBlend segments and key each segment by its own tokens.

CacheBlend reuses the KV of text segments (retrieved documents) wherever they appear in a prompt,
so a segment's key must depend on its tokens only, never on its position or on what precedes it
(unlike prefix-chained chunk hashes). The application marks segment boundaries with a separator
token sequence; LMCache's default separator string is " # # " (tokenize it with the model's
tokenizer to get `sep_tokens`).

Invariants of `split_segments(tokens, sep)`:
  * the spans are sorted, non-empty, disjoint and cover `[0, len(tokens))` exactly;
  * every occurrence of `sep` (matched left to right, non-overlapping, like `str.split`) is a span
    of its own; every other span is a maximal run of text between occurrences. Separator spans
    are recognisable by `tokens[s:e] == sep` (a text span never equals `sep`: it would contain
    an occurrence). Keeping separators as their own spans means a document's span and hash do
    not depend on which separator surrounds it, and the separator's own KV is one reusable
    segment like any other;
  * empty text (separator at the start or end, adjacent separators) yields no span.

Pure Python: no torch needed.
"""

from __future__ import annotations

import hashlib
import struct

# Domain separation: a segment key never equals another module's key over the same bytes.
_PERSON = b"lmct-blend-seg"


def split_segments(tokens: list[int], sep_tokens: list[int]) -> list[tuple[int, int]]:
    """Spans `(start, end)` of the text segments and separator occurrences in `tokens`.

    Args:
        tokens: the prompt's token ids.
        sep_tokens: the separator token sequence, non-empty.

    Returns:
        Sorted `(start, end)` half-open spans covering `tokens`; see the module invariants.
        Matching is the naive O(len(tokens) * len(sep_tokens)) scan: separators are a few tokens.
    """
    sep = list(sep_tokens)
    if not sep:
        raise ValueError("sep_tokens must be non-empty")
    n, m = len(tokens), len(sep)
    spans: list[tuple[int, int]] = []
    text_start = 0
    i = 0
    first = sep[0]
    while i <= n - m:
        if tokens[i] == first and list(tokens[i : i + m]) == sep:
            if i > text_start:
                spans.append((text_start, i))
            spans.append((i, i + m))
            i += m
            text_start = i
        else:
            i += 1
    if n > text_start:
        spans.append((text_start, n))
    return spans


def segment_hashes(tokens: list[int], spans: list[tuple[int, int]]) -> list[bytes]:
    """Position-independent, process-stable 16-byte keys of `tokens[s:e]` for each span.

    The key is BLAKE2b-128 (personalised for this module) over the span's token ids as
    little-endian int32: the same tokens give the same key at any position, in any process, on
    any platform (never the builtin `hash`, which is salted per process).

    Args:
        tokens: the prompt's token ids (each in int32 range).
        spans: `(start, end)` spans, e.g. from `split_segments`.

    Returns:
        One `bytes` key of length 16 per span, in order.
    """
    n = len(tokens)
    out = []
    for start, end in spans:
        if not 0 <= start <= end <= n:
            raise ValueError(f"span ({start}, {end}) outside tokens of length {n}")
        seg = tokens[start:end]
        try:
            data = struct.pack(f"<{len(seg)}i", *seg)
        except struct.error as e:
            raise ValueError(f"token ids of span ({start}, {end}) must fit int32: {e}") from None
        out.append(hashlib.blake2b(data, digest_size=16, person=_PERSON).digest())
    return out
