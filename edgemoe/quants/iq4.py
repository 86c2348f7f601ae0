"""The non-linear 4-bit types IQ4_NL and IQ4_XS: 4-bit indices into ggml's kvalues_iq4nl table.

gguf.quants has no quantiser for either (llama.cpp's searches scales against an importance
weighting), so only the dequantisers are here: files of these types come from llama-quantize.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import f16

# kvalues_iq4nl (ggml-common.h): the 16 non-linear levels, int8.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def _levels(qs: np.ndarray) -> np.ndarray:
    """(B, n, 16) code bytes -> (B, n, 32) kvalues as float32: byte j's low nibble is value j of its
    32, the high nibble value j + 16."""
    return KVALUES_IQ4NL[np.concatenate([qs & 0x0F, qs >> 4], axis=-1)].astype(np.float32)


def _dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """block_iq4_nl (18 B): d (f16) | qs[16]; y = d * kvalues[code]."""
    d = f16(blocks[:, :2])  # (B, 1)
    return d * _levels(blocks[:, 2:])  # (B, 32)


def _dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """block_iq4_xs (136 B): d (f16) | scales_h (u16) | scales_l[4] | qs[128], 8 sub-blocks of 32.

    Sub-block i: 6-bit ls = nibble i of scales_l (low nibble first) | bits 2i, 2i+1 of scales_h << 4,
    dl = d * (ls - 32) in f32, then y = dl * kvalues[code], codes in qs[16i : 16i + 16] as IQ4_NL's.
    """
    n = blocks.shape[0]
    d = f16(blocks[:, :2])  # (B, 1)
    sh = blocks[:, 2:4].copy().view(np.uint16).astype(np.int32)  # (B, 1)
    sl = blocks[:, 4:8].astype(np.int32)  # (B, 4)
    lo = np.stack([sl & 0x0F, sl >> 4], axis=2).reshape(n, 8)  # (B, 8) nibble i of scales_l
    hi = (sh >> (2 * np.arange(8))) & 3  # (B, 8)
    dl = d * ((lo | (hi << 4)) - 32).astype(np.float32)  # (B, 8)
    q = _levels(blocks[:, 8:].reshape(n, 8, 16))  # (B, 8, 32)
    return (dl[:, :, None] * q).reshape(n, 256)


DEQUANTIZE = {T.IQ4_NL: _dequantize_iq4_nl, T.IQ4_XS: _dequantize_iq4_xs}
QUANTIZE: dict = {}
