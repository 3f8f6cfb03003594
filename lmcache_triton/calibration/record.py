"""Calibration records: what `lmcache-triton calibrate` measured for one codec on one model.

A record is a small JSON file in the records directory (`calibration_dir`, default
`~/.cache/lmcache-triton/calibration`), named `<namespace>-<codec>.json`:

    {"format": "lmcache-triton-calibration/1",
     "namespace": "<32 hex>",            # `calibration_namespace(identity)`
     "identity": {"model", "producer", "kv_dtype", "layout"},
     "codec": "int8",
     "metrics": {"prompts", "tokens", "loaded_tokens", "top1_agreement", "mean_logprob_dev",
                 "max_logprob_dev", "sequences_equal", "answered", "accuracy_exact",
                 "accuracy_codec"},
     "thresholds": {...},                # the ones calibrate judged with (informative)
     "passed": true,                     # calibrate's verdict then (informative)
     "created": "2026-12-06T23:10:00Z", "chunk_size": 64, "prompt_set": "built-in",
     "checksum": "<blake2b of the rest>"}

Primitives:
  `Identity`                 what produced the KV: model, weights fingerprint, KV dtype, row shape.
  `calibration_namespace(identity)`  its 32-hex digest; a record counts only under it.
  `Metrics`, `Thresholds`, `Thresholds.failures(metrics)`  the measures and the bar they must pass.
  `write_record(dir, record)` / `read_record(path, namespace, codec)`  atomic write; a read that
                             returns the record or raises `RecordError` (one line).

Invariants:
  * The namespace is the one of the weights, not of a path: `Identity.producer` is
    `integration/vllm/core.producer`'s fingerprint (identity.py: every weight and config file by
    name, size and mtime), so new weights under the same path have no record.
  * Chunk size, world size and rank are not part of it: the codecs quantize each token row (and
    each head) on its own, so how tokens are cut into chunks or heads into ranks does not change
    what a decoded row is.
  * The checksum catches damage and hand edits (a record edited to pass is a damaged record);
    it is not a signature: whoever can write the directory can also turn the guard off.
  * Torch-free, vLLM-free: the guard runs in every connector process and the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "lmcache-triton-calibration/1"
MAX_RECORD_BYTES = 1 << 16  # a record is ~1 KB; anything larger is not one of ours


class RecordError(ValueError):
    """A record file that is missing, unreadable, damaged or not for this model/codec (one line)."""


def default_records_dir() -> Path:
    """`$XDG_CACHE_HOME/lmcache-triton/calibration`, else `~/.cache/lmcache-triton/calibration`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache-triton" / "calibration"


@dataclass(frozen=True)
class Identity:
    """What produced the KV a codec compresses.

    Args:
        model: the model's name or path, as vLLM got it.
        producer: the weights' fingerprint and quantisation (`core.producer`, e.g. `"<32 hex>-q:none"`).
        kv_dtype: the KV cache's dtype, e.g. `"float32/auto"` or `"uint8/fp8_e4m3"`.
        layout: the token row's shape (`core.layout_fingerprint`, e.g. `"rows-FullAttentionSpec-h2-d32-float32"`).
    """

    model: str
    producer: str
    kv_dtype: str
    layout: str

    @classmethod
    def from_key_meta(cls, meta: dict[str, str]) -> Identity:
        """From the connector's `key_meta` (`ConnectorCore.key_meta`)."""
        return cls(str(meta["model"]), str(meta["producer"]), str(meta["kv_dtype"]), str(meta["layout"]))


def calibration_namespace(identity: Identity) -> str:
    """32 hex digits naming `identity`: what a record is bound to (not the model's path alone:
    new weights under the same path get a new producer fingerprint, hence a new namespace)."""
    h = hashlib.blake2b(digest_size=16)
    for part in ("lmcache-triton-calibration/1", identity.model, identity.producer, identity.kv_dtype, identity.layout):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


