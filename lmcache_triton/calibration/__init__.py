"""The quality guard for lossy codecs (issue 20): calibration records and the decision.

`record.py`  the record file (what `lmcache-triton calibrate` measured, bound to the weights'
             namespace and the codec) and the thresholds it must pass.
`guard.py`   `decide` / `guard_codecs`: a lossy codec is used only where a passing record exists.
`measure.py` exact against decoded outputs -> `Metrics`; prompt sets.
`run.py`     the calibration run in a child vLLM engine (imports vLLM there only).

This package's `__init__`, `record`, `guard` and `measure` import neither torch nor vLLM.
"""

from .guard import CodecChoice, decide, guard_codecs, refusal_line, thresholds_of
from .record import (
    Identity,
    Metrics,
    Record,
    RecordError,
    Thresholds,
    calibration_namespace,
    default_records_dir,
    read_record,
    write_record,
)

__all__ = [
    "CodecChoice",
    "Identity",
    "Metrics",
    "Record",
    "RecordError",
    "Thresholds",
    "calibration_namespace",
    "decide",
    "default_records_dir",
    "guard_codecs",
    "read_record",
    "refusal_line",
    "thresholds_of",
    "write_record",
]
