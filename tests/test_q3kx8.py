"""The 8-row interleaved Q3_K layout and kernels (edgemoe.kernels.q3kx8): the layout round trip and byte map, the
product against gguf-py's dequantised weights and against a NumPy emulation of the documented arithmetic (bit for
bit), rows that do not depend on the batch, the threads, the twin or the variant (the VNNI marker included;
tests/test_kernels.py compiles every kind's kernel for an AVX-512 CPU).

Every kernel test runs on each variant `dispatch.supported_variants()` offers on this CPU.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGMLQuantizationType as QT
from type_checks import fma32

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import q3kx8

VARIANTS = tc.VARIANTS
MARKERS = tc.MARKERS  # {variant: marker} of this CPU's variants
TOKENS = tc.TOKENS  # 1, 3, 4, 5, 9, 70: single, remainder only, one tile, tile + 1, two tiles + 1, many


def encode_scales(sc: np.ndarray) -> np.ndarray:
    """sc (B, 16) 6-bit sub-block scales -> (B, 12) scale bytes of the plain block (ggml's packing)."""
    sc = sc.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:8] = (sc[:, 0:8] & 15) | ((sc[:, 8:16] & 15) << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= (sc[:, j] >> 4) << (2 * (j // 4))
    return out


def decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain blocks raw (R, S * 110) -> q (R, S, 256) int64 in -4..3 (column order), sc - 32 (R, S, 16) int64,
    d (R, S) f32, read straight from ggml's block_q3_K."""
    n_row = raw.shape[0]
    b = raw.reshape(n_row, -1, 110).astype(np.int64)
    v = np.arange(256)
    n, k, lo = v // 128, (v // 32) % 4, v % 32
    q = ((b[:, :, 32 + 32 * n + lo] >> (2 * k)) & 3) - 4 * (1 - ((b[:, :, lo] >> (4 * n + k)) & 1))
    j = np.arange(16)
    sc = ((b[:, :, 96 + j % 8] >> (4 * (j // 8))) & 15) | (((b[:, :, 104 + j % 4] >> (2 * (j // 4))) & 3) << 4)
    d = raw.reshape(n_row, -1, 110)[:, :, 108:110].copy().view(np.float16)[..., 0].astype(np.float32)
    return q, sc - 32, d


def random_blocks(rng, n_row: int, cols: int) -> np.ndarray:
    """(R, S * 110) uint8: random quant bits, small finite f16 d of either sign, and sub-block scales such that
    every sc 0..63 appears at every sub-block position j once 64 super-blocks are there (block b: sc_j = b + 9j
    mod 64)."""
    n = n_row * cols // 256
    raw = rng.integers(0, 256, (n, 110), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, n) * rng.choice([-1, 1], n)
    raw[:, 108:110] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    raw[:, 96:108] = encode_scales((np.arange(n)[:, None] + 9 * np.arange(16)) % 64)
    return raw.reshape(n_row, -1)


def emulate(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R) f32: the documented arithmetic on the plain blocks raw (R, S * 110): per super-block the exact
    isum = sum_j (sc_j - 32) * (q_j . xq_j), then acc = fma(f32(isum), d_w * d_x, acc), super-blocks in order."""
    n_tok = xq.shape[0]
    q, sc, dw = decode(raw)
    n_row, n_sb = dw.shape
    x = xq.astype(np.int64).reshape(n_tok, n_sb, 16, 16)
    sumi = np.einsum("rsjc,tsjc->trsj", q.reshape(n_row, n_sb, 16, 16), x)  # exact
    isum = (sumi * sc[None]).sum(axis=3)  # (T, R, S) exact
    assert np.abs(isum).max() < 2**24  # f32(isum) is exact too
    acc = np.zeros((n_tok, n_row), np.float32)
    for s in range(n_sb):
        acc = fma32(isum[:, :, s].astype(np.float32), dw[None, :, s] * xd[:, None, s], acc)
    return acc


# ---- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(8, 256), (16, 768), (64, 4096), (2048, 1280)])
def test_layout_round_trip(rows, cols):
    """(2048, 1280) is 1.1 MB: the parallel repack twin."""
    raw = random_blocks(np.random.default_rng(rows + cols), rows, cols)
    tc.check_x8_round_trip(QT.Q3_K, raw)
    assert q3kx8.repack_q3_k_x8(raw).shape == (rows // 8, cols // 256 * 880)


def test_byte_map():
    """The documented positions in super-block s = 1 of group 1: d of row r at 2r, scale byte i at 16 + 8i + r,
    hmask bytes 4c .. 4c + 3 at 112 + 32c + 4r, qs bytes 4m .. 4m + 3 at 368 + 32m + 4r."""
    raw = random_blocks(np.random.default_rng(0), 16, 512)
    blk = raw.reshape(16, 2, 110)[8:, 1]  # (8 rows, 110) plain super-block 1 of rows 8..15
    x8 = q3kx8.repack_q3_k_x8(raw)[1, 880:]
    for r in range(8):
        np.testing.assert_array_equal(x8[2 * r : 2 * r + 2], blk[r, 108:110])
        for i in range(12):
            assert x8[16 + 8 * i + r] == blk[r, 96 + i]
        for c in range(8):
            o = 112 + 32 * c + 4 * r
            np.testing.assert_array_equal(x8[o : o + 4], blk[r, 4 * c : 4 * c + 4])
        for m in range(16):
            o = 368 + 32 * m + 4 * r
            np.testing.assert_array_equal(x8[o : o + 4], blk[r, 32 + 4 * m : 32 + 4 * m + 4])


def test_refused():
    raw = random_blocks(np.random.default_rng(1), 16, 256)
    with pytest.raises(UnsupportedError, match="divisible by 8"):
        q3kx8.repack_q3_k_x8(raw[:12])
    with pytest.raises(UnsupportedError):
        q3kx8.repack_q3_k_x8(raw.view(np.int8))
    with pytest.raises(UnsupportedError):
        q3kx8.repack_q3_k_x8(raw[:, :100])  # not whole super-blocks
    with pytest.raises(ValueError, match="out must be"):
        q3kx8.repack_q3_k_x8(raw, np.empty((2, 100), np.uint8))


def test_emulation_decodes_as_gguf():
    """The emulation's (q, sc, d) give gguf-py's dequantised values: it reads the format we did not write."""
    raw = random_blocks(np.random.default_rng(7), 8, 4096)
    q, sc, d = decode(raw)
    want = gq.dequantize(raw, QT.Q3_K).reshape(8, 16, 16, 16).astype(np.float64)
    got = d[:, :, None, None].astype(np.float64) * sc[..., None] * q.reshape(8, 16, 16, 16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


# ---- kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_dequantised_weights_and_emulation(variant):
    """Against gguf-py's dequantised weights in float64 (the int8 rounding of x: 1e-2; the same int8 values
    exactly: 1e-5), and bit for bit against `emulate`; 64 super-blocks carry every scale at every position."""
    rng = np.random.default_rng(2)
    marker = MARKERS[variant]
    for n_row, cols in ((16, 1024), (40, 2816), (8, 256), (8, 16384)):
        raw = random_blocks(rng, n_row, cols)
        wd = gq.dequantize(raw, QT.Q3_K).reshape(n_row, cols).astype(np.float64)  # (R, C)
        w = tc.x8_weights(QT.Q3_K, raw)
        x = rng.standard_normal((6, cols), dtype=np.float32)  # (T, C): a tile of 4, then 2 single tokens
        act = tc.engine_q8_k(x)
        xq, xd, _ = act
        xe = (xq.reshape(6, -1, 256) * xd[:, :, None].astype(np.float64)).reshape(6, cols)  # the int8 values
        want = emulate(raw, xq, xd)
        for kernel in (q3kx8.matmul_q3_k_x8, q3kx8.matmul_q3_k_x8_serial):
            out = tc.run_x8(kernel, w, act, marker, n_row)
            assert tc.relative_error(out, x, wd).max() < 1e-2, (n_row, cols)
            assert tc.relative_error(out, xe, wd).max() < 1e-5, (n_row, cols)
            assert tc.bits_equal(out, want), (n_row, cols, kernel)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_sums(variant):
    """The largest |isum| a super-block can give (every q -4, every activation -127 or -128, sc = 0 or 63) and
    mixed signs: no overflow or saturation, the emulation's bits."""
    n_row, cols = 16, 512
    raw = random_blocks(np.random.default_rng(3), n_row, cols).reshape(n_row, 2, 110)
    raw[:8, :, 0:96] = 0  # low bits 0, hmask clear: q = -4
    raw[8:12, :, 0:96] = 0xFF  # q = 3
    raw[:4, :, 96:108] = 0  # sc = 0
    raw[4:8, :, 96:108] = 0xFF  # sc = 63
    raw[8:12, :, 96:108] = 0xFF
    raw = raw.reshape(n_row, -1)
    x = np.ones((5, cols), np.float32)  # Q8_K: every value -127
    x[1] = -1
    x[2:] = np.random.default_rng(4).standard_normal((3, cols), dtype=np.float32)
    xq, xd, xs = tc.engine_q8_k(x)
    assert (xq[:2] == -127).all()
    xq[1] = -128  # beyond quantize_q8_k's range: the unsigned x signed products take it; xs follows xq
    xs[1] = -128 * 16
    want = emulate(raw, xq, xd)
    for kernel in (q3kx8.matmul_q3_k_x8, q3kx8.matmul_q3_k_x8_serial):
        assert tc.bits_equal(tc.run_x8(kernel, tc.x8_weights(QT.Q3_K, raw), (xq, xd, xs), MARKERS[variant], n_row), want)


def test_rows_do_not_depend_on_batch_threads_twin_or_variant():
    """Bit-identical rows for every batch size, 1 and 2 threads, both twins and every variant (and the VNNI
    marker, which takes the AVX2 code); rows_q3_k_x8 over row ranges gives the same bits."""
    n_row, cols = 40, 1280  # 5 groups, 5 super-blocks
    rng = np.random.default_rng(5)
    raw = random_blocks(rng, n_row, cols)
    w = tc.x8_weights(QT.Q3_K, raw)
    x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)
    xq, xd, xs = tc.engine_q8_k(x)
    ref = tc.check_x8_rows((q3kx8.matmul_q3_k_x8, q3kx8.matmul_q3_k_x8_serial), q3kx8.rows_q3_k_x8, w, (xq, xd, xs), n_row)
    assert tc.bits_equal(ref, emulate(raw, xq, xd))
