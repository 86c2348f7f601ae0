"""Grouped-query attention with a learned sink per head and an optional sliding window (gpt-oss).

The sink is one more logit in each head's softmax that takes probability mass and contributes no value;
a sliding layer's token at position p sees positions p - window + 1 .. p only.

Legend: T tokens, H query heads, K key-value heads, d head_dim, S cache positions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def sink_attention(out, q, k_cache, v_cache, pos0, scale, sinks, window):
    """out, q: (T, H, d); k_cache, v_cache: (K, S, d) f32 holding positions 0..pos0+T-1; sinks: (H,);
    window: 0 for full attention.

    A job is one token and one key-value head with all the query heads that share it, so each cached row is
    read once for the group (not once per head). Sums are float32 in a fixed order per job (fastmath lets LLVM
    vectorise them the same way in every job), so a row's result does not depend on T or on the other rows.
    """
    T, H, d = q.shape
    K = k_cache.shape[0]
    group = H // K
    for job in prange(T * K):
        t = job // K
        kv = job % K
        h0 = kv * group
        p = pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        n = p + 1 - lo
        scores = np.empty((group, n), np.float32)  # q·k, then exp(q·k - max)
        for s in range(n):
            for j in range(group):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += q[t, h0 + j, i] * k_cache[kv, lo + s, i]
                scores[j, s] = acc * np.float32(scale)
        inv = np.empty(group, np.float32)  # 1 / each head's softmax denominator (the sink included)
        for j in range(group):
            m = sinks[h0 + j]
            for s in range(n):
                m = max(m, scores[j, s])
            total = np.float32(math.exp(sinks[h0 + j] - m))
            for s in range(n):
                e = np.float32(math.exp(scores[j, s] - m))
                scores[j, s] = e
                total += e
            inv[j] = np.float32(1.0) / total
        acc_v = np.zeros((group, d), np.float32)
        for s in range(n):
            for j in range(group):
                w = scores[j, s]
                for i in range(d):
                    acc_v[j, i] += w * v_cache[kv, lo + s, i]
        for j in range(group):
            for i in range(d):
                out[t, h0 + j, i] = acc_v[j, i] * inv[j]
