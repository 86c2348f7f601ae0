"""Grouped-query attention with a learned sink per head and an optional sliding window (gpt-oss).

The sink is one more logit in each head's softmax that takes probability mass and contributes no value;
a sliding layer's token at position p sees positions p - window + 1 .. p only.

Legend: T tokens, H query heads, K key-value heads, d head_dim, S cache positions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def sink_attention(out, q, k_cache, v_cache, pos0, scale, sinks, window):
    """out, q: (T, H, d); k_cache, v_cache: (K, S, d) f32 holding positions 0..pos0+T-1; sinks: (H,);
    window: 0 for full attention. Each (token, head) is one job with its own sums."""
    T, H, d = q.shape
    K = k_cache.shape[0]
    group = H // K
    for job in prange(T * H):
        t = job // H
        h = job % H
        kv = h // group
        p = pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        n = p + 1 - lo
        scores = np.empty(n, np.float64)
        m = np.float64(sinks[h])
        for s in range(n):
            acc = 0.0
            for i in range(d):
                acc += np.float64(q[t, h, i]) * k_cache[kv, lo + s, i]
            scores[s] = acc * scale
            m = max(m, scores[s])
        total = math.exp(np.float64(sinks[h]) - m)
        acc_v = np.zeros(d, np.float64)
        for s in range(n):
            w = math.exp(scores[s] - m)
            total += w
            for i in range(d):
                acc_v[i] += w * v_cache[kv, lo + s, i]
        for i in range(d):
            out[t, h, i] = np.float32(acc_v[i] / total)
