"""Numba kernels for the non-matrix parts of a transformer step: RMSNorm, RoPE, attention, SwiGLU.

Output first, constants as arguments, parallel over independent rows or heads.
Legend: T = tokens in the step, D = hidden size, H = query heads, K = key/value heads,
d = head dim, S = positions in the KV cache.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .intrinsics import get, load_f32x8
from .intrinsics_x8 import store_x8
from .kv_access import load_kv1, load_kv8
from .vecops import exp_f32x8, fadd, fdiv, ffma, fmax, fmin, fmul, fsub, hsum, splat_f32x8, zero_f32x8

# A parallel region costs a thread wake-up (µs when idle, a scheduler slice on a busy box); kernels whose
# work is below this many multiply-adds run on the calling thread instead.
PARALLEL_MIN_WORK = 1 << 17


def twins(fn):
    """Compile `fn` twice: parallel over its prange loop, and serial (prange runs as range).

    The serial copy gets its own qualified name so Numba's on-disk cache keeps both.
    """
    import types

    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return (njit(cache=True, nogil=True, parallel=True)(fn), njit(cache=True, nogil=True)(serial))


def pick(pair, work: int):
    """The parallel or the serial twin for `work` multiply-adds."""
    return pair[0] if work >= PARALLEL_MIN_WORK else pair[1]


def _rmsnorm(out, x, w, eps):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.   out, x: (T, D); w: (D,)"""
    T, D = x.shape
    for t in prange(T):
        ss = 0.0
        for i in range(D):
            ss += np.float64(x[t, i]) * x[t, i]
        inv = np.float32(1.0 / math.sqrt(ss / D + eps))
        for i in range(D):
            out[t, i] = w[i] * (x[t, i] * inv)


@njit(cache=True, nogil=True)
def rope_tables(cos, sin, positions, theta, dim):
    """HF rotary tables: cos/sin (T, dim/2) for angle = pos * theta^(-2i/dim), in float32 like HF."""
    half = dim // 2
    for t in range(positions.shape[0]):
        p = np.float32(positions[t])
        for i in range(half):
            inv_freq = np.float32(1.0 / theta ** (np.float32(2 * i) / np.float32(dim)))
            a = np.float32(p * inv_freq)
            cos[t, i] = math.cos(a)
            sin[t, i] = math.sin(a)


def _rope_inplace(x, cos, sin):
    """Rotate-half RoPE (HF order: first half of each head pairs with the second).  x: (T, n_heads, d)"""
    T, n_heads, d = x.shape
    half = d // 2
    for t in prange(T):
        for h in range(n_heads):
            for i in range(half):
                a = x[t, h, i]
                b = x[t, h, i + half]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, i] = a * c - b * s
                x[t, h, i + half] = b * c + a * s


