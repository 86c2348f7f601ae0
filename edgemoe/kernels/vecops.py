"""Integer dot products and vector arithmetic on the register types of `intrinsics`.

`dot` is the one instruction-set-specific operation of the int8 kernels; see `intrinsics` for
the types and how the variant marker selects an instruction set.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    _F32,
    _I8,
    _I16,
    _I32,
    _V8F32,
    _V8I32,
    _V16I16,
    _V32I8,
    _V32I16,
    _call,
    _is_flat,
    _is_marker,
    _ptr,
    _splat,
    _variant,
    f32x8,
    i8x32,
    i16x16,
    i32x8,
)

# ---- integer dot products -----------------------------------------------------------------------


def _dot_u8s8(builder, variant: int, a, b):
    """<8 x i32>: lane i = sum over bytes 4i..4i+3 of a (unsigned) * b (signed).

    AVX2 saturates the pairwise i16 sums: callers keep 2 * max(a) * max|b| <= 32767
    (4-6-bit weights against |x| <= 128, or |w| <= 128 against |x| <= 127).
    """
    if variant == 2:
        return _call(
            builder,
            "llvm.x86.avx512.vpdpbusd.256",
            _V8I32,
            [
                ir.Constant(_V8I32, None),
                builder.bitcast(a, _V8I32),
                builder.bitcast(b, _V8I32),
            ],
        )
    if variant == 1:
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [a, b])
        return _call(
            builder,
            "llvm.x86.avx2.pmadd.wd",
            _V8I32,
            [pairs, ir.Constant(_V16I16, [1] * 16)],
        )
    prod = builder.mul(builder.zext(a, _V32I16), builder.sext(b, _V32I16))  # exact: |a*b| <= 32640
    # pairwise sums in i32, then pairs of pairs: the shape of pmaddwd / NEON pairwise adds
    v16i32 = ir.VectorType(_I32, 16)
    even = builder.shuffle_vector(prod, prod, ir.Constant(v16i32, list(range(0, 32, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(v16i32, list(range(1, 32, 2))))
    pairs = builder.add(builder.sext(even, v16i32), builder.sext(odd, v16i32))
    even = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(1, 16, 2))))
    return builder.add(even, odd)


@intrinsic
def dot(typingctx, marker, a, b):
    """Integer dot of 32 unsigned bytes `a` with 32 signed bytes `b`, as 8 partial sums."""
    if not (_is_marker(marker) and a == i8x32 and b == i8x32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        return _dot_u8s8(builder, variant, args[1], args[2])

    return i32x8(marker, a, b), codegen


@intrinsic
def dot2(typingctx, marker, a0, b0, a1, b1):
    """`dot(a0, b0) + dot(a1, b1)` for weights a0, a1 <= 63: Q4_0's 4-bit values, MXFP4's offset
    kvalues (<= 24).

    AVX2 adds the two vpmaddubsw results before one vpmaddwd (4 * 63 * 128 fits i16); VNNI
    accumulates the second vpdpbusd onto the first.
    """
    if not (_is_marker(marker) and a0 == i8x32 and b0 == i8x32 and a1 == i8x32 and b1 == i8x32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, a0, b0, a1, b1 = args
        if variant == 2:
            first = _dot_u8s8(builder, variant, a0, b0)
            return _call(
                builder,
                "llvm.x86.avx512.vpdpbusd.256",
                _V8I32,
                [first, builder.bitcast(a1, _V8I32), builder.bitcast(b1, _V8I32)],
            )
        if variant == 1:
            p0 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [a0, b0])
            p1 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [a1, b1])
            ones = ir.Constant(_V16I16, [1] * 16)
            return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [builder.add(p0, p1), ones])
        return builder.add(_dot_u8s8(builder, variant, a0, b0), _dot_u8s8(builder, variant, a1, b1))

    return i32x8(marker, a0, b0, a1, b1), codegen


@intrinsic
def scales_k(typingctx, sc):
    """The 8 bytes of `sc` (scale of sub-block i in byte i) as i16 lanes 0..7, repeated in 8..15."""
    if not isinstance(sc, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.bitcast(context.cast(builder, args[0], sc, types.int64), ir.VectorType(_I8, 8))
        v = builder.zext(v, ir.VectorType(_I16, 8))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), list(range(8)) * 2))

    return i16x16(sc), codegen


@intrinsic
def scales_q6_k(typingctx, w, off):
    """The 16 int8 scales of a Q6_K super-block at w[off:] as i16: even-indexed scales in lanes
    0..7, odd-indexed in 8..15, so lane g / 8 + g scale the two halves of group g."""
    if not (_is_flat(w) and w.dtype.bitwidth == 8 and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, w, args[0], off, args[1], ir.VectorType(_I8, 16)), align=1)
        v = builder.sext(v, _V16I16)
        order = list(range(0, 16, 2)) + list(range(1, 16, 2))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), order))

    return i16x16(w, off), codegen


@intrinsic
def dot_scaled_k(typingctx, marker, a, b, scales, j):
    """`dot(a, b)` with its first 16 bytes' sums times lane j of `scales` and the last 16's times
    lane 8 + j (signed i16): the scales of sub-block j from `scales_k` or `scales_q6_k`."""
    if not (_is_marker(marker) and a == i8x32 and b == i8x32 and scales == i16x16):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, a, b, sv, j_val = args
        j8 = builder.trunc(context.cast(builder, j_val, sig.args[4], types.int32), _I8)
        if variant == 1:  # vpshufb broadcasts the scale's two bytes to every i16 lane
            # shuffle mask: bytes (2j, 2j + 1) in every i16 lane, as one i16 splat
            two = builder.zext(builder.shl(j8, ir.Constant(_I8, 1)), _I16)
            m16 = builder.or_(two, builder.shl(builder.add(two, ir.Constant(_I16, 1)), ir.Constant(_I16, 8)))
            mask = builder.bitcast(_splat(builder, m16, _V16I16), _V32I8)
            s16 = builder.bitcast(_call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [builder.bitcast(sv, _V32I8), mask]), _V16I16)
            pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [a, b])
            return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, s16])
        j32 = builder.zext(j8, _I32)
        lo = _splat(builder, builder.sext(builder.extract_element(sv, j32), _I32), _V8I32)
        j_hi = builder.add(j32, ir.Constant(_I32, 8))
        hi = _splat(builder, builder.sext(builder.extract_element(sv, j_hi), _I32), _V8I32)
        s = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [0, 1, 2, 3, 12, 13, 14, 15]))
        return builder.mul(_dot_u8s8(builder, variant, a, b), s)

    return i32x8(marker, a, b, scales, j), codegen


@intrinsic
def abs_sign(typingctx, marker, w, x):
    """For signed `w`, `x`: (|w| as unsigned bytes, x * sign(w)), so that dot(|w|, x*sign(w)) = w.x."""
    if not (_is_marker(marker) and w == i8x32 and x == i8x32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, w, x = args
        zero = ir.Constant(_V32I8, None)
        neg = builder.icmp_signed("<", w, zero)
        absw = builder.select(neg, builder.sub(zero, w), w)
        if variant:  # vpsignb: one instruction for the three selects below
            sx = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [x, w])
        else:
            sx = builder.select(neg, builder.sub(zero, x), x)
            sx = builder.select(builder.icmp_signed("==", w, zero), zero, sx)
        return context.make_tuple(builder, sig.return_type, [absw, sx])

    return types.UniTuple(i8x32, 2)(marker, w, x), codegen


# ---- vector arithmetic --------------------------------------------------------------------------


@intrinsic
def zero_i32x8(typingctx):
    """<8 x i32> zeros."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V8I32, None)

    return i32x8(), codegen


