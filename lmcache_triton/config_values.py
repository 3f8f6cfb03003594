"""How each config key's value is read: a raw value -> the typed value, or `ConfigError`.

A raw value is what a source holds: a YAML scalar or list, or a string from `LMCACHE_<KEY>` or
`extra_config`. `PARSERS` maps every key of `config.LMCacheConfig` to its parser; a parser takes
`(key, raw)` and returns the typed value or raises
`ConfigError("<key>: expected <form>, got <repr(raw)>")`. Sources, merging, unknown keys and the
checks across keys are `config.py`'s; this module knows one value at a time.

Invariants: a secret (`chunk_secret`, the contents of `chunk_secret_file`) is never echoed in an
error message or a log line; a remote URL's password is masked. Imports no storage and nothing
else of the package but `remote_url` and `chunk.codec` (lazily, for their names).
"""

from __future__ import annotations

import logging
import os
import stat
import urllib.parse
from collections.abc import Callable
from typing import Any

# The config's own logger: the vLLM plugin installs its once-only filter there and the CLI
# reads it (one logger for every config warning, wherever the code lives).
logger = logging.getLogger("lmcache_triton.config")

SUPPORTED_CACHE_POLICIES = ("LRU",)
SUPPORTED_HASH_ALGORITHMS = ("xxh3_128",)
MIN_SECRET_CHARS = 16
_MIN_SIZE_BYTES = 4096  # a non-zero bound under one page (1e-12 GB is 0 bytes) is surely a typo
_MAX_SIZE_GB = float(1 << 20)  # 1 PiB


class ConfigError(ValueError):
    """A configuration value (or file) that cannot be used; the message names the key."""


# --------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw value (a YAML scalar/list, or an env/extra string) and returns
# the typed value, or raises ConfigError("<key>: expected <form>, got <repr(raw)>").


