"""Q3_K weights repacked 8 rows at a time ("Q3_Kx8", as `iq4xsx8` does for IQ4_XS), times Q8_K int8 activations.

Interleaving 8 rows lets one broadcast of 4 activations serve 8 rows and makes the 8 row sums come out in
lanes; the 8 rows' d sit in one 16-byte load (one vcvtph2ps) and their 6-bit sub-block scales unpack together
in 64-bit words. The layout has exactly the size of the plain rows (880 bytes per 8 rows x 256 columns), so a
streamed expert repacks in place of its plain copy.

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, S = C / 256 super-blocks
    plain Q3_K (R, S * 110 B) super-block: hmask[32] | qs[64] | scales[12] | d f16; column v = 128n + 32k + l
        (n < 2, k < 4, l < 32) has q = (qs[32n + l] >> 2k & 3) - 4 * (1 - (hmask[l] >> (4n + k) & 1)) in -4..3,
        sub-block j = v / 16 has the 6-bit scale sc_j (low nibble of scales[j % 8] for j < 8, high nibble after;
        top 2 bits at bit 2(j / 4) of scales[8 + j % 4]); value = d * (sc_j - 32) * q
    x8 layout (G, S * 880 B), super-block s of group g, 880 bytes at g * S * 880 + 880 s:
        [0:16)       d of rows 8g .. 8g + 7 (f16, row r at 2r)
        [16:112)     scales: byte i (< 12) of row r at 16 + 8i + r
        [112:880)    quant words: plain bytes 4m .. 4m + 3 (m < 24: hmask for m < 8, then qs) of row r at
                     112 + 32m + 4r, i.e. hmask[4c ..] at 112 + 32c + 4r, qs[4m ..] at 368 + 32m + 4r
    activations ("q8_k", `q8act.quantize_q8_k`): xq (T, C) int8, xd (T, S) f32 scale, xs (T, C / 16) int32 the
        exact per-16 sums of xq (the kernels use them for the -4 of q: they must belong to xq)

Arithmetic, per token t and row r, one f32 accumulator (lane r of an f32x8), super-blocks s = 0, 1, ... in order:

    isum = sum_j (sc_j - 32) * sum_i q_ji * xq[t, 256s + 16j + i]    exact int32 (|isum| <= 16 * 32 * 16 * 4 * 128)
         (computed as sum_j (sc_j - 32) * (sum_i (q_ji + 4) * xq_ji - 4 * xs[t, 16s + j]), see `intrinsics_q3kx8`)
    acc = fma(f32(isum), d_w[r, s] * xd[t, s], acc)        (f32(isum) exact; the product rounded once)
    out[t, r] = acc after the last super-block (no horizontal sum)

ggml's AVX2 ggml_vec_dot_q3_K_q8_K (and `k23matmul`) keeps 8 partial lanes per row and sums them at the end:
the same exact integers, other f32 roundings. The float steps per (token, super-block) are the same whatever T,
the tile, the thread count, twin or variant, so a row's result does not depend on the batch it was computed in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get
from .intrinsics_q3kx8 import BLOCK_BYTES, HMASK, SCALES, prefetch_q3kx8, sums_q3kx8, sums_q3kx8_4
from .intrinsics_x8 import fma_d8, scales_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .vecops import zero_f32x8

__all__ = ["BLOCK_BYTES", "matmul_q3_k_x8", "matmul_q3_k_x8_serial", "repack_q3_k_x8", "rows_q3_k_x8",
           "unpack_q3_k_x8"]

_PLAIN = 110  # bytes of a plain Q3_K super-block
_AHEAD = 2048  # prefetch distance in bytes: a thread's weights are one sequential stream


# ---- layout ---------------------------------------------------------------------------------


def _repack(out, out16, out32, data, data16):
    """out (G, S * 880) <- data (8G, S * 110), through uint16 / uint32 views of out and a uint16 view of data
    (110 is even, not a multiple of 4): the byte map of the module docstring, super-block by super-block."""
    n_grp, n_sb = out.shape[0], data.shape[1] // _PLAIN
    for g in prange(n_grp):
        for r in range(8):
            row = 8 * g + r
            for s in range(n_sb):
                o, p = s * BLOCK_BYTES, s * _PLAIN
                out16[g, o // 2 + r] = data16[row, (p + 108) // 2]  # d
                for i in range(12):
                    out[g, o + SCALES + 8 * i + r] = data[row, p + 96 + i]
                for m in range(24):  # hmask and qs words, 32 bytes apart
                    h = p // 2 + 2 * m
                    word = np.uint32(data16[row, h]) | (np.uint32(data16[row, h + 1]) << np.uint32(16))
                    out32[g, (o + HMASK) // 4 + 8 * m + r] = word


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def repack_q3_k_x8(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain Q3_K rows (R, S * 110) uint8 -> x8 layout (R / 8, S * 880) uint8, into `out` (a new array when
    None; it must not overlap `data`). Rows not a multiple of 8 or bytes not uint8 super-blocks raise
    UnsupportedError."""
    out = x8_output(data, out, _PLAIN, "Q3_K")  # (G, S * 880)
    data = np.ascontiguousarray(data)
    repack_kernel(_REPACK, data)(out, out.view(np.uint16), out.view(np.uint32), data, data.view(np.uint16))
    return out