@intrinsic
def zero_f32x8(typingctx):
    """<8 x float> zeros."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F32, None)

    return f32x8(), codegen


@intrinsic
def iadd(typingctx, a, b):
    """Lane-wise int32 add."""
    if not (a == i32x8 and b == i32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return i32x8(a, b), codegen


@intrinsic
def fma_i32(typingctx, acc, v, s):
    """`acc + float(v) * s` lane-wise, `s` a scalar."""
    if not (acc == f32x8 and v == i32x8 and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        acc, v, s = args
        s = _splat(builder, context.cast(builder, s, sig.args[2], types.float32), _V8F32)
        return _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(v, _V8F32), s, acc])

    return f32x8(acc, v, s), codegen


@intrinsic
def fma_halves(typingctx, acc, v, s_lo, s_hi):
    """`acc + float(v) * [s_lo] * 4 ++ [s_hi] * 4`: lanes 0..3 and 4..7 belong to two blocks."""
    if not (acc == f32x8 and v == i32x8 and isinstance(s_lo, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        acc, v, lo, hi = args
        lo = _splat(builder, context.cast(builder, lo, sig.args[2], types.float32), _V8F32)
        hi = _splat(builder, context.cast(builder, hi, sig.args[3], types.float32), _V8F32)
        s = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [0, 1, 2, 3, 12, 13, 14, 15]))
        return _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(v, _V8F32), s, acc])

    return f32x8(acc, v, s_lo, s_hi), codegen


@intrinsic
def fma_pair(typingctx, marker, acc, v, scales, k):
    """`acc + float(v) * [scales[k]] * 4 ++ [scales[k + 1]] * 4`: blocks k, k+1 of a group of 8."""
    if not (_is_marker(marker) and acc == f32x8 and v == i32x8 and scales == f32x8):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, acc, v, scales, k_val = args
        k32 = context.cast(builder, k_val, sig.args[4], types.int32)
        if variant:  # vpermps
            idx = builder.add(_splat(builder, k32, _V8I32), ir.Constant(_V8I32, [0] * 4 + [1] * 4))
            s = _call(builder, "llvm.x86.avx2.permps", _V8F32, [scales, idx])
        else:
            lo = _splat(builder, builder.extract_element(scales, k32), _V8F32)
            k1 = builder.add(k32, ir.Constant(_I32, 1))
            hi = _splat(builder, builder.extract_element(scales, k1), _V8F32)
            s = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [0, 1, 2, 3, 12, 13, 14, 15]))
        return _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(v, _V8F32), s, acc])

    return f32x8(marker, acc, v, scales, k), codegen


@intrinsic
def hsum(typingctx, v):
    """Sum of the 8 lanes of an f32x8."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fadd.v8f32", _F32, [ir.Constant(_F32, 0.0), args[0]])

    return types.float32(v), codegen


