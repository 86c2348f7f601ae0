"""Helpers shared by the per-type block codecs."""

from __future__ import annotations

import numpy as np


def f16(b: np.ndarray) -> np.ndarray:
    """(B, 2) uint8 little-endian f16 field -> (B, 1) float32."""
    return b.view(np.float16).astype(np.float32)


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), exactly as gguf.quants.np_roundf computes it (inf -> nan too)."""
    a = np.abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(2 * (a - floored)))
