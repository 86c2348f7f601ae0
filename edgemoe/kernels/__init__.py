"""Numba kernels. The matrix kernels work directly on quantised GGML blocks:

    matvec(out, w, x)    out (rows,) = W @ x (cols,)
    matmul(out, w, x)    out (T, rows) = x (T, cols) @ W.T, any T >= 1
    set_threads(n)       kernel threads, 1 .. numba.config.NUMBA_NUM_THREADS
    kernel_names()       {"Q4_0": "avx2 int8", ...}: the variant this CPU uses per weight type

W is a `QTensor` of any type in `qtensor.FORMATS` (F32, F16, BF16, the legacy, K and IQ block types,
MXFP4). See `dispatch` for the variant choice (AVX-512 VNNI, AVX2, portable) and the files it imports
for the kernels.
"""

__all__ = ["kernel_names", "matmul", "matvec", "set_threads"]


def __getattr__(name: str):
    """The package's names come from `dispatch`, imported on first use (it imports Numba: a module of this
    package that needs none, such as the background compiler's waiting worker, stays light)."""
    if name in __all__:
        from . import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
