"""The attention kernel against a float64 NumPy reference (with gpt-oss's sinks and sliding window as
transformers' eager_attention_forward computes them), and its independence from how tokens and heads are
grouped into jobs (a prompt in chunks must give the bits of the whole prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.kernels import ops


def reference(q, k_cache, v_cache, pos0, scale, sinks=None, window=0):
    """Causal GQA softmax(q k^T * scale) v in float64; with sinks, each head's sink logit joins the softmax
    (its probability dropped); with a window, position p sees p - window + 1 .. p.
    q: (T, H, d); caches: (K, S, d) → (T, H, d)"""
    T, H, d = q.shape
    group = H // k_cache.shape[0]
    out = np.empty((T, H, d))
    for t in range(T):
        n = pos0 + t + 1
        lo = max(0, n - window) if window else 0
        for h in range(H):
            s = k_cache[h // group, lo:n].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            if sinks is not None:
                s = np.append(s, np.float64(sinks[h]))
            p = np.exp(s - s.max())
            p = p / p.sum()
            out[t, h] = p[:n - lo] @ v_cache[h // group, lo:n].astype(np.float64)
    return out


# (H, K, d): MHA, GQA groups of 2/3/4/8 (8 splits into two jobs of 4), head dims with tails
SHAPES = [(4, 4, 64), (4, 2, 128), (6, 2, 80), (8, 2, 128), (16, 2, 64), (8, 1, 20), (5, 1, 72)]


@pytest.mark.parametrize("H,K,d", SHAPES)
@pytest.mark.parametrize("parallel", [0, 1])
@pytest.mark.parametrize("sinks,window", [(False, 0), (True, 0), (True, 6), (False, 11)])
def test_matches_reference_and_chunking(H, K, d, parallel, sinks, window):
    rng = np.random.default_rng(H * 100 + K * 10 + d)
    S, pos0, T = 64, 37, 5
    k_cache = rng.standard_normal((K, S, d)).astype(np.float32)
    v_cache = rng.standard_normal((K, S, d)).astype(np.float32)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    scale = np.float32(1 / np.sqrt(d))
    sink = (rng.standard_normal(H) * 3).astype(np.float32) if sinks else np.zeros(0, np.float32)
    kernel = ops.ATTENTION[1 - parallel]

    out = np.empty_like(q)
    kernel(out, q, k_cache, v_cache, pos0, scale, sink, window)
    want = reference(q, k_cache, v_cache, pos0, scale, sink if sinks else None, window)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)

    for t in range(T):  # one token at a time: the same bits
        one = np.empty_like(q[t:t + 1])
        ops.ATTENTION[parallel](one, np.ascontiguousarray(q[t:t + 1]), k_cache, v_cache, pos0 + t, scale, sink,
                                window)
        assert np.array_equal(one[0], out[t])


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("parallel", [0, 1])
def test_several_sequences_in_one_region(cache_type, parallel):
    """attention_seqs: sequences of different lengths, caches and row counts (decode rows and a prompt chunk)
    give each row the bits of the per-sequence kernel, and the float64 reference's values."""
    from edgemoe.kernels.attention_seqs import ATTENTION_SEQS, KVLists
    from edgemoe.kv_cache import KVCache

    rng = np.random.default_rng(7)
    L, H, K, d = 3, 8, 2, 64
    rows, lengths, capacity = [1, 3, 1, 1, 2], [5, 0, 40, 17, 63], [16, 8, 64, 32, 80]
    caches = []
    for n, p, cap in zip(rows, lengths, capacity):
        c = KVCache(L, cap, K, d, cache_type)
        for layer in range(L):
            c.write(layer, 0, *rng.standard_normal((2, p + n, K, d)).astype(np.float32))
        c.length = p
        caches.append(c)
    T = sum(rows)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    row0 = np.cumsum([0] + rows).astype(np.int64)
    scale = np.float32(1 / np.sqrt(d))
    kv = KVLists.of([(int(r0), n, c) for r0, n, c in zip(row0, rows, caches)])
    assert np.array_equal(kv.row0, row0) and kv.pos0.tolist() == lengths
    for layer in range(L):
        out = np.empty_like(q)
        ATTENTION_SEQS[1 - parallel](out, q, kv.k, kv.v, layer, kv.row0, kv.pos0, scale, ops.NO_SINKS, 0)
        for j, c in enumerate(caches):
            r0, r1 = row0[j], row0[j + 1]
            one = np.empty_like(q[r0:r1])
            ops.ATTENTION[1](one, np.ascontiguousarray(q[r0:r1]), c.k[layer], c.v[layer], c.length, scale,
                             ops.NO_SINKS, 0)
            assert np.array_equal(out[r0:r1], one), (layer, j)
            if cache_type == "f32":
                want = reference(q[r0:r1], c.k[layer], c.v[layer], c.length, scale)
                np.testing.assert_allclose(out[r0:r1], want, rtol=2e-5, atol=2e-5)
