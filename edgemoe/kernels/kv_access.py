"""Reading and writing a KV cache whatever its element type: float32, or IEEE half bits in uint16 (`--cache-type
f16`, as llama.cpp's default cache). Kernels call these on the cache arrays and are compiled once per type.

    load_kv8(cache, off) -> f32x8      8 elements from flat element `off`, widened exactly
    load_kv1(cache, off) -> float32    one element
    store_kv(cache, off, x)            x rounded to the cache's type (f16: to nearest, ties to even, as NumPy's
                                       astype(float16), so the NumPy and kernel paths write the same bits)

Widening a half is exact, so attention over an f16 cache gives the bits it gives over an f32 cache holding the
same rounded values (tests/test_kv_cache.py).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .intrinsics import _F32, _I16, _I32, _V8F32, _half_to_float, _is_flat, _ptr, f32x8

_V8I16 = ir.VectorType(_I16, 8)


def _host_f16c() -> bool:
    """Whether this CPU converts halves in hardware (vcvtph2ps): the code is compiled for the CPU it runs on."""
    return "+f16c" in llvm.get_host_cpu_features().flatten().split(",")


def _is_cache(arr) -> bool:
    return _is_flat(arr) and arr.dtype in (types.float32, types.uint16)


@intrinsic
def load_kv8(typingctx, arr, off):
    """Elements off .. off+7 of a float32 or f16 (uint16) array, as an f32x8."""
    if not (_is_cache(arr) and isinstance(off, types.Integer)):
        return None
    half = arr.dtype == types.uint16

    def codegen(context, builder, sig, args):
        if not half:
            return builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V8F32), align=4)
        h = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V8I16), align=2)
        return _half_to_float(builder, h, 1 if _host_f16c() else 0)

    return f32x8(arr, off), codegen


@intrinsic
def load_kv1(typingctx, arr, off):
    """Element `off` of a float32 or f16 (uint16) array, as float32."""
    if not (_is_cache(arr) and isinstance(off, types.Integer)):
        return None
    half = arr.dtype == types.uint16

    def codegen(context, builder, sig, args):
        if not half:
            return builder.load(_ptr(context, builder, arr, args[0], off, args[1], _F32))
        h = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _I16))
        return _half_to_float(builder, h, 1 if _host_f16c() else 0)

    return types.float32(arr, off), codegen


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
    """arr[off] = x for a flat float32 array (x float32) or uint16 array (x uint16)."""
    if not (_is_cache(arr) and isinstance(off, types.Integer) and x == arr.dtype):
        return None
    elem = _F32 if arr.dtype == types.float32 else _I16

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


def store_kv(arr, off, x):
    """arr[off] = x, rounded to the array's type (flat offset; float32 or f16 bits in uint16)."""
    raise NotImplementedError("store_kv runs inside Numba kernels")


@overload(store_kv, inline="always")
def _store_kv(arr, off, x):
    if not _is_cache(arr):
        return None
    if arr.dtype == types.float32:
        def impl(arr, off, x):
            _store(arr, off, x)
    else:
        def impl(arr, off, x):
            _store(arr, off, half_bits(x))
    return impl
