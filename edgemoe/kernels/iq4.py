"""IQ4_NL and IQ4_XS weights times int8 activations, parallel over output rows.

Both decode 4-bit codes through kvalues_iq4nl (16 int8 levels in [-127, 113], `intrinsics_iq4`).

    T = tokens, R = output rows, C = columns, B = C / 32 blocks, S = C / 256 super-blocks
    IQ4_NL block (18 B): d f16 | qs[16] (low nibbles = elements 0..15, high = 16..31)
    IQ4_XS super-block (136 B): d f16 | scales_h u16 | scales_l[4] | qs[128]; sub-block i (32 values)
        has codes qs[16i : 16i + 16] as an IQ4_NL block and the 6-bit scale ls_i - 32

IQ4_NL mirrors ggml's ggml_vec_dot_iq4_nl_q8_0 (generic C): per block the exact integer dot `sumi`,
then one f32 term (d_x * d_w) * sumi, d_x the Q8_0 activation block's scale (f32 here; ggml rounds it
to f16, see `q8act`). The terms are summed as the MXFP4 kernel sums its own:

    lane k of an f32x8 adds the terms of blocks 8g + k for g = 0, 1, ... (whole groups of 8 blocks);
    out = (((0 + lane 0) + lane 1) + ... + lane 7), then + each of the last nb % 8 blocks' terms in order.

    out (T, R) f32; w (R, B * 18) uint8; xq (T, C) int8 in the pair layout, xd (T, B) f32 (xs unused),
    from `q8act.quantize_q8_0(..., pairs=1)`

IQ4_XS mirrors ggml's AVX2 ggml_vec_dot_iq4_xs_q8_K bit for bit: per super-block, lane i of an i32x8
holds sum over sub-blocks j of (ls_j - 32) * (the dot of elements 4i..4i+3 of sub-block j), exact;
then acc = fma(float(lane), d_w * d_x, acc) lane-wise, one super-block after the other; out = ggml's
hsum_float_8 of the 8 lanes, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). The Q8_K activations
have f32 scales in ggml too, so with the same activation blocks the output has ggml's bits.

    out (T, R) f32; w (R, S * 136) uint8; xq (T, C) int8, xd (T, S) f32 (xs unused), from
    `q8act.quantize_q8_k`

Tokens go four at a time; the four decodes of a weight block are the same pure operations on the same
bytes, which LLVM merges. A token left over runs exactly the per-token operations of the tile, so a row
of a batch is bit-identical to the same row computed alone. No 8-row interleaved layout yet.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get, load_f16, load_f32x8, load_i8x32, load_q4_0, load_q4_0_pair, scales8_f16
from .intrinsics_fp4 import fmul_i32, isum
from .intrinsics_iq4 import block_sums8, dot_signed2, kvalues_iq4, load_codes2, scales_iq4_xs
from .intrinsics_k23 import hsum_ggml  # ggml's hsum_float_8 order
from .ops import twins
from .vecops import abs_sign, dot, dot_scaled_k, fadd, fma_i32, fmul, hsum, iadd, zero_f32x8, zero_i32x8

# ---- IQ4_NL --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _dot_pair(variant, w, wo, x, xo):
    """Partial sums of the blocks at wo, wo + 18 (their f16 scales) with their pair-layout activations
    at x[xo : xo + 64]: lanes 0..3 the first block's, 4..7 the second's."""
    lo, hi = load_q4_0_pair(w, wo + 2, 18)
    return dot_signed2(variant, kvalues_iq4(variant, lo), load_i8x32(x, xo), kvalues_iq4(variant, hi), load_i8x32(x, xo + 32))


@njit(cache=True, nogil=True, inline="always")
def _sums8(variant, w, wo, x, xo):
    """Exact integer dots of the 8 blocks from w[wo] with the activations from x[xo]: lane k = block k."""
    return block_sums8(_dot_pair(variant, w, wo, x, xo), _dot_pair(variant, w, wo + 36, x, xo + 64),
                       _dot_pair(variant, w, wo + 72, x, xo + 128), _dot_pair(variant, w, wo + 108, x, xo + 192))


@njit(cache=True, nogil=True, inline="always")
def _tail_nl(r, variant, w, wo, b, nb, x, xo, xd, so):
    """r + the terms of blocks b .. nb - 1 added in block order (fewer than 8: pairs, then a last odd
    block in the plain layout), each (d_x * d_w) * sumi rounded as ggml's."""
    while b + 1 < nb:
        p = _dot_pair(variant, w, wo, x, xo)
        r += (get(xd, so) * load_f16(variant, w, wo)) * np.float32(isum(p, 0))
        r += (get(xd, so + 1) * load_f16(variant, w, wo + 18)) * np.float32(isum(p, 1))
        b, wo, xo, so = b + 2, wo + 36, xo + 64, so + 2
    if b < nb:
        u, v = abs_sign(variant, kvalues_iq4(variant, load_q4_0(w, wo + 2)), load_i8x32(x, xo))
        s0 = isum(dot(variant, u, v), 2)
        r += (get(xd, so) * load_f16(variant, w, wo)) * np.float32(s0)
    return r


