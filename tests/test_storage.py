"""Storage tiers: CPU LRU + pool, disk files (restart, corruption, sharing, disk full), manager."""

import errno
import logging
import os
import subprocess
import sys
import threading

import pytest
import safetensors.torch
import torch

from lmcache_triton.storage import CpuTier, DiskTier, StorageHierarchy, disk_dir
from lmcache_triton.storage.disk_read import DiskReads

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]
SHAPES = [(2, 3, 5, 80), (63,), (4, 1, 7)]  # odd sizes, head size 80


def key(i: int) -> str:
    return f"{i:064x}"


def chunk(i: int, shape=(4, 16, 80), dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g).to(dtype)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_roundtrip_exact(dtype, shape):
    tier = CpuTier(1 << 20, pin_memory=False)
    src = chunk(1, shape, dtype)
    noncontig = chunk(2, shape[::-1], dtype).permute(*reversed(range(len(shape))))
    assert tier.put(key(1), src, {"m": "x"}) and tier.put(key(2), noncontig)
    got = tier.get(key(1))
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), src.view(torch.uint8))
    assert got.data_ptr() != src.data_ptr()  # a copy, not the caller's tensor
    out = torch.full(shape, 7, dtype=dtype)
    assert tier.get(key(2), out=out) is out and torch.equal(out, noncontig)
    assert tier.meta(key(1)) == {"m": "x"}
    with pytest.raises(ValueError, match="out: expected shape"):
        tier.get(key(1), out=torch.empty(1, dtype=dtype))


def test_cpu_lru_eviction_order_and_bound():
    t = chunk(0)
    size = nbytes(t)
    tier = CpuTier(4 * size, pin_memory=False)
    for i in range(4):
        assert tier.put(key(i), chunk(i))
    assert tier.get(key(0)) is not None  # 0 becomes most recent
    assert tier.put(key(4), chunk(4))  # evicts 1, the least recently used
    assert tier.keys() == [key(2), key(3), key(0), key(4)]
    assert tier.put(key(2), chunk(2))  # present: only refreshes recency
    assert tier.keys()[-1] == key(2)
    assert tier.put(key(5), chunk(5))  # evicts 3
    assert not tier.contains(key(3)) and not tier.contains(key(1))
    assert torch.equal(tier.get(key(0)), chunk(0)) and torch.equal(tier.get(key(5)), chunk(5))
    s = tier.stats
    assert s["evictions"] == 2 and s["entries"] == 4 and s["bytes"] == 4 * size
    assert s["pool_bytes"] == 4 * size  # evicted buffers were reused, nothing new allocated
    assert tier.get(key(1)) is None and tier.stats["misses"] == 1


def test_cpu_bound_under_pressure_mixed_sizes():
    tier = CpuTier(100_000, pin_memory=False)
    g = torch.Generator().manual_seed(0)
    for i in range(300):
        n = int(torch.randint(1, 9_000, (1,), generator=g))
        assert tier.put(key(i), torch.full((n,), i % 250, dtype=torch.uint8))
        s = tier.stats
        assert s["pool_bytes"] <= 100_000 and s["bytes"] <= s["pool_bytes"]
    for k in tier.keys():  # noqa: SIM118 - CpuTier is not a mapping; survivors hold their own data
        v = tier.get(k)
        assert bool((v == int(k, 16) % 250).all())
    assert not tier.put(key(999), torch.zeros(100_001, dtype=torch.uint8))
    assert tier.stats["rejected"] == 1


def test_cpu_hold_blocks_eviction():
    size = nbytes(chunk(0))
    tier = CpuTier(2 * size, pin_memory=False)
    tier.put(key(0), chunk(0))
    tier.put(key(1), chunk(1))
    with tier.acquire(key(0)) as held:
        assert torch.equal(held, chunk(0))
        assert tier.put(key(2), chunk(2))  # must evict 1, not the held (older) 0
        assert tier.contains(key(0)) and not tier.contains(key(1))
        with tier.acquire(key(2)) as held2:
            assert not tier.put(key(3), chunk(3))  # everything held: cannot fit
            assert torch.equal(held2, chunk(2))
        assert torch.equal(held, chunk(0))  # untouched throughout
    assert tier.put(key(3), chunk(3))
    assert tier.stats["held"] == 0


