"""LMCacheConfig loading: defaults, precedence (YAML < env < extra_config), every error message."""

import logging

import pytest

from lmcache_triton.config import ConfigError, LMCacheConfig, load_config


def _yaml(tmp_path, text):
    p = tmp_path / "lmcache.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_match_lmcache():
    cfg = load_config(env={})
    assert cfg == LMCacheConfig()
    assert (cfg.chunk_size, cfg.local_cpu, cfg.max_local_cpu_size) == (256, True, 5.0)
    assert (cfg.local_disk, cfg.max_local_disk_size, cfg.save_decode_cache) == (None, 0.0, False)
    assert (cfg.save_unfull_chunk, cfg.min_retrieve_tokens, cfg.cache_policy) == (True, 0, "LRU")
    assert (cfg.enable_blending, cfg.blend_recompute_ratios, cfg.blend_check_layers) == (False, [0.15], [1])
    assert cfg.blend_special_str == " # # " and cfg.remote_url is None


def test_precedence_yaml_env_extra(tmp_path):
    path = _yaml(
        tmp_path,
        "chunk_size: 64\nmax_local_cpu_size: 1.5\nlocal_disk: file:///data/kv\nmax_local_disk_size: 3\n"
        "blend_check_layers: [0, 2]\n",
    )
    env = {"LMCACHE_CONFIG_FILE": path, "LMCACHE_CHUNK_SIZE": "128", "LMCACHE_MAX_LOCAL_CPU_SIZE": "2"}
    cfg = load_config({"lmcache.chunk_size": 32, "chunk_size": 7, "other.key": 1}, env=env)
    assert cfg.chunk_size == 32  # extra_config beats env beats YAML; un-prefixed keys ignored
    assert cfg.max_local_cpu_size == 2.0  # env beats YAML
    assert cfg.local_disk == "/data/kv"  # file:// stripped
    assert cfg.max_local_disk_size == 3.0 and cfg.max_local_disk_bytes == 3 << 30
    assert cfg.blend_check_layers == [0, 2]
    assert load_config(env={"LMCACHE_CONFIG_FILE": path}).chunk_size == 64


BOOLS = [("true", True), ("1", True), ("yes", True), ("FALSE", False), ("0", False), ("no", False)]


@pytest.mark.parametrize("text,value", BOOLS, ids=[b[0] for b in BOOLS])
def test_env_bools(text, value):
    assert load_config(env={"LMCACHE_SAVE_DECODE_CACHE": text}).save_decode_cache is value


def test_env_lists_and_plain_path():
    cfg = load_config(
        env={
            "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.1, 0.25",
            "LMCACHE_BLEND_CHECK_LAYERS": "1,3,5",
            "LMCACHE_LOCAL_DISK": "/tmp/kv",
            "LMCACHE_CACHE_POLICY": "lru",
        }
    )
    assert cfg.blend_recompute_ratios == [0.1, 0.25] and cfg.blend_check_layers == [1, 3, 5]
    assert cfg.local_disk == "/tmp/kv" and cfg.cache_policy == "LRU"


ERRORS = [
    ("chunk_size", "abc", "chunk_size: expected a positive integer, got 'abc'"),
    ("chunk_size", "0", "chunk_size: expected a positive integer, got '0'"),
    ("chunk_size", "2.5", "chunk_size: expected a positive integer, got '2.5'"),
    ("local_cpu", "maybe", "local_cpu: expected a boolean (true/false/1/0/yes/no), got 'maybe'"),
    ("max_local_cpu_size", "-1", "max_local_cpu_size: expected a size in GB, a number >= 0, got '-1'"),
    ("max_local_disk_size", "lots", "max_local_disk_size: expected a size in GB, a number >= 0, got 'lots'"),
    ("max_local_cpu_size", "nan", "max_local_cpu_size: expected a size in GB, a number >= 0, got 'nan'"),
    ("min_retrieve_tokens", "-5", "min_retrieve_tokens: expected an integer >= 0, got '-5'"),
    ("cache_policy", "LFU", "cache_policy: expected one of LRU (only these are implemented), got 'LFU'"),
    (
        "blend_recompute_ratios",
        "0.1,1.5",
        "blend_recompute_ratios: expected a non-empty list of numbers in [0, 1] (comma-separated in env), "
        "got '0.1,1.5'",
    ),
    (
        "blend_recompute_ratios",
        "",
        "blend_recompute_ratios: expected a non-empty list of numbers in [0, 1] (comma-separated in env), "
        "got ''",
    ),
    (
        "blend_check_layers",
        "1,x",
        "blend_check_layers: expected a non-empty list of layer indices >= 0 (comma-separated in env), "
        "got '1,x'",
    ),
    (
        "local_disk",
        "s3://bucket",
        "local_disk: expected a directory path or file:///path (or null), got 's3://bucket'",
    ),
    (
        "hash_algorithm",
        "md5",
        "hash_algorithm: expected one of xxh3_128 (only these are implemented), got 'md5'",
    ),
    ("save_unfull_chunk", "2", "save_unfull_chunk: expected a boolean (true/false/1/0/yes/no), got '2'"),
]


