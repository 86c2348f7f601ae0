"""IQ4_XS weights repacked 8 rows at a time ("IQ4_XSx8", as `q4kx8` does for Q4_K), times Q8_K int8
activations.

Interleaving 8 rows lets one broadcast of 4 activations serve 8 rows and makes the 8 row sums come out in
lanes; the 8 rows' d sit in one 16-byte load (one vcvtph2ps) and their 6-bit sub-block scales unpack
together in 64-bit words. The layout has exactly the size of the plain rows (1088 bytes per 8 rows x 256
columns), so a streamed expert repacks in place of its plain copy.

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, S = C / 256 super-blocks
    plain IQ4_XS (R, S * 136 B) super-block: d f16 | scales_h u16 | scales_l[4] | qs[128]; sub-block j < 8
        (32 columns) has ls_j = (scales_l[j / 2] >> 4 (j % 2) & 15) | (scales_h >> 2j & 3) << 4 and codes
        qs[16j + i]: low nibble column 32j + i, high nibble 32j + 16 + i; value = d * (ls_j - 32) * kvalues[code]
    x8 layout (G, S * 1088 B), super-block s of group g, 1088 bytes at g * S * 1088 + 1088 s:
        [0:16)       d of rows 8g .. 8g + 7 (f16, row r at 2r)
        [16:48)      scales_l: byte i (< 4) of row r at 16 + 8i + r
        [48:64)      scales_h: byte h (< 2) of row r at 48 + 8h + r
        [64:1088)    quants: sub-block j, group k (< 4) at 64 + 128j + 32k: qs[16j + 4k : 16j + 4k + 4] of
                     rows 0..7, row after row (row r at + 4r)
    activations ("q8_k", `q8act.quantize_q8_k`): xq (T, C) int8 in [-127, 127] (vpsignb cannot negate -128),
        xd (T, S) f32 scale; xs (T, C / 16) int32 (the per-16 sums) is not read

Arithmetic, per token t and row r, one f32 accumulator (lane r of an f32x8), super-blocks s = 0, 1, ... in order:

    isum = sum_j (ls_j - 32) * sum_i kvalues[code_i(r, s, j)] * xq[t, 256s + 32j + i]    exact int32
    acc = fma(f32(isum), d_w[r, s] * xd[t, s], acc)        (f32(isum) rounded to nearest; the product rounded once)
    out[t, r] = acc after the last super-block (no horizontal sum)

ggml's generic ggml_vec_dot_iq4_xs_q8_K instead adds (d4d8 * (ls_j - 32)) * sumi_j to sumf per sub-block
and its AVX2 one keeps 8 partial lanes (`iq4`): the same exact integers, other f32 roundings. The float
steps per (token, super-block) are the same whatever T, the tile, the thread count, twin or variant, so a
row's result does not depend on the batch it was computed in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get
from .intrinsics_iq4x8 import BLOCK_BYTES, QS_OFFSET, SCALES_H, SCALES_L, prefetch_iq4x8, sums_iq4x8, sums_iq4x8_4
from .intrinsics_x8 import fma_d8, scales_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .vecops import zero_f32x8

__all__ = ["BLOCK_BYTES", "matmul_iq4_xs_x8", "matmul_iq4_xs_x8_serial", "repack_iq4_xs_x8", "rows_iq4_xs_x8",
           "unpack_iq4_xs_x8"]

_PLAIN = 136  # bytes of a plain IQ4_XS super-block
_AHEAD = 2048  # prefetch distance in bytes: a thread's weights are one sequential stream


# ---- layout ---------------------------------------------------------------------------------


def _repack(out, out16, out32, data, data16, data32):
    """out (G, S * 1088) <- data (8G, S * 136), through uint16 / uint32 views of both (136 and 1088 are
    multiples of 4): the byte map of the module docstring, super-block by super-block."""
    n_grp, n_sb = out.shape[0], data.shape[1] // _PLAIN
    for g in prange(n_grp):
        for r in range(8):
            row = 8 * g + r
            for s in range(n_sb):
                o, p = s * BLOCK_BYTES, s * _PLAIN
                out16[g, o // 2 + r] = data16[row, p // 2]  # d
                for h in range(2):
                    out[g, o + SCALES_H + 8 * h + r] = data[row, p + 2 + h]
                for i in range(4):
                    out[g, o + SCALES_L + 8 * i + r] = data[row, p + 4 + i]
                for m in range(32):  # quant word m = group (m / 4, m % 4), 32 bytes apart
                    out32[g, (o + QS_OFFSET) // 4 + 8 * m + r] = data32[row, (p + 8) // 4 + m]


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def repack_iq4_xs_x8(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain IQ4_XS rows (R, S * 136) uint8 -> x8 layout (R / 8, S * 1088) uint8, into `out` (a new array
    when None; it must not overlap `data`). Rows not a multiple of 8 or bytes not uint8 super-blocks raise
    UnsupportedError."""
    out = x8_output(data, out, _PLAIN, "IQ4_XS")  # (G, S * 1088)
    data = np.ascontiguousarray(data)
    repack_kernel(_REPACK, data)(out, out.view(np.uint16), out.view(np.uint32), data, data.view(np.uint16),
                                 data.view(np.uint32))
    return out


