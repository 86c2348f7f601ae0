"""Q8_0 and Q4_0 weights times Q8_0-style int8 activations, parallel over output rows.

Mirrors ggml's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0: per 32-element block an exact integer dot,
scaled by d_w * d_x and accumulated in f32.

    T = tokens, R = output rows, C = columns, B = C / 32 blocks
    out (T, R) f32; w (R, B * type_size) uint8 blocks; xq (T, C) int8; xd, xs (T, B) f32
    Q8_0 block (34 B): d f16, qs int8[32]
    Q4_0 block (18 B): d f16, qs uint8[16] (low nibbles = elements 0..15, high = 16..31), value q - 8

Blocks go in groups of 8 so their scales convert with one vcvtph2ps and multiply with the
activation scales as one vector (per-block scalar conversion was the bottleneck); fewer than 8
blocks at the end take a scalar route. Q4_0 blocks go in pairs (`load_q4_0_pair`), with the
activations in the matching pair layout. Tokens go four at a time so each decoded weight block is
reused from registers. A token left over (decode, or T not a multiple of 4) runs exactly the
per-token float operations of the 4-token tile, so a row of a batch is bit-identical to the same
row computed alone (two accumulators per token would hide FMA latency, but measured no faster:
decode is bound by memory and block decoding, and the tile has no registers for eight).
Arrays are indexed by flat offsets (no row slices, which cost reference counting per row).
"""

from __future__ import annotations

from numba import njit, prange

from .intrinsics import get, load_f16, load_f32x8, load_i8x32, load_q4_0, load_q4_0_pair, scales8_f16
from .ops import twins
from .vecops import abs_sign, dot, dot2, ffma, fma_halves, fma_i32, fma_lane, fma_pair, fmul, hsum, zero_f32x8


@njit(cache=True, nogil=True, inline="always")
def _dot_pair(variant, lo, hi, x, xo):
    """Integer dots of a Q4_0 block pair with its pair-layout activations at x[xo : xo + 64]."""
    return dot2(variant, lo, load_i8x32(x, xo), hi, load_i8x32(x, xo + 32))


