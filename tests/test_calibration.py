"""The quality guard's records and decision (lmcache_triton/calibration/), without an engine.

The end-to-end path (a real calibration run, then a server that uses or refuses the codec) is
tests/test_e2e_calibrate.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest

from lmcache_triton.calibration import (
    Identity,
    Metrics,
    Record,
    RecordError,
    Thresholds,
    calibration_namespace,
    decide,
    guard_codecs,
    read_record,
    write_record,
)
from lmcache_triton.calibration.measure import (
    Generation,
    PromptSetError,
    builtin_prompts,
    compare,
    is_correct,
    read_prompt_set,
)
from lmcache_triton.calibration.record import record_name
from lmcache_triton.config import ConfigError, load_config

IDENTITY = Identity(
    "/models/m", "0123456789abcdef0123456789abcdef-q:none", "bfloat16/auto", "rows-FullAttentionSpec-h8-d128-bfloat16"
)
OTHER_WEIGHTS = dataclasses.replace(IDENTITY, producer="fedcba9876543210fedcba9876543210-q:none")
GOOD = Metrics(prompts=16, tokens=512, loaded_tokens=3700, top1_agreement=0.998, mean_logprob_dev=0.002,
               max_logprob_dev=0.05, sequences_equal=0.94)  # fmt: skip
STRICT = Thresholds()


def _record(identity: Identity = IDENTITY, codec: str = "int8", metrics: Metrics = GOOD) -> Record:
    return Record(identity, codec, metrics, STRICT, passed=not STRICT.failures(metrics), chunk_size=64)


def _decide(tmp_path, asked, thresholds=STRICT, **kw):
    return {c.tier: c for c in decide(asked, IDENTITY, tmp_path, thresholds, **kw)}


# ------------------------------------------------------------------------------------ record


def test_record_round_trip(tmp_path):
    path = write_record(tmp_path, _record())
    assert path.name == f"{calibration_namespace(IDENTITY)}-int8.json"
    rec = read_record(path, calibration_namespace(IDENTITY), "int8")
    assert rec.identity == IDENTITY and rec.codec == "int8" and rec.metrics == GOOD and rec.passed
    assert rec.thresholds == STRICT and rec.chunk_size == 64
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_namespace_follows_the_weights_dtype_and_row_shape():
    base = calibration_namespace(IDENTITY)
    assert len(base) == 32 and base == calibration_namespace(Identity(**dataclasses.asdict(IDENTITY)))
    for field, value in [("producer", OTHER_WEIGHTS.producer), ("kv_dtype", "float32/auto"),
                         ("layout", "rows-FullAttentionSpec-h8-d64-bfloat16"), ("model", "/models/other")]:  # fmt: skip
        assert calibration_namespace(dataclasses.replace(IDENTITY, **{field: value})) != base, field


def test_identity_from_the_connectors_key_meta():
    meta = {"model": "/m", "producer": "p", "kv_dtype": "float32/auto", "layout": "rows-x", "chunk_size": "256",
            "world_size": "1"}  # fmt: skip
    assert Identity.from_key_meta(meta) == Identity("/m", "p", "float32/auto", "rows-x")


def _edit(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda o: o["metrics"].update(top1_agreement=1.0), id="metric-edited"),
        pytest.param(lambda o: o["thresholds"].update(min_top1=0.5), id="threshold-edited"),
        pytest.param(lambda o: o.update(codec="int4"), id="codec-edited"),
        pytest.param(lambda o: o.pop("checksum"), id="no-checksum"),
    ],
)
def test_an_edited_record_is_refused(tmp_path, change):
    path = write_record(tmp_path, _record())
    _edit(path, change)
    with pytest.raises(RecordError, match="checksum"):
        read_record(path)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage \x00", "not JSON"),
        (b"[1, 2, 3]", "not a calibration record"),
        (b'{"format": "something else"}', "not a calibration record"),
        (b"{" + b" " * 70000 + b"}", "larger than"),
    ],
    ids=["empty", "binary", "list", "other-format", "huge"],
)
def test_garbage_is_not_a_record(tmp_path, data, match):
    path = tmp_path / record_name(calibration_namespace(IDENTITY), "int8")
    path.write_bytes(data)
    with pytest.raises(RecordError, match=match):
        read_record(path)


def test_a_record_with_the_right_checksum_but_wrong_fields_is_refused(tmp_path):
    """Someone who recomputes the checksum still cannot slip in a record of the wrong shape."""
    from lmcache_triton.calibration.record import _checksum

    path = write_record(tmp_path, _record())
    for change, match in [
        (lambda o: o["metrics"].update(top1_agreement="1.0"), "expected a finite number"),
        (lambda o: o["metrics"].pop("tokens"), "missing 'tokens'"),
        (lambda o: o["identity"].update(producer="x"), "namespace does not match"),
    ]:
        obj = json.loads(path.read_text())
        change(obj)
        body = {k: v for k, v in obj.items() if k != "checksum"}
        obj["checksum"] = _checksum(body)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(obj))
        with pytest.raises(RecordError, match=match):
            read_record(bad)


def test_a_directory_or_missing_file_is_not_a_record(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "nope.json")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(RecordError):
        read_record(tmp_path / "d.json")


# ------------------------------------------------------------------------------------ thresholds


@pytest.mark.parametrize(
    "change, phrase",
    [
        (dict(top1_agreement=0.98), "top-1 agreement"),
        (dict(mean_logprob_dev=0.02), "mean logprob deviation"),
        (dict(max_logprob_dev=0.2), "max logprob deviation"),
        (dict(tokens=100), "tokens compared"),
        (dict(loaded_tokens=0), "no decoded KV"),
        (dict(answered=10, accuracy_exact=0.9, accuracy_codec=0.8), "accuracy"),
    ],
)
def test_each_threshold_can_fail(change, phrase):
    assert STRICT.failures(GOOD) == []
    failed = STRICT.failures(dataclasses.replace(GOOD, **change))
    assert len(failed) == 1 and phrase in failed[0]


def test_accuracy_within_one_point_passes():
    m = dataclasses.replace(GOOD, answered=300, accuracy_exact=0.95, accuracy_codec=0.94)
    assert STRICT.failures(m) == []
    assert STRICT.failures(dataclasses.replace(m, accuracy_codec=0.936)) != []


# ------------------------------------------------------------------------------------ the guard


def test_a_passing_record_allows_its_codec(tmp_path):
    write_record(tmp_path, _record())
    got = _decide(tmp_path, {"disk": "int8", "remote": "exact"})
    assert got["disk"].used == "int8" and not got["disk"].refused and "top-1 agreement 0.9980" in got["disk"].reason
    assert got["remote"].used == "exact" and got["remote"].reason is None


def test_no_record_stores_exact(tmp_path):
    got = _decide(tmp_path, {"disk": "int8"})
    assert got["disk"].used == "exact" and got["disk"].refused and "no calibration record" in got["disk"].reason


def test_a_failing_record_stores_exact(tmp_path):
    write_record(tmp_path, _record(metrics=dataclasses.replace(GOOD, top1_agreement=0.9)))
    got = _decide(tmp_path, {"disk": "int8"})["disk"]
    assert got.used == "exact" and "fails: top-1 agreement 0.9000 < 0.99" in got.reason


def test_a_record_for_other_weights_does_not_count(tmp_path):
    write_record(tmp_path, _record(identity=OTHER_WEIGHTS))
    assert _decide(tmp_path, {"disk": "int8"})["disk"].used == "exact"
    # ... not even when renamed to this model's file name
    src = tmp_path / record_name(calibration_namespace(OTHER_WEIGHTS), "int8")
    src.rename(tmp_path / record_name(calibration_namespace(IDENTITY), "int8"))
    got = _decide(tmp_path, {"disk": "int8"})["disk"]
    assert got.used == "exact" and "for other weights" in got.reason


def test_a_record_for_another_codec_does_not_count(tmp_path):
    write_record(tmp_path, _record(codec="int8"))
    got = _decide(tmp_path, {"disk": "int4", "remote": "int8"})
    assert got["disk"].used == "exact" and got["remote"].used == "int8"
    # an int8 record renamed to int4's file name
    (tmp_path / record_name(calibration_namespace(IDENTITY), "int8")).rename(
        tmp_path / record_name(calibration_namespace(IDENTITY), "int4")
    )
    got = _decide(tmp_path, {"disk": "int4"})["disk"]
    assert got.used == "exact" and "for codec 'int8', not 'int4'" in got.reason


def test_a_tampered_record_stores_exact(tmp_path):
    path = write_record(tmp_path, _record(metrics=dataclasses.replace(GOOD, top1_agreement=0.9)))
    _edit(path, lambda o: o["metrics"].update(top1_agreement=0.999))  # "fixed" by hand
    got = _decide(tmp_path, {"disk": "int8"})["disk"]
    assert got.used == "exact" and "not usable: checksum mismatch" in got.reason
    path.write_bytes(os.urandom(300))
    got = _decide(tmp_path, {"disk": "int8"})["disk"]
    assert got.used == "exact" and "not usable" in got.reason and "\n" not in got.reason


def test_the_servers_thresholds_decide_not_the_records_verdict(tmp_path):
    """A record that passed calibrate's bar fails a stricter server, and the other way round."""
    write_record(tmp_path, _record())  # passed (top-1 0.998)
    assert _decide(tmp_path, {"disk": "int8"}, Thresholds(min_top1=0.999))["disk"].used == "exact"
    write_record(tmp_path, _record(metrics=dataclasses.replace(GOOD, max_logprob_dev=0.3)))  # failed the default
    assert _decide(tmp_path, {"disk": "int8"})["disk"].used == "exact"
    assert _decide(tmp_path, {"disk": "int8"}, Thresholds(max_logprob_dev=0.5))["disk"].used == "int8"


