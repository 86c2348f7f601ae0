"""Quantise a GGUF file with llama.cpp's own quantiser (llama_model_quantize, through llama-cpp-python).

    python tools/llama_quantize.py model-f16.gguf model-q3_k_m.gguf --type Q3_K_M

For tests and benchmarks: llama-cpp-python (`pip install '.[bench]'`) is never a runtime dependency.

Files quantised this way hold exactly the tensor mixes users download (Q3_K_M, IQ4_XS, ...): the
types llama.cpp picks per tensor, its fallbacks for widths that do not fill whole super-blocks, and
its quantisers' real output. The very-low-bit types (IQ1/IQ2, IQ3_XXS) need an importance matrix;
`quantize` passes one of random positive weights per input column (as `llama-imatrix` would give
mean squared activations), through the C API's llama_model_imatrix_data list.
"""

from __future__ import annotations

import argparse
import ctypes
import os

import numpy as np

# llama_ftype values (llama.h): the file types `llama-quantize` offers for MoE models.
FILE_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19,
    "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "MXFP4_MOE": 38,
}  # fmt: skip


def _imatrix(src: str, seed: int = 0):
    """(the ctypes array for llama_model_quantize_params.imatrix, the buffers it points into)."""
    import llama_cpp
    from gguf import GGUFReader

    rng = np.random.default_rng(seed)
    entries, keep = [], []
    for t in GGUFReader(src).tensors:
        shape = [int(n) for n in t.shape]  # ggml order: (cols, rows[, experts])
        if len(shape) < 2 or not t.name.startswith("blk."):
            continue
        cols, experts = shape[0], shape[2] if len(shape) == 3 else 1
        values = (0.1 + rng.random(cols * experts)).astype(np.float32)  # (experts * cols,)
        name = t.name.encode()
        keep += [values, name]
        entries.append((name, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size))
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, ptr, size) in enumerate(entries):
        array[i].name, array[i].data, array[i].size = name, ptr, size
    array[len(entries)].name = None  # the list ends at a null name
    return array, keep


def quantize(src: str | os.PathLike, dst: str | os.PathLike, file_type: str) -> None:
    """Quantise the F32/F16 GGUF `src` to `dst` as llama-quantize would with `file_type` (a FILE_TYPES key)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.nthread = 2
    array, keep = _imatrix(os.fspath(src))
    params.imatrix = ctypes.cast(array, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    del keep
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({file_type}) failed with {rc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="F32/F16/BF16 GGUF file")
    ap.add_argument("dst", help="GGUF file to write")
    ap.add_argument("--type", required=True, choices=list(FILE_TYPES), help="llama-quantize file type")
    args = ap.parse_args(argv)
    quantize(args.src, args.dst, args.type)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
