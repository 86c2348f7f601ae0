"""The 8-row interleaved IQ4_XS layout and kernels (edgemoe.kernels.iq4xsx8): the layout round trip and byte
map, the product against gguf-py's dequantised weights and against a NumPy emulation of the documented
arithmetic (bit for bit), rows that do not depend on the batch, the threads, the twin or the variant (the VNNI
marker included; tests/test_kernels.py compiles every kind's kernel for an AVX-512 CPU).

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
from edgemoe.kernels import iq4xsx8
from edgemoe.kernels.q8act import quantize_q8_k

VARIANTS = tc.VARIANTS
MARKERS = tc.MARKERS  # {variant: marker} of this CPU's variants
KVALUES = np.array(gq.IQ4_NL.kvalues, np.int64)  # kvalues_iq4nl, from gguf-py
TOKENS = tc.TOKENS  # 1, 3, 4, 5, 9, 70: single, remainder only, one tile, tile + 1, two tiles + 1, many


def encode_scales(ls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ls (..., 8) 6-bit sub-block scales -> (scales_h (..., 2) bytes, scales_l (..., 4) bytes) of the plain block."""
    ls = ls.astype(np.uint32)
    sl = ((ls[..., 0::2] & 15) | ((ls[..., 1::2] & 15) << 4)).astype(np.uint8)
    sh = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint32))).sum(axis=-1).astype(np.uint16)
    return sh[..., None].view(np.uint8), sl


def random_blocks(rng, n_row: int, cols: int) -> np.ndarray:
    """(R, S * 136) uint8: random codes, small finite f16 d of either sign, and sub-block scales such that every
    ls 0..63 appears at every sub-block position j once 64 super-blocks are there (block b: ls_j = b + 9j mod 64)."""
    n = n_row * cols // 256
    raw = rng.integers(0, 256, (n, 136), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, n) * rng.choice([-1, 1], n)
    raw[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    ls = (np.arange(n)[:, None] + 9 * np.arange(8)) % 64  # (B, 8)
    raw[:, 2:4], raw[:, 4:8] = encode_scales(ls)
    return raw.reshape(n_row, -1)


def activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine's Q8_K blocks of x (T, C): xq (T, C) int8, xd (T, S) f32, xs (T, C / 16) int32."""
    return tc.engine_q8_k(x)


def emulate(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R) f32: the documented arithmetic on the plain blocks raw (R, S * 136): per super-block the exact
    isum = sum_j (ls_j - 32) * (levels . xq), then acc = fma(f32(isum), d_w * d_x, acc), super-blocks in order."""
    n_row, n_tok = raw.shape[0], xq.shape[0]
    blocks = raw.reshape(n_row, -1, 136)
    n_sb = blocks.shape[1]
    dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (R, S)
    sh = blocks[:, :, 2:4].copy().view(np.uint16)[..., 0].astype(np.int64)  # (R, S)
    sl = blocks[:, :, 4:8].astype(np.int64)  # (R, S, 4)
    j = np.arange(8)
    ls = ((sl[:, :, j // 2] >> (4 * (j % 2))) & 15) | (((sh[:, :, None] >> (2 * j)) & 3) << 4)  # (R, S, 8)
    qs = blocks[:, :, 8:].reshape(n_row, n_sb, 8, 16)
    levels = KVALUES[np.concatenate([qs & 15, qs >> 4], axis=-1)]  # (R, S, 8, 32) in column order
    sumi = np.einsum("rsjc,tsjc->trsj", levels, xq.astype(np.int64).reshape(n_tok, n_sb, 8, 32))  # exact
    isum = (sumi * (ls - 32)[None]).sum(axis=3)  # (T, R, S) exact
    assert np.abs(isum).max() < 2**31
    acc = np.zeros((n_tok, n_row), np.float32)
    for s in range(n_sb):
        acc = fma32(isum[:, :, s].astype(np.float32), dw[None, :, s] * xd[:, None, s], acc)
    return acc


# ---- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(8, 256), (16, 768), (64, 4096), (2048, 1024)])
def test_layout_round_trip(rows, cols):
    """(2048, 1024) is 1.1 MB: the parallel repack twin."""
    raw = random_blocks(np.random.default_rng(rows + cols), rows, cols)
    tc.check_x8_round_trip(QT.IQ4_XS, raw)
    assert iq4xsx8.repack_iq4_xs_x8(raw).shape == (rows // 8, cols // 256 * 1088)


def test_byte_map():
    """The documented positions in super-block s = 1 of group 1: d of row r at 2r, scales_l byte i at 16 + 8i + r,
    scales_h byte h at 48 + 8h + r, qs bytes 16j + 4k .. + 3 of row r at 64 + 128j + 32k + 4r."""
    raw = random_blocks(np.random.default_rng(0), 16, 512)
    blk = raw.reshape(16, 2, 136)[8:, 1]  # (8 rows, 136) plain super-block 1 of rows 8..15
    x8 = iq4xsx8.repack_iq4_xs_x8(raw)[1, 1088:]
    for r in range(8):
        np.testing.assert_array_equal(x8[2 * r : 2 * r + 2], blk[r, 0:2])
        for i in range(4):
            assert x8[16 + 8 * i + r] == blk[r, 4 + i]
        for h in range(2):
            assert x8[48 + 8 * h + r] == blk[r, 2 + h]
        for j in range(8):
            for k in range(4):
                o = 64 + 128 * j + 32 * k + 4 * r
                np.testing.assert_array_equal(x8[o : o + 4], blk[r, 8 + 16 * j + 4 * k : 8 + 16 * j + 4 * k + 4])


def test_refused():
    raw = random_blocks(np.random.default_rng(1), 16, 256)
    with pytest.raises(UnsupportedError, match="divisible by 8"):
        iq4xsx8.repack_iq4_xs_x8(raw[:12])
    with pytest.raises(UnsupportedError):
        iq4xsx8.repack_iq4_xs_x8(raw.view(np.int8))
    with pytest.raises(UnsupportedError):
        iq4xsx8.repack_iq4_xs_x8(raw[:, :100])  # not whole super-blocks
    with pytest.raises(ValueError, match="out must be"):
        iq4xsx8.repack_iq4_xs_x8(raw, np.empty((2, 100), np.uint8))


# ---- kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_dequantised_weights_and_emulation(variant):
    """Against gguf-py's dequantised weights in float64 (the int8 rounding of x: 1e-2; the same int8 values
    exactly: 1e-5), and bit for bit against `emulate`; 64 super-blocks carry every scale at every position."""
    rng = np.random.default_rng(2)
    marker = MARKERS[variant]
    for n_row, cols in ((16, 1024), (40, 2816), (8, 256)):
        raw = random_blocks(rng, n_row, cols)
        wd = gq.dequantize(raw, QT.IQ4_XS).reshape(n_row, cols).astype(np.float64)  # (R, C)
        w = tc.x8_weights(QT.IQ4_XS, raw)
        x = rng.standard_normal((6, cols), dtype=np.float32)  # (T, C): a tile of 4, then 2 single tokens
        act = activations(x)
        for kernel in (iq4xsx8.matmul_iq4_xs_x8, iq4xsx8.matmul_iq4_xs_x8_serial):
            out = tc.run_x8(kernel, w, act, marker, n_row)
            assert tc.relative_error(out, x, wd).max() < 1e-2, (n_row, cols)
            xq, xd, _ = act
            xe = (xq.reshape(6, -1, 256) * xd[:, :, None].astype(np.float64)).reshape(6, cols)  # the int8 values
            assert tc.relative_error(out, xe, wd).max() < 1e-5, (n_row, cols)
            assert tc.bits_equal(out, emulate(raw, xq, xd)), (n_row, cols, kernel)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_sums(variant):
    """The largest |isum| a super-block can give (every level -127, every activation -127, ls = 0: 32 * 256 *
    127 * 127 > 2**24) and its opposite (ls = 63), where f32(isum) rounds: no overflow, the emulation's bits."""
    n_row, cols = 16, 512
    raw = random_blocks(np.random.default_rng(3), n_row, cols).reshape(n_row, 2, 136)
    raw[:8, :, 8:] = 0  # code 0: -127
    raw[:4, :, 2:8] = 0  # ls = 0
    raw[4:8, :, 2:8] = 0xFF  # ls = 63
    raw = raw.reshape(n_row, -1)
    x = np.ones((5, cols), np.float32)  # Q8_K: every value -127
    x[1:] = np.random.default_rng(4).standard_normal((4, cols), dtype=np.float32)
    xq, xd, xs = activations(x)
    assert (xq[0] == -127).all()
    out = tc.run_x8(iq4xsx8.matmul_iq4_xs_x8_serial, tc.x8_weights(QT.IQ4_XS, raw), (xq, xd, xs), MARKERS[variant], n_row)
    want = emulate(raw, xq, xd)
    assert tc.bits_equal(out, want)


