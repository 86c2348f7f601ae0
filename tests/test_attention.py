"""The attention kernel against a float64 NumPy reference, and its independence from how tokens and
heads are grouped into jobs (a prompt in chunks must give the bits of the whole prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.kernels import ops


def reference(q, k_cache, v_cache, pos0, scale):
    """Causal GQA softmax(q k^T * scale) v in float64.  q: (T, H, d); caches: (K, S, d) → (T, H, d)"""
    T, H, d = q.shape
    group = H // k_cache.shape[0]
    out = np.empty((T, H, d))
    for t in range(T):
        n = pos0 + t + 1
        for h in range(H):
            s = k_cache[h // group, :n].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = p / p.sum() @ v_cache[h // group, :n].astype(np.float64)
    return out


# (H, K, d): MHA, GQA groups of 2/3/4/8 (8 splits into two jobs of 4), head dims with tails
SHAPES = [(4, 4, 64), (4, 2, 128), (6, 2, 80), (8, 2, 128), (16, 2, 64), (8, 1, 20), (5, 1, 72)]


@pytest.mark.parametrize("H,K,d", SHAPES)
@pytest.mark.parametrize("parallel", [0, 1])
def test_matches_reference_and_chunking(H, K, d, parallel):
    rng = np.random.default_rng(H * 100 + K * 10 + d)
    S, pos0, T = 64, 37, 5
    k_cache = rng.standard_normal((K, S, d)).astype(np.float32)
    v_cache = rng.standard_normal((K, S, d)).astype(np.float32)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    scale = np.float32(1 / np.sqrt(d))
    kernel = ops.ATTENTION[1 - parallel]

    out = np.empty_like(q)
    kernel(out, q, k_cache, v_cache, pos0, scale)
    np.testing.assert_allclose(out, reference(q, k_cache, v_cache, pos0, scale), rtol=2e-5, atol=2e-5)

    for t in range(T):  # one token at a time: the same bits
        one = np.empty_like(q[t:t + 1])
        ops.ATTENTION[parallel](one, np.ascontiguousarray(q[t:t + 1]), k_cache, v_cache, pos0 + t, scale)
        assert np.array_equal(one[0], out[t])
