"""PyTorch twins of the Triton kernels: the CPU production path and the test oracles.

Each `<name>_ref` has the same signature as the public launcher `<name>` in its kernel module.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------
# Paged <-> chunk copies (twins of kernels/paged_copy.py)
# ---------------------------------------------------------------------------

# (paged copy twins go here)


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# CacheBlend: token selection and RoPE re-rotation (twins of kernels/blend.py, kernels/rope.py)
# ---------------------------------------------------------------------------

# (blend twins go here)
