"""NumPy reference (de)quantisation of every GGML type the engine supports.

This is the oracle the Numba matmul kernels are tested against, so it is written for clarity, not
speed. Each type has one function mirroring the C block layout (ggml-common.h) and doing its float32
arithmetic in the order of llama.cpp's ggml-quants.c, so the results are bit-identical to
`gguf.quants` and to llama.cpp. One module per family of block formats (floats, legacy 32-value
blocks, K super-blocks, MXFP4, ...), each exporting `DEQUANTIZE` and `QUANTIZE` tables
`{type: fn(blocks (B, bytes or values)) -> (B, values or bytes)}`. Legend: B = blocks.
The block geometry of each type is `qtensor.FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import UnsupportedError
from ..qtensor import FORMATS, QTensor, check_supported, row_bytes
from . import floats, iq4, iquants, kquants, legacy, mxfp4
from .mxfp4 import KVALUES_MXFP4, e8m0_to_fp32_half

__all__ = [
    "KVALUES_MXFP4", "QUANTIZE", "QUANT_SIZES", "dequantize", "dequantize_qtensor", "e8m0_to_fp32_half", "quantize",
    "quantize_qtensor",
]

_FAMILIES = (floats, legacy, kquants, iq4, iquants, mxfp4)
_DEQUANTIZE: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    t: fn for m in _FAMILIES for t, fn in m.DEQUANTIZE.items()
}
_QUANTIZE: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    t: fn for t in FORMATS for m in _FAMILIES for u, fn in m.QUANTIZE.items() if u == t
}
QUANTIZE = tuple(_QUANTIZE)  # the types `quantize` writes, in FORMATS order

# (values per block, bytes per block) of each supported type.
QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {t: (f.values, f.bytes) for t, f in FORMATS.items()}

# Values handled per NumPy pass, to bound temporaries on big tensors (16 MiB per float32 temporary).
_CHUNK_VALUES = 1 << 22


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_cols: int) -> np.ndarray:
    """Decode raw rows to float32.

    data: uint8 (..., row_bytes) where row_bytes holds `n_cols` values stored as `qtype`.
    Returns float32 (..., n_cols), bit-identical to gguf.quants.dequantize / llama.cpp.
    """
    qtype = check_supported(qtype, "dequantize")
    n_bytes = row_bytes(qtype, n_cols)
    if data.dtype != np.uint8 or data.ndim == 0 or data.shape[-1] != n_bytes:
        raise ValueError(f"want uint8 (..., {n_bytes}) for {n_cols} {qtype.name} values, got {data.dtype} {data.shape}")
    block_size, type_size = QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, type_size)  # (B, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)  # (B, block_size)
    step = max(1, _CHUNK_VALUES // block_size)
    fn = _DEQUANTIZE[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales decode to inf/NaN, as in C
        for s in range(0, blocks.shape[0], step):
            out[s : s + step] = fn(blocks[s : s + step])
    return out.reshape(*data.shape[:-1], n_cols)


def dequantize_qtensor(w: QTensor) -> np.ndarray:
    """The weight as float32 (rows, cols)."""
    return dequantize(w.data, w.qtype, w.cols)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode rows of values as `qtype` (one of QUANTIZE: the float types, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    Q4_K, MXFP4).

    x: (..., cols), converted to float32 first. Returns uint8 (..., row_bytes). All but Q4_K are
    bit-identical to gguf.quants.quantize; Q4_K ports llama.cpp's quantize_row_q4_K_ref.
    """
    qtype = check_supported(qtype, "quantize")
    fn = _QUANTIZE.get(qtype)
    if fn is None:
        names = ", ".join(t.name for t in _QUANTIZE)
        raise UnsupportedError(
            f"quantising to {qtype.name} is not implemented (only {names}); "
            "pick one of those, or quantise the model with llama-quantize"
        )
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize wants an array of shape (..., cols), got a scalar")
    n_bytes = row_bytes(qtype, x.shape[-1])
    block_size, type_size = QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block_size)  # (B, block_size)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)  # (B, type_size)
    step = max(1, _CHUNK_VALUES // block_size)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = fn(blocks[s : s + step])
    return out.reshape(*x.shape[:-1], n_bytes)


def quantize_qtensor(x: np.ndarray, qtype: GGMLQuantizationType) -> QTensor:
    """Quantise a 2-D float matrix (rows, cols) into a QTensor of `qtype`."""
    if np.ndim(x) != 2:
        raise ValueError(f"quantize_qtensor wants a 2-D (rows, cols) matrix, got shape {np.shape(x)}")
    rows, cols = np.shape(x)
    return QTensor.from_array(quantize(x, qtype), qtype, rows, cols)
