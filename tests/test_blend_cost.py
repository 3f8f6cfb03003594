"""The cost guard's estimate (`estimate_blend_cost`): token-layer steps of a blend over a prefill's,
checked against counts written out by hand and against `blend_prefill`'s own count."""

import math

import pytest
import torch

from lmcache_triton.blend.blender import blend_prefill, prefill_segment
from lmcache_triton.blend.model import load_hf_weights
from lmcache_triton.integration.vllm.blend_connector import estimate_blend_cost
from lmcache_triton.testing.tiny_model import build_tiny_model


def test_by_hand():
    # 12 layers, check layer 1, 4094 tokens of which 4044 cached, ratio 0.15: layer 0 computes
    # every token, layers 1..11 the 50 new tokens and ceil(0.15 * 4044) = 607 cached ones.
    assert estimate_blend_cost(12, [1], [0.15], 4094, 4044) == pytest.approx((4094 + 11 * 657) / (12 * 4094))
    assert estimate_blend_cost(12, [1], [1.0], 4094, 4044) == 1.0
    assert estimate_blend_cost(4, [1], [0.0], 100, 100) == pytest.approx(100 / 400)
    # Two check layers: 0.5 kept at layer 1, then 0.1 of the cached tokens from layer 3 on.
    want = (1 * 100 + 2 * (20 + 40) + 5 * (20 + 8)) / (8 * 100)
    assert estimate_blend_cost(8, [1, 3], [0.5, 0.1], 100, 80) == pytest.approx(want)
    # A later ratio never grows the set again.
    assert estimate_blend_cost(8, [1, 3], [0.1, 0.5], 100, 80) == pytest.approx(
        (100 + 2 * 28 + 5 * 28) / 800)


@pytest.mark.parametrize("checks,ratios", [([1], [0.15]), ([1], [0.5]), ([2], [0.3]), ([1, 2], [0.4, 0.2])])
def test_matches_blend_prefill(tmp_path, checks, ratios):
    """The estimate equals the token-layer steps `blend_prefill` runs (its last token is always
    recomputed, which the estimate counts among the new tokens when it is not cached)."""
    d = build_tiny_model(tmp_path / "m", arch="llama", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
    w = load_hf_weights(d)
    ids = torch.randint(5, 200, (61,), generator=torch.Generator().manual_seed(0))
    spans = [(1, 20), (23, 45), (47, 58)]
    segs = [prefill_segment(w, ids, s, e) for s, e in spans]
    res = blend_prefill(w, ids, segs, ratio=ratios if len(ratios) > 1 else ratios[0], check_layers=checks)
    cached = sum(e - s for s, e in spans)
    est = estimate_blend_cost(w.num_layers, checks, ratios, len(ids), cached)
    assert math.isclose(est, res.computed_token_layers / (w.num_layers * len(ids)))
