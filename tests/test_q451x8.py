"""The 8-row interleaved Q4_1 / Q5_0 / Q5_1 layouts and kernels (edgemoe.kernels.q451x8).

- The layout: a bit-exact round trip on several shapes, the documented byte positions (d, m, the H bits
  of every (row, element), chunk bytes), the claim that one 16-bit shift and an AND with 0x10 bring each
  chunk's fifth bits out of H, and storage it cannot take refused with UnsupportedError.
- The kernels against gguf-py's dequantised weights in float64 (within 1e-2 of |x|.|W|) and against the
  same int8 arithmetic in float64 (within 1e-5), on weights from gguf.quants.quantize and on random raw
  blocks (small finite d and m, every fifth-bit pattern); bit for bit against a NumPy emulation of the
  documented arithmetic: integer sumi, then f32 products and FMAs in block order.
- Rows bit-identical for every batch size, twin, thread count and variant, and the rows_* kernels on row
  ranges. (tests/test_kernels.py compiles every kind's kernel for a Zen 4 CPU.)
Variants: those `dispatch.supported_variants()` offers, plus the VNNI marker on any AVX2 CPU, since the x8
kernels run the AVX2 code for it (intrinsics_x8).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import type_checks as tc
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from test_legacy_types import random_blocks
from test_q4x8 import int8_values
from type_checks import fma32

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import intrinsics, q4x8, q451x8, set_threads
from edgemoe.kernels.q8act import quantize_q8_0

TYPES = (QT.Q4_1, QT.Q5_0, QT.Q5_1)
MARKERS = dict(tc.MARKERS)
if "avx2" in MARKERS:
    MARKERS.setdefault("vnni", intrinsics.VNNI)  # runs the AVX2 code in the x8 kernels
VARIANTS = tuple(MARKERS)
# (rows, cols): one group x one block, an odd block count, 8 + 1 blocks, the 1408-wide experts, a long row
SHAPES = ((8, 32), (16, 96), (40, 288), (24, 1408), (64, 4096))
TOKENS = tc.TOKENS
# byte offsets of (m, qh, qs) in a plain block and of (m, H, chunks) in an x8 block (the module docstring)
PLAIN = {QT.Q4_1: (2, None, 4), QT.Q5_0: (None, 2, 6), QT.Q5_1: (2, 4, 8)}
X8 = {QT.Q4_1: (16, None, 32), QT.Q5_0: (None, 16, 48), QT.Q5_1: (16, 32, 64)}


def _size(qt: QT) -> int:
    return GGML_QUANT_SIZES[qt][1]


def weights(qt: QT, rows: int, cols: int, rng, source: str) -> np.ndarray:
    """(rows, B * S) uint8 plain blocks: quantised by gguf-py, or random bytes with small finite d and m."""
    if source == "gguf":
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.05)
        return np.ascontiguousarray(np.asarray(quantize(w, qt)).view(np.uint8))
    return np.ascontiguousarray(random_blocks(rng, qt, rows, cols))


def activations(qt: QT, x: np.ndarray):
    """The kernel's activation blocks for x (T, C): q8_0 (xs f32 = d * sum) or q8_0x8 (xs int32 = 8 * sum)."""
    n_tok, nb = x.shape[0], x.shape[1] // 32
    xq, xd = np.empty(x.shape, np.int8), np.empty((n_tok, nb), np.float32)
    if q451x8.ACT[qt] == "q8_0x8":
        xs = np.empty((n_tok, nb), np.int32)
        q4x8.quantize_q8_0_x8(xq, xd, xs, x)
    else:
        xs = np.empty((n_tok, nb), np.float32)
        quantize_q8_0(xq, xd, xs, x, 0)
    return xq, xd, xs


def run(qt: QT, packed: np.ndarray, act, variant: str, serial: bool = False) -> np.ndarray:
    xq, xd, xs = act
    out = np.full((len(xq), packed.shape[0] * 8), np.nan, np.float32)
    kernel = q451x8.matmul_q451_x8_serial if serial else q451x8.matmul_q451_x8
    kernel(out, packed, xq, xd, xs, q451x8.FMT[qt], MARKERS[variant])
    return out


