"""Q4_1, Q5_0 and Q5_1 weights times Q8_0-style int8 activations, parallel over output rows.

Mirrors ggml's vec_dot_q4_1_q8_1 / vec_dot_q5_0_q8_0 / vec_dot_q5_1_q8_1 (ggml-cpu/quants.c, the
generic C): per 32-value block the exact integer dot `sumi` of the weights' quants with the int8
activations, then one f32 term per block,

    Q5_0:        (d_w * d_x) * sumi                    sumi over the signed values q - 16
    Q4_1, Q5_1:  fma(d_w * d_x, sumi, m_w * s_x)       s_x = d_x * (sum of the activation block)

(the FMA is how compilers contract the C's `(d_w * d_x) * sumi + m_w * s_x`; libggml-cpu as built for
x86-64 has exactly these bits). d_x, s_x are the activation block's scale and d_x * sum kept in f32
(ggml rounds both to f16, see `q8act`). Every term has the bits of ggml's; they are summed in this order:

    lane k of an f32x8 adds the terms of blocks 8g + k for g = 0, 1, ... (whole groups of 8 blocks);
    out = (((0 + lane 0) + lane 1) + ... + lane 7), then + each of the last nb % 8 blocks' terms in order.

ggml's generic loop adds the terms in block order (its AVX2 loops keep 8 lanes of FMAs and add the m
terms apart), so its own ISAs disagree in the last bits; tests/test_legacy_types.py emulates this order
bit for bit and ggml's within summation-order error.

    T = tokens, R = output rows, C = columns, B = C / 32 blocks, S = bytes per block (20, 22, 24)
    out (T, R) f32; w (R, B * S) uint8 blocks; xq (T, C) int8 in the pair layout, xd (T, B) f32;
    xs (T, B) f32 d_x * sum (Q4_1, Q5_1: `q8act.quantize_q8_0(pairs=1)`) or int32 sums (Q5_0:
    `q8act.quantize_q8_0_sums`); fmt the format marker of `intrinsics_q451`

One template serves the three types: the format marker's type specialises it, with each layout's
offsets as constants. Blocks go in pairs (`load_pair`), as Q4_0's and MXFP4's, with the activations in
the matching pair layout; the four pairs of a group of 8 blocks fold into one vector of per-block sums
(three vphaddd), so the f32 conversion and scaling happen once per block, as in ggml. Tokens go four at
a time; the four decodes of a weight block are the same pure operations on the same bytes, which LLVM
merges. A token left over runs exactly the per-token operations of the tile, so a row of a batch is
bit-identical to the same row computed alone. No 8-row interleaved layout.
"""

from __future__ import annotations

from numba import njit, prange

from .intrinsics import get, load_f16, load_f32x8, load_i8x32, scales8_f16
from .intrinsics_fp4 import isum
from .intrinsics_q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, block_bytes, block_sums8, load_block, load_pair, term1, terms8
from .ops import twins
from .vecops import dot, dot2, fadd, fmul, hsum, zero_f32x8

__all__ = ["FMT_Q4_1", "FMT_Q5_0", "FMT_Q5_1", "matmul_q451", "matmul_q451_serial"]


@njit(cache=True, nogil=True, inline="always")
def _dot_pair(fmt, variant, w, wo, x, xo):
    """Partial sums of the blocks at w[wo], w[wo + S] with their pair-layout activations at
    x[xo : xo + 64]: lanes 0..3 the first block's, 4..7 the second's."""
    lo, hi = load_pair(fmt, w, wo)
    return dot2(variant, lo, load_i8x32(x, xo), hi, load_i8x32(x, xo + 32))


@njit(cache=True, nogil=True, inline="always")
def _terms8(fmt, variant, w, wo, x, xo, xd, xs, so):
    """The f32 terms of the 8 blocks from w[wo] against the activations from x[xo], xd[so], xs[so]."""
    bb = block_bytes(fmt)
    s = block_sums8(
        _dot_pair(fmt, variant, w, wo, x, xo),
        _dot_pair(fmt, variant, w, wo + 2 * bb, x, xo + 64),
        _dot_pair(fmt, variant, w, wo + 4 * bb, x, xo + 128),
        _dot_pair(fmt, variant, w, wo + 6 * bb, x, xo + 192),
    )
    e = fmul(scales8_f16(variant, w, wo, bb), load_f32x8(xd, so))  # (8,) d_w * d_x
    return terms8(fmt, variant, s, e, w, wo, xs, so)


@njit(cache=True, nogil=True, inline="always")
def _tail(r, fmt, variant, w, wo, b, nb, x, xo, xd, xs, so):
    """r + the terms of blocks b .. nb - 1 added in block order (fewer than 8: pairs, then a last odd
    block in the plain layout)."""
    bb = block_bytes(fmt)
    while b + 1 < nb:
        p = _dot_pair(fmt, variant, w, wo, x, xo)
        r += term1(fmt, variant, isum(p, 0), load_f16(variant, w, wo) * get(xd, so), w, wo, xs, so)
        r += term1(fmt, variant, isum(p, 1), load_f16(variant, w, wo + bb) * get(xd, so + 1), w, wo + bb, xs, so + 1)
        b, wo, xo, so = b + 2, wo + 2 * bb, xo + 64, so + 2
    if b < nb:
        s = isum(dot(variant, load_block(fmt, w, wo), load_i8x32(x, xo)), 2)
        r += term1(fmt, variant, s, load_f16(variant, w, wo) * get(xd, so), w, wo, xs, so)
    return r


def _matmul_q451(out, w, xq, xd, xs, fmt, variant):
    """out[t, r] = sum_b term(r, b, t), the terms of ggml's per-block arithmetic (see the module doc)."""
    n_tok, n_row = out.shape
    rb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    bb = block_bytes(fmt)
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
                wo, xo = ro + b * bb, b * 32
                a0 = fadd(a0, _terms8(fmt, variant, w, wo, xq, x0 + xo, xd, xs, d0 + b))
                a1 = fadd(a1, _terms8(fmt, variant, w, wo, xq, x1 + xo, xd, xs, d1 + b))
                a2 = fadd(a2, _terms8(fmt, variant, w, wo, xq, x2 + xo, xd, xs, d2 + b))
                a3 = fadd(a3, _terms8(fmt, variant, w, wo, xq, x3 + xo, xd, xs, d3 + b))
                b += 8
            wo, xo = ro + n8 * bb, n8 * 32
            out[t, r] = _tail(hsum(a0), fmt, variant, w, wo, n8, nb, xq, x0 + xo, xd, xs, d0 + n8)
            out[t + 1, r] = _tail(hsum(a1), fmt, variant, w, wo, n8, nb, xq, x1 + xo, xd, xs, d1 + n8)
            out[t + 2, r] = _tail(hsum(a2), fmt, variant, w, wo, n8, nb, xq, x2 + xo, xd, xs, d2 + n8)
            out[t + 3, r] = _tail(hsum(a3), fmt, variant, w, wo, n8, nb, xq, x3 + xo, xd, xs, d3 + n8)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0, d0 = t * cols, t * nb
            a0 = zero_f32x8()
            b = 0
            while b < n8:
                a0 = fadd(a0, _terms8(fmt, variant, w, ro + b * bb, xq, x0 + b * 32, xd, xs, d0 + b))
                b += 8
            out[t, r] = _tail(hsum(a0), fmt, variant, w, ro + n8 * bb, n8, nb, xq, x0 + n8 * 32, xd, xs, d0 + n8)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_q451, matmul_q451_serial = twins(_matmul_q451)
