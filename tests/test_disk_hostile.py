"""The disk tier on hostile and broken disks: crafted headers, non-regular files, permissions,
chunk authentication, unwritable and read-only directories, foreign files next to ours, and a
fuzz test over random and mutated files. No engine: these run in a few seconds."""

import json
import logging
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from lmcache_triton.chunk import format as fmt
from lmcache_triton.chunk.format import ChunkAuth, ChunkError, ChunkUnverifiable, decode_chunk, encode_chunk
from lmcache_triton.cli import app
from lmcache_triton.config import LMCacheConfig
from lmcache_triton.storage import CpuTier, DiskTier, StorageHierarchy
from lmcache_triton.storage.builder import build_storage
from lmcache_triton.storage.disk import DiskTierError

SECRET = "correct horse battery staple"
IS_ROOT = os.geteuid() == 0
REPO = str(Path(__file__).resolve().parents[1])


def key(i: int) -> str:
    return f"{i:064x}"


def chunk(i: int, shape=(4, 16, 80), dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture
def disk(tmp_path):
    tiers = []

    def make(path=None, max_bytes=1 << 30, **kw):
        t = DiskTier(path or tmp_path / "kv", max_bytes, **kw)
        tiers.append(t)
        return t

    yield make
    for t in tiers:
        t.close()


def describe(tier, k):
    """`(dtype, shape)` from the header alone (`open_read`, no payload read), or None."""
    with tier.open_read(k) as r:
        return None if r is None else (r.dtype, r.shape)


def read_with_meta(tier, k):
    """`(tensor, meta)` through `open_read` + `read_into`, or None."""
    with tier.open_read(k) as r:
        if r is None:
            return None
        out = torch.empty(r.shape, dtype=r.dtype)
        return (out, r.meta) if r.read_into(out) else None


def read(m, k):
    """A chunk through the hierarchy's real path: prefetched when not in memory, read under a hold."""
    if not m.in_memory(k) and not m.prefetch(k):
        return None
    with m.acquire(k) as t:
        return None if t is None else t.clone()


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails (instead of hanging the suite) when it does not return."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # reported below
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"{getattr(fn, '__name__', fn)} hung for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def write_chunk(path: Path, k: str, tensor: torch.Tensor, meta=None, secret=None) -> Path:
    header, payload = encode_chunk(k, tensor, meta or {}, ChunkAuth(secret))
    f = path / f"{k}.safetensors"
    f.write_bytes(header + bytes(payload))
    return f


def raw_header(md_extra=None, info=None, key_=None) -> bytes:
    """A safetensors file with a hand-made header (8-byte length + JSON) and a 16-byte payload."""
    md = {"format": fmt.FORMAT, "key": key_ or key(1), "checksum": "xxh3_64:0", "dtype": "uint8", "shape": "16"}
    md.update(md_extra or {})
    header = {"__metadata__": md, "kv": info or {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(16)


def _len_prefixed(raw: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw + bytes(16)


# ------------------------------------------------------------------- 1: crafted headers

CRAFTED = {
    "dtype-is-a-list": raw_header(info={"dtype": ["U8"], "shape": [16], "data_offsets": [0, 16]}),
    "dtype-is-a-dict": raw_header(info={"dtype": {"a": 1}, "shape": [16], "data_offsets": [0, 16]}),
    "shape-beyond-int64": raw_header(info={"dtype": "U8", "shape": [2**70], "data_offsets": [0, 16]}),
    "shape-product-huge": raw_header(info={"dtype": "U8", "shape": [2**40] * 8, "data_offsets": [0, 16]}),
    "shape-float-inf": _len_prefixed(
        b'{"__metadata__":{"format":"lmcache_triton.kv/1","key":"%s"},"kv":{"dtype":"U8","shape":[1e400],'
        b'"data_offsets":[0,16]}}' % key(1).encode()
    ),
    "shape-bools": raw_header(info={"dtype": "U8", "shape": [True] * 16, "data_offsets": [0, 16]}),
    "shape-negative": raw_header(info={"dtype": "U8", "shape": [-16], "data_offsets": [0, -16]}),
    "deeply-nested-json": _len_prefixed(b"[" * 100_000 + b"]" * 100_000),
    "nested-in-metadata": _len_prefixed(
        b'{"__metadata__":{"format":' + b"[" * 5000 + b"]" * 5000 + b'},"kv":{}}'
    ),
    "metadata-not-strings": raw_header(md_extra={"model": {"a": [1, 2]}}),
    "metadata-is-a-list": _len_prefixed(b'{"__metadata__":[1,2],"kv":{}}'),
    "offsets-not-a-list": raw_header(info={"dtype": "U8", "shape": [16], "data_offsets": {"0": 16}}),
    "checksum-missing": _len_prefixed(
        json.dumps(
            {
                "__metadata__": {"format": fmt.FORMAT, "key": key(1), "dtype": "uint8", "shape": "16"},
                "kv": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
            }
        ).encode()
    ),
    "checksum-unknown-scheme": raw_header(md_extra={"checksum": "md5:abcd"}),
    "header-length-huge": (2**63).to_bytes(8, "little") + b"{}",
    "header-not-utf8": _len_prefixed(b'{"\xff\xfe": 1}'),
    "header-is-a-number": _len_prefixed(b"12345678"),
    "two-tensors": _len_prefixed(
        json.dumps(
            {"__metadata__": {}, "kv": {}, "other": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
        ).encode()
    ),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_header_is_a_counted_miss_and_removed(disk, tmp_path, name):
    path = tmp_path / "kv"
    path.mkdir(mode=0o700)
    bad = path / f"{key(1)}.safetensors"
    bad.write_bytes(CRAFTED[name])
    good = write_chunk(path, key(2), chunk(2))
    # Inspection first (nothing removed at open): entries / verify / open_read / get never raise.
    look = disk(path, reindex=False)
    rows = {r["key"]: r for r in look.entries()}
    assert "error" in rows[key(1)] and "error" not in rows[key(2)]
    report = look.verify()
    assert [d["file"] for d in report["damaged"]] == [bad.name] and report["ok"] == 1
    assert describe(look, key(1)) is None and bad.exists() is False  # describe judged it: removed
    bad.write_bytes(CRAFTED[name])
    assert look.get(key(1)) is None and not bad.exists()
    bad.write_bytes(CRAFTED[name])
    # Start-up: the tier starts, counts it, removes it, and serves its neighbour.
    tier = disk(path)
    assert tier.stats["corrupt"] == 1 and not bad.exists() and good.exists()
    assert tier.keys() == [key(2)] and same(tier.get(key(2)), chunk(2))


# ------------------------------------------------------------------- 2: non-regular files


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _unblock(fifo: Path) -> None:
    """Release a reader blocked on `fifo` (if a hang happened) so the thread can end."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def test_fifo_socket_and_directory_named_like_chunks_never_block(disk, tmp_path):
    path = tmp_path / "kv"
    path.mkdir(mode=0o700)
    fifo = _fifo(path / f"{key(1)}.safetensors")
    (path / f"{key(2)}.safetensors").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path / "0000000c.safetensors"))  # a short key: AF_UNIX paths are < 108 bytes
    write_chunk(path, key(4), chunk(4))
    try:
        tier = within(10, disk, path)  # start-up re-index
        assert tier.keys() == [key(4)]
        assert tier.stats["corrupt"] == 3 and tier.stats["unremovable"] == 3  # not ours to remove
        for k in (key(1), key(2), "0000000c"):
            assert within(10, tier.get, k) is None
            assert within(10, describe, tier, k) is None
            assert not within(10, tier.contains, k)
        assert tier.stats["corrupt"] == 3  # remembered: not judged (or logged) again
        assert same(tier.get(key(4)), chunk(4))
        look = disk(path, reindex=False)
        report = within(10, look.verify, True)
        assert len(report["unreadable"]) == 3 and report["removed"] == 0 and report["ok"] == 1
        assert len([r for r in within(10, look.entries) if "error" in r]) == 3
        r = within(30, CliRunner().invoke, app, ["inspect", "--disk", str(path), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["chunks"] == 1
        assert fifo.exists() and (path / f"{key(2)}.safetensors").is_dir()
    finally:
        _unblock(fifo)
        sock.close()


def test_symlink_is_never_followed(disk, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = write_chunk(outside, key(1), chunk(1))  # a valid chunk, but outside the directory
    secret_file = outside / "secret.txt"
    secret_file.write_text("not KV")
    path = tmp_path / "kv"
    path.mkdir(mode=0o700)
    (path / f"{key(1)}.safetensors").symlink_to(target)
    (path / f"{key(2)}.safetensors").symlink_to(secret_file)
    tier = disk(path)
    assert tier.keys() == [] and tier.stats["corrupt"] == 2
    assert not (path / f"{key(1)}.safetensors").is_symlink()  # the link is removed ...
    assert target.exists() and secret_file.read_text() == "not KV"  # ... never its target
    (path / f"{key(1)}.safetensors").symlink_to(target)
    assert tier.get(key(1)) is None and target.exists()


# ------------------------------------------------------------ 3: private by default, auth


def test_new_directory_and_files_are_private(disk, tmp_path):
    old = os.umask(0o022)
    try:
        tier = disk(tmp_path / "new" / "kv")
        tier.put(key(1), chunk(1))
        assert tier.flush(10)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tier.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tier.path / f"{key(1)}.safetensors").st_mode) == 0o600


def test_unsafe_directory_refused_without_secret(disk, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DiskTierError, match="writable by all users.*chunk_secret"):
        DiskTier(shared, 1 << 20)
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.storage.disk"):
        tier = disk(shared, secret=SECRET)  # authenticated chunks: allowed, loudly
    assert any("writable by all users" in r.getMessage() for r in caplog.records)
    tier.put(key(1), chunk(1))
    assert tier.flush(10) and same(tier.get(key(1)), chunk(1))
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.storage.disk"):
        disk(group)
    assert any("group-writable" in r.getMessage() for r in caplog.records)
    # The server's factory: one error line naming local_disk; the CPU tier keeps working.
    cfg = LMCacheConfig(local_disk=str(shared), max_local_disk_size=0.01, max_local_cpu_size=0.01)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        m = build_storage(cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert m.tier("disk") is None and len(errors) == 1 and "local_disk" in errors[0] and str(shared) in errors[0]
    assert m.put(key(2), chunk(2)) and same(read(m, key(2)), chunk(2))


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_directory_owned_by_another_user_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(DiskTierError, match="owned by uid 65534"):
        DiskTier(other, 1 << 20)


def test_authenticated_chunks(disk, tmp_path):
    path = tmp_path / "kv"
    signed = disk(path, secret=SECRET)
    signed.put(key(1), chunk(1), {"model": "m"})
    assert signed.flush(10)
    f = path / f"{key(1)}.safetensors"
    md = safetensors.safe_open(f, "pt").metadata()
    assert md["checksum"].startswith("blake3-mac:") and SECRET not in f.read_bytes().decode("latin1")
    assert same(signed.get(key(1)), chunk(1))
    # Without the secret, or with another one: a miss, the file left for its owner.
    for other in (None, "another secret of 16+ chars"):
        t = disk(path, secret=other)
        assert not t.contains(key(1)) and t.get(key(1)) is None
        assert t.stats["unauthenticated"] >= 1 and t.stats["corrupt"] == 0 and f.exists()
    # Unsigned chunks planted by someone without the secret are never used by a signed tier.
    write_chunk(path, key(2), chunk(2))
    assert signed.get(key(2)) is None and signed.stats["unauthenticated"] == 1
    # A forgery claiming our key id (payload changed, MAC kept; or a MAC guessed) is corrupt.
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    assert signed.get(key(1)) is None and signed.stats["corrupt"] == 1 and not f.exists()
    header, payload = encode_chunk(key(3), chunk(3), {"model": "m"}, ChunkAuth(SECRET))
    forged = header.replace(b'"model":"m"', b'"model":"x"')  # same length: only the MAC catches it
    (path / f"{key(3)}.safetensors").write_bytes(forged + bytes(payload))
    assert signed.get(key(3)) is None and signed.stats["corrupt"] == 2
    # A valid signed chunk copied under another key's name: its header names its own key.
    signed.put(key(4), chunk(4))
    assert signed.flush(10)
    shutil.copy(path / f"{key(4)}.safetensors", path / f"{key(5)}.safetensors")
    assert signed.get(key(5)) is None and same(signed.get(key(4)), chunk(4))


def test_chunk_format_functions_work_without_files():
    auth = ChunkAuth(SECRET)
    header, payload = encode_chunk(key(7), chunk(7), {"model": "m"}, auth)
    blob = header + bytes(payload)
    t, md = decode_chunk(key(7), blob, auth, expect={"model": "m"})
    assert same(t, chunk(7)) and md["model"] == "m"
    out = torch.empty(4, 16, 80, dtype=torch.bfloat16)
    assert decode_chunk(key(7), blob, auth, out=out)[0] is out and same(out, chunk(7))
    with pytest.raises(ChunkUnverifiable):
        decode_chunk(key(7), blob, ChunkAuth(None))
    with pytest.raises(ChunkError, match="MAC"):
        decode_chunk(key(7), blob[:-1] + bytes([blob[-1] ^ 1]), auth)
    with pytest.raises(ChunkError, match="key"):
        decode_chunk(key(8), blob, auth)
    with pytest.raises(ChunkError, match="expected 'x'"):
        decode_chunk(key(7), blob, auth, expect={"model": "x"})
    with pytest.raises(ValueError, match="out"):
        decode_chunk(key(7), blob, auth, out=torch.empty(3, dtype=torch.bfloat16))
    assert "correct" not in repr(auth)


# ------------------------------------------- 5: unwritable directory, unremovable bad file


def _remount_ro(path: Path) -> bool:
    return subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def ro_capable(tmp_path):
    """A directory that can be made read-only under a running tier: a tmpfs remounted ro when
    root can mount one, else chmod 0500 (which stops a non-root user)."""
    path = tmp_path / "ro"
    path.mkdir()
    mounted = IS_ROOT and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    if not mounted and IS_ROOT:
        pytest.skip("root without a tmpfs mount: chmod cannot make a directory read-only for root")
    path.chmod(0o700)

    def make_ro():
        if mounted:
            assert _remount_ro(path)
        else:
            path.chmod(0o500)

    yield path, make_ro
    if mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o700)


def test_unwritable_directory_and_unremovable_bad_file(disk, ro_capable, caplog):
    path, make_ro = ro_capable
    tier = disk(path)
    for i in range(2):
        tier.put(key(i), chunk(i))
    assert tier.flush(10)
    raw = bytearray((path / f"{key(0)}.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (path / f"{key(0)}.safetensors").write_bytes(bytes(raw))
    make_ro()
    # Under the now read-only directory: a clear error naming local_disk; the worker goes on
    # with its CPU tier only.
    with pytest.raises(DiskTierError, match=r"local_disk .*/sub': cannot create the directory"):
        DiskTier(path / "sub", 1 << 20)
    cfg = LMCacheConfig(local_disk=str(path / "sub"), max_local_disk_size=0.01, max_local_cpu_size=0.01)
    with caplog.at_level(logging.ERROR):
        m = build_storage(cfg)
    assert m.tier("disk") is None and m.memory_bound > 0
    assert len([r for r in caplog.records if "local_disk" in r.getMessage()]) == 1
    # Start-up on the read-only directory itself: one error line naming local_disk and what is
    # wrong; what is there is still served (verified), every write attempt is a counted error.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="lmcache_triton.storage.disk"):
        ro = disk(path)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "local_disk" in lines[0] and "not writable" in lines[0], lines
    assert not ro.writable and same(ro.get(key(1)), chunk(1))
    ro.put(key(7), chunk(7))
    assert ro.flush(10) and ro.stats["write_errors"] == 1 and ro.stats["writes"] == 0
    # The running tier: the damaged file cannot be removed; it is remembered, not re-read.
    assert tier.get(key(0)) is None
    s = tier.stats
    assert s["corrupt"] == 1 and s["unremovable"] == 1 and (path / f"{key(0)}.safetensors").exists()
    for _ in range(3):
        assert tier.get(key(0)) is None and not tier.contains(key(0))
    assert tier.stats["corrupt"] == 1 and tier.stats["errors"] == 1
    assert same(tier.get(key(1)), chunk(1))
    # Every failed write is a counted store error.
    for i in (5, 6):
        tier.put(key(i), chunk(i))
    assert tier.flush(10)
    s = tier.stats
    assert s["write_errors"] == 2 and s["writes"] == 2 and not tier.contains(key(5))


def test_local_disk_that_is_a_file_is_a_clear_error(tmp_path, caplog):
    f = tmp_path / "file"
    f.write_text("x")
    for where in (f, f / "kv"):
        with pytest.raises(DiskTierError, match=r"^local_disk '.*': is not a directory$"):
            DiskTier(where, 1 << 20)
    cfg = LMCacheConfig(local_disk=str(f / "kv"), max_local_disk_size=0.01, max_local_cpu_size=0.01)
    with caplog.at_level(logging.ERROR):
        m = build_storage(cfg)  # the worker: one error line, no raw FileExistsError
    assert m.tier("disk") is None and m.memory_bound > 0
    assert len([r for r in caplog.records if "local_disk" in r.getMessage()]) == 1


# ------------------------------------------------------- 6: clear next to foreign files


def _foreign_neighbours(path: Path) -> list[Path]:
    foreign = path / "cafebabe.safetensors"
    safetensors.torch.save_file({"kv": torch.zeros(3)}, foreign)
    (path / f"{key(9)}.safetensors").mkdir()  # a directory named like a chunk
    (path / f"{key(8)}.safetensors").write_bytes(b"someone else's file")
    (path / "notes.txt").write_text("not ours")
    return [foreign, path / f"{key(9)}.safetensors", path / f"{key(8)}.safetensors", path / "notes.txt"]


def test_clear_removes_only_our_files(disk, tmp_path):
    path = tmp_path / "kv"
    tier = disk(path)
    for i in range(3):
        tier.put(key(i), chunk(i))
    assert tier.flush(10)
    raw = bytearray((path / f"{key(2)}.safetensors").read_bytes())
    (path / f"{key(2)}.safetensors").write_bytes(bytes(raw[:-5]))  # ours, truncated: still ours
    write_chunk(path, key(3), chunk(3), secret="some other secret, 16+")  # ours, other secret
    others = _foreign_neighbours(path)
    r = CliRunner().invoke(app, ["clear", "--disk", str(path), "--yes"])
    assert r.exit_code == 0, r.output
    assert "removed 4 chunk files" in r.output
    assert not any((path / f"{key(i)}.safetensors").exists() for i in range(4))
    assert all(p.exists() for p in others)
    # Eviction and DiskTier.clear() touch only indexed files (headers checked as ours). A file
    # named like a chunk whose header is not ours is, by contrast, removed when the serving tier
    # opens it (start-up or get): it sits in the tier's namespace and is a counted miss (item 1).
    tier2 = disk(path, max_bytes=1500)  # about 3 of the small chunks below
    assert not others[0].exists() and not others[2].exists()
    assert tier2.stats["corrupt"] == 3 and tier2.stats["unremovable"] == 1  # the directory: left
    for i in range(10, 16):
        tier2.put(key(i), chunk(i, (64,)))
        assert tier2.flush(10)
    assert tier2.stats["evictions"] >= 1
    tier2.clear()
    assert others[1].is_dir() and others[3].read_text() == "not ours" and not tier2.keys()


# ------------------------------------------- 7: verify --fix on unreadable / undeletable


def _unprivileged(cmd: list[str]) -> list[str]:
    """Run `cmd` without root's override of file permissions (capsh drops it), so EACCES is real."""
    if not IS_ROOT:
        return cmd
    if shutil.which("capsh") is None:
        pytest.skip("running as root without capsh: root reads any file, EACCES cannot happen")
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", " ".join(cmd)]


def test_verify_fix_unreadable_is_not_damage(disk, tmp_path):
    path = tmp_path / "kv"
    tier = disk(path)
    for i in range(3):
        tier.put(key(i), chunk(i))
    assert tier.flush(10)
    tier.close()
    locked = path / f"{key(0)}.safetensors"
    locked.chmod(0o000)  # intact but unreadable
    damaged = path / f"{key(1)}.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    path.chmod(0o500)  # and nothing can be deleted
    env = {**os.environ, "PYTHONPATH": REPO}
    env = {k: v for k, v in env.items() if not k.startswith("LMCACHE_")} | {"COLUMNS": "400"}
    cmd = _unprivileged([sys.executable, "-m", "lmcache_triton.cli", "verify", "--fix", "--disk", str(path)])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    finally:
        path.chmod(0o700)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"unreadable: {locked.name} (Permission denied) - left in place" in out
    assert "1 damaged, 0 removed, 1 unreadable" in out and "could not be removed" in out
    assert locked.exists() and damaged.exists()
    locked.chmod(0o600)
    assert same(DiskTier(path, 1 << 30, reindex=False).get(key(0)), chunk(0))


# ------------------------------------------------------------------- 8: manager errors


def test_hierarchy_error_paths_release_and_take_nothing(disk):
    m = StorageHierarchy(CpuTier(1 << 20, pin_memory=False), [disk()])
    refused = [torch.uint16] + ([torch.float8_e4m3fnuz] if hasattr(torch, "float8_e4m3fnuz") else [])
    for bad_dtype in refused:
        with pytest.raises(ValueError, match="no safetensors code"):
            m.put(key(1), torch.zeros(8, dtype=bad_dtype))
    with pytest.raises(ValueError, match="reserved"):
        m.put(key(2), chunk(2), {"checksum": "x"})
    with pytest.raises(ValueError, match="lower-case hex"):
        m.put("not-a-hex-key", chunk(2))  # the CPU tier takes it, the disk refuses the key
    assert m.cpu.stats["held"] == 0 and not m.in_memory(key(1)) and not m.in_memory(key(2))
    m.put(key(3), chunk(3))
    assert m.flush(10)
    m.cpu.clear()
    assert same(read(m, key(3)), chunk(3))  # from disk, read once into the CPU tier
    assert m.cpu.stats["held"] == 0 and m.store_errors() == 0
    m.close()


# ------------------------------------------------------------------------------- fuzz

FUZZ_ROUNDS = 5000


def _mutations(rng: random.Random, good: bytes, unsigned: bytes, other: bytes) -> bytes:
    hlen = int.from_bytes(good[:8], "little")
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 512))
    if kind == 1:  # flip bytes anywhere
        b = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # flip bytes in the header
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(8 + hlen)] = rng.randrange(256)
        return bytes(b)
    if kind == 3:  # truncate or extend
        n = rng.randrange(len(good) + 64)
        return good[:n] if n < len(good) else good + rng.randbytes(n - len(good))
    if kind == 4:  # a JSON value replaced by a random one
        header = json.loads(good[8 : 8 + hlen])
        values = [None, True, -1, 2**70, 1e308, "x" * 300, [], [[[[1]]]], {"a": {"b": []}}, [1] * 20, "BF16"]
        section = rng.choice(["__metadata__", "kv", None])
        if section is None:
            header[rng.choice(["__metadata__", "kv", "extra"])] = rng.choice(values)
        else:
            field = rng.choice(list(header[section]) + ["new"])
            header[section][field] = rng.choice(values)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + good[8 + hlen :]
    if kind == 5:  # header length field lies
        return rng.randrange(2**64).to_bytes(8, "little") + good[8:]
    if kind == 6:
        return unsigned
    if kind == 7:
        return other
    return good[: 8 + hlen] + rng.randbytes(len(good) - 8 - hlen)  # payload swapped


@pytest.mark.timeout(300)
def test_fuzz_random_and_mutated_files(disk, tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "kv"
    path.mkdir(mode=0o700)
    auth = ChunkAuth(SECRET)
    n_keys = 8
    originals, blobs = {}, {}
    for i in range(n_keys):
        t = chunk(i, (rng.randrange(1, 5), 7, 3), rng.choice([torch.bfloat16, torch.float32, torch.uint8]))
        originals[key(i)] = t
        header, payload = encode_chunk(key(i), t, {"model": "m"}, auth)
        blobs[key(i)] = (
            header + bytes(payload),
            b"".join(map(bytes, encode_chunk(key(i), t, {"model": "m"}, ChunkAuth(None)))),
            b"".join(map(bytes, encode_chunk(key(i), t, {"model": "m"}, ChunkAuth("another secret, long")))),
        )
    tier = disk(path, secret=SECRET)
    returned = corrupt = unauthenticated = 0
    for rnd in range(FUZZ_ROUNDS):
        k = key(rng.randrange(n_keys))
        good, unsigned, other = blobs[k]
        data = good if rng.random() < 0.1 else _mutations(rng, good, unsigned, other)
        (path / f"{k}.safetensors").write_bytes(data)
        # In memory (the network tiers' path): only ChunkError / ChunkUnverifiable escape.
        try:
            t, md = decode_chunk(k, data, auth, expect={"model": "m"})
            assert same(t, originals[k]) and md["model"] == "m"
        except (ChunkError, ChunkUnverifiable):
            pass
        # On disk: get / open_read / contains / get(out=) never raise and return only originals.
        op = rng.randrange(4)
        if op == 0:
            got = tier.get(k, expect={"model": "m"})
        elif op == 1:
            got = None
            info = describe(tier, k)
            assert info is None or info == (originals[k].dtype, tuple(originals[k].shape))
            tier.contains(k)
        elif op == 2:
            got = tier.get(k, out=torch.empty_like(originals[k]))
        else:
            got = read_with_meta(tier, k)
            if got is not None:
                assert got[1]["model"] == "m"
                got = got[0]
        if got is not None:
            returned += 1
            assert same(got, originals[k]), f"round {rnd}: a damaged or forged chunk was returned"
        if rnd % 500 == 499:  # restart on whatever is there, and run the tools over it
            tier.close()
            corrupt += tier.stats["corrupt"]
            unauthenticated += tier.stats["unauthenticated"]
            tier = disk(path, secret=SECRET)
            indexed = tier.keys()
            for kk in indexed:  # indexed from headers: a damaged payload is still a miss
                got = tier.get(kk)
                assert got is None or same(got, originals[kk])
            look = disk(path, reindex=False, secret=SECRET)
            look.entries()
            look.verify(fix=rng.random() < 0.5)
            look.clear_files()
            look.close()
    assert returned > 0  # the valid files did come back
    assert corrupt > FUZZ_ROUNDS // 4 and unauthenticated > 0  # the tier did see and refuse them