def test_cpu_remove_while_held_defers_reuse():
    size = nbytes(chunk(0))
    tier = CpuTier(size, pin_memory=False)
    tier.put(key(0), chunk(0))
    held = tier.hold(key(0))
    assert tier.remove(key(0)) and not tier.contains(key(0))
    assert not tier.put(key(1), chunk(1))  # the held buffer is not reused while held
    assert torch.equal(held, chunk(0))
    tier.release(key(0), held)
    assert tier.put(key(1), chunk(1)) and torch.equal(tier.get(key(1)), chunk(1))
    with pytest.raises(KeyError, match="not held"):
        tier.release(key(1))


def test_cpu_threads():
    size = nbytes(chunk(0))
    tier = CpuTier(8 * size, pin_memory=False)
    errors = []

    def work(base):
        try:
            for i in range(200):
                k = key(base + i % 20)
                tier.put(k, chunk(base + i % 20))
                with tier.acquire(k) as t:
                    if t is not None and not torch.equal(t, chunk(base + i % 20)):
                        errors.append(k)
        except Exception as e:  # pragma: no cover - surfaced by the assert
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(b,)) for b in (0, 100, 200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert tier.stats["pool_bytes"] <= 8 * size and tier.stats["held"] == 0


# ----------------------------------------------------------------------------------------- disk


@pytest.fixture
def disk(tmp_path):
    tiers = []

    def make(max_bytes=1 << 30, path=None, **kw):
        t = DiskTier(path or tmp_path / "kv", max_bytes, **kw)
        tiers.append(t)
        return t

    yield make
    for t in tiers:
        t.close()


def _file(tier, i):
    return tier.path / f"{key(i)}.safetensors"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_disk_roundtrip_and_safetensors_compatible(disk, dtype):
    tier = disk()
    src = chunk(1, (3, 5, 80), dtype)
    assert tier.put(key(1), src, {"model": "m", "layout": "L2"})
    assert tier.flush(10)
    got = tier.get(key(1), expect={"layout": "L2"})
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), src.view(torch.uint8))
    out = torch.full((3, 5, 80), 3, dtype=dtype)
    assert tier.get(key(1), out=out) is out and torch.equal(out.view(torch.uint8), src.view(torch.uint8))
    assert tier.get(key(1), out=torch.empty(3, 5, 81, dtype=dtype)) is None  # mismatch: miss, kept
    assert tier.contains(key(1)) and tier.stats["corrupt"] == 0
    loaded = safetensors.torch.load_file(_file(tier, 1))
    assert list(loaded) == ["kv"] and torch.equal(loaded["kv"].view(torch.uint8), src.view(torch.uint8))
    with safetensors.safe_open(_file(tier, 1), "pt") as f:
        md = f.metadata()
    assert md["model"] == "m" and md["key"] == key(1) and md["checksum"].startswith("xxh3_64:")
    (row,) = tier.entries()
    assert row["key"] == key(1) and row["meta"]["layout"] == "L2" and row["shape"] == [3, 5, 80]
    with pytest.raises(ValueError, match="reserved"):
        tier.put(key(2), src, {"checksum": "x"})
    with pytest.raises(ValueError, match="lower-case hex"):
        tier.put("../../etc/passwd", src)