def unpack_q3_k_x8(data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, S * 880) uint8 -> plain Q3_K rows (R, S * 110) uint8 (a new array)."""
    g, gb = data.shape
    n_sb = gb // BLOCK_BYTES
    blocks = data.reshape(g, n_sb, BLOCK_BYTES)  # (G, S, 880)
    out = np.empty((g, 8, n_sb, _PLAIN), np.uint8)  # (G, 8, S, 110)
    out[..., 108:110] = blocks[:, :, 0:SCALES].reshape(g, n_sb, 8, 2).transpose(0, 2, 1, 3)
    out[..., 96:108] = blocks[:, :, SCALES:HMASK].reshape(g, n_sb, 12, 8).transpose(0, 3, 1, 2)
    words = blocks[:, :, HMASK:].reshape(g, n_sb, 24, 8, 4)  # (G, S, word, row, byte)
    out[..., 0:96] = words.transpose(0, 3, 1, 2, 4).reshape(g, 8, n_sb, 96)
    return out.reshape(g * 8, n_sb * _PLAIN)


# ---- kernels --------------------------------------------------------------------------------


def _matmul_q3_k_x8(out, w, xq, xd, xs, variant):
    """out (T, R) = x @ W.T for x8-layout Q3_K weights w (G, S * 880) and Q8_K activations xq (T, C), xd (T, S),
    xs (T, C / 16); 4 tokens per pass over a group's super-blocks, then single tokens."""
    n_tok, n_row = out.shape
    gb, cols, n_sb, n16 = w.shape[1], xq.shape[1], xd.shape[1], xs.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            e0 = t * n_sb  # xd offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for s in range(n_sb):
                o = go + s * BLOCK_BYTES
                prefetch_q3kx8(w, o + _AHEAD)
                i0, i1, i2, i3 = sums_q3kx8_4(variant, w, o, xq, t * cols + s * 256, cols, xs, t * n16 + s * 16, n16)
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
                prefetch_q3kx8(w, o + _AHEAD)
                i0 = sums_q3kx8(variant, w, o, xq, t * cols + s * 256, xs, t * n16 + s * 16)
                a0 = fma_d8(a0, i0, scales_x8(variant, w, o), get(xd, t * n_sb + s))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_q3_k_x8, matmul_q3_k_x8_serial = twins(_matmul_q3_k_x8)


@njit(cache=True, nogil=True)
def rows_q3_k_x8(out, r0, r1, w, xq, xd, xs, variant):
    """out (T, r1 - r0) f32 = rows r0 .. r1 of T tokens of Q3_Kx8 weights w (R / 8, S * 880); r0, r1 multiples of 8."""
    matmul_q3_k_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, variant)
