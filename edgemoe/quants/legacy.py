"""The 32-value block types with one f16 scale (Q8_0, Q4_0, Q5_0) or a scale and a minimum (Q4_1, Q5_1)
(ggml-common.h, ggml-quants.c). llama.cpp's quantiser falls back to these for rows whose width is not a
multiple of 256 (Qwen1.5-MoE's and DeepSeek-V2-Lite's 1408-wide experts)."""

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


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(B, 16) bytes -> (B, 32) uint8 values 0..15: value j in the low nibble of byte j, j+16 in the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(B, 4) bytes of a little-endian u32 -> (B, 32) uint8: bit j of it, shifted to 0x10, for value j."""
    bits = qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)  # (B, 32)
    return ((bits & 1) << 4).astype(np.uint8)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """block_q4_1: d (f16) | m (f16) | qs[16] nibbles; y = d * q + m."""
    d, m = f16(blocks[:, :2]), f16(blocks[:, 2:4])  # (B, 1) each
    return d * _nibbles(blocks[:, 4:]).astype(np.float32) + m


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """block_q5_0: d (f16) | qh[4] (fifth bits, a u32) | qs[16] nibbles; y = d * ((q | bit << 4) - 16)."""
    d = f16(blocks[:, :2])  # (B, 1)
    q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])).astype(np.int8) - np.int8(16)  # (B, 32)
    return d * q.astype(np.float32)


def _dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """block_q5_1: d (f16) | m (f16) | qh[4] | qs[16]; y = d * (q | bit << 4) + m."""
    d, m = f16(blocks[:, :2]), f16(blocks[:, 2:4])  # (B, 1) each
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])  # (B, 32) 0..31
    return d * q.astype(np.float32) + m


def _pack(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 32) values 0..31 -> (qh (B, 4): bit j of a u32 = bit 4 of value j, qs (B, 16) nibbles)."""
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)  # the high nibble's fifth bit falls off the byte
    qh = np.packbits(q >> 4, axis=1, bitorder="little")  # (B, 4)
    return qh, qs


def _min_scale(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref / q5_1_ref: (d, m, q): d = (max - min) / levels, m = min,
    q = min(levels, trunc((x - min) / d + 0.5)), as gguf-py computes them."""
    hi = blocks.max(axis=1, keepdims=True)  # (B, 1)
    lo = blocks.min(axis=1, keepdims=True)  # (B, 1)
    d = (hi - lo) / np.float32(levels)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, levels)  # (B, 32)
    return d, lo, q


def _quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _min_scale(blocks, 15)
    qs = q[:, :16] | (q[:, 16:] << 4)  # (B, 16)
    return np.concatenate([d.astype(np.float16).view(np.uint8), m.astype(np.float16).view(np.uint8), qs], axis=1)


def _quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_0_ref: d = (value of largest magnitude) / -16, q = min(31, trunc(x / d + 16.5))."""
    imax = np.abs(blocks).argmax(axis=1)[:, None]  # first of equal magnitudes, as in the C loop
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-16)  # (B, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(blocks * inv + np.float32(16.5)).astype(np.uint8).clip(0, 31)  # (B, 32)
    qh, qs = _pack(q)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qh, qs], axis=1)


def _quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _min_scale(blocks, 31)
    qh, qs = _pack(q)
    return np.concatenate([d.astype(np.float16).view(np.uint8), m.astype(np.float16).view(np.uint8), qh, qs], axis=1)


DEQUANTIZE = {
    T.Q8_0: _dequantize_q8_0,
    T.Q4_0: _dequantize_q4_0,
    T.Q4_1: _dequantize_q4_1,
    T.Q5_0: _dequantize_q5_0,
    T.Q5_1: _dequantize_q5_1,
}
QUANTIZE = {
    T.Q8_0: _quantize_q8_0,
    T.Q4_0: _quantize_q4_0,
    T.Q4_1: _quantize_q4_1,
    T.Q5_0: _quantize_q5_0,
    T.Q5_1: _quantize_q5_1,
}
