"""vLLM plugin (entry point group `vllm.general_plugins`): registers our connector names.

vLLM loads general plugins in every process it starts (API server, EngineCore, workers), and
may load them more than once in one process: everything here is idempotent. `register()`:

1. registers `LMCacheTritonConnector` (our connector under its own name);
2. decides who serves LMCache's name `LMCacheConnectorV1` (the one in LMCache's documented
   launch line), from `LMCACHE_TRITON_SERVE_LMCACHE_NAME`:
     - `auto` (default): lmcache_triton when the `lmcache` package is not importable, else
       LMCache (vLLM's own wrapper, unchanged);
     - `lmcache_triton` (or `1`, `true`, `ours`): always lmcache_triton;
     - `lmcache` (or `0`, `false`): never touch the name (vLLM's wrapper imports LMCache).
   The connector that is created logs ONE line (scheduler role) saying which implementation
   serves the name and how to choose the other one.
3. sends the `lmcache_triton` logger through vLLM's handler and level (VLLM_LOGGING_LEVEL, or
   LMCACHE_LOG_LEVEL when set), so the start-up and hit-rate lines appear in vLLM's format;
4. wraps the model runners' `load_model` (see `model_registry.py`) so CacheBlend can reach the
   worker's model;
5. checks the LMCache configuration (LMCACHE_CONFIG_FILE, LMCACHE_*, the `lmcache.*` extra
   config) when this process's command line launches our connector, before vLLM parses its
   arguments, let alone loads the model: a bad value ends the server in one line within seconds
   (not after ~100 s of model loading, four times, in tracebacks), and the warnings (an unknown
   LMCACHE_ variable) print here, once. Processes vLLM starts later inherit `CHECKED_ENV` and
   neither check nor warn again.

Why re-register the name rather than be loaded by vLLM's wrapper: vLLM's `LMCacheConnectorV1`
builds `lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl(vllm_config, role,
parent)` -- our core has that signature -- but the wrapper forwards neither
`build_connector_worker_meta` nor `update_connector_output`, which our scheduler needs to know
what the workers hold; so the name is served by our whole connector class.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from lmcache_triton.config import CHECKED_ENV

CONNECTOR_NAME = "LMCacheTritonConnector"
LMCACHE_NAME = "LMCacheConnectorV1"
CHOICE_ENV = "LMCACHE_TRITON_SERVE_LMCACHE_NAME"
_OURS = {"lmcache_triton", "1", "true", "yes", "on", "ours"}
_THEIRS = {"lmcache", "0", "false", "no", "off"}

# Our adapter module and the class that serves LMCache's name (a thin subclass that logs who
# serves the name).
ADAPTER_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
COMPAT_MODULE = "lmcache_triton.integration.vllm.lmcache_name"


def lmcache_installed() -> bool:
    """Whether `import lmcache` would find a package (nothing is imported)."""
    try:
        return importlib.util.find_spec("lmcache") is not None
    except (ImportError, ValueError):
        return False


def choose_lmcache_name_impl(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Who serves `LMCacheConnectorV1`: ("lmcache_triton" | "lmcache", the reason, one phrase).

    Raises:
        ValueError: LMCACHE_TRITON_SERVE_LMCACHE_NAME has a value that is none of the above.
    """
    env = os.environ if env is None else env
    raw = env.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if raw in _OURS:
        return "lmcache_triton", f"{CHOICE_ENV}={raw}"
    if raw in _THEIRS:
        return "lmcache", f"{CHOICE_ENV}={raw}"
    if raw != "auto":
        raise ValueError(f"{CHOICE_ENV}: expected auto, lmcache_triton or lmcache, got {raw!r}")
    if lmcache_installed():
        return "lmcache", "LMCache is installed"
    return "lmcache_triton", "LMCache is not installed"


class _ToVllmHandlers(logging.Handler):
    """Hands each record to the handlers the `vllm` logger has at that moment: vLLM (re)configures
    its logging after the plugins load (dictConfig replaces the handler), so they are looked up
    at emit time. Records still propagate to the root logger, which has no handler in vLLM's
    processes (vLLM's own loggers do not propagate); with VLLM_CONFIGURE_LOGGING=0 the root
    logger's configuration is all there is."""

    def emit(self, record: logging.LogRecord) -> None:
        for h in logging.getLogger("vllm").handlers:
            if record.levelno >= h.level:
                h.handle(record)


def _level() -> int:
    for var in ("LMCACHE_LOG_LEVEL", "VLLM_LOGGING_LEVEL"):
        name = os.environ.get(var, "").strip().upper()
        if name in logging._nameToLevel:
            return logging._nameToLevel[name]
    return logging.INFO  # vLLM's default level


