"""SIMD intrinsics of the Q4_1x8 / Q5_0x8 / Q5_1x8 kernels (`q451x8`): one block of 8 interleaved rows.

A block of the x8 layout (8 plain blocks: 160, 176 or 192 bytes; see `q451x8`):

    [0:16)    f16 d of rows 0..7
    m         f16 m of rows 0..7 (16 bytes; Q4_1, Q5_1)
    H         fifth bits (32 bytes; Q5_0, Q5_1): byte 4r + k, bit 2j = element 4j + k of row r,
              bit 2j + 1 = element 16 + 4j + k
    qs        4 chunks of 32 bytes; chunk j holds qs bytes 4j..4j+3 of rows 0..7 (row r at 4r), as Q4_0x8

H's bytes sit where chunk j's bytes sit, so chunk j's fifth bits are H shifted (one 16-bit shift) to put
bit 2j (low nibbles) or 2j + 1 (high nibbles) at bit 4, ANDed with 0x10. The shifts move at most 4 bits
left or 3 right, so bit 4 of each byte only ever receives a bit of its own byte.

The quants (0..31) are unsigned: vpmaddubsw with a broadcast of 4 int8 activations, then vpmaddwd puts
the 8 row sums in lanes, as `intrinsics_x8`. A vpmaddubsw lane is at most 2 * 31 * 128 = 7936, so the
5-bit types add 4 of them (2 chunks) in 16 bits before each vpmaddwd; Q4_1 (<= 2 * 15 * 128) adds all 8.

Variants as `intrinsics_x8`: int8 marker generic (exact widened products), int16 AVX2, int32 (VNNI CPUs)
takes the AVX2 code. Integers are exact and the float steps the same, so every variant has the same bits.
Numba's cache does not see edits here: delete `edgemoe/kernels/__pycache__/q451x8*.nb[ic]`.
"""

from __future__ import annotations

from typing import NamedTuple

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _I8, _I32, _V8F32, _V8I32, _V16I16, _V32I8, _V32I16, _call, _is_bytes, _ptr, _splat, f32x8, i32x8
from .intrinsics_q451 import _layout as _plain_layout
from .intrinsics_x8 import _V8I16, _half_to_float8, _is_marker, _variant

_V16I32 = ir.VectorType(_I32, 16)


class Layout(NamedTuple):
    bytes: int  # bytes per block of 8 rows (8 plain blocks)
    m: int  # offset of the 8 f16 minimums, 0 when the type has none
    h: int  # offset of the 32 fifth-bit bytes H, 0 when the type has none
    qs: int  # offset of the 4 quant chunks
    offset: int  # subtracted from every quant (Q5_0's 16), taken back as 2 * xc = 16 * the block sum


def x8_layout(fmt) -> Layout | None:
    """The x8 layout of the format marker's Numba type (FMT_Q4_1 / FMT_Q5_0 / FMT_Q5_1), else None."""
    lay = _plain_layout(fmt)
    if lay is None:
        return None
    m = 16 if lay.m else 0
    h = 16 + m if lay.qh else 0
    qs = 16 + (16 if lay.m else 0) + (32 if lay.qh else 0)
    assert qs + 128 == 8 * lay.bytes
    return Layout(8 * lay.bytes, m, h, qs, lay.offset)


def _at(context, builder, arrty, arr, off, extra: int, elem: ir.Type):
    """Pointer to byte off + extra (off an intp value) of a byte array, as `elem*`."""
    return _ptr(context, builder, arrty, arr, types.intp, builder.add(off, ir.Constant(off.type, extra)), elem)


def _shift16(builder, v, s: int):
    """<16 x i16> v shifted left by s (right by -s when s < 0)."""
    if s == 0:
        return v
    if s > 0:
        return builder.shl(v, ir.Constant(_V16I16, [s] * 16))
    return builder.lshr(v, ir.Constant(_V16I16, [-s] * 16))


