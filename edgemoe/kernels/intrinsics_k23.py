"""SIMD building blocks of the Q2_K and Q3_K kernels (`k23matmul`), in LLVM IR like `intrinsics`.

The sub-block scales come out in the lane order `vecops.dot_scaled_k` takes (lane g scales the first
16 values of 32-value group g, lane 8 + g the last 16), and the f32 sum of 8 lanes is done in the
order of ggml's `hsum_float_8`, so that the kernels add their floats exactly as ggml's AVX2 dot
products do. As for `intrinsics`: Numba's cache does not see edits here, so after one, touch
k23matmul.py (or delete its cached kernels).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    _I8,
    _I16,
    _I32,
    _V8I32,
    _V16I16,
    _V32I8,
    _call,
    _half_to_float,
    _is_bytes,
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
from .vecops import _dot_u8s8

_V16I8 = ir.VectorType(_I8, 16)
_V16I32 = ir.VectorType(_I32, 16)
_EVEN_ODD = ir.Constant(_V16I32, list(range(0, 16, 2)) + list(range(1, 16, 2)))


@intrinsic
def scales_q2_k(typingctx, w, off):
    """The 16 scales (low nibbles) of a Q2_K super-block's scales[16] at w[off:], as i16 lanes in
    `dot_scaled_k` order: scale 2g in lane g, scale 2g + 1 in lane 8 + g."""
    if not (_is_bytes(w) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, w, args[0], off, args[1], _V16I8), align=1)
        v = builder.zext(builder.and_(v, ir.Constant(_V16I8, [15] * 16)), _V16I16)
        return builder.shuffle_vector(v, v, _EVEN_ODD)

    return i16x16(w, off), codegen


@intrinsic
def mins_q2_k(typingctx, marker, w, off, sums, soff):
    """Lane m = min[2m] * sums[soff + 2m] + min[2m + 1] * sums[soff + 2m + 1], min[j] the high nibble
    of scales[j] at w[off:]: ggml's `_mm256_madd_epi16(mins, bsums)` of vec_dot_q2_K_q8_K.

    x86 packs the int32 sums (|sum| <= 16 * 127) to int16 for one vpmaddwd, as ggml's int16 bsums.
    """
    if not (_is_marker(marker) and _is_bytes(w) and _is_flat(sums) and sums.dtype == types.int32):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, w_arg, off_arg, sums_arg, soff_arg = args
        v = builder.load(_ptr(context, builder, w, w_arg, off, off_arg, _V16I8), align=1)
        mins = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
        if variant:
            lo = builder.load(_ptr(context, builder, sums, sums_arg, soff, soff_arg, _V8I32), align=4)
            o8 = builder.add(context.cast(builder, soff_arg, soff, types.intp), ir.Constant(ir.IntType(64), 8))
            hi = builder.load(_ptr(context, builder, sums, sums_arg, types.intp, o8, _V8I32), align=4)
            # vpackssdw packs within 128-bit halves: feed it sums 0-3 | 8-11 and 4-7 | 12-15
            a = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
            b = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
            s16 = _call(builder, "llvm.x86.avx2.packssdw", _V16I16, [a, b])
            return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [builder.zext(mins, _V16I16), s16])
        prod = builder.mul(
            builder.zext(mins, _V16I32), builder.load(_ptr(context, builder, sums, sums_arg, soff, soff_arg, _V16I32), align=4)
        )
        even = builder.shuffle_vector(prod, prod, ir.Constant(_V8I32, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(prod, prod, ir.Constant(_V8I32, list(range(1, 16, 2))))
        return builder.add(even, odd)  # exact: 15 * 16 * 127 per product

    return i32x8(marker, w, off, sums, soff), codegen


def _halves(context, builder, variant: int, w, w_arg, off, off_arg):
    """The two IEEE halves at bytes off, off + 2 of a uint8 array as <8 x float> lanes 0, 1.

    One 32-bit load, zero-extended into a vector: a scalar half load becomes `vpinsrw` into whatever
    register is free, a false dependency on (say) the float accumulator of the last block. The empty
    asm keeps LLVM from narrowing the load back to the one half a caller uses.
    """
    word = builder.load(_ptr(context, builder, w, w_arg, off, off_arg, _I32), align=1)
    word = builder.asm(ir.FunctionType(_I32, [_I32]), "", "=r,0", [word], side_effect=False)
    v = builder.insert_element(ir.Constant(ir.VectorType(_I32, 4), None), word, ir.Constant(_I32, 0))
    return _half_to_float(builder, builder.bitcast(v, ir.VectorType(_I16, 8)), variant)


@intrinsic
def load_f16_pair(typingctx, marker, w, off):
    """The IEEE halves at bytes off and off + 2 of a uint8 array, as two f32 (Q2_K's d, dmin)."""
    if not (_is_marker(marker) and _is_bytes(w) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        f = _halves(context, builder, variant, w, args[1], off, args[2])
        pair = [builder.extract_element(f, ir.Constant(_I32, k)) for k in range(2)]
        return context.make_tuple(builder, sig.return_type, pair)

    return types.UniTuple(types.float32, 2)(marker, w, off), codegen


@intrinsic
def load_f16_after(typingctx, marker, w, off):
    """The IEEE half at bytes off + 2 of a uint8 array as f32 (Q3_K's d, the last field of its
    block), read with the two bytes before it so as not to read past the block."""
    if not (_is_marker(marker) and _is_bytes(w) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        return builder.extract_element(_halves(context, builder, variant, w, args[1], off, args[2]), ir.Constant(_I32, 1))

    return types.float32(marker, w, off), codegen


@intrinsic
def scales_q3_k(typingctx, w, off):
    """The 16 6-bit scales of a Q3_K super-block's scales[12] at w[off:], minus 32, as signed i16
    lanes in `dot_scaled_k` order.

    ggml's kmask unpacking on 32-bit words, the four words in one vector: word i of scales
    4i .. 4i+3 = (its low-nibble word >> 0 or 4) & 0x0F0F0F0F | ((word 2 >> 2i) & 0x03030303) << 4.
    """
    if not (_is_bytes(w) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v4 = ir.VectorType(_I32, 4)
        oo = context.cast(builder, args[1], off, types.intp)
        w01 = builder.load(_ptr(context, builder, w, args[0], types.intp, oo, ir.VectorType(_I32, 2)), align=1)
        o8 = builder.add(oo, ir.Constant(oo.type, 8))
        w2 = builder.load(_ptr(context, builder, w, args[0], types.intp, o8, _I32), align=1)
        low = builder.shuffle_vector(w01, w01, ir.Constant(v4, [0, 1, 0, 1]))
        low = builder.and_(builder.lshr(low, ir.Constant(v4, [0, 0, 4, 4])), ir.Constant(v4, [0x0F0F0F0F] * 4))
        top = builder.lshr(_splat(builder, w2, v4), ir.Constant(v4, [0, 2, 4, 6]))
        top = builder.shl(builder.and_(top, ir.Constant(v4, [0x03030303] * 4)), ir.Constant(v4, [4] * 4))
        sc = builder.bitcast(builder.or_(low, top), _V16I8)  # byte i = scale i
        sc = builder.shuffle_vector(sc, sc, _EVEN_ODD)
        return builder.sext(builder.sub(sc, ir.Constant(_V16I8, [32] * 16)), _V16I16)

    return i16x16(w, off), codegen


@intrinsic
def q3_k_parts(typingctx, w, o, g):
    """Group g (elements 32g .. 32g + 31) of the Q3_K super-block at w[o:] as two unsigned byte vectors
    (low, minus), value = low - minus, as ggml's AVX2 code splits it: low = bits 2k, 2k+1 of
    qs[32n + l] (g = 4n + k), minus = 4 where bit g of hmask[l] is clear, else 0."""
    if not (_is_bytes(w) and isinstance(o, types.Integer) and isinstance(g, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        oo = context.cast(builder, args[1], o, types.intp)
        gg = builder.trunc(context.cast(builder, args[2], g, types.int64), _I16)
        n = builder.zext(builder.lshr(gg, ir.Constant(_I16, 2)), oo.type)
        k2 = builder.shl(builder.and_(gg, ir.Constant(_I16, 3)), ir.Constant(_I16, 1))
        qs_off = builder.add(oo, builder.add(ir.Constant(oo.type, 32), builder.mul(n, ir.Constant(oo.type, 32))))

        def shift16(v, s, op):  # shift the 16-bit lanes of a byte vector
            s16 = builder.shuffle_vector(
                builder.insert_element(ir.Constant(_V16I16, None), s, ir.Constant(_I32, 0)),
                ir.Constant(_V16I16, None),
                ir.Constant(_V16I32, [0] * 16),
            )
            return builder.bitcast(getattr(builder, op)(builder.bitcast(v, _V16I16), s16), _V32I8)

        qs = builder.load(_ptr(context, builder, w, args[0], types.intp, qs_off, _V32I8), align=1)
        low = builder.and_(shift16(qs, k2, "lshr"), ir.Constant(_V32I8, [3] * 32))  # exact: 3 < 2 ** (8 - 2k)
        hm = builder.load(_ptr(context, builder, w, args[0], types.intp, oo, _V32I8), align=1)
        bit = builder.trunc(builder.shl(ir.Constant(_I16, 1), gg), _I8)
        clear = builder.and_(builder.xor(hm, ir.Constant(_V32I8, [0xFF] * 32)), _splat(builder, bit, _V32I8))  # 2**g or 0
        # 2**g -> 4 with one shift (a constant g after unrolling picks one side); only bit g is set in
        # each byte, so no bit crosses into the other byte of a 16-bit lane
        two = ir.Constant(_I16, 2)
        high = builder.icmp_unsigned(">=", gg, two)
        zero = ir.Constant(_I16, 0)
        down = shift16(clear, builder.select(high, builder.sub(gg, two), zero), "lshr")
        up = shift16(clear, builder.select(high, zero, builder.sub(two, gg)), "shl")
        minus = builder.select(high, down, up)
        return context.make_tuple(builder, sig.return_type, [low, minus])

    return types.UniTuple(i8x32, 2)(w, o, g), codegen


@intrinsic
def dot_scaled_sub(typingctx, marker, a, m, b, scales, j):
    """`dot_scaled_k(a - m, b, scales, j)` for unsigned bytes a, m <= 7: the two pair sums are
    subtracted in int16 before the scales multiply them, as ggml's vec_dot_q3_K_q8_K."""
    if not (_is_marker(marker) and a == i8x32 and m == i8x32 and b == i8x32 and scales == i16x16):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, a, m, b, sv, j_val = args
        j8 = builder.trunc(context.cast(builder, j_val, sig.args[5], types.int32), _I8)
        if variant == 1:
            pairs = builder.sub(
                _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [a, b]),
                _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [m, b]),
            )
            return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, _scale_pairs(builder, sv, j8)])
        j32 = builder.zext(j8, _I32)
        lo = _splat(builder, builder.sext(builder.extract_element(sv, j32), _I32), _V8I32)
        hi = _splat(builder, builder.sext(builder.extract_element(sv, builder.add(j32, ir.Constant(_I32, 8))), _I32), _V8I32)
        s = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32, [0, 1, 2, 3, 12, 13, 14, 15]))
        d = builder.sub(_dot_u8s8(builder, variant, a, b), _dot_u8s8(builder, variant, m, b))
        return builder.mul(d, s)

    return i32x8(marker, a, m, b, scales, j), codegen