# ---- the layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_layout_round_trip(qt):
    rng = np.random.default_rng(int(qt))
    for rows, cols in SHAPES + ((512, 4096),):  # the last one >= 1 MB: the parallel repack twin
        for source in ("gguf", "random"):
            tc.check_x8_round_trip(qt, weights(qt, rows, cols, rng, source))


def _fifth_bits(raw_blocks: np.ndarray, qh: int) -> np.ndarray:
    """(..., S) plain blocks -> (..., 32) the fifth bit of each element (bit i of the little-endian u32 qh)."""
    word = raw_blocks[..., qh : qh + 4].copy().view(np.uint32)  # (..., 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_byte_map(qt):
    """The documented positions in block 1 of a group: d and m of rows 0..7, H byte 4r + k bit 2j (2j + 1)
    = fifth bit of element 4j + k (16 + 4j + k) of row r, chunk j byte 4r + i = qs byte 4j + i of row r."""
    size, (m, qh, qs), (xm, xh, xq) = _size(qt), PLAIN[qt], X8[qt]
    raw = weights(qt, 8, 96, np.random.default_rng(5), "random").reshape(8, 3, size)
    block = q451x8.repack_q451_x8(qt, raw.reshape(8, -1))[0, 8 * size : 16 * size]  # block 1
    np.testing.assert_array_equal(block[:16], raw[:, 1, 0:2].reshape(16))
    if m is not None:
        np.testing.assert_array_equal(block[xm : xm + 16], raw[:, 1, m : m + 2].reshape(16))
    r, j = 5, 2
    np.testing.assert_array_equal(block[xq + 32 * j + 4 * r :][:4], raw[r, 1, qs + 4 * j :][:4])
    if qh is None:
        return
    fifth = _fifth_bits(raw[:, 1], qh)  # (8, 32)
    h = block[xh : xh + 32]
    assert (h[4 * 5 + 2] >> 3) & 1 == fifth[5, 22]  # element 22 = 16 + 4 * 1 + 2 of row 5: byte 22, bit 3
    for r in range(8):
        for e in range(32):
            k, j, hi = e % 4, (e % 16) // 4, e // 16
            assert (h[4 * r + k] >> (2 * j + hi)) & 1 == fifth[r, e], (r, e)
    # chunk j's fifth bits by one 16-bit shift of H and an AND with 0x10, lined up with its bytes
    h16 = h.copy().view(np.uint16)
    for j in range(4):
        for col, s in ((4 * j, 4 - 2 * j), (16 + 4 * j, 3 - 2 * j)):
            v = (h16 << s) if s >= 0 else (h16 >> -s)
            got = v.astype(np.uint16).view(np.uint8) & 0x10  # byte 4r + k: element col + k of row r
            np.testing.assert_array_equal(got.reshape(8, 4), fifth[:, col : col + 4] << 4)


def test_storage_it_cannot_take_is_refused():
    raw = weights(QT.Q5_1, 16, 64, np.random.default_rng(6), "random")
    for bad in (raw[:12], raw.view(np.int8), raw[:, :40]):  # 12 rows; int8; 40 bytes, not whole 24-byte blocks
        with pytest.raises(UnsupportedError, match="plain layout"):
            q451x8.repack_q451_x8(QT.Q5_1, np.ascontiguousarray(bad))
    with pytest.raises(UnsupportedError, match="Q4_0"):
        q451x8.repack_q451_x8(QT.Q4_0, raw)


# ---- the kernels ------------------------------------------------------------------------------------


