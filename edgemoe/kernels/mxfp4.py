"""MXFP4 weights (gpt-oss's experts) times Q8_0-style int8 activations, parallel over output rows.

Mirrors ggml's ggml_vec_dot_mxfp4_q8_0 (ggml-cpu/quants.c, the generic C): per 32-value block, the
exact integer dot `sumi` of the weights' kvalues (E2M1 doubled, int8 in [-12, 12]) with the int8
activations, then one f32 term `(d_x * d_w) * sumi`, d_w = 2**(e - 128) (e8m0_to_fp32_half, exact),
d_x the activation block's scale (f32 here; ggml rounds it to f16, see `q8act`). Every term has the
bits of ggml's; they are summed in this order:

    lane k of an f32x8 adds the terms of blocks 8g + k for g = 0, 1, ... (whole groups of 8 blocks);
    out = (((0 + lane 0) + lane 1) + ... + lane 7), then + each of the last nb % 8 blocks' terms in order.

ggml's generic loop adds the terms in block order instead (and its AVX2 loop keeps 8 lanes of FMAs,
so its own ISAs disagree in the last bits); tests/test_mxfp4.py emulates this order bit for bit and
ggml's within summation-order error.

    T = tokens, R = output rows, C = columns, B = C / 32 blocks
    out (T, R) f32; w (R, B * 17) uint8 blocks; xq (T, C) int8 in the pair layout, xd (T, B) f32 and
    xs (T, B) int32 block sums, from `q8act.quantize_q8_0_sums`
    MXFP4 block (17 B): e (E8M0) | qs uint8[16] (low nibbles = elements 0..15, high = 16..31)

Blocks go in pairs, as Q4_0's (`load_mxfp4_pair`, one vpshufb per 16 values); the values carry an
offset of 12 so they are unsigned, and 12 * the activation block's integer sum is taken back from
each block's dot (see `intrinsics_fp4`). The four pairs of a group of 8 blocks fold into one vector
of per-block sums with three vphaddd: the f32 conversion and scaling then happen once per block, as
in ggml, not once per lane. Tokens go four at a time; the four decodes of a weight block are the
same pure operations on the same bytes, which LLVM merges. A token left over runs exactly the
per-token operations of the tile, so a row of a batch is bit-identical to the same row computed
alone. No 8-row interleaved layout yet.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get, load_f32x8, load_i8x32
from .intrinsics_fp4 import OFFSET, block_sums8, e8m0_half, fmul_i32, isum, load_mxfp4, load_mxfp4_pair, scales8_e8m0
from .ops import twins
from .vecops import dot, dot2, fadd, fmul, hsum, zero_f32x8


@njit(cache=True, nogil=True, inline="always")
def _dot_pair(variant, w, wo, x, xo):
    """Partial sums of blocks wo, wo + 17 (their E8M0 bytes) with their pair-layout activations at
    x[xo : xo + 64]: lanes 0..3 the first block's, 4..7 the second's."""
    lo, hi = load_mxfp4_pair(variant, w, wo + 1, 17)
    return dot2(variant, lo, load_i8x32(x, xo), hi, load_i8x32(x, xo + 32))


@njit(cache=True, nogil=True, inline="always")
def _sums8(variant, w, wo, x, xo, xs, so):
    """Exact integer dots of the 8 blocks from w[wo] with the activations from x[xo]: lane k = block k."""
    return block_sums8(_dot_pair(variant, w, wo, x, xo), _dot_pair(variant, w, wo + 34, x, xo + 64),
                       _dot_pair(variant, w, wo + 68, x, xo + 128), _dot_pair(variant, w, wo + 102, x, xo + 192),
                       xs, so)


@njit(cache=True, nogil=True, inline="always")
def _tail(r, variant, w, wo, b, nb, x, xo, xd, xs, so):
    """r + the terms of blocks b .. nb - 1 added in block order (fewer than 8: pairs, then a last odd
    block in the plain layout), each d_x * d_w * sumi rounded as ggml's."""
    while b + 1 < nb:
        p = _dot_pair(variant, w, wo, x, xo)
        s0 = isum(p, 0) - OFFSET * get(xs, so)
        s1 = isum(p, 1) - OFFSET * get(xs, so + 1)
        r += (get(xd, so) * e8m0_half(w, wo)) * np.float32(s0)
        r += (get(xd, so + 1) * e8m0_half(w, wo + 17)) * np.float32(s1)
        b, wo, xo, so = b + 2, wo + 34, xo + 64, so + 2
    if b < nb:
        s0 = isum(dot(variant, load_mxfp4(variant, w, wo + 1), load_i8x32(x, xo)), 2) - OFFSET * get(xs, so)
        r += (get(xd, so) * e8m0_half(w, wo)) * np.float32(s0)
    return r


def _matmul_mxfp4(out, w, xq, xd, xs, variant):
    """out[t, r] = sum_b (xd[t,b] * d_w[r,b]) * (q_w . q_x), each block's term rounded once."""
    n_tok, n_row = out.shape
    rb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    n8 = nb // 8 * 8
    for r in prange(n_row):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # xq rows
            d0, d1, d2, d3 = t * nb, (t + 1) * nb, (t + 2) * nb, (t + 3) * nb  # xd, xs rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            b = 0
            while b < n8:
                wo, xo = ro + b * 17, b * 32
                dw = scales8_e8m0(variant, w, wo, 17)  # (8,) block scales
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo, xs, d0 + b), fmul(load_f32x8(xd, d0 + b), dw)))
                a1 = fadd(a1, fmul_i32(_sums8(variant, w, wo, xq, x1 + xo, xs, d1 + b), fmul(load_f32x8(xd, d1 + b), dw)))
                a2 = fadd(a2, fmul_i32(_sums8(variant, w, wo, xq, x2 + xo, xs, d2 + b), fmul(load_f32x8(xd, d2 + b), dw)))
                a3 = fadd(a3, fmul_i32(_sums8(variant, w, wo, xq, x3 + xo, xs, d3 + b), fmul(load_f32x8(xd, d3 + b), dw)))
                b += 8
            wo, xo = ro + n8 * 17, n8 * 32
            out[t, r] = _tail(hsum(a0), variant, w, wo, n8, nb, xq, x0 + xo, xd, xs, d0 + n8)
            out[t + 1, r] = _tail(hsum(a1), variant, w, wo, n8, nb, xq, x1 + xo, xd, xs, d1 + n8)
            out[t + 2, r] = _tail(hsum(a2), variant, w, wo, n8, nb, xq, x2 + xo, xd, xs, d2 + n8)
            out[t + 3, r] = _tail(hsum(a3), variant, w, wo, n8, nb, xq, x3 + xo, xd, xs, d3 + n8)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0 = zero_f32x8()
            b = 0
            while b < n8:
                wo, xo = ro + b * 17, b * 32
                dw = scales8_e8m0(variant, w, wo, 17)
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo, xs, d0 + b), fmul(load_f32x8(xd, d0 + b), dw)))
                b += 8
            out[t, r] = _tail(hsum(a0), variant, w, ro + n8 * 17, n8, nb, xq, x0 + n8 * 32, xd, xs, d0 + n8)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_mxfp4, matmul_mxfp4_serial = twins(_matmul_mxfp4)