def _bad(key: str, expected: str, raw: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {raw!r}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        s = raw.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise _bad(key, "a boolean (true/false/1/0/yes/no)", raw)


def _to_int(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            return None
    return None


def _to_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        v = float(raw)
    elif isinstance(raw, str):
        try:
            v = float(raw.strip())
        except ValueError:
            return None
    else:
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _int_parser(minimum: int, expected: str) -> Callable[[str, Any], int]:
    def parse(key: str, raw: Any) -> int:
        v = _to_int(raw)
        if v is None or v < minimum:
            raise _bad(key, expected, raw)
        return v

    return parse


def _size_gb(key: str, raw: Any) -> float:
    v = _to_float(raw)
    if v is None or v < 0:
        raise _bad(key, "a size in GB, a number >= 0", raw)
    if 0 < v * (1 << 30) < _MIN_SIZE_BYTES:
        raise _bad(key, "a size in GB: 0 (off) or at least 4e-06 (4 KiB)", raw)
    if v > _MAX_SIZE_GB:
        raise _bad(key, f"a size in GB, at most {_MAX_SIZE_GB:.0f} (1 PiB)", raw)
    return v


def physical_memory_bytes() -> int | None:
    """The machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_size_gb(key: str, raw: Any) -> float:
    v = _size_gb(key, raw)
    mem = physical_memory_bytes()
    if mem and v * (1 << 30) > mem:
        raise _bad(key, f"a size in GB at most this machine's memory ({mem / (1 << 30):.1f} GB)", raw)
    return v


def _split_list(raw: Any) -> list[Any] | None:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.strip().strip("[]").split(",")]
        return [p for p in parts if p]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [raw]
    return None


def _list_of(
    convert: Callable[[Any], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str, Any], list[Any]]:
    """A parser of non-empty lists whose items `convert` (None on failure) and pass `ok`."""

    def parse(key: str, raw: Any) -> list[Any]:
        items = _split_list(raw)
        values = [convert(item) for item in items or ()]
        if not values or any(v is None or not ok(v) for v in values):
            raise _bad(key, expected, raw)
        return values

    return parse


_ratios = _list_of(
    _to_float, lambda v: 0.0 <= v <= 1.0, "a non-empty list of numbers in [0, 1] (comma-separated in env)"
)
_layers = _list_of(_to_int, lambda v: v >= 0, "a non-empty list of layer indices >= 0 (comma-separated in env)")


def _opt_str(key: str, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _bad(key, "a string or null", raw)
    s = raw.strip()
    return None if s.lower() in ("", "none", "null") else s


def _str(key: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise _bad(key, "a string", raw)
    return raw  # not stripped: blend_special_str is whitespace-significant


def _local_disk(key: str, raw: Any) -> str | None:
    s = _opt_str(key, raw)
    if s is None:
        return None
    if s.startswith("file://"):
        url = urllib.parse.urlsplit(s)
        if url.netloc not in ("", "localhost") or url.query or url.fragment:
            raise _bad(key, "a directory path, file:///path or file://localhost/path (or null)", raw)
        s = urllib.parse.unquote(url.path)
    if not s or "://" in s:
        raise _bad(key, "a directory path or file:///path (or null)", raw)
    s = os.path.expanduser(s)
    # The nearest existing ancestor must be a directory: a regular file there can never become
    # the tier's directory. (Unwritable directories are reported by the disk tier at start-up,
    # which then runs without disk.)
    probe = s
    while probe and not os.path.lexists(probe):
        parent = os.path.dirname(probe.rstrip("/"))
        if parent == probe:
            break
        probe = parent
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        what = "is a file" if probe == s else f"is under {probe!r}, which is a file"
        raise ConfigError(f"{key}: {s!r} {what}, expected a directory")
    return s


def _secret(key: str, raw: Any) -> str | None:
    # Never echo the value: error messages and logs must not carry the secret.
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string (value not shown)")
    if raw.strip() == "":
        return None
    if len(raw) < MIN_SECRET_CHARS:
        raise ConfigError(f"{key}: expected at least {MIN_SECRET_CHARS} characters, got {len(raw)} (value not shown)")
    return raw


def read_secret_file(path: str) -> str:
    """The secret held in the file at `path` (one line; the trailing newline stripped).

    Args:
        path: the file named by `chunk_secret_file`, `~` already expanded.

    Returns:
        The secret, checked like `chunk_secret` (at least `MIN_SECRET_CHARS` characters).

    Raises:
        ConfigError: the file cannot be opened, is not a regular file (symlinks are not
            followed), is not UTF-8, is empty or holds too short a secret. The message never
            shows the secret. A file other users can read is accepted with a warning.
    """
    key = "chunk_secret_file"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path!r}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{key}: {path!r} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "lmcache_triton config: chunk_secret_file %r is accessible by other users (mode %o); chmod 600 it",
                path,
                stat.S_IMODE(st.st_mode),
            )
        data = f.read(1 << 16)
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path!r} is not UTF-8 text") from None
    secret = _secret(key, text)
    if secret is None:
        raise ConfigError(f"{key}: {path!r} is empty")
    return secret


def parse_remote_url(key: str, raw: Any) -> str | None:
    """The `remote_url` setting `key` checked: the URL, or None when unset or of a scheme the
    remote tier does not speak (LMCache's `lm://`: ignored with a warning). Raises ConfigError
    (password masked) for a malformed URL. Also used by the CLI's `--remote-url`."""
    s = _opt_str(key, raw)
    if s is None:
        return None
    from lmcache_triton.remote_url import SCHEMES, RemoteURLError, check_url, mask_url

    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme and scheme not in SCHEMES:
        # LMCache's own server (lm://) and other backends: an LMCache config must still start.
        logger.warning(
            "lmcache_triton config: remote_url %s is ignored: the remote tier speaks %s",
            mask_url(s), ", ".join(f"{x}://" for x in SCHEMES),
        )
        return None
    try:
        check_url(s)
    except RemoteURLError as e:
        raise ConfigError(f"{key}: {e}") from None
    return s


def _timeout_s(key: str, raw: Any) -> float:
    v = _to_float(raw)
    if v is None or not 0 < v <= 60:
        raise _bad(key, "seconds, a number in (0, 60]", raw)
    return v


def _choice(choices: tuple[str, ...], canon: Callable[[str], str]) -> Callable[[str, Any], str]:
    def parse(key: str, raw: Any) -> str:
        if isinstance(raw, str) and canon(raw.strip()) in choices:
            return canon(raw.strip())
        raise _bad(key, f"one of {', '.join(choices)} (only these are implemented)", raw)

    return parse


def _fraction(key: str, raw: Any) -> float:
    v = _to_float(raw)
    if v is None or not 0.0 <= v <= 1.0:
        raise _bad(key, "a number in [0, 1]", raw)
    return v


def _nonneg(key: str, raw: Any) -> float:
    v = _to_float(raw)
    if v is None or v < 0:
        raise _bad(key, "a number >= 0", raw)
    return v


def _codec(key: str, raw: Any) -> str:
    from lmcache_triton.chunk.codec import CODEC_NAMES

    return _choice(CODEC_NAMES, str.lower)(key, raw)


# LMCache's `remote_serde` values -> our remote codec (None: no equivalent here).
SERDE_CODECS: dict[str, str | None] = {"naive": "exact", "kivi": "int4", "cachegen": None}


def _serde(key: str, raw: Any) -> str:
    return _choice(tuple(SERDE_CODECS), str.lower)(key, raw)


# Every key of `config.LMCacheConfig` -> its parser (config.py checks that the keys match).
PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "chunk_size": _int_parser(1, "a positive integer"),
    "local_cpu": _parse_bool,
    "max_local_cpu_size": _cpu_size_gb,
    "local_disk": _local_disk,
    "max_local_disk_size": _size_gb,
    "save_decode_cache": _parse_bool,
    "save_unfull_chunk": _parse_bool,
    "min_retrieve_tokens": _int_parser(0, "an integer >= 0"),
    "async_load_min_tokens": _int_parser(0, "an integer >= 0"),
    "async_load_slow_min_tokens": _int_parser(0, "an integer >= 0"),
    "cache_policy": _choice(SUPPORTED_CACHE_POLICIES, str.upper),
    "enable_blending": _parse_bool,
    "blend_recompute_ratios": _ratios,
    "blend_check_layers": _layers,
    "blend_special_str": _str,
    "blend_min_tokens": _int_parser(0, "an integer >= 0"),
    "remote_url": parse_remote_url,
    "remote_timeout": _timeout_s,
    "hash_algorithm": _choice(SUPPORTED_HASH_ALGORITHMS, str.lower),
    "chunk_secret": _secret,
    "chunk_secret_file": _opt_str,
    "codec_guard": _parse_bool,
    "calibration_dir": _opt_str,
    "calibration_min_top1": _fraction,
    "calibration_max_mean_logprob_dev": _nonneg,
    "calibration_max_logprob_dev": _nonneg,
    "calibration_max_accuracy_drop": _fraction,
    "calibration_min_tokens": _int_parser(1, "a positive integer"),
    "disk_codec": _codec,
    "remote_codec": _codec,
    "cpu_codec": _codec,
    "cpu_pretouch": _parse_bool,
    "cpu_copy_helper": _parse_bool,
    "cpu_pin_background": _parse_bool,
    "cpu_pretouch_max_size": _nonneg,
    "cpu_hugepages": _parse_bool,
    "remote_serde": _serde,
}
