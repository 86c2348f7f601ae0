"""F32, F16 and BF16 weights times f32 activations, parallel over output rows.

    T = tokens, R = output rows, C = columns, W = bytes per weight (4 or 2)
    out (T, R) f32; w (R, C * W) uint8 (raw f32 / f16 / bf16 rows); x (T, C) f32

One kernel for the three formats: `fmt` (FMT_F32, FMT_F16, FMT_BF16) picks how 8 weights are
loaded and widened (F16 by vcvtph2ps on x86, a portable bit trick otherwise; BF16 by a shift).
Four tokens share each loaded weight. Every token, in the 4-token tile or alone, runs the same
sequence of float operations (three accumulators over 24 columns at a time, up to two more groups
of 8, `_finish`'s sum and scalar tail), so a row of a batch is bit-identical to the same row
computed alone; the reductions are written out with vectors rather than left to `fastmath` for
that reason. Three accumulators per token is what the tile's 16 registers hold; with two, one
token's FMA latency chain cost 10-20% of the in-cache matvec speed.
"""

from __future__ import annotations

from numba import njit, prange

from .intrinsics import get, load_f32x8, load_float1, load_float8
from .ops import twins
from .vecops import fadd, ffma, hsum, zero_f32x8


@njit(cache=True, nogil=True, inline="always")
def _finish(fmt, variant, w, ro, x, xo, a, b, c, start, cols):
    """Sum of one token's accumulators, plus its scalar tail (columns start .. cols)."""
    s = hsum(fadd(fadd(a, b), c))
    for i in range(start, cols):
        s += load_float1(fmt, variant, w, ro, i) * get(x, xo + i)
    return s


def _matmul_float(out, w, x, fmt, variant):
    """out (T, R) = x (T, C) @ W (R, C).T for float weights of format `fmt`."""
    n_tok, cols = x.shape
    rb = w.shape[1]
    n24 = cols // 24 * 24  # columns taken 24 at a time (three accumulators per token)
    n8 = cols // 8 * 8  # then up to two groups of 8 (first and second accumulator), then scalars
    for r in prange(w.shape[0]):
        ro = r * rb  # offset of row r in w
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols  # x rows
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            b0, b1, b2, b3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            c0, c1, c2, c3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for i in range(0, n24, 24):
                v = load_float8(fmt, variant, w, ro, i)
                u = load_float8(fmt, variant, w, ro, i + 8)
                z = load_float8(fmt, variant, w, ro, i + 16)
                a0, a1 = ffma(v, load_f32x8(x, x0 + i), a0), ffma(v, load_f32x8(x, x1 + i), a1)
                a2, a3 = ffma(v, load_f32x8(x, x2 + i), a2), ffma(v, load_f32x8(x, x3 + i), a3)
                b0, b1 = ffma(u, load_f32x8(x, x0 + i + 8), b0), ffma(u, load_f32x8(x, x1 + i + 8), b1)
                b2, b3 = ffma(u, load_f32x8(x, x2 + i + 8), b2), ffma(u, load_f32x8(x, x3 + i + 8), b3)
                c0, c1 = ffma(z, load_f32x8(x, x0 + i + 16), c0), ffma(z, load_f32x8(x, x1 + i + 16), c1)
                c2, c3 = ffma(z, load_f32x8(x, x2 + i + 16), c2), ffma(z, load_f32x8(x, x3 + i + 16), c3)
            if n8 > n24:
                v = load_float8(fmt, variant, w, ro, n24)
                a0, a1 = ffma(v, load_f32x8(x, x0 + n24), a0), ffma(v, load_f32x8(x, x1 + n24), a1)
                a2, a3 = ffma(v, load_f32x8(x, x2 + n24), a2), ffma(v, load_f32x8(x, x3 + n24), a3)
            if n8 > n24 + 8:
                i = n24 + 8
                u = load_float8(fmt, variant, w, ro, i)
                b0, b1 = ffma(u, load_f32x8(x, x0 + i), b0), ffma(u, load_f32x8(x, x1 + i), b1)
                b2, b3 = ffma(u, load_f32x8(x, x2 + i), b2), ffma(u, load_f32x8(x, x3 + i), b3)
            out[t, r] = _finish(fmt, variant, w, ro, x, x0, a0, b0, c0, n8, cols)
            out[t + 1, r] = _finish(fmt, variant, w, ro, x, x1, a1, b1, c1, n8, cols)
            out[t + 2, r] = _finish(fmt, variant, w, ro, x, x2, a2, b2, c2, n8, cols)
            out[t + 3, r] = _finish(fmt, variant, w, ro, x, x3, a3, b3, c3, n8, cols)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            x0 = t * cols
            a0, b0, c0 = zero_f32x8(), zero_f32x8(), zero_f32x8()
            for i in range(0, n24, 24):
                a0 = ffma(load_float8(fmt, variant, w, ro, i), load_f32x8(x, x0 + i), a0)
                b0 = ffma(load_float8(fmt, variant, w, ro, i + 8), load_f32x8(x, x0 + i + 8), b0)
                c0 = ffma(load_float8(fmt, variant, w, ro, i + 16), load_f32x8(x, x0 + i + 16), c0)
            if n8 > n24:
                a0 = ffma(load_float8(fmt, variant, w, ro, n24), load_f32x8(x, x0 + n24), a0)
            if n8 > n24 + 8:
                b0 = ffma(load_float8(fmt, variant, w, ro, n24 + 8), load_f32x8(x, x0 + n24 + 8), b0)
            out[t, r] = _finish(fmt, variant, w, ro, x, x0, a0, b0, c0, n8, cols)
            t += 1


# (parallel over rows, serial) compilations of the same code: identical results, and the serial
# one skips the thread wake-up that dominates small calls.
matmul_float, matmul_float_serial = twins(_matmul_float)
