"""`lmcache-triton stats`: a running server's counters (its /metrics), else the disk tier's figures."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from typing import Annotated

import typer

from lmcache_triton.cli.app import (
    METRIC_PREFIXES,
    CliError,
    DiskOpt,
    RemoteOpt,
    RemoteUrlOpt,
    app,
    current_config,
    disk_dir_of,
    disk_entries,
    errors,
    human,
    open_remote,
    out,
    print_remote,
    remote_summary,
    summarize,
)


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
        f"{human(g('lmcache_triton_loaded_bytes'))} in {g('lmcache_triton_load_seconds'):.2f} s",
        f"stored                   {g('lmcache_triton_stored_chunks'):.0f} chunks, "
        f"{human(g('lmcache_triton_stored_bytes'))} in {g('lmcache_triton_store_seconds'):.2f} s",
        f"read from disk           {g('lmcache_triton_prefetched_chunks'):.0f} chunks",
    ]
    errors = {
        "load": g("lmcache_triton_load_errors"),
        "store": g("lmcache_triton_store_errors"),
        "disk read": g("lmcache_triton_prefetch_errors"),
    }
    lines.append("errors                   " + ", ".join(f"{k} {v:.0f}" for k, v in errors.items()))
    return lines


def codec_lines(lines: list[str], t: dict[str, float]) -> list[str]:
    """Per slow tier: its codec (`lmcache_triton_codec_info`) and the bytes it wrote against
    the bytes those chunks hold decoded (what the codec saved)."""
    codecs: dict[str, str] = {}
    for ln in lines:
        if ln.startswith("vllm:lmcache_triton_codec_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', ln.split("}", 1)[0]))
            if "tier" in labels:
                codecs[labels["tier"]] = labels.get("codec", "?")
    out = []
    for tier, codec in codecs.items():
        wrote = t.get(f"lmcache_triton_written_bytes_{tier}", 0.0)
        raw = t.get(f"lmcache_triton_unencoded_bytes_{tier}", 0.0)
        saved = f"wrote {human(wrote)} for {human(raw)} of KV, saved {human(raw - wrote)}" if raw else "nothing written"
        out.append(f"{tier + ' tier codec':<25}{codec}: {saved}")
    return out


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
    """What a running server counted (its /metrics); without a server, the disk tier's figures.

    The server's counters are summed since it started: loads per tier (loaded_chunks_remote for
    the remote tier), store and prefetch errors. --remote adds the remote tier's chunks and the
    server's memory and evictions.
    """
    with errors():
        url = normalize_url(url)
        if remote or remote_url:
            tier = open_remote(remote_url)
            try:
                print_remote(remote_summary(tier))
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
                totals = metric_totals(lines)
                for ln in summary_lines(totals) + codec_lines(lines, totals):
                    out.print("  " + ln, markup=False, soft_wrap=True)
            return
        cfg = current_config()
        if (remote or remote_url) and disk is None and not cfg.local_disk:
            out.print(f"no server at {url}")
            return
        if disk is None and not cfg.local_disk:
            raise CliError(
                f"no server answers at {url} (start one with `lmcache-triton serve`, or pass --url), "
                "and no disk tier is configured (--disk DIR)"
            )
        disk_dir = disk_dir_of(disk)
        s = summarize(disk_entries(disk_dir))
        out.print(f"no server answers at {url}; disk tier {disk_dir}:", markup=False)
        out.print(
            f"  chunks {s['chunks']}, bytes {s['bytes']} ({human(s['bytes'])}), "
            f"models {len(s['models'])}, unreadable {len(s['unreadable'])}"
        )
        for name, m in s["models"].items():
            codecs = ", ".join(f"{c} {n}" for c, n in m["codecs"].items())
            out.print(
                f"  {name}: {m['chunks']} chunks ({codecs}), {m['tokens']} tokens, {human(m['bytes'])}", markup=False
            )