def test_disk_restart_reindexes(disk, tmp_path):
    tier = disk()
    for i in range(5):
        tier.put(key(i), chunk(i), {"layout": "L"})
    tier.flush(10)
    for i in range(5):
        os.utime(_file(tier, i), (1e9, 1e9))
    assert tier.get(key(3)) is not None
    assert os.path.getmtime(_file(tier, 3)) > 1.5e9  # a hit bumps mtime for the restart order
    for n, i in enumerate((1, 2, 4, 3, 0)):  # pin an unambiguous order: 1 2 4 3 0
        os.utime(_file(tier, i), (1e9, 2e9 + n))
    tier.close()
    (tier.path / "junk.txt").write_text("not ours")
    again = disk()
    assert again.keys() == [key(1), key(2), key(4), key(3), key(0)]
    assert all(again.contains(key(i)) for i in range(5))
    for i in range(5):
        assert torch.equal(again.get(key(i), expect={"layout": "L"}), chunk(i))
    assert again.stats["hits"] == 5 and again.stats["corrupt"] == 0
    assert (tier.path / "junk.txt").exists()  # not our file name: left alone


def _truncate(p):
    os.truncate(p, os.path.getsize(p) - 7)


def _flip(offset_from_end=None, offset=None):
    def f(p):
        data = bytearray(p.read_bytes())
        i = len(data) - offset_from_end if offset is None else offset
        data[i] ^= 0x01
        p.write_bytes(bytes(data))

    return f


def _flip_in_meta(p):
    data = p.read_bytes()
    p.write_bytes(data.replace(b'"model":"m1"', b'"model":"m2"', 1))  # valid JSON, wrong content


