"""SIMD intrinsics of the MXFP4 kernel (`mxfp4`): E2M1 codes to int8, E8M0 scales to f32, and exact
per-block integer sums.

An MXFP4 block (17 bytes, ggml's block_mxfp4) is one E8M0 byte e, the scale 2**(e - 127), then 16
bytes of 4-bit E2M1 codes: value j in the low nibble of byte j, value j + 16 in the high one. The
codes decode through kvalues_mxfp4 (the E2M1 values doubled, so integers in [-12, 12]), and the scale
is halved to match: value = kvalues[code] * 2**(e - 128). The variant markers are those of
`intrinsics`; every variant computes the same integers and the same f32 bits.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _F32, _I8, _I32, _V8F32, _V8I32, _V32I8, _call, _is_bytes, _is_marker, _ptr, _variant
from .intrinsics import f32x8, i8x32, i32x8

KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # kvalues_mxfp4, ggml-common.h
BLOCK_BYTES = 17

_I64 = ir.IntType(64)
_V16I8 = ir.VectorType(_I8, 16)


def _kvalues_generic(builder, codes):
    """kvalues[codes] for <32 x i8> codes 0..15 without a table: magnitudes m < 4 are m, 4-5 are
    2 (m - 2), 6-7 are 4 (m - 4); bit 3 negates."""

    def k(v):
        return ir.Constant(_V32I8, [v] * 32)

    m = builder.and_(codes, k(7))
    mid = builder.shl(builder.sub(m, k(2)), k(1))
    top = builder.shl(builder.sub(m, k(4)), k(2))
    mag = builder.select(builder.icmp_unsigned("<", m, k(4)), m, builder.select(builder.icmp_unsigned("<", m, k(6)), mid, top))
    neg = builder.icmp_unsigned("!=", builder.and_(codes, k(8)), k(0))
    return builder.select(neg, builder.sub(k(0), mag), mag)


@intrinsic
def load_mxfp4(typingctx, marker, arr, off):
    """The 32 values of an MXFP4 block (16 code bytes at `off`) as int8 kvalues, in element order."""
    if not (_is_marker(marker) and _is_bytes(arr) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, arr, args[1], off, args[2], _V16I8), align=1)
        lo = builder.and_(v, ir.Constant(_V16I8, [15] * 16))
        hi = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
        codes = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        if variant:  # vpshufb: the 16-entry table in both 128-bit halves
            table = ir.Constant(_V32I8, list(KVALUES) * 2)
            return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [table, codes])
        return _kvalues_generic(builder, codes)

    return i8x32(marker, arr, off), codegen


def _e8m0_half_bits(builder, e, ty):
    """ggml_e8m0_to_fp32_half as f32 bits: 0x00200000 << e for e < 2 (subnormals), else (e - 1) << 23."""
    n = ty.count if isinstance(ty, ir.VectorType) else 0

    def k(v):
        return ir.Constant(ty, [v] * n if n else v)

    small = builder.shl(k(0x00200000), builder.and_(e, k(1)))  # masked: a shift by >= 32 would be poison
    normal = builder.shl(builder.sub(e, k(1)), k(23))
    return builder.select(builder.icmp_unsigned("<", e, k(2)), small, normal)


@intrinsic
def e8m0_half(typingctx, arr, off):
    """The E8M0 byte at `off` of a uint8 array as 2**(e - 128) in f32 (ggml_e8m0_to_fp32_half)."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        e = builder.zext(builder.load(_ptr(context, builder, arr, args[0], off, args[1], _I8)), _I32)
        return builder.bitcast(_e8m0_half_bits(builder, e, _I32), _F32)

    return types.float32(arr, off), codegen


@intrinsic
def scales8_e8m0(typingctx, arr, off, stride):
    """`e8m0_half` of the bytes at off + k * stride for k < 8, as one f32x8."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer) and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        base = context.cast(builder, args[1], off, types.intp)
        step = context.cast(builder, args[2], stride, types.intp)
        # Pack the 8 bytes into an i64 in integer registers, then one vector move (as `scales8_f16`).
        word = None
        for lane in range(8):
            o = builder.add(base, builder.mul(step, ir.Constant(base.type, lane)))
            b = builder.zext(builder.load(_ptr(context, builder, arr, args[0], types.intp, o, _I8)), _I64)
            b = builder.shl(b, ir.Constant(_I64, 8 * lane)) if lane else b
            word = b if word is None else builder.or_(word, b)
        e = builder.zext(builder.bitcast(word, ir.VectorType(_I8, 8)), _V8I32)
        return builder.bitcast(_e8m0_half_bits(builder, e, _V8I32), _V8F32)

    return f32x8(arr, off, stride), codegen


def _hadd(builder, a, b):
    """vphaddd's lane order: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]."""
    even = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.add(even, odd)


@intrinsic
def block_sums8(typingctx, p0, p1, p2, p3, p4, p5, p6, p7):
    """[sum(p0), ..., sum(p7)]: lane k holds the sum of the 8 lanes of `pk` (exact int32)."""
    if not all(p == i32x8 for p in (p0, p1, p2, p3, p4, p5, p6, p7)):
        return None

    def codegen(context, builder, sig, args):
        h = [_hadd(builder, args[k], args[k + 1]) for k in range(0, 8, 2)]
        g0, g1 = _hadd(builder, h[0], h[1]), _hadd(builder, h[2], h[3])  # blocks 0-3, 4-7 in both halves
        lo = builder.shuffle_vector(g0, g1, ir.Constant(_V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
        hi = builder.shuffle_vector(g0, g1, ir.Constant(_V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
        return builder.add(lo, hi)

    return i32x8(p0, p1, p2, p3, p4, p5, p6, p7), codegen


@intrinsic
def isum(typingctx, v):
    """The sum of the 8 lanes of an i32x8, as int64 (exact)."""
    if v != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sext(_call(builder, "llvm.vector.reduce.add.v8i32", _I32, [args[0]]), _I64)

    return types.int64(v), codegen


@intrinsic
def fmul_i32(typingctx, v, s):
    """float(v) * s lane-wise: one rounding per lane (ggml's `d * (sumi1 + sumi2)`), no fused add."""
    if not (v == i32x8 and s == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(builder.sitofp(args[0], _V8F32), args[1])

    return f32x8(v, s), codegen
