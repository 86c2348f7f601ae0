"""Q4_1, Q5_0 and Q5_1 weights repacked 8 rows at a time ("x8", as Q4_0x8 in `q4x8`), times Q8_0-style
int8 activations. One template serves the three types, specialised by the format marker of
`intrinsics_q451` (FMT_Q4_1 / FMT_Q5_0 / FMT_Q5_1), as the plain-layout kernel `q451` is.

Interleaving puts the 8 rows' d (and m) in one 16-byte load each (one vcvtph2ps), lets one broadcast
of 4 activations serve 8 rows, and makes the 8 row sums come out of vpmaddwd in lanes (`intrinsics_q451x8`).

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, B = C / 32 blocks,
    S = plain block bytes (Q4_1 20, Q5_0 22, Q5_1 24); q = unsigned quant (nibble, | fifth bit << 4)
    plain (R, B * S): Q4_1 d f16 | m f16 | qs[16]; Q5_0 d | qh[4] | qs[16]; Q5_1 d | m | qh[4] | qs[16]
        (qs byte i: element i low nibble, i + 16 high; qh a little-endian u32, bit i for element i)
    x8 layout (G, B * 8S), block b of group g at g * 8SB + 8S b:
        [0:16)           d of rows 8g .. 8g + 7 (f16)
        [16:32)          m of the 8 rows (f16)                                        Q4_1, Q5_1
        next 32 bytes H  byte 4r + k: bit 2j = fifth bit of element 4j + k of row r,  Q5_0, Q5_1
                         bit 2j + 1 = fifth bit of element 16 + 4j + k (j < 4)
        last 128 bytes   chunk j < 4 (32 bytes): qs[4j : 4j + 4] of each of the 8 rows, row after row
    activations (plain layout, `ACT`): xq (T, C) int8, xd (T, B) f32 scale, and
        Q4_1, Q5_1: xs (T, B) f32 = xd * the block's int8 sum      (q8act.quantize_q8_0(..., pairs=0))
        Q5_0:       xs (T, B) int32 = xc = 8 * the block's int8 sum  (q4x8.quantize_q8_0_x8)

    sumi[t, r, b] = q_w[r, b] . xq[t, b]   (exact integers)
    Q5_0:        acc = fma(f32(sumi - 2 xc), d_w * xd, acc)
    Q4_1, Q5_1:  acc = acc + fma(d_w * xd, f32(sumi), m_w * xs)
    out[t, r] = acc after blocks b = 0, 1, ..., B - 1 in order, from acc = 0 (ggml's generic order)

The per-block steps are those of ggml's generic vec_dot_q5_0_q8_0 / q4_1_q8_1 / q5_1_q8_1 with the FMA
contraction libggml-cpu's x86-64 build has (see `q451`), but the terms are summed in block order, not in
`q451`'s 8 lanes: the two layouts agree within f32 summation error, not bit for bit. The float steps per
(token, block) do not depend on T or on how tokens are grouped, so a row's result does not depend on the
batch, the thread count, the twin or the variant.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from ..errors import UnsupportedError
from .intrinsics import get
from .intrinsics_q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1
from .intrinsics_q451 import _layout as _plain_layout
from .intrinsics_q451x8 import acc_x8, block_bytes_x8, dot_q451_x8, dot_q451_x8_4, mins_x8, prefetch_q451_x8, x8_layout
from .intrinsics_x8 import scales_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .vecops import zero_f32x8

__all__ = [
    "ACT",
    "FMT",
    "matmul_q451_x8",
    "matmul_q451_x8_serial",
    "repack_q451_x8",
    "unpack_q451_x8",
    "rows_q4_1_x8",
    "rows_q5_0_x8",
    "rows_q5_1_x8",
]

FMT = {QT.Q4_1: FMT_Q4_1, QT.Q5_0: FMT_Q5_0, QT.Q5_1: FMT_Q5_1}  # the kernels' format markers
# activation format (`q8act.activations`) per type: its quantiser is q8act.quantize_q8_0(xq, xd, xs, x, 0)
# for q8_0, q4x8.quantize_q8_0_x8(xq, xd, xc, x) for q8_0x8
ACT = {QT.Q4_1: "q8_0", QT.Q5_0: "q8_0x8", QT.Q5_1: "q8_0"}


def _layouts(qtype):
    """(plain, x8) layouts of `qtype` (intrinsics_q451.Layout, intrinsics_q451x8.Layout)."""
    if qtype not in FMT:
        raise UnsupportedError(
            f"no Q4_1/Q5_0/Q5_1 x8 layout for {getattr(qtype, 'name', qtype)}; use q4x8.repack_x8 for Q4_0, Q4_K and Q8_0"
        )
    fmt = numba.typeof(FMT[qtype])
    return _plain_layout(fmt), x8_layout(fmt)


# ---- layout ---------------------------------------------------------------------------------


def repack_q451_x8(qtype, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain rows of `qtype` (Q4_1, Q5_0 or Q5_1) (R, B * S) uint8 -> x8 layout (R / 8, B * 8S) uint8, into
    `out` (a new array when None; it must not overlap `data`)."""
    plain, x8 = _layouts(qtype)
    out = x8_output(data, out, plain.bytes, qtype.name)  # (G, B * 8S)
    src = np.ascontiguousarray(data).view(np.uint16)  # (R, B * S / 2): every field is 2-byte aligned
    repack_kernel(_REPACK, data)(
        out.view(np.uint32), out.view(np.uint16), out, src, plain.bytes, plain.m, plain.qh, plain.qs, x8.m, x8.h, x8.qs
    )
    return out