def quants(raw: np.ndarray, qt: QT):
    """Plain blocks (R, B * S) -> (q (R, B, 32) int64 unsigned quants, d (R, B) f32, m (R, B) f32 or None),
    from the block format: q = nibble (low: element i, high: i + 16) | fifth bit << 4."""
    (m_off, qh, qs), n_row = PLAIN[qt], raw.shape[0]
    blocks = raw.reshape(n_row, -1, _size(qt))
    nib = blocks[..., qs : qs + 16]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.int64)
    if qh is not None:
        q |= _fifth_bits(blocks, qh).astype(np.int64) << 4
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = None if m_off is None else blocks[..., m_off : m_off + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    return q, d, m


def emulate(raw: np.ndarray, qt: QT, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(T, R) f32: the module's documented arithmetic. Per block, in order from acc = 0:
    Q5_0 acc = fma(f32(sumi - 2 xc), d_w * xd, acc); Q4_1, Q5_1 acc = acc + fma(d_w * xd, f32(sumi), m_w * xs)."""
    q, d, m = quants(raw, qt)
    n_tok, nb = xq.shape[0], q.shape[1]
    sumi = np.einsum("rbi,tbi->trb", q, xq.reshape(n_tok, nb, 32).astype(np.int64))  # (T, R, B) exact
    acc = np.zeros((n_tok, raw.shape[0]), np.float32)
    for b in range(nb):
        e = d[None, :, b] * xd[:, b, None]  # (T, R) f32 x f32, rounded to f32
        if m is None:
            acc = fma32((sumi[:, :, b] - 2 * xs[:, b, None].astype(np.int64)).astype(np.float32), e, acc)
        else:
            acc = acc + fma32(e, sumi[:, :, b].astype(np.float32), m[None, :, b] * xs[:, b, None])
    return acc


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_matches_gguf_and_the_emulation(qt, variant):
    rng = np.random.default_rng(10 + int(qt))
    for rows, cols in SHAPES:
        for source in ("gguf", "random"):
            raw = weights(qt, rows, cols, rng, source)
            wd = dequantize(raw, qt).astype(np.float64).reshape(rows, cols)  # the oracle we did not write
            packed = q451x8.repack_q451_x8(qt, raw)
            x = rng.standard_normal((5, cols), dtype=np.float32)
            act = activations(qt, x)
            out = run(qt, packed, act, variant)
            what = (rows, cols, source)
            # (a) x @ W in float64: the error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(out, x, wd).max() < 1e-2, what
            # (b) the same int8 arithmetic in float64: only the f32 products and sums may differ
            xe = int8_values(x)
            assert (np.abs(xe @ wd.T - out) / (np.abs(xe) @ np.abs(wd).T)).max() < 1e-5, what
            # (c) the documented arithmetic, bit for bit, both twins
            want = emulate(raw, qt, *act)
            assert tc.bits_equal(out, want), what
            assert tc.bits_equal(run(qt, packed, act, variant, serial=True), want), what


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_batch_threads_twin_or_variant(qt):
    rows, cols = 64, 1056  # 8 groups, 33 blocks
    rng = np.random.default_rng(20 + int(qt))
    packed = q451x8.repack_q451_x8(qt, weights(qt, rows, cols, rng, "random"))
    x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)
    xq, xd, xs = activations(qt, x)
    ref = np.empty((len(x), rows), np.float32)  # one token per call
    for t in range(len(x)):
        ref[t : t + 1] = run(qt, packed, (xq[t : t + 1], xd[t : t + 1], xs[t : t + 1]), VARIANTS[-1], serial=True)
    try:
        for n_thr in (1, 2):
            set_threads(min(n_thr, numba.config.NUMBA_NUM_THREADS))
            for serial in (False, True):
                for variant in VARIANTS:
                    for n_tok in TOKENS:
                        out = run(qt, packed, (xq[:n_tok], xd[:n_tok], xs[:n_tok]), variant, serial)
                        assert np.array_equal(out, ref[:n_tok]), (n_thr, serial, variant, n_tok)
    finally:
        tc.reset_threads()
    rows_fn = {QT.Q4_1: q451x8.rows_q4_1_x8, QT.Q5_0: q451x8.rows_q5_0_x8, QT.Q5_1: q451x8.rows_q5_1_x8}[qt]
    for variant in VARIANTS:
        for t0, t1 in ((0, len(xq)), (7, 8)):
            out = tc.rows_over(rows_fn, ((0, 8), (8, 40), (40, 64)), packed, (xq[t0:t1], xd[t0:t1], xs[t0:t1]),
                               MARKERS[variant], rows)
            assert tc.bits_equal(out, ref[t0:t1]), (variant, t0, t1)
