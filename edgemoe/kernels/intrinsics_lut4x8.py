"""SIMD intrinsics of the IQ4_NLx8 / MXFP4x8 kernels (`lut4x8`): 4-bit codes looked up in a table of 16
signed int8 levels, 8 interleaved rows per block.

A block of the x8 layout holds 32 columns of 8 rows (see `lut4x8`):

    bytes  0 .. 8s          the 8 rows' scales, s bytes each (IQ4_NL: f16 d, s = 2; MXFP4: E8M0 e, s = 1)
    bytes 8s .. 8s + 128    4 chunks of 32 bytes; chunk j holds bytes 4j..4j+3 of rows 0..7 (row r at
                            8s + 32j + 4r): low nibbles are codes of elements 4j.., high ones 16 + 4j..

One vpshufb turns 32 codes into their signed levels (IQ4_NL's kvalues_iq4nl in [-127, 113], MXFP4's
kvalues_mxfp4 = E2M1 doubled, in [-12, 12]). vpmaddubsw wants an unsigned first operand, so it takes
|w| (vpabsb, once per weight vector) and the broadcast activations with w's sign (vpsignb, per token),
as ggml's mul_add_epi8 (the activations are in [-127, 127], as q8act makes them: vpsignb would leave
-128 negated as -128); the pairs of 4 products per row then land in row lanes (vpmaddwd with ones).
i16 overflow: a vpmaddubsw lane is at most 2 * 127 * 128 = 32512 for IQ4_NL, so each one goes to i32
at once; MXFP4's is at most 2 * 12 * 128 = 3072, so a block's 8 are added in i16 (<= 24576) and widened
once.

The format marker's Numba type picks the table and layout at compile time (unsigned, so never taken
for a variant marker): uint16 for IQ4_NL (16-bit scales), uint8 for MXFP4 (8-bit scales). Variant
markers are those of `intrinsics`: int8 generic LLVM vector IR (exact widened products, a select tree
for the lookup), int16 AVX2, int32 (VNNI CPUs) takes the AVX2 code. Every variant computes the same
integers and the same f32 operations.

Numba's on-disk cache keys each kernel on its own file only: after editing this module, delete
`edgemoe/kernels/__pycache__/lut4x8*.nb[ic]`, or stale kernels are loaded.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _I32, _V8F32, _V8I32, _V16I16, _V32I8, _call, _is_bytes, _ptr, _splat, f32x8, i32x8
from .intrinsics_fp4 import KVALUES as KVALUES_MXFP4
from .intrinsics_fp4 import _e8m0_half_bits
from .intrinsics_iq4 import KVALUES as KVALUES_IQ4NL
from .intrinsics_x8 import _after, _half_to_float8, _is_marker, _lane_sums, _variant

# Format markers: only the Numba type matters (its bit width is the width of the type's scale).
FMT_IQ4_NL = np.uint16(0)
FMT_MXFP4 = np.uint8(0)


class Layout(NamedTuple):
    plain: int  # bytes per plain block (one row, 32 values)
    scale: int  # bytes per scale (the x8 block starts with 8 of them; the quants follow)
    table: tuple  # the 16 signed levels
    i16: bool  # whether a block's 8 vpmaddubsw results add up in i16: 16 * max|level| * 128 < 2**15


_LAYOUTS = {16: Layout(18, 2, KVALUES_IQ4NL, False), 8: Layout(17, 1, KVALUES_MXFP4, True)}


def _layout(fmt) -> Layout | None:
    if isinstance(fmt, types.Integer) and not fmt.signed:
        return _LAYOUTS.get(fmt.bitwidth)
    return None


def _is_int(*vals) -> bool:
    return all(isinstance(v, types.Integer) for v in vals)


@intrinsic
def lut4_sizes(typingctx, fmt):
    """(plain block bytes, scale bytes) of format `fmt`, as constants the address arithmetic folds."""
    lay = _layout(fmt)
    if lay is None:
        return None
    sig = types.UniTuple(types.intp, 2)(fmt)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        return context.make_tuple(builder, sig.return_type, [ir.Constant(i64, lay.plain), ir.Constant(i64, lay.scale)])

    return sig, codegen


@intrinsic
def copy_lut4(typingctx, fmt, n, dst, doff, src, soff):
    """Copy `n` bytes (4: a quant group; 0: one scale of format `fmt`) from byte `soff` of `src` to byte
    `doff` of `dst` (flat offsets, unaligned, no bounds checks): the repack's moves, one load and store."""
    lay = _layout(fmt)
    if not (lay and isinstance(n, types.IntegerLiteral) and _is_bytes(dst) and _is_bytes(src) and _is_int(doff, soff)):
        return None
    elem = ir.IntType(8 * (n.literal_value or lay.scale))

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[4], args[4], sig.args[5], args[5], elem), align=1)
        builder.store(v, _ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3], elem), align=1)
        return context.get_dummy_value()

    return types.void(fmt, n, dst, doff, src, soff), codegen


