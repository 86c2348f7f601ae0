"""SIMD intrinsics of the Q4_Kx8 kernels (`q4kx8`): one super-block of 8 interleaved rows at a time.

A block of the layout (1152 bytes: 8 rows x 256 columns, see `q4kx8`):

    bytes    0..15    f16 d of rows 0..7            bytes 16..31  f16 dmin of rows 0..7
    bytes   32..127   byte i (< 12) of each row's packed scales at 32 + 8i + r
    bytes  128..1151  quants: chunk c (64 columns) x group k (< 8) holds bytes 32c + 4k .. + 3
                      of rows 0..7 (row r at 128 + 256c + 32k + 4r): low nibbles are columns
                      64c + 4k.., sub-block 2c; high nibbles columns 64c + 32 + 4k.., sub-block 2c + 1

Scales and mins arrive as int64 words holding one byte per row (unpacked from the 12 scale bytes by
`q4kx8._scales_mins`). One vpmaddubsw multiplies 4 quants of each row by a broadcast of the 4
matching activations; eight of them sum into 16-bit lanes (two per row: at most 8 * 2 * 15 * 128 =
30720, no overflow), and vpmaddwd against the row's scale, repeated in both 16-bit halves of its
lane, gives the row's scaled sub-block sum in one step. Same variant markers as `intrinsics`: int8
generic LLVM vector IR, int16/int32 the AVX2 code; integer results are exact in every variant.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    _I8,
    _I16,
    _I32,
    _V8F32,
    _V8I32,
    _V16I16,
    _V32I8,
    _call,
    _is_bytes,
    _is_flat,
    _ptr,
    _splat,
    f32x8,
    i32x8,
)
from .intrinsics_x8 import _is_marker, _variant

_I64 = ir.IntType(64)
_V8I8 = ir.VectorType(_I8, 8)
_V16I8 = ir.VectorType(_I8, 16)

BLOCK_BYTES = 1152  # one super-block of 8 rows
QS_OFFSET = 128  # quants start here in a block


def _maddubs(builder, variant: int, q, x):
    """<16 x i16>: pairwise sums of unsigned q (<= 15) times signed x, exact."""
    if variant:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [q, x])
    prod = builder.mul(builder.zext(q, ir.VectorType(_I16, 32)), builder.sext(x, ir.VectorType(_I16, 32)))
    even = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_I32, 16), list(range(0, 32, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_I32, 16), list(range(1, 32, 2))))
    return builder.add(even, odd)


def _maddwd(builder, variant: int, a, b):
    """<8 x i32>: a[2i] * b[2i] + a[2i + 1] * b[2i + 1] for <16 x i16> a, b (exact here)."""
    if variant:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [a, b])
    v16 = ir.VectorType(_I32, 16)
    prod = builder.mul(builder.sext(a, v16), builder.sext(b, v16))
    even = builder.shuffle_vector(prod, prod, ir.Constant(_V8I32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(_V8I32, list(range(1, 16, 2))))
    return builder.add(even, odd)


def _row_scales(builder, word):
    """int64 of 8 row bytes -> <16 x i16> with row r's byte in lanes 2r and 2r + 1."""
    v = builder.zext(builder.bitcast(word, _V8I8), _V8I32)
    v = builder.or_(v, builder.shl(v, ir.Constant(_V8I32, [16] * 8)))
    return builder.bitcast(v, _V16I16)


def _chunk_dots(context, builder, variant, warr, w, wo, xarr, x, xos, sc_lo, sc_hi):
    """For each activation offset in `xos`: <8 x i32>, lane r = sc_lo[r] * dot(low nibbles of row r,
    x[xo : xo + 32]) + sc_hi[r] * dot(high nibbles, x[xo + 32 : xo + 64]), over the chunk whose
    quants start at flat offset `wo` (8 groups of 32 bytes). Low nibbles first, then high (the
    32-byte loads repeat from L1), so 4 tokens' 16-bit sums fit in registers."""
    mask = ir.Constant(_V32I8, [15] * 32)
    out = []
    sums = {}
    for half in (0, 1):
        acc = [None] * len(xos)
        for k in range(8):
            wo_k = builder.add(wo, ir.Constant(wo.type, 32 * k))
            v = builder.load(_ptr(context, builder, warr, w, types.intp, wo_k, _V32I8), align=1)
            if half:  # no byte shift on x86: shift 16-bit lanes, then mask
                v = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16)), _V32I8)
            q = builder.and_(v, mask)
            for t, xo in enumerate(xos):
                o = builder.add(xo, ir.Constant(xo.type, 32 * half + 4 * k))
                x4 = builder.load(_ptr(context, builder, xarr, x, types.intp, o, _I32), align=1)
                xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd
                p = _maddubs(builder, variant, q, xb)
                acc[t] = p if acc[t] is None else builder.add(acc[t], p)
        scale = _row_scales(builder, sc_hi if half else sc_lo)
        sums[half] = [_maddwd(builder, variant, a, scale) for a in acc]
    for t in range(len(xos)):
        out.append(builder.add(sums[0][t], sums[1][t]))
    return out


def _args_ok(marker, w, wo, x, xo, sc_lo, sc_hi) -> bool:
    ints = all(isinstance(a, types.Integer) for a in (wo, xo, sc_lo, sc_hi))
    return _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and ints


