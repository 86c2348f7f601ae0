"""SIMD intrinsics of the Q3_Kx8 kernels (`q3kx8`): one 256-column super-block of 8 interleaved rows.

A block of the layout (880 bytes, the 8 rows' plain 110-byte super-blocks, see `q3kx8`):

    bytes    0 ..  16   f16 d of rows 0..7 (row r at 2r)
    bytes   16 .. 112   scales: byte i (< 12) of row r at 16 + 8i + r
    bytes  112 .. 368   hmask: bytes 4c .. 4c + 3 (c < 8) of row r at 112 + 32c + 4r
    bytes  368 .. 880   qs: bytes 4m .. 4m + 3 (m < 16) of row r at 368 + 32m + 4r

Column v = 128n + 32k + 4c + i (n < 2, k < 4, c < 8, i < 4) of row r is in sub-block j = 8n + 2k + c / 4; its
low 2 bits are bits 2k, 2k + 1 of qs byte 4(8n + c) + i, its high bit is bit 4n + k of hmask byte 4c + i. So
the 32-byte qs word 8n + c and hmask word c hold 4 columns of each of the 8 rows for each k: per k, one
16-bit shift and mask of each give u = q + 4 in 0..7 (unsigned), row r's 4 values in bytes 4r .. 4r + 3.

Per sub-block j and token: 4 x (vpbroadcastd of 4 activations, vpmaddubsw u . x: pairs <= 2 * 7 * 128, no
saturation, vpaddw: <= 4 * 1792 in a 16-bit lane), then one vpmaddwd against (sc_j - 32) repeated in the two
16-bit halves of row r's lane. The -4 of q is paid once per super-block from the activations' per-16 sums xs:
isum = sum_j (sc_j - 32) * (u_j . x_j) - 4 * sum_j (sc_j - 32) * xs_j, the second sum as 8 vpmaddwd of the
scale pairs (sc_2p - 32, sc_2p+1 - 32) with the pairs (xs_2p, xs_2p+1) (xs packed to int16: |xs| <= 16 * 128).
Every partial sum is bounded by 16 * 32 * 16 * 8 * 128 < 2**31: exact.

Variant markers as `intrinsics_x8`: int8 generic LLVM vector IR (products widened), int16 AVX2, int32 (VNNI
CPUs) takes the AVX2 code. Every variant computes the same integers.

Numba's on-disk cache keys each kernel on its own file only: after editing this module, delete
`edgemoe/kernels/__pycache__/q3kx8*.nb[ic]`, or stale kernels are loaded.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _I8, _I32, _V8I32, _V16I16, _V32I8, _is_bytes, _is_flat, _ptr, _splat, i32x8
from .intrinsics_k8 import _maddubs, _maddwd
from .intrinsics_x8 import _after, _is_marker, _variant, prefetch_span

_I64 = ir.IntType(64)
_V8I8 = ir.VectorType(_I8, 8)
_V16I32 = ir.VectorType(_I32, 16)

BLOCK_BYTES = 880  # one super-block of 8 rows: 8 x 110
SCALES = 16  # the 8 rows' 12 scale bytes start here in a block
HMASK = 112  # hmask words
QS = 368  # qs words


def _load(context, builder, arrty, arr, base, k: int, elem):
    o = builder.add(base, ir.Constant(base.type, k))
    return builder.load(_ptr(context, builder, arrty, arr, types.intp, o, elem), align=1)


def _quarter(context, builder, warr, w, bo, q: int):
    """<32 x i8>, byte 8a + r = the 6-bit scale sc_j of row r for j = 4q + a (a < 4): ggml's kmask unpacking on 8
    rows at once; sc_j has its low 4 bits in scale byte j % 8 (low nibble for j < 8), its top 2 bits at bit
    2(j / 4) of byte 8 + j % 4, and byte i of the 8 rows is the 8-byte word at SCALES + 8i."""
    lo = _load(context, builder, warr, w, bo, SCALES + 32 * (q % 2), _V32I8)  # bytes 4(q % 2) .. + 3
    hi = _load(context, builder, warr, w, bo, SCALES + 64, _V32I8)  # bytes 8 .. 11
    lo = builder.and_(_shift16(builder, lo, 4 * (q // 2)), ir.Constant(_V32I8, [0x0F] * 32))
    hi = builder.and_(_shift16(builder, hi, 2 * q - 4), ir.Constant(_V32I8, [0x30] * 32))  # bits 2q, 2q + 1 to 4, 5
    return builder.or_(lo, hi)


def _pairs(builder, sq, a: int, b: int):
    """<16 x i16> from a `_quarter` vector: lane 2r = sq[8a + r] - 32, lane 2r + 1 = sq[8b + r] - 32 (row r's two
    scales in its vpmaddwd lane)."""
    v = builder.shuffle_vector(sq, sq, ir.Constant(_V16I32, [8 * (b if i % 2 else a) + i // 2 for i in range(16)]))
    return builder.sub(builder.zext(v, _V16I16), ir.Constant(_V16I16, [32] * 16))


def _shift16(builder, v, s: int):
    """The 16-bit lanes of byte vector v shifted right by s (left by -s)."""
    h = builder.bitcast(v, _V16I16)
    h = builder.lshr(h, ir.Constant(_V16I16, [s] * 16)) if s >= 0 else builder.shl(h, ir.Constant(_V16I16, [-s] * 16))
    return builder.bitcast(h, _V32I8)


def _xs_pair(context, builder, xsarr, xs, so, p: int):
    """<16 x i16>: the int16 pair (xs[so + 2p], xs[so + 2p + 1]) in every 32-bit lane (exact: |xs| <= 16 * 128)."""
    o = builder.add(so, ir.Constant(so.type, 2 * p))
    v = builder.load(_ptr(context, builder, xsarr, xs, types.intp, o, ir.VectorType(_I32, 2)), align=4)
    v = builder.bitcast(builder.trunc(v, ir.VectorType(ir.IntType(16), 2)), _I32)
    return builder.bitcast(_splat(builder, v, _V8I32), _V16I16)


def _block_sums(context, builder, variant: int, warr, w, bo, xarr, x, xos, xsarr, xs, sos):
    """For each token (activations at x[xo:], sums at xs[so:]): <8 x i32>, lane r = isum of row r =
    sum_j (sc_j - 32) * sum_i q_ji * x_ji over the block at byte `bo` of `w`, exact. Sub-block by sub-block, so
    only one sub-block's 16-bit sums per token are live; after each 4 sub-blocks, the -4 of their 2 scale pairs.
    On x86 each sub-block's address goes through `_after` the previous sums, or LLVM hoists the decoding of the
    whole block and spills it."""
    sums = [None] * len(xos)
    m2 = ir.Constant(_V32I8, [3] * 32)
    m4 = ir.Constant(_V32I8, [4] * 32)
    for j in range(16):
        n, k, half = j // 8, (j % 8) // 2, j % 2
        base = _after(builder, bo, sums) if variant and sums[0] is not None else bo
        if j % 4 == 0:
            sq = _quarter(context, builder, warr, w, base, j // 4)  # scales of sub-blocks j .. j + 3
        sc = _pairs(builder, sq, j % 4, j % 4)
        acc = [None] * len(xos)
        for c in range(4 * half, 4 * half + 4):
            q = _load(context, builder, warr, w, base, QS + 32 * (8 * n + c), _V32I8)
            h = _load(context, builder, warr, w, base, HMASK + 32 * c, _V32I8)
            low, high = _shift16(builder, q, 2 * k), _shift16(builder, h, 4 * n + k - 2)  # bits to 0..1, to 2
            u = builder.or_(builder.and_(low, m2), builder.and_(high, m4))  # q + 4, 4 per row
            for t, xo in enumerate(xos):
                x4 = _load(context, builder, xarr, x, xo, 128 * n + 32 * k + 4 * c, _I32)
                p = _maddubs(builder, variant, u, builder.bitcast(_splat(builder, x4, _V8I32), _V32I8))
                acc[t] = p if acc[t] is None else builder.add(acc[t], p)
        for t in range(len(xos)):
            p = _maddwd(builder, variant, acc[t], sc)
            sums[t] = p if sums[t] is None else builder.add(sums[t], p)
        if j % 4 == 3:  # - 4 * (sc - 32) * xs of sub-blocks j - 3 .. j, as 2 scale pairs
            for e in range(2):
                sp = builder.mul(_pairs(builder, sq, 2 * e, 2 * e + 1), ir.Constant(_V16I16, [-4] * 16))
                for t, so in enumerate(sos):
                    xp = _xs_pair(context, builder, xsarr, xs, so, j // 2 - 1 + e)
                    sums[t] = builder.add(sums[t], _maddwd(builder, variant, sp, xp))
    return sums


def _ok(marker, w, bo, x, xo, xs, so) -> bool:
    ints = all(isinstance(a, types.Integer) for a in (bo, xo, so))
    sums = _is_flat(xs) and xs.dtype == types.int32
    return _is_marker(marker) and _is_bytes(w) and _is_bytes(x) and sums and ints


def _intp(context, builder, sig, args, i):
    return context.cast(builder, args[i], sig.args[i], types.intp)


@intrinsic
def sums_q3kx8(typingctx, marker, w, bo, x, xo, xs, so):
    """Row isums (i32x8) of the Q3_Kx8 block at byte `bo` of w times the int8 activations x[xo : xo + 256],
    whose per-16 sums are xs[so : so + 16]."""
    if not _ok(marker, w, bo, x, xo, xs, so):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, xo_v, so_v = (_intp(context, builder, sig, args, i) for i in (2, 4, 6))
        return _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], [xo_v],
                           sig.args[5], args[5], [so_v])[0]

    return i32x8(marker, w, bo, x, xo, xs, so), codegen


@intrinsic
def sums_q3kx8_4(typingctx, marker, w, bo, x, xo, stride, xs, so, sstride):
    """`sums_q3kx8` for 4 tokens, activations at xo + k * stride and sums at so + k * sstride (k < 4), sharing the
    loads, decoding and scales."""
    if not (_ok(marker, w, bo, x, xo, xs, so) and isinstance(stride, types.Integer) and isinstance(sstride, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, xo_v, st, so_v, sst = (_intp(context, builder, sig, args, i) for i in (2, 4, 5, 7, 8))
        xos, sos = [xo_v], [so_v]
        for _ in range(3):
            xos.append(builder.add(xos[-1], st))
            sos.append(builder.add(sos[-1], sst))
        sums = _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], xos,
                           sig.args[6], args[6], sos)
        return context.make_tuple(builder, sig.return_type, sums)

    return types.UniTuple(i32x8, 4)(marker, w, bo, x, xo, stride, xs, so, sstride), codegen


prefetch_q3kx8 = prefetch_span(BLOCK_BYTES)  # one prefetch per 64 bytes of a block
