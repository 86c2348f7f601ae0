"""Numba port of llama.cpp's `quantize_row_q4_K_ref` (ggml/src/ggml-quants.c).

The search for each 32-value sub-block's scale and min (`make_qkx2_quants`) loops ~21 times over the
values, which is why this is compiled. Every operation is float32 in the C code's order, with no
fused multiply-adds, so the bytes can match a llama.cpp built without FP contraction.
Legend: B = Q4_K blocks (256 values each), 144 bytes per block:
d (f16) | dmin (f16) | scales (12 bytes, 8 x 6-bit scale + 8 x 6-bit min) | qs (128 bytes of nibbles).
"""

# The `if a < b: b = a` forms mirror the C code exactly (min()/max() treat NaN and -0.0 differently).
# ruff: noqa: PLR1730

from __future__ import annotations

import numpy as np
from numba import njit, prange

QK_K = 256  # values per Q4_K block
Q4_K_BYTES = 144  # bytes per Q4_K block

# quantize_row_q4_K_ref's call: make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1.f, 0.1f, 20, false)
_NMAX = 15
_RMIN = np.float32(-1.0)
_RDELTA = np.float32(0.1)
_NSTEP = 20


@njit(cache=True, nogil=True)
def _nearest_int(fval, fbuf, ubuf):
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits (round half to even).

    fbuf: float32 (1,) scratch; ubuf: its uint32 view. Mirrors the C bit trick for every input.
    """
    fbuf[0] = fval + np.float32(12582912.0)
    return np.int64(ubuf[0] & 0x007FFFFF) - 0x00400000


@njit(cache=True, nogil=True)
def _fp32_to_fp16_bits(f, fbuf, ubuf):
    """IEEE binary16 bits of float32 `f`, rounded to nearest even (what F16C's vcvtps2ph gives)."""
    fbuf[0] = f
    u = np.int64(ubuf[0])
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: quiet it, keep the top payload bits
        return sign | 0x7E00 | ((a >> 13) & 0x3FF)
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # normal half: round mantissa at bit 13, rebias exponent 127 -> 15
        return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)
    if a > 0x33000000:  # subnormal half: units of 2^-24
        shift = 126 - (a >> 23)
        mant = (a & 0x7FFFFF) | 0x800000
        q = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1) == 1):
            q += 1
        return sign | q
    return sign  # below half of the smallest subnormal: signed zero


