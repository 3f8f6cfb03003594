"""Test and benchmark helpers: locally built tiny models (no model hub needed)."""

from lmcache_triton.testing.tiny_model import DEFAULT_DEMO_SPEC, build_tiny_model, sample_prompt

__all__ = ["DEFAULT_DEMO_SPEC", "build_tiny_model", "sample_prompt"]
