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
    out (T, R) f32; w (R, B * 17) uint8 blocks; xq (T, C) int8 (plain Q8_0 layout); xd (T, B) f32
    MXFP4 block (17 B): e (E8M0) | qs uint8[16] (low nibbles = elements 0..15, high = 16..31)

The 8 blocks of a group give 8 vectors of partial sums, folded into one vector of per-block sums by
a vphaddd tree: the f32 conversion and scaling then happen once per block, as in ggml, not once per
lane. Tokens go four at a time; the four decodes of a weight block are the same pure operations on
the same bytes, which LLVM merges. A token left over runs exactly the per-token operations of the
tile, so a row of a batch is bit-identical to the same row computed alone. No interleaved layout yet.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get, load_f32x8, load_i8x32
from .intrinsics_fp4 import block_sums8, e8m0_half, fmul_i32, isum, load_mxfp4, scales8_e8m0
from .ops import twins
from .vecops import abs_sign, dot, fadd, fmul, hsum, zero_f32x8


@njit(cache=True, nogil=True, inline="always")
def _dot(variant, w, wo, x, xo):
    """Partial sums (i32x8) of the block at w[wo] (its E8M0 byte) dotted with x[xo : xo + 32]."""
    u, v = abs_sign(variant, load_mxfp4(variant, w, wo + 1), load_i8x32(x, xo))
    return dot(variant, u, v)


@njit(cache=True, nogil=True, inline="always")
def _sums8(variant, w, wo, x, xo):
    """Exact integer dots of the 8 blocks from w[wo] with the activations from x[xo]: lane k = block k."""
    return block_sums8(_dot(variant, w, wo, x, xo), _dot(variant, w, wo + 17, x, xo + 32),
                       _dot(variant, w, wo + 34, x, xo + 64), _dot(variant, w, wo + 51, x, xo + 96),
                       _dot(variant, w, wo + 68, x, xo + 128), _dot(variant, w, wo + 85, x, xo + 160),
                       _dot(variant, w, wo + 102, x, xo + 192), _dot(variant, w, wo + 119, x, xo + 224))


@njit(cache=True, nogil=True, inline="always")
def _term(variant, w, wo, x, xo, d):
    """One block's f32 term d * sumi (d = d_x * d_w), for the blocks after the last group of 8."""
    return d * np.float32(isum(_dot(variant, w, wo, x, xo)))


def _matmul_mxfp4(out, w, xq, xd, variant):
    """out[t, r] = sum_b (xd[t,b] * d_w[r,b]) * (q_w . q_x), each block's term rounded once."""
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
                wo, xo = ro + b * 17, b * 32
                dw = scales8_e8m0(w, wo, 17)  # (8,) block scales
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo), fmul(load_f32x8(xd, d0 + b), dw)))
                a1 = fadd(a1, fmul_i32(_sums8(variant, w, wo, xq, x1 + xo), fmul(load_f32x8(xd, d1 + b), dw)))
                a2 = fadd(a2, fmul_i32(_sums8(variant, w, wo, xq, x2 + xo), fmul(load_f32x8(xd, d2 + b), dw)))
                a3 = fadd(a3, fmul_i32(_sums8(variant, w, wo, xq, x3 + xo), fmul(load_f32x8(xd, d3 + b), dw)))
                b += 8
            r0, r1, r2, r3 = hsum(a0), hsum(a1), hsum(a2), hsum(a3)
            while b < nb:
                wo, xo = ro + b * 17, b * 32
                dw = e8m0_half(w, wo)
                r0 += _term(variant, w, wo, xq, x0 + xo, get(xd, d0 + b) * dw)
                r1 += _term(variant, w, wo, xq, x1 + xo, get(xd, d1 + b) * dw)
                r2 += _term(variant, w, wo, xq, x2 + xo, get(xd, d2 + b) * dw)
                r3 += _term(variant, w, wo, xq, x3 + xo, get(xd, d3 + b) * dw)
                b += 1
            out[t, r] = r0
            out[t + 1, r] = r1
            out[t + 2, r] = r2
            out[t + 3, r] = r3
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0 = zero_f32x8()
            b = 0
            while b < n8:
                wo, xo = ro + b * 17, b * 32
                dw = scales8_e8m0(w, wo, 17)
                a0 = fadd(a0, fmul_i32(_sums8(variant, w, wo, xq, x0 + xo), fmul(load_f32x8(xd, d0 + b), dw)))
                b += 8
            r0 = hsum(a0)
            while b < nb:
                wo = ro + b * 17
                r0 += _term(variant, w, wo, xq, x0 + b * 32, get(xd, d0 + b) * e8m0_half(w, wo))
                b += 1
            out[t, r] = r0
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_mxfp4, matmul_mxfp4_serial = twins(_matmul_mxfp4)