def _route_logging() -> None:
    """Our logger writes through vLLM's handler (its format and stream) at vLLM's level
    (VLLM_LOGGING_LEVEL; LMCACHE_LOG_LEVEL, LMCache's switch, wins when set), once per record."""
    from lmcache_triton.config import OnceFilter

    ours = logging.getLogger("lmcache_triton")
    if any(isinstance(h, _ToVllmHandlers) for h in ours.handlers):
        return
    ours.addHandler(_ToVllmHandlers())
    ours.setLevel(_level())
    logging.getLogger("lmcache_triton.config").addFilter(OnceFilter())


def _loader(module_path: str, class_name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        cls: type = getattr(importlib.import_module(module_path), class_name)
        return cls

    return load


def _kv_transfer_config(argv: Sequence[str]) -> dict[str, Any] | None:
    """vLLM's `--kv-transfer-config` JSON among command-line arguments (the last one wins), or
    None when there is none or it is given in another form (dotted keys, a --config file): then
    only the connector can tell what it gets."""
    value = None
    for i, a in enumerate(argv):
        for name in ("--kv-transfer-config", "--kv_transfer_config"):
            if a == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(name + "="):
                value = a.split("=", 1)[1]
            elif a.startswith(name + "."):
                return None
    if value is None:
        return None
    try:
        kv = json.loads(value)
    except ValueError:
        return None
    return kv if isinstance(kv, dict) else None


def launches_our_connector(kv: Mapping[str, Any], impl: str) -> bool:
    """Whether vLLM's kv_transfer_config `kv` creates a connector of ours (`impl`: who serves
    LMCache's name, see `choose_lmcache_name_impl`)."""
    name = kv.get("kv_connector")
    module = kv.get("kv_connector_module_path") or ""
    return (
        name == CONNECTOR_NAME
        or (name == LMCACHE_NAME and impl == "lmcache_triton")
        or (isinstance(module, str) and module.startswith("lmcache_triton."))
    )


def check_config_early(
    impl: str, argv: Sequence[str] | None = None, env: MutableMapping[str, str] | None = None
) -> None:
    """Load the configuration the connector will load, now, when `argv` (default `sys.argv`)
    launches our connector: its warnings are logged here, and a bad value ends the process with
    one line (SystemExit), before vLLM loads the model. Once: sets `CHECKED_ENV` in `env`
    (default `os.environ`, which the processes vLLM starts later inherit)."""
    env = os.environ if env is None else env
    if env.get(CHECKED_ENV):
        return
    kv = _kv_transfer_config(sys.argv if argv is None else argv)
    if kv is None or not launches_our_connector(kv, impl):
        return
    from lmcache_triton.config import ConfigError, load_config

    extra = kv.get("kv_connector_extra_config")
    # vLLM configures its logging after parsing its arguments: until then the warnings would
    # reach no handler (vLLM's has none yet), so they go to stderr directly, looking like vLLM's.
    config_log = logging.getLogger("lmcache_triton.config")
    direct = None if logging.getLogger("vllm").handlers else logging.StreamHandler(sys.stderr)
    if direct is not None:
        direct.setFormatter(
            logging.Formatter(
                "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                datefmt="%m-%d %H:%M:%S",
            )
        )
        config_log.addHandler(direct)
    try:
        load_config(extra if isinstance(extra, dict) else None, env)
    except ConfigError as e:
        raise SystemExit(
            f"lmcache_triton: error in the LMCache configuration (LMCACHE_CONFIG_FILE, LMCACHE_*, "
            f"kv_connector_extra_config): {e}"
        ) from None
    finally:
        if direct is not None:
            config_log.removeHandler(direct)
    env[CHECKED_ENV] = "1"


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point; see the module docstring.

    Raises:
        SystemExit: this process launches our connector with a configuration it cannot use.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _route_logging()
    log = logging.getLogger("lmcache_triton")
    # CacheBlend needs the worker's model: record it when a model runner loads it (idempotent).
    try:
        from lmcache_triton.integration.vllm.model_registry import install_hooks

        install_hooks()
    except Exception as e:  # never stop vLLM over an optional feature
        log.warning("lmcache_triton: model hook not installed: %s", e)
    registry = KVConnectorFactory._registry
    if CONNECTOR_NAME not in registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, ADAPTER_MODULE, "LMCacheConnectorV1Dynamic")

    try:
        impl, _ = choose_lmcache_name_impl()
    except ValueError as e:
        log.warning("lmcache_triton: %s; LMCacheConnectorV1 is left to LMCache", e)
        impl = "lmcache"
    check_config_early(impl)
    if impl == "lmcache_triton":
        registry[LMCACHE_NAME] = _loader(COMPAT_MODULE, "LMCacheConnectorV1")
    elif LMCACHE_NAME in registry:
        # LMCache serves the name; our subclass of vLLM's wrapper only adds the one log line.
        registry[LMCACHE_NAME] = _loader(COMPAT_MODULE, "LMCacheConnectorV1ByLMCache")