def test_guard_off_and_lossless_codecs(tmp_path):
    got = _decide(tmp_path, {"disk": "int8", "remote": "lz"}, enabled=False, is_lossy=lambda c: c == "int8")
    assert got["disk"].used == "int8" and "guard is off" in got["disk"].reason
    got = _decide(tmp_path, {"disk": "lz"}, is_lossy=lambda c: c == "int8")
    assert got["disk"].used == "lz" and got["disk"].reason is None


def test_guard_codecs_reads_the_config_and_says_why_once(tmp_path, caplog):
    write_record(tmp_path, _record(metrics=dataclasses.replace(GOOD, top1_agreement=0.995)))
    cfg = load_config({"lmcache.calibration_dir": str(tmp_path)}, env={})
    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        codecs, _ = guard_codecs(cfg, IDENTITY, {"disk": "int8", "remote": "int4"})
    assert codecs == {"disk": "int8", "remote": "exact"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "remote_codec=int4: no calibration record" in warnings[0] and "calibrate" in warnings[0]
    # a stricter threshold from the config refuses the int8 record too; still one line
    caplog.clear()
    cfg = load_config({"lmcache.calibration_dir": str(tmp_path), "lmcache.calibration_min_top1": "0.999"}, env={})
    with caplog.at_level(logging.INFO, logger="lmcache_triton"):
        codecs, _ = guard_codecs(cfg, IDENTITY, {"disk": "int8", "remote": "int4"})
    assert codecs == {"disk": "exact", "remote": "exact"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk_codec=int8" in warnings[0] and "remote_codec=int4" in warnings[0]
    # the guard off: as asked
    cfg = load_config({"lmcache.codec_guard": "false"}, env={})
    assert guard_codecs(cfg, IDENTITY, {"disk": "int4"}, log=False)[0] == {"disk": "int4"}


def test_records_dir_default(monkeypatch, tmp_path):
    from lmcache_triton.calibration.guard import records_dir_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert records_dir_of(load_config(env={})) == tmp_path / "lmcache-triton" / "calibration"


@pytest.mark.parametrize(
    "key, value",
    [("calibration_min_top1", "1.5"), ("calibration_max_logprob_dev", "-1"), ("calibration_min_tokens", "0"),
     ("codec_guard", "maybe"), ("calibration_max_accuracy_drop", "x")],  # fmt: skip
)
def test_bad_threshold_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config({f"lmcache.{key}": value}, env={})


def test_the_guard_imports_without_torch():
    code = "import sys, lmcache_triton.calibration; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


# ------------------------------------------------------------------------------------ measures


def _gen(tokens, lps, text="", cached=10, extra_top=None):
    top = [{t: lp, **(extra_top[i] if extra_top else {})} for i, (t, lp) in enumerate(zip(tokens, lps, strict=True))]
    return Generation(list(tokens), top, text, cached)


def test_compare_identical_runs():
    e = _gen([5, 6, 7], [-0.1, -0.2, -0.3])
    m = compare([e], [e], [None])
    assert (m.tokens, m.top1_agreement, m.sequences_equal) == (3, 1.0, 1.0)
    assert m.mean_logprob_dev == 0.0 and m.max_logprob_dev == 0.0
    assert m.answered == 0 and m.accuracy_exact is None and m.loaded_tokens == 10


def test_compare_stops_at_the_first_disagreement():
    e = _gen([5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4])
    # position 1 flips (6 -> 9; the decoded run gives 6 logprob -0.9); the rest is not comparable
    d = Generation([5, 9, 7, 8], [{5: -0.15}, {9: -0.5, 6: -0.9}, {7: -3.0}, {8: -3.0}], "", 12)
    m = compare([e], [d], [None])
    assert m.tokens == 2 and m.top1_agreement == 0.5 and m.sequences_equal == 0.0
    assert m.max_logprob_dev == pytest.approx(0.7) and m.mean_logprob_dev == pytest.approx((0.05 + 0.7) / 2)


def test_compare_bounds_a_token_missing_from_the_top_k():
    e = _gen([5, 6], [-0.1, -0.2])
    d = Generation([5, 9], [{5: -0.1}, {9: -0.05, 4: -2.0}], "", 1)  # 6 not in the decoded top-k
    m = compare([e], [d], [None])
    assert m.max_logprob_dev == pytest.approx(1.8)  # -0.2 - (-2.0): at least this much


def test_compare_leaves_out_prompts_without_decoded_kv():
    e = [_gen([5, 6], [-0.1, -0.2], text="a"), _gen([7], [-0.1], text="b")]
    d = [_gen([5, 9], [-0.1, -0.2], text="x", cached=0), _gen([7], [-0.1], text="b", cached=40)]
    m = compare(e, d, ["a", "b"])
    assert (m.prompts, m.tokens, m.top1_agreement, m.loaded_tokens) == (1, 1, 1.0, 40)
    assert m.answered == 1 and m.accuracy_exact == m.accuracy_codec == 1.0


def test_compare_accuracy_and_errors():
    e = [_gen([1], [-0.1], text=" Paris."), _gen([2], [-0.1], text="w17")]
    d = [_gen([1], [-0.1], text=" Paris."), _gen([2], [-0.1], text="w170")]
    m = compare(e, d, ["Paris", "w17"])
    assert m.answered == 2 and m.accuracy_exact == 1.0 and m.accuracy_codec == 0.5
    with pytest.raises(ValueError):
        compare(e, d[:1], ["a", "b"])
    assert is_correct(" The lion roars", "The lion") and not is_correct("Lionel", "Lion") and not is_correct("x", "")


def test_prompt_sets(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a b", "answer": "c"}\n\n{"prompt_token_ids": [1, 2, 3]}\n')
    got = read_prompt_set(p)
    assert got[0].text == "a b" and got[0].answer == "c" and got[1].token_ids == [1, 2, 3] and got[1].answer is None
    assert got[1].as_vllm("s") == {"prompt_token_ids": [1, 2, 3], "cache_salt": "s"}
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert [x.text for x in read_prompt_set(t)] == ["one", "two"]
    for body, match in [('{"prompt": 3}', "expected a non-empty string"), ("{nope", "not JSON"),
                        ('{"prompt": "x", "answer": 1}', "answer"), ('{"prompt_token_ids": [-1]}', "token ids"),
                        ("", "holds no prompts")]:  # fmt: skip
        p.write_text(body)
        with pytest.raises(PromptSetError, match=match):
            read_prompt_set(p)
    with pytest.raises(PromptSetError, match="does not exist"):
        read_prompt_set(tmp_path / "missing.jsonl")
    b = builtin_prompts()
    assert len(b) == 16 and sum(x.answer is not None for x in b) == 8 and len({x.text for x in b}) == 16


# ------------------------------------------------------------------------------------ the command's errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--codec", "int3"], "--codec 'int3': expected one of exact, int4, int8"),
        (["--codec", "int8", "--prompts", "{missing}"], "does not exist"),
        (["--codec", "int8", "--prompts", "{bad}"], "not JSON"),
        (["--codec", "int8", "--chunk-size", "48", "--block-size", "32"], "chunk_size"),
    ],
    ids=["unknown-codec", "missing-prompts", "bad-prompts", "chunk-vs-block"],
)
def test_calibrate_refuses_bad_input_in_one_line(tmp_path, args, message):
    """Checked before any engine starts: one line, exit status 1, nothing written."""
    from typer.testing import CliRunner

    from lmcache_triton.cli import app

    model = tmp_path / "m"  # what the command checks before an engine: a directory with config.json
    model.mkdir()
    (model / "config.json").write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    args = [a.format(missing=tmp_path / "none.jsonl", bad=bad) for a in args]
    res = CliRunner().invoke(app, ["calibrate", str(model), *args, "--out", str(tmp_path / "rec")])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not (tmp_path / "rec").exists()
