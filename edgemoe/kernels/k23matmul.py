"""Q2_K and Q3_K weights times Q8_K-style int8 activations, parallel over output rows.

Mirrors ggml's AVX2 vec_dot_q2_K_q8_K / vec_dot_q3_K_q8_K (ggml-cpu/arch/x86/quants.c) operation for
operation, so every variant gives the bits of ggml's AVX2 code on the same activation blocks:

    per super-block s: sumi (8 x i32), lane m = sum over the 8 groups g of 32 values of
        sc[g, m] * (q . x over bytes 4m .. 4m+3 of group g), sc[g, m] = the scale of sub-block
        2g for m < 4, 2g + 1 for m >= 4 (exact integers: any instruction set gives the same lanes)
    Q2_K: acc = fma(-xd * dmin, mins, acc), mins lane m = m[2m] * bsum[2m] + m[2m+1] * bsum[2m+1]
    acc = fma(xd * d, sumi, acc)   (8 f32 lanes)
    out = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))   (ggml's hsum_float_8)

ggml's generic C (other CPUs) sums the same integers in other lanes, so it differs from this in the
last bits of f32 rounding only.

    T = tokens, R = output rows, C = columns, S = C / 256 super-blocks
    out (T, R) f32; w (R, S * type_size) uint8; xq (T, C) int8; xd (T, S) f32; xb (T, C / 16) int32
    Q2_K (84 B): scales[16] (scale | min << 4 per 16 values), qs[64], d f16, dmin f16
        value = d * sc * q - dmin * m, q in 0..3
    Q3_K (110 B): hmask[32], qs[64], scales[12] (6-bit, packed), d f16
        value = d * (sc - 32) * q, q = low 2 bits - 4, + 4 when the hmask bit is set
    group g = 4n + k (values 32g .. 32g + 31): low 2 bits = bits 2k, 2k+1 of qs[32n ..], Q3_K's
    high bit = bit g of hmask[..]

The 2-bit quants go straight into `dot_scaled_k` (unsigned); Q3_K's values go in as ggml's do, two
unsigned parts (low 2 bits, and 4 where the hmask bit is clear) whose pair sums are subtracted before
the scales multiply them (`dot_scaled_sub`). Tokens go four at a time sharing the weight decoding;
the float operations of each token are the same in the tile and alone, so a row of a batch is
bit-identical to the row computed alone. Per super-block and token, one thread of a Zen 3 core runs
~80 (Q2_K) / ~110 (Q3_K) instructions of the one-token loop: 8-11 GB/s of weights from L2.
"""

from __future__ import annotations

from numba import njit, prange

from .intrinsics import get, load_bits, load_i8x32
from .intrinsics_k23 import (
    dot_scaled_sub,
    hsum_ggml,
    load_f16_after,
    load_f16_pair,
    mins_q2_k,
    prefetch_block,
    q3_k_parts,
    scales_q2_k,
    scales_q3_k,
)
from .ops import twins
from .vecops import dot_scaled_k, fma_i32, iadd, zero_f32x8, zero_i32x8

# Each super-block hints the CPU to fetch the weights this many bytes ahead, as q4kx8 does: on a
# 2-core Zen 3 it raised the best 2-thread matvec from DRAM by ~10-20 % (a global: a compile-time
# constant).
PREFETCH = 2048

# Helpers are inlined at Numba IR level; arrays are indexed by flat offsets (row slices would
# cost reference counting per row).


@njit(cache=True, nogil=True, inline="always")
def _q2_k_group(variant, w, o, g, sv, xq, xo, cols, i0, i1, i2, i3):
    """i0..i3 plus the scaled integer dots of group g with four tokens' super-blocks at xq[xo:],
    xq[xo + cols:], ..."""
    q = load_bits(w, o + 16 + 32 * (g >> 2), 2 * (g & 3), 3)
    x = xo + 32 * g
    i0 = iadd(i0, dot_scaled_k(variant, q, load_i8x32(xq, x), sv, g))
    i1 = iadd(i1, dot_scaled_k(variant, q, load_i8x32(xq, x + cols), sv, g))
    i2 = iadd(i2, dot_scaled_k(variant, q, load_i8x32(xq, x + 2 * cols), sv, g))
    i3 = iadd(i3, dot_scaled_k(variant, q, load_i8x32(xq, x + 3 * cols), sv, g))
    return i0, i1, i2, i3


@njit(cache=True, nogil=True, inline="always")
def _q2_k_group1(variant, w, o, g, sv, xq, xo, i0):
    """i0 plus the scaled integer dot of group g with one token's super-block at xq[xo:]."""
    q = load_bits(w, o + 16 + 32 * (g >> 2), 2 * (g & 3), 3)
    return iadd(i0, dot_scaled_k(variant, q, load_i8x32(xq, xo + 32 * g), sv, g))


