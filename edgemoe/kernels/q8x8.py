"""Q8_0 weights repacked 8 rows at a time ("Q8_0x8", as `q4x8` does for Q4_0), times Q8_0 int8
activations.

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, B = C / 32 blocks
    plain Q8_0 (R, 34 B)  block: d f16, qs int8[32]
    x8 layout  (G, 272 B) block b of group g, 272 bytes at g * 272 B + 272 b:
        [0:16]    d of rows 8g .. 8g + 7 (f16)
        [16:272]  chunk j < 8 (32 bytes): qs[4j : 4j + 4] of each of the 8 rows, row after row
    activations: xq (T, C) int8, xd (T, B) f32 scale (`quantize_q8_0`, pairs 0)

    out[t, r] = sum_b f32(d_w[r, b] * xd[t, b]) * (q_w[r, b] . xq[t, b])

The float steps per (token, block) are the same whatever T is, so a row's result does not depend on
the batch it was computed in. The layout has the size of the plain rows.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .intrinsics import get
from .intrinsics_x8 import dot_q8x8, dot_q8x8_4, fma_d8, prefetch_x8, scales_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .vecops import zero_f32x8

BLOCK_BYTES = 272  # 8 rows x 34 bytes
_PLAIN = 34  # plain Q8_0 block: f16 scale + 32 int8


# ---- layout ---------------------------------------------------------------------------------


def _repack(out32, out16, data):
    """out (G, B * 272 bytes) <- data (8G, B * 17) as uint16 (blocks are 2-byte aligned), through uint32
    and uint16 views of out, block by block: `q4x8._repack` with 8 chunks (a chunk count passed at run
    time instead of this literal measured 1.75x slower)."""
    n_grp, nb = out16.shape[0], data.shape[1] // 17
    for g in prange(n_grp):
        for b in range(nb):
            s = b * 17
            for r in range(8):
                out16[g, b * 136 + r] = data[8 * g + r, s]  # the f16 scales
            for j in range(8):  # chunk j: 4 quant bytes (two uint16 of the row) per row
                for r in range(8):
                    row = data[8 * g + r]
                    out32[g, b * 68 + 4 + 8 * j + r] = np.uint32(row[s + 1 + 2 * j]) | (
                        np.uint32(row[s + 2 + 2 * j]) << np.uint32(16))


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def repack_q8_0_x8(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain Q8_0 rows (R, B * 34) uint8 -> x8 layout (R / 8, B * 272) uint8, into `out` (a new array
    when None; it must not overlap `data`)."""
    out = x8_output(data, out, _PLAIN, "Q8_0")  # (G, B * 272)
    repack_kernel(_REPACK, data)(out.view(np.uint32), out.view(np.uint16), np.ascontiguousarray(data).view(np.uint16))
    return out


def unpack_q8_0_x8(data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, B * 272) uint8 -> plain Q8_0 rows (R, B * 34) uint8 (a new array)."""
    g, gb = data.shape
    nb = gb // BLOCK_BYTES
    blocks = data.reshape(g, nb, BLOCK_BYTES)  # (G, B, 272)
    out = np.empty((g, 8, nb, _PLAIN), np.uint8)  # (G, 8, B, 34)
    out[:, :, :, :2] = blocks[:, :, :16].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)
    qs = blocks[:, :, 16:].reshape(g, nb, 8, 8, 4)  # (G, B, chunk, row, byte)
    out[:, :, :, 2:] = qs.transpose(0, 3, 1, 2, 4).reshape(g, 8, nb, 32)
    return out.reshape(g * 8, nb * _PLAIN)


# ---- kernel ---------------------------------------------------------------------------------


def _matmul_q8_0_x8(out, w, xq, xd, variant):
    """out (T, R) = x @ W.T for x8-layout Q8_0 weights w (G, B * 272); 4 tokens per pass over a
    group's blocks, then single tokens."""
    n_tok, n_row = out.shape
    gb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            d0 = t * nb  # xd offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for b in range(nb):
                bo = go + b * BLOCK_BYTES
                prefetch_x8(w, bo + 2048)
                prefetch_x8(w, bo + 2048 + 144)
                dw = scales_x8(variant, w, bo)  # (8,) row scales
                p0, p1, p2, p3 = dot_q8x8_4(variant, w, bo + 16, xq, t * cols + b * 32, cols)
                a0 = fma_d8(a0, p0, dw, get(xd, d0 + b))
                a1 = fma_d8(a1, p1, dw, get(xd, d0 + nb + b))
                a2 = fma_d8(a2, p2, dw, get(xd, d0 + 2 * nb + b))
                a3 = fma_d8(a3, p3, dw, get(xd, d0 + 3 * nb + b))
            store_x8(out, t * n_row + g * 8, a0)
            store_x8(out, (t + 1) * n_row + g * 8, a1)
            store_x8(out, (t + 2) * n_row + g * 8, a2)
            store_x8(out, (t + 3) * n_row + g * 8, a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            d0 = t * nb
            a0 = zero_f32x8()
            for b in range(nb):
                bo = go + b * BLOCK_BYTES
                prefetch_x8(w, bo + 2048)
                prefetch_x8(w, bo + 2048 + 144)
                a0 = fma_d8(a0, dot_q8x8(variant, w, bo + 16, xq, t * cols + b * 32), scales_x8(variant, w, bo),
                            get(xd, d0 + b))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_q8_0_x8, matmul_q8_0_x8_serial = twins(_matmul_q8_0_x8)
