"""Q4_0 weights repacked 8 rows at a time ("Q4_0x8", as ggml-cpu's block_q4_0x8), times
Q8_0-style int8 activations.

Interleaving 8 rows puts the 8 scales of a block in one 16-byte load (one vcvtph2ps), lets each
activation block be loaded once for 8 rows, and makes the 8 row sums come out of vpmaddwd in
lanes, with no horizontal reduction (see `intrinsics_x8`).

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, B = C / 32 blocks
    plain Q4_0 (R, 18 B)  block: d f16, qs u8[16] (low nibble = element i, high = i + 16), value q - 8
    x8 layout  (G, 144 B) block b of group g, 144 bytes at g * 144 B + 144 b:
        [0:16]    d of rows 8g .. 8g + 7 (f16)
        [16:144]  chunk j < 4 (32 bytes): qs[4j : 4j + 4] of each of the 8 rows, row after row
    activations: xq (T, C) int8, xd (T, B) f32 scale, xc (T, B) int32 = 8 * the sum of the block's int8 values

    out[t, r] = sum_b f32(d_w[r, b] * xd[t, b]) * (q_w[r, b] . xq[t, b] - xc[t, b])

The float steps per (token, block) are the same whatever T is and however tokens are grouped,
so a row's result does not depend on the batch it was computed in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import UnsupportedError
from .intrinsics import get
from .intrinsics_x8 import BLOCK_BYTES, dot_x8, dot_x8_4, fma_x8, prefetch_x8, scales_x8, store_x8
from .ops import twins
from .q8act import absmax32, quant32_round, store_half, sum_half
from .vecops import zero_f32x8

_Q4_0_BYTES = 18  # plain Q4_0 block: f16 scale + 16 quant bytes


# ---- layout ---------------------------------------------------------------------------------


def x8_output(data: np.ndarray, out: np.ndarray | None, block: int, name: str) -> np.ndarray:
    """Check plain rows `data` (R, n * block) of type `name` for repacking (UnsupportedError) and `out`, a C-contiguous
    uint8 (R / 8, 8 * row bytes) array (ValueError); `out`, or a new such array, to repack them into."""
    rows, rb = data.shape
    if data.dtype != np.uint8 or rb % block or rows % 8:
        raise UnsupportedError(
            f"cannot interleave {name} storage {data.shape} {data.dtype}: need uint8 rows of {block}-byte "
            "blocks and a row count divisible by 8; keep this weight in the plain layout"
        )
    if out is None:
        return np.empty((rows // 8, rb * 8), np.uint8)
    if out.shape != (rows // 8, rb * 8) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(rows // 8, rb * 8)}, got {out.dtype} {out.shape}")
    return out


def repack_kernel(pair, data: np.ndarray):
    """The parallel twin of a repack kernel for data of 1 MB or more, else the serial one."""
    return pair[0 if data.nbytes >= 1 << 20 else 1]


def repack_q4_0_x8(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain Q4_0 rows (R, B * 18) uint8 -> x8 layout (R / 8, B * 144) uint8, into `out` (a new array
    when None; it must not overlap `data`)."""
    out = x8_output(data, out, _Q4_0_BYTES, "Q4_0")  # (G, B * 144)
    repack_kernel(_REPACK, data)(out.view(np.uint32), out.view(np.uint16), np.ascontiguousarray(data).view(np.uint16))
    return out


