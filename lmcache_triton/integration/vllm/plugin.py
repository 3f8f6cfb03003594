"""vLLM plugin (entry point group `vllm.general_plugins`): registers `LMCacheTritonConnector`.

vLLM loads general plugins in every process it starts (API server, EngineCore, workers), and
may load them more than once in one process: registration is guarded.
"""

CONNECTOR_NAME = "LMCacheTritonConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(
        CONNECTOR_NAME,
        "lmcache_triton.integration.vllm.vllm_v1_adapter",
        "LMCacheConnectorV1Dynamic",
    )
