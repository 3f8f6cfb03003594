"""LMCacheConfig loading: defaults, precedence (YAML < env < extra_config), every error message."""

import logging
import os
import re

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
        cfg = load_config(env={"LMCACHE_REMOTE_URL": "lm://u:pw123@host:65432", "LMCACHE_LOCAL_DISK": "/tmp/x"})
    assert cfg.remote_url is None  # LMCache's own server: not ours, ignored (an LMCache config still starts)
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "remote_url lm://u:***@host:65432 is ignored" in msgs and "pw123" not in msgs
    assert "max_local_disk_size=0 stores nothing" in msgs


@pytest.mark.parametrize(
    "url", ["redis://u:pw123@host:6379/0", "rediss://:pw123@h:6380", "unix:///run/valkey.sock?db=1", "valkey://h"]
)
def test_remote_url_forms(url):
    cfg = load_config(env={"LMCACHE_REMOTE_URL": url, "LMCACHE_REMOTE_TIMEOUT": "0.25"})
    assert cfg.remote_url == url and cfg.remote_timeout == 0.25
    assert "pw123" not in repr(cfg)


@pytest.mark.parametrize("url", ["redis://u:pw123@host:port/0", "redis://u:pw123@host:6379/x", "redis://", "unix://"])
def test_bad_remote_url_names_the_key_password_masked(url):
    with pytest.raises(ConfigError) as e:
        load_config(env={"LMCACHE_REMOTE_URL": url})
    assert str(e.value).startswith("remote_url: ") and "pw123" not in str(e.value)


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "61"])
def test_bad_remote_timeout(raw):
    with pytest.raises(ConfigError, match="remote_timeout"):
        load_config(env={"LMCACHE_REMOTE_TIMEOUT": raw})


# ---------------------------------------------------------------- hostile inputs (issue 10)


def test_non_utf8_yaml_names_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("local_disk: /tmp/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"LMCACHE_CONFIG_FILE: '.*latin1\.yaml' is not UTF-8 text"):
        load_config(env={"LMCACHE_CONFIG_FILE": str(p)})


FILE_URLS = [
    ("file://localhost/var/kv", "/var/kv"),
    ("file:///var/kv", "/var/kv"),
    ("file:///var/kv%20cache", "/var/kv cache"),
]


@pytest.mark.parametrize("url,path", FILE_URLS, ids=[u for u, _ in FILE_URLS])
def test_file_urls(url, path):
    assert load_config(env={"LMCACHE_LOCAL_DISK": url}).local_disk == path


def test_file_url_with_a_host_is_an_error():
    with pytest.raises(ConfigError, match="^local_disk: expected a directory path, file:///path or file://localhost"):
        load_config(env={"LMCACHE_LOCAL_DISK": "file://otherhost/var/kv"})


def test_tier_sizes_are_bounded():
    for key in ("max_local_cpu_size", "max_local_disk_size"):
        for value in ("1e-12", "1e300"):
            with pytest.raises(ConfigError, match=f"^{key}: expected a size in GB"):
                load_config(env={"LMCACHE_" + key.upper(): value})
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    with pytest.raises(ConfigError, match=r"^max_local_cpu_size: expected a size in GB at most this machine's memory"):
        load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": str(2 * mem_gb)})
    assert load_config(env={"LMCACHE_MAX_LOCAL_DISK_SIZE": str(2 * mem_gb)}).max_local_disk_size == 2 * mem_gb
    assert load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": "0"}).max_local_cpu_size == 0  # off: allowed


def test_local_disk_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^local_disk: '.*/file' is a file, expected a directory"):
        load_config(env={"LMCACHE_LOCAL_DISK": str(f)})
    with pytest.raises(ConfigError, match=r"^local_disk: '.*/file/kv' is under '.*/file', which is a file"):
        load_config(env={"LMCACHE_LOCAL_DISK": str(f / "kv")})
    assert load_config(env={"LMCACHE_LOCAL_DISK": str(tmp_path / "new" / "kv")}).local_disk.endswith("new/kv")


SECRET = "s3cr3t-value-0123456789"


def test_chunk_secret_is_never_shown(tmp_path, caplog):
    cfg = load_config(env={"LMCACHE_CHUNK_SECRET": SECRET})
    assert cfg.chunk_secret == SECRET and SECRET not in repr(cfg)
    with pytest.raises(ConfigError) as exc:
        load_config(env={"LMCACHE_CHUNK_SECRET": "short-one"})
    assert str(exc.value) == "chunk_secret: expected at least 16 characters, got 9 (value not shown)"
    with pytest.raises(ConfigError, match=r"^chunk_secret: expected a string \(value not shown\)$"):
        load_config(env={"LMCACHE_CONFIG_FILE": _yaml(tmp_path, "chunk_secret: 1234567890123456789\n")})
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        assert load_config({"lmcache.chunk_secret": SECRET}, env={}).chunk_secret == SECRET
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "kv_connector_extra_config" in msgs and SECRET not in msgs


def test_chunk_secret_file(tmp_path, caplog):
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config(env={"LMCACHE_CHUNK_SECRET_FILE": str(f)})
    assert cfg.chunk_secret == SECRET and not caplog.records
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        load_config(env={"LMCACHE_CHUNK_SECRET_FILE": str(f)})
    assert any("accessible by other users" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="^chunk_secret_file: set either chunk_secret or chunk_secret_file"):
        load_config(env={"LMCACHE_CHUNK_SECRET_FILE": str(f), "LMCACHE_CHUNK_SECRET": SECRET})
    with pytest.raises(ConfigError, match=r"^chunk_secret_file: cannot read '.*nope'"):
        load_config(env={"LMCACHE_CHUNK_SECRET_FILE": str(tmp_path / "nope")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(env={"LMCACHE_CHUNK_SECRET_FILE": str(tmp_path / "empty")})


def test_remote_url_password_in_extra_config_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config({"lmcache.remote_url": "redis://u:pw123@h:6379"}, env={})
        load_config({"lmcache.remote_url": "redis://h:6379"}, env={})
    assert cfg.remote_url == "redis://u:pw123@h:6379"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "LMCACHE_REMOTE_URL" in msgs[0] and "pw123" not in msgs[0]


@pytest.mark.parametrize(
    "ratios,layers,message",
    [
        ("0.15,0.1", "1", "blend_recompute_ratios / blend_check_layers: expected one ratio, or one per check layer"),
        ("0.15", "2,1", "blend_check_layers: expected distinct, ascending"),
    ],
)
def test_blend_keys_checked_together_at_start_up(monkeypatch, ratios, layers, message):
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "true")
    monkeypatch.setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", ratios)
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", layers)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({})
