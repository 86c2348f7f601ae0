"""Q4_K, Q5_K and Q6_K weights times Q8_K-style int8 activations, parallel over output rows.

Mirrors ggml's vec_dot_q4_K_q8_K / q5_K / q6_K: per 256-element super-block, exact integer dots
per 32 (or 16) elements weighted by the integer sub-block scales, then one f32 scale; the offsets
(mins, -32) are applied through the activation's per-16 sums.

    T = tokens, R = output rows, C = columns, S = C / 256 super-blocks
    out (T, R) f32; w (R, S * type_size) uint8; xq (T, C) int8; xd (T, S) f32; xb (T, C / 16) int32
    Q4_K (144 B): d f16, dmin f16, scales[12] (6-bit scale + min per 32), qs[128] nibbles
    Q5_K (176 B): d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
        chunk j (64 elements): low nibbles of qs[32j..] -> sub-block 2j, high -> 2j+1;
        Q5_K adds bit 2j / 2j+1 of qh as bit 4.  value = d * sc * q - dmin * m
    Q6_K (210 B): ql[128], qh[64], scales int8[16] (one per 16), d f16;  value = d * sc * (q - 32)
        group g = 4n + k (32 elements): low 4 bits from ql[64n + 32(k & 1) ..] (high nibbles when
        k >= 2), top 2 bits = bits 2k, 2k+1 of qh[32n ..]; its halves use scales[2g], scales[2g+1].

Tokens go four at a time; the float operations of each token are the same in the 4-token tile and
alone (the integer sums are exact in any order), so a row of a batch is bit-identical to the row
computed alone.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get, load_bits, load_f16, load_i8x32, load_u32, or_qh, or_shl
from .ops import twins
from .vecops import (
    dot_scaled_k,
    fma_i32,
    hsum,
    iadd,
    mins_dot,
    scales_k,
    scales_q6_k,
    sdot16,
    zero_f32x8,
    zero_i32x8,
)

# Helpers are inlined at Numba IR level; arrays are indexed by flat offsets (row slices would
# cost reference counting per row).


@njit(cache=True, nogil=True, inline="always")
def _scales_mins_k4(w, o):
    """The 12 scale bytes at w[o:] (flat) as (scales, mins_lo, mins_hi): byte i = 6-bit value of
    sub-block i (ggml's kmask unpacking of get_scale_min_k4, done on 32-bit words)."""
    u0, u1, u2 = load_u32(w, o), load_u32(w, o + 4), load_u32(w, o + 8)
    sc_lo = u0 & 0x3F3F3F3F
    sc_hi = (u2 & 0x0F0F0F0F) | (((u0 >> 6) & 0x03030303) << 4)
    mn_lo = u1 & 0x3F3F3F3F
    mn_hi = ((u2 >> 4) & 0x0F0F0F0F) | (((u1 >> 6) & 0x03030303) << 4)
    return sc_lo | (sc_hi << 32), mn_lo, mn_hi


@njit(cache=True, nogil=True, inline="always")
def _q45_k_quants(w, o, qh_off, qs_off, j):
    """The two 32-value sub-blocks of chunk j (values 0..15, or 0..31 with Q5_K's qh bits)."""
    lo = or_qh(load_bits(w, o + qs_off + 32 * j, 0, 15), w, o, qh_off, 2 * j)
    return lo, or_qh(load_bits(w, o + qs_off + 32 * j, 4, 15), w, o, qh_off, 2 * j + 1)


@njit(cache=True, nogil=True, inline="always")
def _q45_k_chunk4(variant, w, o, qh_off, qs_off, j, sv, xq, x0, cols, i0, i1, i2, i3):
    """i0..i3 plus the scaled integer dots of chunk j with the super-blocks at xq[x0:],
    xq[x0 + cols:], ... of four consecutive tokens."""
    lo, hi = _q45_k_quants(w, o, qh_off, qs_off, j)
    xo = x0 + 64 * j
    i0 = iadd(i0, dot_scaled_k(variant, lo, load_i8x32(xq, xo), sv, 2 * j))
    i1 = iadd(i1, dot_scaled_k(variant, lo, load_i8x32(xq, xo + cols), sv, 2 * j))
    i2 = iadd(i2, dot_scaled_k(variant, lo, load_i8x32(xq, xo + 2 * cols), sv, 2 * j))
    i3 = iadd(i3, dot_scaled_k(variant, lo, load_i8x32(xq, xo + 3 * cols), sv, 2 * j))
    xo += 32
    i0 = iadd(i0, dot_scaled_k(variant, hi, load_i8x32(xq, xo), sv, 2 * j + 1))
    i1 = iadd(i1, dot_scaled_k(variant, hi, load_i8x32(xq, xo + cols), sv, 2 * j + 1))
    i2 = iadd(i2, dot_scaled_k(variant, hi, load_i8x32(xq, xo + 2 * cols), sv, 2 * j + 1))
    i3 = iadd(i3, dot_scaled_k(variant, hi, load_i8x32(xq, xo + 3 * cols), sv, 2 * j + 1))
    return i0, i1, i2, i3


@njit(cache=True, nogil=True, inline="always")
def _q45_k_chunk1(variant, w, o, qh_off, qs_off, j, sv, xq, x0, i0):
    """i0 plus the scaled integer dots of chunk j with one token's super-block at xq[x0:]."""
    lo, hi = _q45_k_quants(w, o, qh_off, qs_off, j)
    i0 = iadd(i0, dot_scaled_k(variant, lo, load_i8x32(xq, x0 + 64 * j), sv, 2 * j))
    return iadd(i0, dot_scaled_k(variant, hi, load_i8x32(xq, x0 + 64 * j + 32), sv, 2 * j + 1))


def _matmul_q45_k(out, w, xq, xd, xb, type_size, qh_off, qs_off, variant):
    """Q4_K (type_size 144, qh_off 0, qs_off 16) or Q5_K (176, 16, 48) weights."""
    n_tok, n_row = out.shape
    rb, cols, n_sb, n16 = w.shape[1], xq.shape[1], xd.shape[1], xb.shape[1]
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0 = t * cols  # xq row of token t (the other three follow, cols apart)
            b0, b1, b2, b3 = t * n16, (t + 1) * n16, (t + 2) * n16, (t + 3) * n16  # xb rows
            e0, e1, e2, e3 = t * n_sb, (t + 1) * n_sb, (t + 2) * n_sb, (t + 3) * n_sb  # xd rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            c0 = c1 = c2 = c3 = np.float32(0.0)
            for s in range(n_sb):
                o = ro + s * type_size
                sc, mn_lo, mn_hi = _scales_mins_k4(w, o + 4)
                sv = scales_k(sc)
                i0, i1, i2, i3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
                # the chunks written out, as in the one-token path: a constant j folds the scale
                # shuffles, and the serial twin does not unroll a loop over j
                xo = x0 + s * 256
                i0, i1, i2, i3 = _q45_k_chunk4(variant, w, o, qh_off, qs_off, 0, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _q45_k_chunk4(variant, w, o, qh_off, qs_off, 1, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _q45_k_chunk4(variant, w, o, qh_off, qs_off, 2, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _q45_k_chunk4(variant, w, o, qh_off, qs_off, 3, sv, xq, xo, cols, i0, i1, i2, i3)
                d = load_f16(variant, w, o)
                dmin = load_f16(variant, w, o + 2)
                f0, f1, f2, f3 = get(xd, e0 + s), get(xd, e1 + s), get(xd, e2 + s), get(xd, e3 + s)
                a0, a1 = fma_i32(a0, i0, d * f0), fma_i32(a1, i1, d * f1)
                a2, a3 = fma_i32(a2, i2, d * f2), fma_i32(a3, i3, d * f3)
                c0 += dmin * f0 * np.float32(mins_dot(mn_lo, mn_hi, xb, b0 + s * 16))
                c1 += dmin * f1 * np.float32(mins_dot(mn_lo, mn_hi, xb, b1 + s * 16))
                c2 += dmin * f2 * np.float32(mins_dot(mn_lo, mn_hi, xb, b2 + s * 16))
                c3 += dmin * f3 * np.float32(mins_dot(mn_lo, mn_hi, xb, b3 + s * 16))
            out[t, r] = hsum(a0) - c0
            out[t + 1, r] = hsum(a1) - c1
            out[t + 2, r] = hsum(a2) - c2
            out[t + 3, r] = hsum(a3) - c3
            t += 4
        while t < n_tok:
            x0, b0, e0 = t * cols, t * n16, t * n_sb
            a0 = zero_f32x8()
            c0 = np.float32(0.0)
            for s in range(n_sb):
                o = ro + s * type_size
                sc, mn_lo, mn_hi = _scales_mins_k4(w, o + 4)
                sv = scales_k(sc)
                i0 = zero_i32x8()
                xo = x0 + s * 256
                i0 = _q45_k_chunk1(variant, w, o, qh_off, qs_off, 0, sv, xq, xo, i0)
                i0 = _q45_k_chunk1(variant, w, o, qh_off, qs_off, 1, sv, xq, xo, i0)
                i0 = _q45_k_chunk1(variant, w, o, qh_off, qs_off, 2, sv, xq, xo, i0)
                i0 = _q45_k_chunk1(variant, w, o, qh_off, qs_off, 3, sv, xq, xo, i0)
                f0 = get(xd, e0 + s)
                a0 = fma_i32(a0, i0, load_f16(variant, w, o) * f0)
                m0 = np.float32(mins_dot(mn_lo, mn_hi, xb, b0 + s * 16))
                c0 += load_f16(variant, w, o + 2) * f0 * m0
            out[t, r] = hsum(a0) - c0
            t += 1


@njit(cache=True, nogil=True, inline="always")
def _q6_k_group(w, o, g):
    """The 32 values 0..63 of group g (elements 32g .. 32g+31) of the super-block at w[o:]."""
    n = g >> 2
    k = g & 3
    ql = load_bits(w, o + 64 * n + 32 * (k & 1), 4 * (k >> 1), 15)
    return or_shl(ql, load_bits(w, o + 128 + 32 * n, 2 * k, 3), 4)


def _matmul_q6_k(out, w, xq, xd, xb, variant):
    """Q6_K weights: sum over groups of sc * (q . x) - 32 * sc * sum(x), times d_w * d_x."""
    n_tok, n_row = out.shape
    rb, cols, n_sb, n16 = w.shape[1], xq.shape[1], xd.shape[1], xb.shape[1]
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # xq rows
            b0, b1, b2, b3 = t * n16, (t + 1) * n16, (t + 2) * n16, (t + 3) * n16  # xb rows
            e0, e1, e2, e3 = t * n_sb, (t + 1) * n_sb, (t + 2) * n_sb, (t + 3) * n_sb  # xd rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            c0 = c1 = c2 = c3 = np.float32(0.0)
            for s in range(n_sb):
                o = ro + s * 210
                sv = scales_q6_k(w, o + 192)
                i0, i1, i2, i3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
                for g in range(8):
                    q = _q6_k_group(w, o, g)
                    xo = s * 256 + 32 * g
                    i0 = iadd(i0, dot_scaled_k(variant, q, load_i8x32(xq, x0 + xo), sv, g))
                    i1 = iadd(i1, dot_scaled_k(variant, q, load_i8x32(xq, x1 + xo), sv, g))
                    i2 = iadd(i2, dot_scaled_k(variant, q, load_i8x32(xq, x2 + xo), sv, g))
                    i3 = iadd(i3, dot_scaled_k(variant, q, load_i8x32(xq, x3 + xo), sv, g))
                d = load_f16(variant, w, o + 208)
                f0, f1, f2, f3 = (
                    d * get(xd, e0 + s),
                    d * get(xd, e1 + s),
                    d * get(xd, e2 + s),
                    d * get(xd, e3 + s),
                )
                a0, a1 = fma_i32(a0, i0, f0), fma_i32(a1, i1, f1)
                a2, a3 = fma_i32(a2, i2, f2), fma_i32(a3, i3, f3)
                c0 += f0 * np.float32(sdot16(w, o + 192, xb, b0 + s * 16))
                c1 += f1 * np.float32(sdot16(w, o + 192, xb, b1 + s * 16))
                c2 += f2 * np.float32(sdot16(w, o + 192, xb, b2 + s * 16))
                c3 += f3 * np.float32(sdot16(w, o + 192, xb, b3 + s * 16))
            out[t, r] = hsum(a0) - 32 * c0
            out[t + 1, r] = hsum(a1) - 32 * c1
            out[t + 2, r] = hsum(a2) - 32 * c2
            out[t + 3, r] = hsum(a3) - 32 * c3
            t += 4
        while t < n_tok:
            x0, b0, e0 = t * cols, t * n16, t * n_sb
            a0 = zero_f32x8()
            c0 = np.float32(0.0)
            for s in range(n_sb):
                o = ro + s * 210
                sv = scales_q6_k(w, o + 192)
                i0 = zero_i32x8()
                for g in range(8):
                    q = _q6_k_group(w, o, g)
                    i0 = iadd(
                        i0,
                        dot_scaled_k(variant, q, load_i8x32(xq, x0 + s * 256 + 32 * g), sv, g),
                    )
                f0 = load_f16(variant, w, o + 208) * get(xd, e0 + s)
                a0 = fma_i32(a0, i0, f0)
                c0 += f0 * np.float32(sdot16(w, o + 192, xb, b0 + s * 16))
            out[t, r] = hsum(a0) - 32 * c0
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_q45_k, matmul_q45_k_serial = twins(_matmul_q45_k)
matmul_q6_k, matmul_q6_k_serial = twins(_matmul_q6_k)
