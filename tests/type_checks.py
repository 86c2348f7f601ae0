"""The checks every weight-type test file repeats (test_mxfp4, test_legacy_types, test_iq4_types,
test_k23_types, test_iquants): the per-variant fixture, bit comparisons, the engine's and ggml's
activation blocks, ggml's summation orders, batch rows against the row alone, `kinds.KINDS` row
ranges, the fused expert block, a GGUF file through the loader, and the VNNI kernels compiled for
an AVX-512 CPU. Each file keeps its own emulation of ggml's arithmetic; these are the parts that
do not depend on the type.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import ggml_lib
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter

from edgemoe.kernels import dispatch, kernel_names, matmul, matvec, set_threads
from edgemoe.kernels.q8act import quantize_q8_0, quantize_q8_k
from edgemoe.qtensor import QTensor, check_supported

VARIANTS = dispatch.supported_variants()
MARKERS = {v: dispatch._MARKERS[v] for v in VARIANTS}
TOKENS = (1, 3, 4, 5, 9, 70)  # single, remainder only, one tile, tile + 1, two tiles + 1, two chunks


def variant_fixture(names: tuple[str, ...]):
    """The `variant` fixture: each variant this CPU offers forced in turn, printing the kernels of `names`."""

    @pytest.fixture(params=VARIANTS, name="variant")
    def variant(request):
        dispatch.force_variant(request.param)
        kernels = kernel_names()
        print(f"variant {request.param}: " + ", ".join(f"{n} {kernels[n]!r}" for n in names))
        yield request.param
        dispatch.force_variant(None)

    return variant


def ggml_fixture():
    """The module-scoped `ggml` fixture: ggml's compiled C (llama-cpp-python's libggml, through ctypes), or a skip."""

    @pytest.fixture(scope="module", name="ggml")
    def ggml():
        return ggml_lib.load_or_skip()

    return ggml


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads are not compared)."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and bits_equal(np.where(nan, 0, a), np.where(nan, 0, b))


def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded f32 a * b + c (one rounding, as vfmadd) for f32 operands: the product is exact in f64,
    the sum is rounded to odd in f64 (TwoSum's exact error, then the odd neighbour when inexact), after which
    rounding to f32 cannot double-round. Checked against exact rationals in test_iq4_types, test_iquants and
    test_k23_types."""
    with np.errstate(all="ignore"):
        a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in np.broadcast_arrays(a, b, c))
        p = a * b  # exact: 24 + 24 bits
        s = np.ascontiguousarray(p + c)
        t = s - p
        err = (p - (s - t)) + (c - t)  # s + err == p + c exactly (finite values)
        inexact = np.isfinite(s) & (err != 0) & ((s.view(np.uint64) & 1) == 0)
        s = np.where(inexact, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def x8_weights(qt: QT, raw: np.ndarray) -> np.ndarray:
    """The 8-row layout of plain rows `raw`, read-only as a QTensor holds it (the signature the engine compiles)."""
    from edgemoe.kernels import layouts

    w = layouts.repack_x8(qt, raw)
    w.setflags(write=False)
    return w


def run_x8(kernel, w: np.ndarray, act, marker, n_row: int) -> np.ndarray:
    """(T, n_row) f32: `kernel(out, w, xq, xd, xs, marker)` on activations act = (xq, xd, xs), out NaN-filled."""
    xq, xd, xs = act
    out = np.full((xq.shape[0], n_row), np.nan, np.float32)
    kernel(out, w, xq, xd, xs, marker)
    return out


def check_x8_rows(pair, rows_fn, w: np.ndarray, act, n_row: int) -> np.ndarray:
    """An x8 kernel pair (parallel, serial) `(out, w, xq, xd, xs, marker)` and its `rows_fn`: every row bit-identical
    for each batch size of TOKENS, thread count, twin and variant (the VNNI marker included, which the x8 kernels
    run as AVX2 code), and over row ranges. n_row = 40. Returns the rows computed one token per call (T, n_row)."""
    import numba

    from edgemoe.kernels import intrinsics

    xq, xd, xs = act
    ref = np.empty((len(xq), n_row), np.float32)
    first = MARKERS[VARIANTS[-1]]
    for t in range(len(xq)):
        pair[1](ref[t : t + 1], w, xq[t : t + 1], xd[t : t + 1], xs[t : t + 1], first)
    markers = dict(MARKERS)
    if "avx2" in VARIANTS:
        markers["vnni marker"] = intrinsics.VNNI
    try:
        for n_thr in (1, 2):
            set_threads(min(n_thr, numba.config.NUMBA_NUM_THREADS))
            for kernel in pair:
                for name, marker in markers.items():
                    for n_tok in TOKENS:
                        out = run_x8(kernel, w, (xq[:n_tok], xd[:n_tok], xs[:n_tok]), marker, n_row)
                        assert bits_equal(out, ref[:n_tok]), (n_thr, kernel, name, n_tok)
    finally:
        set_threads(numba.config.NUMBA_NUM_THREADS)
    for name, marker in markers.items():
        for t0, t1 in ((0, len(xq)), (5, 6), (1, 4)):
            got = rows_over(rows_fn, ((0, 8), (8, 24), (24, 40)), w, (xq[t0:t1], xd[t0:t1], xs[t0:t1]), marker, n_row)
            assert bits_equal(got, ref[t0:t1]), (name, t0, t1)
    return ref


def rows_over(rows_fn, ranges, w, act, marker, n_row: int) -> np.ndarray:
    """(T, n_row): a `rows` kernel (`kernels.rows`) over each (r0, r1) of `ranges`, all T tokens of `act` per call."""
    xq, xd, xs = act
    out = np.full((len(xq), n_row), np.nan, np.float32)
    for r0, r1 in ranges:
        block = np.full((len(xq), r1 - r0), np.nan, np.float32)
        rows_fn(block, r0, r1, w, xq, xd, xs, marker)
        out[:, r0:r1] = block
    return out


def check_x8_round_trip(qt: QT, raw: np.ndarray) -> None:
    """Plain rows `raw` (R, n) of type `qt` through its 8-row layout (`layouts.X8`, as the loader uses it): the
    same bytes in (R / 8, 8n), back bit for bit (gguf-py dequantises both alike), and the same when written
    into a given array."""
    import gguf.quants as gq

    from edgemoe.kernels import layouts

    packed = layouts.repack_x8(qt, raw)
    assert packed.shape == (raw.shape[0] // 8, 8 * raw.shape[1]) and packed.dtype == np.uint8
    back = layouts.unpack_x8(qt, packed)
    np.testing.assert_array_equal(back, raw)
    with np.errstate(all="ignore"):
        assert same(gq.dequantize(back, qt), gq.dequantize(raw, qt))
    into = np.full_like(packed, 0xAA)
    assert layouts.repack_x8(qt, raw, into) is into
    np.testing.assert_array_equal(into, packed)


def relative_error(y: np.ndarray, x: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """(T, R) |y - x @ wd.T| relative to |x| @ |wd|.T, in float64 (wd the dequantised weights, float64)."""
    xf = x.astype(np.float64)
    return np.abs(y - xf @ wd.T) / (np.abs(xf) @ np.abs(wd).T)


# ---- activation blocks --------------------------------------------------------------------------


def engine_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine's Q8_0 activation blocks (q8act), plain layout: ggml's int8 values xq (T, C), d = amax / 127
    and s = d * sum kept in f32, (T, B) each."""
    xq = np.empty(x.shape, np.int8)
    xd, xs = (np.empty((x.shape[0], x.shape[1] // 32), np.float32) for _ in range(2))
    quantize_q8_0(xq, xd, xs, np.ascontiguousarray(x), 0)
    return xq, xd, xs


def pair_layout(xq: np.ndarray) -> np.ndarray:
    """Plain int8 blocks (T, C) -> the pair layout of quantize_q8_0(..., pairs=1) (a last odd block stays plain)."""
    n_tok, cols = xq.shape
    paired = cols // 64 * 64
    pairs = xq[:, :paired].reshape(n_tok, -1, 2, 2, 16).transpose(0, 1, 3, 2, 4).reshape(n_tok, paired)
    return np.ascontiguousarray(np.concatenate([pairs, xq[:, paired:]], axis=1))


def kernel_layout(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain int8 blocks (T, C) -> the kernels' (pair layout, int32 block sums (T, B))."""
    return pair_layout(xq), xq.reshape(xq.shape[0], -1, 32).sum(axis=2, dtype=np.int32)


def engine_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine's Q8_K activation blocks (q8act): xq (T, C) int8, xd (T, S) f32, xb (T, C/16) int32 sums."""
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // 256), np.float32)
    xb = np.empty((x.shape[0], x.shape[1] // 16), np.int32)
    quantize_q8_k(xq, xd, xb, np.ascontiguousarray(x, np.float32))
    return xq, xd, xb


def q8_k_blocks(xq: np.ndarray, xd: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Q8_K activations as ggml's block_q8_K bytes (T, S * 292): d f32 | qs[256] | bsums int16[16]."""
    n_tok, n_sb = xd.shape
    out = np.zeros((n_tok, n_sb, 292), np.uint8)
    out[:, :, 0:4] = xd.astype(np.float32).view(np.uint8).reshape(n_tok, n_sb, 4)
    out[:, :, 4:260] = xq.view(np.uint8).reshape(n_tok, n_sb, 256)
    out[:, :, 260:292] = xb.astype(np.int16).view(np.uint8).reshape(n_tok, n_sb, 32)
    return out.reshape(n_tok, -1)


def unpack_q8_k(raw: np.ndarray, n_tok: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_q8_K rows (T, S * 292) -> qs (T, C) int8, d (T, S) f32, bsums (T, C/16) int32."""
    blocks = raw.reshape(n_tok, -1, 292)
    xq = blocks[:, :, 4:260].copy().view(np.int8).reshape(n_tok, -1)
    xb = blocks[:, :, 260:292].copy().view(np.int16).reshape(n_tok, -1).astype(np.int32)
    return xq, blocks[:, :, :4].copy().view(np.float32)[..., 0], xb


def ggml_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's own Q8_0 activation blocks (gguf-py's quantiser = quantize_row_q8_0_ref): raw (T, B*34),
    qs (T, C) int8 and d (T, B) f32 holding the f16 values."""
    import gguf.quants as gq

    raw = np.asarray(gq.quantize(x, QT.Q8_0)).view(np.uint8).reshape(x.shape[0], -1)
    blocks = raw.reshape(x.shape[0], -1, 34)
    qs = blocks[:, :, 2:].copy().view(np.int8).reshape(x.shape)
    return raw, qs, blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)


# ---- ggml's summation orders for per-block terms (T, R, B) ----------------------------------------


def sum_block_order(terms: np.ndarray) -> np.ndarray:
    """ggml's generic loop: sumf += term, block by block, in f32."""
    acc = np.zeros(terms.shape[:2], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for b in range(terms.shape[2]):
            acc = acc + terms[:, :, b]
    return acc


def sum_kernel_order(terms: np.ndarray) -> np.ndarray:
    """The 32-value block kernels (mxfp4, q451, iq4's IQ4_NL): lane k adds blocks 8g + k; the lanes in order
    from 0; then the tail blocks."""
    nb = terms.shape[2]
    n8 = nb // 8 * 8
    lanes = np.zeros(terms.shape[:2] + (8,), np.float32)
    out = np.zeros(terms.shape[:2], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for b in range(0, n8, 8):
            lanes = lanes + terms[:, :, b : b + 8]
        for k in range(8):
            out = out + lanes[:, :, k]
        for b in range(n8, nb):
            out = out + terms[:, :, b]
    return out


def order_bound(terms: np.ndarray) -> np.ndarray:
    """(T, R) the bound of f32 summation-order error between two sums of the terms (T, R, B)."""
    return 2 * terms.shape[2] * 2.0**-24 * np.abs(terms).astype(np.float64).sum(axis=2)


# ---- kernel checks ------------------------------------------------------------------------------


def use(monkeypatch, threads: int, twin: str) -> None:
    set_threads(threads)
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_BYTES", 1 << 62 if twin == "serial" else 0)


def reset_threads() -> None:
    set_threads(dispatch.numba.config.NUMBA_NUM_THREADS)


def rows_alone(monkeypatch, w: QTensor, x: np.ndarray) -> np.ndarray:
    """(T, R) each token of x (T, C) alone through matvec (2 threads, the parallel twin)."""
    use(monkeypatch, 2, "parallel")
    single = np.empty((len(x), w.shape[0]), np.float32)
    for t in range(len(x)):
        matvec(single[t], w, x[t])
    return single


def check_batch_rows(monkeypatch, w: QTensor, x: np.ndarray, single: np.ndarray, what: str) -> None:
    """Batch rows bit-identical to the row alone `single` (T, R): serial and parallel twins, 1 and 2 threads,
    every count of TOKENS."""
    for threads, twin in ((1, "serial"), (1, "parallel"), (2, "parallel")):
        use(monkeypatch, threads, twin)
        for n_tok in TOKENS:
            out = np.full((n_tok, w.shape[0]), np.nan, np.float32)
            matmul(out, w, x[:n_tok])
            bad = np.argwhere(out != single[:n_tok])
            assert not len(bad), f"{what} T={n_tok} {threads} thread(s) {twin}: {bad[:5].tolist()}"


def check_row_ranges(kind, w: QTensor, x: np.ndarray, act, ranges, marker: int, what=None) -> None:
    """kind.rows over each (r0, r1) of `ranges`, on the activation blocks `act` of x (C,), gives matvec's bits."""
    whole = np.empty(w.shape[0], np.float32)
    matvec(whole, w, x)
    out = rows_over(kind.rows, ranges, w.data, act, marker, w.shape[0])[0]
    assert bits_equal(out, whole), what


def moe_kinds(experts) -> tuple:
    from edgemoe.kernels import fused

    return fused.moe_kinds(None, experts[0].gate, experts[0].down)


def check_fused_block(rng, experts, kinds) -> None:
    """The fused one-token expert block over three experts gives the bits of the separate kernels."""
    from edgemoe.kernels import fused, ops
    from edgemoe.models.base import linear

    D, n_i = experts[0].down.shape
    x, h = rng.standard_normal((2, D), dtype=np.float32)
    wts = np.array([0.5, 0.3, 0.2], np.float32)
    got = fused.moe_block(x, h, experts, wts, kinds)
    acc = np.zeros(D, np.float32)
    for a, ex in enumerate(experts):
        hb = np.empty((1, n_i), np.float32)
        ops.silu_mul(hb, linear(h[None], ex.gate), linear(h[None], ex.up))
        acc = acc + wts[a] * linear(hb, ex.down)[0]
    assert bits_equal(got, x + acc)


# ---- a GGUF file through the loader ---------------------------------------------------------------


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, QT]]) -> list:
    """Write raw 2-D tensors {name: (raw, type)} to a GGUF file at path; its tensors as GGUFReader reads them."""
    writer = GGUFWriter(str(path), "llama")
    for name, (raw, qt) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFReader(str(path)).tensors


def loaded(t, qt: QT, raw: np.ndarray, cols: int, supported: bool = True) -> QTensor:
    """The reader's tensor t through to_qtensor (after check_supported, when `supported`): a QTensor of type
    qt holding raw's bytes."""
    from edgemoe.formats.gguf import to_qtensor

    if supported:
        assert check_supported(t.tensor_type, "test") == qt
    w = to_qtensor(t)
    assert isinstance(w, QTensor) and w.qtype == qt and w.shape == (raw.shape[0], cols)
    np.testing.assert_array_equal(w.data, raw)
    return w


def check_linear(rng, w: QTensor, expect, wd=None, tokens=(1, 3), what=None) -> None:
    """linear on random x of each token count: expect(x)'s bits and, given the dequantised wd, close to x @ wd.T."""
    from edgemoe.models.base import linear

    for n_tok in tokens:
        x = rng.standard_normal((n_tok, w.shape[1]), dtype=np.float32)
        y = linear(x, w)
        assert bits_equal(y, expect(x)), what
        if wd is not None:
            assert relative_error(y, x, wd).max() < 1e-2


# ---- VNNI kernels compiled (never run) for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K ----

_ZEN4 = "+avx512f,+avx512vl,+avx512bw,+avx512dq,+avx512cd,+avx512vnni,+avx2,+fma,+f16c,+avx,+bmi2"
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")


def kernel_sig(xs: str, *fmt: str) -> str:
    """The Numba signature of a raw kernel (out, weights, xq, xd, xs[, fmt], marker), in compile_script's names."""
    return f"(a(T.float32), w, a(T.int8), a(T.float32), a(T.{xs}), {''.join(f + ', ' for f in fmt)}T.int32)"


def compile_script(module: str, cases) -> str:
    """Python that compiles each (kernel, signature) of edgemoe.kernels.<module> and finds vpdpbusd in it."""
    lines = [
        "from numba import types as T",
        f"from edgemoe.kernels import {module}",
        'a = lambda dt: T.Array(dt, 2, "C")',
        'w = T.Array(T.uint8, 2, "C", readonly=True)',
    ]
    for kernel, sig in cases:
        fn = f"{module}.{kernel}"
        lines += [f"sig = {sig}", f"{fn}.compile(sig)", f'assert "vpdpbusd" in {fn}.inspect_asm(sig), "{kernel}"']
    return "\n".join(lines) + "\n"


def compile_for_zen4(tmp_path, script: str, what: str = "kernels", timeout: int = 600) -> None:
    """Run `script` in a Python whose Numba targets a Zen 4 CPU; skipped where this CPU has VNNI itself."""
    if "vnni" in VARIANTS:
        pytest.skip(f"this CPU runs the vnni {what} in the tests above")
    env = dict(os.environ, NUMBA_CPU_NAME="znver4", NUMBA_CPU_FEATURES=_ZEN4, NUMBA_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], env=env, cwd=root, check=True, timeout=timeout)
