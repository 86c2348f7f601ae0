"""IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M weights times Q8_K-style int8 activations,
parallel over output rows.

Mirrors ggml's ggml_vec_dot_iq*_q8_K (ggml-cpu/quants.c, the generic C): per 256-value super-block one
exact integer sum over its sub-blocks of scale * (weights . activations), then the C's f32 operations
in its order:

    IQ2_*, IQ3_*:  sumf += (d_w * d_x) * (float)bsum;  out = 0.125 * sumf (IQ2), 0.25 * sumf (IQ3_XXS), sumf (IQ3_S)
    IQ1_S, IQ1_M:  sumf = fma(d_w * d_x, sumi + 0.125 * sumi1, sumf);  out = sumf

d_x is q8_K's f32 scale (ggml's block_q8_K holds an f32 too), so every bit is the generic C's as
llama.cpp's x86 build compiles it: GCC contracts IQ1's `sumf += d * y.d * (...)` into one FMA (and not
the IQ2/IQ3 lines), and so does this kernel. IQ1's two sums (grid . x and delta . x, delta = +-1) are
taken as one: with weights 8 * grid + delta, S = 8 sumi + sumi1, and sumi + 0.125 * sumi1 = S * 0.125,
exact in f32 on both sides (|S| < 2**23).

    T = tokens, R = output rows, C = columns, S = C / 256 super-blocks
    out (T, R) f32; w (R, S * type_size) uint8; xq (T, C) int8; xd (T, S) f32: the activations of
    `q8act.quantize_q8_k` (xs (T, C / 16), its per-16 sums, is taken and not read)

Decoding: a group of 8 values is one grid point, an int64 from a table whose 8 bytes are the values
(IQ3: two 4-value points); sign bits negate bytes through a mask m of 0xFF bytes, (g ^ m) + (m & 1s),
carry-free as grid values are >= 1 (IQ1: a table of 8 * grid + 16, plus or minus 1 per byte, then 16
off each byte as a vector). Four groups make a sub-block's I8x32 (`pack4`) of signed weights w. The dot
products are the K types' `dot_scaled_k` (each half of a sub-block times its integer scale) of |w|
with x signed as w. The tables are Numba constants, built at first compile from
`quants.iquants.grids()` (gguf-py's copy of ggml-common.h's).

A super-block is decoded once per row (w and |w|) and stays in registers or L1 while every token of
the call takes its dot with it; a token's operations do not depend on the others, so every row of a
batch is bit-identical to that row alone. Plain kernels, not tuned (0.4-1x the speed of llama.cpp's
AVX2 ones per core): the lattice types are rare.
"""

from __future__ import annotations

import functools
import types as pytypes

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .intrinsics import get, load_f16, load_i8x32, load_u32
from .intrinsics_fp4 import isum
from .intrinsics_iq import abs_bytes, fma32, half_bits, pack4, scales16, sign_bytes, sub_bytes
from .ops import twins
from .vecops import dot_scaled_k, iadd

ONES = 0x0101010101010101  # 1 in every byte of an int64


@functools.cache
def tables() -> dict[str, np.ndarray]:
    """The decoding tables, read-only int64 arrays: grid points as 8 bytes each (IQ3: 4 bytes, zero
    above), IQ1's as 8 * grid + 16, and sign masks (0xFF in byte j where bit j of the index is set)."""
    from ..quants.iquants import grids  # the format's facts; imported at first compile only

    g = grids()
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
    byte_masks = (bits * 0xFF).astype(np.uint8).view(np.int64).ravel()  # (256,)
    out = {
        "iq2xxs": g.iq2xxs.view(np.int64).ravel(),
        "iq2xs": g.iq2xs.view(np.int64).ravel(),
        "iq2s": g.iq2s.view(np.int64).ravel(),
        "iq3xxs": g.iq3xxs.view(np.uint32).ravel().astype(np.int64),
        "iq3s": g.iq3s.view(np.uint32).ravel().astype(np.int64),
        "iq1s": (g.iq1s.astype(np.int16) * 8 + 16).astype(np.uint8).view(np.int64).ravel(),
        "byte_masks": byte_masks,
        "ksign_masks": byte_masks[g.ksigns],
    }
    for a in out.values():
        a.setflags(write=False)
    return out