def _matmul_q2_k(out, w, xq, xd, xb, variant):
    """Q2_K weights: per super-block, fma(-xd * dmin, mins, acc) then fma(xd * d, sumi, acc)."""
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
            for s in range(n_sb):
                o = ro + s * 84
                prefetch_block(w, o + PREFETCH, 42)
                sv = scales_q2_k(w, o)
                i0, i1, i2, i3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
                xo = x0 + s * 256
                for g in range(8):
                    i0, i1, i2, i3 = _q2_k_group(variant, w, o, g, sv, xq, xo, cols, i0, i1, i2, i3)
                d, dmin = load_f16_pair(variant, w, o + 80)
                f0, f1, f2, f3 = get(xd, e0 + s), get(xd, e1 + s), get(xd, e2 + s), get(xd, e3 + s)
                a0 = fma_i32(a0, mins_q2_k(variant, w, o, xb, b0 + s * 16), -f0 * dmin)
                a1 = fma_i32(a1, mins_q2_k(variant, w, o, xb, b1 + s * 16), -f1 * dmin)
                a2 = fma_i32(a2, mins_q2_k(variant, w, o, xb, b2 + s * 16), -f2 * dmin)
                a3 = fma_i32(a3, mins_q2_k(variant, w, o, xb, b3 + s * 16), -f3 * dmin)
                a0, a1 = fma_i32(a0, i0, f0 * d), fma_i32(a1, i1, f1 * d)
                a2, a3 = fma_i32(a2, i2, f2 * d), fma_i32(a3, i3, f3 * d)
            out[t, r] = hsum_ggml(a0)
            out[t + 1, r] = hsum_ggml(a1)
            out[t + 2, r] = hsum_ggml(a2)
            out[t + 3, r] = hsum_ggml(a3)
            t += 4
        while t < n_tok:
            x0, b0, e0 = t * cols, t * n16, t * n_sb
            a0 = zero_f32x8()
            for s in range(n_sb):
                o = ro + s * 84
                prefetch_block(w, o + PREFETCH, 42)
                sv = scales_q2_k(w, o)
                i0 = zero_i32x8()
                xo = x0 + s * 256
                for g in range(8):
                    i0 = _q2_k_group1(variant, w, o, g, sv, xq, xo, i0)
                f0 = get(xd, e0 + s)
                d, dmin = load_f16_pair(variant, w, o + 80)
                a0 = fma_i32(a0, mins_q2_k(variant, w, o, xb, b0 + s * 16), -f0 * dmin)
                a0 = fma_i32(a0, i0, f0 * d)
            out[t, r] = hsum_ggml(a0)
            t += 1


@njit(cache=True, nogil=True, inline="always")
def _q3_k_group(variant, w, o, g, sv, xq, xo, cols, i0, i1, i2, i3):
    """i0..i3 plus the scaled integer dots of group g with four tokens' super-blocks at xq[xo:], ..."""
    low, minus = q3_k_parts(w, o, g)
    x = xo + 32 * g
    i0 = iadd(i0, dot_scaled_sub(variant, low, minus, load_i8x32(xq, x), sv, g))
    i1 = iadd(i1, dot_scaled_sub(variant, low, minus, load_i8x32(xq, x + cols), sv, g))
    i2 = iadd(i2, dot_scaled_sub(variant, low, minus, load_i8x32(xq, x + 2 * cols), sv, g))
    i3 = iadd(i3, dot_scaled_sub(variant, low, minus, load_i8x32(xq, x + 3 * cols), sv, g))
    return i0, i1, i2, i3


@njit(cache=True, nogil=True, inline="always")
def _q3_k_group1(variant, w, o, g, sv, xq, xo, i0):
    """i0 plus the scaled integer dot of group g with one token's super-block at xq[xo:]."""
    low, minus = q3_k_parts(w, o, g)
    return iadd(i0, dot_scaled_sub(variant, low, minus, load_i8x32(xq, xo + 32 * g), sv, g))


def _matmul_q3_k(out, w, xq, xd, xb, variant):
    """Q3_K weights: per super-block, fma(xd * d, sumi, acc); xb is not needed (the -4 is in the values)."""
    n_tok, n_row = out.shape
    rb, cols, n_sb = w.shape[1], xq.shape[1], xd.shape[1]
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0 = t * cols  # xq row of token t (the other three follow, cols apart)
            e0, e1, e2, e3 = t * n_sb, (t + 1) * n_sb, (t + 2) * n_sb, (t + 3) * n_sb  # xd rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for s in range(n_sb):
                o = ro + s * 110
                prefetch_block(w, o + PREFETCH, 55)
                sv = scales_q3_k(w, o + 96)
                i0, i1, i2, i3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
                xo = x0 + s * 256
                for g in range(8):
                    i0, i1, i2, i3 = _q3_k_group(variant, w, o, g, sv, xq, xo, cols, i0, i1, i2, i3)
                d = load_f16_after(variant, w, o + 106)
                a0, a1 = fma_i32(a0, i0, get(xd, e0 + s) * d), fma_i32(a1, i1, get(xd, e1 + s) * d)
                a2, a3 = fma_i32(a2, i2, get(xd, e2 + s) * d), fma_i32(a3, i3, get(xd, e3 + s) * d)
            out[t, r] = hsum_ggml(a0)
            out[t + 1, r] = hsum_ggml(a1)
            out[t + 2, r] = hsum_ggml(a2)
            out[t + 3, r] = hsum_ggml(a3)
            t += 4
        while t < n_tok:
            x0, e0 = t * cols, t * n_sb
            a0 = zero_f32x8()
            for s in range(n_sb):
                o = ro + s * 110
                prefetch_block(w, o + PREFETCH, 55)
                sv = scales_q3_k(w, o + 96)
                i0 = zero_i32x8()
                xo = x0 + s * 256
                for g in range(8):
                    i0 = _q3_k_group1(variant, w, o, g, sv, xq, xo, i0)
                a0 = fma_i32(a0, i0, get(xd, e0 + s) * load_f16_after(variant, w, o + 106))
            out[t, r] = hsum_ggml(a0)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_q2_k, matmul_q2_k_serial = twins(_matmul_q2_k)
matmul_q3_k, matmul_q3_k_serial = twins(_matmul_q3_k)