CORRUPTIONS = {
    "truncate": _truncate,
    "payload-byte": _flip(offset_from_end=100),
    "header-length-byte": _flip(offset=0),
    "header-json-byte": _flip(offset=9),
    "header-meta-value": _flip_in_meta,
    "not-safetensors": lambda p: p.write_bytes(b"hello, this is not a safetensors file at all" * 50),
    "zero-length": lambda p: p.write_bytes(b""),
    "foreign-safetensors": lambda p: safetensors.torch.save_file({"kv": torch.zeros(3)}, p),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_disk_corruption_is_a_counted_miss_and_removed(disk, how):
    tier = disk()
    tier.put(key(1), chunk(1), {"model": "m1"})
    tier.put(key(2), chunk(2), {"model": "m1"})
    tier.flush(10)
    CORRUPTIONS[how](_file(tier, 1))
    assert tier.get(key(1)) is None
    s = tier.stats
    assert s["corrupt"] == 1 and s["errors"] == 1 and s["misses"] == 1 and s["hits"] == 0
    assert not _file(tier, 1).exists() and not tier.contains(key(1))
    assert torch.equal(tier.get(key(2)), chunk(2))  # neighbours unaffected


def test_disk_wrong_layout_fingerprint(disk):
    tier = disk()
    tier.put(key(1), chunk(1), {"layout": "A"})
    tier.flush(10)
    assert tier.get(key(1), expect={"layout": "B"}) is None
    assert tier.stats["corrupt"] == 1 and not _file(tier, 1).exists()
    strict = disk(path=tier.path / "other", expect={"layout": "B"})
    strict.put(key(2), chunk(2), {"layout": "A"})
    strict.flush(10)
    assert strict.get(key(2)) is None and strict.stats["corrupt"] == 1


def test_disk_damage_found_at_restart_and_by_verify(disk):
    tier = disk()
    for i in range(4):
        tier.put(key(i), chunk(i))
    tier.flush(10)
    tier.close()
    _truncate(_file(tier, 0))  # header-level damage: caught by the re-index (size check)
    _flip(offset_from_end=5)(_file(tier, 1))  # payload damage: only a full read sees it
    stale = tier.path / f".{key(9)}.{disk_dir.HOST_TAG}.999999999.abc.tmp"
    stale.write_bytes(b"partial")
    again = disk()
    assert not _file(tier, 0).exists() and again.stats["corrupt"] == 1
    assert not stale.exists() and again.stats["stale_tmp_removed"] == 1
    report = again.verify(fix=False)
    assert report["checked"] == 3 and report["ok"] == 2
    assert [d["file"] for d in report["damaged"]] == [f"{key(1)}.safetensors"]
    assert "checksum" in report["damaged"][0]["reason"] and _file(tier, 1).exists()
    report = again.verify(fix=True)
    assert report["removed"] == 1 and not _file(tier, 1).exists() and not again.contains(key(1))
    assert again.verify()["damaged"] == []


def test_disk_eviction_bound(disk):
    tier = disk()
    tier.put(key(0), chunk(0))
    tier.flush(10)
    fsize = os.path.getsize(_file(tier, 0))
    tier.close()
    tier = disk(max_bytes=3 * fsize)
    for i in range(1, 6):
        tier.put(key(i), chunk(i))
        tier.flush(10)
        if i == 3:
            assert tier.get(key(1)) is not None  # 1 becomes most recent: 2 goes first
    files = sorted(p.name for p in tier.path.glob("*.safetensors"))
    assert files == sorted(f"{key(i)}.safetensors" for i in (1, 4, 5))
    assert tier.stats["bytes"] == 3 * fsize and tier.stats["evictions"] == 3
    tier.put(key(9), torch.zeros(4 * fsize, dtype=torch.uint8))  # larger than the whole tier
    tier.flush(10)
    assert tier.stats["rejected"] == 1 and not tier.contains(key(9))


def test_disk_queue_full_drops(disk, monkeypatch):
    # The writer thread holds the bound method it was built with: gate the class's before the
    # tier exists (patching the instance afterwards gated nothing and made this a timing race).
    gate = threading.Event()
    real = DiskTier._write
    monkeypatch.setattr(DiskTier, "_write", lambda self, *a: gate.wait(10) and real(self, *a))
    tier = disk(queue_size=1)
    done = []
    assert tier.put(key(0), chunk(0))  # taken by the writer, blocked on the gate
    while tier.stats["queued"]:
        pass
    assert tier.put(key(1), chunk(1))  # fills the queue
    assert not tier.put(key(2), chunk(2), on_done=done.append)
    assert done == [False] and tier.stats["dropped"] == 1
    gate.set()
    assert tier.flush(10)
    assert tier.contains(key(0)) and tier.contains(key(1)) and not tier.contains(key(2))


def test_disk_other_process_file_discovered_and_eviction_under_reader(disk):
    a = disk()
    b = disk()  # same directory, e.g. another server
    a.put(key(1), chunk(1))
    a.flush(10)
    assert b.contains(key(1)) and torch.equal(b.get(key(1)), chunk(1))
    os.unlink(_file(a, 1))  # b evicted it behind a's back
    assert a.contains(key(1))  # a's index still says so
    assert a.get(key(1)) is None  # ENOENT: a plain miss, no crash, no corruption count
    assert a.stats["corrupt"] == 0 and a.stats["misses"] == 1 and not a.contains(key(1))
    # unlink while a reader has the file open: the read still completes with the right bytes
    a.put(key(2), chunk(2))
    a.flush(10)
    with a.open_read(key(2)) as reader:
        os.unlink(_file(a, 2))
        tensor = torch.empty(reader.shape, dtype=reader.dtype)
        assert reader.read_into(tensor)
    assert torch.equal(tensor, chunk(2))


_WRITER = r"""
import sys, torch
from lmcache_triton.storage import DiskTier
path, who = sys.argv[1], int(sys.argv[2])
tier = DiskTier(path, 1 << 30, queue_size=256)
for i in list(range(20)) + list(range(100 * who, 100 * who + 20)):
    g = torch.Generator().manual_seed(i)
    tier.put(f"{i:064x}", torch.randn(8, 16, 80, generator=g).to(torch.bfloat16), {"writer": "any"})
tier.close()
"""


def test_two_processes_share_a_directory(disk, tmp_path):
    path = tmp_path / "shared"
    path.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w)], env=env) for w in (1, 2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    tier = disk(path=path)
    assert len(tier.keys()) == 60 and tier.stats["corrupt"] == 0
    report = tier.verify()
    assert report["checked"] == 60 and report["ok"] == 60, report
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*"))
    for i in (0, 19, 100, 219):
        g = torch.Generator().manual_seed(i)
        assert torch.equal(tier.get(key(i)), torch.randn(8, 16, 80, generator=g).to(torch.bfloat16))


def _mount_tmpfs(path) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        return False
    return r.returncode == 0


def _fake_full_disk(path, monkeypatch, capacity=1 << 20):
    """Without a tmpfs (not root / no mount): os.write into `path` raises ENOSPC once the files in
    `path` (measured on disk, so removing a file frees its space) would exceed `capacity`."""
    real_write = os.write

    def full_write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
            used = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path))
            if used + len(data) > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_write)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 1 MiB file system: a real tmpfs where it can be mounted, else injected ENOSPC."""
    path = tmp_path / "small"
    mounted = _mount_tmpfs(path)
    if not mounted:
        _fake_full_disk(path, monkeypatch)
    print("disk full via", "a 1 MiB tmpfs mount" if mounted else "a monkeypatched os.write raising ENOSPC")
    yield path
    if mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_evicts_own_lru_and_keeps_caching(disk, small_disk, caplog):
    tier = disk(path=small_disk)  # bound far above the file system: only ENOSPC limits it
    big = lambda i: chunk(i, (600, 512), torch.uint8)  # 300 KiB each: the 4th cannot fit in 1 MiB
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.storage.disk"):
        for i in range(10):
            assert tier.put(key(i), big(i))
            assert tier.flush(20)  # one at a time: the LRU order is the write order
    s = tier.stats
    assert s["writes"] == 10 and s["write_errors"] == 0 and s["disk_full"] == 0, s
    assert s["full_evictions"] >= 7 and s["evictions"] == s["full_evictions"]
    written = [i for i in range(10) if tier.contains(key(i))]
    assert written == list(range(10 - len(written), 10)) and len(written) >= 2  # the newest kept
    assert all(torch.equal(tier.get(key(i)), big(i)) for i in written)
    assert not [p for p in small_disk.iterdir() if p.name.endswith(".tmp")]  # temp files cleaned
    # A chunk larger than the whole file system: evicting everything cannot help; counted, warned once.
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.storage.disk"):
        for i in (20, 21):
            tier.put(key(i), chunk(i, (2200, 512), torch.uint8))
            assert tier.flush(20)
    s = tier.stats
    assert s["disk_full"] == 2 and s["write_errors"] == 2 and not tier.contains(key(20))
    # Distinct records: after in-process vLLM engines ran in this test session, a record can
    # reach pytest's capture handler twice (through vLLM's handlers too); one emission is one.
    full = list({id(r): r for r in caplog.records if "is full" in r.getMessage()}.values())
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    assert not [p for p in small_disk.iterdir() if p.name.endswith(".tmp")]
    tier.put(key(30), big(30))  # and it still caches afterwards
    assert tier.flush(20) and torch.equal(tier.get(key(30)), big(30)) and tier.stats["corrupt"] == 0
    tier.close()


# -------------------------------------------------------------------------------------- manager


def read(m, k):
    """A chunk through the hierarchy's real path: prefetched when not in memory, read under a hold."""
    if not m.in_memory(k) and not m.prefetch(k):
        return None
    with m.acquire(k) as t:
        return None if t is None else t.clone()


