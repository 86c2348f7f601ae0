"""IQ4_NL and MXFP4 weights repacked 8 rows at a time ("IQ4_NLx8", "MXFP4x8", as `q4x8` does for Q4_0),
times Q8_0 int8 activations: one template, specialised by a format marker.

Both types are 32-value blocks of 4-bit codes that index a table of 16 signed int8 levels
(`intrinsics_lut4x8`); they differ in the scale:

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, B = C / 32 blocks
    plain IQ4_NL (R, B * 18): d f16 | qs u8[16]     value = d * kvalues_iq4nl[code]
    plain MXFP4  (R, B * 17): e u8  | qs u8[16]     value = 2**(e - 128) * kvalues_mxfp4[code] (E2M1 doubled)
        code of element i = low nibble of qs[i], of element i + 16 = high nibble of qs[i]
    x8 layout (G, B * 8 * S), S = 18 or 17: block b of group g, 8 * S bytes at g * B * 8 * S + 8 * S * b:
        [0 : 8s)           the scales of rows 8g .. 8g + 7 (IQ4_NL: 16 bytes of f16 d; MXFP4: 8 bytes of e)
        [8s : 8s + 128)    chunk j < 4 (32 bytes): qs[4j : 4j + 4] of each of the 8 rows, row after row
    The scales stay first for both types, so MXFP4's chunks start at byte 8 of a 136-byte block and are
    not 32-byte aligned (the loads are unaligned anyway; the layout has the plain rows' size).
    activations ("q8_0", `q8act.quantize_q8_0(xq, xd, xs, x, 0)`): xq (T, C) int8, plain layout,
        xd (T, B) f32 scale; xs is not read

Arithmetic, per token t, row r: for blocks b = 0, 1, ... in order, with one f32 accumulator (lane r):

    sumi = sum_i level[code_i(r, b)] * xq[t, 32b + i]            exact int32
    IQ4_NL: acc = fma(float(sumi), d_w[r, b] * xd[t, b], acc)     (the product rounded to f32 first)
    MXFP4:  acc = fma(float(sumi), e8m0_to_fp32_half(e_w[r, b]) * xd[t, b], acc)

which is the loop of ggml's generic ggml_vec_dot_iq4_nl_q8_0 / ggml_vec_dot_mxfp4_q8_0 (`sumf += d * (sumi1
+ sumi2)`, d = d_x * d_w) with the multiply-add contracted to one FMA. ggml's d_x is the f16-rounded scale,
and the libggml of llama-cpp-python does not contract: its generic C rounds the product first, one more
rounding per block (tests/test_lut4x8.py bounds the difference). The float steps per (token, block) are
the same whatever T, the tile, the thread count, twin or variant, so a row's result does not depend on
the batch it was computed in. xq must be in [-127, 127] (as q8act makes it; see `intrinsics_lut4x8`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from ..errors import UnsupportedError
from .intrinsics import get
from .intrinsics_lut4x8 import FMT_IQ4_NL, FMT_MXFP4, copy_lut4, dot_lut4x8, dot_lut4x8_4, lut4_sizes, scales_lut4x8
from .intrinsics_x8 import fma_d8, prefetch_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .vecops import zero_f32x8

__all__ = ["ACT", "FMT_IQ4_NL", "FMT_MXFP4", "FORMATS", "block_bytes", "matmul_lut4_x8", "matmul_lut4_x8_serial",
           "repack_lut4_x8", "rows_iq4_nl_x8", "rows_mxfp4_x8", "unpack_lut4_x8"]

_PLAIN = {QT.IQ4_NL: (18, 2), QT.MXFP4: (17, 1)}  # (plain block bytes, scale bytes)
FORMATS = {QT.IQ4_NL: FMT_IQ4_NL, QT.MXFP4: FMT_MXFP4}  # the format marker of each type
ACT = "q8_0"  # activation format of both (`q8act.activations`): plain int8 blocks, f32 scales


def block_bytes(qtype) -> int:
    """Bytes of one x8 block (8 rows x 32 columns) of `qtype`: 144 for IQ4_NL, 136 for MXFP4."""
    return 8 * _sizes(qtype)[0]


def _sizes(qtype) -> tuple[int, int]:
    if qtype not in _PLAIN:
        raise UnsupportedError(f"no 8-row lookup-table layout for {getattr(qtype, 'name', qtype)}; "
                               "use IQ4_NL or MXFP4, or keep this weight in the plain layout")
    return _PLAIN[qtype]


# ---- layout ---------------------------------------------------------------------------------


def repack_lut4_x8(qtype, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain IQ4_NL or MXFP4 rows (R, B * S) uint8 -> x8 layout (R / 8, B * 8 * S) uint8, into `out` (a new
    array when None; it must not overlap `data`)."""
    plain, _ = _sizes(qtype)
    out = x8_output(data, out, plain, qtype.name)  # (G, B * 8 * S)
    repack_kernel(_REPACK, data)(out, np.ascontiguousarray(data), FORMATS[qtype])
    return out


