"""The quality guard: a lossy codec is used for a model only where a passing record exists.

`decide(asked, identity, records_dir, thresholds)` is a pure function of its arguments and the
record files: for each tier that asks for a lossy codec (`disk_codec`, `remote_codec`,
`cpu_codec`), the record `<namespace>-<codec>.json` of this model's weights and that codec must
exist, read cleanly and pass `thresholds` (the server's, from the config: a record that passed
calibrate's bar but not this server's stricter one does not count). Otherwise the tier stores
exact, and `CodecChoice.reason` says why in one line.

`guard_codecs(config, identity, asked)` applies it with the config's switch, thresholds and
records directory: tier -> the codec to build it with, and one log line for all refusals. The
connector's worker calls it and hands the result to `storage.builder.build_storage(codecs=...)`.

Invariants:
  * Lossy never by surprise: a missing, unreadable, damaged, tampered, foreign (other weights,
    other KV dtype or row shape) or other-codec record is no record.
  * "exact" and any codec `is_lossy` calls lossless pass untouched; so does everything with the
    guard off (`codec_guard: false`, what `lmcache-triton calibrate` itself runs with).
  * Torch-free and vLLM-free; reads at most one small file per lossy tier.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .record import Identity, RecordError, Thresholds, calibration_namespace, read_record, record_name

if TYPE_CHECKING:
    from lmcache_triton.config import LMCacheConfig

logger = logging.getLogger("lmcache_triton")

EXACT = "exact"


@dataclass(frozen=True)
class CodecChoice:
    """What the guard decided for one tier.

    Args:
        tier: "cpu", "disk" or "remote".
        asked: the configured codec.
        used: the codec the tier will store with (`asked`, or "exact").
        reason: why a lossy codec was refused (one line), or what allowed it; None for a
            lossless one.
    """

    tier: str
    asked: str
    used: str
    reason: str | None = None

    @property
    def refused(self) -> bool:
        return self.used != self.asked


def _default_lossy(codec: str) -> bool:
    return codec != EXACT


def decide(
    asked: Mapping[str, str],
    identity: Identity,
    records_dir: str | os.PathLike,
    thresholds: Thresholds,
    *,
    is_lossy: Callable[[str], bool] = _default_lossy,
    enabled: bool = True,
) -> list[CodecChoice]:
    """Which codec each tier may use for `identity`'s KV.

    Args:
        asked: tier -> configured codec name.
        identity: what produces the KV (`Identity.from_key_meta(core.key_meta)`).
        records_dir: where `lmcache-triton calibrate` wrote its records.
        thresholds: the bar a record must pass (the server's config).
        is_lossy: whether a codec name is lossy; default: anything but "exact".
        enabled: the guard itself (`codec_guard`); default True. Off: every codec as asked.

    Returns:
        One `CodecChoice` per tier of `asked`, in its order.
    """
    namespace = calibration_namespace(identity)
    out = []
    for tier, codec in asked.items():
        if not enabled or not is_lossy(codec):
            off = "the guard is off (codec_guard: false)" if is_lossy(codec) else None
            out.append(CodecChoice(tier, codec, codec, off))
            continue
        path = Path(records_dir) / record_name(namespace, codec)
        try:
            rec = read_record(path, namespace, codec)
        except FileNotFoundError:
            why = f"no calibration record for {codec} and these weights in {records_dir}"
            out.append(CodecChoice(tier, codec, EXACT, why))
            continue
        except RecordError as e:
            out.append(CodecChoice(tier, codec, EXACT, f"calibration record {path} is not usable: {e}"))
            continue
        failed = thresholds.failures(rec.metrics)
        if failed:
            out.append(CodecChoice(tier, codec, EXACT, f"the {codec} calibration record fails: {'; '.join(failed)}"))
        else:
            m = rec.metrics
            out.append(
                CodecChoice(
                    tier, codec, codec,
                    f"calibrated {rec.created}: top-1 agreement {m.top1_agreement:.4f}, logprob deviation "
                    f"mean {m.mean_logprob_dev:.3g} max {m.max_logprob_dev:.3g} over {m.tokens} tokens",
                )
            )  # fmt: skip
    return out


def refusal_line(choices: list[CodecChoice], model: str) -> str | None:
    """The one log line for every refused codec, or None when none was refused."""
    refused = [c for c in choices if c.refused]
    if not refused:
        return None
    parts = "; ".join(f"{c.tier}_codec={c.asked}: {c.reason}" for c in refused)
    return (
        f"lmcache_triton: lossy codec not used for {model}, storing exact ({parts}); "
        "run `lmcache-triton calibrate MODEL --codec NAME` to measure it"
    )


def thresholds_of(config: LMCacheConfig) -> Thresholds:
    """The guard's thresholds from the config keys `calibration_*`."""
    return Thresholds(
        min_top1=config.calibration_min_top1,
        max_mean_logprob_dev=config.calibration_max_mean_logprob_dev,
        max_logprob_dev=config.calibration_max_logprob_dev,
        max_accuracy_drop=config.calibration_max_accuracy_drop,
        min_tokens=config.calibration_min_tokens,
    )


def records_dir_of(config: LMCacheConfig) -> Path:
    from .record import default_records_dir

    return Path(config.calibration_dir) if config.calibration_dir else default_records_dir()


def guard_codecs(
    config: LMCacheConfig,
    identity: Identity,
    asked: Mapping[str, str],
    *,
    is_lossy: Callable[[str], bool] = _default_lossy,
    log: bool = True,
) -> tuple[dict[str, str], list[CodecChoice]]:
    """The codec each tier may write `identity`'s KV with (module docstring), the guard's
    switch, thresholds and records directory taken from `config`.

    Args:
        config: the loaded configuration (`codec_guard`, `calibration_*`).
        identity: what produces the KV.
        asked: tier name -> the codec the config asks for (`storage.builder.requested_codecs`).
        is_lossy: whether a codec name is lossy; default: anything but "exact".
        log: log the one refusal line (warning) and one info line per lossy codec used; default
            True. The connector logs from one rank, so a server says it once.

    Returns:
        (tier name -> the codec to build it with, the choices).
    """
    choices = decide(
        asked, identity, records_dir_of(config), thresholds_of(config), is_lossy=is_lossy, enabled=config.codec_guard
    )
    if log:
        line = refusal_line(choices, identity.model)
        if line is not None:
            logger.warning("%s", line)
        for c in choices:
            if not c.refused and c.reason is not None:
                logger.info("lmcache_triton: %s_codec=%s for %s (%s)", c.tier, c.used, identity.model, c.reason)
    return {c.tier: c.used for c in choices}, choices