@dataclass(frozen=True)
class Metrics:
    """What calibrate measured, exact KV against the codec's decoded KV, greedy decoding.

    Args:
        prompts: prompts compared: those whose decoded run loaded KV from the cache.
        tokens: generated positions compared (up to and including each prompt's first
            disagreement: after it the two runs no longer see the same context).
        loaded_tokens: prompt tokens the decoded runs loaded from the codec's tier (0 would mean
            nothing decoded was measured).
        top1_agreement: fraction of the compared positions whose greedy token is the same.
        mean_logprob_dev, max_logprob_dev: |logprob of the exact run's token, exact vs decoded|,
            in nats, over the compared positions (mean and max).
        sequences_equal: fraction of prompts whose whole generation is identical.
        answered: prompts that carry an answer; accuracy_exact / accuracy_codec are None when 0.
        accuracy_exact, accuracy_codec: fraction of those whose generation starts with the answer.
    """

    prompts: int
    tokens: int
    loaded_tokens: int
    top1_agreement: float
    mean_logprob_dev: float
    max_logprob_dev: float
    sequences_equal: float
    answered: int = 0
    accuracy_exact: float | None = None
    accuracy_codec: float | None = None


# Defaults, and why (README "Quality guard"):
#  * top-1 agreement >= 0.99: at most one greedy token in a hundred changes, with the same context.
#  * mean |dlogprob| <= 0.01 nats: the chosen token's probability moves by 1% on average.
#  * max |dlogprob| <= 0.1 nats: no compared token's probability moves by more than ~10%.
#  * accuracy drop <= 0.01: the bar for 8-bit ("within 1 point of exact accuracy").
#  * >= 256 compared tokens: fewer cannot show a 1% disagreement rate at all.
@dataclass(frozen=True)
class Thresholds:
    """The bar a record must pass for a server to use its codec (config keys `calibration_*`)."""

    min_top1: float = 0.99
    max_mean_logprob_dev: float = 0.01
    max_logprob_dev: float = 0.1
    max_accuracy_drop: float = 0.01
    min_tokens: int = 256

    def failures(self, m: Metrics) -> list[str]:
        """What `m` fails, one phrase each; empty when it passes."""
        out = []
        if m.loaded_tokens <= 0:
            out.append("no decoded KV was loaded (loaded_tokens 0)")
        if m.tokens < self.min_tokens:
            out.append(f"{m.tokens} tokens compared < {self.min_tokens}")
        if not m.top1_agreement >= self.min_top1:
            out.append(f"top-1 agreement {m.top1_agreement:.4f} < {self.min_top1}")
        if not m.mean_logprob_dev <= self.max_mean_logprob_dev:
            out.append(f"mean logprob deviation {m.mean_logprob_dev:.4g} > {self.max_mean_logprob_dev}")
        if not m.max_logprob_dev <= self.max_logprob_dev:
            out.append(f"max logprob deviation {m.max_logprob_dev:.4g} > {self.max_logprob_dev}")
        if m.answered and m.accuracy_exact is not None and m.accuracy_codec is not None:
            drop = m.accuracy_exact - m.accuracy_codec
            if not drop <= self.max_accuracy_drop + 1e-12:
                out.append(
                    f"accuracy {m.accuracy_codec:.3f} vs exact {m.accuracy_exact:.3f} "
                    f"(drop {drop:.3f} > {self.max_accuracy_drop})"
                )
        return out


@dataclass(frozen=True)
class Record:
    """One calibration result (module docstring for the file)."""

    identity: Identity
    codec: str
    metrics: Metrics
    thresholds: Thresholds
    passed: bool
    created: str = ""
    chunk_size: int = 0
    prompt_set: str = ""

    @property
    def namespace(self) -> str:
        return calibration_namespace(self.identity)


def record_name(namespace: str, codec: str) -> str:
    return f"{namespace}-{codec}.json"


def _checksum(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).hexdigest()


