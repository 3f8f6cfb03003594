"""The model fingerprint in chunk keys: changes with the weights, stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys

from lmcache_triton.identity import model_fingerprint


def _model(d, weights=b"w" * 64):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model.safetensors").write_bytes(weights)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_changes_when_weights_or_config_change(tmp_path):
    d = _model(tmp_path / "m")
    a = model_fingerprint(str(d))
    assert a == model_fingerprint(str(d)) and len(a) == 32
    (d / "model.safetensors").write_bytes(b"v" * 64)  # same size, rewritten in place
    st = os.stat(d / "model.safetensors")
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    b = model_fingerprint(str(d))
    assert b != a
    (d / "config.json").write_text('{"hidden_size": 16}')
    assert model_fingerprint(str(d)) != b
    c = model_fingerprint(str(d))
    (d / "tokenizer.json").write_text('{"x": 1}')  # not part of the KV's producer
    assert model_fingerprint(str(d)) == c
    (d / "model-00002.safetensors").write_bytes(b"x")  # a new shard
    assert model_fingerprint(str(d)) != c


def test_symlink_switch_is_a_new_model(tmp_path):
    _model(tmp_path / "snap1", b"a" * 10)
    _model(tmp_path / "snap2", b"b" * 10)
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "snap1")
    one = model_fingerprint(str(link))
    assert one == model_fingerprint(str(tmp_path / "snap1"))
    link.unlink()
    link.symlink_to(tmp_path / "snap2")
    assert model_fingerprint(str(link)) != one


def test_hub_id_and_revision():
    assert model_fingerprint("org/model", "abc") == model_fingerprint("org/model", "abc")
    assert model_fingerprint("org/model", "abc") != model_fingerprint("org/model", "def")
    assert model_fingerprint("org/model") != model_fingerprint("org/other")


def test_stable_across_processes(tmp_path):
    d = _model(tmp_path / "m")
    code = "import sys; from lmcache_triton.identity import model_fingerprint as f; print(f(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == model_fingerprint(str(d))


def test_remote_code_is_part_of_the_model(tmp_path):
    d = _model(tmp_path / "m")
    (d / "modeling_tiny.py").write_text("x = 1\n")
    a = model_fingerprint(str(d))
    (d / "modeling_tiny.py").write_text("x = 22\n")
    assert model_fingerprint(str(d)) != a


def test_hub_code_revision():
    assert model_fingerprint("org/model", "abc", "c1") == model_fingerprint("org/model", "abc", "c1")
    assert model_fingerprint("org/model", "abc", "c1") != model_fingerprint("org/model", "abc", "c2")
    assert model_fingerprint("org/model", "abc", "c1") != model_fingerprint("org/model", "abc")


def test_hub_branch_that_moved_in_the_local_cache(tmp_path, monkeypatch):
    """`main` pointing at another commit in the Hugging Face cache: another model."""
    cache = tmp_path / "hub"
    refs = cache / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    unknown = model_fingerprint("org/model")
    (refs / "main").write_text("a" * 40)
    one = model_fingerprint("org/model")
    assert one != unknown
    assert model_fingerprint("org/model", "main") == one
    assert model_fingerprint("org/model", "a" * 40) != one  # keyed by what was asked, too
    (refs / "main").write_text("b" * 40)
    assert model_fingerprint("org/model") != one
    # vLLM's --download-dir is searched first
    other = tmp_path / "dl" / "models--org--model" / "refs"
    other.mkdir(parents=True)
    (other / "main").write_text("c" * 40)
    assert model_fingerprint("org/model", download_dir=str(tmp_path / "dl")) != model_fingerprint("org/model")