def _matmul_iq4_nl(out, w, xq, xd, xs, variant):
    """out[t, r] = sum_b (xd[t,b] * d_w[r,b]) * (kvalues(q_w) . q_x), each block's term rounded once."""
    n_tok, n_row = out.shape
    rb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    n8 = nb // 8 * 8
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # xq rows
            d0, d1, d2, d3 = t * nb, (t + 1) * nb, (t + 2) * nb, (t + 3) * nb  # xd rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            b = 0
            while b < n8:
                wo, xo = ro + b * 18, b * 32
                dw = scales8_f16(variant, w, wo, 18)  # (8,) block scales
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo), fmul(load_f32x8(xd, d0 + b), dw)))
                a1 = fadd(a1, fmul_i32(_sums8(variant, w, wo, xq, x1 + xo), fmul(load_f32x8(xd, d1 + b), dw)))
                a2 = fadd(a2, fmul_i32(_sums8(variant, w, wo, xq, x2 + xo), fmul(load_f32x8(xd, d2 + b), dw)))
                a3 = fadd(a3, fmul_i32(_sums8(variant, w, wo, xq, x3 + xo), fmul(load_f32x8(xd, d3 + b), dw)))
                b += 8
            wo, xo = ro + n8 * 18, n8 * 32
            out[t, r] = _tail_nl(hsum(a0), variant, w, wo, n8, nb, xq, x0 + xo, xd, d0 + n8)
            out[t + 1, r] = _tail_nl(hsum(a1), variant, w, wo, n8, nb, xq, x1 + xo, xd, d1 + n8)
            out[t + 2, r] = _tail_nl(hsum(a2), variant, w, wo, n8, nb, xq, x2 + xo, xd, d2 + n8)
            out[t + 3, r] = _tail_nl(hsum(a3), variant, w, wo, n8, nb, xq, x3 + xo, xd, d3 + n8)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0 = zero_f32x8()
            b = 0
            while b < n8:
                wo, xo = ro + b * 18, b * 32
                dw = scales8_f16(variant, w, wo, 18)
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo), fmul(load_f32x8(xd, d0 + b), dw)))
                b += 8
            out[t, r] = _tail_nl(hsum(a0), variant, w, ro + n8 * 18, n8, nb, xq, x0 + n8 * 32, xd, d0 + n8)
            t += 1


# ---- IQ4_XS --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _sub_dot(variant, q, x, xo, sv, j):
    """(ls_j - 32) * the dot of sub-block j's levels `q` with x[xo : xo + 32], as 8 lane sums."""
    u, v = abs_sign(variant, q, load_i8x32(x, xo))
    return dot_scaled_k(variant, u, v, sv, j)


