"""The ahead-of-time compile of tests/aot_compile.py as jobs: `SHARDS` processes per arch, each
into its own fresh Triton cache (every kernel really compiles, every run; nothing persists
between runs).

`run(arch)` compiles in the calling test, as test_aot_compile always did when run alone. For the
whole suite the conftest calls `start_background()` before pytest-xdist starts its workers: the
three archs then compile beside the suite, each shared by `SHARDS` processes that claim its
kernels one at a time (so the end of a run can use both cores to the last kernel), in a
session (so an autogroup) of their own at the lowest priority (autogroup nice 19, nice 19,
SCHED_IDLE), so they take only CPU the suite leaves idle (engines
and servers starting up, waits, sleeps, the end of the run when one worker has nothing left).
The test, ordered last, `collect()`s each arch's output and makes the same assertions; when it
starts waiting it gives the jobs back the normal priority, so other load on the machine cannot
starve them past its timeout. The compile is the same work either way (~80 CPU-s per arch on
the 2-core machine, nearly all of it LLVM and ptxas: 129 kernels, 127 distinct PTX); in the
background it fills gaps instead of holding one worker for 5-9 minutes.
`LMCT_TEST_AOT_BACKGROUND=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "aot_compile.py"
ARCHS = (80, 90, 100)
SHARDS = 2  # processes per arch: at the end of a run two can use both cores, where one used one
DIR_ENV = "LMCT_TEST_AOT_DIR"  # the background jobs' directory, for the workers
SWITCH_ENV = "LMCT_TEST_AOT_BACKGROUND"  # "0": compile in the test, as before
TIMEOUT_S = 600  # one arch's compile, once the test waits for it


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite's interpreter
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(cache)  # a fresh cache: every kernel really compiles
    return env


def run(arch: int, root: Path) -> Result:
    """Compile for `arch` here and now (into a fresh cache under `root`)."""
    r = subprocess.run([sys.executable, str(SCRIPT), str(arch)], env=_env(root / "cache"),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(r.returncode, r.stdout, r.stderr)


def _lowest_priority() -> None:
    """In the child before exec: a session of its own, so its own autogroup (with the kernel's
    autogroups, nice only orders tasks within a group), that group at nice 19, the process at
    nice 19 and SCHED_IDLE. Each step is best effort: a kernel without one still runs the job."""
    os.setsid()
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write("19")
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def start_background(root: Path, script: Path = SCRIPT, archs: tuple[int, ...] = ARCHS,
                     shards: int = SHARDS) -> list[subprocess.Popen]:
    """Start `shards` low-priority jobs (`script ARCH --claims sm_ARCH/claims`) per arch under
    `root` (`sm_ARCH/I/`): the jobs of an arch share its list of kernels, each compiling the
    next one no other has claimed, so they end within one compile of each other (a fixed split
    left one core idle for the last ~20 s). Each writes out, err and, when done, rc (its exit
    status)."""
    procs = []
    for arch in archs:
        claims = root / f"sm_{arch}" / "claims"
        claims.mkdir(parents=True)
        for i in range(shards):
            d = root / f"sm_{arch}" / str(i)
            d.mkdir(parents=True)
            # sh writes rc only after the job has exited: rc present = the output is complete.
            cmd = ["/bin/sh", "-c",
                   f'"$@" >"{d}/out" 2>"{d}/err"; echo $? >"{d}/rc.part"; mv "{d}/rc.part" "{d}/rc"',
                   "sh", sys.executable, str(script), str(arch), "--claims", str(claims)]
            p = subprocess.Popen(cmd, env=_env(d / "cache"), stdin=subprocess.DEVNULL, preexec_fn=_lowest_priority)
            (d / "pgid").write_text(str(p.pid))  # its own session: process group = its pid
            procs.append(p)
    return procs


def _normal_priority(root: Path) -> None:
    """Once the test waits, the jobs are the suite's work that is left: give every process of
    them back the normal priority (SCHED_OTHER, nice 0, their autogroup at 0), so a machine busy
    with other work cannot starve them past the test's timeout. Raising a priority needs root
    (CAP_SYS_NICE); without it they stay low, and the waiting worker's idle core is theirs."""
    groups = {int(f.read_text()) for f in root.glob("sm_*/*/pgid")}
    for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
        try:
            if os.getpgid(pid) not in groups:
                continue
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, pid, 0)
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write("0")
        except (OSError, AttributeError):
            continue


def stop_background(procs: list[subprocess.Popen], root: Path) -> None:
    """Kill what is still running (a run stopped early, the test deselected) and clean up."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the job's session: sh, python, ptxas
        p.wait()
    shutil.rmtree(root, ignore_errors=True)


def background_root() -> Path | None:
    d = os.environ.get(DIR_ENV)
    return Path(d) if d else None


def collect(arch: int, root: Path) -> Result:
    """The background jobs' result for `arch`, waiting for every shard (up to TIMEOUT_S): the
    first failing shard's exit status (else 0), their outputs one after another."""
    shards = sorted((d for d in (root / f"sm_{arch}").iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    if not shards:
        raise AssertionError(f"sm_{arch}: no background compile was started under {root}")
    _normal_priority(root)
    deadline = time.monotonic() + TIMEOUT_S
    for d in shards:
        while not (d / "rc").exists():
            if time.monotonic() > deadline:
                out = (d / "out").read_text() if (d / "out").exists() else ""
                raise AssertionError(f"sm_{arch} shard {d.name}: the background compile did not end in "
                                     f"{TIMEOUT_S} s:\n{out[-2000:]}")
            time.sleep(0.5)
    codes = [int((d / "rc").read_text()) for d in shards]
    return Result(next((c for c in codes if c), 0), "".join((d / "out").read_text() for d in shards),
                  "".join((d / "err").read_text() for d in shards))


def new_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lmct-aot-"))
