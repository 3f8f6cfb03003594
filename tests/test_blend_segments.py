"""Segmenting prompts for CacheBlend and keying segments by their own tokens."""

import os
import subprocess
import sys

import pytest

from lmcache_triton.blend.segments import segment_hashes, split_segments

SEP = [7, 7, 9]  # stands for the tokens of " # # "
DOC_A = [101, 102, 103, 104, 105]
DOC_B = [201, 202]


def _check_invariants(tokens, spans):
    pos = 0
    for s, e in spans:
        assert s == pos and e > s, spans
        pos = e
    assert pos == len(tokens)


def test_no_separator():
    toks = DOC_A + DOC_B
    assert split_segments(toks, SEP) == [(0, len(toks))]


def test_empty_tokens():
    assert split_segments([], SEP) == []
    assert segment_hashes([], []) == []


def test_separator_between():
    toks = DOC_A + SEP + DOC_B
    spans = split_segments(toks, SEP)
    assert spans == [(0, 5), (5, 8), (8, 10)]
    _check_invariants(toks, spans)


@pytest.mark.parametrize(
    "toks, want",
    [
        (SEP + DOC_A, [(0, 3), (3, 8)]),
        (DOC_A + SEP, [(0, 5), (5, 8)]),
        (SEP, [(0, 3)]),
        (DOC_A + SEP + SEP + DOC_B, [(0, 5), (5, 8), (8, 11), (11, 13)]),
        (SEP + SEP, [(0, 3), (3, 6)]),
        # A partial separator is text; an overlapping candidate is matched left to right.
        ([7, 7] + DOC_B, [(0, 4)]),
        ([7, 7, 7, 9, 1], [(0, 1), (1, 4), (4, 5)]),
    ],
    ids=["sep-at-start", "sep-at-end", "only-sep", "adjacent-seps", "two-seps", "partial-sep", "overlap"],
)
def test_separator_edges(toks, want):
    spans = split_segments(toks, SEP)
    assert spans == want
    _check_invariants(toks, spans)
    # Text spans never contain the separator, so `== SEP` tells the two kinds apart.
    for s, e in spans:
        if toks[s:e] != SEP:
            assert not any(toks[i : i + len(SEP)] == SEP for i in range(s, e - len(SEP) + 1))


def test_single_token_separator():
    toks = [1, 0, 2, 2, 0, 0, 3]
    assert split_segments(toks, [0]) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7)]


def test_empty_separator_rejected():
    with pytest.raises(ValueError, match="sep_tokens"):
        split_segments([1, 2], [])


def _hash_by_segment(toks):
    spans = split_segments(toks, SEP)
    return {tuple(toks[s:e]): h for (s, e), h in zip(spans, segment_hashes(toks, spans), strict=True)}


def test_same_document_different_positions_same_hash():
    p1 = [1, 2, 3] + SEP + DOC_A + SEP + DOC_B
    p2 = DOC_B + SEP + [9, 9] + SEP + DOC_A + SEP + [4]
    h1, h2 = (_hash_by_segment(p) for p in (p1, p2))
    for seg in (tuple(DOC_A), tuple(DOC_B), tuple(SEP)):
        assert h1[seg] == h2[seg]
    assert h1[tuple(DOC_A)] != h1[tuple(DOC_B)]
    assert all(len(h) == 16 for h in h1.values())


def test_hash_depends_on_order_and_length():
    (a,), (b,), (c,) = (segment_hashes(t, [(0, len(t))]) for t in ([1, 2], [2, 1], [1, 2, 0]))
    assert len({a, b, c}) == 3


def test_hash_stable_across_processes():
    toks = DOC_A + SEP + DOC_B
    spans = split_segments(toks, SEP)
    here = [h.hex() for h in segment_hashes(toks, spans)]
    code = (
        "from lmcache_triton.blend.segments import segment_hashes as h;"
        f"print(' '.join(x.hex() for x in h({toks!r}, {spans!r})))"
    )
    # A fresh interpreter with a different builtin-hash salt.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert res.stdout.split() == here


def test_hash_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        segment_hashes([1, 2], [(1, 3)])
    with pytest.raises(ValueError, match="int32"):
        segment_hashes([2**31], [(0, 1)])