@njit(cache=True, nogil=True, inline="always")
def _sub4(variant, q, j, sv, xq, xo, cols, i0, i1, i2, i3):
    """i0..i3 plus the scaled dots of sub-block j (levels `q`) with the super-blocks at xq[xo:],
    xq[xo + cols:], ... of four consecutive tokens."""
    xo += 32 * j
    i0 = iadd(i0, _sub_dot(variant, q, xq, xo, sv, j))
    i1 = iadd(i1, _sub_dot(variant, q, xq, xo + cols, sv, j))
    i2 = iadd(i2, _sub_dot(variant, q, xq, xo + 2 * cols, sv, j))
    i3 = iadd(i3, _sub_dot(variant, q, xq, xo + 3 * cols, sv, j))
    return i0, i1, i2, i3


@njit(cache=True, nogil=True, inline="always")
def _pair4(variant, w, o, j, sv, xq, xo, cols, i0, i1, i2, i3):
    """`_sub4` of sub-blocks j and j + 1 of the super-block at w[o]."""
    c0, c1 = load_codes2(w, o + 8 + 16 * j)
    i0, i1, i2, i3 = _sub4(variant, kvalues_iq4(variant, c0), j, sv, xq, xo, cols, i0, i1, i2, i3)
    return _sub4(variant, kvalues_iq4(variant, c1), j + 1, sv, xq, xo, cols, i0, i1, i2, i3)


@njit(cache=True, nogil=True, inline="always")
def _pair1(variant, w, o, j, sv, xq, xo, i0):
    """i0 plus the scaled dots of sub-blocks j, j + 1 with one token's super-block at xq[xo:]."""
    c0, c1 = load_codes2(w, o + 8 + 16 * j)
    i0 = iadd(i0, _sub_dot(variant, kvalues_iq4(variant, c0), xq, xo + 32 * j, sv, j))
    return iadd(i0, _sub_dot(variant, kvalues_iq4(variant, c1), xq, xo + 32 * j + 32, sv, j + 1))


def _matmul_iq4_xs(out, w, xq, xd, xs, variant):
    """out[t, r] = hsum_ggml(sum_s fma lanes of (d_w[r,s] * xd[t,s]) * sum_j (ls_j - 32) * lane dots)."""
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
                o = ro + s * 136
                sv = scales_iq4_xs(w, o)
                i0, i1, i2, i3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
                # the sub-blocks written out: a constant j folds the scale shuffles
                xo = x0 + s * 256
                i0, i1, i2, i3 = _pair4(variant, w, o, 0, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _pair4(variant, w, o, 2, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _pair4(variant, w, o, 4, sv, xq, xo, cols, i0, i1, i2, i3)
                i0, i1, i2, i3 = _pair4(variant, w, o, 6, sv, xq, xo, cols, i0, i1, i2, i3)
                d = load_f16(variant, w, o)
                a0, a1 = fma_i32(a0, i0, d * get(xd, e0 + s)), fma_i32(a1, i1, d * get(xd, e1 + s))
                a2, a3 = fma_i32(a2, i2, d * get(xd, e2 + s)), fma_i32(a3, i3, d * get(xd, e3 + s))
            out[t, r] = hsum_ggml(a0)
            out[t + 1, r] = hsum_ggml(a1)
            out[t + 2, r] = hsum_ggml(a2)
            out[t + 3, r] = hsum_ggml(a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, e0 = t * cols, t * n_sb
            a0 = zero_f32x8()
            for s in range(n_sb):
                o = ro + s * 136
                sv = scales_iq4_xs(w, o)
                i0 = zero_i32x8()
                xo = x0 + s * 256
                i0 = _pair1(variant, w, o, 0, sv, xq, xo, i0)
                i0 = _pair1(variant, w, o, 2, sv, xq, xo, i0)
                i0 = _pair1(variant, w, o, 4, sv, xq, xo, i0)
                i0 = _pair1(variant, w, o, 6, sv, xq, xo, i0)
                a0 = fma_i32(a0, i0, load_f16(variant, w, o) * get(xd, e0 + s))
            out[t, r] = hsum_ggml(a0)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_iq4_nl, matmul_iq4_nl_serial = twins(_matmul_iq4_nl)
matmul_iq4_xs, matmul_iq4_xs_serial = twins(_matmul_iq4_xs)