@njit(cache=True, nogil=True)
def _fp16_bits_to_fp32(h, fbuf, ubuf):
    """Exact float32 value of binary16 bits `h` (GGML_FP16_TO_FP32)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero or subnormal: m * 2^-24, exact in float32
        v = np.float32(m) * np.float32(5.960464477539063e-08)
        return -v if sign else v
    if e == 31:
        ubuf[0] = sign | 0x7F800000 | (m << 13)
    else:
        ubuf[0] = sign | ((e + 112) << 23) | (m << 13)
    return fbuf[0]


@njit(cache=True, nogil=True)
def _make_qkx2_quants(x, x0, n, nmax, weights, L, l0, Laux, rmin, rdelta, nstep, fbuf, ubuf):
    """make_qkx2_quants with use_mad=false on x[x0:x0+n]; writes L[l0:l0+n].

    Returns (scale, the_min) where value ~= scale * L - the_min. Note `min` moves inside the search
    loop when a better fit is found, exactly as in the C code.
    """
    zero = np.float32(0.0)
    fnmax = np.float32(nmax)
    mn = x[x0]
    mx = x[x0]
    sum_w = weights[0]
    sum_x = sum_w * x[x0]
    for i in range(1, n):
        v = x[x0 + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if mn > zero:
        mn = zero
    if mx == mn:
        for i in range(n):
            L[l0 + i] = 0
        return zero, -mn
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = zero
    for i in range(n):
        v = x[x0 + i]
        q = _nearest_int(iscale * (v - mn), fbuf, ubuf)
        q = max(0, min(nmax, q))
        L[l0 + i] = q
        diff = scale * np.float32(q) + mn - v
        diff = diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fnmax) / (mx - mn)
        sum_l = zero
        sum_l2 = zero
        sum_xl = zero
        for i in range(n):
            v = x[x0 + i]
            q = _nearest_int(iscale * (v - mn), fbuf, ubuf)
            q = max(0, min(nmax, q))
            Laux[i] = q
            fq = np.float32(q)
            w = weights[i]
            sum_l += w * fq
            sum_l2 += w * fq * fq
            sum_xl += w * fq * v
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > zero:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > zero:
                this_min = zero
                this_scale = sum_xl / sum_l2
            cur_error = zero
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[x0 + i]
                diff = diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[l0 + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, nogil=True)
def _quantize_block_q4_k(out, b, x, nmax, rmin, rdelta, nstep, weights, L, Laux, scales, mins, fbuf, ubuf):
    """quantize_row_q4_K_ref for one block: x (256,) float32 -> out[b] (144,) uint8."""
    zero = np.float32(0.0)
    max_scale = zero
    max_min = zero
    for j in range(8):  # 8 sub-blocks of 32
        sum_x2 = zero
        for i in range(32):
            v = x[32 * j + i]
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for i in range(32):
            weights[i] = av_x + np.abs(x[32 * j + i])
        s, m = _make_qkx2_quants(x, 32 * j, 32, nmax, weights, L, 32 * j, Laux, rmin, rdelta, nstep, fbuf, ubuf)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m

    # 6-bit scales and mins relative to the block's largest; the C code stores nearest_int in a uint8.
    inv_scale = np.float32(63.0) / max_scale if max_scale > zero else zero
    inv_min = np.float32(63.0) / max_min if max_min > zero else zero
    sc = out[b, 4:16]
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j], fbuf, ubuf) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j], fbuf, ubuf) & 0xFF)
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    dh = _fp32_to_fp16_bits(max_scale / np.float32(63.0), fbuf, ubuf)
    mh = _fp32_to_fp16_bits(max_min / np.float32(63.0), fbuf, ubuf)
    out[b, 0] = dh & 0xFF
    out[b, 1] = dh >> 8
    out[b, 2] = mh & 0xFF
    out[b, 3] = mh >> 8

    # Re-quantise every value with the scales as stored (f16 d times 6-bit scale).
    d_all = _fp16_bits_to_fp32(dh, fbuf, ubuf)
    dmin_all = _fp16_bits_to_fp32(mh, fbuf, ubuf)
    for j in range(8):
        if j < 4:
            s6 = sc[j] & 63
            m6 = sc[j + 4] & 63
        else:
            s6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
            m6 = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        d = d_all * np.float32(s6)
        if d == zero:
            continue  # keep the levels make_qkx2_quants chose
        dm = dmin_all * np.float32(m6)
        for i in range(32):
            q = _nearest_int((x[32 * j + i] + dm) / d, fbuf, ubuf)
            L[32 * j + i] = max(0, min(15, q))

    # Nibbles: byte l of each 32-byte chunk holds value l (low) and value l + 32 (high) of 64.
    for c in range(4):
        for i in range(32):
            out[b, 16 + 32 * c + i] = L[64 * c + i] | (L[64 * c + i + 32] << 4)


@njit(cache=True, nogil=True, parallel=True)
def quantize_q4_k_kernel(out, x, nmax, rmin, rdelta, nstep):
    """out: (B, 144) uint8; x: (B, 256) float32. Parallel over blocks."""
    n_blocks = x.shape[0]
    for b in prange(n_blocks):
        weights = np.empty(32, dtype=np.float32)
        L = np.empty(256, dtype=np.uint8)
        Laux = np.empty(32, dtype=np.uint8)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        fbuf = np.empty(1, dtype=np.float32)
        ubuf = fbuf.view(np.uint32)
        _quantize_block_q4_k(out, b, x[b], nmax, rmin, rdelta, nstep, weights, L, Laux, scales, mins, fbuf, ubuf)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of `x` (B, 256) float32 as (B, 144) uint8, like llama.cpp's quantize_row_q4_K_ref."""
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != QK_K:
        raise ValueError(f"quantize_q4_k wants float32 (B, {QK_K}), got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x)
    out = np.zeros((x.shape[0], Q4_K_BYTES), dtype=np.uint8)
    quantize_q4_k_kernel(out, x, _NMAX, _RMIN, _RDELTA, _NSTEP)
    return out
