"""Triton kernels with PyTorch twins. Imports torch and triton only.

`TRITON_INTERPRET` is read when `@triton.jit` runs, i.e. at import of these modules: set it
before importing them.
"""