def unpack_iq4_xs_x8(data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, S * 1088) uint8 -> plain IQ4_XS rows (R, S * 136) uint8 (a new array)."""
    g, gb = data.shape
    n_sb = gb // BLOCK_BYTES
    blocks = data.reshape(g, n_sb, BLOCK_BYTES)  # (G, S, 1088)
    out = np.empty((g, 8, n_sb, _PLAIN), np.uint8)  # (G, 8, S, 136)
    out[..., 0:2] = blocks[:, :, 0:SCALES_L].reshape(g, n_sb, 8, 2).transpose(0, 2, 1, 3)
    out[..., 2:4] = blocks[:, :, SCALES_H:QS_OFFSET].reshape(g, n_sb, 2, 8).transpose(0, 3, 1, 2)
    out[..., 4:8] = blocks[:, :, SCALES_L:SCALES_H].reshape(g, n_sb, 4, 8).transpose(0, 3, 1, 2)
    qs = blocks[:, :, QS_OFFSET:].reshape(g, n_sb, 32, 8, 4)  # (G, S, word, row, byte)
    out[..., 8:] = qs.transpose(0, 3, 1, 2, 4).reshape(g, 8, n_sb, 128)
    return out.reshape(g * 8, n_sb * _PLAIN)


# ---- kernels --------------------------------------------------------------------------------


def _matmul_iq4_xs_x8(out, w, xq, xd, xs, variant):
    """out (T, R) = x @ W.T for x8-layout IQ4_XS weights w (G, S * 1088) and Q8_K activations xq (T, C),
    xd (T, S) (xs unused); 4 tokens per pass over a group's super-blocks, then single tokens."""
    n_tok, n_row = out.shape
    gb, cols, n_sb = w.shape[1], xq.shape[1], xd.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            e0 = t * n_sb  # xd offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for s in range(n_sb):
                o = go + s * BLOCK_BYTES
                prefetch_iq4x8(w, o + _AHEAD)
                i0, i1, i2, i3 = sums_iq4x8_4(variant, w, o, xq, t * cols + s * 256, cols)
                dw = scales_x8(variant, w, o)  # (8,) row scales d
                a0 = fma_d8(a0, i0, dw, get(xd, e0 + s))
                a1 = fma_d8(a1, i1, dw, get(xd, e0 + n_sb + s))
                a2 = fma_d8(a2, i2, dw, get(xd, e0 + 2 * n_sb + s))
                a3 = fma_d8(a3, i3, dw, get(xd, e0 + 3 * n_sb + s))
            store_x8(out, t * n_row + g * 8, a0)
            store_x8(out, (t + 1) * n_row + g * 8, a1)
            store_x8(out, (t + 2) * n_row + g * 8, a2)
            store_x8(out, (t + 3) * n_row + g * 8, a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            a0 = zero_f32x8()
            for s in range(n_sb):
                o = go + s * BLOCK_BYTES
                prefetch_iq4x8(w, o + _AHEAD)
                i0 = sums_iq4x8(variant, w, o, xq, t * cols + s * 256)
                a0 = fma_d8(a0, i0, scales_x8(variant, w, o), get(xd, t * n_sb + s))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_iq4_xs_x8, matmul_iq4_xs_x8_serial = twins(_matmul_iq4_xs_x8)


@njit(cache=True, nogil=True)
def rows_iq4_xs_x8(out, r0, r1, w, xq, xd, xs, variant):
    """out (T, r1 - r0) f32 = rows r0 .. r1 of T tokens of IQ4_XSx8 weights w (R / 8, S * 1088); r0, r1 multiples of 8."""
    matmul_iq4_xs_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, variant)
