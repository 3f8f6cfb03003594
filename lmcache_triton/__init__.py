"""lmcache_triton: LMCache-style KV-cache reuse for vLLM, with Triton JIT kernels.

Modules (each with one job):
  kernels/          Triton kernels and their PyTorch twins (kernels/reference.py).
  config.py         LMCache-compatible configuration (YAML, LMCACHE_* env, extra_config).
  hashing.py        Prefix-chained, process-stable chunk hashing and cache keys.
  storage/          CPU (LRU, bounded) and safetensors disk tiers.
  engine.py         lookup/store/retrieve between vLLM's paged cache and the tiers.
  integration/vllm  the vLLM V1 KV connector (the only place that imports vLLM).
  cli/              the `lmcache-triton` command, one module per command.
"""

__version__ = "0.1.0"
