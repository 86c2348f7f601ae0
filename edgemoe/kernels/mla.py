"""Multi-head latent attention (DeepSeek-V2/V3) over the compressed cache.

The cache keeps, per position, the normalised latent c (R values) and the rotary key k_pe (r values) shared by
all heads, instead of H full keys and values. A head's key is [W_uk,h c ; k_pe] and its value W_uv,h c, so the
key up-projection is folded into the query (q_nope · W_uk,h c = (W_uk,hᵀ q_nope) · c) and the value
up-projection applied once to the attention-weighted latent: the per-position cost is R + r, not H (n + v).

Legend: T tokens, H heads, n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, R = kv_lora_rank,
S cache positions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .intrinsics_x8 import store_x8
from .kv_access import load_kv1, load_kv8


@njit(cache=True, nogil=True)
def rope_pairs_inplace(x, cos, sin):
    """RoPE on adjacent pairs (x[2i], x[2i+1]) (DeepSeek's complex form).   x: (T, heads, r); cos, sin: (T, r/2)"""
    T, n_heads, r = x.shape
    for t in range(T):
        for h in range(n_heads):
            for i in range(r // 2):
                a = x[t, h, 2 * i]
                b = x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = a * cos[t, i] - b * sin[t, i]
                x[t, h, 2 * i + 1] = a * sin[t, i] + b * cos[t, i]


HEAD_GROUPS = 4  # jobs per token: each reads the cached latents once for its group of heads


@njit(cache=True, nogil=True)
def _row(buf, rows, ro, n):
    """buf[:n] = the first n values of the cache row at flat element `ro`, widened to float32."""
    i = 0
    while i + 8 <= n:
        store_x8(buf, i, load_kv8(rows, ro, i))
        i += 8
    while i < n:
        buf[i] = load_kv1(rows, ro, i)
        i += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def mla_attention(out, q_nope, q_pe, rows, w_uk, w_uv, pos0, scale):
    """out (T, H, v): token t (at position pos0 + t) of each head attends to cache positions 0..pos0 + t.

    q_nope: (T, H, n); q_pe: (T, H, r) after RoPE; rows: (S, W) the cache, C-contiguous: each position's latent,
    then its key's rope part after RoPE, as float32 (W = R + r), f16 bits or Q8_0 blocks (kv_access), widened
    row by row into a float32 buffer the dot products read (one contiguous array: a strided view's unknown
    stride keeps LLVM from vectorising them, 7-9x slower);
    w_uk: (H, n, R) the keys' up-projection; w_uv: (H, v, R) the values'. A job is one token and a group of
    heads, reading each cached position once for the whole group; its sums are its own, so a row's result does
    not depend on the other rows of the pass (fastmath reorders a sum the same way in every job).
    """
    T, H, n = q_nope.shape
    r = q_pe.shape[2]
    R = w_uk.shape[2]
    W = rows.shape[1]
    v = w_uv.shape[1]
    G = min(HEAD_GROUPS, H)
    per = (H + G - 1) // G
    for job in prange(T * G):
        t = job // G
        h0 = (job % G) * per
        h1 = min(H, h0 + per)
        L = pos0 + t + 1
        qa = np.zeros((h1 - h0, R), np.float32)  # W_uk,hᵀ q_nope per head
        for h in range(h0, h1):
            for i in range(n):
                qi = q_nope[t, h, i]
                for j in range(R):
                    qa[h - h0, j] += qi * w_uk[h, i, j]
        scores = np.empty((h1 - h0, L), np.float32)
        buf = np.empty(R + r, np.float32)  # one cache row, widened
        for s in range(L):
            _row(buf, rows, s * W, R + r)
            for h in range(h0, h1):
                acc = np.float32(0.0)
                for j in range(R):
                    acc += qa[h - h0, j] * buf[j]
                for j in range(r):
                    acc += q_pe[t, h, j] * buf[R + j]
                scores[h - h0, s] = acc * scale
        total = np.zeros(h1 - h0, np.float32)
        for h in range(h1 - h0):
            m = scores[h, 0]
            for s in range(1, L):
                m = max(m, scores[h, s])
            for s in range(L):
                scores[h, s] = np.float32(math.exp(scores[h, s] - m))
                total[h] += scores[h, s]
        ol = np.zeros((h1 - h0, R), np.float32)  # Σ_s p_s c_s per head
        for s in range(L):
            _row(buf, rows, s * W, R)
            for h in range(h1 - h0):
                p = scores[h, s]
                for j in range(R):
                    ol[h, j] += p * buf[j]
        for h in range(h0, h1):
            for k in range(v):
                acc = np.float32(0.0)
                for j in range(R):
                    acc += w_uv[h, k, j] * ol[h - h0, j]
                out[t, h, k] = acc / total[h - h0]