def _table(name: str):
    """A function that, called in jitted code, gives table `name` as a constant array (built at compile
    time, so importing this module builds nothing and a cached kernel never builds it)."""

    def table():
        raise TypeError(f"the {name} table is for jitted code; use tables()[{name!r}]")

    @overload(table)
    def _typed():
        a = tables()[name]
        return lambda: a

    return table


GRID_IQ2XXS, GRID_IQ2XS, GRID_IQ2S = _table("iq2xxs"), _table("iq2xs"), _table("iq2s")
GRID_IQ3XXS, GRID_IQ3S, GRID_IQ1S = _table("iq3xxs"), _table("iq3s"), _table("iq1s")
BYTE_MASKS, KSIGN_MASKS = _table("byte_masks"), _table("ksign_masks")


# ---- decoding: per type, sub-block j (32 values) as an I8x32, the 16 scales, the f16 scale d --------
# Block layouts: quants/iquants.py. Offsets below are bytes within the block at w[o:] (flat).


@njit(cache=True, nogil=True, inline="always")
def _neg(g, m):
    """The bytes of g (each 1..62) negated where m has 0xFF bytes."""
    return (g ^ m) + (m & ONES)


@njit(cache=True, nogil=True, inline="always")
def _u16(w, p):
    return np.int64(get(w, p)) | (np.int64(get(w, p + 1)) << 8)


@njit(cache=True, nogil=True, inline="always")
def _pack_scales(w, o, first, step, shift):
    """lo, hi: byte j = 2 s + 1 for the 4-bit scales of the first and last 16 values of sub-block j,
    s = bits shift.. of the byte at o + first + step * j (shift 28: the top nibble of a uint32)."""
    lo = hi = np.int64(0)
    for j in range(8):
        if shift == 28:
            s_lo = s_hi = load_u32(w, o + first + step * j) >> 28
        else:
            b = np.int64(get(w, o + first + step * j))
            s_lo, s_hi = b & 15, b >> 4
        lo |= (2 * s_lo + 1) << (8 * j)
        hi |= (2 * s_hi + 1) << (8 * j)
    return lo, hi


@njit(cache=True, nogil=True, inline="always")
def _d_f16(w, o, variant):
    return load_f16(variant, w, o)


@njit(cache=True, nogil=True, inline="always")
def _sub_iq2_xxs(w, o, j):
    """Two uint32 per sub-block: four grid indices | four 7-bit ksigns indices, scale << 28."""
    grid, ks = GRID_IQ2XXS(), KSIGN_MASKS()
    a = load_u32(w, o + 2 + 8 * j)
    b = load_u32(w, o + 6 + 8 * j)
    return pack4(_neg(get(grid, a & 255), get(ks, b & 127)),
                 _neg(get(grid, (a >> 8) & 255), get(ks, (b >> 7) & 127)),
                 _neg(get(grid, (a >> 16) & 255), get(ks, (b >> 14) & 127)),
                 _neg(get(grid, a >> 24), get(ks, (b >> 21) & 127)))


@njit(cache=True, nogil=True, inline="always")
def _scales_iq2_xxs(w, o):
    return _pack_scales(w, o, 6, 8, 28)


@njit(cache=True, nogil=True, inline="always")
def _point_iq2_xs(grid, ks, q):
    return _neg(get(grid, q & 511), get(ks, q >> 9))


@njit(cache=True, nogil=True, inline="always")
def _sub_iq2_xs(w, o, j):
    """Four uint16 per sub-block: 9-bit grid index | 7-bit ksigns index << 9."""
    grid, ks = GRID_IQ2XS(), KSIGN_MASKS()
    p = o + 2 + 8 * j
    return pack4(_point_iq2_xs(grid, ks, _u16(w, p)), _point_iq2_xs(grid, ks, _u16(w, p + 2)),
                 _point_iq2_xs(grid, ks, _u16(w, p + 4)), _point_iq2_xs(grid, ks, _u16(w, p + 6)))


@njit(cache=True, nogil=True, inline="always")
def _scales_iq2_xs(w, o):
    return _pack_scales(w, o, 66, 1, 0)


@njit(cache=True, nogil=True, inline="always")
def _point_iq2_s(w, o, j, l, qh, grid, bm):
    idx = np.int64(get(w, o + 2 + 4 * j + l)) | (((qh >> (2 * l)) & 3) << 8)
    return _neg(get(grid, idx), get(bm, get(w, o + 34 + 4 * j + l)))


