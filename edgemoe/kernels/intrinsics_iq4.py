"""SIMD intrinsics of the IQ4_NL and IQ4_XS kernels (`iq4`): 4-bit codes to ggml's non-linear int8
levels, signed int8 dots, IQ4_XS's sub-block scales and ggml's horizontal sum.

Both types store 4-bit codes as Q4_0 does (value j in the low nibble of byte j, value j + 16 in the
high one; `load_q4_0`, `load_q4_0_pair` and `load_codes2` unpack them) and decode them through
`kvalues_iq4` (one vpshufb per 32 codes) to kvalues_iq4nl, 16 int8 levels in [-127, 113]. Those do
not fit vpmaddubsw's unsigned operand, and with an offset (0..240) its pairwise i16 sums would
saturate (2 * 240 * 127 > 32767), so the dots take ggml's AVX2 route: |w| (unsigned) times x with w's
sign (`vecops.abs_sign`, `dot_signed2`), whose pair sums stay within 2 * 127 * 127 (the activations
are in [-127, 127]).

The variant markers are those of `intrinsics`; every variant computes the same integers. As for
`intrinsics`, Numba's cache does not see edits here: delete `__pycache__/iq4.*`, `rows.rows_iq4*`
and the fused IQ4 ones.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    _I16,
    _I32,
    _V8I32,
    _V16I16,
    _V32I8,
    _call,
    _is_bytes,
    _is_marker,
    _ptr,
    _splat,
    _variant,
    i8x32,
    i16x16,
    i32x8,
)
from .intrinsics_fp4 import _hadd

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


@intrinsic
def kvalues_iq4(typingctx, marker, codes):
    """kvalues_iq4nl[codes] for 32 codes 0..15 (int8, signed)."""
    if not (_is_marker(marker) and codes == i8x32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        c = args[1]
        if variant:  # vpshufb: the 16-entry table in both 128-bit halves
            return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [ir.Constant(_V32I8, list(KVALUES) * 2), c])
        # Portable: a tree of selects on the code's bits, low bit first (15 blends of constants).
        level = [ir.Constant(_V32I8, [v] * 32) for v in KVALUES]
        for bit in range(4):
            on = builder.icmp_unsigned("!=", builder.and_(c, ir.Constant(_V32I8, [1 << bit] * 32)), ir.Constant(_V32I8, None))
            level = [builder.select(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        return level[0]

    return i8x32(marker, codes), codegen


@intrinsic
def load_codes2(typingctx, arr, off):
    """The 4-bit codes of two consecutive 16-byte groups (32 bytes at `off`) as two <32 x i8> in element
    order, (low nibbles, high nibbles) of bytes 0..15, then of bytes 16..31: one 32-byte load and
    shift, and a lane permute per group instead of a 16-byte load, shift and insert per group."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V32I8), align=1)
        m = ir.Constant(_V32I8, [15] * 32)
        lo = builder.and_(v, m)
        hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16)), _V32I8), m)
        first = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) + list(range(32, 48))))
        second = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(16, 32)) + list(range(48, 64))))
        return context.make_tuple(builder, sig.return_type, [first, second])

    return types.UniTuple(i8x32, 2)(arr, off), codegen


@intrinsic
def block_sums8(typingctx, p01, p23, p45, p67):
    """Exact integer dots of 8 blocks, lane k = block k, from pair partial sums: pkl holds block k's
    in lanes 0..3 and block l's in lanes 4..7 (three vphaddd and one permute)."""
    if not all(p == i32x8 for p in (p01, p23, p45, p67)):
        return None

    def codegen(context, builder, sig, args):
        p01, p23, p45, p67 = args
        g = _hadd(builder, _hadd(builder, p01, p23), _hadd(builder, p45, p67))  # blocks 0 2 4 6 1 3 5 7
        return builder.shuffle_vector(g, g, ir.Constant(_V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))

    return i32x8(p01, p23, p45, p67), codegen


