"""`python -m lmcache_triton.cli`: the `lmcache-triton` command."""

from lmcache_triton.cli import app

app()
