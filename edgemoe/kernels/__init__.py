"""Numba kernels. The matrix kernels work directly on quantised GGML blocks:

    matvec(out, w, x)    out (rows,) = W @ x (cols,)
    matmul(out, w, x)    out (T, rows) = x (T, cols) @ W.T, any T >= 1
    set_threads(n)       kernel threads, 1 .. numba.config.NUMBA_NUM_THREADS
    kernel_names()       {"Q4_0": "avx2 int8", ...}: the variant this CPU uses per weight type

W is a `QTensor` of any type in `qtensor.FORMATS` (F32, F16, BF16, the legacy, K and IQ block types,
MXFP4). See `dispatch` for the variant choice (AVX-512 VNNI, AVX2, portable) and the files it imports
for the kernels.
"""

from .dispatch import kernel_names, matmul, matvec, set_threads

__all__ = ["kernel_names", "matmul", "matvec", "set_threads"]
