"""The lattice (grid) types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (ggml-common.h,
ggml-quants.c dequantize_row_iq*): 256-value super-blocks whose values go 8 at a time as one point of a
fixed lattice, the "grid" (IQ3's points have 4 values: two make a group of 8), plus sign bits, 3- or
4-bit sub-block scales and one f16 scale.

    IQ2_XXS, IQ2_XS, IQ2_S  grid values 8, 25, 43; a sign bit per value; y = d*(0.5 + s)*0.25 * grid * sign
    IQ3_XXS                 grid values 4 .. 62;   a sign bit per value; y = d*(0.5 + s)*0.5  * grid * sign
    IQ3_S                   grid values 1 .. 15;   a sign bit per value; y = d*(1 + 2s)       * grid * sign
    IQ1_S, IQ1_M            grid values -1, 0, 1;  a shift delta = +-1/8 per 32 (IQ1_M: per 8) values;
                            y = d*(2s + 1) * (grid + delta)

IQ2_XXS, IQ2_XS and IQ3_XXS store 7 sign bits per 8 values, an index into `ksigns` (the 8th bit makes the
count of minus signs even). The tables are gguf-py's (gguf.quants packs ggml-common.h's into hex
strings), unpacked by `grids()` at first use; tests/test_iquants.py checks them against ggml-common.h
and against llama.cpp's compiled dequantisers. Legend: B = blocks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import gguf.quants as gq
import numpy as np
from gguf import GGMLQuantizationType as T

from .common import f16


class Grids(NamedTuple):
    """ggml-common.h's lattice tables, one point per row (read-only arrays)."""

    iq2xxs: np.ndarray  # (256, 8) uint8, values 8, 25, 43 (iq2xxs_grid)
    iq2xs: np.ndarray  # (512, 8) uint8 (iq2xs_grid)
    iq2s: np.ndarray  # (1024, 8) uint8 (iq2s_grid)
    iq3xxs: np.ndarray  # (256, 4) uint8, values 4 .. 62 (iq3xxs_grid)
    iq3s: np.ndarray  # (512, 4) uint8, values 1 .. 15 (iq3s_grid)
    iq1s: np.ndarray  # (2048, 8) int8, values -1, 0, 1 (iq1s_grid)
    ksigns: np.ndarray  # (128,) uint8: 7 sign bits -> 8, with an even number of bits set (ksigns_iq2xs)


@functools.cache
def grids() -> Grids:
    """The tables, unpacked from gguf.quants' classes once, on first use (a few ms)."""

    def unpack(cls, dtype) -> np.ndarray:
        cls.init_grid()  # gguf-py's own lazy unpacking: (1, 1, N, k) float32 grid values
        return _frozen(cls.grid.reshape(cls.grid_shape).astype(dtype))

    return Grids(
        iq2xxs=unpack(gq.IQ2_XXS, np.uint8),
        iq2xs=unpack(gq.IQ2_XS, np.uint8),
        iq2s=unpack(gq.IQ2_S, np.uint8),
        iq3xxs=unpack(gq.IQ3_XXS, np.uint8),
        iq3s=unpack(gq.IQ3_S, np.uint8),
        iq1s=unpack(gq.IQ1_S, np.int8),
        ksigns=_frozen(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)),
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


_BITS = np.arange(8, dtype=np.uint8)
IQ1_DELTA = np.float32(0.125)  # IQ1S_DELTA


def _signs(b: np.ndarray) -> np.ndarray:
    """Sign bytes (...) -> (..., 8) float32: value j is -1 where bit j is set, else 1."""
    return np.where((b[..., None] >> _BITS) & 1, np.float32(-1), np.float32(1))


def _u16(b: np.ndarray) -> np.ndarray:
    """(B, 2n) bytes -> (B, n) little-endian uint16."""
    return np.ascontiguousarray(b).view(np.uint16)


def _u32(b: np.ndarray) -> np.ndarray:
    """(B, 4n) bytes -> (B, n) little-endian uint32."""
    return np.ascontiguousarray(b).view(np.uint32)


