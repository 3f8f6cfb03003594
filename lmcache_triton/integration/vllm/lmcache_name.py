"""The classes that serve LMCache's connector name `LMCacheConnectorV1` (see `plugin.py`).

Both only add the one log line that says which implementation serves the name; the scheduler
role logs it (one line per server, not one per process).
"""

from __future__ import annotations

import logging

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import (
    LMCacheConnectorV1 as _VllmLMCacheConnectorV1,
)

from lmcache_triton.integration.vllm.plugin import CHOICE_ENV, choose_lmcache_name_impl, lmcache_installed
from lmcache_triton.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Dynamic

logger = logging.getLogger("lmcache_triton")


def _reason() -> str:
    try:
        return choose_lmcache_name_impl()[1]
    except ValueError as e:
        return str(e)


class LMCacheConnectorV1(LMCacheConnectorV1Dynamic):
    """lmcache_triton's connector, under LMCache's name."""

    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            logger.info(
                "lmcache_triton: kv_connector LMCacheConnectorV1 is served by lmcache_triton (%s); "
                "%s=lmcache hands it to LMCache",
                _reason(),
                CHOICE_ENV,
            )


class LMCacheConnectorV1ByLMCache(_VllmLMCacheConnectorV1):
    """vLLM's own wrapper (which imports LMCache), unchanged but for the log line."""

    def __init__(self, vllm_config, role, kv_cache_config):
        if role == KVConnectorRole.SCHEDULER:
            logger.info(
                "lmcache_triton: kv_connector LMCacheConnectorV1 is served by LMCache (%s); "
                "%s=lmcache_triton hands it to lmcache_triton",
                _reason(),
                CHOICE_ENV,
            )
        if not lmcache_installed():
            raise ModuleNotFoundError(
                f"No module named 'lmcache': {CHOICE_ENV} hands LMCacheConnectorV1 to LMCache, which is not "
                f"installed; install LMCache, or unset {CHOICE_ENV} to have lmcache_triton serve the name"
            )
        super().__init__(vllm_config, role, kv_cache_config)
