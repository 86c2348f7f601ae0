"""SIMD intrinsics of the IQ4_XSx8 kernels (`iq4xsx8`): one 256-column super-block of 8 interleaved rows.

A block of the layout (1088 bytes, the 8 rows' plain 136-byte super-blocks, see `iq4xsx8`):

    bytes    0 ..   16   f16 d of rows 0..7 (row r at 2r)
    bytes   16 ..   48   scales_l: byte i (< 4) of row r at 16 + 8i + r; nibble j % 2 of byte j / 2 = ls_j & 15
    bytes   48 ..   64   scales_h: byte h (< 2) of row r at 48 + 8h + r; bits 2(j % 4) of byte j / 4 = ls_j >> 4
    bytes   64 .. 1088   quants: sub-block j (< 8), group k (< 4) at 64 + 128j + 32k holds qs bytes 16j + 4k ..
                         + 3 of rows 0..7 (row r at + 4r): low nibbles are codes of columns 32j + 4k .., high
                         nibbles of columns 32j + 16 + 4k ..

For sub-block j the 8 rows' ls_j sit in one int64 word (a byte per row), from two 8-byte loads, shifts and
masks; (ls_j - 32) goes to both i16 halves of row r's lane. Per 32-byte group: one vpshufb per nibble half
looks the codes up in kvalues_iq4nl (signed, |level| <= 127), vpabsb once, then per token vpbroadcastd of the
4 matching activations, vpsignb, vpmaddubsw (pairs <= 2 * 127 * 127: no saturation) and vpmaddwd against the
scales, which puts (ls_j - 32) * (4 products) of row r in lane r: the scaling costs no instruction. Every i32
partial sum of a super-block is bounded by 32 * 256 * 127 * 127 < 2**31: the row sums are exact.

Variant markers as `intrinsics_x8`: int8 generic LLVM vector IR (select-tree lookup, products widened to
i32), int16 AVX2, int32 (VNNI CPUs) takes the AVX2 code. Every variant computes the same integers.

Numba's on-disk cache keys each kernel on its own file only: after editing this module, delete
`edgemoe/kernels/__pycache__/iq4xsx8*.nb[ic]`, or stale kernels are loaded.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _I8, _I32, _V8I32, _V16I16, _V32I8, _call, _is_bytes, _ptr, _splat, i32x8
from .intrinsics_iq4 import KVALUES
from .intrinsics_x8 import _after, _is_marker, _lane_sums, _variant, prefetch_span

_I64 = ir.IntType(64)
_V8I8 = ir.VectorType(_I8, 8)

BLOCK_BYTES = 1088  # one super-block of 8 rows: 8 x 136
SCALES_L = 16  # scales_l bytes of the 8 rows start here in a block
SCALES_H = 48  # scales_h bytes
QS_OFFSET = 64  # quants


def _lookup(builder, variant: int, codes):
    """kvalues_iq4nl[codes] for <32 x i8> codes 0..15 (signed int8 levels)."""
    if variant:  # vpshufb: the 16-entry table in both 128-bit halves
        return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [ir.Constant(_V32I8, list(KVALUES) * 2), codes])
    level = [ir.Constant(_V32I8, [v] * 32) for v in KVALUES]  # portable: a tree of selects, low bit first
    for bit in range(4):
        on = builder.icmp_unsigned("!=", builder.and_(codes, ir.Constant(_V32I8, [1 << bit] * 32)), ir.Constant(_V32I8, None))
        level = [builder.select(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _load(context, builder, arrty, arr, base, k: int, elem):
    o = builder.add(base, ir.Constant(base.type, k))
    return builder.load(_ptr(context, builder, arrty, arr, types.intp, o, elem), align=1)


def _scales(context, builder, variant: int, warr, w, bo, j: int):
    """Sub-block j's (ls - 32) of the 8 rows of the block at byte `bo`: AVX2 <16 x i16> (row r in lanes 2r,
    2r + 1, vpmaddwd's operand), generic <8 x i32> (row r in lane r)."""
    lo = _load(context, builder, warr, w, bo, SCALES_L + 8 * (j // 2), _I64)
    hi = _load(context, builder, warr, w, bo, SCALES_H + 8 * (j // 4), _I64)
    lo = builder.and_(builder.lshr(lo, ir.Constant(_I64, 4 * (j % 2))), ir.Constant(_I64, 0x0F0F0F0F0F0F0F0F))
    hi = builder.and_(builder.lshr(hi, ir.Constant(_I64, 2 * (j % 4))), ir.Constant(_I64, 0x0303030303030303))
    ls = builder.bitcast(builder.or_(lo, builder.shl(hi, ir.Constant(_I64, 4))), _V8I8)  # byte r: ls of row r
    if variant:
        pairs = builder.shuffle_vector(ls, ls, ir.Constant(ir.VectorType(_I32, 16), [i // 2 for i in range(16)]))
        return builder.sub(builder.zext(pairs, _V16I16), ir.Constant(_V16I16, [32] * 16))
    return builder.sub(builder.zext(ls, _V8I32), ir.Constant(_V8I32, [32] * 8))


def _block_sums(context, builder, variant: int, warr, w, bo, xarr, x, xos):
    """For each activation offset in `xos`: <8 x i32>, lane r = isum of row r = sum_j (ls_j - 32) * (row r's
    levels of sub-block j . x[xo + 32j : xo + 32j + 32]) over the block at byte `bo` of `w`, exact. Group by
    group, so only one group's levels and one sum per token are live.

    On x86 each group's address goes through `_after` the previous group's sums: left alone, LLVM's
    scheduler runs token after token over the whole block and keeps every group's levels on the stack
    (128 ymm stores and 384 reloads per block for 4 tokens)."""
    sums = [None] * len(xos)
    zero = ir.Constant(_V32I8, None)
    nib = ir.Constant(_V32I8, [15] * 32)
    for j in range(8):
        sc = _scales(context, builder, variant, warr, w, bo, j)
        for k in range(4):
            base = _after(builder, bo, sums) if variant and sums[0] is not None else bo
            v = _load(context, builder, warr, w, base, QS_OFFSET + 128 * j + 32 * k, _V32I8)
            hi = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16)), _V32I8)
            for codes, col in ((builder.and_(v, nib), 32 * j + 4 * k), (builder.and_(hi, nib), 32 * j + 16 + 4 * k)):
                q = _lookup(builder, variant, codes)  # (32,) signed levels: 4 per row
                if variant:
                    absq = builder.select(builder.icmp_signed("<", q, zero), builder.sub(zero, q), q)  # vpabsb
                for t, xo in enumerate(xos):
                    x4 = _load(context, builder, xarr, x, xo, col, _I32)
                    xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd: 4 activations
                    if variant:
                        sx = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [xb, q])
                        p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [absq, sx])
                        p = _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [p16, sc])
                    else:  # exact: products widened to i32, then scaled
                        v32 = ir.VectorType(_I32, 32)
                        p = builder.mul(_lane_sums(builder, builder.mul(builder.sext(q, v32), builder.sext(xb, v32))), sc)
                    sums[t] = p if sums[t] is None else builder.add(sums[t], p)
    return sums


def _ok(marker, w, bo, x, xo) -> bool:
    ints = isinstance(bo, types.Integer) and isinstance(xo, types.Integer)
    return _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and ints


@intrinsic
def sums_iq4x8(typingctx, marker, w, bo, x, xo):
    """Row isums (i32x8) of the IQ4_XSx8 block at byte `bo` of w times the int8 activations x[xo : xo + 256]."""
    if not _ok(marker, w, bo, x, xo):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v = context.cast(builder, args[2], sig.args[2], types.intp)
        xo_v = context.cast(builder, args[4], sig.args[4], types.intp)
        return _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], [xo_v])[0]

    return i32x8(marker, w, bo, x, xo), codegen


@intrinsic
def sums_iq4x8_4(typingctx, marker, w, bo, x, xo, stride):
    """`sums_iq4x8` for 4 tokens, activations at xo + k * stride (k < 4), sharing the loads, lookups and scales."""
    if not (_ok(marker, w, bo, x, xo) and isinstance(stride, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v = context.cast(builder, args[2], sig.args[2], types.intp)
        xos = [context.cast(builder, args[4], sig.args[4], types.intp)]
        st = context.cast(builder, args[5], sig.args[5], types.intp)
        for _ in range(3):
            xos.append(builder.add(xos[-1], st))
        sums = _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], xos)
        return context.make_tuple(builder, sig.return_type, sums)

    return types.UniTuple(i32x8, 4)(marker, w, bo, x, xo, stride), codegen


prefetch_iq4x8 = prefetch_span(BLOCK_BYTES)  # one prefetch per 64 bytes of a block