@intrinsic
def scales_iq4_xs(typingctx, arr, off):
    """The 8 signed sub-block scales ls - 32 of the IQ4_XS super-block at byte `off`, as i16 lanes
    0..7, repeated in 8..15 (the shape `vecops.dot_scaled_k` takes).

    ls of sub-block i = nibble i of scales_l (the u32 at off + 4, low nibble first) | bits 2i, 2i + 1
    of scales_h (the u16 at off + 2) << 4, as ggml's dequantize_row_iq4_xs.
    """
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        o = context.cast(builder, args[1], off, types.intp)
        at = lambda k: builder.add(o, ir.Constant(o.type, k))  # noqa: E731
        h = builder.zext(builder.load(_ptr(context, builder, arr, args[0], types.intp, at(2), _I16), align=1), _I32)
        low = builder.load(_ptr(context, builder, arr, args[0], types.intp, at(4), _I32), align=1)
        lo = builder.lshr(_splat(builder, low, _V8I32), ir.Constant(_V8I32, list(range(0, 32, 4))))
        lo = builder.and_(lo, ir.Constant(_V8I32, [15] * 8))
        hi = builder.lshr(_splat(builder, h, _V8I32), ir.Constant(_V8I32, list(range(0, 16, 2))))
        hi = builder.shl(builder.and_(hi, ir.Constant(_V8I32, [3] * 8)), ir.Constant(_V8I32, [4] * 8))
        ls = builder.trunc(builder.sub(builder.or_(lo, hi), ir.Constant(_V8I32, [32] * 8)), ir.VectorType(_I16, 8))
        return builder.shuffle_vector(ls, ls, ir.Constant(ir.VectorType(_I32, 16), list(range(8)) * 2))

    return i16x16(arr, off), codegen


@intrinsic
def dot_signed2(typingctx, marker, w0, x0, w1, x1):
    """`w0 . x0 + w1 . x1` as 8 partial sums (lane i: bytes 4i..4i+3), for signed w, x in [-127, 127].

    AVX2: vpmaddubsw of |w| with x signed by w (ggml's mul_add_epi8) and one vpmaddwd per product,
    as two i16 pair sums (up to 32258 each) would overflow an i16 add; VNNI chains two vpdpbusd.
    """
    if not (_is_marker(marker) and all(a == i8x32 for a in (w0, x0, w1, x1))):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, w0, x0, w1, x1 = args
        zero = ir.Constant(_V32I8, None)

        def absolute(w):
            return builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, w), w)

        if variant:
            s0 = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [x0, w0])
            s1 = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [x1, w1])
            if variant == 2:
                first = _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                              [ir.Constant(_V8I32, None), builder.bitcast(absolute(w0), _V8I32), builder.bitcast(s0, _V8I32)])
                return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                             [first, builder.bitcast(absolute(w1), _V8I32), builder.bitcast(s1, _V8I32)])
            ones = ir.Constant(_V16I16, [1] * 16)
            p0 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [absolute(w0), s0])
            p1 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [absolute(w1), s1])
            return builder.add(_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [p0, ones]),
                               _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [p1, ones]))
        # Portable: i16 products (exact), then pairs and pairs of pairs in i32.
        v32i16, v16i32 = ir.VectorType(_I16, 32), ir.VectorType(_I32, 16)
        total = None
        for w, x in ((w0, x0), (w1, x1)):
            prod = builder.mul(builder.sext(w, v32i16), builder.sext(x, v32i16))
            even = builder.shuffle_vector(prod, prod, ir.Constant(v16i32, list(range(0, 32, 2))))
            odd = builder.shuffle_vector(prod, prod, ir.Constant(v16i32, list(range(1, 32, 2))))
            pairs = builder.add(builder.sext(even, v16i32), builder.sext(odd, v16i32))
            even = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(0, 16, 2))))
            odd = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(1, 16, 2))))
            quad = builder.add(even, odd)
            total = quad if total is None else builder.add(total, quad)
        return total

    return i32x8(marker, w0, x0, w1, x1), codegen
