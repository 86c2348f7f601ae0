"""Reading and writing a KV cache whatever its element type (`--cache-type`): float32; IEEE half bits in uint16
(f16, llama.cpp's default cache); or ggml's Q8_0 blocks in uint8 (a 34-byte block per 32 values: an f16 scale,
then 32 int8). A cache row is one position of one head: `d` values, stored in W elements of the array's type
(W = d, or d / 32 * 34 bytes for q8_0). Kernels call these on the cache arrays and are compiled once per type.

    load_kv8(cache, ro, i) -> f32x8     values i .. i+7 of the row starting at flat element `ro` (i % 8 == 0)
    load_kv1(cache, ro, i) -> float32   value i of that row
    store_kv_row(cache, ro, src, n)     a row of n float32 values from the 1-D array `src`, rounded to the type

Rounding is NumPy's and gguf's: f16 to nearest with ties to even (astype(float16)), Q8_0 as
quantize_row_q8_0_ref (edgemoe.quants, bit-identical to gguf.quants), so the NumPy path (KVCache.write) and the
kernels write the same bits. Reading widens exactly (an f16 value, or the f16 scale times the int8), so attention
over any type gives the bits it gives over an f32 cache holding the same values (tests/test_kv_cache.py).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .intrinsics import _F32, _I16, _I32, _V8F32, _half_to_float, _is_flat, _ptr, f32x8

_I8 = ir.IntType(8)
_V8I16 = ir.VectorType(_I16, 8)
_V8I8 = ir.VectorType(_I8, 8)
Q8_BLOCK, Q8_BYTES = 32, 34  # values and bytes of a Q8_0 block


def _host_f16c() -> bool:
    """Whether this CPU converts halves in hardware (vcvtph2ps): the code is compiled for the CPU it runs on."""
    return "+f16c" in llvm.get_host_cpu_features().flatten().split(",")


def _is_cache(arr) -> bool:
    return _is_flat(arr) and arr.dtype in (types.float32, types.uint16, types.uint8)


def _intp(context, builder, ty, value):
    return context.cast(builder, value, ty, types.intp)


def _q8_offsets(context, builder, sig, args):
    """(byte offset of the block's scale, byte offset of value i) for row `ro`, value `i` of a Q8_0 row."""
    ro = _intp(context, builder, sig.args[1], args[1])
    i = _intp(context, builder, sig.args[2], args[2])
    block = builder.add(ro, builder.mul(builder.ashr(i, ir.Constant(i.type, 5)), ir.Constant(i.type, Q8_BYTES)))
    return block, builder.add(builder.add(block, ir.Constant(i.type, 2)), builder.and_(i, ir.Constant(i.type, 31)))


def _q8_scale(context, builder, arr, args, scale_at):
    """The f16 scale at byte `scale_at` of a Q8_0 cache, as float32."""
    h = builder.load(_ptr(context, builder, arr, args[0], types.intp, scale_at, _I16), align=1)
    return _half_to_float(builder, h, 1 if _host_f16c() else 0)


def _flat(context, builder, sig, args):
    return builder.add(_intp(context, builder, sig.args[1], args[1]), _intp(context, builder, sig.args[2], args[2]))


@intrinsic
def load_kv8(typingctx, arr, ro, i):
    """Values i .. i+7 (i a multiple of 8) of the cache row at flat element `ro`, as an f32x8."""
    if not (_is_cache(arr) and isinstance(ro, types.Integer) and isinstance(i, types.Integer)):
        return None
    dtype = arr.dtype

    def codegen(context, builder, sig, args):
        if dtype == types.uint8:
            scale_at, q_at = _q8_offsets(context, builder, sig, args)
            scale = _q8_scale(context, builder, arr, args, scale_at)
            q = builder.load(_ptr(context, builder, arr, args[0], types.intp, q_at, _V8I8), align=1)
            splat = builder.insert_element(ir.Constant(_V8F32, ir.Undefined), scale, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, ir.Constant(_V8F32, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8),
                                                                                                [0] * 8))
            return builder.fmul(splat, builder.sitofp(q, _V8F32))
        off = _flat(context, builder, sig, args)
        if dtype == types.float32:
            return builder.load(_ptr(context, builder, arr, args[0], types.intp, off, _V8F32), align=4)
        h = builder.load(_ptr(context, builder, arr, args[0], types.intp, off, _V8I16), align=2)
        return _half_to_float(builder, h, 1 if _host_f16c() else 0)

    return f32x8(arr, ro, i), codegen


