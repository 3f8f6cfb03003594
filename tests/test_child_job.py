"""`child_job.run_child`, the launcher of `warm`'s and `calibrate`'s engine child, on a small
module instead of an engine (the e2e modules fork that child from the suite's fork server, so
the launcher itself is checked here): JSON progress lines reach `on_progress` as they come,
other lines are skipped, stderr goes to the log and the exit code comes back."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from lmcache_triton.child_job import log_tail, run_child

CHILD = textwrap.dedent("""
    import json, sys, time
    job = json.load(open(sys.argv[1]))
    print(json.dumps({"done": 0}), flush=True)
    print("a library's print", flush=True)
    print(json.dumps([1, 2]), flush=True)
    print(json.dumps({"done": 1, "n": job["n"]}), flush=True)
    print("engine log line", file=sys.stderr)
    time.sleep(job.get("sleep", 0))
    sys.exit(job.get("rc", 0))
""")


@pytest.fixture
def child_module(tmp_path, monkeypatch):
    (tmp_path / "lmct_child_job_probe.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}")
    return "lmct_child_job_probe"


def test_progress_lines_log_and_exit_code(child_module, tmp_path):
    seen = []
    log = tmp_path / "child.log"
    rc, last = run_child(child_module, {"n": 7, "rc": 3}, tmp_path / "job.json", log, seen.append)
    assert rc == 3
    assert seen == [{"done": 0}, {"done": 1, "n": 7}], "dict lines only, in order"
    assert last == {"done": 1, "n": 7}
    assert json.loads((tmp_path / "job.json").read_text()) == {"n": 7, "rc": 3}
    assert log_tail(log, rc) == "engine log line"



def test_timeout_bounds_a_child_that_hangs_with_its_stdout_open(child_module, tmp_path):
    # The child prints its progress, then sleeps with stdout still open: reading its stdout to
    # the end would wait the full minute. The timeout kills it and raises.
    seen = []
    with pytest.raises(subprocess.TimeoutExpired):
        run_child(child_module, {"n": 1, "sleep": 60}, tmp_path / "job.json", tmp_path / "c.log", seen.append,
                  timeout=2)  # fmt: skip
    assert seen[-1] == {"done": 1, "n": 1}, "progress printed before the hang still arrived"


def test_a_child_within_its_timeout_returns_normally(child_module, tmp_path):
    rc, last = run_child(child_module, {"n": 2, "sleep": 0}, tmp_path / "job.json", tmp_path / "c.log", timeout=60)
    assert (rc, last) == (0, {"done": 1, "n": 2})
