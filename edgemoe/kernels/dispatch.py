"""Python wrappers of the matrix kernels: checks, variant choice, activation scratch, T chunking.

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
from ..qtensor import QTensor
from . import intrinsics
from .fmatmul import matmul_bf16, matmul_f16, matmul_f32
from .kmatmul import matmul_q6_k, matmul_q45_k
from .q8act import quantize_q8_0, quantize_q8_k
from .qmatmul import matmul_q4_0, matmul_q8_0

VARIANTS = ("generic", "avx2", "vnni")
_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
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
    names = {"F32": "f32 simd", "F16": _F16_DESC[current_variant("F16")], "BF16": "bf16 (shift) f32"}
    for t in ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"):
        names[t] = _INT8_DESC[current_variant(t)]
    return names


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
        cap = max(n_tok, 1)
        if kind != "q8_k":
            bufs = (
                np.empty((cap, cols), np.int8),  # (T, C) quants
                np.empty((cap, cols // 32), np.float32),  # (T, C/32) scales
                np.empty((cap, cols // 32), np.float32),  # (T, C/32) scale * sum
            )
        else:
            bufs = (
                np.empty((cap, cols), np.int8),  # (T, C) quants
                np.empty((cap, cols // 256), np.float32),  # (T, C/256) scales
                np.empty((cap, cols // 16), np.int32),  # (T, C/16) sums
            )
        for key in [k for k in cache if k[:2] == (kind, cols)]:
            del cache[key]  # views of the old buffers
        cache[(kind, cols)] = bufs
    views = cache[(kind, cols, n_tok)] = tuple(b[:n_tok] for b in bufs)
    return views


def _check(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    if not isinstance(w, QTensor):
        raise TypeError(f"w must be a QTensor, got {type(w).__name__}")
    for name, a in (("out", out), ("x", x)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise TypeError(f"{name} must be a C-contiguous float32 array")
    data = w.data
    if data.dtype != np.uint8 or data.shape[0] != w.rows or not data.flags.c_contiguous:
        raise ValueError(f"weight storage must be C-contiguous uint8 (rows, row_bytes), got {data.shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def matvec(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    """out (rows,) = W (rows, cols) @ x (cols,), computed on W's quantised blocks."""
    _check(out, w, x)
    if out.shape != (w.rows,) or x.shape != (w.cols,):
        raise ValueError(f"matvec: W {w.shape}, x {x.shape}, out {out.shape} do not match")
    _matmul(out.reshape(1, w.rows), w, x.reshape(1, w.cols))


def matmul(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    """out (T, rows) = x (T, cols) @ W.T for any T >= 1, computed on W's quantised blocks."""
    _check(out, w, x)
    n_tok = x.shape[0] if x.ndim == 2 else 0
    if n_tok < 1 or x.shape[1] != w.cols or out.shape != (n_tok, w.rows):
        raise ValueError(f"matmul: W {w.shape}, x {x.shape}, out {out.shape} do not match")
    _matmul(out, w, x)


# Per int8 type: activation layout and the kernel call (type sizes and offsets as constants).
def _q8_0(o, w, q, d, s, m):
    matmul_q8_0(o, w, q, d, m)


def _q4_0(o, w, q, d, s, m):
    matmul_q4_0(o, w, q, d, s, m)


def _q4_k(o, w, q, d, s, m):
    matmul_q45_k(o, w, q, d, s, 144, 0, 16, m)


def _q5_k(o, w, q, d, s, m):
    matmul_q45_k(o, w, q, d, s, 176, 16, 48, m)


def _q6_k(o, w, q, d, s, m):
    matmul_q6_k(o, w, q, d, s, m)


_INT8_KERNELS = {
    QT.Q8_0: ("q8_0", _q8_0),
    QT.Q4_0: ("q8_0p", _q4_0),
    QT.Q4_K: ("q8_k", _q4_k),
    QT.Q5_K: ("q8_k", _q5_k),
    QT.Q6_K: ("q8_k", _q6_k),
}


def _matmul(out: np.ndarray, w: QTensor, x: np.ndarray) -> None:
    marker = _MARKERS[_state["by_type"].get(w.qtype) or _state["forced"] or detect_variant()]
    entry = _INT8_KERNELS.get(w.qtype)
    if entry is None:
        _matmul_float(out, w, x, marker)
        return
    kind, run = entry
    n_tok, cols = x.shape
    step = max(4, min(_MAX_TILE_TOKENS, _ACT_BYTES // cols) // 4 * 4)
    if n_tok <= step:
        xq, xd, xs = _scratch(kind, n_tok, cols)
        _quantize(kind, xq, xd, xs, x)
        run(out, w.data, xq, xd, xs, marker)
        return
    # long inputs go in chunks of `step` tokens, each quantised just before use (bounded scratch)
    xq, xd, xs = _scratch(kind, step, cols)
    for t0 in range(0, n_tok, step):
        n = min(step, n_tok - t0)
        q, d, s = (xq, xd, xs) if n == step else (xq[:n], xd[:n], xs[:n])
        _quantize(kind, q, d, s, x[t0 : t0 + n])
        run(out[t0 : t0 + n], w.data, q, d, s, marker)


def _quantize(kind: str, xq, xd, xs, x) -> None:
    if kind == "q8_0":
        quantize_q8_0(xq, xd, xs, x, 0)
    elif kind == "q8_0p":
        quantize_q8_0(xq, xd, xs, x, 1)
    else:
        quantize_q8_k(xq, xd, xs, x)


def _matmul_float(out: np.ndarray, w: QTensor, x: np.ndarray, marker) -> None:
    qt = w.qtype
    if qt == QT.F32:
        matmul_f32(out, w.data.view(np.float32), x)
    elif qt == QT.F16:
        matmul_f16(out, w.data.view(np.uint16), x, marker)
    elif qt == QT.BF16:
        matmul_bf16(out, w.data.view(np.uint16), x)
    else:
        raise UnsupportedError(f"no matrix kernel for {qt.name}; re-quantise the model to a supported type")
