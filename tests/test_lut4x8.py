"""The 8-row interleaved IQ4_NL and MXFP4 layouts and kernel (edgemoe.kernels.lut4x8): the layout round trip
and byte map; the product against gguf-py's dequantised weights in float64, and bit for bit against a NumPy
emulation of the documented arithmetic (exact integer dots, one f32 product and one FMA per block, blocks in
order); rows that do not depend on the batch, the threads, the twin or the SIMD variant (the vnni marker
included); ggml's compiled generic C within its one extra rounding per block.
"""

from __future__ import annotations

import gguf.quants as gq
import numba
import numpy as np
import pytest
import type_checks as tc
from gguf import GGMLQuantizationType as QT
from type_checks import fma32

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import intrinsics, lut4x8, set_threads
from edgemoe.quants.iq4 import KVALUES_IQ4NL
from edgemoe.quants.mxfp4 import KVALUES_MXFP4

TYPES = (QT.IQ4_NL, QT.MXFP4)
PLAIN = {QT.IQ4_NL: (18, 2), QT.MXFP4: (17, 1)}  # (block bytes, scale bytes), ggml-common.h
LEVELS = {QT.IQ4_NL: KVALUES_IQ4NL, QT.MXFP4: KVALUES_MXFP4}
ROWS = {QT.IQ4_NL: lut4x8.rows_iq4_nl_x8, QT.MXFP4: lut4x8.rows_mxfp4_x8}
VARIANTS, MARKERS = tc.VARIANTS, tc.MARKERS
TOKENS = tc.TOKENS  # 1, 3, 4, 5, 9, 70: single, remainder only, one tile, tile + 1, two tiles + 1, many
# (rows, cols): one group x one block; 3 blocks; 44 blocks (1408 columns); 90 blocks (gpt-oss's 2880)
SHAPES = ((8, 32), (16, 96), (24, 1408), (40, 2880))


def _name(qt: QT) -> str:
    return qt.name


