"""SIMD intrinsics of the Q2_Kx8 kernels (`q2kx8`): one 256-column super-block of 8 interleaved rows.

A block of the layout (672 bytes, the 8 rows' plain 84-byte super-blocks, see `q2kx8`):

    bytes    0 ..  16   f16 d of rows 0..7 (row r at 2r)
    bytes   16 ..  32   f16 dmin of rows 0..7 (row r at 16 + 2r)
    bytes   32 .. 160   scales: byte j (< 16, scale sc_j | min m_j << 4) of row r at 32 + 8j + r
    bytes  160 .. 672   qs: bytes 4m .. 4m + 3 (m < 16) of row r at 160 + 32m + 4r

Column v = 128n + 32k + 4c + i (n < 2, k < 4, c < 8, i < 4) of row r is in sub-block j = 8n + 2k + c / 4; its
q (0..3) is bits 2k, 2k + 1 of qs byte 4(8n + c) + i. So the 32-byte qs word 8n + c holds 4 columns of each of
the 8 rows for each k: per k, one 16-bit shift and a mask give q, row r's 4 values in bytes 4r .. 4r + 3.

Per sub-block j and token: 4 x (vpbroadcastd of 4 activations, vpmaddubsw q . x: q unsigned, pairs <= 2 * 3 *
128, no saturation, vpaddw: <= 4 * 768 in a 16-bit lane), then one vpmaddwd against sc_j repeated in the two
16-bit halves of row r's lane. isum = sum_j sc_j * (q_j . x_j) <= 16 * 15 * 16 * 3 * 128 < 2**24. The mins
apart, from the activations' per-16 sums xs: msum = sum_j m_j * xs_j as 8 vpmaddwd of the min pairs
(m_2p, m_2p+1) with the pairs (xs_2p, xs_2p+1) (xs packed to int16: |xs| <= 16 * 128), |msum| <= 16 * 15 *
2048 < 2**24. Both exact int32, and exact in f32.

Variant markers as `intrinsics_x8`: int8 generic LLVM vector IR (products widened), int16 AVX2, int32 (VNNI
CPUs) takes the AVX2 code. Every variant computes the same integers.

Numba's on-disk cache keys each kernel on its own file only: after editing this module, delete
`edgemoe/kernels/__pycache__/q2kx8*.nb[ic]`, or stale kernels are loaded.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import _I32, _V8I32, _V16I16, _V32I8, _is_bytes, _is_flat, _ptr, _splat, i32x8
from .intrinsics_k8 import _maddubs, _maddwd
from .intrinsics_x8 import _after, _is_marker, _variant, prefetch_span

_V16I32 = ir.VectorType(_I32, 16)

BLOCK_BYTES = 672  # one super-block of 8 rows: 8 x 84
DMIN = 16  # the 8 rows' f16 dmin start here in a block (d at 0)
SCALES = 32  # the 8 rows' 16 scale bytes
QS = 160  # qs words


def _load(context, builder, arrty, arr, base, k: int, elem):
    o = builder.add(base, ir.Constant(base.type, k))
    return builder.load(_ptr(context, builder, arrty, arr, types.intp, o, elem), align=1)


def _shift16(builder, v, s: int):
    """The 16-bit lanes of byte vector v shifted right by s."""
    h = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [s] * 16))
    return builder.bitcast(h, _V32I8)


def _quarter(context, builder, warr, w, bo, q: int, shift: int):
    """<32 x i8>, byte 8a + r = sc_j (shift 0) or m_j (shift 4) of row r for j = 4q + a (a < 4): scale bytes
    4q .. 4q + 3 of the 8 rows are the 32 bytes at SCALES + 32q."""
    v = _load(context, builder, warr, w, bo, SCALES + 32 * q, _V32I8)
    return builder.and_(_shift16(builder, v, shift), ir.Constant(_V32I8, [0x0F] * 32))


def _pairs(builder, sq, a: int, b: int):
    """<16 x i16> from a `_quarter` vector: lane 2r = sq[8a + r], lane 2r + 1 = sq[8b + r] (row r's two scales
    in its vpmaddwd lane)."""
    v = builder.shuffle_vector(sq, sq, ir.Constant(_V16I32, [8 * (b if i % 2 else a) + i // 2 for i in range(16)]))
    return builder.zext(v, _V16I16)


def _xs_pair(context, builder, xsarr, xs, so, p: int):
    """<16 x i16>: the int16 pair (xs[so + 2p], xs[so + 2p + 1]) in every 32-bit lane (exact: |xs| <= 16 * 128)."""
    o = builder.add(so, ir.Constant(so.type, 2 * p))
    v = builder.load(_ptr(context, builder, xsarr, xs, types.intp, o, ir.VectorType(_I32, 2)), align=4)
    v = builder.bitcast(builder.trunc(v, ir.VectorType(ir.IntType(16), 2)), _I32)
    return builder.bitcast(_splat(builder, v, _V8I32), _V16I16)


def _block_sums(context, builder, variant: int, warr, w, bo, xarr, x, xos):
    """For each token (activations at x[xo:]): <8 x i32>, lane r = isum of row r = sum_j sc_j * sum_i q_ji * x_ji
    over the block at byte `bo` of `w`, exact. Sub-block by sub-block, so only one sub-block's 16-bit sums per
    token are live. On x86 each sub-block's address goes through `_after` the previous sums, or LLVM hoists the
    decoding of the whole block and spills it."""
    sums = [None] * len(xos)
    m2 = ir.Constant(_V32I8, [3] * 32)
    for j in range(16):
        n, k, half = j // 8, (j % 8) // 2, j % 2
        base = _after(builder, bo, sums) if variant and sums[0] is not None else bo
        if j % 4 == 0:
            sq = _quarter(context, builder, warr, w, base, j // 4, 0)  # scales of sub-blocks j .. j + 3
        sc = _pairs(builder, sq, j % 4, j % 4)
        acc = [None] * len(xos)
        for c in range(4 * half, 4 * half + 4):
            q = _load(context, builder, warr, w, base, QS + 32 * (8 * n + c), _V32I8)
            u = builder.and_(_shift16(builder, q, 2 * k), m2)  # q, 4 per row
            for t, xo in enumerate(xos):
                x4 = _load(context, builder, xarr, x, xo, 128 * n + 32 * k + 4 * c, _I32)
                p = _maddubs(builder, variant, u, builder.bitcast(_splat(builder, x4, _V8I32), _V32I8))
                acc[t] = p if acc[t] is None else builder.add(acc[t], p)
        for t in range(len(xos)):
            p = _maddwd(builder, variant, acc[t], sc)
            sums[t] = p if sums[t] is None else builder.add(sums[t], p)
    return sums


def _block_mins(context, builder, variant: int, warr, w, bo, xsarr, xs, sos):
    """For each token (sums at xs[so:]): <8 x i32>, lane r = msum of row r = sum_j m_j * xs_j, exact."""
    sums = [None] * len(sos)
    for q in range(4):
        mq = _quarter(context, builder, warr, w, bo, q, 4)  # mins of sub-blocks 4q .. 4q + 3
        for e in range(2):
            mp = _pairs(builder, mq, 2 * e, 2 * e + 1)
            for t, so in enumerate(sos):
                p = _maddwd(builder, variant, mp, _xs_pair(context, builder, xsarr, xs, so, 2 * q + e))
                sums[t] = p if sums[t] is None else builder.add(sums[t], p)
    return sums


def _intp(context, builder, sig, args, i):
    return context.cast(builder, args[i], sig.args[i], types.intp)


def _ints(*args) -> bool:
    return all(isinstance(a, types.Integer) for a in args)


def _offsets(builder, first, stride):
    """first, first + stride, first + 2 stride, first + 3 stride."""
    out = [first]
    for _ in range(3):
        out.append(builder.add(out[-1], stride))
    return out


@intrinsic
def sums_q2kx8(typingctx, marker, w, bo, x, xo):
    """Row isums (i32x8) of the Q2_Kx8 block at byte `bo` of w times the int8 activations x[xo : xo + 256]."""
    if not (_is_marker(marker) and _is_bytes(w) and _is_bytes(x) and _ints(bo, xo)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, xo_v = (_intp(context, builder, sig, args, i) for i in (2, 4))
        return _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], [xo_v])[0]

    return i32x8(marker, w, bo, x, xo), codegen


@intrinsic
def sums_q2kx8_4(typingctx, marker, w, bo, x, xo, stride):
    """`sums_q2kx8` for 4 tokens, activations at xo + k * stride (k < 4), sharing the loads and decoding."""
    if not (_is_marker(marker) and _is_bytes(w) and _is_bytes(x) and _ints(bo, xo, stride)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, xo_v, st = (_intp(context, builder, sig, args, i) for i in (2, 4, 5))
        sums = _block_sums(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3],
                           _offsets(builder, xo_v, st))
        return context.make_tuple(builder, sig.return_type, sums)

    return types.UniTuple(i32x8, 4)(marker, w, bo, x, xo, stride), codegen


def _mins_ok(marker, w, bo, xs, so) -> bool:
    return _is_marker(marker) and _is_bytes(w) and _is_flat(xs) and xs.dtype == types.int32 and _ints(bo, so)


@intrinsic
def mins_q2kx8(typingctx, marker, w, bo, xs, so):
    """Row msums (i32x8) of the Q2_Kx8 block at byte `bo` of w: the mins times the per-16 sums xs[so : so + 16]."""
    if not _mins_ok(marker, w, bo, xs, so):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, so_v = (_intp(context, builder, sig, args, i) for i in (2, 4))
        return _block_mins(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3], [so_v])[0]

    return i32x8(marker, w, bo, xs, so), codegen


@intrinsic
def mins_q2kx8_4(typingctx, marker, w, bo, xs, so, sstride):
    """`mins_q2kx8` for 4 tokens, sums at so + k * sstride (k < 4), sharing the min decoding."""
    if not (_mins_ok(marker, w, bo, xs, so) and isinstance(sstride, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        bo_v, so_v, sst = (_intp(context, builder, sig, args, i) for i in (2, 4, 5))
        sums = _block_mins(context, builder, variant, sig.args[1], args[1], bo_v, sig.args[3], args[3],
                           _offsets(builder, so_v, sst))
        return context.make_tuple(builder, sig.return_type, sums)

    return types.UniTuple(i32x8, 4)(marker, w, bo, xs, so, sstride), codegen


prefetch_q2kx8 = prefetch_span(BLOCK_BYTES)  # one prefetch per 64 bytes of a block
