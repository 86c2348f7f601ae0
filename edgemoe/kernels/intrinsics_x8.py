"""SIMD intrinsics of the Q4_0x8 kernels (`q4x8`): one block of 8 interleaved rows at a time.

A block of the x8 layout (144 bytes: 8 rows x 32 columns, see `q4x8`):

    bytes   0..15   f16 scales of rows 0..7
    bytes  16..143  quants in 4 chunks of 32 bytes; chunk j holds bytes 4j..4j+3 of rows 0..7
                    (row r at 16 + 32j + 4r): low nibbles are elements 4j.., high ones 16 + 4j..

With that order one vpmaddubsw multiplies 4 weights of each of the 8 rows by a broadcast of the
4 matching activations, and the 16-bit sums of a block's 8 products add straight into row lanes:
one vpmaddwd gives the 8 row sums, with no horizontal reduction.

Same variant markers as `intrinsics` (only the marker's Numba type matters): int8 generic LLVM
vector IR, int16 AVX2 (+FMA, F16C), int32 (VNNI CPUs) takes the AVX2 code. Integer results are
exact in every variant and the float operations are the same, so all variants agree bit for bit
on machines with FMA.

Numba's on-disk cache keys each kernel on its own file only: after editing this module, delete
`edgemoe/kernels/__pycache__/q4x8*.nb[ic]` (or touch q4x8.py), or stale kernels are loaded.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (  # shared LLVM types and helpers
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
    _is_bytes,
    _is_flat,
    _ptr,
    _splat,
    f32x8,
    i32x8,
)

_V8I16 = ir.VectorType(_I16, 8)

BLOCK_BYTES = 144  # bytes per block of 8 rows: 8 f16 scales + 8 x 16 quant bytes


def _variant(marker) -> int:
    """0 generic, 1 avx2 (also for the VNNI marker), from the marker's Numba type."""
    return 0 if marker.bitwidth == 8 else 1


def _is_marker(marker) -> bool:
    return isinstance(marker, types.Integer) and marker.signed and marker.bitwidth in (8, 16, 32)


def _half_to_float8(builder, h, variant: int):
    """<8 x i16> half bits -> <8 x float> (as `intrinsics._half_to_float`)."""
    if variant:  # fpext lowers to vcvtph2ps with F16C
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 8)), _V8F32)

    def k(t, value):
        return ir.Constant(ir.VectorType(t, 8), [value] * 8)

    # Portable: shift exponent+mantissa into f32 position and rescale by 2^112 (handles
    # subnormals); inf/nan keep an all-ones exponent.
    w = builder.zext(h, _V8I32)
    em = builder.and_(w, k(_I32, 0x7FFF))
    sign = builder.shl(builder.and_(w, k(_I32, 0x8000)), k(_I32, 16))
    scaled = builder.fmul(builder.bitcast(builder.shl(em, k(_I32, 13)), _V8F32), k(_F32, 2.0**112))
    special = builder.or_(k(_I32, 0x7F800000), builder.shl(builder.and_(em, k(_I32, 0x3FF)), k(_I32, 13)))
    is_special = builder.icmp_unsigned(">=", em, k(_I32, 0x7C00))
    bits = builder.select(is_special, special, builder.bitcast(scaled, _V8I32))
    return builder.bitcast(builder.or_(bits, sign), _V8F32)


def _lane_sums(builder, prod):
    """<32 x i32> -> <8 x i32>: lane r = elements 4r .. 4r + 3 summed."""
    v16 = ir.VectorType(_I32, 16)
    pairs = builder.add(builder.shuffle_vector(prod, prod, ir.Constant(v16, list(range(0, 32, 2)))),
                        builder.shuffle_vector(prod, prod, ir.Constant(v16, list(range(1, 32, 2)))))
    return builder.add(builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(0, 16, 2)))),
                       builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(1, 16, 2)))))


