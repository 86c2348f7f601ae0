"""Python wrappers of the matrix kernels: checks, variant choice, serial or parallel twin, activation
scratch, T chunking.

The SIMD variant is detected once, at first use (not at import), from LLVM's view of the host CPU.
Tests (or a user on a misdetected CPU, via config compute.dispatch) can pin it for every weight
type or for one with `force_variant("generic" | "avx2" | "vnni", qtype=None | "Q4_K" | ...)`.
"""

from __future__ import annotations

import threading

import llvmlite.binding as llvm
import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import UnsupportedError, UsageError
from ..qtensor import SUPPORTED_TYPES, QTensor, row_bytes
from . import intrinsics
from .fmatmul import matmul_float, matmul_float_serial
from .iq4 import matmul_iq4_nl, matmul_iq4_nl_serial, matmul_iq4_xs, matmul_iq4_xs_serial
from .iquants import (
    matmul_iq1_m,
    matmul_iq1_m_serial,
    matmul_iq1_s,
    matmul_iq1_s_serial,
    matmul_iq2_s,
    matmul_iq2_s_serial,
    matmul_iq2_xs,
    matmul_iq2_xs_serial,
    matmul_iq2_xxs,
    matmul_iq2_xxs_serial,
    matmul_iq3_s,
    matmul_iq3_s_serial,
    matmul_iq3_xxs,
    matmul_iq3_xxs_serial,
)
from .k23matmul import matmul_q2_k, matmul_q2_k_serial, matmul_q3_k, matmul_q3_k_serial
from .kmatmul import matmul_q6_k, matmul_q6_k_serial, matmul_q45_k, matmul_q45_k_serial
from .mxfp4 import matmul_mxfp4, matmul_mxfp4_serial
from .q4kx8 import matmul_q4_k_x8, matmul_q4_k_x8_serial, quantize_q8_k_x8
from .q4x8 import matmul_q4_0_x8, matmul_q4_0_x8_serial, quantize_q8_0_x8
from .q8act import activations, quantize_q8_0, quantize_q8_0_sums, quantize_q8_k
from .q8x8 import matmul_q8_0_x8, matmul_q8_0_x8_serial
from .q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, matmul_q451, matmul_q451_serial
from .qmatmul import matmul_q4_0, matmul_q4_0_serial, matmul_q8_0, matmul_q8_0_serial

VARIANTS = ("generic", "avx2", "vnni")
_TYPE_NAMES = tuple(t.name for t in SUPPORTED_TYPES)
_MARKERS = {
    "generic": intrinsics.GENERIC,
    "avx2": intrinsics.AVX2,
    "vnni": intrinsics.VNNI,
}

# Tokens per kernel call: keeps the int8 activations of one call (T * cols bytes) within ~256 KiB
# of L2, as every output row streams all of them.
_MAX_TILE_TOKENS = 64
_ACT_BYTES = 256 * 1024

_state = {"supported": None, "forced": None, "by_type": {}}  # by_type: {QT: variant name}
# Per-thread activation scratch: {(kind, cols): (xq, xd, xs) with room for the most tokens seen}.
_local = threading.local()


def supported_variants() -> tuple[str, ...]:
    """The kernel variants this CPU can run, best last (from LLVM's host CPU features)."""
    if _state["supported"] is None:
        f = llvm.get_host_cpu_features()
        found = ["generic"]
        if f.get("avx2") and f.get("fma") and f.get("f16c"):
            found.append("avx2")
            vnni512 = f.get("avx512vnni") and f.get("avx512vl") and f.get("avx512bw")
            if vnni512 or f.get("avxvnni"):
                found.append("vnni")
        _state["supported"] = tuple(found)
    return _state["supported"]


def detect_variant() -> str:
    """The best kernel variant for this CPU."""
    return (_state["supported"] or supported_variants())[-1]


def force_variant(name: str | None, qtype: str | None = None) -> None:
    """Use kernel variant `name` from now on for weight type `qtype` ("Q4_K", ...), or for every
    type when qtype is None. name None undoes it: for that type, or (qtype None) everywhere."""
    if name is not None and name not in supported_variants():
        raise UsageError(
            f"kernel variant {name!r} is unknown or not supported by this CPU; use one of {', '.join(supported_variants())}"
        )
    if qtype is None:
        _state["forced"] = name
        if name is None:
            _state["by_type"].clear()
        return
    if qtype not in _TYPE_NAMES:
        raise UsageError(f"unknown weight type {qtype!r}; use one of {', '.join(_TYPE_NAMES)}")
    qt = QT[qtype]
    if name is None:
        _state["by_type"].pop(qt, None)
    else:
        _state["by_type"][qt] = name