def _scale_pairs(builder, sv, j8):
    """i16 lanes of sv's scale j in the low 128 bits and scale 8 + j in the high ones (vpshufb)."""
    two = builder.zext(builder.shl(j8, ir.Constant(_I8, 1)), _I16)
    m16 = builder.or_(two, builder.shl(builder.add(two, ir.Constant(_I16, 1)), ir.Constant(_I16, 8)))
    mask = builder.bitcast(_splat(builder, m16, _V16I16), _V32I8)
    return builder.bitcast(_call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [builder.bitcast(sv, _V32I8), mask]), _V16I16)


@intrinsic
def hsum_ggml(typingctx, v):
    """Sum of the 8 lanes of an f32x8 in the order of ggml's x86 `hsum_float_8`:
    ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, 4), [0, 1, 2, 3]))
        hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, 4), [4, 5, 6, 7]))
        r = builder.fadd(hi, lo)
        r2 = builder.fadd(r, builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(_I32, 4), [2, 3, 2, 3])))
        a = builder.extract_element(r2, ir.Constant(_I32, 0))
        b = builder.extract_element(r2, ir.Constant(_I32, 1))
        return builder.fadd(a, b)

    return types.float32(v), codegen


@intrinsic
def prefetch_block(typingctx, w, off, half):
    """Hint the CPU to fetch the bytes at w[off:] and w[off + half:] into cache (no effect on results,
    no fault past the array's end). Called once per block of 2 * half bytes or fewer, the hints
    touch every 64-byte line of the stream."""
    if not (_is_bytes(w) and isinstance(off, types.Integer) and isinstance(half, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        o = context.cast(builder, args[1], off, types.intp)
        for _ in range(2):
            p = _ptr(context, builder, w, args[0], types.intp, o, _I8)
            # read, high locality (keep in all levels), data cache
            _call(
                builder,
                "llvm.prefetch.p0",
                ir.VoidType(),
                [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)],
            )
            o = builder.add(o, context.cast(builder, args[2], half, types.intp))
        return context.get_dummy_value()

    return types.void(w, off, half), codegen
