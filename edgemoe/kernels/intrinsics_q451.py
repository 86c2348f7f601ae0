"""SIMD intrinsics of the Q4_1 / Q5_0 / Q5_1 kernel (`q451`): block decoding and per-block f32 terms.

The three block layouts (ggml-common.h), 32 values each, value j in the low nibble of qs[j], value
j + 16 in the high one, the fifth bit of value j in bit j of the little-endian u32 qh:

    Q4_1 (20 B): d f16 | m f16 | qs[16]            y = d * q + m,          q = 0..15
    Q5_0 (22 B): d f16 | qh[4] | qs[16]            y = d * (q - 16),       q = 0..31
    Q5_1 (24 B): d f16 | m f16 | qh[4] | qs[16]    y = d * q + m,          q = 0..31

The kernel is one template; the format marker's Numba type (FMT_Q4_1 / FMT_Q5_0 / FMT_Q5_1, as the
float formats' markers of `intrinsics`) picks the layout at compile time, so each type gets its own
specialisation with its offsets as constants. The quants q are unsigned (vpmaddubsw's first operand);
Q5_0's -16 is taken back from each block's exact integer dot as 16 * the activation block's integer sum.
The same IR serves every variant (LLVM lowers the constant shuffles to vpshufb / vpbroadcast on AVX2).
As for `intrinsics`, Numba's cache does not see edits here: delete `__pycache__/q451.*` and the
`rows.rows_q4_1` / `rows_q5_*` and fused kernels' cache files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
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
    _call,
    _half_to_float,
    _is_bytes,
    _is_flat,
    _is_marker,
    _ptr,
    _variant,
    f32x8,
    i8x32,
    i32x8,
)

# Format markers: only the Numba type matters (unsigned, so never mistaken for a variant marker).
FMT_Q4_1 = np.uint8(0)
FMT_Q5_0 = np.uint16(0)
FMT_Q5_1 = np.uint32(0)


class Layout(NamedTuple):
    bytes: int  # bytes per block
    m: int  # offset of the f16 minimum, 0 when the type has none
    qh: int  # offset of the fifth bits, 0 when the type has none
    qs: int  # offset of the 16 nibble bytes
    offset: int  # subtracted from every quant (Q5_0's 16)


_LAYOUTS = {8: Layout(20, 2, 0, 4, 0), 16: Layout(22, 0, 2, 6, 16), 32: Layout(24, 2, 4, 8, 0)}
_V4I8 = ir.VectorType(_I8, 4)
_V16I8 = ir.VectorType(_I8, 16)
_I64 = ir.IntType(64)


def _layout(fmt) -> Layout | None:
    if isinstance(fmt, types.Integer) and not fmt.signed:
        return _LAYOUTS.get(fmt.bitwidth)
    return None


def _is_off(off) -> bool:
    return isinstance(off, types.Integer)


def _at(context, builder, arrty, arr, offty, off, extra: int, elem: ir.Type):
    """Pointer to byte off + extra of a uint8 array, as `elem*`."""
    o = builder.add(context.cast(builder, off, offty, types.intp), ir.Constant(ir.IntType(64), extra))
    return _ptr(context, builder, arrty, arr, types.intp, o, elem)


def _consts(ty: ir.VectorType, values):
    return ir.Constant(ty, list(values))


def _fifth_bits(builder, qh8, order):
    """0x10 where bit `j` of the qh bytes is set, for the 32 (byte, bit) pairs of `order`, else 0.

    qh8: <8 x i8>, the qh bytes of one block (0..3) or of two (0..3, 4..7); order: 32 qh byte indices,
    each repeated for its 8 bits. One vpshufb brings each value's qh byte to its lane, then bit j % 8
    of it is tested (and, compare, and): ggml's bytes_from_bits_32.
    """
    v = builder.shuffle_vector(qh8, qh8, _consts(ir.VectorType(_I32, 32), order))
    sel = _consts(_V32I8, [1 << (j % 8) for j in range(32)])
    hit = builder.icmp_unsigned("!=", builder.and_(v, sel), ir.Constant(_V32I8, None))
    return builder.select(hit, ir.Constant(_V32I8, [0x10] * 32), ir.Constant(_V32I8, None))


def _nibbles(builder, v):
    """<32 x i8> bytes -> (low nibbles, high nibbles), each <32 x i8>."""
    lo = builder.and_(v, ir.Constant(_V32I8, [15] * 32))
    hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))  # x86 has no byte shift
    return lo, builder.and_(builder.bitcast(hi, _V32I8), ir.Constant(_V32I8, [15] * 32))


@intrinsic
def block_bytes(typingctx, fmt):
    """Bytes per block of format `fmt`, as a constant the kernel's address arithmetic folds."""
    lay = _layout(fmt)
    if lay is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_I64, lay.bytes)

    return types.intp(fmt), codegen


