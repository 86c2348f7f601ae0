"""Row ranges of a matrix product for several tokens, per weight kind (`kinds.KINDS`), for kernels that split
matrices into chunks themselves (`fused`).

`rows_<kind>(out, r0, r1, w, xq, xd, xs, variant)` computes out (T, r1 - r0) = x @ W[r0:r1].T for T tokens with
the serial matrix kernel of that kind on the row slice: each weight block is unpacked once for all T tokens (the
kernels take tokens four at a time where they can), and every row of every token gets the bits
`kernels.matvec` gives it alone. Row ranges of the 8-row interleaved layouts start and end on multiples of 8.
(The IQ1-IQ3 types' are in `iquants`, next to their kernels.)

    out: (T, r1 - r0) f32, C-contiguous; w: the QTensor's storage; xq, xd, xs: (T, ...) activations from the
    kind's quantiser
"""

from __future__ import annotations

from numba import njit

from . import intrinsics
from .fmatmul import matmul_float_serial
from .iq4 import matmul_iq4_nl_serial, matmul_iq4_xs_serial
from .k23matmul import matmul_q2_k_serial, matmul_q3_k_serial
from .kmatmul import matmul_q6_k_serial, matmul_q45_k_serial
from .mxfp4 import matmul_mxfp4_serial
from .q4kx8 import matmul_q4_k_x8_serial
from .q4x8 import matmul_q4_0_x8_serial
from .q8x8 import matmul_q8_0_x8_serial
from .q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, matmul_q451_serial
from .qmatmul import matmul_q4_0_serial, matmul_q8_0_serial

_F32_FMT, _F16_FMT, _BF16_FMT = intrinsics.FMT_F32, intrinsics.FMT_F16, intrinsics.FMT_BF16


@njit(cache=True, nogil=True)
def rows_q8_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q8_0_serial(out, w[r0:r1], xq, xd, variant)


@njit(cache=True, nogil=True)
def rows_q8_0_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q8_0_x8_serial(out, w[r0 // 8:r1 // 8], xq, xd, variant)


@njit(cache=True, nogil=True)
def rows_q4_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_0_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_0_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_0_x8_serial(out, w[r0 // 8:r1 // 8], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q45_k_serial(out, w[r0:r1], xq, xd, xs, 144, 0, 16, variant)


@njit(cache=True, nogil=True)
def rows_q4_k_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_k_x8_serial(out, w[r0 // 8:r1 // 8], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q5_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q45_k_serial(out, w[r0:r1], xq, xd, xs, 176, 16, 48, variant)


@njit(cache=True, nogil=True)
def rows_q6_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q6_k_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_mxfp4(out, r0, r1, w, xq, xd, xs, variant):
    matmul_mxfp4_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q2_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q2_k_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q3_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q3_k_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_1(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out, w[r0:r1], xq, xd, xs, FMT_Q4_1, variant)


@njit(cache=True, nogil=True)
def rows_q5_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out, w[r0:r1], xq, xd, xs, FMT_Q5_0, variant)


@njit(cache=True, nogil=True)
def rows_q5_1(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out, w[r0:r1], xq, xd, xs, FMT_Q5_1, variant)


@njit(cache=True, nogil=True)
def rows_iq4_nl(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq4_nl_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq4_xs(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq4_xs_serial(out, w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_f32(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out, w[r0:r1], xq, _F32_FMT, variant)


@njit(cache=True, nogil=True)
def rows_f16(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out, w[r0:r1], xq, _F16_FMT, variant)


@njit(cache=True, nogil=True)
def rows_bf16(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out, w[r0:r1], xq, _BF16_FMT, variant)