@intrinsic
def load_kv1(typingctx, arr, ro, i):
    """Value i of the cache row at flat element `ro`, as float32."""
    if not (_is_cache(arr) and isinstance(ro, types.Integer) and isinstance(i, types.Integer)):
        return None
    dtype = arr.dtype

    def codegen(context, builder, sig, args):
        if dtype == types.uint8:
            scale_at, q_at = _q8_offsets(context, builder, sig, args)
            q = builder.load(_ptr(context, builder, arr, args[0], types.intp, q_at, _I8))
            return builder.fmul(_q8_scale(context, builder, arr, args, scale_at), builder.sitofp(q, _F32))
        off = _flat(context, builder, sig, args)
        if dtype == types.float32:
            return builder.load(_ptr(context, builder, arr, args[0], types.intp, off, _F32))
        h = builder.load(_ptr(context, builder, arr, args[0], types.intp, off, _I16))
        return _half_to_float(builder, h, 1 if _host_f16c() else 0)

    return types.float32(arr, ro, i), codegen


@intrinsic
def _f32_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(x), codegen


@intrinsic
def _f32_from_bits(typingctx, b):
    """The float32 whose bits are the low 32 bits of integer `b`."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], _I32) if b.bitwidth > 32 else args[0]
        return builder.bitcast(low, _F32)

    return types.float32(b), codegen


@intrinsic
def _store(typingctx, arr, off, x):
    """arr[off] = x for a flat float32, uint16 or uint8 array (x of the array's type)."""
    if not (_is_cache(arr) and isinstance(off, types.Integer) and x == arr.dtype):
        return None
    elem = {types.float32: _F32, types.uint16: _I16, types.uint8: _I8}[arr.dtype]

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, arr, args[0], off, args[1], elem))
        return context.get_dummy_value()

    return types.void(arr, off, x), codegen


_SIGN = 0x80000000
_F16_MAX = (127 + 16) << 23  # 65536.0: from here on (after rounding, 65520) the half is infinite
_F32_INF = 255 << 23
_DENORM_MAGIC = ((127 - 15) + (23 - 10) + 1) << 23  # 0.5: adding it rounds a tiny value to a half subnormal


@njit(cache=True, nogil=True)
def half_bits(x):
    """The IEEE half nearest float32 `x` (ties to even; overflow to inf; NaN stays NaN), as uint16 bits
    (F. Giesen's float_to_half_fast3_rtne)."""
    bits = _f32_bits(x)
    sign = np.int64(bits & _SIGN) >> 16
    a = bits & np.uint32(0x7FFFFFFF)  # |x|
    if a >= _F16_MAX:
        o = np.int64(0x7E00 if a > _F32_INF else 0x7C00)
    elif a < (113 << 23):  # a half subnormal or zero: the float addition rounds to nearest even
        o = np.int64(_f32_bits(_f32_from_bits(a) + _f32_from_bits(_DENORM_MAGIC))) - _DENORM_MAGIC
    else:
        n = np.int64(a)
        o = (n + ((15 - 127) << 23) + 0xFFF + ((n >> 13) & 1)) >> 13
    return np.uint16(o | sign)


@njit(cache=True, nogil=True)
def _roundf(v):
    """C roundf (halves away from zero) in float32, as edgemoe.quants._roundf and gguf's np_roundf."""
    a = abs(v)
    floored = np.float32(np.floor(a))
    r = floored + np.float32(np.floor(np.float32(2) * (a - floored)))
    return -r if v < 0 else r


@njit(cache=True, nogil=True)
def _store_q8_0(arr, ro, src, n):
    """src[:n] as Q8_0 blocks at byte `ro` (quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d))."""
    for b in range(n // Q8_BLOCK):
        base = ro + b * Q8_BYTES
        amax = np.float32(0)
        for k in range(Q8_BLOCK):
            amax = max(amax, abs(src[b * Q8_BLOCK + k]))
        d = amax / np.float32(127)
        inv = np.float32(0) if d == 0 else np.float32(1) / d
        h = half_bits(d)
        _store(arr, base, np.uint8(h & 0xFF))
        _store(arr, base + 1, np.uint8(h >> 8))
        for k in range(Q8_BLOCK):
            q = np.int64(_roundf(src[b * Q8_BLOCK + k] * inv))
            _store(arr, base + 2 + k, np.uint8(q & 0xFF))


def store_kv_row(arr, ro, src, n):
    """The cache row at flat element `ro` = src[:n] rounded to the cache's type (src a 1-D float32 array)."""
    raise NotImplementedError("store_kv_row runs inside Numba kernels")


@overload(store_kv_row)
def _store_kv_row(arr, ro, src, n):
    if not _is_cache(arr):
        return None
    if arr.dtype == types.float32:
        def impl(arr, ro, src, n):
            for k in range(n):
                _store(arr, ro + k, src[k])
    elif arr.dtype == types.uint16:
        def impl(arr, ro, src, n):
            for k in range(n):
                _store(arr, ro + k, half_bits(src[k]))
    else:
        def impl(arr, ro, src, n):
            _store_q8_0(arr, ro, src, n)
    return impl