def _after(builder, value, deps):
    """`value` (an integer) through an empty inline asm (no instruction) that also takes `deps` (vectors):
    what is computed from it cannot be scheduled before them."""
    fn = ir.FunctionType(value.type, [value.type] + [d.type for d in deps])
    return builder.call(ir.InlineAsm(fn, "", "=r,0" + ",x" * len(deps)), [value] + deps)


def _block_dots(context, builder, variant: int, warr, w, wo, xarr, x, xos):
    """For each activation offset in `xos`: <8 x i32>, lane r = sum_i nibble_i(row r) * x[xo + i]
    over the 32 columns of the block whose quants start at flat offset `wo` of `w`.

    Chunk by chunk, so only one chunk's nibbles and one 16-bit sum per token are live. The
    16-bit sums cannot overflow: 8 products of at most 15 * 128 per lane.
    """
    n = len(xos)
    sums = [None] * n
    ones = ir.Constant(_V16I16, [1] * 16)
    for j in range(4):
        wo_j = builder.add(wo, ir.Constant(wo.type, 32 * j))
        v = builder.load(_ptr(context, builder, warr, w, types.intp, wo_j, _V32I8), align=1)
        lo = builder.and_(v, ir.Constant(_V32I8, [15] * 32))
        hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))  # no byte shift on x86
        hi = builder.and_(builder.bitcast(hi, _V32I8), ir.Constant(_V32I8, [15] * 32))
        for k, xo in enumerate(xos):
            for q, col in ((lo, 4 * j), (hi, 16 + 4 * j)):
                o = builder.add(xo, ir.Constant(xo.type, col))
                x4 = builder.load(_ptr(context, builder, xarr, x, types.intp, o, _I32), align=1)
                xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd
                if variant:
                    p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [q, xb])
                else:  # exact: |q * x| <= 15 * 128; a lane's 8 products sum to <= 15360
                    p = builder.mul(builder.zext(q, _V32I16), builder.sext(xb, _V32I16))
                sums[k] = p if sums[k] is None else builder.add(sums[k], p)
    out = []
    for s in sums:
        if variant:
            out.append(_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [s, ones]))
            continue
        wide = builder.sext(s, ir.VectorType(_I32, 32))
        v16 = ir.VectorType(_I32, 16)
        even = builder.shuffle_vector(wide, wide, ir.Constant(v16, list(range(0, 32, 2))))
        odd = builder.shuffle_vector(wide, wide, ir.Constant(v16, list(range(1, 32, 2))))
        pairs = builder.add(even, odd)
        even = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(1, 16, 2))))
        out.append(builder.add(even, odd))
    return out


def _dots_ok(marker, w, wo, x, xo) -> bool:
    ints = isinstance(wo, types.Integer) and isinstance(xo, types.Integer)
    return _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and ints


def _dot_intrinsics(block_dots, what: str):
    """(one-token, four-token) intrinsics over `block_dots(context, builder, variant, warr, w, wo, xarr, x,
    xos)`, which returns one <8 x i32> of row sums per activation offset in `xos`."""

    def dot(typingctx, marker, w, wo, x, xo):
        if not _dots_ok(marker, w, wo, x, xo):
            return None
        variant = _variant(marker)

        def codegen(context, builder, sig, args):
            _, w_v, wo_v, x_v, xo_v = args
            wo_v = context.cast(builder, wo_v, sig.args[2], types.intp)
            xo_v = context.cast(builder, xo_v, sig.args[4], types.intp)
            return block_dots(context, builder, variant, sig.args[1], w_v, wo_v, sig.args[3], x_v, [xo_v])[0]

        return i32x8(marker, w, wo, x, xo), codegen

    def dot_4(typingctx, marker, w, wo, x, xo, stride):
        if not (_dots_ok(marker, w, wo, x, xo) and isinstance(stride, types.Integer)):
            return None
        variant = _variant(marker)

        def codegen(context, builder, sig, args):
            _, w_v, wo_v, x_v, xo_v, st = args
            wo_v = context.cast(builder, wo_v, sig.args[2], types.intp)
            xo_v = context.cast(builder, xo_v, sig.args[4], types.intp)
            st = context.cast(builder, st, sig.args[5], types.intp)
            xos = [xo_v]
            for _ in range(3):
                xos.append(builder.add(xos[-1], st))
            dots = block_dots(context, builder, variant, sig.args[1], w_v, wo_v, sig.args[3], x_v, xos)
            return context.make_tuple(builder, sig.return_type, dots)

        return types.UniTuple(i32x8, 4)(marker, w, wo, x, xo, stride), codegen

    dot.__doc__ = f"Row sums (i32x8) of {what}."
    dot_4.__doc__ = "The same for 4 tokens, activations at xo + k * stride (k < 4), sharing the weight loads."
    return intrinsic(dot), intrinsic(dot_4)