def _repack(out32, out16, data):
    """out (G, B * 144 bytes) <- data (8G, B * 9) as uint16 (blocks are 2-byte aligned), through uint32
    and uint16 views of out: the x8 layout described in the module docstring, written block by block."""
    n_grp, nb = out16.shape[0], data.shape[1] // 9
    for g in prange(n_grp):
        for b in range(nb):
            s = b * 9
            for r in range(8):
                out16[g, b * 72 + r] = data[8 * g + r, s]  # the f16 scales
            for j in range(4):  # chunk j: 4 quant bytes (two uint16 of the row) per row
                for r in range(8):
                    row = data[8 * g + r]
                    out32[g, b * 36 + 4 + 8 * j + r] = np.uint32(row[s + 1 + 2 * j]) | (
                        np.uint32(row[s + 2 + 2 * j]) << np.uint32(16))


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def unpack_q4_0_x8(data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, B * 144) uint8 -> plain Q4_0 rows (R, B * 18) uint8 (a new array)."""
    g, gb = data.shape
    nb = gb // BLOCK_BYTES
    blocks = data.reshape(g, nb, BLOCK_BYTES)  # (G, B, 144)
    out = np.empty((g, 8, nb, _Q4_0_BYTES), np.uint8)  # (G, 8, B, 18)
    out[:, :, :, :2] = blocks[:, :, :16].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)
    qs = blocks[:, :, 16:].reshape(g, nb, 4, 8, 4)  # (G, B, chunk, row, byte)
    out[:, :, :, 2:] = qs.transpose(0, 3, 1, 2, 4).reshape(g, 8, nb, 16)
    return out.reshape(g * 8, nb * _Q4_0_BYTES)


# ---- kernels --------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_q8_0_x8(xq, xd, xc, x):
    """Q8_0 int8 blocks of each row of x (T, C), as gguf: xq (T, C) int8, xd (T, B) f32 scales
    (gguf stores them rounded to f16), xc (T, B) int32 = 8 * the sum of each block's int8 values (the
    correction for Q4_0's offset of 8)."""
    n_tok, cols = x.shape
    for t in range(n_tok):
        for b in range(cols // 32):
            src = t * cols + b * 32  # flat offset of the block in x and xq
            d = np.float32(absmax32(x, src) / np.float32(127.0))
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            q = quant32_round(x, src, inv)
            store_half(xq, src, q, 0)
            store_half(xq, src + 16, q, 1)
            xd[t, b] = d
            xc[t, b] = 8 * (sum_half(q, 0) + sum_half(q, 1))


def _matmul_q4_0_x8(out, w, xq, xd, xc, variant):
    """out (T, R) = x @ W.T for x8-layout Q4_0 weights w (G, B * 144) and activations from
    `quantize_q8_0_x8`; 4 tokens per pass over a group's blocks, then single tokens.

    Each block prefetches the one 2048 bytes ahead (a literal: a thread's weights are one
    sequential stream): +25% from DRAM on one thread, ~3% slower when the weights are in L3.
    """
    n_tok, n_row = out.shape
    gb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            d0 = t * nb  # xd, xc offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for b in range(nb):
                bo = go + b * 144
                prefetch_x8(w, bo + 2048)
                dw = scales_x8(variant, w, bo)  # (8,) row scales
                p0, p1, p2, p3 = dot_x8_4(variant, w, bo + 16, xq, t * cols + b * 32, cols)
                a0 = fma_x8(a0, p0, get(xc, d0 + b), dw, get(xd, d0 + b))
                a1 = fma_x8(a1, p1, get(xc, d0 + nb + b), dw, get(xd, d0 + nb + b))
                a2 = fma_x8(a2, p2, get(xc, d0 + 2 * nb + b), dw, get(xd, d0 + 2 * nb + b))
                a3 = fma_x8(a3, p3, get(xc, d0 + 3 * nb + b), dw, get(xd, d0 + 3 * nb + b))
            store_x8(out, t * n_row + g * 8, a0)
            store_x8(out, (t + 1) * n_row + g * 8, a1)
            store_x8(out, (t + 2) * n_row + g * 8, a2)
            store_x8(out, (t + 3) * n_row + g * 8, a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            d0 = t * nb
            a0 = zero_f32x8()
            for b in range(nb):
                bo = go + b * 144
                prefetch_x8(w, bo + 2048)
                p0 = dot_x8(variant, w, bo + 16, xq, t * cols + b * 32)
                a0 = fma_x8(a0, p0, get(xc, d0 + b), scales_x8(variant, w, bo), get(xd, d0 + b))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_q4_0_x8, matmul_q4_0_x8_serial = twins(_matmul_q4_0_x8)
