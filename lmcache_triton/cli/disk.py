"""`lmcache-triton inspect / verify / clear`: the disk tier's (and, with --remote, the remote
tier's) chunks, read from headers. Imports no torch: the disk tools start in a fraction of a
second."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmcache_triton.cli.app import (
    CliError,
    DiskOpt,
    RemoteOpt,
    RemoteUrlOpt,
    app,
    disk_dir_of,
    disk_entries,
    errors,
    human,
    open_remote,
    open_tier,
    out,
    print_remote,
    remote_summary,
    summarize,
    when,
)


def fix_command(disk: Path | None) -> str:
    """The `verify --fix` line to suggest: with the `--disk` the user passed, if any."""
    return "lmcache-triton verify --fix" + (f" --disk {shlex.quote(str(disk))}" if disk is not None else "")


@app.command()
def inspect(
    disk: DiskOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    remote: RemoteOpt = False,
    remote_url: RemoteUrlOpt = None,
) -> None:
    """What the disk tier holds: chunks, bytes, models, layouts, oldest/newest (headers only).

    With --remote: the remote tier's chunks (our key prefix only) and the server's memory.
    """
    with errors():
        if remote or remote_url:
            tier = open_remote(remote_url)
            try:
                s = remote_summary(tier)
            finally:
                tier.close()
            if as_json:
                typer.echo(json.dumps(s, indent=2))
            else:
                print_remote(s)
            return
        disk_dir = disk_dir_of(disk)
        s = summarize(disk_entries(disk_dir))
        if as_json:
            typer.echo(json.dumps({"disk": str(disk_dir), **s}, indent=2))
            return
        out.print(
            f"disk tier {disk_dir}: {s['chunks']} chunks, {human(s['bytes'])}, "
            f"oldest {when(s['oldest'])}, newest {when(s['newest'])}"
        )
        table = Table()
        for col in ("model", "chunks", "tokens", "bytes", "layout"):
            table.add_column(col, justify="right" if col in ("chunks", "tokens", "bytes") else "left", overflow="fold")
        for name, m in s["models"].items():
            table.add_row(name, str(m["chunks"]), str(m["tokens"]), human(m["bytes"]), "\n".join(m["layouts"]))
        if s["models"]:
            out.print(table)
        for u in s["unreadable"]:
            out.print(
                f"unreadable: {u['file']} ({u['reason']}); `{fix_command(disk)}` removes it",
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
    with errors():
        disk_dir = disk_dir_of(disk)
        report = open_tier(disk_dir).verify(fix=fix)
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
            out.print(
                f"run `{fix_command(disk)}` to remove them (a removed chunk is only a future miss)",
                markup=False,
                soft_wrap=True,
            )
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
    """Remove every chunk file of the disk tier (asks first unless --yes).

    Only files whose header says this tier wrote them go; other files in the directory, even
    named like a chunk, are left alone. With --remote: every key under the remote tier's prefix
    (`lmct:` and a hex digest) and nothing else on the server.
    """
    with errors():
        if remote or remote_url:
            tier = open_remote(remote_url)
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
        disk_dir = disk_dir_of(disk)
        entries = disk_entries(disk_dir)
        if not entries:
            out.print(f"disk tier {disk_dir} holds no chunks")
            return
        ours = [e for e in entries if "error" not in e]
        total = sum(e.get("bytes", 0) for e in ours)
        if not yes and not typer.confirm(f"remove {len(ours)} chunk files ({human(total)}) from {disk_dir}?"):
            out.print("nothing removed")
            return
        report = open_tier(disk_dir).clear_files()
        out.print(f"removed {report['removed']} chunk files ({human(report['bytes'])}) from {disk_dir}")
        for k in report["kept"]:
            out.print(f"left in place: {k['file']} ({k['reason']})", markup=False, soft_wrap=True)
