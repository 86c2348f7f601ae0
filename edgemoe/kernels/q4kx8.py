"""Q4_K weights repacked 8 rows at a time ("Q4_Kx8", the idea of ggml-cpu's block_q4_Kx8), times
Q8_K-style int8 activations.

As for Q4_0x8 (`q4x8`), interleaving 8 rows lets one broadcast of 4 activations serve 8 rows and
makes the 8 row sums come out in lanes; the 8 rows' d, dmin and scale bytes sit side by side, so the
6-bit scales and mins of 8 rows unpack together in 64-bit words. The layout has exactly the size
of the plain rows (1152 bytes per 8 rows x 256 columns), so a streamed expert repacks in place of
its plain copy.

    T = tokens, R = rows (R % 8 == 0), G = R / 8 row groups, C = columns, S = C / 256 super-blocks
    plain Q4_K (R, S * 144 B) block: d f16, dmin f16, scales[12] (6-bit scale + min per 32 columns),
        qs[128]: byte 32c + i holds column 64c + i (low nibble) and 64c + 32 + i (high nibble)
    x8 layout (G, S * 1152 B), block s of group g (see `intrinsics_k8` for the byte map)
    activations: xq (T, C) int8, xd (T, S) f32 scale, xm (T, C / 64) int32: for each pair p of
        32-column sub-blocks, (sum of sub-block 2p) | (sum of sub-block 2p + 1) << 16

    out[t, r] = sum_s fma(-msum, dmin_r * xd, fma(isum, d_r * xd, acc))
        isum = sum_j sc[r, j] * (q[r, j] . xq[t, j]),  msum = sum_j m[r, j] * sum(xq[t, j])   (exact ints)

The float steps per (token, super-block) are the same whatever T is, so a row's result does not
depend on the batch it was computed in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import get
from .intrinsics_k8 import BLOCK_BYTES, QS_OFFSET, dot_k8, dot_k8_4, fma_k8, load_i64, mins_k8
from .intrinsics_x8 import prefetch_x8, scales_x8, store_x8
from .ops import twins
from .q4x8 import repack_kernel, x8_output
from .q8act import quantize_q8_k
from .vecops import iadd, zero_f32x8

_PLAIN = 144  # bytes of a plain Q4_K super-block


# ---- layout ---------------------------------------------------------------------------------


def _repack(out32, out16, out8, data32, data16, data8):
    """out (G, S * 1152) <- data (8G, S * 144), through uint32 / uint16 / uint8 views of both."""
    n_grp, n_sb = out8.shape[0], data8.shape[1] // _PLAIN
    for g in prange(n_grp):
        for r in range(8):
            row = 8 * g + r
            for s in range(n_sb):
                o, p = s * BLOCK_BYTES, s * _PLAIN
                out16[g, o // 2 + r] = data16[row, p // 2]  # d
                out16[g, o // 2 + 8 + r] = data16[row, p // 2 + 1]  # dmin
                for i in range(12):
                    out8[g, o + 32 + 8 * i + r] = data8[row, p + 4 + i]
                for c in range(4):
                    for k in range(8):
                        out32[g, (o + QS_OFFSET + 256 * c + 32 * k) // 4 + r] = data32[row, (p + 16 + 32 * c + 4 * k) // 4]


_REPACK = twins(_repack)  # (parallel over row groups, serial)


def repack_q4_k_x8(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain Q4_K rows (R, S * 144) uint8 -> x8 layout (R / 8, S * 1152) uint8, into `out` (a new
    array when None; it must not overlap `data`)."""
    out = x8_output(data, out, _PLAIN, "Q4_K")  # (G, S * 1152)
    data = np.ascontiguousarray(data)
    repack_kernel(_REPACK, data)(out.view(np.uint32), out.view(np.uint16), out, data.view(np.uint32),
                                 data.view(np.uint16), data)
    return out