def _dequantize_iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    """block_iq2_xxs (66 B): d (f16) | qs uint16[32]. Sub-block ib (32 values) is two uint32: four grid
    indices (bytes) | four 7-bit ksigns indices (bits 0..27) and its scale s (bits 28..31)."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    aux = _u32(blocks[:, 2:66]).reshape(-1, 8, 2)  # (B, 8, 2)
    db = d * (np.float32(0.5) + (aux[:, :, 1] >> 28).astype(np.float32)) * np.float32(0.25)  # (B, 8)
    idx = blocks[:, 2:66].reshape(-1, 8, 8)[:, :, 0:4]  # (B, 8, 4) grid indices
    sign_idx = (aux[:, :, 1:2] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127  # (B, 8, 4)
    grid = g.iq2xxs[idx].astype(np.float32)  # (B, 8, 4, 8)
    return (db[:, :, None, None] * grid * _signs(g.ksigns[sign_idx])).reshape(-1, 256)


def _dequantize_iq2_xs(blocks: np.ndarray) -> np.ndarray:
    """block_iq2_xs (74 B): d | qs uint16[32] (9-bit grid index | 7-bit ksigns index << 9) | scales[8]
    (two 4-bit scales per sub-block: its first 16 values, then its last 16)."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    q = _u16(blocks[:, 2:66]).reshape(-1, 8, 4)  # (B, 8, 4)
    sc = blocks[:, 66:74]  # (B, 8)
    s = np.stack([sc & 0x0F, sc >> 4], axis=-1).astype(np.float32)  # (B, 8, 2)
    db = d[:, :, None] * (np.float32(0.5) + s) * np.float32(0.25)  # (B, 8, 2)
    grid = g.iq2xs[q & 511].astype(np.float32)  # (B, 8, 4, 8)
    return (db[:, :, [0, 0, 1, 1], None] * grid * _signs(g.ksigns[q >> 9])).reshape(-1, 256)


