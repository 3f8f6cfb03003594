"""tests/aot_jobs.py, the background compile of the whole suite: a job runs at the lowest
priority until the test waits for it, then at the normal one, and its output and exit status
reach the test. A stand-in script replaces aot_compile.py (the compile itself is
test_aot_compile's)."""

from __future__ import annotations

import os
import threading
import time

import aot_jobs

STAND_IN = """
import os, sys, time
def state():
    return f"{os.sched_getscheduler(0)} {os.getpriority(os.PRIO_PROCESS, 0)}"
print("start", state(), flush=True)
go = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go")
while not os.path.exists(go):
    time.sleep(0.05)
print("end", state(), sys.argv[1], flush=True)
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


def test_a_job_runs_idle_until_collected_then_normal(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    root = tmp_path / "jobs"
    procs = aot_jobs.start_background(root, script, archs=(7,), shards=1)
    try:
        out = root / "sm_7" / "0" / "out"
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        assert out.read_text().split() == ["start", str(os.SCHED_IDLE), "19"]
        assert not (root / "sm_7" / "0" / "rc").exists()  # still running: the test waits for it

        got: list[aot_jobs.Result] = []
        waiter = threading.Thread(target=lambda: got.append(aot_jobs.collect(7, root)))
        waiter.start()
        if os.geteuid() == 0:  # raising a priority back needs root (CAP_SYS_NICE)
            pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_stand_in(int(p), script))
            while os.sched_getscheduler(pid) != os.SCHED_OTHER:
                assert time.monotonic() < deadline, "collect() did not restore the normal priority"
                time.sleep(0.05)
        (tmp_path / "go").write_text("")
        waiter.join(60)
        (r,) = got
        assert r.returncode == 3
        assert r.stderr == "to stderr\n"
        if os.geteuid() == 0:
            assert r.stdout.splitlines()[1].split() == ["end", str(os.SCHED_OTHER), "0", "7"]
    finally:
        aot_jobs.stop_background(procs, root)
    assert not root.exists()


def _is_stand_in(pid: int, script) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(script).encode() in f.read().split(b"\0")[:2]
    except OSError:
        return False


def test_stopping_kills_a_running_job(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)  # never told to go
    root = tmp_path / "jobs"
    procs = aot_jobs.start_background(root, script, archs=(7,), shards=1)
    pgid = procs[0].pid
    aot_jobs.stop_background(procs, root)
    deadline = time.monotonic() + 30  # sh is reaped; its python child, killed too, by init
    while _group_alive(pgid):
        assert time.monotonic() < deadline, "a process of the job outlived stop_background"
        time.sleep(0.05)
    assert not root.exists()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


SHARD_STAND_IN = """
import os, sys
arch, flag, claims = sys.argv[1:4]
assert flag == "--claims" and os.path.basename(claims) == "claims", sys.argv
shard = os.path.basename(os.path.dirname(os.environ["TRITON_CACHE_DIR"]))  # sm_ARCH/I/cache
for case in range(10):  # what aot_compile.py does: compile the cases no other job claimed
    try:
        os.close(os.open(os.path.join(claims, str(case)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        continue
    print("ok", arch, case, flush=True)
print("shard", shard)
sys.exit(5 if shard == "1" else 0)
"""


def test_an_arch_is_compiled_by_its_shards_and_collected_as_one(tmp_path):
    """Each arch runs as `shards` processes sharing one claims directory per arch (`--claims`):
    every case compiles once, in one of them; collect() waits for all of them and returns every
    shard's output, failing with the first failing shard's status."""
    script = tmp_path / "stand_in.py"
    script.write_text(SHARD_STAND_IN)
    root = tmp_path / "jobs"
    procs = aot_jobs.start_background(root, script, archs=(7, 8), shards=3)
    try:
        assert len(procs) == 6
        r7, r8 = aot_jobs.collect(7, root), aot_jobs.collect(8, root)
        for arch, r in ((7, r7), (8, r8)):
            lines = r.stdout.splitlines()
            assert sorted(ln for ln in lines if ln.startswith("ok")) == sorted(f"ok {arch} {c}" for c in range(10))
            assert [ln for ln in lines if ln.startswith("shard")] == ["shard 0", "shard 1", "shard 2"]
            assert r.returncode == 5  # shard 1 failed: the arch fails, whatever the others did
    finally:
        aot_jobs.stop_background(procs, root)