@njit(cache=True, nogil=True, inline="always")
def _sub_iq2_s(w, o, j):
    """qs[4j + l] | 2 bits of qh[j] << 8: group l's grid index; signs[4j + l]: its sign bits."""
    grid, bm = GRID_IQ2S(), BYTE_MASKS()
    qh = np.int64(get(w, o + 66 + j))
    return pack4(_point_iq2_s(w, o, j, 0, qh, grid, bm), _point_iq2_s(w, o, j, 1, qh, grid, bm),
                 _point_iq2_s(w, o, j, 2, qh, grid, bm), _point_iq2_s(w, o, j, 3, qh, grid, bm))


@njit(cache=True, nogil=True, inline="always")
def _scales_iq2_s(w, o):
    return _pack_scales(w, o, 74, 1, 0)


@njit(cache=True, nogil=True, inline="always")
def _point_iq3_xxs(w, p, l, b, grid, ks):
    g = get(grid, get(w, p + 2 * l)) | (get(grid, get(w, p + 2 * l + 1)) << 32)
    return _neg(g, get(ks, (b >> (7 * l)) & 127))


@njit(cache=True, nogil=True, inline="always")
def _sub_iq3_xxs(w, o, j):
    """qs[8j .. 8j + 7]: eight 4-value grid indices; uint32 at 66 + 4j: four ksigns indices, scale << 28."""
    grid, ks = GRID_IQ3XXS(), KSIGN_MASKS()
    p = o + 2 + 8 * j
    b = load_u32(w, o + 66 + 4 * j)
    return pack4(_point_iq3_xxs(w, p, 0, b, grid, ks), _point_iq3_xxs(w, p, 1, b, grid, ks),
                 _point_iq3_xxs(w, p, 2, b, grid, ks), _point_iq3_xxs(w, p, 3, b, grid, ks))


@njit(cache=True, nogil=True, inline="always")
def _scales_iq3_xxs(w, o):
    return _pack_scales(w, o, 66, 4, 28)


@njit(cache=True, nogil=True, inline="always")
def _point_iq3_s(w, o, j, l, qh, grid, bm):
    p = o + 2 + 8 * j + 2 * l
    g0 = get(grid, np.int64(get(w, p)) | (((qh >> (2 * l)) & 1) << 8))
    g1 = get(grid, np.int64(get(w, p + 1)) | (((qh >> (2 * l + 1)) & 1) << 8))
    return _neg(g0 | (g1 << 32), get(bm, get(w, o + 74 + 4 * j + l)))


@njit(cache=True, nogil=True, inline="always")
def _sub_iq3_s(w, o, j):
    """qs[8j + k] | bit k of qh[j] << 8: point k's grid index; signs[4j + l]: group l's sign bits."""
    grid, bm = GRID_IQ3S(), BYTE_MASKS()
    qh = np.int64(get(w, o + 66 + j))
    return pack4(_point_iq3_s(w, o, j, 0, qh, grid, bm), _point_iq3_s(w, o, j, 1, qh, grid, bm),
                 _point_iq3_s(w, o, j, 2, qh, grid, bm), _point_iq3_s(w, o, j, 3, qh, grid, bm))


