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



DEQUANTIZE = {T.Q4_K: _dequantize_q4_k, T.Q5_K: _dequantize_q5_k, T.Q6_K: _dequantize_q6_k}
QUANTIZE = {T.Q4_K: quantize_q4_k}  # Numba port of quantize_row_q4_K_ref