@intrinsic
def dot_k8(typingctx, marker, w, wo, x, xo, sc_lo, sc_hi):
    """Row sums (i32x8) of one 64-column chunk (quants at w[wo : wo + 256]) times the int8
    activations x[xo : xo + 64], each half weighted by its sub-block scale (int64 of row bytes)."""
    if not _args_ok(marker, w, wo, x, xo, sc_lo, sc_hi):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, w_v, wo_v, x_v, xo_v, lo, hi = args
        wo_v = context.cast(builder, wo_v, sig.args[2], types.intp)
        xo_v = context.cast(builder, xo_v, sig.args[4], types.intp)
        lo = context.cast(builder, lo, sig.args[5], types.int64)
        hi = context.cast(builder, hi, sig.args[6], types.int64)
        return _chunk_dots(context, builder, variant, sig.args[1], w_v, wo_v, sig.args[3], x_v, [xo_v], lo, hi)[0]

    return i32x8(marker, w, wo, x, xo, sc_lo, sc_hi), codegen


@intrinsic
def dot_k8_4(typingctx, marker, w, wo, x, xo, stride, sc_lo, sc_hi):
    """`dot_k8` for 4 tokens, activations at xo + k * stride (k < 4), sharing the quant loads."""
    if not (_args_ok(marker, w, wo, x, xo, sc_lo, sc_hi) and isinstance(stride, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        _, w_v, wo_v, x_v, xo_v, st, lo, hi = args
        wo_v = context.cast(builder, wo_v, sig.args[2], types.intp)
        xo_v = context.cast(builder, xo_v, sig.args[4], types.intp)
        st = context.cast(builder, st, sig.args[5], types.intp)
        lo = context.cast(builder, lo, sig.args[6], types.int64)
        hi = context.cast(builder, hi, sig.args[7], types.int64)
        xos = [xo_v]
        for _ in range(3):
            xos.append(builder.add(xos[-1], st))
        dots = _chunk_dots(context, builder, variant, sig.args[1], w_v, wo_v, sig.args[3], x_v, xos, lo, hi)
        return context.make_tuple(builder, sig.return_type, dots)

    return types.UniTuple(i32x8, 4)(marker, w, wo, x, xo, stride, sc_lo, sc_hi), codegen


@intrinsic
def mins_k8(typingctx, marker, m0, m1, m2, m3, m4, m5, m6, m7, xm, off):
    """<8 x i32>, lane r = sum_j m_j[r] * bsum_j: the mins (int64 words of row bytes) of the 8
    sub-blocks times their activation sums, packed as 16-bit pairs (bsum_2p, bsum_2p+1) in the
    int32 xm[off + p], p < 4."""
    ms = (m0, m1, m2, m3, m4, m5, m6, m7)
    if not (_is_marker(marker) and all(isinstance(m, types.Integer) for m in ms)):
        return None
    if not (_is_flat(xm) and xm.dtype == types.int32 and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        words = [context.cast(builder, a, t, types.int64) for a, t in zip(args[1:9], sig.args[1:9])]
        off_v = context.cast(builder, args[10], sig.args[10], types.intp)
        total = None
        for p in range(4):
            a = builder.bitcast(words[2 * p], _V8I8)
            b = builder.bitcast(words[2 * p + 1], _V8I8)
            order = [i // 2 + 8 * (i % 2) for i in range(16)]  # a0 b0 a1 b1 ...
            inter = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16), order))
            mins16 = builder.zext(inter, _V16I16)  # lane 2r: m_2p of row r, lane 2r + 1: m_2p+1
            o = builder.add(off_v, ir.Constant(off_v.type, p))
            pair = builder.load(_ptr(context, builder, sig.args[9], args[9], types.intp, o, _I32), align=4)
            bs = builder.bitcast(_splat(builder, pair, _V8I32), _V16I16)
            d = _maddwd(builder, variant, mins16, bs)
            total = d if total is None else builder.add(total, d)
        return total

    return i32x8(marker, m0, m1, m2, m3, m4, m5, m6, m7, xm, off), codegen


@intrinsic
def fma_k8(typingctx, acc, isum, msum, dw, dm, xd):
    """`acc + float(isum) * (dw * xd) - float(msum) * (dm * xd)` lane-wise, as two FMAs (xd a scalar)."""
    if not (acc == f32x8 and isum == i32x8 and msum == i32x8 and dw == f32x8 and dm == f32x8):
        return None
    if not isinstance(xd, types.Float):
        return None

    def codegen(context, builder, sig, args):
        acc_v, i_v, m_v, dw_v, dm_v, d = args
        d = _splat(builder, context.cast(builder, d, sig.args[5], types.float32), _V8F32)
        a = _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(i_v, _V8F32), builder.fmul(dw_v, d), acc_v])
        neg = builder.fneg(builder.sitofp(m_v, _V8F32))
        return _call(builder, "llvm.fma.v8f32", _V8F32, [neg, builder.fmul(dm_v, d), a])

    return f32x8(acc, isum, msum, dw, dm, xd), codegen


@intrinsic
def load_i64(typingctx, arr, off):
    """8 bytes of a uint8 array from flat element `off`, little-endian, as an int64."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I64), align=1)

    return types.int64(arr, off), codegen

