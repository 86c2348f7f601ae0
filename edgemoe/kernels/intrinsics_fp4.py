"""SIMD intrinsics of the MXFP4 kernel (`mxfp4`): E2M1 codes to int8, E8M0 scales to f32, and exact
per-block integer sums.

An MXFP4 block (17 bytes, ggml's block_mxfp4) is one E8M0 byte e, the scale 2**(e - 127), then 16
bytes of 4-bit E2M1 codes: value j in the low nibble of byte j, value j + 16 in the high one. The
codes decode through kvalues_mxfp4 (the E2M1 values doubled, integers in [-12, 12]) and the scale is
halved to match: value = kvalues[code] * 2**(e - 128).

The kernels take the values plus OFFSET (0..24, unsigned, as vpmaddubsw wants its first operand) and
subtract OFFSET * (the activation block's integer sum) from each block's integer dot, which leaves
the exact ggml dot without a sign trick per block. The variant markers are those of `intrinsics`;
every variant computes the same integers and the same f32 bits. As for `intrinsics`, Numba's cache
does not see edits here: delete `__pycache__/mxfp4.*`, `rows.rows_mxfp4*` and the fused MXFP4 ones.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    _F32,
    _I8,
    _I32,
    _V8F32,
    _V8I32,
    _V16I16,
    _V32I8,
    _call,
    _is_bytes,
    _is_flat,
    _is_marker,
    _ptr,
    _variant,
    f32x8,
    i8x32,
    i32x8,
)

KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # kvalues_mxfp4, ggml-common.h
OFFSET = 12  # added to every kvalue: 0..24
BLOCK_BYTES = 17

_I64 = ir.IntType(64)
_V16I8 = ir.VectorType(_I8, 16)


def _kvalues(builder, variant: int, codes):
    """kvalues[codes] + OFFSET for <32 x i8> codes 0..15."""
    if variant:  # vpshufb: the 16-entry table in both 128-bit halves
        table = ir.Constant(_V32I8, [v + OFFSET for v in KVALUES] * 2)
        return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [table, codes])

    # Portable arithmetic: magnitude m (0..7) -> m + relu(m - 4) + 2 relu(m - 6) = 0 1 2 3 4 6 8 12 (relu
    # as a saturating subtract), then bit 3 negates: (mag ^ s) - s with s = 0 or -1.
    def k(v):
        return ir.Constant(_V32I8, [v] * 32)

    m = builder.and_(codes, k(7))
    r4 = _call(builder, "llvm.usub.sat.v32i8", _V32I8, [m, k(4)])
    r6 = _call(builder, "llvm.usub.sat.v32i8", _V32I8, [m, k(6)])
    mag = builder.add(builder.add(m, r4), builder.add(r6, r6))
    s = builder.sext(builder.icmp_unsigned("!=", builder.and_(codes, k(8)), k(0)), _V32I8)
    return builder.add(builder.sub(builder.xor(mag, s), s), k(OFFSET))


def _nibbles(builder, v):
    """<32 x i8> bytes -> (low nibbles, high nibbles), each <32 x i8>."""
    lo = builder.and_(v, ir.Constant(_V32I8, [15] * 32))
    hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))  # x86 has no byte shift
    return lo, builder.and_(builder.bitcast(hi, _V32I8), ir.Constant(_V32I8, [15] * 32))


@intrinsic
def load_mxfp4(typingctx, marker, arr, off):
    """The 32 values of one block (16 code bytes at `off`) as kvalues + OFFSET, in element order."""
    if not (_is_marker(marker) and _is_bytes(arr) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, arr, args[1], off, args[2], _V16I8), align=1)
        lo = builder.and_(v, ir.Constant(_V16I8, [15] * 16))
        hi = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
        codes = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        return _kvalues(builder, variant, codes)

    return i8x32(marker, arr, off), codegen


@intrinsic
def load_mxfp4_pair(typingctx, marker, arr, off, stride):
    """Two blocks (code bytes at off and off + stride) as kvalues + OFFSET, in `load_q4_0_pair`'s
    layout: (low = [block 0 elements 0..15 | block 1 elements 0..15], high = the same for 16..31)."""
    if not (_is_marker(marker) and _is_bytes(arr) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        o = context.cast(builder, args[2], off, types.intp)
        o2 = builder.add(o, context.cast(builder, args[3], stride, types.intp))
        a = builder.load(_ptr(context, builder, arr, args[1], types.intp, o, _V16I8), align=1)
        b = builder.load(_ptr(context, builder, arr, args[1], types.intp, o2, _V16I8), align=1)
        lo, hi = _nibbles(builder, builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 32), list(range(32)))))
        lo, hi = _kvalues(builder, variant, lo), _kvalues(builder, variant, hi)
        return context.make_tuple(builder, sig.return_type, [lo, hi])

    return types.UniTuple(i8x32, 2)(marker, arr, off, stride), codegen


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
def scales8_e8m0(typingctx, marker, arr, off, stride):
    """`e8m0_half` of the bytes at off + k * stride for k < 8, as one f32x8."""
    if not (_is_marker(marker) and _is_bytes(arr) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        base = context.cast(builder, args[2], off, types.intp)
        step = context.cast(builder, args[3], stride, types.intp)
        word = None
        for lane in range(8):
            o = builder.add(base, builder.mul(step, ir.Constant(base.type, lane)))
            b = builder.zext(builder.load(_ptr(context, builder, arr, args[1], types.intp, o, _I8)), _I64)
            b = builder.shl(b, ir.Constant(_I64, 8 * lane)) if lane else b
            word = b if word is None else builder.or_(word, b)
        if variant:
            # Packed in integer registers, then one vmovq: unhidden, LLVM turns the bytes into a chain of
            # 7 vpinsrb (14 vector uops per 8 blocks, ~10% of the kernel's) on the busy vector ports.
            word = builder.call(ir.InlineAsm(ir.FunctionType(_I64, [_I64]), "", "=r,0"), [word])
        e = builder.zext(builder.bitcast(word, ir.VectorType(_I8, 8)), _V8I32)
        return builder.bitcast(_e8m0_half_bits(builder, e, _V8I32), _V8F32)

    return f32x8(marker, arr, off, stride), codegen


def _hadd(builder, a, b):
    """vphaddd's lane order: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]."""
    even = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.add(even, odd)