dot_x8, dot_x8_4 = _dot_intrinsics(_block_dots, "a Q4_0x8 block's nibbles (w[wo : wo + 128]) times x[xo : xo + 32]")


@intrinsic
def scales_x8(typingctx, marker, w, off):
    """The 8 f16 row scales at bytes w[off : off + 16] as f32x8 (one vcvtph2ps)."""
    if not (_is_marker(marker) and _is_bytes(w) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[1], args[1], sig.args[2], args[2], _V8I16), align=1)
        return _half_to_float8(builder, h, variant)

    return f32x8(marker, w, off), codegen


@intrinsic
def fma_x8(typingctx, acc, isum, xc, dw, xd):
    """`acc + float(isum - xc) * (dw * xd)` lane-wise; xc (int32) and xd (f32) scalars.

    With xc = 8 * the sum of the block's int8 activations, isum - xc is the exact integer dot of
    the signed weights (nibble - 8) with them; one rounding per block (the product), as ggml.
    """
    ok = acc == f32x8 and isum == i32x8 and dw == f32x8
    if not (ok and xc == types.int32 and isinstance(xd, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        acc_v, isum_v, c, dw_v, d = args
        d = _splat(builder, context.cast(builder, d, sig.args[4], types.float32), _V8F32)
        e = builder.fmul(dw_v, d)
        v = builder.sitofp(builder.sub(isum_v, _splat(builder, c, _V8I32)), _V8F32)
        return _call(builder, "llvm.fma.v8f32", _V8F32, [v, e, acc_v])

    return f32x8(acc, isum, xc, dw, xd), codegen


@intrinsic
def store_x8(typingctx, out, off, v):
    """Store the 8 lanes of `v` at flat elements off .. off + 7 of a float32 array."""
    if not (_is_flat(out) and out.dtype == types.float32 and isinstance(off, types.Integer) and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _V8F32), align=4)
        return context.get_dummy_value()

    return types.void(out, off, v), codegen


@intrinsic
def prefetch_x8(typingctx, w, off):
    """Hint the CPU to fetch the 144-byte block at w[off:] into cache (no effect on results, no
    fault past the array's end): software prefetches at off, off + 48, off + 96, so every 64-byte
    line of the block gets one. The hardware prefetcher alone leaves a thread at ~16 GB/s from
    DRAM instead of the ~20 GB/s a plain streaming read reaches on this machine (Zen 3)."""
    if not (_is_bytes(w) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        off_v = context.cast(builder, args[1], sig.args[1], types.intp)
        for k in (0, 48, 96):
            o = builder.add(off_v, ir.Constant(off_v.type, k))
            p = _ptr(context, builder, sig.args[0], args[0], types.intp, o, _I8)
            # read, high locality (keep in all levels), data cache
            _call(
                builder,
                "llvm.prefetch.p0",
                ir.VoidType(),
                [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)],
            )
        return context.get_dummy_value()

    return types.void(w, off), codegen


def prefetch_span(nbytes: int):
    """An intrinsic `(w, off)` hinting the CPU to fetch w[off : off + nbytes] (one software prefetch per 64
    bytes, read, kept in all cache levels; no effect on results, no fault past the array's end): for the x8
    layouts whose blocks are longer than `prefetch_x8`'s 144 bytes."""

    def prefetch(typingctx, w, off):
        if not (_is_bytes(w) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            off_v = context.cast(builder, args[1], sig.args[1], types.intp)
            hints = [ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]
            for k in range(0, nbytes, 64):
                o = builder.add(off_v, ir.Constant(off_v.type, k))
                p = _ptr(context, builder, sig.args[0], args[0], types.intp, o, _I8)
                _call(builder, "llvm.prefetch.p0", ir.VoidType(), [p] + hints)
            return context.get_dummy_value()

        return types.void(w, off), codegen

    prefetch.__name__ = prefetch.__qualname__ = f"prefetch_span_{nbytes}"
    return intrinsic(prefetch)


# ---- Q8_0x8: 8 rows of signed int8 weights, 32-byte chunks of 4 weights per row (see `q8x8`) ----


def _q8_chunk_dots(context, builder, variant: int, warr, w, wo, xarr, x, xos):
    """For each activation offset in `xos`: <8 x i32>, lane r = sum of row r's 32 int8 weights times
    x[xo : xo + 32], over the 8 chunks at flat offset `wo` (chunk j: 4 weights of each row, which meet
    x[xo + 4j : xo + 4j + 4]). AVX2: |w| times x with w's sign (vpsignb), vpmaddubsw (pairs <= 2 * 128 *
    127, no saturation), vpmaddwd to 32 bits per chunk; generic: exact widened products."""
    sums = [None] * len(xos)
    ones = ir.Constant(_V16I16, [1] * 16)
    for j in range(8):
        wo_j = builder.add(wo, ir.Constant(wo.type, 32 * j))
        v = builder.load(_ptr(context, builder, warr, w, types.intp, wo_j, _V32I8), align=1)
        if variant:
            zero = ir.Constant(_V32I8, None)
            absw = builder.select(builder.icmp_signed("<", v, zero), builder.sub(zero, v), v)
        for k, xo in enumerate(xos):
            o = builder.add(xo, ir.Constant(xo.type, 4 * j))
            x4 = builder.load(_ptr(context, builder, xarr, x, types.intp, o, _I32), align=1)
            xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)  # vpbroadcastd
            if variant:
                sx = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [xb, v])
                p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [absw, sx])
                p = _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [p16, ones])
            else:
                v32 = ir.VectorType(_I32, 32)
                prod = builder.mul(builder.sext(v, v32), builder.sext(xb, v32))
                v16 = ir.VectorType(_I32, 16)
                pairs = builder.add(builder.shuffle_vector(prod, prod, ir.Constant(v16, list(range(0, 32, 2)))),
                                    builder.shuffle_vector(prod, prod, ir.Constant(v16, list(range(1, 32, 2)))))
                p = builder.add(builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(0, 16, 2)))),
                                builder.shuffle_vector(pairs, pairs, ir.Constant(_V8I32, list(range(1, 16, 2)))))
            sums[k] = p if sums[k] is None else builder.add(sums[k], p)
    return sums


dot_q8x8, dot_q8x8_4 = _dot_intrinsics(_q8_chunk_dots, "a Q8_0x8 block's int8 weights (w[wo : wo + 256]) times x[xo : xo + 32]")


@intrinsic
def fma_d8(typingctx, acc, isum, dw, xd):
    """`acc + float(isum) * (dw * xd)` lane-wise (xd a scalar): one rounding per block, as ggml."""
    if not (acc == f32x8 and isum == i32x8 and dw == f32x8 and isinstance(xd, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        acc_v, isum_v, dw_v, d = args
        d = _splat(builder, context.cast(builder, d, sig.args[3], types.float32), _V8F32)
        return _call(builder, "llvm.fma.v8f32", _V8F32, [builder.sitofp(isum_v, _V8F32), builder.fmul(dw_v, d), acc_v])

    return f32x8(acc, isum, dw, xd), codegen
