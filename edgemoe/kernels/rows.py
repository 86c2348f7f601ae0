"""Row ranges of one token's matrix product, per weight kind, for kernels that split matrices into
chunks themselves (`fused`).

A kind is a weight type in one layout. For each it names the int8 (or f32) activation format, the
quantiser writing it and `rows(out, r0, r1, w, xq, xd, xs, variant)`, which computes
out[r0:r1] = W[r0:r1] @ x with the serial matrix kernel of that type on row slices, so every row gets
the bits `kernels.matvec` gives it. Row ranges of the 8-row interleaved layout start and end on
multiples of 8.

    out: (R,) f32; w: the QTensor's storage; xq, xd, xs: (1, ...) activations from `quant`
"""

from __future__ import annotations

from typing import NamedTuple

from gguf import GGMLQuantizationType as QT
from numba import njit

from ..qtensor import QTensor
from . import intrinsics
from .fmatmul import matmul_float_serial
from .iq4 import matmul_iq4_nl_serial, matmul_iq4_xs_serial
from .iquants import rows_iq1_m, rows_iq1_s, rows_iq2_s, rows_iq2_xs, rows_iq2_xxs, rows_iq3_s, rows_iq3_xxs
from .k23matmul import matmul_q2_k_serial, matmul_q3_k_serial
from .kmatmul import matmul_q6_k_serial, matmul_q45_k_serial
from .mxfp4 import matmul_mxfp4_serial
from .q4kx8 import matmul_q4_k_x8_serial, quantize_q8_k_x8
from .q4x8 import matmul_q4_0_x8_serial, quantize_q8_0_x8
from .q8act import quantize_q8_0, quantize_q8_0_sums, quantize_q8_k
from .q8x8 import matmul_q8_0_x8_serial
from .q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, matmul_q451_serial
from .qmatmul import matmul_q4_0_serial, matmul_q8_0_serial

_F32_FMT, _F16_FMT, _BF16_FMT = intrinsics.FMT_F32, intrinsics.FMT_F16, intrinsics.FMT_BF16


@njit(cache=True, nogil=True)
def quant_q8_0(xq, xd, xs, x):
    quantize_q8_0(xq, xd, xs, x, 0)


@njit(cache=True, nogil=True)
def quant_q8_0_pairs(xq, xd, xs, x):
    quantize_q8_0(xq, xd, xs, x, 1)


@njit(cache=True, nogil=True)
def quant_q8_0_sums(xq, xd, xs, x):
    quantize_q8_0_sums(xq, xd, xs, x)


@njit(cache=True, nogil=True)
def quant_q8_k(xq, xd, xs, x):
    quantize_q8_k(xq, xd, xs, x)


@njit(cache=True, nogil=True)
def quant_q8_0_x8(xq, xd, xs, x):
    quantize_q8_0_x8(xq, xd, xs, x)


@njit(cache=True, nogil=True)
def quant_q8_k_x8(xq, xd, xs, x):
    quantize_q8_k_x8(xq, xd, xs, x)


@njit(cache=True, nogil=True)
def quant_f32(xq, xd, xs, x):
    """Float weights take the f32 activations themselves."""
    xq[:] = x


@njit(cache=True, nogil=True)
def rows_q8_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q8_0_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, variant)


