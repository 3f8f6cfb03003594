"""The test suite's fork server (lmcache_triton/testing/fork_server.py), without vLLM: a server
that preloads only `json` runs small scripts (`runner.main(["--script", ...])`).

What the suite relies on: each job is a new process (its own pid, the job's environment), a
long-lived child (an `EngineProcess`) does not hold up the next job, a job that runs too long is
killed, a job with other import-time variables is refused, and closing the server leaves no
child behind."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from lmcache_triton.testing.fork_server import FORKED_ENV, ForkServer

SCRIPT = """
import json, os, sys, time
from pathlib import Path
out, wait_for = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None
out.write_text(json.dumps({"pid": os.getpid(), "forked": os.environ.get("FORKED_ENV"), "x": os.environ.get("X"),
                           "cwd": os.getcwd()}))
print("to stdout"); print("to stderr", file=sys.stderr)
while wait_for and not Path(wait_for).exists():
    time.sleep(0.05)
sys.exit(int(os.environ.get("RC", "0")))
""".replace("FORKED_ENV", FORKED_ENV)


@pytest.fixture
def server(tmp_path):
    s = ForkServer(dict(os.environ), log_path=str(tmp_path / "server.log"), preload=["json"])
    yield s
    s.close()


@pytest.fixture
def script(tmp_path):
    p = tmp_path / "job.py"
    p.write_text(SCRIPT)
    return str(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended


def test_each_job_is_a_new_process_with_the_jobs_environment(server, script, tmp_path):
    import json

    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    for i, out in enumerate(outs):
        rc, stderr = server.run(["--script", script, str(out)], {**os.environ, "X": str(i), "RC": str(i)}, 60)
        assert rc == i and "to stderr" in stderr and "to stdout" not in stderr
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["pid"] != b["pid"] != os.getpid()
    assert (a["x"], b["x"]) == ("0", "1")
    assert a["forked"] == str(a["pid"]), "the child is marked as forked (runner.process_origin)"
    assert a["cwd"] == os.getcwd()


def test_one_log_file_for_stdout_and_stderr(server, script, tmp_path):
    log = tmp_path / "job.log"
    rc, text = server.run(["--script", script, str(tmp_path / "o.json")], dict(os.environ), 60, str(log), str(log))
    assert rc == 0
    assert "to stdout" in log.read_text() and "to stderr" in log.read_text() and "to stdout" in text


def test_a_long_lived_child_does_not_hold_up_the_next_job(server, script, tmp_path):
    import json

    release = tmp_path / "release"
    log = str(tmp_path / "long.log")
    job, pid = server.start(["--script", script, str(tmp_path / "long.json"), str(release)], dict(os.environ),
                            log, log)  # fmt: skip
    rc, _ = server.run(["--script", script, str(tmp_path / "short.json")], dict(os.environ), 60)
    assert rc == 0 and json.loads((tmp_path / "short.json").read_text())["pid"] != pid
    assert server.ended(job) is None and _pid_alive(pid), "the long job still runs"
    release.write_text("")
    assert server.wait(job, 60) == 0


def test_a_job_past_its_timeout_is_killed(server, script, tmp_path):
    never = tmp_path / "never"
    with pytest.raises(subprocess.TimeoutExpired):
        server.run(["--script", script, str(tmp_path / "o.json"), str(never)], dict(os.environ), 2)
    import json

    pid = json.loads((tmp_path / "o.json").read_text())["pid"]
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(pid)
    assert server.broken, "a server whose job timed out is not used again"


def test_other_import_time_variables_are_refused(server):
    assert server.accepts(dict(os.environ))
    assert not server.accepts({**os.environ, "PYTHONPATH": "/elsewhere"})
    assert not server.accepts({**os.environ, "TRITON_INTERPRET": "0"})
    assert server.accepts({**os.environ, "TMPDIR": "/elsewhere"}), "read later, not at import"


def test_close_kills_children_still_running(server, script, tmp_path):
    log = str(tmp_path / "long.log")
    _, pid = server.start(["--script", script, str(tmp_path / "o.json"), str(tmp_path / "never")],
                          dict(os.environ), log, log)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (tmp_path / "o.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.close()
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(pid)


@pytest.mark.skipif(__import__("sys").version_info < (3, 11), reason="python -P needs Python 3.11+")
def test_children_import_the_package_from_pythonpath_not_the_working_directory(tmp_path):
    """A benchmark's `--before DIR` puts DIR on the children's PYTHONPATH while it stands in this
    checkout: the children must import DIR's package. `python -m`/`-c` put the working directory
    first on sys.path; the runner's `PYTHON` (`-P`) does not."""
    from lmcache_triton.testing.runner import PYTHON

    older = tmp_path / "older" / "lmcache_triton"
    older.mkdir(parents=True)
    (older / "__init__.py").write_text("WHICH = 'older'\n")
    here = tmp_path / "here" / "lmcache_triton"
    here.mkdir(parents=True)
    (here / "__init__.py").write_text("WHICH = 'the working directory'\n")
    env = dict(os.environ, PYTHONPATH=str(older.parent))
    code = "import lmcache_triton; print(lmcache_triton.WHICH)"
    out = subprocess.run([*PYTHON, "-c", code], cwd=here.parent, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "older"
    plain = subprocess.run([PYTHON[0], "-c", code], cwd=here.parent, env=env,
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "the working directory", "without -P the working directory wins (the bug)"
