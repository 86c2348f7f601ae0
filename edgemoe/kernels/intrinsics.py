"""Small SIMD building blocks for the Numba kernels, written as LLVM IR through `@intrinsic`.

Numba has no vector types and never emits `vpmaddubsw`/`vpdpbusd` from plain loops (it widens
int32 products to int64), so the int8 kernels are written with these intrinsics. Each value lives
in a register as an LLVM vector:

    I8x32  <32 x i8>   32 quantised weights or activations (one 32-element group)
    I16x16 <16 x i16>  the 8 sub-block scales of a K super-block, repeated in both 128-bit halves
    I32x8  <8 x i32>   lane i holds the sum of products of bytes 4i..4i+3 of the two inputs
    F32x8  <8 x float> float accumulator

The instruction set is chosen by the *type* of a marker argument (`GENERIC`, `AVX2`, `VNNI`): each
marker compiles a separate specialisation, so an AVX-512 instruction never reaches the code
generator of a CPU without it, and dispatch stays in Numba's fast C path (a literal int argument
would cost ~40 ms per call in the dispatcher). GENERIC is plain LLVM vector IR, portable to any
target LLVM supports. This module holds the types, loads and conversions; `vecops` the dot
products and arithmetic.

Numba's on-disk cache keys each kernel on its own file only: after editing this module or
`vecops`, delete `edgemoe/kernels/__pycache__/*.nbi` (or touch the kernel files), or stale
kernels are loaded.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# Variant markers: pass one as the last argument of a kernel. Only the dtype matters.
GENERIC = np.int8(0)  # portable LLVM vector IR (integer products widened to i16)
AVX2 = np.int16(0)  # vpmaddubsw + vpmaddwd, vcvtph2ps; needs avx2, fma, f16c
VNNI = np.int32(0)  # vpdpbusd (256-bit); needs avx512vnni + avx512vl, or avxvnni

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(_F32, 8)


def _vector_type(name: str, llvm_type: ir.Type):
    class _Vec(types.Type):
        def __init__(self):
            super().__init__(name=name)

    @register_model(_Vec)
    class _Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, llvm_type)

    _Vec.__name__ = _Vec.__qualname__ = name
    return _Vec()


i8x32 = _vector_type("I8x32", _V32I8)
i16x16 = _vector_type("I16x16", _V16I16)
i32x8 = _vector_type("I32x8", _V8I32)
f32x8 = _vector_type("F32x8", _V8F32)


def _variant(marker) -> int:
    """0 generic, 1 avx2, 2 vnni, from the marker's Numba type."""
    return {8: 0, 16: 1, 32: 2}[marker.bitwidth]


def _is_marker(marker) -> bool:
    return isinstance(marker, types.Integer) and marker.signed and marker.bitwidth in (8, 16, 32)


def _is_flat(arr) -> bool:
    """1-D, or C-contiguous n-D: element `off` of the flattened array is data[off]."""
    return isinstance(arr, types.Array) and (arr.ndim == 1 or arr.layout == "C")


def _is_bytes(arr) -> bool:
    return _is_flat(arr) and arr.dtype.bitwidth == 8


def _is_u16(arr) -> bool:
    return _is_flat(arr) and arr.dtype.bitwidth == 16


def _ptr(context, builder, arrty, arr, offty, off, elem: ir.Type):
    """Pointer to element `off` of a 1-D (or flattened C-contiguous) array, cast to `elem*`.

    The loads below take flat offsets so kernels index whole 2-D arrays without slicing rows:
    a slice costs a reference-count increment and decrement per row.
    """
    data = context.make_array(arrty)(context, builder, arr).data
    off = context.cast(builder, off, offty, types.intp)
    return builder.bitcast(builder.gep(data, [off]), elem.as_pointer())


def _splat(builder, value, vtype: ir.VectorType):
    v = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))