@pytest.mark.parametrize("key,value,message", ERRORS, ids=[f"{e[0]}={e[1]!r}" for e in ERRORS])
def test_bad_value_errors(key, value, message):
    with pytest.raises(ConfigError) as exc:
        load_config(env={"LMCACHE_" + key.upper(): value})
    assert str(exc.value) == message
    # the same value through extra_config gives the same message
    with pytest.raises(ConfigError) as exc:
        load_config({"lmcache." + key: value}, env={})
    assert str(exc.value) == message


YAML_ERRORS = [
    ("chunk_size: true\n", "chunk_size: expected a positive integer, got True"),
    ("local_cpu: 3\n", "local_cpu: expected a boolean (true/false/1/0/yes/no), got 3"),
    ("blend_special_str: 5\n", "blend_special_str: expected a string, got 5"),
    ("remote_url: [1]\n", "remote_url: expected a string or null, got [1]"),
    ("blend_check_layers: {a: 1}\n", "blend_check_layers: expected a non-empty list of layer indices >= 0"),
    ("enable_blending: true\nblend_special_str: ''\n", "blend_special_str: expected a non-empty string"),
]


@pytest.mark.parametrize("text,message", YAML_ERRORS, ids=[y[0].split(":")[0] for y in YAML_ERRORS])
def test_bad_yaml_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        load_config(env={"LMCACHE_CONFIG_FILE": _yaml(tmp_path, text)})


def test_missing_yaml_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"LMCACHE_CONFIG_FILE: config file '.*nope\.yaml' does not exist"):
        load_config(env={"LMCACHE_CONFIG_FILE": missing})


def test_yaml_not_mapping_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="expected a YAML mapping of key: value in .* got list"):
        load_config(env={"LMCACHE_CONFIG_FILE": _yaml(tmp_path, "- 1\n- 2\n")})
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(env={"LMCACHE_CONFIG_FILE": _yaml(tmp_path, "a: [1,\n")})
    assert load_config(env={"LMCACHE_CONFIG_FILE": _yaml(tmp_path, "")}) == LMCacheConfig()


def test_unknown_keys_warn_once_each(tmp_path, caplog):
    path = _yaml(tmp_path, "chunk_sise: 3\n")
    env = {
        "LMCACHE_CONFIG_FILE": path,
        "LMCACHE_LOCAL_CPUU": "1",
        "LMCACHE_LOG_LEVEL": "DEBUG",  # LMCache's own switch: not a key, no warning
        "LMCACHE_USE_EXPERIMENTAL": "True",
        "OTHER_VAR": "x",
    }
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config({"lmcache.bogus": 1, "vllm.thing": 2}, env=env)
    assert cfg == LMCacheConfig()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3, msgs
    assert any("'chunk_sise'" in m and "config file" in m for m in msgs)
    assert any("'local_cpuu'" in m and "environment" in m for m in msgs)
    assert any("'bogus'" in m and "extra_config" in m for m in msgs)


def test_remote_url_and_zero_disk_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config(env={"LMCACHE_REMOTE_URL": "lm://host:65432", "LMCACHE_LOCAL_DISK": "/tmp/x"})
    assert cfg.remote_url == "lm://host:65432"
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "remote_url='lm://host:65432' is ignored" in msgs
    assert "max_local_disk_size=0 stores nothing" in msgs