def test_hierarchy_tiers(disk):
    size = nbytes(chunk(0))
    m = StorageHierarchy(CpuTier(2 * size, pin_memory=False), [disk()])
    keys = [key(i) for i in range(5)]
    srcs = [chunk(i) for i in range(3)]
    for k, t in zip(keys, srcs, strict=False):
        assert m.put(k, t, {"layout": "L"})
        assert m.flush(10)  # else the CPU copies are still held for the disk writer, unevictable
    for t in srcs:
        t.fill_(0)  # caller reuses its buffers at once: stored data must not change
    assert m.flush(10)
    assert [m.contains(k) for k in keys] == [True, True, True, False, False]
    assert not m.in_memory(keys[0])  # evicted from CPU (bound 2 chunks) but on disk
    got = read(m, keys[0])
    assert torch.equal(got, chunk(0)) and m.in_memory(keys[0])  # promoted
    assert m.cpu.meta(keys[0]) == {"layout": "L"}
    assert torch.equal(read(m, keys[0]), chunk(0)) and m.stats()["cpu"]["hits"] == 2
    assert read(m, keys[4]) is None
    for i in range(3):
        assert torch.equal(m.tier("disk").get(keys[i]), chunk(i))
    assert m.stats()["cpu"]["held"] == 0  # disk hand-over holds were all released
    assert m.store_errors() == 0
    m.close()