def _dequantize_iq2_s(blocks: np.ndarray) -> np.ndarray:
    """block_iq2_s (82 B): d | qs[32] (grid index, low 8 bits) | signs[32] (one bit per value) | qh[8]
    (bits 2l, 2l+1 of qh[ib]: bits 8, 9 of group l's index) | scales[8] (as IQ2_XS)."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    qs = blocks[:, 2:34].reshape(-1, 8, 4).astype(np.uint16)  # (B, 8, 4)
    signs = blocks[:, 34:66].reshape(-1, 8, 4)  # (B, 8, 4)
    qh = blocks[:, 66:74, None].astype(np.uint16)  # (B, 8, 1)
    sc = blocks[:, 74:82]  # (B, 8)
    idx = qs | (((qh >> np.array([0, 2, 4, 6], dtype=np.uint16)) & 3) << 8)  # (B, 8, 4)
    s = np.stack([sc & 0x0F, sc >> 4], axis=-1).astype(np.float32)  # (B, 8, 2)
    db = d[:, :, None] * (np.float32(0.5) + s) * np.float32(0.25)  # (B, 8, 2)
    grid = g.iq2s[idx].astype(np.float32)  # (B, 8, 4, 8)
    return (db[:, :, [0, 0, 1, 1], None] * grid * _signs(signs)).reshape(-1, 256)


def _dequantize_iq3_xxs(blocks: np.ndarray) -> np.ndarray:
    """block_iq3_xxs (98 B): d | qs[64] (grid indices, two 4-value points per group of 8) |
    scales_and_signs uint32[8] (four 7-bit ksigns indices | scale s << 28, one per sub-block)."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    idx = blocks[:, 2:66].reshape(-1, 8, 4, 2)  # (B, 8, 4, 2)
    aux = _u32(blocks[:, 66:98])  # (B, 8)
    db = d * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.5)  # (B, 8)
    sign_idx = (aux[:, :, None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127  # (B, 8, 4)
    grid = g.iq3xxs[idx].reshape(-1, 8, 4, 8).astype(np.float32)  # (B, 8, 4, 8)
    return (db[:, :, None, None] * grid * _signs(g.ksigns[sign_idx])).reshape(-1, 256)


def _dequantize_iq3_s(blocks: np.ndarray) -> np.ndarray:
    """block_iq3_s (110 B): d | qs[64] (grid index, low 8 bits, of 8 points per sub-block) | qh[8] (bit k
    of qh[ib]: bit 8 of point k's index) | signs[32] | scales[4] (4-bit s, low nibble = even sub-block)."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    qs = blocks[:, 2:66].reshape(-1, 8, 8).astype(np.uint16)  # (B, 8, 8)
    qh = blocks[:, 66:74, None].astype(np.uint16)  # (B, 8, 1)
    signs = blocks[:, 74:106].reshape(-1, 8, 4)  # (B, 8, 4)
    sc = blocks[:, 106:110]  # (B, 4)
    idx = qs | (((qh >> np.arange(8, dtype=np.uint16)) & 1) << 8)  # (B, 8, 8)
    s = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(-1, 8)  # (B, 8)
    db = d * (1 + 2 * s.astype(np.int32)).astype(np.float32)  # (B, 8)
    grid = g.iq3s[idx].reshape(-1, 8, 4, 8).astype(np.float32)  # (B, 8, 4, 8)
    return (db[:, :, None, None] * grid * _signs(signs)).reshape(-1, 256)


def _dequantize_iq1_s(blocks: np.ndarray) -> np.ndarray:
    """block_iq1_s (50 B): d | qs[32] (grid index, low 8 bits) | qh uint16[8]: per sub-block, bits 3l..3l+2
    = bits 8..10 of group l's index, bits 12..14 = scale s, bit 15 = the sign of delta."""
    g = grids()
    d = f16(blocks[:, 0:2])  # (B, 1)
    qs = blocks[:, 2:34].reshape(-1, 8, 4).astype(np.uint16)  # (B, 8, 4)
    qh = _u16(blocks[:, 34:50])  # (B, 8)
    idx = qs | (((qh[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7) << 8)  # (B, 8, 4)
    dl = d * (2 * ((qh >> 12) & 7).astype(np.int32) + 1).astype(np.float32)  # (B, 8)
    delta = np.where(qh & 0x8000, -IQ1_DELTA, IQ1_DELTA)  # (B, 8)
    grid = g.iq1s[idx].astype(np.float32)  # (B, 8, 4, 8)
    return (dl[:, :, None, None] * (grid + delta[:, :, None, None])).reshape(-1, 256)


def _dequantize_iq1_m(blocks: np.ndarray) -> np.ndarray:
    """block_iq1_m (56 B): qs[32] | qh[16] | scales uint16[4]. Byte qh[2ib + h] holds, for groups 2h and
    2h+1 of sub-block ib, bits 8..10 of the index (bits 0..2, 4..6) and delta's sign (bits 3, 7).
    Sub-block ib's two 3-bit scales (first, last 16 values) are bits 6(ib%2) .. +5 of scales[ib/2];
    the top nibbles of the four uint16 are the f16 d (scales[0]'s lowest)."""
    g = grids()
    qs = blocks[:, 0:32].reshape(-1, 8, 4).astype(np.uint16)  # (B, 8, 4)
    qh = blocks[:, 32:48].reshape(-1, 8, 2)  # (B, 8, 2)
    sc = _u16(blocks[:, 48:56])  # (B, 4)
    d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = d_bits.astype(np.uint16).view(np.float16).astype(np.float32)[:, None]  # (B, 1)
    nib = (qh[:, :, :, None] >> np.array([0, 4], dtype=np.uint8)).reshape(-1, 8, 4)  # (B, 8, 4): group l's nibble
    idx = qs | ((nib & 7).astype(np.uint16) << 8)  # (B, 8, 4)
    delta = np.where(nib & 8, -IQ1_DELTA, IQ1_DELTA)  # (B, 8, 4)
    ls = (sc[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7  # (B, 4, 4): sub-blocks 2i, 2i+1 x halves
    dl = d[:, :, None] * (2 * ls.reshape(-1, 8, 2).astype(np.int32) + 1).astype(np.float32)  # (B, 8, 2)
    grid = g.iq1s[idx].astype(np.float32)  # (B, 8, 4, 8)
    return (dl[:, :, [0, 0, 1, 1], None] * (grid + delta[:, :, :, None])).reshape(-1, 256)


DEQUANTIZE = {
    T.IQ2_XXS: _dequantize_iq2_xxs,
    T.IQ2_XS: _dequantize_iq2_xs,
    T.IQ2_S: _dequantize_iq2_s,
    T.IQ3_XXS: _dequantize_iq3_xxs,
    T.IQ3_S: _dequantize_iq3_s,
    T.IQ1_S: _dequantize_iq1_s,
    T.IQ1_M: _dequantize_iq1_m,
}
QUANTIZE: dict = {}  # gguf.quants has no quantiser for these (llama.cpp's needs an importance matrix)
