"""`lmcache-triton demo`: miss, CPU hit, restart, disk hit on a real engine, as a table."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmcache_triton.cli.app import app, err, errors, human, out
from lmcache_triton.cli.serve import missing_model


@app.command()
def demo(
    model: Annotated[
        Path | None, typer.Option("--model", help="A local model directory instead of the demo model.")
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=64, help="Prompt length in tokens.")] = 4000,
    disk: Annotated[
        Path | None,
        typer.Option(
            "--disk",
            help="Disk tier directory (its chunk files are removed first). Default ~/.cache/lmcache_triton/demo-disk.",
        ),
    ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the chunk files afterwards (for `inspect`).")] = False,
) -> None:
    """Miss, hit from the CPU tier, restart, hit from disk: on a real vLLM engine, timed."""
    with errors():
        if model is not None and not model.is_dir():
            raise missing_model(str(model))
        from lmcache_triton import demo as demo_mod

        disk_dir = (disk or demo_mod.DEFAULT_DEMO_DISK).expanduser()
        with out.status("starting") as status:

            def log(msg: str) -> None:
                out.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")
                status.update(msg)

            res = demo_mod.run_demo(str(model) if model else None, tokens, disk_dir, log=log)

        table = Table(title=f"lmcache_triton demo: {res.rows[0].prompt_tokens}-token prompt, {res.model}")
        for col in ("request", "expected source", "TTFT (s)", "speed-up", "cached tokens", "output = miss's"):
            table.add_column(col, justify="left" if col in ("request", "expected source") else "right")
        miss_ttft = res.rows[0].ttft
        for r in res.rows:
            ttft = "-" if r.ttft is None else f"{r.ttft:.3f}"
            speedup = f"{miss_ttft / r.ttft:.1f}x" if r.ttft and miss_ttft and r is not res.rows[0] else "-"
            same = "-" if r.identical is None else ("yes" if r.identical else "NO")
            table.add_row(
                r.request,
                r.source,
                ttft,
                speedup,
                f"{r.cached_tokens}/{r.prompt_tokens}",
                f"{same} ({len(r.token_ids)} tokens)",
            )
        out.print(table)
        out.print(f"disk tier {disk_dir}: {res.disk['files']} files, {human(res.disk['bytes'])}")
        if not keep:
            demo_mod.clear_disk_dir(disk_dir)
            out.print("(chunk files removed; --keep leaves them for `lmcache-triton inspect --disk DIR`)")
        else:
            out.print(f"chunk files kept: lmcache-triton inspect --disk {shlex.quote(str(disk_dir))}", markup=False)
        if not res.ok:
            for p in res.problems:
                err.print(f"error: {p}", markup=False)
            raise typer.Exit(1)
        out.print("ok: both repeats were served from the cache with the miss's exact output")
