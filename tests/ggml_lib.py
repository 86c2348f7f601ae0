"""ggml's compiled C, as llama-cpp-python ships it (libggml-base.so, libggml-cpu.so), through ctypes.

The quant-type tests use these functions as the oracle their NumPy emulations and the engine's kernels
must match bit for bit. One wrapper per C function family:

    quantize(qt, x, imatrix)     ggml_quantize_chunk (llama-quantize's path), weights (R, C) f32 -> (R, row bytes)
    dequantize(qt, raw)          dequantize_row_<type>, (..., row bytes) -> (..., C) f32
    quantize_q8(act, x, ref)     quantize_row_q8_0 / q8_1 / q8_K[_ref], activations (T, C) f32 -> (T, row bytes)
    vec_dot(qt, raw, act, generic)  ggml_vec_dot_<type>_<act type>[_generic], (R, .), (T, .) -> (T, R) f32

Use `load_or_skip()` in a fixture or a test: the loaded libraries, or a pytest skip when llama-cpp-python
(or its ggml libraries) is not installed. Shapes: R = weight rows, T = tokens, C = values per row.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

LIBS = ("libggml-base.so", "libggml-cpu.so")  # in llama_cpp/lib/; the CPU library links to the base one
# Each weight type's activation type in ggml-cpu's type_traits_cpu (.vec_dot_type): its vec_dot reads those blocks.
VEC_DOT_TYPE = {
    **{t: QT.Q8_0 for t in (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.IQ4_NL)},
    **{t: QT.Q8_1 for t in (QT.Q4_1, QT.Q5_1)},
    **{
        t: QT.Q8_K
        for t in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS)
        + (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M)
    },
}
# (values, bytes) of ggml's activation blocks. Not gguf-py's table: its Q8_1 is 40 bytes (f32 d and s), while
# ggml's block_q8_1 is d f16 | s f16 | qs[32] = 36. Q8_K: d f32 | qs[256] | bsums int16[16].
Q8_BLOCKS = {QT.Q8_0: (32, 34), QT.Q8_1: (32, 36), QT.Q8_K: (256, 292)}

_P, _I64, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t


def c_name(qt: QT) -> str:
    """The type as ggml's C function names spell it: q4_1, iq4_xs, q2_K, q8_K."""
    name = qt.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def lib_dir() -> Path | None:
    """llama-cpp-python's library directory, without importing it; None when it or a library in LIBS is missing."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0], "lib")
    return path if all((path / lib).exists() for lib in LIBS) else None


def load_or_skip() -> Ggml:
    """The loaded libraries (once per process), or a pytest skip when they are not installed."""
    path = lib_dir()
    if path is None:
        pytest.skip(f"llama-cpp-python with its {' and '.join(LIBS)} is not installed (pip install '.[bench]')")
    return _load(path)


@functools.cache
def _load(path: Path) -> Ggml:
    return Ggml(path)


class Ggml:
    """libggml-base (quantisers, dequantisers, reference activation quantisers) and libggml-cpu (vec_dot
    kernels, the CPU's activation quantisers) of one llama-cpp-python install."""

    def __init__(self, path: Path):
        self.base = ctypes.CDLL(str(path / "libggml-base.so"))
        self.cpu = ctypes.CDLL(str(path / "libggml-cpu.so"))
        self.cpu.ggml_cpu_init()  # fills ggml's f16 tables, which the generic C and the dot products read
        # ggml_cpu_has_* report the build, not this CPU: whether the non-generic vec_dot is ggml's AVX2 code
        self.avx2 = bool(self.cpu.ggml_cpu_has_avx2() and self.cpu.ggml_cpu_has_fma())

    @staticmethod
    def _fn(lib: ctypes.CDLL, name: str, restype, *argtypes):
        fn = getattr(lib, name)  # ctypes caches it on the library, so its signature is set once for all
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn

    def quantize(self, qt: QT, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk (llama-quantize's path) of the rows of x (R, C) f32, with an importance
        matrix (C,) f32 or without: (R, C / values * bytes) uint8."""
        fn = self._fn(self.base, "ggml_quantize_chunk", _SZ, ctypes.c_int, _P, _P, _I64, _I64, _I64, _P)
        x = np.ascontiguousarray(x, np.float32)
        values, size = GGML_QUANT_SIZES[qt]
        out = np.zeros((x.shape[0], x.shape[1] // values * size), np.uint8)  # (R, row bytes)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
        n = fn(int(qt), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None if im is None else im.ctypes.data)
        assert n == out.nbytes, (qt.name, n, out.nbytes)
        return out

    def dequantize(self, qt: QT, raw: np.ndarray) -> np.ndarray:
        """dequantize_row_<type> of blocks raw (..., row bytes) uint8: (..., row values) f32. One call over all
        rows: blocks are independent, so it equals a call per row."""
        fn = self._fn(self.base, f"dequantize_row_{c_name(qt)}", None, _P, _P, _I64)
        raw = np.ascontiguousarray(raw)
        values, size = GGML_QUANT_SIZES[qt]
        out = np.zeros(raw.size // size * values, np.float32)
        fn(raw.ctypes.data, out.ctypes.data, out.size)
        return out.reshape(*raw.shape[:-1], -1)

    def quantize_q8(self, act: QT, x: np.ndarray, *, ref: bool = False) -> np.ndarray:
        """Activation blocks of the rows of x (T, C) f32, act = Q8_0, Q8_1 or Q8_K: (T, C / values * bytes)
        uint8. ref: quantize_row_<act>_ref of libggml-base (ggml's reference C); else libggml-cpu's
        quantize_row_<act> (this build's SIMD code where it has one). Row by row; all-zero bytes to start
        with (Q8_K_ref leaves the bsums of an all-zero block as they were)."""
        name = f"quantize_row_{c_name(act)}" + ("_ref" if ref else "")
        fn = self._fn(self.base if ref else self.cpu, name, None, _P, _P, _I64)
        x = np.ascontiguousarray(x, np.float32)
        values, size = Q8_BLOCKS[act]
        out = np.zeros((x.shape[0], x.shape[1] // values * size), np.uint8)  # (T, row bytes)
        for t in range(x.shape[0]):
            fn(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
        return out

    def vec_dot(self, qt: QT, raw: np.ndarray, act: np.ndarray, *, generic: bool = False) -> np.ndarray:
        """ggml_vec_dot_<type>_<act type> (generic: its _generic C; else this build's SIMD code) of every
        weight row raw (R, row bytes) with every activation row act (T, ...) of VEC_DOT_TYPE[qt]'s blocks,
        one call per (token, row), as ggml_vec_dot(n, &s, 0, w, 0, a, 0, 1): (T, R) f32."""
        act_qt = VEC_DOT_TYPE[qt]
        name = f"ggml_vec_dot_{c_name(qt)}_{c_name(act_qt)}" + ("_generic" if generic else "")
        fn = self._fn(self.cpu, name, None, ctypes.c_int, _P, _SZ, _P, _SZ, _P, _SZ, ctypes.c_int)
        raw = np.ascontiguousarray(raw)
        act = np.ascontiguousarray(act).reshape(act.shape[0], -1)  # (T, act row bytes)
        values, size = GGML_QUANT_SIZES[qt]
        cols = raw.shape[1] // size * values
        assert act.shape[1] == cols // Q8_BLOCKS[act_qt][0] * Q8_BLOCKS[act_qt][1], (qt.name, act.shape, cols)
        out = np.zeros((act.shape[0], raw.shape[0]), np.float32)  # (T, R)
        s = np.zeros(1, np.float32)
        for t in range(act.shape[0]):
            for r in range(raw.shape[0]):
                fn(cols, s.ctypes.data, 0, raw[r].ctypes.data, 0, act[t].ctypes.data, 0, 1)
                out[t, r] = s[0]
        return out
