"""The kernel table: for each weight kind (a weight type in one storage layout), everything the package
runs on it.

    Kind.name      part of the compiled fused kernels' names ("Q4_0", "Q4_0x8", ...)
    Kind.act       activation format (`q8act.activations`): q8_0, q8_0p, q8_0ps, q8_0x8, q8_k, q8_kx8, f32
    Kind.quant     njit (xq, xd, xs, x (T, C)): writes that format (f32: copies x)
    Kind.matmul    (parallel, serial) matrix kernels
    Kind.call      call(kernel, out, w, xq, xd, xs, variant): one kernel call (each type's constants bound;
                   float kinds get x itself as xq)
    Kind.rows      njit (out, r0, r1, w, xq, xd, xs, variant): rows r0 .. r1 of T tokens, out (T, r1 - r0)
                   (`rows`, `fused`)
    Kind.step      row ranges start on multiples of this (8 for the 8-row interleaved layouts)
    Kind.isa       {variant: the instructions its kernels run}, for `edgemoe-doctor` (tests/test_kernels.py
                   compiles every kernel for an AVX-512 VNNI CPU and checks the vnni entry against the code)

The block geometry of each type is `qtensor.FORMATS`; a type is added there, here (one row per layout)
and with its kernels.
"""

from __future__ import annotations

from typing import NamedTuple

from gguf import GGMLQuantizationType as QT
from numba import njit

from ..qtensor import QTensor
from . import intrinsics
from . import rows as r
from .fmatmul import matmul_float, matmul_float_serial
from .iq4 import matmul_iq4_nl, matmul_iq4_nl_serial, matmul_iq4_xs, matmul_iq4_xs_serial
from .iq4xsx8 import matmul_iq4_xs_x8, matmul_iq4_xs_x8_serial, rows_iq4_xs_x8
from .iquants import (
    matmul_iq1_m,
    matmul_iq1_m_serial,
    matmul_iq1_s,
    matmul_iq1_s_serial,
    matmul_iq2_s,
    matmul_iq2_s_serial,
    matmul_iq2_xs,
    matmul_iq2_xs_serial,
    matmul_iq2_xxs,
    matmul_iq2_xxs_serial,
    matmul_iq3_s,
    matmul_iq3_s_serial,
    matmul_iq3_xxs,
    matmul_iq3_xxs_serial,
    rows_iq1_m,
    rows_iq1_s,
    rows_iq2_s,
    rows_iq2_xs,
    rows_iq2_xxs,
    rows_iq3_s,
    rows_iq3_xxs,
)
from .k23matmul import matmul_q2_k, matmul_q2_k_serial, matmul_q3_k, matmul_q3_k_serial
from .kmatmul import matmul_q6_k, matmul_q6_k_serial, matmul_q45_k, matmul_q45_k_serial
from .lut4x8 import FMT_IQ4_NL, FMT_MXFP4, matmul_lut4_x8, matmul_lut4_x8_serial, rows_iq4_nl_x8, rows_mxfp4_x8
from .mxfp4 import matmul_mxfp4, matmul_mxfp4_serial
from .q2kx8 import matmul_q2_k_x8, matmul_q2_k_x8_serial, rows_q2_k_x8
from .q3kx8 import matmul_q3_k_x8, matmul_q3_k_x8_serial, rows_q3_k_x8
from .q4kx8 import matmul_q4_k_x8, matmul_q4_k_x8_serial, quantize_q8_k_x8
from .q4x8 import matmul_q4_0_x8, matmul_q4_0_x8_serial, quantize_q8_0_x8
from .q8act import quantize_q8_0, quantize_q8_0_sums, quantize_q8_k
from .q8x8 import matmul_q8_0_x8, matmul_q8_0_x8_serial
from .q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, matmul_q451, matmul_q451_serial
from .q451x8 import matmul_q451_x8, matmul_q451_x8_serial, rows_q4_1_x8, rows_q5_0_x8, rows_q5_1_x8
from .qmatmul import matmul_q4_0, matmul_q4_0_serial, matmul_q8_0, matmul_q8_0_serial


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


