"""Quantise float activations to int8 blocks once per call, as ggml does before an integer dot.

Two layouts, mirroring ggml's `quantize_row_q8_0_ref` and `quantize_row_q8_K_ref`:

    Q8_0-style (for Q8_0 / Q4_0 weights), blocks of 32:
        d = amax / 127, q = roundf(x / d)          (d kept as f32 here; ggml stores it as f16)
        xq (T, cols) int8, xd (T, cols/32) f32 = d, xs (T, cols/32) f32 = d * sum(q)
    Q8_K-style (for the K types), blocks of 256:
        max = the x with the largest |x|, iscale = -127 / max, q = nearest_int(iscale * x)
        xq (T, cols) int8, xd (T, cols/256) f32 = 1 / iscale, xb (T, cols/16) int32 = per-16 sums of q

`xs` lets Q4_0 apply its -8 offset as one scalar per block instead of per weight. For Q4_0 the
int8 values of each pair of blocks are interleaved by halves (see `quantize_q8_0`). MXFP4 takes the
same pair layout with the exact integer sums of each block instead (`quantize_q8_0_sums`).
Each 32-value group is handled by the vector intrinsics below (block sizes are fixed by them).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .intrinsics import _F32, _I32, _V8F32, _V32I8, _call, _is_bytes, _is_flat, _ptr, get, i8x32


def _load8(context, builder, arrty, arr, offty, off, k):
    """Floats 8k .. 8k+7 after flat offset `off` of a float32 array."""
    o = builder.add(context.cast(builder, off, offty, types.intp), ir.Constant(ir.IntType(64), 8 * k))
    return builder.load(_ptr(context, builder, arrty, arr, types.intp, o, _V8F32), align=4)


@intrinsic
def absmax32(typingctx, x, off):
    """max |x[off : off + 32]| of a float32 array (flat offset)."""
    if not (_is_flat(x) and x.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        m = None
        for k in range(4):
            v = _call(builder, "llvm.fabs.v8f32", _V8F32, [_load8(context, builder, x, args[0], off, args[1], k)])
            m = v if m is None else _call(builder, "llvm.maxnum.v8f32", _V8F32, [m, v])
        return _call(builder, "llvm.vector.reduce.fmax.v8f32", _F32, [m])

    return types.float32(x, off), codegen


def _quant32(rounding: str, clamp: bool):
    @intrinsic
    def quant32(typingctx, x, off, scale):
        if not (_is_flat(x) and x.dtype == types.float32 and isinstance(scale, types.Float)):
            return None

        def codegen(context, builder, sig, args):
            s = context.cast(builder, args[2], scale, types.float32)
            s = builder.shuffle_vector(
                builder.insert_element(ir.Constant(_V8F32, None), s, ir.Constant(_I32, 0)),
                ir.Constant(_V8F32, None),
                ir.Constant(ir.VectorType(_I32, 8), [0] * 8),
            )
            parts = []
            for k in range(4):
                v = builder.fmul(_load8(context, builder, x, args[0], off, args[1], k), s)
                v = _call(builder, f"llvm.{rounding}.v8f32", _V8F32, [v])
                parts.append(builder.fptosi(v, ir.VectorType(_I32, 8)))
            v16 = ir.VectorType(_I32, 16)
            lo = builder.shuffle_vector(parts[0], parts[1], ir.Constant(v16, list(range(16))))
            hi = builder.shuffle_vector(parts[2], parts[3], ir.Constant(v16, list(range(16))))
            q = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
            if clamp:
                c127 = ir.Constant(q.type, [127] * 32)
                q = builder.select(builder.icmp_signed(">", q, c127), c127, q)
            return builder.trunc(q, _V32I8)

        return i8x32(x, off, scale), codegen

    return quant32


# roundf (half away from zero) of x * scale, as quantize_row_q8_0_ref
quant32_round = _quant32("round", clamp=False)
# nearest_int (half to even) of x * scale, capped at 127, as quantize_row_q8_K_ref
quant32_rint127 = _quant32("rint", clamp=True)


@intrinsic
def store_half(typingctx, arr, off, q, half):
    """Store values 16 * half .. 16 * half + 15 of `q` at flat offset `off` of an int8 array."""
    if not (_is_bytes(arr) and q == i8x32 and isinstance(half, types.IntegerLiteral)):
        return None
    h = half.literal_value

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        part = builder.shuffle_vector(args[2], args[2], ir.Constant(ir.VectorType(_I32, 16), list(range(16 * h, 16 * h + 16))))
        builder.store(part, _ptr(context, builder, arr, args[0], off, args[1], v16), align=1)
        return context.get_dummy_value()

    return types.void(arr, off, q, half), codegen


@intrinsic
def sum_half(typingctx, q, half):
    """Sum of values 16 * half .. 16 * half + 15 of `q` (signed)."""
    if not (q == i8x32 and isinstance(half, types.IntegerLiteral)):
        return None
    h = half.literal_value

    def codegen(context, builder, sig, args):
        part = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, 16), list(range(16 * h, 16 * h + 16))))
        wide = builder.sext(part, ir.VectorType(_I32, 16))
        return builder.sext(_call(builder, "llvm.vector.reduce.add.v16i32", _I32, [wide]), ir.IntType(64))

    return types.int64(q, half), codegen


@njit(cache=True, nogil=True)
def quantize_q8_0(xq, xd, xs, x, pairs):
    """Q8_0-style int8 blocks of 32 values for each row of x (T, cols), all C-contiguous.

    pairs = 1 stores blocks 2p, 2p+1 interleaved by halves in their 64 bytes,
    [b0[0:16], b1[0:16], b0[16:32], b1[16:32]], to match `load_q4_0_pair`; a last odd block
    stays plain. pairs = 0 is ggml's plain layout.
    """
    n_tok, cols = x.shape
    nb = cols // 32
    paired = nb // 2 * 2 if pairs else 0
    for t in range(n_tok):
        for b in range(nb):
            src = t * cols + b * 32  # flat offset of the block in x and, plain, in xq
            d = np.float32(absmax32(x, src) / np.float32(127.0))
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            q = quant32_round(x, src, inv)
            dst = src - (b % 2) * 16 if b < paired else src  # where the first half goes
            store_half(xq, dst, q, 0)
            store_half(xq, dst + (32 if b < paired else 16), q, 1)
            xd[t, b] = d
            xs[t, b] = d * np.float32(sum_half(q, 0) + sum_half(q, 1))


@njit(cache=True, nogil=True)
def quantize_q8_0_sums(xq, xd, xs, x):
    """`quantize_q8_0(xq, xd, _, x, pairs=1)` (the same int8 values, scales and pair layout) with
    xs (T, B) int32 = the sum of each block's int8 values, so that an integer offset on the weights
    (MXFP4's) can be taken back exactly."""
    n_tok, cols = x.shape
    nb = cols // 32
    paired = nb // 2 * 2
    for t in range(n_tok):
        for b in range(nb):
            src = t * cols + b * 32  # flat offset of the block in x and, plain, in xq
            d = np.float32(absmax32(x, src) / np.float32(127.0))
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            q = quant32_round(x, src, inv)
            dst = src - (b % 2) * 16 if b < paired else src  # where the first half goes
            store_half(xq, dst, q, 0)
            store_half(xq, dst + (32 if b < paired else 16), q, 1)
            xd[t, b] = d
            xs[t, b] = sum_half(q, 0) + sum_half(q, 1)


@njit(cache=True, nogil=True)
def quantize_q8_k(xq, xd, xb, x):
    """Q8_K-style int8 blocks of 256 values with per-16 sums, for each row of x (T, cols)."""
    n_tok, cols = x.shape
    nb = cols // 256
    for t in range(n_tok):
        for b in range(nb):
            src = t * cols + b * 256  # flat offset of the block in x and xq
            amax = np.float32(0.0)
            for k in range(8):
                amax = max(amax, absmax32(x, src + 32 * k))
            if amax == 0:
                xq[t, b * 256 : (b + 1) * 256] = 0
                xd[t, b] = 0.0
                xb[t, b * 16 : (b + 1) * 16] = 0
                continue
            j = src
            while abs(get(x, j)) != amax:  # the first x with the largest |x|, as ggml's scan
                j += 1
            iscale = np.float32(np.float32(-127.0) / get(x, j))
            for k in range(8):
                q = quant32_rint127(x, src + 32 * k, iscale)
                store_half(xq, src + 32 * k, q, 0)
                store_half(xq, src + 32 * k + 16, q, 1)
                xb[t, b * 16 + 2 * k] = sum_half(q, 0)
                xb[t, b * 16 + 2 * k + 1] = sum_half(q, 1)
            xd[t, b] = np.float32(1.0) / iscale


def activations(act: str, n: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New (xq, xd, xs) buffers for `n` rows of `cols` activations in format `act`: q8_0 / q8_0p (Q8_0 /
    Q4_0 weights), q8_0x8 (Q4_0x8: xs = 8 * the block sums, int32), q8_0ps (MXFP4: pair layout, xs =
    the block sums, int32), q8_k (K types), q8_kx8 (Q4_Kx8: pairs of 32-column sums) or f32 (float
    weights take the activations themselves)."""
    if act == "f32":
        return (np.empty((n, cols), np.float32),  # (n, C) the activations
                np.empty((n, 1), np.float32), np.empty((n, 1), np.float32))  # unused
    if act == "q8_kx8":
        return (np.empty((n, cols), np.int8),  # (n, C) quants
                np.empty((n, cols // 256), np.float32),  # (n, C/256) scales
                np.empty((n, cols // 64), np.int32))  # (n, C/64) pairs of sub-block sums
    if act == "q8_k":
        return (np.empty((n, cols), np.int8),  # (n, C) quants
                np.empty((n, cols // 256), np.float32),  # (n, C/256) scales
                np.empty((n, cols // 16), np.int32))  # (n, C/16) sums
    return (np.empty((n, cols), np.int8),  # (n, C) quants
            np.empty((n, cols // 32), np.float32),  # (n, C/32) scales
            np.empty((n, cols // 32), np.int32 if act in ("q8_0x8", "q8_0ps") else np.float32))  # (n, C/32) sums