def test_hierarchy_single_tiers(disk):
    only_cpu = StorageHierarchy(CpuTier(1 << 20, pin_memory=False))
    assert only_cpu.put(key(1), chunk(1)) and torch.equal(read(only_cpu, key(1)), chunk(1))
    # local_cpu off: the CPU tier only stages the write; the chunk leaves memory once on disk.
    only_disk = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [disk()], keep_in_cpu=False)
    src = chunk(2)
    assert only_disk.put(key(2), src)
    src.fill_(0)
    only_disk.flush(10)
    assert not only_disk.in_memory(key(2)) and only_disk.cpu.stats["held"] == 0
    assert only_disk.contains(key(2)) and torch.equal(read(only_disk, key(2)), chunk(2))
    assert not StorageHierarchy(None, [disk()]).put(key(3), chunk(3)), "no memory to stage a write in"
    assert not StorageHierarchy(None).put(key(3), chunk(3))


def test_replica_writes_no_slow_tier(disk):
    # A KV replica rank (`build_storage(replica=True)`) writes neither disk nor any other slow
    # tier; it keeps its CPU copy and still reads the tiers.
    tier = disk()
    m = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [tier], write_slow_tiers=False)
    assert m.put(key(1), chunk(1)) and not m.write_back(key(1))
    assert m.flush(10) and tier.keys() == [] and m.in_memory(key(1))
    tier.put(key(2), chunk(2))
    assert tier.flush(10) and m.prefetch(key(2))
    m.close()


def test_pending_writes_are_bounded_by_the_cpu_tier(disk):
    # Chunks 0 and 1 are held for the (blocked) disk writer; chunk 2 finds no free buffer and
    # is dropped (a future miss, counted), never copied aside: pending writes cannot grow memory.
    size = nbytes(chunk(0))
    tier = disk()
    m = StorageHierarchy(CpuTier(2 * size, pin_memory=False), [tier])
    gate = threading.Event()
    real = tier._write
    tier._write = lambda *a: gate.wait(10) and real(*a)
    srcs = [chunk(i) for i in range(3)]
    assert m.put(key(0), srcs[0]) and m.put(key(1), srcs[1])
    assert not m.put(key(2), srcs[2])
    assert m.dropped_writes == 1 and m.cpu.stats["rejected"] == 1
    for t in srcs:
        t.fill_(0)
    gate.set()
    assert m.flush(10)
    assert all(torch.equal(tier.get(key(i)), chunk(i)) for i in range(2))
    assert not tier.contains(key(2))
    assert m.cpu.stats["held"] == 0
    m.close()


def test_failed_slow_tier_writes_are_store_errors(disk):
    tier = disk(max_bytes=1 << 10)  # smaller than a chunk: the disk refuses every write
    m = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [tier])
    assert m.put(key(1), chunk(1)) and m.put(key(2), chunk(2)) and m.flush(10)
    assert m.store_errors() == 2 == tier.stats["rejected"] and m.cpu.stats["held"] == 0
    m.close()


def test_prefetch_reads_verified_into_the_cpu_tier(disk):
    m = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [disk()], keep_in_cpu=False)
    assert m.put(key(4), chunk(4), {"model": "m"})
    m.flush(10)
    assert not m.in_memory(key(4))
    calls = []
    assert m.prefetch(key(4), expect={"model": "m"}, on_stored=calls.append)
    assert calls == ["disk"] and torch.equal(m.cpu.get(key(4)), chunk(4))
    assert m.cpu.meta(key(4)) == {"model": "m"}  # the writer's meta, without the format's fields
    m.cpu.clear()
    assert not m.prefetch(key(4), expect={"model": "other"}), "a header that disagrees is a miss"
    assert not m.prefetch(key(5)), "no such file"
    assert not m.in_memory(key(4)) and m.cpu.stats["bytes"] == 0  # reservations given back


