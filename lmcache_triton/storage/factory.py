"""Transitional: `storage.builder` replaced this module; integration/vllm imports it until the
connector's part of issue 17 lands. Delete then."""

from .builder import build_remote, build_storage

__all__ = ["build_remote", "build_storage"]