@intrinsic
def load_pair(typingctx, fmt, arr, off):
    """The quants (0..15 or 0..31) of the blocks at bytes off and off + bytes, in `load_q4_0_pair`'s layout:
    (low = [block 0 values 0..15 | block 1 values 0..15], high = the same for values 16..31)."""
    lay = _layout(fmt)
    if not (lay and _is_bytes(arr) and _is_off(off)):
        return None

    def codegen(context, builder, sig, args):
        _, a, o = args
        q0 = builder.load(_at(context, builder, arr, a, off, o, lay.qs, _V16I8), align=1)
        q1 = builder.load(_at(context, builder, arr, a, off, o, lay.bytes + lay.qs, _V16I8), align=1)
        lo, hi = _nibbles(builder, builder.shuffle_vector(q0, q1, _consts(ir.VectorType(_I32, 32), range(32))))
        if lay.qh:
            h0 = builder.load(_at(context, builder, arr, a, off, o, lay.qh, _V4I8), align=1)
            h1 = builder.load(_at(context, builder, arr, a, off, o, lay.bytes + lay.qh, _V4I8), align=1)
            qh8 = builder.shuffle_vector(h0, h1, _consts(ir.VectorType(_I32, 8), range(8)))
            # values 0..15 of each block: qh bytes 0, 1 (block 0) and 4, 5 (block 1); 16..31: 2, 3 and 6, 7
            lo = builder.or_(lo, _fifth_bits(builder, qh8, [b for b in (0, 1, 4, 5) for _ in range(8)]))
            hi = builder.or_(hi, _fifth_bits(builder, qh8, [b for b in (2, 3, 6, 7) for _ in range(8)]))
        return context.make_tuple(builder, sig.return_type, [lo, hi])

    return types.UniTuple(i8x32, 2)(fmt, arr, off), codegen


@intrinsic
def load_block(typingctx, fmt, arr, off):
    """The 32 quants of the block at byte `off`, in element order (a last odd block)."""
    lay = _layout(fmt)
    if not (lay and _is_bytes(arr) and _is_off(off)):
        return None

    def codegen(context, builder, sig, args):
        _, a, o = args
        v = builder.load(_at(context, builder, arr, a, off, o, lay.qs, _V16I8), align=1)
        lo = builder.and_(v, ir.Constant(_V16I8, [15] * 16))
        hi = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
        q = builder.shuffle_vector(lo, hi, _consts(ir.VectorType(_I32, 32), range(32)))
        if lay.qh:
            h = builder.load(_at(context, builder, arr, a, off, o, lay.qh, _V4I8), align=1)
            qh8 = builder.shuffle_vector(h, h, _consts(ir.VectorType(_I32, 8), range(8)))
            q = builder.or_(q, _fifth_bits(builder, qh8, [b for b in range(4) for _ in range(8)]))
        return q

    return i8x32(fmt, arr, off), codegen