@intrinsic
def ffma(typingctx, a, b, c):
    """Lane-wise a * b + c in f32."""
    if not (a == f32x8 and b == f32x8 and c == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v8f32", _V8F32, list(args))

    return f32x8(a, b, c), codegen


@intrinsic
def fma_lane(typingctx, marker, acc, v, scales, k):
    """`acc + float(v) * scales[k]` lane-wise: the scale of block k of a group of 8."""
    if not (_is_marker(marker) and acc == f32x8 and v == i32x8 and scales == f32x8):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, acc, v, scales, k_val = args
        k32 = context.cast(builder, k_val, sig.args[4], types.int32)
        if variant:  # vpermps; a constant index (after unrolling) becomes a plain shuffle
            idx = _splat(builder, k32, _V8I32)
            s = _call(builder, "llvm.x86.avx2.permps", _V8F32, [scales, idx])
        else:
            s = _splat(builder, builder.extract_element(scales, k32), _V8F32)
        return _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(v, _V8F32), s, acc])

    return f32x8(marker, acc, v, scales, k), codegen


# ---- K-quant scale helpers (portable IR, no variant) --------------------------------------------


def _load_vec(context, builder, arrty, arr, offty, off, vtype):
    return builder.load(_ptr(context, builder, arrty, arr, offty, off, vtype), align=1)