def current_variant(qtype: str | None = None) -> str:
    """The kernel variant in use (for weight type `qtype`): pinned, else forced, else detected."""
    pinned = _state["by_type"].get(QT[qtype]) if qtype is not None else None
    return pinned or _state["forced"] or detect_variant()


def variant_marker(qtype: QT):
    """The marker of the kernel variant in use for weight type `qtype` (for kernels taking it directly)."""
    return _MARKERS[_state["by_type"].get(qtype) or _state["forced"] or detect_variant()]


def set_threads(n: int) -> None:
    """Number of threads the kernels use (1 .. numba.config.NUMBA_NUM_THREADS).

    Like `numba.set_num_threads`, it applies to kernels launched from the calling thread.
    """
    top = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= top:
        raise UsageError(f"threads must be an integer from 1 to {top} (got {n!r}); pass e.g. --threads {top}")
    numba.set_num_threads(int(n))


_INT8_DESC = {
    "generic": "int8 generic",
    "avx2": "avx2 int8",
    "vnni": "avx512-vnni int8",
}
_F16_DESC = {
    "generic": "f16 (bit trick) f32",
    "avx2": "f16 (vcvtph2ps) f32",
    "vnni": "f16 (vcvtph2ps) f32",
}


def kernel_names() -> dict[str, str]:
    """For each supported weight type, the kernel variant this CPU uses."""
    floats = {"F32": "f32 simd", "F16": _F16_DESC[current_variant("F16")], "BF16": "bf16 (shift) f32"}
    return {t.name: floats.get(t.name) or _INT8_DESC[current_variant(t.name)] for t in SUPPORTED_TYPES}


def _scratch(kind: str, n_tok: int, cols: int):
    """(xq, xd, xs) activation buffers for `n_tok` tokens, reused across calls.

    One allocation per (kind, cols), grown to the most tokens seen (at most one chunk, 64); the
    views for each token count are cached too, as slicing three arrays costs more than the decode
    kernel's launch.
    """
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    views = cache.get((kind, cols, n_tok))
    if views is not None:
        return views
    bufs = cache.get((kind, cols))
    if bufs is None or bufs[0].shape[0] < n_tok:
        bufs = activations(kind, max(n_tok, 1), cols)
        for key in [k for k in cache if k[:2] == (kind, cols)]:
            del cache[key]  # views of the old buffers
        cache[(kind, cols)] = bufs
    views = cache[(kind, cols, n_tok)] = tuple(b[:n_tok] for b in bufs)
    return views


_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)