def _matmul_q4_0(out, w, xq, xd, xs, variant):
    """out[t, r] = sum_b d_w[r,b] * (xd[t,b] * (q_w . q_x) - 8 * xs[t,b]) for Q4_0 weights.

    xq is in the pair layout of `quantize_q8_0(..., pairs=1)`.
    """
    n_tok, n_row = out.shape
    rb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # xq rows
            d0, d1, d2, d3 = t * nb, (t + 1) * nb, (t + 2) * nb, (t + 3) * nb  # xd, xs rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            c0, c1, c2, c3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            b = 0
            while b + 8 <= nb:
                dw = scales8_f16(variant, w, ro + b * 18, 18)  # (8,) block scales
                e0, e1 = fmul(dw, load_f32x8(xd, d0 + b)), fmul(dw, load_f32x8(xd, d1 + b))
                e2, e3 = fmul(dw, load_f32x8(xd, d2 + b)), fmul(dw, load_f32x8(xd, d3 + b))
                c0, c1 = ffma(dw, load_f32x8(xs, d0 + b), c0), ffma(dw, load_f32x8(xs, d1 + b), c1)
                c2, c3 = ffma(dw, load_f32x8(xs, d2 + b), c2), ffma(dw, load_f32x8(xs, d3 + b), c3)
                for k in range(0, 8, 2):
                    lo, hi = load_q4_0_pair(w, ro + (b + k) * 18 + 2, 18)
                    xo = (b + k) * 32
                    a0 = fma_pair(variant, a0, _dot_pair(variant, lo, hi, xq, x0 + xo), e0, k)
                    a1 = fma_pair(variant, a1, _dot_pair(variant, lo, hi, xq, x1 + xo), e1, k)
                    a2 = fma_pair(variant, a2, _dot_pair(variant, lo, hi, xq, x2 + xo), e2, k)
                    a3 = fma_pair(variant, a3, _dot_pair(variant, lo, hi, xq, x3 + xo), e3, k)
                b += 8
            r0, r1, r2, r3 = hsum(c0), hsum(c1), hsum(c2), hsum(c3)
            while b < nb:  # fewer than 8 blocks left: pairs, then a last odd block
                dw, xo = load_f16(variant, w, ro + b * 18), b * 32
                if b + 1 < nb:
                    dv = load_f16(variant, w, ro + b * 18 + 18)
                    lo, hi = load_q4_0_pair(w, ro + b * 18 + 2, 18)
                    p0 = _dot_pair(variant, lo, hi, xq, x0 + xo)
                    p1 = _dot_pair(variant, lo, hi, xq, x1 + xo)
                    p2 = _dot_pair(variant, lo, hi, xq, x2 + xo)
                    p3 = _dot_pair(variant, lo, hi, xq, x3 + xo)
                    a0 = fma_halves(a0, p0, dw * get(xd, d0 + b), dv * get(xd, d0 + b + 1))
                    a1 = fma_halves(a1, p1, dw * get(xd, d1 + b), dv * get(xd, d1 + b + 1))
                    a2 = fma_halves(a2, p2, dw * get(xd, d2 + b), dv * get(xd, d2 + b + 1))
                    a3 = fma_halves(a3, p3, dw * get(xd, d3 + b), dv * get(xd, d3 + b + 1))
                    r0 += dw * get(xs, d0 + b) + dv * get(xs, d0 + b + 1)
                    r1 += dw * get(xs, d1 + b) + dv * get(xs, d1 + b + 1)
                    r2 += dw * get(xs, d2 + b) + dv * get(xs, d2 + b + 1)
                    r3 += dw * get(xs, d3 + b) + dv * get(xs, d3 + b + 1)
                else:  # the last odd block keeps the plain layout
                    q = load_q4_0(w, ro + b * 18 + 2)
                    a0 = fma_i32(a0, dot(variant, q, load_i8x32(xq, x0 + xo)), dw * get(xd, d0 + b))
                    a1 = fma_i32(a1, dot(variant, q, load_i8x32(xq, x1 + xo)), dw * get(xd, d1 + b))
                    a2 = fma_i32(a2, dot(variant, q, load_i8x32(xq, x2 + xo)), dw * get(xd, d2 + b))
                    a3 = fma_i32(a3, dot(variant, q, load_i8x32(xq, x3 + xo)), dw * get(xd, d3 + b))
                    r0, r1 = r0 + dw * get(xs, d0 + b), r1 + dw * get(xs, d1 + b)
                    r2, r3 = r2 + dw * get(xs, d2 + b), r3 + dw * get(xs, d3 + b)
                b += 2
            out[t, r] = hsum(a0) - 8 * r0
            out[t + 1, r] = hsum(a1) - 8 * r1
            out[t + 2, r] = hsum(a2) - 8 * r2
            out[t + 3, r] = hsum(a3) - 8 * r3
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0, c0 = zero_f32x8(), zero_f32x8()
            b = 0
            while b + 8 <= nb:
                dw = scales8_f16(variant, w, ro + b * 18, 18)  # (8,) block scales
                e0 = fmul(dw, load_f32x8(xd, d0 + b))
                c0 = ffma(dw, load_f32x8(xs, d0 + b), c0)
                for k in range(0, 8, 2):
                    lo, hi = load_q4_0_pair(w, ro + (b + k) * 18 + 2, 18)
                    a0 = fma_pair(variant, a0, _dot_pair(variant, lo, hi, xq, x0 + (b + k) * 32), e0, k)
                b += 8
            r0 = hsum(c0)
            while b < nb:  # fewer than 8 blocks left: pairs, then a last odd block
                dw = load_f16(variant, w, ro + b * 18)
                if b + 1 < nb:
                    dv = load_f16(variant, w, ro + b * 18 + 18)
                    lo, hi = load_q4_0_pair(w, ro + b * 18 + 2, 18)
                    p0 = _dot_pair(variant, lo, hi, xq, x0 + b * 32)
                    a0 = fma_halves(a0, p0, dw * get(xd, d0 + b), dv * get(xd, d0 + b + 1))
                    r0 += dw * get(xs, d0 + b) + dv * get(xs, d0 + b + 1)
                else:  # the last odd block keeps the plain layout
                    p0 = dot(variant, load_q4_0(w, ro + b * 18 + 2), load_i8x32(xq, x0 + b * 32))
                    a0 = fma_i32(a0, p0, dw * get(xd, d0 + b))
                    r0 += dw * get(xs, d0 + b)
                b += 2
            out[t, r] = hsum(a0) - 8 * r0
            t += 1


