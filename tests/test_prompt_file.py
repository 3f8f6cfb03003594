"""Prompt files as `warm` and `calibrate` read them (one reader, `prompt_file.read_prompt_file`):
the same one-line errors from both commands."""

import pytest

from lmcache_triton.calibration.measure import PromptSetError, read_prompt_set
from lmcache_triton.warm import WarmError, read_prompts

READERS = [(read_prompts, WarmError), (read_prompt_set, PromptSetError)]
IDS = ["warm", "calibrate"]


@pytest.mark.parametrize(("read", "error"), READERS, ids=IDS)
@pytest.mark.parametrize(
    ("name", "body", "match"),
    [
        ("p.jsonl", "[1, 2]\n", r"p\.jsonl:1: expected a JSON object"),
        ("p.jsonl", '{"prompt": "a"}\n{nope\n', r"p\.jsonl:2: not JSON"),
        ("p.jsonl", "\n\n", "holds no prompts"),
        ("p.txt", "  \n", "holds no prompts"),
    ],
    ids=["not-an-object", "bad-second-line", "blank-jsonl", "blank-text"],
)
def test_bad_files_are_one_line(tmp_path, read, error, name, body, match):
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(error, match=match) as e:
        read(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("read", "error"), READERS, ids=IDS)
def test_missing_and_unreadable(tmp_path, read, error):
    with pytest.raises(error, match="does not exist"):
        read(tmp_path / "missing.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(error, match="cannot read prompts file"):
        read(p)


def test_warm_reads_text_and_jsonl(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("one\n\n two \n")
    assert read_prompts(t) == ["one", " two "]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a b"}\n\n{"prompt": "c"}\n')
    assert read_prompts(j) == ["a b", "c"]
    j.write_text('{"prompt_token_ids": [1]}\n')
    with pytest.raises(WarmError, match=r'p\.jsonl:1: expected an object with a string "prompt"'):
        read_prompts(j)