def _check(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    """Reject arguments the kernels cannot take (they check nothing themselves).

    This runs ~25 times per layer per token, so the usual case is one chain of cheap tests
    (exact types, dtype identity; ~0.6 µs); anything else gets the full checks and messages.
    """
    if not (
        type(w) is QTensor
        and type(out) is np.ndarray
        and type(x) is np.ndarray
        and out.dtype is _F32
        and x.dtype is _F32
        and out.flags.c_contiguous
        and x.flags.c_contiguous
        and out.flags.writeable
    ):
        _check_arrays(out, w, x)
    data = w.data
    if not (
        type(data) is np.ndarray
        and data.dtype is _U8
        and data.shape == _storage_shape(w)
        and data.flags.c_contiguous
    ):
        _check_weight(w)


def _storage_shape(w: QTensor) -> tuple[int, int]:
    """The (rows, row bytes) of plain storage; (rows / 8, 8 * row bytes) of 8-row interleaved Q4_0/Q4_K/Q8_0."""
    n = _row_bytes(w.qtype, w.cols)
    if w.interleave == 1:
        return (w.rows, n)
    if w.interleave == 8 and w.qtype in _KERNELS_X8:
        return (w.rows // 8, 8 * n)
    raise UnsupportedError(f"no matrix kernel for {w.qtype.name} interleaved by {w.interleave}")


def _check_arrays(out, w, x) -> None:
    if not isinstance(w, QTensor):
        raise TypeError(f"w must be a QTensor, got {type(w).__name__}")
    for name, a in (("out", out), ("x", x)):
        if not isinstance(a, np.ndarray) or a.dtype != _F32 or not a.flags.c_contiguous:
            raise TypeError(f"{name} must be a C-contiguous float32 array")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def _check_weight(w: QTensor) -> None:
    data = w.data
    want = _storage_shape(w)
    if not (isinstance(data, np.ndarray) and data.dtype == _U8 and data.shape == want and data.flags.c_contiguous):
        shape = getattr(data, "shape", None)
        raise ValueError(f"weight storage must be C-contiguous uint8 {want}, got {shape}")


def _row_bytes(qtype: QT, cols: int) -> int:
    """Bytes per row of a (qtype, cols) weight, memoised (gguf's size table is slower to ask)."""
    n = _ROW_BYTES.get((qtype, cols))
    if n is None:
        if qtype not in _KERNELS:
            raise UnsupportedError(f"no matrix kernel for {qtype!r}; re-quantise the model to a supported type")
        n = _ROW_BYTES[(qtype, cols)] = row_bytes(qtype, cols)
    return n


_ROW_BYTES: dict = {}  # {(qtype, cols): bytes per row}


def matvec(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    """out (rows,) = W (rows, cols) @ x (cols,), computed on W's quantised blocks."""
    _check(out, w, x)
    if out.shape != (w.rows,) or x.shape != (w.cols,):
        raise ValueError(f"matvec: W {w.shape}, x {x.shape}, out {out.shape} do not match")
    _matmul(out[None], w, x[None], 1)


def matmul(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    """out (T, rows) = x (T, cols) @ W.T for any T >= 1, computed on W's quantised blocks."""
    _check(out, w, x)
    n_tok = x.shape[0] if x.ndim == 2 else 0
    if n_tok < 1 or x.shape[1] != w.cols or out.shape != (n_tok, w.rows):
        raise ValueError(f"matmul: W {w.shape}, x {x.shape}, out {out.shape} do not match")
    _matmul(out, w, x, n_tok)


# Below this much work (weight bytes x tokens) a call runs the serial twin of its kernel on the
# calling thread, as waking the other threads costs more than they save. Measured on a 2-core
# Zen 3 (matvec at 1024 columns): serial wins below ~100 KB for the int8 types, ~200 KB for F16/F32.
PARALLEL_MIN_BYTES = 1 << 17


def _q8_0(x, q, d, s):
    quantize_q8_0(q, d, s, x, 0)


def _q8_0_pairs(x, q, d, s):
    quantize_q8_0(q, d, s, x, 1)


def _q8_0_sums(x, q, d, s):
    quantize_q8_0_sums(q, d, s, x)


def _q8_k(x, q, d, s):
    quantize_q8_k(q, d, s, x)


def _q8_0_x8(x, q, d, s):
    quantize_q8_0_x8(q, d, s, x)


def _q8_k_x8(x, q, d, s):
    quantize_q8_k_x8(q, d, s, x)


def _float(fmt):
    return lambda k, o, w, x, m: k(o, w, x, fmt, m)


def _q451(fmt):
    return lambda k, o, w, q, d, s, m: k(o, w, q, d, s, fmt, m)


# Per weight type: (activation scratch kind, its quantiser; None for f32 activations),
# (parallel, serial) kernels, and the kernel call (type sizes and offsets as constants).
_FLOAT = (matmul_float, matmul_float_serial)
_KERNELS = {
    QT.F32: (None, None, _FLOAT, _float(intrinsics.FMT_F32)),
    QT.F16: (None, None, _FLOAT, _float(intrinsics.FMT_F16)),
    QT.BF16: (None, None, _FLOAT, _float(intrinsics.FMT_BF16)),
    QT.Q8_0: ("q8_0", _q8_0, (matmul_q8_0, matmul_q8_0_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, m)),
    QT.Q4_0: ("q8_0p", _q8_0_pairs, (matmul_q4_0, matmul_q4_0_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q4_K: ("q8_k", _q8_k, (matmul_q45_k, matmul_q45_k_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, 144, 0, 16, m)),
    QT.Q5_K: ("q8_k", _q8_k, (matmul_q45_k, matmul_q45_k_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, 176, 16, 48, m)),
    QT.Q6_K: ("q8_k", _q8_k, (matmul_q6_k, matmul_q6_k_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.MXFP4: ("q8_0ps", _q8_0_sums, (matmul_mxfp4, matmul_mxfp4_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q2_K: ("q8_k", _q8_k, (matmul_q2_k, matmul_q2_k_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q3_K: ("q8_k", _q8_k, (matmul_q3_k, matmul_q3_k_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ4_NL: ("q8_0p", _q8_0_pairs, (matmul_iq4_nl, matmul_iq4_nl_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ4_XS: ("q8_k", _q8_k, (matmul_iq4_xs, matmul_iq4_xs_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q4_1: ("q8_0p", _q8_0_pairs, (matmul_q451, matmul_q451_serial), _q451(FMT_Q4_1)),
    QT.Q5_0: ("q8_0ps", _q8_0_sums, (matmul_q451, matmul_q451_serial), _q451(FMT_Q5_0)),
    QT.Q5_1: ("q8_0p", _q8_0_pairs, (matmul_q451, matmul_q451_serial), _q451(FMT_Q5_1)),
    QT.IQ2_XXS: ("q8_k", _q8_k, (matmul_iq2_xxs, matmul_iq2_xxs_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ2_XS: ("q8_k", _q8_k, (matmul_iq2_xs, matmul_iq2_xs_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ2_S: ("q8_k", _q8_k, (matmul_iq2_s, matmul_iq2_s_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ3_XXS: ("q8_k", _q8_k, (matmul_iq3_xxs, matmul_iq3_xxs_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ3_S: ("q8_k", _q8_k, (matmul_iq3_s, matmul_iq3_s_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ1_S: ("q8_k", _q8_k, (matmul_iq1_s, matmul_iq1_s_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.IQ1_M: ("q8_k", _q8_k, (matmul_iq1_m, matmul_iq1_m_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
}
assert set(SUPPORTED_TYPES) <= set(_KERNELS), "every supported type needs a matrix kernel"


# 8-row interleaved Q4_0 (kernels/q4x8.py), Q4_K (q4kx8.py) and Q8_0 (q8x8.py), chosen by QTensor.interleave == 8.
_KERNELS_X8 = {
    QT.Q4_0: ("q8_0x8", _q8_0_x8, (matmul_q4_0_x8, matmul_q4_0_x8_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q4_K: ("q8_kx8", _q8_k_x8, (matmul_q4_k_x8, matmul_q4_k_x8_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, s, m)),
    QT.Q8_0: ("q8_0", _q8_0, (matmul_q8_0_x8, matmul_q8_0_x8_serial), lambda k, o, w, q, d, s, m: k(o, w, q, d, m)),
}


def _matmul(out: np.ndarray, w: QTensor, x: np.ndarray, n_tok: int) -> None:
    qt = w.qtype
    marker = _MARKERS[_state["by_type"].get(qt) or _state["forced"] or detect_variant()]
    kind, quantize, (parallel, serial), run = _KERNELS[qt] if w.interleave == 1 else _KERNELS_X8[qt]
    data = w.data
    if kind is None:
        run(serial if data.nbytes * n_tok < PARALLEL_MIN_BYTES else parallel, out, data, x, marker)
        return
    cols = x.shape[1]
    step = max(4, min(_MAX_TILE_TOKENS, _ACT_BYTES // cols) // 4 * 4)
    if n_tok <= step:
        xq, xd, xs = _scratch(kind, n_tok, cols)
        quantize(x, xq, xd, xs)
        run(serial if data.nbytes * n_tok < PARALLEL_MIN_BYTES else parallel, out, data, xq, xd, xs, marker)
        return
    # long inputs go in chunks of `step` tokens, each quantised just before use (bounded scratch)
    xq, xd, xs = _scratch(kind, step, cols)
    kernel = serial if data.nbytes * step < PARALLEL_MIN_BYTES else parallel
    for t0 in range(0, n_tok, step):
        n = min(step, n_tok - t0)
        q, d, s = (xq, xd, xs) if n == step else (xq[:n], xd[:n], xs[:n])
        quantize(x[t0 : t0 + n], q, d, s)
        run(kernel, out[t0 : t0 + n], data, q, d, s, marker)