@njit(cache=True, nogil=True)
def rows_q8_0_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q8_0_x8_serial(out[r0:r1].reshape(1, r1 - r0), w[r0 // 8:r1 // 8], xq, xd, variant)


@njit(cache=True, nogil=True)
def rows_q4_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_0_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_0_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_0_x8_serial(out[r0:r1].reshape(1, r1 - r0), w[r0 // 8:r1 // 8], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q45_k_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, 144, 0, 16, variant)


@njit(cache=True, nogil=True)
def rows_q4_k_x8(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q4_k_x8_serial(out[r0:r1].reshape(1, r1 - r0), w[r0 // 8:r1 // 8], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q5_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q45_k_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, 176, 16, 48, variant)


@njit(cache=True, nogil=True)
def rows_q6_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q6_k_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_mxfp4(out, r0, r1, w, xq, xd, xs, variant):
    matmul_mxfp4_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q2_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q2_k_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q3_k(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q3_k_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_q4_1(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, FMT_Q4_1, variant)


@njit(cache=True, nogil=True)
def rows_q5_0(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, FMT_Q5_0, variant)


@njit(cache=True, nogil=True)
def rows_q5_1(out, r0, r1, w, xq, xd, xs, variant):
    matmul_q451_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, FMT_Q5_1, variant)


@njit(cache=True, nogil=True)
def rows_iq4_nl(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq4_nl_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_iq4_xs(out, r0, r1, w, xq, xd, xs, variant):
    matmul_iq4_xs_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, xd, xs, variant)


@njit(cache=True, nogil=True)
def rows_f32(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, _F32_FMT, variant)


@njit(cache=True, nogil=True)
def rows_f16(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, _F16_FMT, variant)


@njit(cache=True, nogil=True)
def rows_bf16(out, r0, r1, w, xq, xd, xs, variant):
    matmul_float_serial(out[r0:r1].reshape(1, r1 - r0), w[r0:r1], xq, _BF16_FMT, variant)


class Kind(NamedTuple):
    name: str  # part of the compiled kernels' names
    act: str  # activation format: q8_0, q8_0p, q8_0ps, q8_0x8, q8_k, q8_kx8 or f32
    quant: object  # njit (xq, xd, xs, x (1, C))
    rows: object  # njit (out, r0, r1, w, xq, xd, xs, variant)
    step: int  # row ranges start on multiples of this


KINDS = {
    (QT.Q8_0, 1): Kind("Q8_0", "q8_0", quant_q8_0, rows_q8_0, 1),
    (QT.Q8_0, 8): Kind("Q8_0x8", "q8_0", quant_q8_0, rows_q8_0_x8, 8),
    (QT.Q4_0, 1): Kind("Q4_0", "q8_0p", quant_q8_0_pairs, rows_q4_0, 1),
    (QT.Q4_0, 8): Kind("Q4_0x8", "q8_0x8", quant_q8_0_x8, rows_q4_0_x8, 8),
    (QT.Q4_K, 1): Kind("Q4_K", "q8_k", quant_q8_k, rows_q4_k, 1),
    (QT.Q4_K, 8): Kind("Q4_Kx8", "q8_kx8", quant_q8_k_x8, rows_q4_k_x8, 8),
    (QT.Q5_K, 1): Kind("Q5_K", "q8_k", quant_q8_k, rows_q5_k, 1),
    (QT.Q6_K, 1): Kind("Q6_K", "q8_k", quant_q8_k, rows_q6_k, 1),
    (QT.MXFP4, 1): Kind("MXFP4", "q8_0ps", quant_q8_0_sums, rows_mxfp4, 1),
    (QT.Q2_K, 1): Kind("Q2_K", "q8_k", quant_q8_k, rows_q2_k, 1),
    (QT.Q3_K, 1): Kind("Q3_K", "q8_k", quant_q8_k, rows_q3_k, 1),
    (QT.IQ4_NL, 1): Kind("IQ4_NL", "q8_0p", quant_q8_0_pairs, rows_iq4_nl, 1),
    (QT.IQ4_XS, 1): Kind("IQ4_XS", "q8_k", quant_q8_k, rows_iq4_xs, 1),
    (QT.Q4_1, 1): Kind("Q4_1", "q8_0p", quant_q8_0_pairs, rows_q4_1, 1),
    (QT.Q5_0, 1): Kind("Q5_0", "q8_0ps", quant_q8_0_sums, rows_q5_0, 1),
    (QT.Q5_1, 1): Kind("Q5_1", "q8_0p", quant_q8_0_pairs, rows_q5_1, 1),
    (QT.IQ2_XXS, 1): Kind("IQ2_XXS", "q8_k", quant_q8_k, rows_iq2_xxs, 1),
    (QT.IQ2_XS, 1): Kind("IQ2_XS", "q8_k", quant_q8_k, rows_iq2_xs, 1),
    (QT.IQ2_S, 1): Kind("IQ2_S", "q8_k", quant_q8_k, rows_iq2_s, 1),
    (QT.IQ3_XXS, 1): Kind("IQ3_XXS", "q8_k", quant_q8_k, rows_iq3_xxs, 1),
    (QT.IQ3_S, 1): Kind("IQ3_S", "q8_k", quant_q8_k, rows_iq3_s, 1),
    (QT.IQ1_S, 1): Kind("IQ1_S", "q8_k", quant_q8_k, rows_iq1_s, 1),
    (QT.IQ1_M, 1): Kind("IQ1_M", "q8_k", quant_q8_k, rows_iq1_m, 1),
    (QT.F32, 1): Kind("F32", "f32", quant_f32, rows_f32, 1),
    (QT.F16, 1): Kind("F16", "f32", quant_f32, rows_f16, 1),
    (QT.BF16, 1): Kind("BF16", "f32", quant_f32, rows_bf16, 1),
}


def kind_of(w: QTensor) -> Kind | None:
    """The kind of a weight, None when no row kernel takes it."""
    return KINDS.get((w.qtype, w.interleave))
