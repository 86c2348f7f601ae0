"""Rotary tables with YaRN scaling, as transformers computes them (inv_freq in float32, cos and sin × the
attention factor). Plain RoPE tables are kernels/ops.rope_tables.

Legend: T tokens, r rotary dimensions.
"""

from __future__ import annotations

import math

import numpy as np


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_tables(positions: np.ndarray, r: int, base: float, yarn: tuple | None,
                truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, r/2). yarn: (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    mscale_all_dim) or None for plain RoPE; truncate: round the correction range to whole dimensions."""
    pos_freqs = base ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r))  # (r/2,)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    factor_att = 1.0
    if yarn is not None:
        factor, orig, beta_fast, beta_slow, mscale, mscale_all = yarn

        def corr(rot):
            return (r * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr(beta_fast), corr(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extra = (np.float32(1.0) - ramp).astype(np.float32)
        interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        inv_freq = (interp * (np.float32(1.0) - extra) + inv_freq * extra).astype(np.float32)
        factor_att = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor, 1.0)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, r/2)
    cos = (np.cos(freqs) * np.float32(factor_att)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(factor_att)).astype(np.float32)
    return cos, sin