@njit(cache=True, nogil=True, inline="always")
def _scales_iq3_s(w, o):
    """One 4-bit scale per sub-block, low nibble first: both halves take it."""
    lo = np.int64(0)
    for j in range(8):
        s = (np.int64(get(w, o + 106 + j // 2)) >> (4 * (j & 1))) & 15
        lo |= (2 * s + 1) << (8 * j)
    return lo, lo


@njit(cache=True, nogil=True, inline="always")
def _sub_iq1_s(w, o, j):
    """uint16 qh at 34 + 2j: bits 3l.. = high bits of group l's index, bit 15 = delta's sign."""
    grid = GRID_IQ1S()
    qh = _u16(w, o + 34 + 2 * j)
    p = o + 2 + 4 * j
    delta = ONES - ((qh >> 15) & 1) * (2 * ONES)
    return sub_bytes(pack4(get(grid, np.int64(get(w, p)) | ((qh & 7) << 8)) + delta,
                           get(grid, np.int64(get(w, p + 1)) | (((qh >> 3) & 7) << 8)) + delta,
                           get(grid, np.int64(get(w, p + 2)) | (((qh >> 6) & 7) << 8)) + delta,
                           get(grid, np.int64(get(w, p + 3)) | (((qh >> 9) & 7) << 8)) + delta), 16)


@njit(cache=True, nogil=True, inline="always")
def _scales_iq1_s(w, o):
    """3-bit scale s in bits 12..14 of qh[j]: 2 s + 1 for both halves."""
    lo = np.int64(0)
    for j in range(8):
        lo |= (2 * ((_u16(w, o + 34 + 2 * j) >> 12) & 7) + 1) << (8 * j)
    return lo, lo


@njit(cache=True, nogil=True, inline="always")
def _point_iq1_m(w, p, nib, grid):
    """Group with index low byte at w[p] and nibble `nib` (3 high index bits | delta's sign << 3)."""
    return get(grid, np.int64(get(w, p)) | ((nib & 7) << 8)) + ONES - ((nib >> 3) & 1) * (2 * ONES)


@njit(cache=True, nogil=True, inline="always")
def _sub_iq1_m(w, o, j):
    """qh[2j], qh[2j + 1] at 32 + 2j: one nibble per group (low nibble first)."""
    grid = GRID_IQ1S()
    h0 = np.int64(get(w, o + 32 + 2 * j))
    h1 = np.int64(get(w, o + 33 + 2 * j))
    p = o + 4 * j
    return sub_bytes(pack4(_point_iq1_m(w, p, h0 & 15, grid), _point_iq1_m(w, p + 1, h0 >> 4, grid),
                           _point_iq1_m(w, p + 2, h1 & 15, grid), _point_iq1_m(w, p + 3, h1 >> 4, grid)), 16)


@njit(cache=True, nogil=True, inline="always")
def _scales_iq1_m(w, o):
    """Two 3-bit scales per sub-block j in bits 6(j % 2) .. + 5 of uint16 scales[j / 2] at 48."""
    lo = hi = np.int64(0)
    for j in range(8):
        s = _u16(w, o + 48 + 2 * (j // 2)) >> (6 * (j & 1))
        lo |= (2 * (s & 7) + 1) << (8 * j)
        hi |= (2 * ((s >> 3) & 7) + 1) << (8 * j)
    return lo, hi


@njit(cache=True, nogil=True, inline="always")
def _d_iq1_m(w, o, variant):
    """The f16 d is the top nibbles of the four uint16 scales, the first one's lowest."""
    bits = ((_u16(w, o + 48) >> 12) | ((_u16(w, o + 50) >> 8) & 0x00F0)
            | ((_u16(w, o + 52) >> 4) & 0x0F00) | (_u16(w, o + 54) & 0xF000))
    return half_bits(variant, bits)


# ---- the matrix kernel: one template, bound per type ----------------------------------------------

# Bound per type by `_bind` (the template is never compiled itself).
TYPE_SIZE = SUB = SCALES = D = IQ1 = FINAL = None


@njit(cache=True, nogil=True, inline="always")
def _sdot(variant, a, v, xq, xo, sv, j):
    """Sub-block j's scaled integer dot of signed weights v (a = |v|) with the activations at xq[xo:]."""
    return dot_scaled_k(variant, a, sign_bytes(variant, load_i8x32(xq, xo), v), sv, j)


def _matmul_template(out, w, xq, xd, xs, variant):
    """out[t, r] = FINAL * sum_s (d_w[r, s] * xd[t, s]) * S[t, r, s], in super-block order."""
    n_tok, n_row = out.shape
    rb, cols, n_sb = w.shape[1], xq.shape[1], xd.shape[1]
    for r in prange(n_row):
        for t in range(n_tok):
            out[t, r] = 0.0
        for s in range(n_sb):
            o = r * rb + s * TYPE_SIZE  # the super-block in w (flat)
            v0, v1, v2, v3 = SUB(w, o, 0), SUB(w, o, 1), SUB(w, o, 2), SUB(w, o, 3)
            v4, v5, v6, v7 = SUB(w, o, 4), SUB(w, o, 5), SUB(w, o, 6), SUB(w, o, 7)
            a0, a1, a2, a3 = abs_bytes(variant, v0), abs_bytes(variant, v1), abs_bytes(variant, v2), abs_bytes(variant, v3)
            a4, a5, a6, a7 = abs_bytes(variant, v4), abs_bytes(variant, v5), abs_bytes(variant, v6), abs_bytes(variant, v7)
            lo, hi = SCALES(w, o)
            sv = scales16(lo, hi)
            dw = D(w, o, variant)
            for t in range(n_tok):
                xo = t * cols + s * 256  # the super-block's activations in xq (flat)
                i = _sdot(variant, a0, v0, xq, xo, sv, 0)
                i = iadd(i, _sdot(variant, a1, v1, xq, xo + 32, sv, 1))
                i = iadd(i, _sdot(variant, a2, v2, xq, xo + 64, sv, 2))
                i = iadd(i, _sdot(variant, a3, v3, xq, xo + 96, sv, 3))
                i = iadd(i, _sdot(variant, a4, v4, xq, xo + 128, sv, 4))
                i = iadd(i, _sdot(variant, a5, v5, xq, xo + 160, sv, 5))
                i = iadd(i, _sdot(variant, a6, v6, xq, xo + 192, sv, 6))
                i = iadd(i, _sdot(variant, a7, v7, xq, xo + 224, sv, 7))
                d = dw * get(xd, t * n_sb + s)
                if IQ1:  # the sum is 8 sumi + sumi1
                    out[t, r] = fma32(d, np.float32(isum(i, 2)) * np.float32(0.125), out[t, r])
                else:
                    out[t, r] += d * np.float32(isum(i, 2))
        if FINAL != 1.0:
            for t in range(n_tok):
                out[t, r] = np.float32(FINAL) * out[t, r]


def _bind(name: str, **bound):
    """(parallel, serial) kernels of the template with its upper-case globals bound, named `name` (the
    name keys Numba's on-disk cache)."""
    fn = pytypes.FunctionType(_matmul_template.__code__, dict(_matmul_template.__globals__, **bound), name)
    fn.__qualname__ = name
    return twins(fn)


matmul_iq2_xxs, matmul_iq2_xxs_serial = _bind(
    "matmul_iq2_xxs", TYPE_SIZE=66, SUB=_sub_iq2_xxs, SCALES=_scales_iq2_xxs, D=_d_f16, IQ1=False, FINAL=0.125)
matmul_iq2_xs, matmul_iq2_xs_serial = _bind(
    "matmul_iq2_xs", TYPE_SIZE=74, SUB=_sub_iq2_xs, SCALES=_scales_iq2_xs, D=_d_f16, IQ1=False, FINAL=0.125)
matmul_iq2_s, matmul_iq2_s_serial = _bind(
    "matmul_iq2_s", TYPE_SIZE=82, SUB=_sub_iq2_s, SCALES=_scales_iq2_s, D=_d_f16, IQ1=False, FINAL=0.125)
matmul_iq3_xxs, matmul_iq3_xxs_serial = _bind(
    "matmul_iq3_xxs", TYPE_SIZE=98, SUB=_sub_iq3_xxs, SCALES=_scales_iq3_xxs, D=_d_f16, IQ1=False, FINAL=0.25)
matmul_iq3_s, matmul_iq3_s_serial = _bind(
    "matmul_iq3_s", TYPE_SIZE=110, SUB=_sub_iq3_s, SCALES=_scales_iq3_s, D=_d_f16, IQ1=False, FINAL=1.0)
matmul_iq1_s, matmul_iq1_s_serial = _bind(
    "matmul_iq1_s", TYPE_SIZE=50, SUB=_sub_iq1_s, SCALES=_scales_iq1_s, D=_d_f16, IQ1=True, FINAL=1.0)
matmul_iq1_m, matmul_iq1_m_serial = _bind(
    "matmul_iq1_m", TYPE_SIZE=56, SUB=_sub_iq1_m, SCALES=_scales_iq1_m, D=_d_iq1_m, IQ1=True, FINAL=1.0)


# Row ranges of one token for the fused blocks (`kinds.KINDS`): the serial kernels on row slices.


@njit(cache=True, nogil=True)
def rows_iq2_xxs(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq2_xxs_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq2_xs(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq2_xs_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq2_s(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq2_s_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq3_xxs(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq3_xxs_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq3_s(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq3_s_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq1_s(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq1_s_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq1_m(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq1_m_serial(out, w[r0:r1], xq, xd, xs, variant)
