"""Chunk hashing: process stability, prefix chaining, partial chunks, extra keys, key types."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache_triton.hashing import CacheKey, cache_keys, chunk_hashes, key_namespace

CHUNK_SIZES = [1, 16, 256]
TOKENS = [(i * 7919 + 13) % 151_000 for i in range(1000)]  # 1000 = not a multiple of 16 or 256

_CHILD = r"""
import json, sys
from lmcache_triton.hashing import chunk_hashes, key_namespace
toks = json.loads(sys.argv[1])
out = [d.hex() for d in chunk_hashes(toks, 16, extra=["lora-a", "salt"], include_partial=True)]
out.append(key_namespace("meta-llama/Llama-3-8B", 2, 1, "bfloat16", 16, "L32xH8xD128"))
print(json.dumps(out))
"""


def test_stable_across_processes_and_hash_seeds():
    toks = TOKENS[:100]
    outs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.getcwd()}
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(toks)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1] == outs[2]
    here = [d.hex() for d in chunk_hashes(toks, 16, extra=["lora-a", "salt"], include_partial=True)]
    assert outs[0][:-1] == here
    assert len(outs[0][-1]) == 32


def test_encoding_matches_independent_chain():
    # Pins the encoding (uint32 LE tokens, xxh3_128 chain from the seed): a change here orphans
    # every stored file, so it must come with a KEY_FORMAT_VERSION bump.
    import xxhash

    from lmcache_triton.hashing import DEFAULT_SEED

    h = xxhash.xxh3_128()
    h.update(DEFAULT_SEED)
    prev = h.digest()
    for chunk in ([1, 2], [3, 4]):
        prev = xxhash.xxh3_128_digest(prev + np.array(chunk, dtype="<u4").tobytes())
    assert prev == chunk_hashes([1, 2, 3, 4], 2)[1]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_prefix_chaining(chunk_size):
    full = chunk_hashes(TOKENS, chunk_size)
    assert len(full) == len(TOKENS) // chunk_size
    assert all(len(d) == 16 for d in full)
    # a prefix's hashes are a prefix of the full hashes
    prefix = chunk_hashes(TOKENS[: 3 * chunk_size + chunk_size // 2], chunk_size)
    assert full[:3] == prefix
    # changing one token in chunk 1 changes chunk 1 and every later digest, not chunk 0
    changed = list(TOKENS)
    changed[chunk_size + chunk_size // 2] += 1
    other = chunk_hashes(changed, chunk_size)
    assert other[0] == full[0]
    assert all(a != b for a, b in zip(other[1:], full[1:], strict=True))
    # same chunk content at a different position hashes differently (chained, not per-chunk)
    rep = chunk_hashes(TOKENS[:chunk_size] * 2, chunk_size)
    assert rep[0] != rep[1]
    assert len(set(full)) == len(full)


def test_input_types_agree():
    ref = chunk_hashes(TOKENS, 16, include_partial=True)
    assert chunk_hashes(np.array(TOKENS, dtype=np.int64), 16, include_partial=True) == ref
    assert chunk_hashes(np.array(TOKENS, dtype=np.uint32), 16, include_partial=True) == ref
    assert chunk_hashes(torch.tensor(TOKENS, dtype=torch.int32), 16, include_partial=True) == ref
    assert chunk_hashes(tuple(TOKENS), 16, include_partial=True) == ref


def test_partial_chunk():
    n_full = len(TOKENS) // 256  # 3 full chunks, 232-token tail
    full = chunk_hashes(TOKENS, 256)
    part = chunk_hashes(TOKENS, 256, include_partial=True)
    assert len(full) == n_full and len(part) == n_full + 1 and part[:n_full] == full
    # a longer tail gives a different last digest (it covers different tokens)
    part2 = chunk_hashes(TOKENS + [5], 256, include_partial=True)
    assert part2[:n_full] == full and part2[-1] != part[-1]
    # no empty partial chunk when the length is a multiple of chunk_size
    assert len(chunk_hashes(TOKENS[:512], 256, include_partial=True)) == 2
    assert chunk_hashes([], 16, include_partial=True) == []
    assert chunk_hashes([1, 2, 3], 16) == []


def test_extra_keys_change_every_hash():
    base = chunk_hashes(TOKENS, 64)
    lora = chunk_hashes(TOKENS, 64, extra=["lora-a"])
    salt = chunk_hashes(TOKENS, 64, extra=["lora-a", "salt1"])
    split = chunk_hashes(TOKENS, 64, extra=["lora-as", "alt1"])  # same concatenation, different items
    for other in (lora, salt, split):
        assert all(a != b for a, b in zip(base, other, strict=True))
    assert all(a != b for a, b in zip(salt, split, strict=True))
    assert chunk_hashes(TOKENS, 64, extra=["lora-a"]) == lora
    assert chunk_hashes(TOKENS, 64, seed=b"other") != base


BAD_TOKENS = [[-1, 2], [1 << 32], np.array([-3]), np.array([1.5])]


@pytest.mark.parametrize("toks", BAD_TOKENS, ids=["neg", "big", "np-neg", "float"])
def test_bad_tokens(toks):
    with pytest.raises(ValueError, match="tokens"):
        chunk_hashes(toks, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_hashes([1], 0)


def test_namespace_and_key():
    args = ("m", 2, 0, "bfloat16", 256, "fp")
    ns = key_namespace(*args)
    assert ns == key_namespace(*args) and len(ns) == 32
    for i, alt in enumerate(("m2", 4, 1, "float16", 128, "fp2")):
        changed = list(args)
        changed[i] = alt
        assert key_namespace(*changed) != ns, i
    digests = chunk_hashes(TOKENS, 256)
    keys = cache_keys(ns, digests)
    assert keys[0] == CacheKey(ns, digests[0])
    assert keys[0].hex == ns + digests[0].hex()
    assert all(c in "0123456789abcdef" for c in keys[0].hex) and len(keys[0].hex) == 64
    with pytest.raises(ValueError, match="namespace"):
        CacheKey("../etc", digests[0])
    with pytest.raises(ValueError, match="digest"):
        CacheKey(ns, b"short")