def _hadd(builder, a, b):
    """vphaddd's lane order: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]."""
    even = builder.shuffle_vector(a, b, _consts(_V8I32, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, _consts(_V8I32, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.add(even, odd)


@intrinsic
def block_sums8(typingctx, p01, p23, p45, p67):
    """Exact integer dots of 8 blocks, lane k = block k, from pkl holding block k's partial sums in lanes
    0..3 and block l's in 4..7 (`dot2` of a `load_pair`)."""
    if not all(p == i32x8 for p in (p01, p23, p45, p67)):
        return None

    def codegen(context, builder, sig, args):
        g = _hadd(builder, _hadd(builder, args[0], args[1]), _hadd(builder, args[2], args[3]))  # 0 2 4 6 1 3 5 7
        return builder.shuffle_vector(g, g, _consts(_V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))

    return i32x8(p01, p23, p45, p67), codegen


def _halves8(context, builder, arrty, arr, offty, off, first: int, stride: int, variant: int):
    """The f16 fields at bytes off + first + k * stride for k < 8, as <8 x float>.

    Packed four per i64 in integer registers, then two vector inserts (see `intrinsics.scales8_f16`).
    """
    v = ir.Constant(ir.VectorType(_I64, 2), None)
    for half in range(2):
        word = None
        for lane in range(4):
            k = 4 * half + lane
            h = builder.load(_at(context, builder, arrty, arr, offty, off, first + k * stride, _I16), align=1)
            h = builder.shl(builder.zext(h, _I64), ir.Constant(_I64, 16 * lane))
            word = h if word is None else builder.or_(word, h)
        v = builder.insert_element(v, word, ir.Constant(_I32, half))
    return _half_to_float(builder, builder.bitcast(v, ir.VectorType(_I16, 8)), variant)


def _xs_type_ok(lay: Layout, xs) -> bool:
    """Q5_0 takes the activation blocks' integer sums (int32), Q4_1 / Q5_1 their d * sum (f32)."""
    return _is_flat(xs) and xs.dtype == (types.int32 if lay.offset else types.float32)


@intrinsic
def terms8(typingctx, fmt, marker, s, e, arr, off, xs, so):
    """The f32 terms of 8 blocks (block k from byte off + k * bytes, lane k), ggml's per-block arithmetic:

        Q5_0:        (d_w * d_x) * (s - 16 * xs)            xs = the activation block's integer sum
        Q4_1, Q5_1:  fma(d_w * d_x, s, m_w * xs)            xs = d_x * sum, f32

    s: the blocks' integer dots with the unsigned quants (`block_sums8`); e: d_w * d_x; xs[so : so + 8]:
    the 8 blocks' activation sums. The FMA is what compilers make of ggml's C expression
    `(d_w * d_x) * sumi + m_w * s_x` (fp-contract; libggml-cpu's x86-64 build has these bits).
    """
    lay = _layout(fmt)
    if not (
        lay
        and _is_marker(marker)
        and s == i32x8
        and e == f32x8
        and _is_bytes(arr)
        and _is_off(off)
        and _xs_type_ok(lay, xs)
        and _is_off(so)
    ):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, _, sv, ev, a, o, x, xo = args
        if lay.offset:
            sums = builder.load(_ptr(context, builder, xs, x, so, xo, _V8I32), align=4)
            sv = builder.sub(sv, builder.mul(sums, ir.Constant(_V8I32, [lay.offset] * 8)))
            return builder.fmul(builder.sitofp(sv, _V8F32), ev)
        m = _halves8(context, builder, arr, a, off, o, lay.m, lay.bytes, variant)
        xsv = builder.load(_ptr(context, builder, xs, x, so, xo, _V8F32), align=4)
        return _call(builder, "llvm.fma.v8f32", _V8F32, [ev, builder.sitofp(sv, _V8F32), builder.fmul(m, xsv)])

    return f32x8(fmt, marker, s, e, arr, off, xs, so), codegen


@intrinsic
def term1(typingctx, fmt, marker, s, e, arr, off, xs, so):
    """`terms8` for one block: s its integer dot (int64), e = d_w * d_x, the block at byte `off`, its
    activation sum xs[so]."""
    lay = _layout(fmt)
    if not (
        lay
        and _is_marker(marker)
        and isinstance(s, types.Integer)
        and isinstance(e, types.Float)
        and _is_bytes(arr)
        and _is_off(off)
        and _xs_type_ok(lay, xs)
        and _is_off(so)
    ):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, _, sv, ev, a, o, x, xo = args
        sv = context.cast(builder, sv, s, types.int64)
        ev = context.cast(builder, ev, e, types.float32)
        if lay.offset:
            sum_ = builder.sext(builder.load(_ptr(context, builder, xs, x, so, xo, _I32)), _I64)
            sv = builder.sub(sv, builder.mul(sum_, ir.Constant(_I64, lay.offset)))
            return builder.fmul(builder.sitofp(sv, _F32), ev)
        h = builder.load(_at(context, builder, arr, a, off, o, lay.m, _I16), align=1)
        m = _half_to_float(builder, h, variant)
        xsv = builder.load(_ptr(context, builder, xs, x, so, xo, _F32))
        return _call(builder, "llvm.fma.f32", _F32, [ev, builder.sitofp(sv, _F32), builder.fmul(m, xsv)])

    return types.float32(fmt, marker, s, e, arr, off, xs, so), codegen