QUANTISERS = {
    "q8_0": quant_q8_0,
    "q8_0p": quant_q8_0_pairs,
    "q8_0ps": quant_q8_0_sums,
    "q8_k": quant_q8_k,
    "q8_0x8": quant_q8_0_x8,
    "q8_kx8": quant_q8_k_x8,
    "f32": quant_f32,
}


class Kind(NamedTuple):
    name: str
    act: str
    quant: object
    matmul: tuple
    call: object
    rows: object
    step: int
    isa: dict


_PORTABLE = "int8 portable (LLVM vectors, no x86 intrinsics)"
_VPMADDUBSW = "int8 AVX2 vpmaddubsw (256-bit)"
INT8 = {"generic": _PORTABLE, "avx2": _VPMADDUBSW, "vnni": "int8 VNNI vpdpbusd (256-bit)"}
INT8_NO_VNNI = {"generic": _PORTABLE, "avx2": _VPMADDUBSW, "vnni": _VPMADDUBSW + "; no VNNI code yet"}
FLOAT = {
    QT.F32: dict.fromkeys(("generic", "avx2", "vnni"), "f32 vfmadd231ps (256-bit)"),
    QT.F16: {"generic": "f16 (bit trick) to f32, vfmadd231ps", "avx2": "f16 vcvtph2ps to f32, vfmadd231ps (256-bit)",
             "vnni": "f16 vcvtph2ps to f32, vfmadd231ps (256-bit)"},
    QT.BF16: dict.fromkeys(("generic", "avx2", "vnni"), "bf16 (shift) to f32, vfmadd231ps (256-bit)"),
}


def _plain(k, o, w, q, d, s, m):
    return k(o, w, q, d, s, m)


def _no_sums(k, o, w, q, d, s, m):
    return k(o, w, q, d, m)


def _float(fmt):
    return lambda k, o, w, x, d, s, m: k(o, w, x, fmt, m)


def _with(*consts):
    """A call passing the type's constants (offsets, format marker) before the variant."""
    return lambda k, o, w, q, d, s, m: k(o, w, q, d, s, *consts, m)


def _kind(qtype: QT, interleave: int, act: str, matmul: tuple, rows, call=_plain, isa=None) -> tuple:
    name = qtype.name + ("" if interleave == 1 else f"x{interleave}")
    isa = isa or FLOAT.get(qtype) or (INT8 if interleave == 1 else INT8_NO_VNNI)
    return (qtype, interleave), Kind(name, act, QUANTISERS[act], matmul, call, rows, interleave, isa)


_FLOAT = (matmul_float, matmul_float_serial)
_Q451 = (matmul_q451, matmul_q451_serial)
_Q451X8 = (matmul_q451_x8, matmul_q451_x8_serial)
_LUT4X8 = (matmul_lut4_x8, matmul_lut4_x8_serial)

