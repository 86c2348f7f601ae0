"""The 32-value block types with one f16 scale: Q8_0 and Q4_0 (ggml-common.h, ggml-quants.c)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import f16, roundf


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """block_q8_0: d (f16) | qs[32] (int8); y = qs * d."""
    d = f16(blocks[:, :2])  # (B, 1)
    qs = blocks[:, 2:].view(np.int8).astype(np.float32)  # (B, 32)
    return qs * d


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """block_q4_0: d (f16) | qs[16]; value j in the low nibble of byte j, value j+16 in the high one."""
    d = f16(blocks[:, :2])  # (B, 1)
    qs = blocks[:, 2:]  # (B, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # (B, 32)
    return d * q.astype(np.float32)


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d = amax / 127, qs = roundf(x / d)."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (B, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    qs = roundf(blocks * inv).astype(np.int8)  # (B, 32)
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



DEQUANTIZE = {T.Q8_0: _dequantize_q8_0, T.Q4_0: _dequantize_q4_0}
QUANTIZE = {T.Q8_0: _quantize_q8_0, T.Q4_0: _quantize_q4_0}