def record_json(record: Record) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": FORMAT,
        "namespace": record.namespace,
        "identity": dataclasses.asdict(record.identity),
        "codec": record.codec,
        "metrics": dataclasses.asdict(record.metrics),
        "thresholds": dataclasses.asdict(record.thresholds),
        "passed": bool(record.passed),
        "created": record.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chunk_size": int(record.chunk_size),
        "prompt_set": record.prompt_set,
    }
    return {**body, "checksum": _checksum(body)}


def write_record(directory: str | os.PathLike, record: Record) -> Path:
    """Write `record` atomically (temp file, fsync, rename) as `<namespace>-<codec>.json` in
    `directory` (created 0700); returns its path. Replaces an earlier record for the same pair."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps(record_json(record), indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
    path = d / record_name(record.namespace, record.codec)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _field(obj: Any, cls: type, what: str) -> Any:
    """`cls(**obj)` with every field of `cls` present and of a plausible type, else RecordError."""
    if not isinstance(obj, dict):
        raise RecordError(f"{what}: expected an object")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            if f.default is not dataclasses.MISSING:
                continue
            raise RecordError(f"{what}: missing {f.name!r}")
        v = obj[f.name]
        if f.type in ("str",) and not isinstance(v, str):
            raise RecordError(f"{what}.{f.name}: expected a string")
        if f.type in ("int",) and (isinstance(v, bool) or not isinstance(v, int)):
            raise RecordError(f"{what}.{f.name}: expected an integer")
        if f.type in ("float", "float | None"):
            if v is None and f.type == "float | None":
                pass
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RecordError(f"{what}.{f.name}: expected a finite number")
        kwargs[f.name] = v
    return cls(**kwargs)


def parse_record(data: bytes, namespace: str | None = None, codec: str | None = None) -> Record:
    """The record in `data`, checked: format, checksum, fields, namespace consistent with its
    identity, and (when given) the expected `namespace` and `codec`.

    Raises:
        RecordError: anything else (one line).
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RecordError(f"not JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise RecordError(f"not a calibration record (format is not {FORMAT!r})")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    try:
        ok = obj.get("checksum") == _checksum(body)
    except (TypeError, ValueError):  # NaN/Infinity in the file
        ok = False
    if not ok:
        raise RecordError("checksum mismatch: the record was damaged or edited")
    identity = _field(obj.get("identity", {}), Identity, "identity")
    metrics = _field(obj.get("metrics", {}), Metrics, "metrics")
    thresholds = _field(obj.get("thresholds", {}), Thresholds, "thresholds")
    rec_codec = obj.get("codec")
    if not isinstance(rec_codec, str) or not rec_codec:
        raise RecordError("codec: expected a name")
    chunk_size = obj.get("chunk_size", 0)
    record = Record(
        identity, rec_codec, metrics, thresholds, bool(obj.get("passed")), str(obj.get("created", "")),
        chunk_size if isinstance(chunk_size, int) else 0, str(obj.get("prompt_set", "")),
    )  # fmt: skip
    if obj.get("namespace") != record.namespace:
        raise RecordError("namespace does not match the identity it names")
    if namespace is not None and record.namespace != namespace:
        raise RecordError(
            f"for other weights (namespace {record.namespace[:12]}..., this model's is {namespace[:12]}...)"
        )
    if codec is not None and record.codec != codec:
        raise RecordError(f"for codec {record.codec!r}, not {codec!r}")
    return record


def read_record(path: str | os.PathLike, namespace: str | None = None, codec: str | None = None) -> Record:
    """`parse_record` of the file at `path` (at most `MAX_RECORD_BYTES`, a regular file).

    Raises:
        FileNotFoundError: no such file (no record).
        RecordError: unreadable, too large, or what `parse_record` refuses.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RecordError(f"cannot read: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as e:
        raise RecordError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"larger than {MAX_RECORD_BYTES} bytes: not a record")
    return parse_record(data, namespace, codec)