def _pair_sums(builder, variant: int, s16):
    """<16 x i16> sums of products -> <8 x i32>, lane r = lanes 2r + 2r + 1 (vpmaddwd with ones)."""
    if variant:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [s16, ir.Constant(_V16I16, [1] * 16)])
    wide = builder.sext(s16, _V16I32)
    even = builder.shuffle_vector(wide, wide, ir.Constant(_V8I32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(wide, wide, ir.Constant(_V8I32, list(range(1, 16, 2))))
    return builder.add(even, odd)


def _block_dots(context, builder, lay: Layout, variant: int, warr, w, bo, xarr, x, xos):
    """For each activation offset in `xos`: <8 x i32>, lane r = sum_i q_i(row r) * x[xo + i] over the 32
    columns of the block at flat byte `bo` of `w` (q the unsigned 4- or 5-bit quants).

    Chunk by chunk, as `intrinsics_x8._block_dots`; the 16-bit sums go to 32 bits after every
    `per` chunks (2 for the 5-bit types, 4 for Q4_1: see the module doc). Generic: products widened
    to 16 bits (|q * x| <= 31 * 128, at most 8 per lane: <= 31744), exact.
    """
    n, per = len(xos), 2 if lay.h else 4
    s16, s32 = [None] * n, [None] * n
    m15, m16 = ir.Constant(_V32I8, [15] * 32), ir.Constant(_V32I8, [0x10] * 32)
    if lay.h:
        h = builder.bitcast(builder.load(_at(context, builder, warr, w, bo, lay.h, _V32I8), align=1), _V16I16)
    for j in range(4):
        v = builder.load(_at(context, builder, warr, w, bo, lay.qs + 32 * j, _V32I8), align=1)
        lo = builder.and_(v, m15)
        hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))  # no byte shift on x86
        hi = builder.and_(builder.bitcast(hi, _V32I8), m15)
        if lay.h:  # bit 2j of H -> bit 4 of the low nibbles' byte, bit 2j + 1 -> the high nibbles'
            lo = builder.or_(lo, builder.and_(builder.bitcast(_shift16(builder, h, 4 - 2 * j), _V32I8), m16))
            hi = builder.or_(hi, builder.and_(builder.bitcast(_shift16(builder, h, 3 - 2 * j), _V32I8), m16))
        for k, xo in enumerate(xos):
            for q, col in ((lo, 4 * j), (hi, 16 + 4 * j)):
                o = builder.add(xo, ir.Constant(xo.type, col))
                x4 = builder.load(_ptr(context, builder, xarr, x, types.intp, o, _I32), align=1)
                xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd
                if variant:
                    p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [q, xb])
                else:  # the 32 products in i16; adjacent pairs added below, as vpmaddubsw without saturation
                    p = builder.mul(builder.zext(q, _V32I16), builder.sext(xb, _V32I16))
                    p = builder.add(
                        builder.shuffle_vector(p, p, ir.Constant(_V16I32, list(range(0, 32, 2)))),
                        builder.shuffle_vector(p, p, ir.Constant(_V16I32, list(range(1, 32, 2)))),
                    )
                s16[k] = p if s16[k] is None else builder.add(s16[k], p)
        if (j + 1) % per == 0:
            for k in range(n):
                s = _pair_sums(builder, variant, s16[k])
                s32[k], s16[k] = s if s32[k] is None else builder.add(s32[k], s), None
    return s32


def _dots_ok(fmt, marker, w, bo, x, xo) -> bool:
    ints = isinstance(bo, types.Integer) and isinstance(xo, types.Integer)
    return x8_layout(fmt) is not None and _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and ints


@intrinsic
def dot_q451_x8(typingctx, fmt, marker, w, bo, x, xo):
    """Row sums (i32x8) of the quants of the block at w[bo:] (its first byte) times x[xo : xo + 32]."""
    if not _dots_ok(fmt, marker, w, bo, x, xo):
        return None
    lay, variant = x8_layout(fmt), _variant(marker)

    def codegen(context, builder, sig, args):
        _, _, w_v, bo_v, x_v, xo_v = args
        bo_v = context.cast(builder, bo_v, sig.args[3], types.intp)
        xo_v = context.cast(builder, xo_v, sig.args[5], types.intp)
        return _block_dots(context, builder, lay, variant, sig.args[2], w_v, bo_v, sig.args[4], x_v, [xo_v])[0]

    return i32x8(fmt, marker, w, bo, x, xo), codegen


