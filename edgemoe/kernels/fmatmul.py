"""F32, F16 and BF16 weights times f32 activations, parallel over output rows.

    T = tokens, R = output rows, C = columns
    out (T, R) f32; w (R, C) float32 / uint16 (f16 or bf16 bits); x (T, C) f32

`reassoc` lets LLVM vectorise the f32 reductions (the tests bound the resulting rounding
differences); F16 converts with vcvtph2ps on x86 (a portable bit trick otherwise), BF16 by shifting
the bits into an f32. Four tokens share each loaded weight.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import load_bf16, load_f16

_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def matmul_f32(out, w, x):
    """out (T, R) = x (T, C) @ w (R, C).T for float32 weights."""
    n_tok, cols = x.shape
    for r in prange(w.shape[0]):
        wr = w[r]  # (C,)
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]  # (C,) each
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(cols):
                v = wr[i]
                a0 += v * x0[i]
                a1 += v * x1[i]
                a2 += v * x2[i]
                a3 += v * x3[i]
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
            t += 4
        while t < n_tok:
            x0 = x[t]
            a0 = np.float32(0.0)
            for i in range(cols):
                a0 += wr[i] * x0[i]
            out[t, r] = a0
            t += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def matmul_f16(out, w, x, variant):
    """out (T, R) = x (T, C) @ w (R, C).T for IEEE half weights given as uint16 bits."""
    n_tok, cols = x.shape
    for r in prange(w.shape[0]):
        wr = w[r]  # (C,) uint16
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]  # (C,) each
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(cols):
                v = load_f16(variant, wr, i)
                a0 += v * x0[i]
                a1 += v * x1[i]
                a2 += v * x2[i]
                a3 += v * x3[i]
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
            t += 4
        while t < n_tok:
            x0 = x[t]
            a0 = np.float32(0.0)
            for i in range(cols):
                a0 += load_f16(variant, wr, i) * x0[i]
            out[t, r] = a0
            t += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def matmul_bf16(out, w, x):
    """out (T, R) = x (T, C) @ w (R, C).T for bfloat16 weights given as uint16 bits."""
    n_tok, cols = x.shape
    for r in prange(w.shape[0]):
        wr = w[r]  # (C,) uint16
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]  # (C,) each
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(cols):
                v = load_bf16(wr, i)
                a0 += v * x0[i]
                a1 += v * x1[i]
                a2 += v * x2[i]
                a3 += v * x3[i]
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
            t += 4
        while t < n_tok:
            x0 = x[t]
            a0 = np.float32(0.0)
            for i in range(cols):
                a0 += load_bf16(wr, i) * x0[i]
            out[t, r] = a0
            t += 1
