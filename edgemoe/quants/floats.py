"""The float types: F32, F16 and BF16 (one value per block)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


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



DEQUANTIZE = {T.F32: _dequantize_f32, T.F16: _dequantize_f16, T.BF16: _dequantize_bf16}
QUANTIZE = {T.F32: _quantize_f32, T.F16: _quantize_f16, T.BF16: _quantize_bf16}