@intrinsic
def dot_q451_x8_4(typingctx, fmt, marker, w, bo, x, xo, stride):
    """`dot_q451_x8` for 4 tokens, activations at xo + k * stride (k < 4), sharing the weight loads."""
    if not (_dots_ok(fmt, marker, w, bo, x, xo) and isinstance(stride, types.Integer)):
        return None
    lay, variant = x8_layout(fmt), _variant(marker)

    def codegen(context, builder, sig, args):
        _, _, w_v, bo_v, x_v, xo_v, st = args
        bo_v = context.cast(builder, bo_v, sig.args[3], types.intp)
        xos = [context.cast(builder, xo_v, sig.args[5], types.intp)]
        st = context.cast(builder, st, sig.args[6], types.intp)
        for _ in range(3):
            xos.append(builder.add(xos[-1], st))
        dots = _block_dots(context, builder, lay, variant, sig.args[2], w_v, bo_v, sig.args[4], x_v, xos)
        return context.make_tuple(builder, sig.return_type, dots)

    return types.UniTuple(i32x8, 4)(fmt, marker, w, bo, x, xo, stride), codegen


@intrinsic
def block_bytes_x8(typingctx, fmt):
    """Bytes per 8-row block of format `fmt`, as a constant the address arithmetic folds."""
    lay = x8_layout(fmt)
    if lay is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), lay.bytes)

    return types.intp(fmt), codegen


@intrinsic
def mins_x8(typingctx, fmt, marker, w, bo):
    """The 8 rows' f16 minimums of the block at w[bo:] as f32x8 (one vcvtph2ps); zeros for Q5_0, which
    has none (the value is then unused)."""
    lay = x8_layout(fmt)
    if not (lay and _is_marker(marker) and _is_bytes(w) and isinstance(bo, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        if not lay.m:
            return ir.Constant(_V8F32, None)
        bo_v = context.cast(builder, args[3], sig.args[3], types.intp)
        h = builder.load(_at(context, builder, sig.args[2], args[2], bo_v, lay.m, _V8I16), align=1)
        return _half_to_float8(builder, h, variant)

    return f32x8(fmt, marker, w, bo), codegen


@intrinsic
def acc_x8(typingctx, fmt, acc, isum, dw, mw, xd, xs):
    """acc plus one block's f32 terms, lane-wise (xd, xs scalars), ggml's per-block arithmetic:

        Q5_0:        fma(float(isum - 2 * xs), dw * xd, acc)     xs = xc, 8 * the activation block's sum
        Q4_1, Q5_1:  acc + fma(dw * xd, float(isum), mw * xs)     xs = xd * the activation block's sum

    isum - 2 * xc is the exact dot of the signed quants (q - 16) with the activations; the Q4_1 / Q5_1
    FMA is the contraction of ggml's C `(d_w * d_x) * sumi + m_w * s_x`, added to acc apart, as its loop.
    """
    lay = x8_layout(fmt)
    vecs = acc == f32x8 and isum == i32x8 and dw == f32x8 and mw == f32x8
    if not (lay and vecs and isinstance(xd, types.Float)):
        return None
    if xs != (types.int32 if lay.offset else types.float32):
        return None

    def codegen(context, builder, sig, args):
        _, acc_v, isum_v, dw_v, mw_v, d, s = args
        e = builder.fmul(dw_v, _splat(builder, context.cast(builder, d, sig.args[5], types.float32), _V8F32))
        if lay.offset:
            c = builder.mul(_splat(builder, s, _V8I32), ir.Constant(_V8I32, [lay.offset // 8] * 8))  # 2 * xc
            v = builder.sitofp(builder.sub(isum_v, c), _V8F32)
            return _call(builder, "llvm.fma.v8f32", _V8F32, [v, e, acc_v])
        ms = builder.fmul(mw_v, _splat(builder, s, _V8F32))
        term = _call(builder, "llvm.fma.v8f32", _V8F32, [e, builder.sitofp(isum_v, _V8F32), ms])
        return builder.fadd(acc_v, term)

    return f32x8(fmt, acc, isum, dw, mw, xd, xs), codegen


@intrinsic
def prefetch_q451_x8(typingctx, fmt, w, off):
    """Hint the CPU to fetch the block of `fmt` at w[off:] into cache (no effect on results, no fault
    past the array's end): one software prefetch per 64 bytes from off, so consecutive blocks touch
    every line (`prefetch_x8`'s 0, 48, 96 would skip lines of the 192-byte Q5_1 blocks)."""
    lay = x8_layout(fmt)
    if not (lay and _is_bytes(w) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        off_v = context.cast(builder, args[2], sig.args[2], types.intp)
        for k in range(0, lay.bytes, 64):
            p = _at(context, builder, sig.args[1], args[1], off_v, k, _I8)
            # read, high locality (keep in all levels), data cache
            args_ = [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]
            _call(builder, "llvm.prefetch.p0", ir.VoidType(), args_)
        return context.get_dummy_value()

    return types.void(fmt, w, off), codegen
