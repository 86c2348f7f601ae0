"""The 8-row interleaved Q4_0 layout and kernel (edgemoe.kernels.q4x8) against gguf-py: the layout
round trip, the activation quantiser against gguf's Q8_0, the product against gguf's dequantised
weights, and results that do not depend on the batch, the threads or the SIMD variant.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import dispatch, intrinsics, layouts, q4x8, set_threads
from edgemoe.qtensor import QTensor

MARKERS = {"generic": intrinsics.GENERIC, "avx2": intrinsics.AVX2}
VARIANTS = [v for v in MARKERS if v in dispatch.supported_variants()]
# (rows, cols): one group, one block; an odd number of blocks; a long row; a Mixtral-like shape
SHAPES = ((8, 32), (64, 96), (64, 4096), (3584, 1024))
TOKENS = (1, 3, 4, 5, 9, 70)


def q4_0(rows: int, cols: int, seed: int) -> np.ndarray:
    """(rows, cols / 32 * 18) uint8 Q4_0 blocks of random weights, quantised by gguf-py."""
    w = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    return quantize(w, QT.Q4_0)


def test_layout_round_trip():
    for rows, cols in SHAPES:
        raw = q4_0(rows, cols, rows + cols)
        packed = q4x8.repack_q4_0_x8(raw)
        assert packed.shape == (rows // 8, cols // 32 * 144)
        back = q4x8.unpack_q4_0_x8(packed)
        np.testing.assert_array_equal(back, raw)
        np.testing.assert_array_equal(dequantize(back, QT.Q4_0), dequantize(raw, QT.Q4_0))
    # the documented byte order: scales of rows 0..7, then chunk j = bytes 4j..4j+3 of each row
    raw = q4_0(8, 64, 0).reshape(8, 2, 18)
    block1 = q4x8.repack_q4_0_x8(raw.reshape(8, 36))[0, 144:]
    np.testing.assert_array_equal(block1[:16], raw[:, 1, :2].reshape(16))
    np.testing.assert_array_equal(block1[16 + 32 * 2 + 4 * 5 : 16 + 32 * 2 + 4 * 6], raw[5, 1, 2 + 8 : 2 + 12])
    with pytest.raises(UnsupportedError):
        q4x8.repack_q4_0_x8(q4_0(12, 32, 0))


def test_activations_match_gguf_q8_0():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 288), dtype=np.float32) * np.float32(3)  # 9 blocks
    x[1, :32] = 0  # an all-zero block
    xq, xd, xc = np.empty((3, 288), np.int8), np.empty((3, 9), np.float32), np.empty((3, 9), np.int32)
    q4x8.quantize_q8_0_x8(xq, xd, xc, x)
    ref = quantize(x, QT.Q8_0).reshape(3, 9, 34)
    qs = ref[:, :, 2:].view(np.int8)
    np.testing.assert_array_equal(xq.reshape(3, 9, 32), qs)
    np.testing.assert_array_equal(xd.astype(np.float16), ref[:, :, :2].copy().view(np.float16)[..., 0])
    np.testing.assert_array_equal(xc, 8 * qs.astype(np.int32).sum(axis=2))


def int8_values(x: np.ndarray) -> np.ndarray:
    """x (T, C) -> float64 values the int8 path multiplies: gguf's Q8_0 int8 times amax / 127 in
    f32 (gguf's scale before it is rounded to f16)."""
    q = quantize(x, QT.Q8_0).reshape(x.shape[0], -1, 34)[:, :, 2:].view(np.int8)
    d = np.abs(x.reshape(x.shape[0], -1, 32)).max(axis=2, keepdims=True) / np.float32(127)
    return (q * d.astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matmul_matches_dequantised_weights(variant):
    rng = np.random.default_rng(1)
    for rows, cols in SHAPES:
        raw = q4_0(rows, cols, rows * cols)
        wd = dequantize(raw, QT.Q4_0).astype(np.float64).reshape(rows, cols)
        w = layouts.interleave(QTensor(raw, QT.Q4_0, rows, cols))
        for n_tok in (1, 5) if rows * cols > 10**5 else (1, 5, 70):
            x = rng.standard_normal((n_tok, cols), dtype=np.float32)
            out = np.full((n_tok, rows), np.nan, np.float32)
            dispatch.force_variant(variant, "Q4_0")
            try:
                dispatch.matmul(out, w, x)
            finally:
                dispatch.force_variant(None, "Q4_0")
            scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T  # |x| . |W| per output
            assert (np.abs(out - x.astype(np.float64) @ wd.T) / scale).max() < 1e-2, (rows, cols, n_tok)
            # the same int8 arithmetic in float64: only the f32 scale product and sums may differ
            xe = int8_values(x)
            exact = np.abs(xe @ wd.T - out) / (np.abs(xe) @ np.abs(wd).T)
            assert exact.max() < 1e-5, (rows, cols, n_tok)


def test_rows_do_not_depend_on_batch_threads_or_variant():
    """Bit-identical rows for any batch size, thread count, serial/parallel twin and variant."""
    rows, cols = 64, 1056  # 33 blocks
    raw = q4_0(rows, cols, 7)
    w = layouts.interleave(QTensor(raw, QT.Q4_0, rows, cols)).data
    x = np.random.default_rng(3).standard_normal((max(TOKENS), cols), dtype=np.float32)
    nb = cols // 32
    xq, xd, xc = np.empty(x.shape, np.int8), np.empty((len(x), nb), np.float32), np.empty((len(x), nb), np.int32)
    q4x8.quantize_q8_0_x8(xq, xd, xc, x)
    ref = np.empty((len(x), rows), np.float32)  # one token per call
    first = MARKERS[VARIANTS[-1]]
    for t in range(len(x)):
        q4x8.matmul_q4_0_x8_serial(ref[t : t + 1], w, xq[t : t + 1], xd[t : t + 1], xc[t : t + 1], first)
    try:
        for n_thr in (1, 2):
            set_threads(min(n_thr, numba.config.NUMBA_NUM_THREADS))
            for kernel in (q4x8.matmul_q4_0_x8, q4x8.matmul_q4_0_x8_serial):
                for variant in VARIANTS:
                    for n_tok in TOKENS:
                        out = np.full((n_tok, rows), np.nan, np.float32)
                        kernel(out, w, xq[:n_tok], xd[:n_tok], xc[:n_tok], MARKERS[variant])
                        assert np.array_equal(out, ref[:n_tok]), (n_thr, kernel, variant, n_tok)
    finally:
        set_threads(numba.config.NUMBA_NUM_THREADS)
    # dispatch (its quantiser, token chunks, serial/parallel choice) gives the same rows too
    dispatch.force_variant(VARIANTS[-1], "Q4_0")
    try:
        out = np.empty((len(x), rows), np.float32)
        dispatch.matmul(out, QTensor(w, QT.Q4_0, rows, cols, interleave=8), x)
        np.testing.assert_array_equal(out, ref)
        one = np.empty(rows, np.float32)
        dispatch.matvec(one, QTensor(w, QT.Q4_0, rows, cols, interleave=8), x[5])
        np.testing.assert_array_equal(one, ref[5])
    finally:
        dispatch.force_variant(None, "Q4_0")


def test_argument_checks():
    raw = q4_0(16, 64, 4)
    plain = QTensor(raw, QT.Q4_0, 16, 64)
    w = layouts.interleave(plain)
    with pytest.raises(ValueError, match="storage"):  # plain storage labelled interleaved
        dispatch.matmul(np.empty((1, 16), np.float32), QTensor(raw, QT.Q4_0, 16, 64, interleave=8),
                        np.ones((1, 64), np.float32))
    with pytest.raises(ValueError):
        dispatch.matmul(np.empty((2, 16), np.float32), w, np.ones((3, 64), np.float32))
    with pytest.raises(TypeError):
        dispatch.matmul(np.empty((1, 16), np.float32), w, np.ones((1, 64), np.float64))
    with pytest.raises(ValueError):
        dispatch.matvec(np.empty(8, np.float32), w, np.ones(64, np.float32))
    with pytest.raises(UnsupportedError):
        layouts.interleave(w)
    with pytest.raises(UnsupportedError):
        dispatch.matmul(np.empty((1, 16), np.float32), QTensor(np.zeros((16, 256), np.uint8), QT.F32, 16, 64,
                                                               interleave=8), np.ones((1, 64), np.float32))
