"""The 8-row interleaved Q4_K and Q8_0 layouts (edgemoe.kernels.q4kx8, q8x8): the layout round trips and
byte maps, and the activation sums Q4_Kx8 needs. Its products are checked against gguf-py's dequantised weights, for
every batch size, thread count and variant, in test_kernel_rows.py; models with it against the plain
path in test_fused.py and test_batch.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from weight_factory import make_weight

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import layouts, q4kx8, q8x8
from edgemoe.kernels.q8act import quantize_q8_k
from edgemoe.qtensor import QTensor


@pytest.mark.parametrize("rows,cols", [(8, 256), (16, 768), (64, 1024)])
def test_layout_round_trip(rows, cols):
    raw = make_weight(QT.Q4_K, rows, cols, np.random.default_rng(rows + cols)).data
    packed = q4kx8.repack_q4_k_x8(raw)
    assert packed.shape == (rows // 8, cols // 256 * 1152) and packed.nbytes == raw.nbytes
    back = q4kx8.unpack_q4_k_x8(packed)
    np.testing.assert_array_equal(back, raw)
    np.testing.assert_array_equal(dequantize(back, QT.Q4_K), dequantize(raw, QT.Q4_K))
    w = layouts.interleave(QTensor(raw, QT.Q4_K, rows, cols))
    assert w.interleave == 8 and np.array_equal(layouts.unpack_x8(QT.Q4_K, w.data), raw)


def test_byte_map():
    """The documented positions: d and dmin of rows 0..7, scale byte i of row r at 32 + 8i + r,
    quant bytes 32c + 4k .. + 3 of row r at 128 + 256c + 32k + 4r."""
    raw = make_weight(QT.Q4_K, 8, 512, np.random.default_rng(0)).data.reshape(8, 2, 144)
    block1 = q4kx8.repack_q4_k_x8(raw.reshape(8, 288))[0, 1152:]
    np.testing.assert_array_equal(block1[:16], raw[:, 1, 0:2].reshape(16))
    np.testing.assert_array_equal(block1[16:32], raw[:, 1, 2:4].reshape(16))
    assert block1[32 + 8 * 11 + 5] == raw[5, 1, 4 + 11]
    c, k, r = 2, 7, 3
    np.testing.assert_array_equal(block1[128 + 256 * c + 32 * k + 4 * r:][:4], raw[r, 1, 16 + 32 * c + 4 * k:][:4])
    with pytest.raises(UnsupportedError):
        q4kx8.repack_q4_k_x8(make_weight(QT.Q4_K, 12, 256, np.random.default_rng(1)).data)


def test_activation_pair_sums():
    x = np.random.default_rng(3).standard_normal((3, 512), dtype=np.float32) * np.float32(4)
    xq, xd, xm = np.empty((3, 512), np.int8), np.empty((3, 2), np.float32), np.empty((3, 8), np.int32)
    q4kx8.quantize_q8_k_x8(xq, xd, xm, x)
    rq, rd, rb = np.empty_like(xq), np.empty_like(xd), np.empty((3, 32), np.int32)
    quantize_q8_k(rq, rd, rb, x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xd, rd)
    sums = xq.astype(np.int32).reshape(3, 16, 32).sum(axis=2)  # (T, sub-blocks)
    np.testing.assert_array_equal((xm << 16) >> 16, sums[:, 0::2])  # low halves, sign-extended
    np.testing.assert_array_equal(xm >> 16, sums[:, 1::2])


@pytest.mark.parametrize("rows,cols", [(8, 32), (16, 96), (64, 1024)])
def test_q8_0_layout_round_trip(rows, cols):
    raw = quantize(np.random.default_rng(rows).standard_normal((rows, cols), dtype=np.float32), QT.Q8_0)
    packed = q8x8.repack_q8_0_x8(raw)
    assert packed.shape == (rows // 8, cols // 32 * 272)
    np.testing.assert_array_equal(q8x8.unpack_q8_0_x8(packed), raw)
    if cols >= 64:  # the documented byte order: scales of rows 0..7, then chunk j = bytes 4j..4j+3 of each row
        blocks = raw.reshape(rows, cols // 32, 34)
        block1 = packed[0, 272:544]
        np.testing.assert_array_equal(block1[:16], blocks[:8, 1, :2].reshape(16))
        np.testing.assert_array_equal(block1[16 + 32 * 6 + 4 * 3:][:4], blocks[3, 1, 2 + 24:2 + 28])
    with pytest.raises(UnsupportedError):
        q8x8.repack_q8_0_x8(raw[:4])
