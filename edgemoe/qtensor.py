"""A weight matrix as stored on disk: raw rows of quantised blocks plus its type and logical shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import UnsupportedError

QT = GGMLQuantizationType


class BlockFormat(NamedTuple):
    """How one weight type stores its values, mirroring ggml-common.h (and ggml's `type_traits`)."""

    values: int  # values per block (1 for the float types)
    bytes: int  # bytes per block
    scale: str | None  # the per-block scale field: "f16" (IEEE half), "e8m0" (a power of two), None (floats)
    scale_offsets: tuple[int, ...]  # byte offsets of the f16/e8m0 scale fields in a block (d, then m/dmin)


def _fmt(qtype: QT, scale: str | None = None, *offsets: int) -> BlockFormat:
    return BlockFormat(*GGML_QUANT_SIZES[qtype], scale, offsets)


# The types the engine computes with, in the order they are listed to users; anything else is rejected
# at load time. Every other table (dequantisers, kernels, row kinds, config names) is keyed on these.
FORMATS: dict[QT, BlockFormat] = {
    QT.F32: _fmt(QT.F32),
    QT.F16: _fmt(QT.F16),
    QT.BF16: _fmt(QT.BF16),
    QT.Q8_0: _fmt(QT.Q8_0, "f16", 0),  # d | qs[32] int8
    QT.Q4_0: _fmt(QT.Q4_0, "f16", 0),  # d | qs[16] nibbles
    QT.Q4_1: _fmt(QT.Q4_1, "f16", 0, 2),  # d | m | qs[16] nibbles
    QT.Q5_0: _fmt(QT.Q5_0, "f16", 0),  # d | qh[4] fifth bits | qs[16] nibbles
    QT.Q5_1: _fmt(QT.Q5_1, "f16", 0, 2),  # d | m | qh[4] | qs[16]
    QT.Q2_K: _fmt(QT.Q2_K, "f16", 80, 82),  # scales[16] (scale | min << 4) | qs[64] | d | dmin
    QT.Q3_K: _fmt(QT.Q3_K, "f16", 108),  # hmask[32] | qs[64] | scales[12] (6-bit, packed) | d
    QT.Q4_K: _fmt(QT.Q4_K, "f16", 0, 2),  # d | dmin | scales[12] | qs[128]
    QT.Q5_K: _fmt(QT.Q5_K, "f16", 0, 2),  # d | dmin | scales[12] | qh[32] | qs[128]
    QT.Q6_K: _fmt(QT.Q6_K, "f16", 208),  # ql[128] | qh[64] | scales[16] | d
    QT.IQ1_S: _fmt(QT.IQ1_S, "f16", 0),  # d | qs[32] | qh uint16[8]
    QT.IQ1_M: _fmt(QT.IQ1_M, "f16"),  # qs[32] | qh[16] | scales uint16[4]: no d field, its 4 nibbles top the scales
    QT.IQ2_XXS: _fmt(QT.IQ2_XXS, "f16", 0),  # d | qs uint16[32]: grid indices, signs, scales (quants/iquants.py)
    QT.IQ2_XS: _fmt(QT.IQ2_XS, "f16", 0),  # d | qs uint16[32] | scales[8]
    QT.IQ2_S: _fmt(QT.IQ2_S, "f16", 0),  # d | qs[32] | signs[32] | qh[8] | scales[8]
    QT.IQ3_XXS: _fmt(QT.IQ3_XXS, "f16", 0),  # d | qs[64] | scales and signs uint32[8]
    QT.IQ3_S: _fmt(QT.IQ3_S, "f16", 0),  # d | qs[64] | qh[8] | signs[32] | scales[4]
    QT.IQ4_NL: _fmt(QT.IQ4_NL, "f16", 0),  # d | qs[16] nibbles: indices into kvalues_iq4nl
    QT.IQ4_XS: _fmt(QT.IQ4_XS, "f16", 0),  # d | scales_h | scales_l[4] | qs[128] nibbles as IQ4_NL's
    QT.MXFP4: _fmt(QT.MXFP4, "e8m0", 0),  # e | qs[16] nibbles of E2M1 codes
}
SUPPORTED_TYPES = tuple(FORMATS)


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one row of `n_cols` values stored as `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_cols % block_size:
        raise UnsupportedError(
            f"a row of {n_cols} values cannot be stored as {qtype.name} (blocks of {block_size}); "
            f"use F16/F32 or a model whose dimensions are multiples of {block_size}"
        )
    return n_cols // block_size * type_size


def check_supported(qtype: int, what: str) -> GGMLQuantizationType:
    try:
        qt = GGMLQuantizationType(int(qtype))
    except ValueError:
        qt = None
    if qt not in SUPPORTED_TYPES:
        name = qt.name if qt is not None else f"type id {int(qtype)}"
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedError(
            f"{what}: tensor type {name} is not supported (supported: {names}); "
            "re-quantise the model to one of these, e.g. with llama-quantize"
        )
    return qt


@dataclass(frozen=True)
class QTensor:
    """A 2-D weight `(rows, cols)` = HF `(out_features, in_features)`.

    `data` is the raw storage, uint8 `(rows, row_bytes)`, C-contiguous; it may be a zero-copy view of
    a memory-mapped file or of an I/O buffer. With `interleave` 8 (Q4_0 only, see kernels/q4x8.py) the
    blocks of each 8 consecutive rows are interleaved, and `data` is `(rows / 8, 8 * row_bytes)`.
    `data` is held as a read-only view.
    """

    data: np.ndarray  # (rows, row_bytes) uint8; (rows / 8, 8 * row_bytes) when interleave == 8
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    interleave: int = 1

    def __post_init__(self):
        # Weights are never written after loading; a read-only view also gives every kernel one Numba
        # type for weights (memory-mapped files are read-only), so each compiles once, not twice.
        data = self.data
        if isinstance(data, np.ndarray) and data.flags.writeable:
            view = data.view()
            view.flags.writeable = False
            object.__setattr__(self, "data", view)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @staticmethod
    def from_array(a: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> QTensor:
        """Wrap storage in any dtype (float32 rows, uint16 rows, uint8 blocks) as raw bytes."""
        qtype = check_supported(qtype, "weight")
        a = np.ascontiguousarray(a)
        data = a.reshape(rows, -1).view(np.uint8)
        if data.shape != (rows, row_bytes(qtype, cols)):
            raise ValueError(f"storage {a.shape} {a.dtype} does not hold {rows}x{cols} {qtype.name}")
        return QTensor(data, qtype, rows, cols)