@njit(cache=True, nogil=True, inline="always")
def _dot_q8(variant, q, x, xo):
    """Integer dot of signed Q8_0 weights `q` with the activations at x[xo : xo + 32]."""
    u, v = abs_sign(variant, q, load_i8x32(x, xo))
    return dot(variant, u, v)


def _matmul_q8_0(out, w, xq, xd, variant):
    """out[t, r] = sum_b d_w[r,b] * xd[t,b] * (q_w . q_x) for Q8_0 weights."""
    n_tok, n_row = out.shape
    rb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # xq rows
            d0, d1, d2, d3 = t * nb, (t + 1) * nb, (t + 2) * nb, (t + 3) * nb  # xd rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            b = 0
            while b + 8 <= nb:
                dw = scales8_f16(variant, w, ro + b * 34, 34)  # (8,) block scales
                e0, e1 = fmul(dw, load_f32x8(xd, d0 + b)), fmul(dw, load_f32x8(xd, d1 + b))
                e2, e3 = fmul(dw, load_f32x8(xd, d2 + b)), fmul(dw, load_f32x8(xd, d3 + b))
                for k in range(8):
                    q = load_i8x32(w, ro + (b + k) * 34 + 2)
                    xo = (b + k) * 32
                    a0 = fma_lane(variant, a0, _dot_q8(variant, q, xq, x0 + xo), e0, k)
                    a1 = fma_lane(variant, a1, _dot_q8(variant, q, xq, x1 + xo), e1, k)
                    a2 = fma_lane(variant, a2, _dot_q8(variant, q, xq, x2 + xo), e2, k)
                    a3 = fma_lane(variant, a3, _dot_q8(variant, q, xq, x3 + xo), e3, k)
                b += 8
            while b < nb:
                dw = load_f16(variant, w, ro + b * 34)
                q = load_i8x32(w, ro + b * 34 + 2)
                xo = b * 32
                a0 = fma_i32(a0, _dot_q8(variant, q, xq, x0 + xo), dw * get(xd, d0 + b))
                a1 = fma_i32(a1, _dot_q8(variant, q, xq, x1 + xo), dw * get(xd, d1 + b))
                a2 = fma_i32(a2, _dot_q8(variant, q, xq, x2 + xo), dw * get(xd, d2 + b))
                a3 = fma_i32(a3, _dot_q8(variant, q, xq, x3 + xo), dw * get(xd, d3 + b))
                b += 1
            out[t, r] = hsum(a0)
            out[t + 1, r] = hsum(a1)
            out[t + 2, r] = hsum(a2)
            out[t + 3, r] = hsum(a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0 = zero_f32x8()
            b = 0
            while b + 8 <= nb:
                e0 = fmul(scales8_f16(variant, w, ro + b * 34, 34), load_f32x8(xd, d0 + b))
                for k in range(8):
                    q = load_i8x32(w, ro + (b + k) * 34 + 2)
                    a0 = fma_lane(variant, a0, _dot_q8(variant, q, xq, x0 + (b + k) * 32), e0, k)
                b += 8
            while b < nb:
                dw = load_f16(variant, w, ro + b * 34)
                q = load_i8x32(w, ro + b * 34 + 2)
                a0 = fma_i32(a0, _dot_q8(variant, q, xq, x0 + b * 32), dw * get(xd, d0 + b))
                b += 1
            out[t, r] = hsum(a0)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_q4_0, matmul_q4_0_serial = twins(_matmul_q4_0)
matmul_q8_0, matmul_q8_0_serial = twins(_matmul_q8_0)