def random_blocks(rng, qt: QT, rows: int, cols: int) -> np.ndarray:
    """(rows, cols / 32 * S) uint8: random codes, small finite scales (f16 d of either sign; E8M0 118..129)."""
    size, _ = PLAIN[qt]
    raw = rng.integers(0, 256, (rows, cols // 32, size), dtype=np.uint8)
    if qt == QT.IQ4_NL:
        d = rng.uniform(1e-3, 1e-2, (rows, cols // 32)) * rng.choice([-1, 1], (rows, cols // 32))
        raw[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, cols // 32, 2)
    else:
        raw[:, :, 0] = rng.integers(118, 130, (rows, cols // 32))
    return raw.reshape(rows, -1)


def weights(rng, qt: QT, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Plain weights to test on: random raw blocks, and gguf-py's quantiser's output where it has one."""
    out = {"random": random_blocks(rng, qt, rows, cols)}
    if qt == QT.MXFP4:  # gguf-py cannot quantise IQ4_NL (see test_ggml_generic_c for ggml's quantiser)
        w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02)
        out["gguf"] = np.asarray(gq.quantize(w, qt)).view(np.uint8)
    return out


def activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's "q8_0" activations of x (T, C), `q8act.quantize_q8_0(..., 0)`: xq (T, C) int8 plain, xd (T, B)
    f32, xs (unused)."""
    return tc.engine_q8_0(x)


def parts(qt: QT, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sumi, d), each (T, R, B): the exact integer dots (int64) and d = f32(d_w * d_x), d_w the f16 d or
    e8m0_to_fp32_half(e) (gguf-py's)."""
    size, sb = PLAIN[qt]
    n_row, n_tok = raw.shape[0], xq.shape[0]
    blocks = raw.reshape(n_row, -1, size)  # (R, B, S)
    qs = blocks[:, :, sb:]
    levels = LEVELS[qt][np.concatenate([qs & 15, qs >> 4], axis=2)].astype(np.int64)  # (R, B, 32)
    sumi = np.einsum("rbj,tbj->trb", levels, xq.reshape(n_tok, -1, 32).astype(np.int64))  # (T, R, B) exact
    if qt == QT.IQ4_NL:
        dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (R, B)
    else:
        dw = gq.MXFP4.e8m0_to_fp32_half(blocks[:, :, 0])
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return sumi, dw[None] * xd[:, None, :]  # one f32 rounding


def emulate(qt: QT, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R) f32: the documented arithmetic in NumPy, acc = fma(f32(sumi), d, acc) block after block."""
    sumi, d = parts(qt, raw, xq, xd)
    acc = np.zeros(sumi.shape[:2], np.float32)
    for b in range(sumi.shape[2]):
        acc = fma32(sumi[:, :, b].astype(np.float32), d[:, :, b], acc)  # |sumi| < 2**24: exact in f32
    return acc


def run(qt: QT, w: np.ndarray, x: np.ndarray, marker) -> np.ndarray:
    """out (T, R) of the serial x8 kernel on x8 weights w (R / 8, B * 8S) and floats x (T, C)."""
    xq, xd, xs = activations(x)
    out = np.full((x.shape[0], w.shape[0] * 8), np.nan, np.float32)
    lut4x8.matmul_lut4_x8_serial(out, w, xq, xd, xs, lut4x8.FORMATS[qt], marker)
    return out


# ---- layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", TYPES, ids=_name)
def test_layout_round_trip(qt):
    rng = np.random.default_rng(1)
    for rows, cols in SHAPES + ((512, 4096),):  # the last is over 1 MB: the parallel repack twin
        raw = random_blocks(rng, qt, rows, cols)
        raw.setflags(write=False)  # as a memory-mapped file's or a streamed expert's bytes
        tc.check_x8_round_trip(qt, raw)
    assert lut4x8.block_bytes(QT.IQ4_NL) == 144 and lut4x8.block_bytes(QT.MXFP4) == 136


@pytest.mark.parametrize("qt", TYPES, ids=_name)
def test_byte_map(qt):
    """The documented positions: the scales of rows 0..7 (s bytes each) first, then chunk j = quant bytes
    4j..4j+3 of row r at 8s + 32j + 4r."""
    size, sb = PLAIN[qt]
    raw = random_blocks(np.random.default_rng(2), qt, 16, 96)
    blocks = raw.reshape(16, 3, size)
    packed = lut4x8.repack_lut4_x8(qt, raw)  # (2, 3 * 8 * size)
    for g, b in ((0, 1), (1, 2)):
        x8 = packed[g, 8 * size * b : 8 * size * (b + 1)]
        np.testing.assert_array_equal(x8[: 8 * sb], blocks[8 * g : 8 * g + 8, b, :sb].reshape(-1))
        for j in range(4):
            for r in range(8):
                at = 8 * sb + 32 * j + 4 * r
                np.testing.assert_array_equal(x8[at : at + 4], blocks[8 * g + r, b, sb + 4 * j : sb + 4 * j + 4])


def test_refused():
    rng = np.random.default_rng(3)
    for qt in TYPES:
        size, _ = PLAIN[qt]
        with pytest.raises(UnsupportedError, match="divisible by 8"):
            lut4x8.repack_lut4_x8(qt, random_blocks(rng, qt, 12, 64))
        with pytest.raises(UnsupportedError):
            lut4x8.repack_lut4_x8(qt, np.zeros((8, 2 * size), np.int8))  # not uint8
        with pytest.raises(UnsupportedError):
            lut4x8.repack_lut4_x8(qt, np.zeros((8, 2 * size + 1), np.uint8))  # not whole blocks
        with pytest.raises(ValueError, match="out must be"):
            lut4x8.repack_lut4_x8(qt, random_blocks(rng, qt, 16, 64), np.zeros((2, 10), np.uint8))
    with pytest.raises(UnsupportedError, match="IQ4_NL or MXFP4"):
        lut4x8.repack_lut4_x8(QT.Q4_0, np.zeros((8, 18), np.uint8))
    with pytest.raises(UnsupportedError):
        lut4x8.unpack_lut4_x8(QT.Q8_0, np.zeros((1, 272), np.uint8))


# ---- kernel ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qt", TYPES, ids=_name)
def test_matmul_matches_dequantised_and_emulation(qt, variant):
    rng = np.random.default_rng(4)
    for rows, cols in SHAPES:
        for name, raw in weights(rng, qt, rows, cols).items():
            wd = gq.dequantize(raw, qt).astype(np.float64).reshape(rows, cols)  # (R, C)
            w = lut4x8.repack_lut4_x8(qt, raw)
            w.setflags(write=False)  # weights are read-only where they are memory-mapped
            x = rng.standard_normal((9, cols), dtype=np.float32)  # (T, C): two tiles of 4 and one token
            out = run(qt, w, x, MARKERS[variant])
            what = (name, rows, cols)
            # (a) the float64 product: the error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(out, x, wd).max() < 1e-2, what
            # (b) the same int8 arithmetic in float64: only the f32 scale product and sums may differ
            xq, xd, _ = activations(x)
            xe = (xq.reshape(9, -1, 32) * xd[:, :, None].astype(np.float64)).reshape(9, cols)
            assert (np.abs(xe @ wd.T - out) / (np.abs(xe) @ np.abs(wd).T)).max() < 1e-5, what
            # (c) the documented arithmetic, bit for bit
            assert tc.bits_equal(out, emulate(qt, raw, xq, xd)), what


def _edge_blocks(rng, qt: QT, rows: int, cols: int) -> np.ndarray:
    """Random blocks with scales at the edges: IQ4_NL f16 +-0, subnormals, 65504, +-inf, NaN; MXFP4 E8M0
    0, 1 (subnormal halves), 254, 255 (2**127, overflowing to inf with the larger codes)."""
    raw = random_blocks(rng, qt, rows, cols).reshape(rows, cols // 32, -1)
    n = rows * cols // 32
    if qt == QT.IQ4_NL:
        edges = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00], np.uint16)
        pick = rng.random(n) < 0.3
        d = raw[:, :, :2].copy().view(np.uint16).reshape(n)
        d[pick] = rng.choice(edges, pick.sum())
        raw[:, :, :2] = d.view(np.uint8).reshape(rows, cols // 32, 2)
    else:
        e = raw[:, :, 0].reshape(n)
        pick = rng.random(n) < 0.3
        e[pick] = rng.choice(np.array([0, 1, 2, 254, 255], np.uint8), pick.sum())
        raw[:, :, 0] = e.reshape(rows, cols // 32)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qt", TYPES, ids=_name)
def test_edge_scales(qt, variant):
    """Scales at the f16 / E8M0 edges and an all-zero activation block (0 * inf = NaN): the emulation's
    bits, NaN where it has NaN."""
    rng = np.random.default_rng(5)
    raw = _edge_blocks(rng, qt, 24, 352)
    x = rng.standard_normal((5, 352), dtype=np.float32) * np.float32(1e3)
    x[1, 32:64] = 0
    xq, xd, _ = activations(x)
    out = run(qt, lut4x8.repack_lut4_x8(qt, raw), x, MARKERS[variant])
    want = emulate(qt, raw, xq, xd)
    assert np.isnan(want).any() and np.isinf(want).any()  # the edges are reached
    assert tc.same(out, want)


@pytest.mark.parametrize("qt", TYPES, ids=_name)
def test_rows_do_not_depend_on_batch_threads_twin_or_variant(qt):
    """Bit-identical rows for any batch size, thread count, twin and variant (the vnni marker, which takes the
    AVX2 code, included where AVX2 runs); rows_<type>_x8 on row ranges gives them too."""
    rows, cols = 64, 1056  # 8 groups, 33 blocks
    rng = np.random.default_rng(6)
    raw = random_blocks(rng, qt, rows, cols)
    w = lut4x8.repack_lut4_x8(qt, raw)
    x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)
    xq, xd, xs = activations(x)
    fmt = lut4x8.FORMATS[qt]
    markers = dict(MARKERS, **({"vnni-marker": intrinsics.VNNI} if "avx2" in VARIANTS else {}))
    ref = np.empty((len(x), rows), np.float32)  # one token per call
    for t in range(len(x)):
        lut4x8.matmul_lut4_x8_serial(ref[t : t + 1], w, xq[t : t + 1], xd[t : t + 1], xs[t : t + 1], fmt, MARKERS[VARIANTS[0]])
    assert tc.bits_equal(ref, emulate(qt, raw, xq, xd))
    try:
        for threads in (1, 2):
            set_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            for kernel in (lut4x8.matmul_lut4_x8, lut4x8.matmul_lut4_x8_serial):
                for name, marker in markers.items():
                    for n_tok in TOKENS:
                        out = np.full((n_tok, rows), np.nan, np.float32)
                        kernel(out, w, xq[:n_tok], xd[:n_tok], xs[:n_tok], fmt, marker)
                        bad = np.argwhere(out != ref[:n_tok])
                        assert not len(bad), f"{threads} thread(s) {kernel} {name} T={n_tok}: {bad[:5].tolist()}"
    finally:
        tc.reset_threads()
    for name, marker in markers.items():
        for t0, t1 in ((0, len(xq)), (5, 6), (66, 70)):
            out = tc.rows_over(ROWS[qt], ((0, 8), (8, 24), (24, 64)), w, (xq[t0:t1], xd[t0:t1], xs[t0:t1]), marker, rows)
            assert tc.bits_equal(out, ref[t0:t1]), (name, t0, t1)


ggml = tc.ggml_fixture()


def test_ggml_generic_c(ggml):
    """IQ4_NL weights from ggml's own quantiser, ggml's own Q8_0 activation blocks (f16 scales): within one
    rounding per block of ggml_vec_dot_iq4_nl_q8_0_generic, which this build compiles without contracting
    `sumf += d * sumi` to an FMA (ggml_lib has no MXFP4 entry point)."""
    rng = np.random.default_rng(7)
    raw = ggml.quantize(QT.IQ4_NL, rng.standard_normal((40, 2880)).astype(np.float32) * np.float32(0.02))
    x = rng.standard_normal((6, 2880)).astype(np.float32)
    act, xq, xd = tc.ggml_q8_0(x)
    out = np.empty((6, 40), np.float32)
    w = lut4x8.repack_lut4_x8(QT.IQ4_NL, raw)
    lut4x8.matmul_lut4_x8_serial(out, w, xq, xd, xd, lut4x8.FORMATS[QT.IQ4_NL], MARKERS[VARIANTS[-1]])
    assert tc.bits_equal(out, emulate(QT.IQ4_NL, raw, xq, xd))
    ref = ggml.vec_dot(QT.IQ4_NL, raw, act, generic=True)
    sumi, d = parts(QT.IQ4_NL, raw, xq, xd)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= tc.order_bound(d * sumi.astype(np.float32)))
