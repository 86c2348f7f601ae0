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
from .kinds import KINDS
from .q8act import activations

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


def kernel_names() -> dict[str, str]:
    """For each supported weight type, the instructions its kernels run on this CPU (the variant in use),
    and those of its 8-row interleaved layout where that differs."""
    out = {}
    for t in SUPPORTED_TYPES:
        v = current_variant(t.name)
        plain, x8 = KINDS[(t, 1)].isa[v], KINDS.get((t, 8))
        out[t.name] = plain if x8 is None or x8.isa[v] == plain else f"{plain}; 8-row layout: {x8.isa[v]}"
    return out


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
    """The (rows, row bytes) of plain storage; (rows / 8, 8 * row bytes) of the 8-row interleaved layouts."""
    n = _row_bytes(w.qtype, w.cols)
    if (w.qtype, w.interleave) not in KINDS:
        raise UnsupportedError(f"no matrix kernel for {w.qtype.name} interleaved by {w.interleave}")
    return (w.rows // w.interleave, w.interleave * n)


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
        if (qtype, 1) not in KINDS:
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


assert {(t, 1) for t in SUPPORTED_TYPES} <= set(KINDS), "every supported type needs a matrix kernel"


def _matmul(out: np.ndarray, w: QTensor, x: np.ndarray, n_tok: int) -> None:
    qt = w.qtype
    marker = _MARKERS[_state["by_type"].get(qt) or _state["forced"] or detect_variant()]
    kind = KINDS[(qt, w.interleave)]
    parallel, serial = kind.matmul
    run, quantize, act = kind.call, kind.quant, kind.act
    data = w.data
    if act == "f32":
        run(serial if data.nbytes * n_tok < PARALLEL_MIN_BYTES else parallel, out, data, x, None, None, marker)
        return
    cols = x.shape[1]
    step = max(4, min(_MAX_TILE_TOKENS, _ACT_BYTES // cols) // 4 * 4)
    if n_tok <= step:
        xq, xd, xs = _scratch(act, n_tok, cols)
        quantize(xq, xd, xs, x)
        run(serial if data.nbytes * n_tok < PARALLEL_MIN_BYTES else parallel, out, data, xq, xd, xs, marker)
        return
    # long inputs go in chunks of `step` tokens, each quantised just before use (bounded scratch)
    xq, xd, xs = _scratch(act, step, cols)
    kernel = serial if data.nbytes * step < PARALLEL_MIN_BYTES else parallel
    for t0 in range(0, n_tok, step):
        n = min(step, n_tok - t0)
        q, d, s = (xq, xd, xs) if n == step else (xq[:n], xd[:n], xs[:n])
        quantize(q, d, s, x[t0 : t0 + n])
        run(kernel, out[t0 : t0 + n], data, q, d, s, marker)