def _call(builder, name: str, ret: ir.Type, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _int_arg(context, builder, ty, val, llty):
    return (
        context.cast(builder, val, ty, types.int32)
        if llty is _I32
        else builder.trunc(context.cast(builder, val, ty, types.int32), llty)
    )


# ---- loads --------------------------------------------------------------------------------------


@intrinsic
def load_i8x32(typingctx, arr, off):
    """32 bytes of a 1-D int8/uint8 array from element `off` (unaligned)."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V32I8), align=1)

    return i8x32(arr, off), codegen


@intrinsic
def get(typingctx, arr, off):
    """Flat element `off` (>= 0) of an array, without Numba's negative-index wraparound code."""
    if not (_is_flat(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        elem = context.get_data_type(arr.dtype)
        return builder.load(_ptr(context, builder, arr, args[0], off, args[1], elem))

    return arr.dtype(arr, off), codegen


@intrinsic
def load_u32(typingctx, arr, off):
    """4 bytes of a 1-D uint8 array from `off`, little-endian, as a non-negative int64."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _I32), align=1)
        return builder.zext(v, ir.IntType(64))

    return types.int64(arr, off), codegen


@intrinsic
def load_bits(typingctx, arr, off, shift, mask):
    """`(byte >> shift) & mask` for 32 bytes from element `off`: unpacks nibbles and high bits.

    Shifts 16-bit lanes (x86 has no byte shift; emulating one costs three more instructions
    when the shift is not a constant), exact when mask < 2**(8 - shift), as in all our uses.
    """
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V32I8), align=1)
        s = _splat(builder, _int_arg(context, builder, shift, args[2], _I16), _V16I16)
        v = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), s), _V32I8)
        m = _splat(builder, _int_arg(context, builder, mask, args[3], _I8), _V32I8)
        return builder.and_(v, m)

    return i8x32(arr, off, shift, mask), codegen


@intrinsic
def load_q4_0(typingctx, arr, off):
    """Q4_0 block quants: 16 bytes -> 32 values 0..15 (low nibbles = elements 0..15, high 16..31)."""
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(_I8, 16)
        v = builder.load(_ptr(context, builder, arr, args[0], off, args[1], v16), align=1)
        lo = builder.and_(v, ir.Constant(v16, [15] * 16))
        hi = builder.lshr(v, ir.Constant(v16, [4] * 16))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

    return i8x32(arr, off), codegen


@intrinsic
def load_q4_0_pair(typingctx, arr, off, stride):
    """Quants of two Q4_0 blocks (16 bytes at off and at off + stride) as (low, high) nibbles:
    low = [block 0 elements 0..15 | block 1 elements 0..15], high = the same for 16..31.

    Saves the per-block lane crossing of `load_q4_0`; the activations must be in the matching
    pair layout (see `q8act.quantize_q8_0`).
    """
    if not (_is_bytes(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(_I8, 16)
        o = context.cast(builder, args[1], off, types.intp)
        o2 = builder.add(o, context.cast(builder, args[2], stride, types.intp))
        a = builder.load(_ptr(context, builder, arr, args[0], types.intp, o, v16), align=1)
        b = builder.load(_ptr(context, builder, arr, args[0], types.intp, o2, v16), align=1)
        v = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        lo = builder.and_(v, ir.Constant(_V32I8, [15] * 32))
        hi = builder.lshr(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16))
        hi = builder.and_(builder.bitcast(hi, _V32I8), ir.Constant(_V32I8, [15] * 32))
        return context.make_tuple(builder, sig.return_type, [lo, hi])

    return types.UniTuple(i8x32, 2)(arr, off, stride), codegen


@intrinsic
def or_shl(typingctx, a, b, k):
    """`a | (b << k)`: adds high bits (Q5_K, Q6_K) to unpacked low bits.

    Shifts 16-bit lanes, exact when b < 2**(8 - k) (no bit crosses a byte), as in all our uses.
    """
    if not (a == i8x32 and b == i8x32):
        return None

    def codegen(context, builder, sig, args):
        s = _splat(builder, _int_arg(context, builder, k, args[2], _I16), _V16I16)
        shifted = builder.bitcast(builder.shl(builder.bitcast(args[1], _V16I16), s), _V32I8)
        return builder.or_(args[0], shifted)

    return i8x32(a, b, k), codegen


@intrinsic
def load_f16(typingctx, marker, arr, off):
    """One IEEE half (little-endian bytes at `off` of a uint8 array, or element `off` of uint16) as f32."""
    if not (_is_marker(marker) and (_is_bytes(arr) or _is_u16(arr)) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, arr, args[1], off, args[2], _I16), align=1)
        return _half_to_float(builder, h, variant)

    return types.float32(marker, arr, off), codegen


@intrinsic
def load_bf16(typingctx, arr, off):
    """Element `off` of a uint16 array holding bfloat16 bits, as f32 (the bits shifted up by 16)."""
    if not (_is_u16(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, arr, args[0], off, args[1], _I16))
        return builder.bitcast(builder.shl(builder.zext(h, _I32), ir.Constant(_I32, 16)), _F32)

    return types.float32(arr, off), codegen


def _half_to_float(builder, h, variant: int):
    """i16 (or <n x i16>) half bits -> float (or <n x float>)."""
    n = h.type.count if isinstance(h.type, ir.VectorType) else 0

    def ty(t):
        return ir.VectorType(t, n) if n else t

    def k(t, value):
        return ir.Constant(ty(t), [value] * n if n else value)

    if variant:  # x86 with F16C: fpext lowers to vcvtph2ps
        return builder.fpext(builder.bitcast(h, ty(ir.HalfType())), ty(_F32))
    # Portable bit trick (fpext without F16C becomes a libcall the JIT may not resolve): shift
    # exponent+mantissa into f32 position and rescale by 2^112, which also handles subnormals;
    # inf/nan keep an all-ones exponent.
    w = builder.zext(h, ty(_I32))
    em = builder.and_(w, k(_I32, 0x7FFF))
    sign = builder.shl(builder.and_(w, k(_I32, 0x8000)), k(_I32, 16))
    scaled = builder.fmul(builder.bitcast(builder.shl(em, k(_I32, 13)), ty(_F32)), k(_F32, 2.0**112))
    special = builder.or_(k(_I32, 0x7F800000), builder.shl(builder.and_(em, k(_I32, 0x3FF)), k(_I32, 13)))
    is_special = builder.icmp_unsigned(">=", em, k(_I32, 0x7C00))
    bits = builder.select(is_special, special, builder.bitcast(scaled, ty(_I32)))
    return builder.bitcast(builder.or_(bits, sign), ty(_F32))


@intrinsic
def scales8_f16(typingctx, marker, arr, off, stride):
    """The f16 scales of 8 consecutive blocks (at bytes off + k * stride) as one f32x8.

    One vcvtph2ps for eight blocks; converting each block's scalar scale instead lowers to
    `vpinsrw` into a live register, a false dependency chaining every block to the previous one.
    """
    if not (_is_marker(marker) and _is_bytes(arr) and isinstance(off, types.Integer)):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        base = context.cast(builder, args[2], off, types.intp)
        step = context.cast(builder, args[3], stride, types.intp)
        # Pack four halves per i64 in integer registers, then two vector inserts: inserting each
        # half into the vector would chain every group to the previous one through `vpinsrw`.
        i64 = ir.IntType(64)
        v = ir.Constant(ir.VectorType(i64, 2), None)
        for half in range(2):
            word = None
            for lane in range(4):
                o = builder.add(base, builder.mul(step, ir.Constant(base.type, 4 * half + lane)))
                h = builder.load(_ptr(context, builder, arr, args[1], types.intp, o, _I16), align=1)
                h = builder.shl(builder.zext(h, i64), ir.Constant(i64, 16 * lane))
                word = h if word is None else builder.or_(word, h)
            v = builder.insert_element(v, word, ir.Constant(_I32, half))
        return _half_to_float(builder, builder.bitcast(v, ir.VectorType(_I16, 8)), variant)

    return f32x8(marker, arr, off, stride), codegen


@intrinsic
def load_f32x8(typingctx, arr, off):
    """8 floats of a float32 array from (flat) element `off`."""
    if not (_is_flat(arr) and arr.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, arr, args[0], off, args[1], _V8F32), align=4)

    return f32x8(arr, off), codegen


# ---- float weights (F32, F16, BF16) from raw row bytes ------------------------------------------

# Format markers for `load_float8` / `load_float1`: only the Numba type matters, as for the variant
# markers (Numba has no float16 argument type): f32 for F32, u16 for IEEE half bits, and u32 for
# BF16, whose 16 bits are the top half of an f32.
FMT_F32 = np.float32(0)
FMT_F16 = np.uint16(0)
FMT_BF16 = np.uint32(0)


def _float_fmt(fmt) -> int:
    """Bytes per weight of a format marker (4 f32, 2 f16 or bf16), or 0 when it is not one."""
    if fmt == types.float32:
        return 4
    if fmt in (types.uint16, types.uint32):
        return 2
    return 0


def _floats(builder, fmt, variant: int, raw, n: int):
    """`n` weights in format `fmt` from their raw integer bits (an <n x iW> vector or an iW)."""
    if fmt == types.float32:
        return builder.bitcast(raw, ir.VectorType(_F32, n) if n > 1 else _F32)
    if fmt == types.uint16:
        return _half_to_float(builder, raw, variant)
    wide = ir.VectorType(_I32, n) if n > 1 else _I32
    sixteen = ir.Constant(wide, [16] * n if n > 1 else 16)
    return builder.bitcast(builder.shl(builder.zext(raw, wide), sixteen), ir.VectorType(_F32, n) if n > 1 else _F32)


def _weight_ptr(context, builder, sig, args, size: int, elem: ir.Type):
    """Pointer to weight `i` of the row at byte `ro` (args[2:5] = arr, ro, i), as `elem*`."""
    arrty, roty, ity = sig.args[2:5]
    ro = context.cast(builder, args[3], roty, types.intp)
    i = context.cast(builder, args[4], ity, types.intp)
    off = builder.add(ro, builder.mul(i, ir.Constant(ro.type, size)))
    return _ptr(context, builder, arrty, args[2], types.intp, off, elem)


@intrinsic
def load_float8(typingctx, fmt, marker, arr, ro, i):
    """Weights i .. i+7 of format `fmt` of the row at byte `ro` of a uint8 array, as an f32x8."""
    size = _float_fmt(fmt)
    ints = isinstance(ro, types.Integer) and isinstance(i, types.Integer)
    if not (size and _is_marker(marker) and _is_bytes(arr) and ints):
        return None
    variant = _variant(marker)
    raw_type = ir.VectorType(ir.IntType(8 * size), 8)

    def codegen(context, builder, sig, args):
        raw = builder.load(_weight_ptr(context, builder, sig, args, size, raw_type), align=1)
        return _floats(builder, fmt, variant, raw, 8)

    return f32x8(fmt, marker, arr, ro, i), codegen


@intrinsic
def load_float1(typingctx, fmt, marker, arr, ro, i):
    """Weight i of format `fmt` of the row at byte `ro` of a uint8 array, as f32."""
    size = _float_fmt(fmt)
    ints = isinstance(ro, types.Integer) and isinstance(i, types.Integer)
    if not (size and _is_marker(marker) and _is_bytes(arr) and ints):
        return None
    variant = _variant(marker)

    def codegen(context, builder, sig, args):
        raw = builder.load(_weight_ptr(context, builder, sig, args, size, ir.IntType(8 * size)), align=1)
        return _floats(builder, fmt, variant, raw, 1)

    return types.float32(fmt, marker, arr, ro, i), codegen


@intrinsic
def or_qh(typingctx, q, arr, o, qh_off, shift):
    """`q | (((byte >> shift) & 1) << 4)` for the 32 bytes at o + qh_off (Q5_K's fifth bits), or
    `q` when qh_off is 0 (Q4_K).

    The branch is in LLVM IR: in Numba IR, a branch inside an inlined helper keeps Numba from
    pruning the helper's reference counting of `arr` (library calls per chunk, 3x slower in a
    serial kernel), and a select instead costs Q4_K two loads per chunk.
    """
    if not (q == i8x32 and _is_bytes(arr) and isinstance(o, types.Integer) and isinstance(qh_off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        qh = context.cast(builder, args[3], qh_off, types.intp)
        entry = builder.block
        with builder.if_then(builder.icmp_signed("!=", qh, ir.Constant(qh.type, 0))):
            off = builder.add(context.cast(builder, args[2], o, types.intp), qh)
            v = builder.load(_ptr(context, builder, arr, args[1], types.intp, off, _V32I8), align=1)
            s = _splat(builder, _int_arg(context, builder, shift, args[4], _I16), _V16I16)
            v = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), s), _V32I8)
            v = builder.and_(v, ir.Constant(_V32I8, [1] * 32))
            v = builder.bitcast(builder.shl(builder.bitcast(v, _V16I16), ir.Constant(_V16I16, [4] * 16)), _V32I8)
            high = builder.or_(args[0], v)
            then = builder.block
        out = builder.phi(_V32I8)
        out.add_incoming(args[0], entry)
        out.add_incoming(high, then)
        return out

    return i8x32(q, arr, o, qh_off, shift), codegen
