"""Block-size table and NumPy reference (de)quantisation for each GGML type we support.

This is the oracle the Numba matmul kernels are tested against, so it is written for clarity, not
speed. Each type has one function mirroring the C block layout (ggml-common.h) and doing its float32
arithmetic in the order of llama.cpp's ggml-quants.c, so the results are bit-identical to
`gguf.quants` and to llama.cpp. Legend: B = blocks, QK_K = 256 values per K-quant super-block.
The block geometry of each type is `qtensor.FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import QK_K, GGMLQuantizationType

from .errors import UnsupportedError
from .kernels.quantize_k import quantize_q4_k
from .qtensor import FORMATS, QTensor, check_supported, row_bytes

T = GGMLQuantizationType

# (values per block, bytes per block) of each supported type.
QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {t: (f.values, f.bytes) for t, f in FORMATS.items()}

# kvalues_mxfp4 (ggml-common.h): the 16 E2M1 codes' values, doubled so they are integers; the E8M0
# scale is halved to match (e8m0_to_fp32_half). Code bit 3 is the sign.
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)

# Values handled per NumPy pass, to bound temporaries on big tensors (16 MiB per float32 temporary).
_CHUNK_VALUES = 1 << 22


def _f16(b: np.ndarray) -> np.ndarray:
    """(B, 2) uint8 little-endian f16 field -> (B, 1) float32."""
    return b.view(np.float16).astype(np.float32)


# ---------------------------------------------------------------- dequantisation: (B, bytes) -> (B, values)


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """block_q8_0: d (f16) | qs[32] (int8); y = qs * d."""
    d = _f16(blocks[:, :2])  # (B, 1)
    qs = blocks[:, 2:].view(np.int8).astype(np.float32)  # (B, 32)
    return qs * d


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """block_q4_0: d (f16) | qs[16]; value j in the low nibble of byte j, value j+16 in the high one."""
    d = _f16(blocks[:, :2])  # (B, 1)
    qs = blocks[:, 2:]  # (B, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # (B, 32)
    return d * q.astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (B, 8) uint8.

    Bytes 0-3: scale 0-3 low 6 bits | scale 4-7 top 2 bits; bytes 4-7 the same for mins;
    bytes 8-11: scale 4-7 low nibble | min 4-7 low nibble << 4.
    """
    s_lo, m_lo, mix = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([s_lo & 63, (mix & 0x0F) | ((s_lo >> 6) << 4)], axis=1)
    mn = np.concatenate([m_lo & 63, (mix >> 4) | ((m_lo >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(B, 128) bytes -> (B, 8, 32) levels: sub-block 2c is chunk c's low nibbles, 2c+1 its high ones."""
    qs = qs.reshape(-1, 4, 1, 32)
    return ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(-1, 8, 32)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """block_q4_K: d (f16) | dmin (f16) | scales[12] | qs[128]; y = d*sc * q - dmin*m per 32 values."""
    d = _f16(blocks[:, 0:2])  # (B, 1)
    dmin = _f16(blocks[:, 2:4])  # (B, 1)
    sc, mn = _scale_min_k4(blocks[:, 4:16])  # (B, 8)
    dl = (d * sc.astype(np.float32))[:, :, None]  # (B, 8, 1)
    ml = (dmin * mn.astype(np.float32))[:, :, None]  # (B, 8, 1)
    q = _q4_k_nibbles(blocks[:, 16:144]).astype(np.float32)  # (B, 8, 32)
    return (dl * q - ml).reshape(-1, QK_K)


def _dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """block_q5_K: d | dmin | scales[12] | qh[32] | qs[128]; bit j of qh[l] is the 5th bit of value l of sub-block j."""
    d = _f16(blocks[:, 0:2])  # (B, 1)
    dmin = _f16(blocks[:, 2:4])  # (B, 1)
    sc, mn = _scale_min_k4(blocks[:, 4:16])  # (B, 8)
    dl = (d * sc.astype(np.float32))[:, :, None]  # (B, 8, 1)
    ml = (dmin * mn.astype(np.float32))[:, :, None]  # (B, 8, 1)
    qh = (blocks[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (B, 8, 32)
    q = (_q4_k_nibbles(blocks[:, 48:176]) | (qh << 4)).astype(np.float32)  # (B, 8, 32)
    return (dl * q - ml).reshape(-1, QK_K)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """block_q6_K: ql[128] | qh[64] | scales[16] (int8) | d (f16); y = d*scale * (q - 32) per 16 values.

    Value 128h + 32k + l (half h, quarter k, l < 32) takes its low 4 bits from ql[64h + l + 32(k&1)]
    (low nibble for k < 2, high for k >= 2) and its top 2 bits from qh[32h + l] >> 2k.
    """
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)  # (B, h, ., k&1, l)
    lo = ((ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)) & 0x0F).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (B, h, ., l)
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (B, h, k, l)
    q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(-1, 16, 16).astype(np.float32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (B, 16)
    d = _f16(blocks[:, 208:210])  # (B, 1)
    return ((d * scales)[:, :, None] * q).reshape(-1, QK_K)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: E8M0 byte e (uint8) -> 2**(e - 128) as float32, exactly.

    e 0 and 1 are the subnormals 2**-128 and 2**-127; e 255 is 2**127 (ggml reads no NaN code).
    """
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << (e & np.uint32(1)), (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def _dequantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    """block_mxfp4: e (E8M0) | qs[16]; value j in the low nibble of byte j, value j+16 in the high one;
    y = kvalues_mxfp4[code] * e8m0_to_fp32_half(e), one exact product (or inf) per value."""
    d = e8m0_to_fp32_half(blocks[:, :1])  # (B, 1)
    qs = blocks[:, 1:]  # (B, 16)
    q = KVALUES_MXFP4[np.concatenate([qs & 0x0F, qs >> 4], axis=1)]  # (B, 32)
    return d * q.astype(np.float32)


_DEQUANTIZE: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: _dequantize_f32,
    T.F16: _dequantize_f16,
    T.BF16: _dequantize_bf16,
    T.Q8_0: _dequantize_q8_0,
    T.Q4_0: _dequantize_q4_0,
    T.Q4_K: _dequantize_q4_k,
    T.Q5_K: _dequantize_q5_k,
    T.Q6_K: _dequantize_q6_k,
    T.MXFP4: _dequantize_mxfp4,
}


# ---------------------------------------------------------------- quantisation: (B, values) float32 -> (B, bytes)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), exactly as gguf.quants.np_roundf computes it (inf -> nan too)."""
    a = np.abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(2 * (a - floored)))


def _quantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.uint8)


def _quantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype(np.float16).view(np.uint8)  # round to nearest even, like F16C


def _quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: NaN -> quiet NaN (truncated), else round to nearest even."""
    u = blocks.view(np.uint32)  # (B, 1)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16
    h = np.where(is_nan, (u >> 16) | np.uint32(64), rounded)
    return h.astype(np.uint16).view(np.uint8)


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d = amax / 127, qs = roundf(x / d)."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (B, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    qs = _roundf(blocks * inv).astype(np.int8)  # (B, 32)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs.view(np.uint8)], axis=1)


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref: d = (value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5))."""
    imax = np.abs(blocks).argmax(axis=1)[:, None]  # first of equal magnitudes, as in the C loop
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-8)  # (B, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)  # (B, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)  # (B, 16)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


def _quantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_mxfp4_ref: e = floor(log2(amax)) - 2 + 127 (0 for an all-zero block), then per value
    the first code of least |kvalue * d - x|, d = e8m0_to_fp32_half(e).

    floor(log2) is NumPy's float32 log2, as gguf.quants uses. A block whose largest |value| is below
    2**-125 would need e < 0, which C leaves undefined (and gguf.quants wraps to a huge scale, decoding
    to zeros); here it takes e = 0, the smallest scale. Blocks with inf or NaN are rejected. The code
    search is C's loop (a strict '<' over the 16 codes), vectorised over values: (B, 32) temporaries.
    """
    amax = np.abs(blocks).max(axis=1, keepdims=True)  # (B, 1)
    if not np.isfinite(amax).all():
        raise UnsupportedError("MXFP4 cannot hold inf or NaN; the weights are corrupt")
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)  # (B, 1) float32
    e = np.maximum(e, 0).astype(np.uint8)
    d = e8m0_to_fp32_half(e)  # (B, 1)
    q = np.zeros(blocks.shape, np.uint8)  # (B, 32) best code so far
    best = np.abs(d * np.float32(KVALUES_MXFP4[0]) - blocks)  # (B, 32) its error
    for code in range(1, 16):
        err = np.abs(d * np.float32(KVALUES_MXFP4[code]) - blocks)
        better = err < best
        q[better] = code
        best = np.where(better, err, best)
    return np.concatenate([e, q[:, :16] | (q[:, 16:] << 4)], axis=1)


_QUANTIZE: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: _quantize_f32,
    T.F16: _quantize_f16,
    T.BF16: _quantize_bf16,
    T.Q8_0: _quantize_q8_0,
    T.Q4_0: _quantize_q4_0,
    T.Q4_K: quantize_q4_k,  # Numba port of quantize_row_q4_K_ref
    T.MXFP4: _quantize_mxfp4,
}


# ---------------------------------------------------------------- public API


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_cols: int) -> np.ndarray:
    """Decode raw rows to float32.

    data: uint8 (..., row_bytes) where row_bytes holds `n_cols` values stored as `qtype`.
    Returns float32 (..., n_cols), bit-identical to gguf.quants.dequantize / llama.cpp.
    """
    qtype = check_supported(qtype, "dequantize")
    n_bytes = row_bytes(qtype, n_cols)
    if data.dtype != np.uint8 or data.ndim == 0 or data.shape[-1] != n_bytes:
        raise ValueError(f"want uint8 (..., {n_bytes}) for {n_cols} {qtype.name} values, got {data.dtype} {data.shape}")
    block_size, type_size = QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, type_size)  # (B, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)  # (B, block_size)
    step = max(1, _CHUNK_VALUES // block_size)
    fn = _DEQUANTIZE[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales decode to inf/NaN, as in C
        for s in range(0, blocks.shape[0], step):
            out[s : s + step] = fn(blocks[s : s + step])
    return out.reshape(*data.shape[:-1], n_cols)


def dequantize_qtensor(w: QTensor) -> np.ndarray:
    """The weight as float32 (rows, cols)."""
    return dequantize(w.data, w.qtype, w.cols)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode rows of values as `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_K or MXFP4).

    x: (..., cols), converted to float32 first. Returns uint8 (..., row_bytes). F16, BF16, Q8_0, Q4_0
    and MXFP4 are bit-identical to gguf.quants.quantize; Q4_K ports llama.cpp's quantize_row_q4_K_ref.
    """
    qtype = check_supported(qtype, "quantize")
    fn = _QUANTIZE.get(qtype)
    if fn is None:
        names = ", ".join(t.name for t in _QUANTIZE)
        raise UnsupportedError(
            f"quantising to {qtype.name} is not implemented (only {names}); "
            "pick one of those, or quantise the model with llama-quantize"
        )
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize wants an array of shape (..., cols), got a scalar")
    n_bytes = row_bytes(qtype, x.shape[-1])
    block_size, type_size = QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block_size)  # (B, block_size)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)  # (B, type_size)
    step = max(1, _CHUNK_VALUES // block_size)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = fn(blocks[s : s + step])
    return out.reshape(*x.shape[:-1], n_bytes)


def quantize_qtensor(x: np.ndarray, qtype: GGMLQuantizationType) -> QTensor:
    """Quantise a 2-D float matrix (rows, cols) into a QTensor of `qtype`."""
    if np.ndim(x) != 2:
        raise ValueError(f"quantize_qtensor wants a 2-D (rows, cols) matrix, got shape {np.shape(x)}")
    rows, cols = np.shape(x)
    return QTensor.from_array(quantize(x, qtype), qtype, rows, cols)
