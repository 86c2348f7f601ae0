"""Intrinsics of the lattice-type kernels (`iquants`): four 8-value grid points into one register,
sub-block scales as i16 lanes, an f16 rebuilt from bits, a scalar fused multiply-add, and byte-wise
|w|, x * sign(w) and a constant offset.

The variant markers are those of `intrinsics`. As there, Numba's cache does not see edits here: delete
`__pycache__/iquants.*` (and the rows / fused kernels built on them) after changing this file.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _F32, _I16, _I32, _V32I8, _call, _half_to_float, _is_marker, _variant, i8x32, i16x16

_I64 = ir.IntType(64)


@intrinsic
def pack4(typingctx, a, b, c, d):
    """The 32 bytes of four int64 (8 values each, little-endian) as one I8x32: a's bytes first."""
    if not all(isinstance(v, types.Integer) for v in (a, b, c, d)):
        return None

    def codegen(context, builder, sig, args):
        v4 = ir.VectorType(_I64, 4)
        v = ir.Constant(v4, None)
        for k, (ty, val) in enumerate(zip(sig.args, args)):
            v = builder.insert_element(v, context.cast(builder, val, ty, types.int64), ir.Constant(_I32, k))
        return builder.bitcast(v, _V32I8)

    return i8x32(a, b, c, d), codegen


@intrinsic
def scales16(typingctx, lo, hi):
    """I16x16 of sub-block scales: lanes 0..7 the bytes of `lo` (scale of the first 16 values of
    sub-block j in byte j), lanes 8..15 those of `hi` (its last 16): the layout `dot_scaled_k` takes."""
    if not (isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v8i8, v8i16 = ir.VectorType(ir.IntType(8), 8), ir.VectorType(_I16, 8)
        halves = [
            builder.zext(builder.bitcast(context.cast(builder, val, ty, types.int64), v8i8), v8i16)
            for ty, val in zip(sig.args, args)
        ]
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 16), list(range(16))))

    return i16x16(lo, hi), codegen


@intrinsic
def half_bits(typingctx, marker, h):
    """The IEEE half with bits `h` (the low 16 bits of an integer) as f32: IQ1_M's scattered scale."""
    if not (_is_marker(marker) and isinstance(h, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bits = builder.trunc(context.cast(builder, args[1], h, types.int64), _I16)
        return _half_to_float(builder, bits, variant)

    return types.float32(marker, h), codegen



@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c in f32 with one rounding (llvm.fma.f32: vfmadd on x86, else libm's fmaf)."""
    if not all(isinstance(v, types.Float) for v in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        a, b, c = (context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args))
        return _call(builder, "llvm.fma.f32", _F32, [a, b, c])

    return types.float32(a, b, c), codegen


@intrinsic
def sub_bytes(typingctx, v, k):
    """Every byte of the I8x32 `v` minus the constant `k` (wrapping)."""
    if not (v == i8x32 and isinstance(k, types.IntegerLiteral)):
        return None
    value = k.literal_value

    def codegen(context, builder, sig, args):
        return builder.sub(args[0], ir.Constant(_V32I8, [value] * 32))

    return i8x32(v, k), codegen


@intrinsic
def abs_bytes(typingctx, marker, v):
    """|v| bytewise (signed bytes > -128): the unsigned weights of `dot` for signed ones."""
    if not (_is_marker(marker) and v == i8x32):
        return None

    def codegen(context, builder, sig, args):
        v = args[1]
        zero = ir.Constant(_V32I8, None)
        return builder.select(builder.icmp_signed("<", v, zero), builder.sub(zero, v), v)

    return i8x32(marker, v), codegen


@intrinsic
def sign_bytes(typingctx, marker, x, w):
    """x * sign(w) bytewise (w never 0 here): the activations that pair with |w| (vpsignb on x86)."""
    if not (_is_marker(marker) and x == i8x32 and w == i8x32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, x, w = args
        if variant:
            return _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [x, w])
        zero = ir.Constant(_V32I8, None)
        return builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, x), x)

    return i8x32(marker, x, w), codegen