@intrinsic
def block_sums8(typingctx, p01, p23, p45, p67, sums, off):
    """Exact integer dots of 8 blocks, lane k = block k: pkl holds block k's partial sums in lanes 0..3
    and block l's in 4..7 (`dot2` of a `load_mxfp4_pair`), less OFFSET * sums[off + k]."""
    if not (all(p == i32x8 for p in (p01, p23, p45, p67)) and _is_flat(sums) and sums.dtype == types.int32):
        return None

    def codegen(context, builder, sig, args):
        p01, p23, p45, p67, arr, o = args
        g = _hadd(builder, _hadd(builder, p01, p23), _hadd(builder, p45, p67))  # blocks 0 2 4 6 1 3 5 7
        g = builder.shuffle_vector(g, g, ir.Constant(_V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))
        s = builder.load(_ptr(context, builder, sums, arr, off, o, _V8I32), align=4)
        return builder.sub(g, builder.mul(s, ir.Constant(_V8I32, [OFFSET] * 8)))

    return i32x8(p01, p23, p45, p67, sums, off), codegen


@intrinsic
def isum(typingctx, v, half):
    """The sum of lanes 0..3 (half 0), 4..7 (half 1) or 0..7 (half 2) of an i32x8, as int64 (exact)."""
    if not (v == i32x8 and isinstance(half, types.IntegerLiteral)):
        return None
    lanes = {0: range(4), 1: range(4, 8), 2: range(8)}[half.literal_value]

    def codegen(context, builder, sig, args):
        n = len(lanes)
        part = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, n), list(lanes)))
        total = _call(builder, f"llvm.vector.reduce.add.v{n}i32", _I32, [part])
        return builder.sext(total, _I64)

    return types.int64(v, half), codegen


@intrinsic
def fmul_i32(typingctx, v, s):
    """float(v) * s lane-wise: one rounding per lane (ggml's `d * (sumi1 + sumi2)`), no fused add."""
    if not (v == i32x8 and s == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(builder.sitofp(args[0], _V8F32), args[1])

    return f32x8(v, s), codegen