def _lookup(builder, variant: int, table, codes):
    """table[codes] for <32 x i8> codes 0..15 (signed int8 levels)."""
    if variant:  # vpshufb: the 16-entry table in both 128-bit halves
        return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [ir.Constant(_V32I8, list(table) * 2), codes])
    # Portable: a tree of selects on the code's bits, low bit first (15 blends of constants).
    level = [ir.Constant(_V32I8, [v] * 32) for v in table]
    for bit in range(4):
        on = builder.icmp_unsigned("!=", builder.and_(codes, ir.Constant(_V32I8, [1 << bit] * 32)), ir.Constant(_V32I8, None))
        level = [builder.select(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _block_dots(context, builder, lay: Layout, variant: int, warr, w, bo, xarr, x, xos):
    """For each activation offset in `xos`: <8 x i32>, lane r = the exact dot of row r's 32 levels with
    x[xo : xo + 32], for the x8 block at flat byte offset `bo` of `w`. Chunk by chunk, so only one
    chunk's levels and one sum per token are live.

    With several tokens on x86, each chunk's address goes through `_after` the previous chunk's sums:
    left alone, LLVM hoists all four chunks' loads and lookups and then spills ~50 ymm values per block
    (4 tokens: 12-15% slower).
    """
    sums = [None] * len(xos)
    ones = ir.Constant(_V16I16, [1] * 16)
    zero = ir.Constant(_V32I8, None)
    nib = ir.Constant(_V32I8, [15] * 32)
    for j in range(4):
        o = builder.add(bo, ir.Constant(bo.type, 8 * lay.scale + 32 * j))
        if variant and j and len(xos) > 1:
            o = _after(builder, o, sums)
        v = builder.load(_ptr(context, builder, warr, w, types.intp, o, _V32I8), align=1)
        hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))  # no byte shift on x86
        for codes, col in ((builder.and_(v, nib), 4 * j), (builder.and_(builder.bitcast(hi, _V32I8), nib), 16 + 4 * j)):
            q = _lookup(builder, variant, lay.table, codes)  # (32,) signed levels: 4 per row
            if variant:
                absq = builder.select(builder.icmp_signed("<", q, zero), builder.sub(zero, q), q)  # vpabsb
            for k, xo in enumerate(xos):
                xc = builder.add(xo, ir.Constant(xo.type, col))
                x4 = builder.load(_ptr(context, builder, xarr, x, types.intp, xc, _I32), align=1)
                xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd: 4 activations
                if variant:
                    sx = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [xb, q])
                    p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [absq, sx])
                    if not lay.i16:
                        p = _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [p, ones])
                else:  # exact: products widened to i32
                    v32 = ir.VectorType(_I32, 32)
                    p = _lane_sums(builder, builder.mul(builder.sext(q, v32), builder.sext(xb, v32)))
                sums[k] = p if sums[k] is None else builder.add(sums[k], p)
    if variant and lay.i16:
        sums = [_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [s, ones]) for s in sums]
    return sums


def _dots_ok(fmt, marker, w, bo, x, xo) -> bool:
    return _layout(fmt) is not None and _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and _is_int(bo, xo)


@intrinsic
def dot_lut4x8(typingctx, fmt, marker, w, bo, x, xo):
    """Row sums (i32x8) of the x8 block at byte `bo` of w (format `fmt`) times x[xo : xo + 32]."""
    if not _dots_ok(fmt, marker, w, bo, x, xo):
        return None
    lay, variant = _layout(fmt), _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v = context.cast(builder, args[3], sig.args[3], types.intp)
        xo_v = context.cast(builder, args[5], sig.args[5], types.intp)
        return _block_dots(context, builder, lay, variant, sig.args[2], args[2], bo_v, sig.args[4], args[4], [xo_v])[0]

    return i32x8(fmt, marker, w, bo, x, xo), codegen


@intrinsic
def dot_lut4x8_4(typingctx, fmt, marker, w, bo, x, xo, stride):
    """`dot_lut4x8` for 4 tokens, activations at xo + k * stride (k < 4), sharing the loads and lookups."""
    if not (_dots_ok(fmt, marker, w, bo, x, xo) and _is_int(stride)):
        return None
    lay, variant = _layout(fmt), _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v = context.cast(builder, args[3], sig.args[3], types.intp)
        xos = [context.cast(builder, args[5], sig.args[5], types.intp)]
        st = context.cast(builder, args[6], sig.args[6], types.intp)
        for _ in range(3):
            xos.append(builder.add(xos[-1], st))
        dots = _block_dots(context, builder, lay, variant, sig.args[2], args[2], bo_v, sig.args[4], args[4], xos)
        return context.make_tuple(builder, sig.return_type, dots)

    return types.UniTuple(i32x8, 4)(fmt, marker, w, bo, x, xo, stride), codegen


@intrinsic
def scales_lut4x8(typingctx, fmt, marker, w, bo):
    """The 8 row scales of the x8 block at byte `bo` as f32x8: IQ4_NL's f16 d (one vcvtph2ps), MXFP4's
    e8m0_to_fp32_half(e) = 2**(e - 128) (exact; e 0 and 1 give subnormals)."""
    lay = _layout(fmt)
    if not (lay is not None and _is_marker(marker) and _is_bytes(w) and _is_int(bo)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        elem = ir.VectorType(ir.IntType(8 * lay.scale), 8)
        raw = builder.load(_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3], elem), align=1)
        if lay.scale == 2:
            return _half_to_float8(builder, raw, variant)
        e = builder.zext(raw, _V8I32)
        return builder.bitcast(_e8m0_half_bits(builder, e, _V8I32), _V8F32)

    return f32x8(fmt, marker, w, bo), codegen