def _repack(out32, out16, out8, data, sb, m, qh, qs, xm, xh, xq):
    """out (G, B * 8 sb bytes) <- data (8G, B * sb / 2) uint16, through uint32 / uint16 / uint8 views of
    out: the x8 layout of the module docstring. sb, m, qh, qs: the plain block's size and field offsets
    (m, qh 0 when absent); xm, xh, xq: the x8 block's."""
    n_grp, nb = out8.shape[0], data.shape[1] * 2 // sb
    for g in prange(n_grp):
        for b in range(nb):
            p, o = b * sb // 2, b * 8 * sb  # block b: uint16 offset in a plain row, byte offset in out[g]
            for r in range(8):
                row = data[8 * g + r]
                out16[g, o // 2 + r] = row[p]  # d
                if m:
                    out16[g, (o + xm) // 2 + r] = row[p + m // 2]
                if qh:
                    bits = np.uint32(row[p + qh // 2]) | (np.uint32(row[p + qh // 2 + 1]) << np.uint32(16))
                    for k in range(4):
                        v = np.uint32(0)
                        for j in range(4):
                            v |= ((bits >> np.uint32(4 * j + k)) & np.uint32(1)) << np.uint32(2 * j)
                            v |= ((bits >> np.uint32(16 + 4 * j + k)) & np.uint32(1)) << np.uint32(2 * j + 1)
                        out8[g, o + xh + 4 * r + k] = np.uint8(v)
                for j in range(4):  # chunk j: qs bytes 4j .. 4j + 3 (two uint16 of the row)
                    lo, hi = np.uint32(row[p + qs // 2 + 2 * j]), np.uint32(row[p + qs // 2 + 2 * j + 1])
                    out32[g, (o + xq) // 4 + 8 * j + r] = lo | (hi << np.uint32(16))


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def unpack_q451_x8(qtype, data: np.ndarray) -> np.ndarray:
    """x8 layout of `qtype` (R / 8, B * 8S) uint8 -> plain rows (R, B * S) uint8 (a new array)."""
    plain, x8 = _layouts(qtype)
    g, nb = data.shape[0], data.shape[1] // x8.bytes
    blocks = data.reshape(g, nb, x8.bytes)  # (G, B, 8S)

    def per_row(first: int, n: int) -> np.ndarray:  # (G, 8, B, n): n bytes per row from byte `first`
        return blocks[:, :, first : first + 8 * n].reshape(g, nb, 8, n).transpose(0, 2, 1, 3)

    out = np.empty((g, 8, nb, plain.bytes), np.uint8)  # (G, 8, B, S)
    out[..., 0:2] = per_row(0, 2)
    if plain.m:
        out[..., plain.m : plain.m + 2] = per_row(x8.m, 2)
    if plain.qh:
        h = per_row(x8.h, 4)  # (G, 8, B, k)
        bits = np.empty((g, 8, nb, 32), np.uint8)  # (G, 8, B, element)
        for j in range(4):
            bits[..., 4 * j : 4 * j + 4] = (h >> (2 * j)) & 1
            bits[..., 16 + 4 * j : 20 + 4 * j] = (h >> (2 * j + 1)) & 1
        out[..., plain.qh : plain.qh + 4] = np.packbits(bits, axis=-1, bitorder="little")
    qs = blocks[:, :, x8.qs :].reshape(g, nb, 4, 8, 4)  # (G, B, chunk, row, byte)
    out[..., plain.qs :] = qs.transpose(0, 3, 1, 2, 4).reshape(g, 8, nb, 16)
    return out.reshape(g * 8, nb * plain.bytes)


# ---- kernels --------------------------------------------------------------------------------


def _matmul_q451_x8(out, w, xq, xd, xs, fmt, variant):
    """out (T, R) = x @ W.T for x8-layout weights w (G, B * 8S) of format `fmt` and activations of `ACT`;
    4 tokens per pass over a group's blocks, then single tokens, each with the same per-token steps.

    Each block prefetches the bytes 2048 ahead (a thread's weights are one sequential stream), as `q4x8`.
    """
    n_tok, n_row = out.shape
    gb, cols, nb = w.shape[1], xq.shape[1], xd.shape[1]
    bb = block_bytes_x8(fmt)
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            d0 = t * nb  # xd, xs offset of token t
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for b in range(nb):
                bo = go + b * bb
                prefetch_q451_x8(fmt, w, bo + 2048)
                dw, mw = scales_x8(variant, w, bo), mins_x8(fmt, variant, w, bo)  # (8,) row d, m
                p0, p1, p2, p3 = dot_q451_x8_4(fmt, variant, w, bo, xq, t * cols + b * 32, cols)
                a0 = acc_x8(fmt, a0, p0, dw, mw, get(xd, d0 + b), get(xs, d0 + b))
                a1 = acc_x8(fmt, a1, p1, dw, mw, get(xd, d0 + nb + b), get(xs, d0 + nb + b))
                a2 = acc_x8(fmt, a2, p2, dw, mw, get(xd, d0 + 2 * nb + b), get(xs, d0 + 2 * nb + b))
                a3 = acc_x8(fmt, a3, p3, dw, mw, get(xd, d0 + 3 * nb + b), get(xs, d0 + 3 * nb + b))
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
                prefetch_q451_x8(fmt, w, bo + 2048)
                dw, mw = scales_x8(variant, w, bo), mins_x8(fmt, variant, w, bo)
                p0 = dot_q451_x8(fmt, variant, w, bo, xq, t * cols + b * 32)
                a0 = acc_x8(fmt, a0, p0, dw, mw, get(xd, d0 + b), get(xs, d0 + b))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_q451_x8, matmul_q451_x8_serial = twins(_matmul_q451_x8)


# Rows r0 .. r1 (multiples of 8) of T tokens, as `rows.rows_q4_0_x8`: out (T, r1 - r0) f32, w the x8 storage,
# xq, xd, xs (T, ...) activations of `ACT`.


@njit(cache=True, nogil=True)
def rows_q4_1_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, FMT_Q4_1, variant)


@njit(cache=True, nogil=True)
def rows_q5_0_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, FMT_Q5_0, variant)


@njit(cache=True, nogil=True)
def rows_q5_1_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_x8_serial(out, w[r0 // 8 : r1 // 8], xq, xd, xs, FMT_Q5_1, variant)
