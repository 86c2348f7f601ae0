"""Random weight matrices for kernel tests, in every type the kernels take; the `variant` fixture (conftest)
pins the SIMD variant."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from edgemoe.qtensor import QTensor

# types gguf-py cannot quantise: byte offsets of their f16 fields d (, dmin) in a block
K_F16_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
                QT.Q3_K: (108,), QT.Q2_K: (80, 82)}


def make_weight(qt: QT, rows: int, cols: int, rng) -> QTensor:
    """Random weights: quantised with gguf-py where it can, else random valid blocks (small f16 scales)."""
    if qt in K_F16_FIELDS:
        block, size = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in K_F16_FIELDS[qt]:
            d = rng.uniform(1e-3, 2e-2, (rows, cols // block)).astype(np.float16)
            raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return QTensor.from_array(raw, qt, rows, cols)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    return QTensor.from_array(w if qt == QT.F32 else quantize(w, qt), qt, rows, cols)


def dequant(w: QTensor) -> np.ndarray:
    """(rows, cols) float64 values of W, by gguf-py."""
    if w.qtype == QT.F32:
        return w.data.view(np.float32).astype(np.float64)
    return dequantize(w.data, w.qtype).astype(np.float64).reshape(w.rows, w.cols)