def _repack(out, data, fmt):
    """out (G, B * 8S) <- data (8G, B * S), block by block: the 8 scales, then the 4 chunks of 4-byte groups
    (flat offsets, one load and one store per move)."""
    plain, sb = lut4_sizes(fmt)  # constants of the format
    n_grp, rb = out.shape[0], data.shape[1]
    for g in prange(n_grp):
        for b in range(rb // plain):
            s = 8 * g * rb + b * plain  # block b of row 8g in data
            o = g * 8 * rb + b * 8 * plain  # x8 block b of group g in out
            for r in range(8):
                copy_lut4(fmt, 0, out, o + sb * r, data, s + r * rb)
            for j in range(4):  # chunk j: quant bytes 4j .. 4j + 3 of each row
                for r in range(8):
                    copy_lut4(fmt, 4, out, o + 8 * sb + 32 * j + 4 * r, data, s + r * rb + sb + 4 * j)


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def unpack_lut4_x8(qtype, data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, B * 8 * S) uint8 -> plain rows (R, B * S) uint8 (a new array)."""
    plain, sb = _sizes(qtype)
    g, gb = data.shape
    nb = gb // (8 * plain)
    blocks = data.reshape(g, nb, 8 * plain)  # (G, B, 8S)
    out = np.empty((g, 8, nb, plain), np.uint8)  # (G, 8, B, S)
    out[:, :, :, :sb] = blocks[:, :, : 8 * sb].reshape(g, nb, 8, sb).transpose(0, 2, 1, 3)
    qs = blocks[:, :, 8 * sb :].reshape(g, nb, 4, 8, 4)  # (G, B, chunk, row, byte)
    out[:, :, :, sb:] = qs.transpose(0, 3, 1, 2, 4).reshape(g, 8, nb, 16)
    return out.reshape(g * 8, nb * plain)


# ---- kernels --------------------------------------------------------------------------------


def _matmul_lut4_x8(out, w, xq, xd, xs, fmt, variant):
    """out (T, R) = x @ W.T for x8-layout weights w (G, B * 8S) of format `fmt` and Q8_0 activations
    xq (T, C), xd (T, B); xs unused. 4 tokens per pass over a group's blocks, then single tokens.

    Each block prefetches the one 2048 bytes ahead, as `q4x8` (a thread's weights are one stream).
    """
    n_tok, n_row = out.shape
    plain, _ = lut4_sizes(fmt)
    bb = 8 * plain  # bytes per x8 block
    gb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            d0 = t * nb  # xd offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for b in range(nb):
                bo = go + b * bb
                prefetch_x8(w, bo + 2048)
                dw = scales_lut4x8(fmt, variant, w, bo)  # (8,) row scales
                p0, p1, p2, p3 = dot_lut4x8_4(fmt, variant, w, bo, xq, t * cols + b * 32, cols)
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
                bo = go + b * bb
                prefetch_x8(w, bo + 2048)
                p0 = dot_lut4x8(fmt, variant, w, bo, xq, t * cols + b * 32)
                a0 = fma_d8(a0, p0, scales_lut4x8(fmt, variant, w, bo), get(xd, d0 + b))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_lut4_x8, matmul_lut4_x8_serial = twins(_matmul_lut4_x8)


@njit(cache=True, nogil=True)
def rows_iq4_nl_x8(out, r0, r1, w, xq, xd, xs, variant):
    """out (T, r1 - r0) f32 = rows r0 .. r1 of T tokens of IQ4_NLx8 weights; r0, r1 multiples of 8."""
    matmul_lut4_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, FMT_IQ4_NL, variant)


@njit(cache=True, nogil=True)
def rows_mxfp4_x8(out, r0, r1, w, xq, xd, xs, variant):
    """out (T, r1 - r0) f32 = rows r0 .. r1 of T tokens of MXFP4x8 weights; r0, r1 multiples of 8."""
    matmul_lut4_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, FMT_MXFP4, variant)
