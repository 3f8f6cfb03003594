"""The `lmcache-triton` typer app and what its commands share: one-line errors, the
configuration, the disk directory and tier, the remote tier, human-readable sizes.

Commands live beside this module, one file per job (`demo.py`, `serve.py`, `warm.py`,
`disk.py` for inspect / verify / clear, `stats.py`); `lmcache_triton.cli` imports them all so
they register on `app`. Thin: the work lives in `lmcache_triton.demo`, `lmcache_triton.warm` and
the storage tiers. Imports without vLLM, Triton or torch (they are imported inside the commands
that need them). Errors are one line on stderr and exit status 1; set LMCACHE_TRITON_DEBUG=1 to
see the traceback of an unexpected one.

`--disk` defaults to the configured `local_disk`, read by `load_config()` from the same sources
as the connector (LMCACHE_CONFIG_FILE YAML, LMCACHE_* environment), so `inspect` shows what the
server uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from lmcache_triton.config import ConfigError, LMCacheConfig, load_config

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lmcache_triton.storage.disk_admin import DiskAdmin
    from lmcache_triton.storage.remote import RemoteTier

app = typer.Typer(
    help="LMCache-style KV-cache reuse for vLLM: demo, serve, warm, and disk-tier tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Docstrings are wrapped at the source's line length: markdown joins a paragraph's lines where
    # "rich" would keep each break (help text cut mid-sentence).
    rich_markup_mode="markdown",
)


# typer 0.29 prints a `<bool>` type column for on/off flags (`--keep <bool>`), which reads as if
# the flag took a value: flags get no type column. This patch stays because typer offers no
# hook: `TyperOption.display_type_rich` ignores `metavar`, the option class is not ours to choose
# (typer builds it from `typer.Option`), and typer's own `--help` is one of the flags
# (test_dropin.py::test_help_has_no_bool_placeholder checks every command's help).
_display_type_rich = typer.core.TyperOption.display_type_rich


def _flag_type(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
    return None if self.is_flag else _display_type_rich(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign,assignment]


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
def errors() -> Iterator[None]:
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except (CliError, ConfigError) as e:
        fail(str(e))
    except Exception as e:  # never a traceback for the user; the debug switch shows it
        if os.environ.get("LMCACHE_TRITON_DEBUG"):
            raise
        fail(f"{type(e).__name__}: {e}".splitlines()[0] + " (LMCACHE_TRITON_DEBUG=1 for the traceback)")


def fail(msg: str) -> NoReturn:
    err.print(f"error: {msg}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


class _NoDiskBoundWarning(logging.Filter):
    """Drop the "max_local_disk_size=0 stores nothing" warning: it is about a server's writes,
    not about reading a directory, and `serve`/`warm` re-check with their own flags."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "stores nothing on disk" not in str(record.msg)


def validate(extra: dict[str, Any]) -> None:
    """Fail on a bad flag here, not in the server's worker; warnings were shown by `_config`."""
    log = logging.getLogger("lmcache_triton.config")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        load_config(extra)
    finally:
        log.setLevel(level)


def current_config() -> LMCacheConfig:
    """The configuration from LMCACHE_CONFIG_FILE and LMCACHE_* (ConfigError names key and value)."""
    log = logging.getLogger("lmcache_triton.config")
    quiet = _NoDiskBoundWarning()
    log.addFilter(quiet)
    try:
        return load_config()
    finally:
        log.removeFilter(quiet)


def disk_dir_of(disk: Path | None, must_exist: bool = True) -> Path:
    cfg = current_config()
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


def open_tier(disk: Path) -> DiskAdmin:
    """The disk tier's directory opened by the tools: nothing indexed, created or removed at open,
    and no torch imported (inspect / verify / clear start in a fraction of a second)."""
    from lmcache_triton.chunk.format import ChunkAuth
    from lmcache_triton.storage.disk_admin import DiskAdmin

    if not os.access(disk, os.R_OK | os.X_OK):
        raise CliError(f"disk tier directory {str(disk)!r} is not readable")
    return DiskAdmin(disk, ChunkAuth(current_config().chunk_secret))


def disk_entries(disk: Path) -> list[dict[str, Any]]:
    return open_tier(disk).entries()


def open_remote(url: str | None) -> RemoteTier:
    """The remote tier of `url` (default: the configured remote_url), checked with one PING:
    CliError (one line, password masked) when it cannot be used."""
    from lmcache_triton.config import parse_remote_url

    cfg = current_config()
    url = parse_remote_url("remote_url", url) if url else cfg.remote_url
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


def remote_summary(tier: RemoteTier) -> dict[str, Any]:
    s = summarize(tier.entries())
    s.pop("oldest")
    s.pop("newest")
    return {"remote": tier.masked, **s, "server": tier.server_info()}


def print_remote(s: dict[str, Any]) -> None:
    srv = s["server"]
    maxmem = human(srv["maxmemory"]) if srv.get("maxmemory") else "none"
    out.print(
        f"remote tier {s['remote']}: {s['chunks']} chunks, {human(s['bytes'])}; server used_memory "
        f"{human(srv.get('used_memory', 0))}, maxmemory {maxmem}"
        f" ({srv.get('maxmemory_policy', '?')}), evicted_keys {srv.get('evicted_keys', '?')}",
        markup=False,
        soft_wrap=True,
    )
    for name, m in s["models"].items():
        out.print(f"  {name}: {m['chunks']} chunks, {m['tokens']} tokens, {human(m['bytes'])}", markup=False)
    for u in s["unreadable"]:
        out.print(f"  not ours or damaged: {u['file']} ({u['reason']})", markup=False)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of `DiskTier.entries()`: overall, per model, layouts, oldest/newest."""
    good = [e for e in entries if "error" not in e]
    per_model: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"chunks": 0, "bytes": 0, "tokens": 0, "layouts": set(), "codecs": defaultdict(int)}
    )
    for e in good:
        md = e.get("meta", {})
        m = per_model[md.get("model", "?")]
        m["chunks"] += 1
        m["bytes"] += e.get("bytes", 0)
        m["codecs"][e.get("codec", "exact")] += 1
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
        "models": {
            name: {**m, "layouts": sorted(m["layouts"]), "codecs": dict(sorted(m["codecs"].items()))}
            for name, m in sorted(per_model.items())
        },
    }