def test_prefetch_reads_the_file_once_into_the_arena_outside_the_cpu_lock(disk, monkeypatch):
    # The read lands straight in a reserved arena block (no scratch buffer, one open of the
    # file), and the CPU tier stays usable meanwhile: a put from another thread completes while
    # the read is blocked.
    tier = disk()
    m = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [tier])
    assert m.put(key(1), chunk(1)) and m.flush(10)
    m.cpu.clear()
    opened, gate, reading = [], threading.Event(), threading.Event()
    real_open, real_read = DiskReads.open_file, DiskReads.read_verified

    def count_open(self, k):
        opened.append(k)
        return real_open(self, k)

    def slow_read(self, f, hdr, mv):
        reading.set()
        assert gate.wait(10)
        return real_read(self, f, hdr, mv)

    monkeypatch.setattr(DiskReads, "open_file", count_open)
    monkeypatch.setattr(DiskReads, "read_verified", slow_read)
    done = []
    th = threading.Thread(target=lambda: done.append(m.prefetch(key(1))))
    th.start()
    assert reading.wait(10)
    assert m.cpu.put(key(2), chunk(2)), "the CPU tier's lock is not held during the read"
    assert not m.in_memory(key(1)), "not visible before it is verified"
    gate.set()
    th.join(10)
    assert done == [True] and opened == [key(1)]
    with m.acquire(key(1)) as t:
        assert torch.equal(t, chunk(1))
    # A damaged file read into a reserved block: a miss, removed, the block given back.
    monkeypatch.undo()
    assert m.put(key(3), chunk(3)) and m.flush(10)
    m.cpu.clear()
    path = tier.path / f"{key(3)}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert not m.prefetch(key(3))
    assert not m.in_memory(key(3)) and not path.exists() and m.cpu.stats["bytes"] == 0
    assert m.cpu.stats["errors"] == 0
    m.close()


def test_put_fill_writes_in_place_and_a_failed_fill_stores_nothing():
    tier = CpuTier(1 << 20)
    assert tier.put_fill("aa" * 8, torch.float32, (4, 8), lambda dst: dst.copy_(torch.arange(32.0).view(4, 8)))
    assert torch.equal(tier.get("aa" * 8), torch.arange(32.0).view(4, 8))

    def boom(dst):
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError):
        tier.put_fill("bb" * 8, torch.float32, (4, 8), boom)
    assert not tier.contains("bb" * 8)
    assert tier.stats["errors"] == 1


def test_acquire_holds_the_cpu_tensor_under_pressure(tmp_path):
    cpu = CpuTier(3 * 4096)
    m = StorageHierarchy(cpu, [DiskTier(tmp_path, 1 << 20)])
    m.put("aa" * 8, torch.full((1024,), 7.0))
    m.flush()
    with m.acquire("aa" * 8) as tensor:
        # Pressure while held: the tier holds 3 chunks, so "dd" fits only by evicting; the held,
        # least recently used "aa" must survive and "bb" go instead.
        assert cpu.put("bb" * 8, torch.zeros(1024))
        assert cpu.put("cc" * 8, torch.zeros(1024))
        assert cpu.put("dd" * 8, torch.zeros(1024))
        assert cpu.contains("aa" * 8) and not cpu.contains("bb" * 8)
        assert torch.equal(tensor, torch.full((1024,), 7.0))
    cpu.clear()
    assert m.prefetch("aa" * 8)  # CPU gone: read from disk, verified, in the CPU tier again
    with m.acquire("aa" * 8) as tensor:
        assert torch.equal(tensor, torch.full((1024,), 7.0))
    with m.acquire("ee" * 8) as tensor:
        assert tensor is None
    m.close()
