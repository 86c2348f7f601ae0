"""MXFP4 (gpt-oss's expert weights): 32 E2M1 codes with one E8M0 power-of-two scale."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedError

# kvalues_mxfp4 (ggml-common.h): the 16 E2M1 codes' values, doubled so they are integers; the E8M0
# scale is halved to match (e8m0_to_fp32_half). Code bit 3 is the sign.
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: E8M0 byte e (uint8) -> 2**(e - 128) as float32, exactly.

    e 0 and 1 are the subnormals 2**-128 and 2**-127; e 255 is 2**127 (ggml reads no NaN code).
    """
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << (e & np.uint32(1)), (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def from_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An HF MXFP4 tensor (gpt-oss's released checkpoints) as ggml `block_mxfp4` rows, moving bits only.

    blocks: (..., G, 16) uint8, value 2k of a group in the low nibble of byte k, value 2k+1 in the high one;
    scales: (..., G) uint8 E8M0 exponents (2**(s - 127) times the E2M1 values, which ggml keeps doubled with
    the scale halved: the same numbers). → (..., G * 17): per group the scale byte, then byte j holding value j
    (low nibble) and value j + 16 (high), as llama.cpp's converter writes them."""
    v = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # (..., G, 32) codes
    out = np.concatenate([scales[..., None], v[..., :16] | (v[..., 16:] << 4)], axis=-1)  # (..., G, 17)
    return np.ascontiguousarray(out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17))


def _dequantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    """block_mxfp4: e (E8M0) | qs[16]; value j in the low nibble of byte j, value j+16 in the high one;
    y = kvalues_mxfp4[code] * e8m0_to_fp32_half(e), one exact product (or inf) per value."""
    d = e8m0_to_fp32_half(blocks[:, :1])  # (B, 1)
    qs = blocks[:, 1:]  # (B, 16)
    q = KVALUES_MXFP4[np.concatenate([qs & 0x0F, qs >> 4], axis=1)]  # (B, 32)
    return d * q.astype(np.float32)


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



DEQUANTIZE = {T.MXFP4: _dequantize_mxfp4}
QUANTIZE = {T.MXFP4: _quantize_mxfp4}