KINDS: dict[tuple[QT, int], Kind] = dict([
    _kind(QT.F32, 1, "f32", _FLOAT, r.rows_f32, _float(intrinsics.FMT_F32)),
    _kind(QT.F16, 1, "f32", _FLOAT, r.rows_f16, _float(intrinsics.FMT_F16)),
    _kind(QT.BF16, 1, "f32", _FLOAT, r.rows_bf16, _float(intrinsics.FMT_BF16)),
    _kind(QT.Q8_0, 1, "q8_0", (matmul_q8_0, matmul_q8_0_serial), r.rows_q8_0, _no_sums),
    _kind(QT.Q8_0, 8, "q8_0", (matmul_q8_0_x8, matmul_q8_0_x8_serial), r.rows_q8_0_x8, _no_sums),
    _kind(QT.Q4_0, 1, "q8_0p", (matmul_q4_0, matmul_q4_0_serial), r.rows_q4_0),
    _kind(QT.Q4_0, 8, "q8_0x8", (matmul_q4_0_x8, matmul_q4_0_x8_serial), r.rows_q4_0_x8),
    _kind(QT.Q4_1, 1, "q8_0p", _Q451, r.rows_q4_1, _with(FMT_Q4_1)),
    _kind(QT.Q5_0, 1, "q8_0ps", _Q451, r.rows_q5_0, _with(FMT_Q5_0)),
    _kind(QT.Q5_1, 1, "q8_0p", _Q451, r.rows_q5_1, _with(FMT_Q5_1)),
    _kind(QT.Q4_1, 8, "q8_0", _Q451X8, rows_q4_1_x8, _with(FMT_Q4_1)),
    _kind(QT.Q5_0, 8, "q8_0x8", _Q451X8, rows_q5_0_x8, _with(FMT_Q5_0)),
    _kind(QT.Q5_1, 8, "q8_0", _Q451X8, rows_q5_1_x8, _with(FMT_Q5_1)),
    _kind(QT.Q2_K, 1, "q8_k", (matmul_q2_k, matmul_q2_k_serial), r.rows_q2_k),
    _kind(QT.Q2_K, 8, "q8_k", (matmul_q2_k_x8, matmul_q2_k_x8_serial), rows_q2_k_x8),
    _kind(QT.Q3_K, 1, "q8_k", (matmul_q3_k, matmul_q3_k_serial), r.rows_q3_k),
    _kind(QT.Q3_K, 8, "q8_k", (matmul_q3_k_x8, matmul_q3_k_x8_serial), rows_q3_k_x8),
    _kind(QT.Q4_K, 1, "q8_k", (matmul_q45_k, matmul_q45_k_serial), r.rows_q4_k, _with(144, 0, 16)),
    _kind(QT.Q4_K, 8, "q8_kx8", (matmul_q4_k_x8, matmul_q4_k_x8_serial), r.rows_q4_k_x8),
    _kind(QT.Q5_K, 1, "q8_k", (matmul_q45_k, matmul_q45_k_serial), r.rows_q5_k, _with(176, 16, 48)),
    _kind(QT.Q6_K, 1, "q8_k", (matmul_q6_k, matmul_q6_k_serial), r.rows_q6_k),
    _kind(QT.IQ1_S, 1, "q8_k", (matmul_iq1_s, matmul_iq1_s_serial), rows_iq1_s),
    _kind(QT.IQ1_M, 1, "q8_k", (matmul_iq1_m, matmul_iq1_m_serial), rows_iq1_m),
    _kind(QT.IQ2_XXS, 1, "q8_k", (matmul_iq2_xxs, matmul_iq2_xxs_serial), rows_iq2_xxs),
    _kind(QT.IQ2_XS, 1, "q8_k", (matmul_iq2_xs, matmul_iq2_xs_serial), rows_iq2_xs),
    _kind(QT.IQ2_S, 1, "q8_k", (matmul_iq2_s, matmul_iq2_s_serial), rows_iq2_s),
    _kind(QT.IQ3_XXS, 1, "q8_k", (matmul_iq3_xxs, matmul_iq3_xxs_serial), rows_iq3_xxs),
    _kind(QT.IQ3_S, 1, "q8_k", (matmul_iq3_s, matmul_iq3_s_serial), rows_iq3_s),
    _kind(QT.IQ4_NL, 1, "q8_0p", (matmul_iq4_nl, matmul_iq4_nl_serial), r.rows_iq4_nl),
    _kind(QT.IQ4_NL, 8, "q8_0", _LUT4X8, rows_iq4_nl_x8, _with(FMT_IQ4_NL)),
    _kind(QT.IQ4_XS, 1, "q8_k", (matmul_iq4_xs, matmul_iq4_xs_serial), r.rows_iq4_xs),
    _kind(QT.IQ4_XS, 8, "q8_k", (matmul_iq4_xs_x8, matmul_iq4_xs_x8_serial), rows_iq4_xs_x8),
    _kind(QT.MXFP4, 1, "q8_0ps", (matmul_mxfp4, matmul_mxfp4_serial), r.rows_mxfp4),
    _kind(QT.MXFP4, 8, "q8_0", _LUT4X8, rows_mxfp4_x8, _with(FMT_MXFP4)),
])
INTERLEAVED = frozenset(qt for qt, n in KINDS if n == 8)  # types with an 8-row interleaved layout


def kind_of(w: QTensor) -> Kind | None:
    """The kind of a weight, None when no kernel takes it."""
    return KINDS.get((w.qtype, w.interleave))