def test_rows_do_not_depend_on_batch_threads_twin_or_variant():
    """Bit-identical rows for every batch size, 1 and 2 threads, both twins and every variant (and the VNNI
    marker, which takes the AVX2 code); rows_iq4_xs_x8 over row ranges gives the same bits."""
    n_row, cols = 40, 1280  # 5 groups, 5 super-blocks
    rng = np.random.default_rng(5)
    raw = random_blocks(rng, n_row, cols)
    w = tc.x8_weights(QT.IQ4_XS, raw)
    x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)
    xq, xd, xs = activations(x)
    pair = (iq4xsx8.matmul_iq4_xs_x8, iq4xsx8.matmul_iq4_xs_x8_serial)
    ref = tc.check_x8_rows(pair, iq4xsx8.rows_iq4_xs_x8, w, (xq, xd, xs), n_row)
    assert tc.bits_equal(ref, emulate(raw, xq, xd))


def test_activations_are_q8_k():
    """The kernels take `quantize_q8_k`'s blocks as they are: int8 in [-127, 127] (vpsignb cannot negate -128)."""
    x = np.random.default_rng(6).standard_normal((3, 512), dtype=np.float32) * np.float32(5)
    x[0, 7] = -1e30
    xq, xd, xs = np.empty((3, 512), np.int8), np.empty((3, 2), np.float32), np.empty((3, 32), np.int32)
    quantize_q8_k(xq, xd, xs, x)
    assert xq.min() >= -127