def unpack_q4_k_x8(data: np.ndarray) -> np.ndarray:
    """x8 layout (R / 8, S * 1152) uint8 -> plain Q4_K rows (R, S * 144) uint8 (a new array)."""
    g, gb = data.shape
    n_sb = gb // BLOCK_BYTES
    blocks = data.reshape(g, n_sb, BLOCK_BYTES)  # (G, S, 1152)
    out = np.empty((g, 8, n_sb, _PLAIN), np.uint8)  # (G, 8, S, 144)
    out[..., 0:2] = blocks[:, :, 0:16].reshape(g, n_sb, 8, 2).transpose(0, 2, 1, 3)
    out[..., 2:4] = blocks[:, :, 16:32].reshape(g, n_sb, 8, 2).transpose(0, 2, 1, 3)
    out[..., 4:16] = blocks[:, :, 32:128].reshape(g, n_sb, 12, 8).transpose(0, 3, 1, 2)
    qs = blocks[:, :, QS_OFFSET:].reshape(g, n_sb, 4, 8, 8, 4)  # (G, S, chunk, group, row, byte)
    out[..., 16:] = qs.transpose(0, 4, 1, 2, 3, 5).reshape(g, 8, n_sb, 128)
    return out.reshape(g * 8, n_sb * _PLAIN)