@intrinsic
def mins_dot(typingctx, m_lo, m_hi, sums, off):
    """sum_j byte_j(m_lo, m_hi) * (sums[off + 2j] + sums[off + 2j + 1]) for j < 8.

    The Q4_K/Q5_K min correction: 8 unsigned 6-bit mins (bytes of two 32-bit words) against
    the activation's per-16 sums, paired into per-32 sums.
    """
    ok = _is_flat(sums) and sums.dtype == types.int32
    if not ok:
        return None

    def codegen(context, builder, sig, args):
        lo, hi = (builder.trunc(a, _I32) for a in args[:2])
        words = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), None), lo, ir.Constant(_I32, 0))
        words = builder.insert_element(words, hi, ir.Constant(_I32, 1))
        mins = builder.zext(builder.bitcast(words, ir.VectorType(_I8, 8)), _V8I32)
        v16 = ir.VectorType(_I32, 16)
        s = _load_vec(context, builder, sums, args[2], off, args[3], v16)
        even = builder.shuffle_vector(s, s, ir.Constant(_V8I32, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(s, s, ir.Constant(_V8I32, list(range(1, 16, 2))))
        prod = builder.mul(mins, builder.add(even, odd))
        return builder.sext(_call(builder, "llvm.vector.reduce.add.v8i32", _I32, [prod]), ir.IntType(64))

    return types.int64(m_lo, m_hi, sums, off), codegen


@intrinsic
def sdot16(typingctx, w, w_off, sums, off):
    """sum_i int8(w[w_off + i]) * sums[off + i] for i < 16 (the Q6_K -32 offset correction)."""
    ok = _is_flat(sums) and sums.dtype == types.int32
    if not (ok and _is_flat(w) and w.dtype.bitwidth == 8):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(_I32, 16)
        sc = _load_vec(context, builder, w, args[0], w_off, args[1], ir.VectorType(_I8, 16))
        s = _load_vec(context, builder, sums, args[2], off, args[3], v16)
        total = _call(
            builder,
            "llvm.vector.reduce.add.v16i32",
            _I32,
            [builder.mul(builder.sext(sc, v16), s)],
        )
        return builder.sext(total, ir.IntType(64))

    return types.int64(w, w_off, sums, off), codegen


@intrinsic
def splat_f32x8(typingctx, x):
    """<8 x float> with every lane = x."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.shuffle_vector(builder.insert_element(ir.Constant(_V8F32, None), v, ir.Constant(ir.IntType(32), 0)),
                                      ir.Constant(_V8F32, None), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))

    return f32x8(x), codegen


def _f32x8_const(v: float):
    return ir.Constant(_V8F32, [v] * 8)


@intrinsic
def exp_f32x8(typingctx, v):
    """Lane-wise e**x (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, times 2**n; ~1 ulp).

    Inputs are clamped to [-87.3, 88.376]; below, the result is ~1e-38 instead of 0 (softmax and SiLU
    do not notice). Deterministic: the same lane value always gives the same result.
    """
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        x = _call(builder, "llvm.maxnum.v8f32", _V8F32, [x, _f32x8_const(-87.3)])
        x = _call(builder, "llvm.minnum.v8f32", _V8F32, [x, _f32x8_const(88.3762626647949)])
        fx = _call(builder, "llvm.floor.v8f32", _V8F32,
                   [builder.fadd(builder.fmul(x, _f32x8_const(1.44269504088896341)), _f32x8_const(0.5))])
        x = builder.fsub(x, builder.fmul(fx, _f32x8_const(0.693359375)))
        x = builder.fsub(x, builder.fmul(fx, _f32x8_const(-2.12194440e-4)))
        y = _f32x8_const(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            y = builder.fadd(builder.fmul(y, x), _f32x8_const(c))
        y = builder.fadd(builder.fadd(builder.fmul(y, builder.fmul(x, x)), x), _f32x8_const(1.0))
        n = builder.fptosi(fx, _V8I32)
        scale = builder.bitcast(builder.shl(builder.add(n, ir.Constant(_V8I32, [127] * 8)), ir.Constant(_V8I32, [23] * 8)),
                                _V8F32)
        return builder.fmul(y, scale)

    return f32x8(v), codegen


def _lanewise(name: str, op: str, what: str):
    """A lane-wise f32x8 intrinsic `name(a, b)` emitting the LLVM instruction `op` ("fadd", ...) or calling the
    LLVM intrinsic `op` ("llvm.minnum.v8f32", ...)."""

    def impl(typingctx, a, b):
        if not (a == f32x8 and b == f32x8):
            return None

        def codegen(context, builder, sig, args):
            if op.startswith("llvm."):
                return _call(builder, op, _V8F32, [args[0], args[1]])
            return getattr(builder, op)(args[0], args[1])

        return f32x8(a, b), codegen

    impl.__name__ = impl.__qualname__ = name
    impl.__doc__ = f"Lane-wise f32 {what}."
    return intrinsic(impl)


fadd = _lanewise("fadd", "fadd", "add")
fsub = _lanewise("fsub", "fsub", "subtract")
fmul = _lanewise("fmul", "fmul", "multiply")
fdiv = _lanewise("fdiv", "fdiv", "divide")
fmin = _lanewise("fmin", "llvm.minnum.v8f32", "minimum (of a NaN and a number: the number)")
fmax = _lanewise("fmax", "llvm.maxnum.v8f32", "maximum (of a NaN and a number: the number)")
