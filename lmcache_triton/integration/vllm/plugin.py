"""vLLM plugin (entry point group `vllm.general_plugins`): registers `LMCacheTritonConnector`.

vLLM loads general plugins in every process it starts (API server, EngineCore, workers), and
may load them more than once in one process: registration is guarded. It also wraps the model
runners' `load_model` (see `model_registry.py`) so CacheBlend can reach the worker's model.
"""

CONNECTOR_NAME = "LMCacheTritonConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # CacheBlend needs the worker's model: record it when a model runner loads it (idempotent).
    try:
        from lmcache_triton.integration.vllm.model_registry import install_hooks

        install_hooks()
    except Exception as e:  # never stop vLLM over an optional feature
        import logging

        logging.getLogger("lmcache_triton").warning("lmcache_triton: model hook not installed: %s", e)
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(
        CONNECTOR_NAME,
        "lmcache_triton.integration.vllm.vllm_v1_adapter",
        "LMCacheConnectorV1Dynamic",
    )