# ---- kernels --------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def quantize_q8_k_x8(xq, xd, xm, x):
    """Q8_K int8 blocks of each row of x (T, C), as `quantize_q8_k`: xq (T, C) int8, xd (T, S) f32,
    and xm (T, C / 64) int32 with the sums of each pair of 32-column sub-blocks packed as 16 bits each
    (|sum| <= 32 * 128)."""
    n_tok, cols = x.shape
    xb = np.empty((n_tok, cols // 16), np.int32)  # (T, C/16) sums of 16
    quantize_q8_k(xq, xd, xb, x)
    for t in range(n_tok):
        for p in range(cols // 64):
            lo = xb[t, 4 * p] + xb[t, 4 * p + 1]
            hi = xb[t, 4 * p + 2] + xb[t, 4 * p + 3]
            xm[t, p] = (lo & 0xFFFF) | (hi << 16)


@njit(cache=True, nogil=True, inline="always")
def _scales_mins(w, o):
    """The 8 sub-block scales and 8 mins of the 8 rows of the block at w[o:], each an int64 with
    one byte per row (ggml's get_scale_min_k4, on 8 rows at once)."""
    q0, q1, q2, q3 = load_i64(w, o + 32), load_i64(w, o + 40), load_i64(w, o + 48), load_i64(w, o + 56)
    q4, q5, q6, q7 = load_i64(w, o + 64), load_i64(w, o + 72), load_i64(w, o + 80), load_i64(w, o + 88)
    q8, q9, q10, q11 = load_i64(w, o + 96), load_i64(w, o + 104), load_i64(w, o + 112), load_i64(w, o + 120)
    m6, m4, m2 = 0x3F3F3F3F3F3F3F3F, 0x0F0F0F0F0F0F0F0F, 0x0303030303030303
    s0, s1, s2, s3 = q0 & m6, q1 & m6, q2 & m6, q3 & m6
    n0, n1, n2, n3 = q4 & m6, q5 & m6, q6 & m6, q7 & m6
    s4 = (q8 & m4) | (((q0 >> 6) & m2) << 4)
    s5 = (q9 & m4) | (((q1 >> 6) & m2) << 4)
    s6 = (q10 & m4) | (((q2 >> 6) & m2) << 4)
    s7 = (q11 & m4) | (((q3 >> 6) & m2) << 4)
    n4 = ((q8 >> 4) & m4) | (((q4 >> 6) & m2) << 4)
    n5 = ((q9 >> 4) & m4) | (((q5 >> 6) & m2) << 4)
    n6 = ((q10 >> 4) & m4) | (((q6 >> 6) & m2) << 4)
    n7 = ((q11 >> 4) & m4) | (((q7 >> 6) & m2) << 4)
    return s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, n4, n5, n6, n7


@njit(cache=True, nogil=True, inline="always")
def _prefetch_block(w, o):
    """Prefetch the 1152-byte block at w[o:] (one hint per 48 bytes, as `prefetch_x8` does for 144)."""
    for k in range(0, BLOCK_BYTES, 144):
        prefetch_x8(w, o + k)


def _matmul_q4_k_x8(out, w, xq, xd, xm, variant):
    """out (T, R) = x @ W.T for x8-layout Q4_K weights w (G, S * 1152) and activations from
    `quantize_q8_k_x8`; 4 tokens per pass over a group's super-blocks, then single tokens."""
    n_tok, n_row = out.shape
    gb, cols, n_sb, n_m = w.shape[1], xq.shape[1], xd.shape[1], xm.shape[1]
    for g in prange(n_row // 8):
        go = g * gb  # offset of group g in w
        t = 0
        while t + 4 <= n_tok:
            a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
            for s in range(n_sb):
                o = go + s * BLOCK_BYTES
                _prefetch_block(w, o + 2048)
                s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, n4, n5, n6, n7 = _scales_mins(w, o)
                xo = t * cols + s * 256
                qo = o + QS_OFFSET
                i0, i1, i2, i3 = dot_k8_4(variant, w, qo, xq, xo, cols, s0, s1)
                j0, j1, j2, j3 = dot_k8_4(variant, w, qo + 256, xq, xo + 64, cols, s2, s3)
                i0, i1, i2, i3 = iadd(i0, j0), iadd(i1, j1), iadd(i2, j2), iadd(i3, j3)
                j0, j1, j2, j3 = dot_k8_4(variant, w, qo + 512, xq, xo + 128, cols, s4, s5)
                i0, i1, i2, i3 = iadd(i0, j0), iadd(i1, j1), iadd(i2, j2), iadd(i3, j3)
                j0, j1, j2, j3 = dot_k8_4(variant, w, qo + 768, xq, xo + 192, cols, s6, s7)
                i0, i1, i2, i3 = iadd(i0, j0), iadd(i1, j1), iadd(i2, j2), iadd(i3, j3)
                dw, dm = scales_x8(variant, w, o), scales_x8(variant, w, o + 16)
                mo = t * n_m + 4 * s
                a0 = fma_k8(a0, i0, mins_k8(variant, n0, n1, n2, n3, n4, n5, n6, n7, xm, mo), dw, dm,
                            get(xd, t * n_sb + s))
                a1 = fma_k8(a1, i1, mins_k8(variant, n0, n1, n2, n3, n4, n5, n6, n7, xm, mo + n_m), dw, dm,
                            get(xd, (t + 1) * n_sb + s))
                a2 = fma_k8(a2, i2, mins_k8(variant, n0, n1, n2, n3, n4, n5, n6, n7, xm, mo + 2 * n_m), dw, dm,
                            get(xd, (t + 2) * n_sb + s))
                a3 = fma_k8(a3, i3, mins_k8(variant, n0, n1, n2, n3, n4, n5, n6, n7, xm, mo + 3 * n_m), dw, dm,
                            get(xd, (t + 3) * n_sb + s))
            store_x8(out, t * n_row + g * 8, a0)
            store_x8(out, (t + 1) * n_row + g * 8, a1)
            store_x8(out, (t + 2) * n_row + g * 8, a2)
            store_x8(out, (t + 3) * n_row + g * 8, a3)
            t += 4
        while t < n_tok:  # the same per-token sequence, one token
            a0 = zero_f32x8()
            for s in range(n_sb):
                o = go + s * BLOCK_BYTES
                _prefetch_block(w, o + 2048)
                s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, n4, n5, n6, n7 = _scales_mins(w, o)
                xo = t * cols + s * 256
                qo = o + QS_OFFSET
                i0 = dot_k8(variant, w, qo, xq, xo, s0, s1)
                i0 = iadd(i0, dot_k8(variant, w, qo + 256, xq, xo + 64, s2, s3))
                i0 = iadd(i0, dot_k8(variant, w, qo + 512, xq, xo + 128, s4, s5))
                i0 = iadd(i0, dot_k8(variant, w, qo + 768, xq, xo + 192, s6, s7))
                a0 = fma_k8(a0, i0, mins_k8(variant, n0, n1, n2, n3, n4, n5, n6, n7, xm, t * n_m + 4 * s),
                            scales_x8(variant, w, o), scales_x8(variant, w, o + 16), get(xd, t * n_sb + s))
            store_x8(out, t * n_row + g * 8, a0)
            t += 1


# (parallel over row groups, serial) compilations of the same code: identical results.
matmul_q4_k_x8, matmul_q4_k_x8_serial = twins(_matmul_q4_k_x8)