@njit(cache=True, nogil=True)
def attention_jobs(T, H, K):
    """Jobs of `_attention` for T tokens, H query heads and K key/value heads."""
    group = H // K
    return T * K * ((group + 3) // 4)


def _attention(out, q, k_cache, v_cache, pos0, scale, sinks, window):
    """Causal GQA attention of T new queries at positions pos0..pos0+T-1 over the cache.

    out: (T, H, d); q: (T, H, d); k_cache, v_cache: (K, S, d) with S >= pos0 + T filled (a head's positions
    one after another, so reading them is one sequential stream), float32, f16 bits or Q8_0 blocks (kv_access).
    A job is one token and up to 4 query heads sharing a key/value head, so each cache row is read
    once from memory for all of them (then from L1/L2). Each (token, head) is still computed alone
    in a fixed order (q.k as 8-lane partial sums, p.V accumulated over positions in order), so its
    result does not depend on T or on the grouping: a prompt in chunks gives the same values.
    sinks, window: a family's attention sinks and sliding window (`attention_job`).
    """
    T, H, _ = q.shape
    for job in prange(attention_jobs(T, H, k_cache.shape[0])):
        attention_job(out, q, k_cache, v_cache, pos0, scale, job, sinks, window)


@njit(cache=True, nogil=True)
def attention_job(out, q, k_cache, v_cache, pos0, scale, job, sinks, window):
    """Job number `job` of `_attention`: token t, query heads h0 .. h0 + ng - 1. sinks: (H,) one more logit per
    head in the softmax that adds no value (gpt-oss), or (0,) for none; window > 0: the token at position p sees
    positions p - window + 1 .. p only."""
    T, H, d = q.shape
    K, S, W = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]  # W: a row's stored elements (kv_access)
    group = H // K
    per_job = min(group, 4)
    subs = (group + per_job - 1) // per_job  # jobs per (token, kv head)
    n_max = pos0 + T
    d8 = d - d % 8
    t = job // (K * subs)
    kv = (job // subs) % K
    h0 = kv * group + (job % subs) * per_job
    ng = min(per_job, kv * group + group - h0)
    lo = max(0, pos0 + t + 1 - window) if window > 0 else 0  # the first position seen
    n = pos0 + t + 1 - lo  # positions seen; scores[j, s] is position lo + s
    scores = np.empty((ng, n_max), dtype=np.float32)
    ms = np.full(ng, -np.inf, dtype=np.float32)
    if sinks.shape[0]:
        for j in range(ng):
            ms[j] = sinks[h0 + j]
    for s in range(n):
        ko = (kv * S + lo + s) * W  # flat offset of k_cache[kv, lo + s]
        for j in range(ng):
            qo = (t * H + h0 + j) * d  # flat offset of q[t, h0 + j]
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            i = 0
            while i + 32 <= d8:  # four independent chains: one would wait on FMA latency
                a0 = ffma(load_f32x8(q, qo + i), load_kv8(k_cache, ko, i), a0)
                a1 = ffma(load_f32x8(q, qo + i + 8), load_kv8(k_cache, ko, i + 8), a1)
                a2 = ffma(load_f32x8(q, qo + i + 16), load_kv8(k_cache, ko, i + 16), a2)
                a3 = ffma(load_f32x8(q, qo + i + 24), load_kv8(k_cache, ko, i + 24), a3)
                i += 32
            while i < d8:
                a0 = ffma(load_f32x8(q, qo + i), load_kv8(k_cache, ko, i), a0)
                i += 8
            acc = hsum(fadd(fadd(a0, a1), fadd(a2, a3)))
            for i in range(d8, d):
                acc += q[t, h0 + j, i] * load_kv1(k_cache, ko, i)
            acc *= scale
            scores[j, s] = acc
            ms[j] = max(ms[j], acc)
    for j in range(ng):
        so = j * n_max  # flat offset of scores[j]
        m = ms[j]
        mv = splat_f32x8(m)
        total8 = zero_f32x8()
        s = 0
        while s + 8 <= n:  # 8 lanes of exp at a time; a position's lane is fixed, so results do not depend on T
            e8 = exp_f32x8(fsub(load_f32x8(scores, so + s), mv))
            store_x8(scores, so + s, e8)
            total8 = fadd(total8, e8)
            s += 8
        total = hsum(total8)
        while s < n:
            e = np.float32(math.exp(np.float64(scores[j, s]) - np.float64(m)))
            scores[j, s] = e
            total += e
            s += 1
        if sinks.shape[0]:
            total += np.float32(math.exp(np.float64(sinks[h0 + j]) - np.float64(m)))
        ms[j] = np.float32(1.0) / total  # from here on: 1 / the softmax denominator
    i0 = 0  # out[t, h] = sum_s p_s v[s, kv]: 64 columns at a time in 8 vector accumulators
    while i0 + 64 <= d:
        for j in range(ng):  # the chunk's v rows stay in L2 for the group's other heads
            inv = ms[j]
            oo = (t * H + h0 + j) * d + i0
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            a4, a5, a6, a7 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for s in range(n):
                p = splat_f32x8(scores[j, s] * inv)
                vo = (kv * S + lo + s) * W
                a0, a1 = ffma(p, load_kv8(v_cache, vo, i0), a0), ffma(p, load_kv8(v_cache, vo, i0 + 8), a1)
                a2, a3 = ffma(p, load_kv8(v_cache, vo, i0 + 16), a2), ffma(p, load_kv8(v_cache, vo, i0 + 24), a3)
                a4, a5 = ffma(p, load_kv8(v_cache, vo, i0 + 32), a4), ffma(p, load_kv8(v_cache, vo, i0 + 40), a5)
                a6, a7 = ffma(p, load_kv8(v_cache, vo, i0 + 48), a6), ffma(p, load_kv8(v_cache, vo, i0 + 56), a7)
            store_x8(out, oo, a0)
            store_x8(out, oo + 8, a1)
            store_x8(out, oo + 16, a2)
            store_x8(out, oo + 24, a3)
            store_x8(out, oo + 32, a4)
            store_x8(out, oo + 40, a5)
            store_x8(out, oo + 48, a6)
            store_x8(out, oo + 56, a7)
        i0 += 64
    for j in range(ng):
        inv = ms[j]
        for i in range(i0, d):
            acc = np.float32(0.0)
            for s in range(n):
                acc += (scores[j, s] * inv) * load_kv1(v_cache, (kv * S + lo + s) * W, i)
            out[t, h0 + j, i] = acc


def _swiglu(out, gate, g0, up, u0, stride):
    """SwiGLU: out[t, i] = silu(gate[g0 + t * stride + i]) * up[u0 + t * stride + i], flat offsets into
    C-contiguous gate and up (which may be one (T, 2I) array).  out: (T, I)"""
    T, n = out.shape
    n8 = n - n % 8
    one, minus = splat_f32x8(np.float32(1.0)), splat_f32x8(np.float32(-1.0))
    for t in prange(T):
        go, uo, oo = g0 + t * stride, u0 + t * stride, t * n
        for i in range(0, n8, 8):
            g = load_f32x8(gate, go + i)
            silu = fdiv(g, fadd(one, exp_f32x8(fmul(g, minus))))
            store_x8(out, oo + i, fmul(silu, load_f32x8(up, uo + i)))
        for i in range(n8, n):
            g = get(gate, go + i)
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * get(up, uo + i)


def _clamped_swiglu(out, gate, g0, up, u0, stride, gate_b, up_b, alpha, limit):
    """gpt-oss's SwiGLU: out[t, i] = (clamp(u, ±limit) + 1) · g σ(alpha g) with g = min(gate + gate_b[i], limit),
    u = up + up_b[i]; gate and up at flat offsets as `_swiglu`.  out: (T, I); gate_b, up_b: (I,)"""
    T, n = out.shape
    n8 = n - n % 8
    a, lim = np.float32(alpha), np.float32(limit)
    one, minus_a = splat_f32x8(np.float32(1.0)), splat_f32x8(-a)
    hi, lo = splat_f32x8(lim), splat_f32x8(-lim)
    for t in prange(T):
        go, uo, oo = g0 + t * stride, u0 + t * stride, t * n
        for i in range(0, n8, 8):
            g = fmin(fadd(load_f32x8(gate, go + i), load_f32x8(gate_b, i)), hi)
            u = fmax(fmin(fadd(load_f32x8(up, uo + i), load_f32x8(up_b, i)), hi), lo)
            glu = fdiv(g, fadd(one, exp_f32x8(fmul(g, minus_a))))
            store_x8(out, oo + i, fmul(fadd(u, one), glu))
        for i in range(n8, n):
            g = min(get(gate, go + i) + gate_b[i], lim)
            u = min(max(get(up, uo + i) + up_b[i], -lim), lim)
            out[t, i] = (u + np.float32(1.0)) * (g / (np.float32(1.0) + np.float32(math.exp(-a * g))))


@njit(cache=True, nogil=True)
def route_topk(ids, weights, logits, renorm):
    """Routing per token: softmax over the experts, the top A by probability (lower expert id first on ties,
    like a stable sort), their probabilities renormalised to sum to 1 when `renorm` (Mixtral, Qwen3-MoE;
    Qwen2-MoE and OLMoE keep the softmax probabilities).

    ids: (T, A) int64; weights: (T, A) f32; logits: (T, E) f32
    """
    T, E = logits.shape
    A = ids.shape[1]
    probs = np.empty(E, dtype=np.float32)
    for t in range(T):
        m = logits[t, 0]
        for e in range(1, E):
            m = max(m, logits[t, e])
        total = np.float32(0.0)
        for e in range(E):
            probs[e] = np.float32(math.exp(logits[t, e] - m))
            total += probs[e]
        kept = np.float32(0.0)
        for a in range(A):
            best = -1
            for e in range(E):
                if probs[e] >= 0 and (best < 0 or probs[e] > probs[best]):
                    best = e
            ids[t, a] = best
            weights[t, a] = probs[best] / total
            kept += weights[t, a]
            probs[best] = -1.0  # taken
        if renorm:
            for a in range(A):
                weights[t, a] = weights[t, a] / kept


RMSNORM = twins(_rmsnorm)
_rmsnorm_serial = RMSNORM[1]


@njit(cache=True, nogil=True)
def qk_inputs(q, k, v, q_norm, k_norm, eps, clip):
    """What some families do to q, k and v between the projections and RoPE, in place: an RMSNorm of q and of k
    (per head when the norm weights have d values (Qwen3-MoE), over all heads when H*d and K*d (OLMoE); none
    when they are empty), then a clamp of all three to ±clip (none when clip <= 0).
    q: (T, H, d); k, v: (T, K, d) contiguous f32; q_norm: (d,) | (H*d,) | (0,); k_norm likewise"""
    T, H, d = q.shape
    K = k.shape[1]
    if q_norm.shape[0] == d:
        _rmsnorm_serial(q.reshape(T * H, d), q.reshape(T * H, d), q_norm, eps)
        _rmsnorm_serial(k.reshape(T * K, d), k.reshape(T * K, d), k_norm, eps)
    elif q_norm.shape[0] > 0:
        _rmsnorm_serial(q.reshape(T, H * d), q.reshape(T, H * d), q_norm, eps)
        _rmsnorm_serial(k.reshape(T, K * d), k.reshape(T, K * d), k_norm, eps)
    if clip > 0:
        c = np.float32(clip)
        for a in (q.reshape(-1), k.reshape(-1), v.reshape(-1)):
            for i in range(a.shape[0]):
                a[i] = min(max(a[i], -c), c)

ROPE_INPLACE = twins(_rope_inplace)

ATTENTION = twins(_attention)

SWIGLU = twins(_swiglu)

CLAMPED_SWIGLU = twins(_clamped_swiglu)
_swiglu_serial, _clamped_swiglu_serial = SWIGLU[1], CLAMPED_SWIGLU[1]


@njit(cache=True, nogil=True)
def expert_activation(hrow, gu, at, n_i, gate_b, up_b, bias_row, alpha, limit):
    """One expert row's activation in the fused expert blocks: hrow (1, I) from gate gu[at:at + I] and up
    gu[at + I:at + 2I]: SwiGLU, or with biases (gate_b, up_b (E, I); (0, 0) when absent) gpt-oss's clamped
    SwiGLU with the biases' row `bias_row`."""
    if gate_b.shape[0]:
        _clamped_swiglu_serial(hrow, gu, at, gu, at + n_i, 2 * n_i, gate_b[bias_row], up_b[bias_row], alpha, limit)
    else:
        _swiglu_serial(hrow, gu, at, gu, at + n_i, 2 * n_i)


def rmsnorm(out, x, w, eps):
    """out, x: (T, D); w: (D,)"""
    pick(RMSNORM, x.size)(out, x, w, eps)


def rope_inplace(x, cos, sin):
    """x: (T, n_heads, d); cos, sin: (T, d/2)"""
    pick(ROPE_INPLACE, x.size)(x, cos, sin)


NO_SINKS = np.zeros(0, np.float32)
NO_SINKS.flags.writeable = False  # the model's vectors are read-only (Model.prepare): one Numba type for all


def attention(out, q, k_cache, v_cache, pos0, scale, sinks=NO_SINKS, window: int = 0):
    """out, q: (T, H, d); k_cache, v_cache: (K, S, d); sinks (H,) read-only or NO_SINKS; window 0: full"""
    seen = pos0 + q.shape[0] if window <= 0 else min(window, pos0 + q.shape[0])
    pick(ATTENTION, q.size * seen * 2)(out, q, k_cache, v_cache, pos0, scale, sinks, int(window))


def silu_mul(out, gate, up):
    """out = silu(gate) * up.   out, gate, up: (T, I), C-contiguous"""
    pick(SWIGLU, gate.size * 8)(out, gate, 0, up, 0, gate.shape[1])


def clamped_swiglu(out, gate, up, gate_b, up_b, alpha, limit):
    """gpt-oss's SwiGLU (`_clamped_swiglu`).   out, gate, up: (T, I), C-contiguous; gate_b, up_b: (I,)"""
    pick(CLAMPED_SWIGLU, gate.size * 8)(out, gate, 0, up, 0, gate.shape[1], gate_b, up_b, float(alpha), float(limit))


def swiglu_halves(out, gate_up):
    """out = silu(gate_up[:, :I]) * gate_up[:, I:].   out: (T, I); gate_up: (T, 2I), C-contiguous"""
    n = out.shape[1]
    pick(SWIGLU, out.size * 8)(out, gate_up, 0, gate_up, n, 2 * n)
