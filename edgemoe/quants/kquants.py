"""The K types: 256-value super-blocks with sub-block scales (ggml-common.h, ggml-quants.c)."""

from __future__ import annotations

import numpy as np
from gguf import QK_K
from gguf import GGMLQuantizationType as T

from ..kernels.quantize_k import quantize_q4_k
from .common import f16


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


def _q2_groups(qs: np.ndarray) -> np.ndarray:
    """(B, 64) bytes -> (B, 16, 16) 2-bit levels of the 16 sub-blocks: value 128n + 32k + l is
    bits 2k, 2k+1 of qs[32n + l] (Q2_K's quants and Q3_K's low bits)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)


def _dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """block_q2_K: scales[16] (low nibble scale | high nibble min, per 16 values) | qs[64] | d | dmin;
    y = d*sc * q - dmin*m."""
    sc = blocks[:, 0:16]  # (B, 16)
    d = f16(blocks[:, 80:82])  # (B, 1)
    dmin = f16(blocks[:, 82:84])  # (B, 1)
    dl = (d * (sc & 0x0F).astype(np.float32))[:, :, None]  # (B, 16, 1)
    ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]  # (B, 16, 1)
    q = _q2_groups(blocks[:, 16:80]).astype(np.float32)  # (B, 16, 16)
    return (dl * q - ml).reshape(-1, QK_K)


def _scales_q3_k(scales: np.ndarray) -> np.ndarray:
    """12 bytes -> (B, 16) 6-bit scales: scale i has its low 4 bits in byte i % 8 (the low nibble for
    i < 8, the high one after) and its top 2 bits at bits 2(i // 4) of byte 8 + i % 4."""
    lo = scales[:, 0:8]
    nibbles = np.concatenate([lo & 0x0F, lo >> 4], axis=1)  # (B, 16)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    top = ((scales[:, None, 8:12] >> shifts) & 3).reshape(-1, 16)  # (B, 16)
    return nibbles | (top << 4)


def _dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """block_q3_K: hmask[32] | qs[64] | scales[12] | d; y = d*(sc - 32) * q per 16 values, where
    q = low 2 bits - 4, plus 4 again when the value's hmask bit is set: bit j of hmask[l] belongs to
    value 32j + l."""
    hbit = (blocks[:, None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # (B, 8, 32)
    low = _q2_groups(blocks[:, 32:96]).astype(np.int8)  # (B, 16, 16)
    q = (low - (4 * (1 - hbit)).astype(np.int8).reshape(-1, 16, 16)).astype(np.float32)  # (B, 16, 16)
    sc = (_scales_q3_k(blocks[:, 96:108]).astype(np.int8) - np.int8(32)).astype(np.float32)  # (B, 16)
    d = f16(blocks[:, 108:110])  # (B, 1)
    return ((d * sc)[:, :, None] * q).reshape(-1, QK_K)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """block_q4_K: d (f16) | dmin (f16) | scales[12] | qs[128]; y = d*sc * q - dmin*m per 32 values."""
    d = f16(blocks[:, 0:2])  # (B, 1)
    dmin = f16(blocks[:, 2:4])  # (B, 1)
    sc, mn = _scale_min_k4(blocks[:, 4:16])  # (B, 8)
    dl = (d * sc.astype(np.float32))[:, :, None]  # (B, 8, 1)
    ml = (dmin * mn.astype(np.float32))[:, :, None]  # (B, 8, 1)
    q = _q4_k_nibbles(blocks[:, 16:144]).astype(np.float32)  # (B, 8, 32)
    return (dl * q - ml).reshape(-1, QK_K)


def _dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """block_q5_K: d | dmin | scales[12] | qh[32] | qs[128]; bit j of qh[l] is the 5th bit of value l of sub-block j."""
    d = f16(blocks[:, 0:2])  # (B, 1)
    dmin = f16(blocks[:, 2:4])  # (B, 1)
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
    d = f16(blocks[:, 208:210])  # (B, 1)
    return ((d * scales)[:, :, None] * q).reshape(-1, QK_K)


DEQUANTIZE = {
    T.Q2_K: _dequantize_q2_k,
    T.Q3_K: _dequantize_q3_k,
    T.Q4_K: _dequantize_q4_k,
    T.Q5_K: _dequantize_q5_k,
    T.Q6_K: _dequantize_q6_k,
}
QUANTIZE = {T.Q4_K: quantize_q4_k}  # Numba port of quantize_row_q4_K_ref
